"""Which observers a row change may concern: observers shared per ``BoundCursor.key``
(``ObserverEntry``) and, per table, the index from equality-filter values and held row keys to
them (``TableRoutes``), so a change costs the observers it may match, not all of them.

Only observers found through the value index have their rows' keys indexed: the others
(unconstrained, or keyed otherwise than the table) are candidates for every change anyway, so
indexing their keys, one entry per row of what may be a whole table, would buy nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from cdcddp.publish.clients import LiveClient, SubKey
from cdcddp.publish.definition import BoundCursor, TableName
from cdcddp.publish.observer import Key, Observer, Row, key_getter, replaced_key
from cdcddp.wal.events import ABSENT, Delete, Insert, RowChange, Update

__all__ = ["ObserverEntry", "TableRoutes"]


@dataclass(eq=False)
class ObserverEntry:
    """An observer shared by every subscription with its ``BoundCursor.key``."""

    bound: BoundCursor
    observer: Observer | None = None
    leases: int = 0  # subscriptions (pending or attached) using it
    subscribers: dict[tuple[int, SubKey], tuple[LiveClient, SubKey]] = field(
        default_factory=dict)
    ready: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None
    live: bool = False  # registered in the routing index
    keys_indexed: bool = False  # its rows' keys are in the routing index (``holders``)
    snapshot_queries: int = 0
    # The table's columns (name -> (type oid, varlena)) as its last snapshot saw them: a
    # stream ``Relation`` that differs means the table changed shape since (resync).
    shape: dict[str, tuple[int, bool]] | None = None

    @property
    def table(self) -> TableName:
        return self.bound.table


class TableRoutes:
    """Which observers a row change of one table may concern."""

    def __init__(self) -> None:
        self.entries: set[ObserverEntry] = set()
        self.by_value: dict[str, dict[Any, set[ObserverEntry]]] = {}
        self.unconstrained: set[ObserverEntry] = set()
        # Row key -> the observer holding it, or a set when several do (rare: the sole
        # holder needs no set, which matters for large results).
        self.holders: dict[Key, ObserverEntry | set[ObserverEntry]] = {}
        self.key_columns: tuple[str, ...] | None = None
        self._key_of: Callable[[Row], Key] | None = None  # a row's key (by key_columns)
        self.odd_keys: set[ObserverEntry] = set()  # cursors keyed differently from the table
        self._slots: dict[ObserverEntry, tuple[str, frozenset[Any]] | None] = {}

    def add(self, entry: ObserverEntry) -> None:
        observer = entry.observer
        assert observer is not None
        self.entries.add(entry)
        if self.key_columns is None:
            self.key_columns = observer.key_columns
            self._key_of = key_getter(self.key_columns)
        if observer.key_columns != self.key_columns:
            self.odd_keys.add(entry)
        constraints = entry.bound.filter.equality_constraints()
        slot: tuple[str, frozenset[Any]] | None = None
        if constraints:
            # The most selective column; an empty value set means nothing can ever match.
            column = min(constraints, key=lambda c: len(constraints[c]))
            slot = (column, constraints[column])
            index = self.by_value.setdefault(column, {})
            for value in slot[1]:
                index.setdefault(value, set()).add(entry)
        else:
            self.unconstrained.add(entry)
        self._slots[entry] = slot
        entry.keys_indexed = slot is not None and entry not in self.odd_keys
        self.hold_keys(entry)

    def remove(self, entry: ObserverEntry) -> None:
        observer = entry.observer
        assert observer is not None
        self.entries.discard(entry)
        self.odd_keys.discard(entry)
        self.unconstrained.discard(entry)
        slot = self._slots.pop(entry, None)
        if slot is not None:
            column, values = slot
            index = self.by_value.get(column, {})
            for value in values:
                holders = index.get(value)
                if holders is not None:
                    holders.discard(entry)
                    if not holders:
                        del index[value]
            if not index:
                self.by_value.pop(column, None)
        self.release_keys(entry)
        entry.keys_indexed = False

    def hold_keys(self, entry: ObserverEntry) -> None:
        """Index the keys of every row ``entry``'s observer holds (if its keys are indexed)."""
        observer = entry.observer
        assert observer is not None
        if not entry.keys_indexed:
            return
        if self.holders:
            for key in observer.rows:
                self.hold(entry, key)
        else:
            self.holders = dict.fromkeys(observer.rows, entry)

    def release_keys(self, entry: ObserverEntry) -> None:
        """The inverse of :meth:`hold_keys` (before its observer's rows are replaced)."""
        observer = entry.observer
        assert observer is not None
        if entry.keys_indexed:
            for key in list(observer.rows):
                self.release(entry, key)

    def follow_keys(self, entry: ObserverEntry, keys: tuple[Key | None, Key | None]) -> None:
        """After a change applied to ``entry``'s observer: index the keys it wrote (``keys``:
        ``Observer.keys``, old and new) as its rows now have them."""
        if not entry.keys_indexed:
            return
        old_key, new_key = keys
        observer = entry.observer
        assert observer is not None
        for key in (old_key,) if new_key == old_key else (old_key, new_key):
            if key is not None:
                if observer.holds(key):
                    self.hold(entry, key)
                else:
                    self.release(entry, key)

    def hold(self, entry: ObserverEntry, key: Key) -> None:
        held = self.holders.get(key)
        if held is None:
            self.holders[key] = entry
        elif type(held) is set:
            held.add(entry)
        elif held is not entry:
            self.holders[key] = {held, entry}  # type: ignore[arg-type]

    def release(self, entry: ObserverEntry, key: Key) -> None:
        held = self.holders.get(key)
        if held is entry:
            del self.holders[key]
        elif type(held) is set:
            held.discard(entry)
            if len(held) <= 1:
                if held:
                    self.holders[key] = held.pop()
                else:
                    del self.holders[key]

    def candidates(self, change: RowChange) -> set[ObserverEntry]:
        found: set[ObserverEntry] = set(self.odd_keys)
        kind = type(change)
        if kind is not Delete:
            new = change.new  # type: ignore[union-attr]
            for column, index in self.by_value.items():
                value = new.get(column, ABSENT)
                if value is ABSENT:  # an unchanged TOASTed value: any of them may match
                    for entries in index.values():
                        found |= entries
                    continue
                try:
                    entries = index.get(value)
                except TypeError:  # unhashable (json): equal to no indexed scalar
                    continue
                if entries:
                    found |= entries
        found |= self.unconstrained  # (for a DELETE too: their keys are not indexed)
        key_of = self._key_of
        if kind is not Insert and key_of is not None:
            key = replaced_key(key_of, change.identity,  # type: ignore[union-attr]
                               change.new if kind is Update else None)  # type: ignore[union-attr]
            if key is not None:
                held = self.holders.get(key)
                if type(held) is set:
                    found |= held
                elif held is not None:
                    found.add(held)
        return found


