"""Observers: the published set of one bound cursor, kept current from the change stream.

An observer is shared by every subscription with the same (publication cursor, params, user)
result. It holds each published row (all the columns the cursor needs, so rows whose unchanged
TOASTed values wal2json left out can be completed; as a tuple in ``columns`` order, the shape
the snapshot query returns, which is cheaper to keep than a dict, by key) and the rendered
document (its fields, by DDP wire id: the shape a merge box takes, copied whole for a new
subscription).
Documents are immutable once rendered: a change renders a new ``fields`` dict, so merge boxes
can keep references to them instead of copies (DESIGN invariant 8).

"Was in" comes from this published set, never from old-row images (invariant 4), so tables need
a primary key but not REPLICA IDENTITY FULL.

Pure: no I/O. Where a stream row lacks a column the observer has no copy of (an unchanged
TOASTed value of a row moving *into* the result), :meth:`Observer.apply` answers
:class:`NeedsRow` and the caller fetches the row by key and calls :meth:`Observer.apply_fetched`.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from operator import itemgetter
from typing import Any, Literal, TypeAlias

from cdcddp.ddp.mergebox import diff_visible
from cdcddp.gcpause import LARGE_RESULT_ROWS, gc_paused, promote_young_objects
from cdcddp.publish.definition import BoundCursor, Fields
from cdcddp.publish.ids import pk_to_wire_id
from cdcddp.publish.ordering import Rank, rank_getter, read_limit
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Delete, Insert, RowChange, Update

Row = dict[str, Any]
Key = tuple[Any, ...]
Values = tuple[Any, ...]  # a row's values in the observer's ``columns`` order


@dataclass(slots=True)  # not frozen: a frozen dataclass costs 4x to build, one per change
class DocOp:
    """A document-level change of an observer's result, for the merge boxes (read-only)."""

    kind: Literal["added", "changed", "removed"]
    collection: str
    doc_id: str
    fields: Mapping[str, Any] | None = None  # added: all fields; changed: the changed ones
    cleared: tuple[str, ...] = ()
    # changed: the document's whole (shared, immutable) fields after the change, so merge boxes
    # reference the observer's mapping instead of building a copy each.
    after: Mapping[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class NeedsRow:
    """The change cannot be applied without the current row for ``key`` (see module doc);
    the row fetched replaces the one the observer had at ``replaces`` (None: at ``key``)."""

    key: Key
    missing: tuple[str, ...]
    replaces: Key | None = None


def key_getter(columns: tuple[Any, ...]) -> Callable[[Any], Key]:
    """``row -> tuple of these columns' values`` (KeyError when one is missing); with
    indexes instead of names, the same for a row's values tuple. (Keys, and whole rows as
    values tuples: one per change, so no generator.)"""
    if len(columns) == 1:
        column = columns[0]
        return lambda row: (row[column],)
    return itemgetter(*columns)  # type: ignore[return-value]


def replaced_key(key_of: Callable[[Row], Key], identity: Row, new: Row | None) -> Key | None:
    """The key of the row an update or delete replaces: from the change's replica identity,
    else (an identity without the key columns: USING INDEX on other columns) from the new
    row, the key being assumed unchanged by an update; None when neither has it."""
    try:
        return key_of(identity)
    except KeyError:
        if new is None:
            return None
        try:
            return key_of(new)
        except KeyError:
            return None


# Non-negative ints below this have at most 23 digits: their decimal text is their wire id
# (no sign to escape, too short to look like an ObjectID).
_PLAIN_INT_ID_LIMIT = 10**23


def _fields_picker(pairs: tuple[tuple[str, int], ...]) -> Callable[[Values], Fields]:
    """``values -> {name: values[position], ...}``: a dict display compiled for these pairs,
    three times faster than ``dict(zip(...))`` (this runs for every row of a snapshot).
    Names enter the source only as repr() literals."""
    picker: Callable[[Values], Fields] = eval(
        f"lambda values: {{{_fields_display(pairs)}}}", {})
    return picker


def _fields_display(pairs: tuple[tuple[str, int], ...]) -> str:
    """The inside of a dict display ``{name: values[position], ...}`` (names as repr()
    literals: nothing else of a name enters compiled source)."""
    return ", ".join(f"{name!r}: values[{int(position)}]" for name, position in pairs)


def _wire_id_of_key(key: Key) -> str:
    """The DDP wire id of the document of the row with this key (``Cursor.render``'s id,
    stringified as Meteor does), with the common plain integer done inline."""
    if len(key) == 1:
        value = key[0]
        if type(value) is int and 0 <= value < _PLAIN_INT_ID_LIMIT:
            return str(value)
    return pk_to_wire_id(key)


def _values_renderer(key_positions: tuple[int, ...], fields_of: Callable[[Values], Fields]
                     ) -> Callable[[Values], tuple[str, Fields]]:
    """``values -> (DDP wire id, fields)`` for a row's values tuple (snapshot rows, kept rows):
    what ``Cursor.render`` plus ``id_stringify`` give for the row, read by position without
    building a row dict, the common single plain integer key inline (this runs for every
    changed row, and for every row of a snapshot)."""
    if len(key_positions) != 1:
        values_key_of = key_getter(key_positions)

        def render(values: Values) -> tuple[str, Fields]:
            return pk_to_wire_id(values_key_of(values)), fields_of(values)
        return render
    position = key_positions[0]

    def single_key(values: Values) -> tuple[str, Fields]:
        value = values[position]
        if type(value) is int and 0 <= value < _PLAIN_INT_ID_LIMIT:
            return str(value), fields_of(values)
        return pk_to_wire_id((value,)), fields_of(values)
    return single_key


# (rows, all_rows, docs): each values tuple into all_rows by key, its document into docs
Filler: TypeAlias = Callable[[Iterable[Values], dict[Key, Values], dict[str, Fields]], None]


def _values_filler(values_key_of: Callable[[Values], Key],
                   render_values: Callable[[Values], tuple[str, Fields]],
                   key_positions: tuple[int, ...], fields_display: str) -> Filler:
    """The loop that loads a snapshot's values tuples (see :data:`Filler`). With a single key
    column it is compiled for the shape, the key, the common plain integer id and the fields
    read inline: three calls fewer per row made a 100,000-row fill a fifth faster."""
    if len(key_positions) != 1:
        def fill(rows: Iterable[Values], all_rows: dict[Key, Values],
                 docs: dict[str, Fields]) -> None:
            for values in rows:
                all_rows[values_key_of(values)] = values
                doc_id, fields = render_values(values)
                docs[doc_id] = fields
        return fill
    source = (
        "def fill(rows, all_rows, docs):\n"
        "    for values in rows:\n"
        f"        key = values[{int(key_positions[0])}]\n"
        "        all_rows[(key,)] = values\n"
        "        if type(key) is int and 0 <= key < limit:\n"
        f"            docs[str(key)] = {{{fields_display}}}\n"
        "        else:\n"
        "            doc_id, fields = render_values(values)\n"
        "            docs[doc_id] = fields\n")
    namespace: dict[str, Any] = {"limit": _PLAIN_INT_ID_LIMIT, "render_values": render_values}
    exec(source, namespace)
    compiled: Filler = namespace["fill"]
    return compiled


RowHelpers: TypeAlias = tuple[
    Callable[[Row], Key],  # a row's key
    Callable[[Values], Key],  # a values tuple's key
    Callable[[Row], Values],  # a row as its values tuple
    Callable[[Values], tuple[str, Fields]],  # a values tuple's (wire id, fields)
    Filler,  # a snapshot's values tuples into an empty observer
]


@lru_cache(maxsize=1024)  # cursors made per call (publication functions) may vary: bounded
def _row_helpers(key_columns: tuple[str, ...], field_map: tuple[tuple[str, str], ...],
                 columns: tuple[str, ...]) -> RowHelpers:
    """The key and render functions for rows of this shape, shared by every observer of
    cursors with the same key, fields and columns: thousands of observers with different
    parameters then use one set of functions, which stays in the CPU caches (a set per
    observer made applying a change about 12 % slower with 10,000 observers)."""
    index = {column: i for i, column in enumerate(columns)}
    key_positions = tuple(index[c] for c in key_columns)
    field_pairs = tuple((name, index[column]) for column, name in field_map)
    values_key_of = key_getter(key_positions)
    render_values = _values_renderer(key_positions, _fields_picker(field_pairs))
    return (key_getter(key_columns), values_key_of, key_getter(columns), render_values,
            _values_filler(values_key_of, render_values, key_positions,
                           _fields_display(field_pairs)))


class Observer:
    """The result set of one bound cursor."""

    # A limited cursor's observer (:class:`LimitedObserver`) says after each change which
    # rows it let go to keep its limit, and whether it must be read again.
    limited = False
    evicted: tuple[Key, ...] = ()
    needs_requery = False

    def __init__(self, bound: BoundCursor, snapshot: Snapshot | None = None,
                 snapshot_lsn: int | None = None) -> None:
        cursor = bound.cursor
        self.bound = bound
        self.schema = cursor.schema_name
        self.table = cursor.table_name
        self.collection = cursor.collection_name
        self.columns = bound.columns
        self.key_columns = cursor.key_columns
        self._matches = bound.predicate
        self._filter_columns = bound.filter.columns
        (self._key_of, self._values_key_of, self._values_from_row, self._render_values,
         self._fill_values) = _row_helpers(cursor.key_columns, cursor.field_map, self.columns)
        self.rows: dict[Key, Values] = {}  # key -> the row's values
        self.docs: dict[str, Fields] = {}  # the same rows' documents: wire id -> fields
        # Until the stream passes the snapshot, transactions it already saw are skipped.
        # ``snapshot_lsn``: the WAL insert position read right after the snapshot was taken.
        self.snapshot = snapshot
        self.snapshot_lsn = snapshot_lsn
        # Rows fetched by key (NeedsRow) reflect every transaction their fetch snapshot saw;
        # changes of those transactions to those rows must not be applied again.
        self.fetched: dict[Key, tuple[Snapshot, int | None]] = {}
        # (old key, new key) of the row the last applied change replaced and wrote, either
        # None when there is none: the keys whose documents it may have added or removed
        # (the engine's holders index follows them).
        self.keys: tuple[Key | None, Key | None] = (None, None)

    # -- the snapshot/stream handoff -----------------------------------------------------------
    def wants_transaction(self, xid: int, end_lsn: int | None = None) -> bool:
        """Apply this committed transaction? False when the snapshot already reflects it.

        Commit order is not visibility order: a transaction whose commit record comes later
        can become visible first, so a snapshot may lack an earlier commit and have a later
        one. Visibility is therefore checked for every transaction until the stream passes
        ``snapshot_lsn`` (``end_lsn``: where the commit record ends): a commit record ending
        beyond the WAL insert position read after the snapshot was written after it, and so
        is every later one — then the snapshot can be forgotten.
        """
        snapshot = self.snapshot
        if snapshot is None:
            return True
        if end_lsn is not None and self.snapshot_lsn is not None and end_lsn > self.snapshot_lsn:
            self.snapshot = None
            return True
        return not snapshot.is_visible(xid)

    def sees(self, xid: int, end_lsn: int) -> bool:
        """Does its snapshot already show this committed transaction (so that it skips it)?
        As :meth:`wants_transaction` says, without forgetting the snapshot."""
        snapshot = self.snapshot
        return (snapshot is not None and not (self.snapshot_lsn is not None
                                              and end_lsn > self.snapshot_lsn)
                and snapshot.is_visible(xid))

    def begin_transaction(self, xid: int, end_lsn: int | None = None) -> None:
        """Forget fetch snapshots the stream has passed (see :meth:`wants_transaction`)."""
        if self.fetched and end_lsn is not None:
            self.fetched = {k: (s, lsn) for k, (s, lsn) in self.fetched.items()
                            if lsn is None or end_lsn <= lsn}

    def note_fetched(self, key: Key, snapshot: Snapshot, lsn: int | None = None) -> None:
        """The row ``key`` was just fetched under ``snapshot`` (WAL insert position ``lsn``
        read after it); see :meth:`apply_fetched`."""
        self.fetched[key] = (snapshot, lsn)

    def _already_fetched(self, xid: int, *keys: Key | None) -> bool:
        fetched = self.fetched
        for key in keys:
            if key is not None:
                found = fetched.get(key)
                if found is not None and found[0].is_visible(xid):
                    return True
        return False

    # -- loading and resync --------------------------------------------------------------------
    def key_of(self, row: Mapping[str, Any]) -> Key:
        return self._key_of(row)

    def values_of(self, row: Row | Values) -> Values:
        """A row as its values tuple in ``columns`` order (tuples are taken as they are)."""
        if type(row) is tuple:
            return row
        return self._values_from_row(row)  # type: ignore[arg-type]

    def row(self, key: Key) -> Row | None:
        """The kept row for ``key`` as a dict (``None``: not in the result)."""
        values = self.rows.get(key)
        return None if values is None else dict(zip(self.columns, values, strict=True))

    def fill(self, rows: Iterable[Values]) -> None:
        """The initial result of a new observer (no subscriber yet): :meth:`load` without
        building the ops nobody would read. Rows: values tuples in ``columns`` order (what
        the snapshot query returns)."""
        if self.docs:
            self.load(rows)
            return
        with gc_paused():
            self._fill_values(rows, self.rows, self.docs)
            if len(self.docs) >= LARGE_RESULT_ROWS:
                promote_young_objects()  # they live as long as the observer

    def load(self, rows: Iterable[Row | Values]) -> list[DocOp]:
        """Replace the result with a query's rows; the ops turn the old result into the new.

        Used for the initial snapshot (from empty: only ``added``) and for resync after a
        stream gap or TRUNCATE (only the difference reaches clients).
        """
        old_docs = self.docs
        self.rows, self.docs = {}, {}
        self.fetched = {}
        ops: list[DocOp] = []
        key_of, render, values_of = self._values_key_of, self._render_values, self.values_of
        for row in rows:
            values = values_of(row)
            key = key_of(values)
            doc_id, fields = render(values)
            self.rows[key] = values
            previous = old_docs.pop(doc_id, None)
            if previous is None:
                self.docs[doc_id] = fields
                ops.append(DocOp("added", self.collection, doc_id, fields))
            else:
                changed, cleared = diff_visible(previous, fields)
                if changed or cleared:
                    self.docs[doc_id] = fields
                    ops.append(DocOp("changed", self.collection, doc_id, changed, cleared,
                                     fields))
                else:
                    self.docs[doc_id] = previous  # keep the object merge boxes already reference
        ops.extend(DocOp("removed", self.collection, doc_id) for doc_id in old_docs)
        return ops

    def clear(self) -> list[DocOp]:
        return self.load(())

    # -- stream changes ------------------------------------------------------------------------
    def apply(self, change: RowChange) -> list[DocOp] | NeedsRow:
        """The ops a stream change makes; sets :attr:`keys`."""
        if type(change) is Insert:
            if self.fetched:
                new_key = self.key_or_none(change.new)
                if self._already_fetched(change.xid, new_key):
                    self.keys = (None, new_key)
                    return []
            return self._upsert(None, change.new)
        if type(change) is Update:
            old_key = replaced_key(self._key_of, change.identity, change.new)
            if self.fetched:
                # A key fetched under a snapshot that saw this change already shows it there.
                # When the key changed, the other key may not: a fetch by the old key found
                # the row gone (moved), not where it went.
                new_key = self.key_or_none(change.new)
                old_shown = self._already_fetched(change.xid, old_key)
                new_shown = old_shown if new_key == old_key else self._already_fetched(
                    change.xid, new_key)
                if new_shown:
                    self.keys = (old_key, new_key)
                    if old_shown or old_key is None:
                        return []
                    return self._remove(old_key)  # only its leaving the old key is left
                if old_shown:
                    return self._upsert(None, change.new, change.identity)  # moves in here
            return self._upsert(old_key, change.new, change.identity)
        if type(change) is Delete:
            key = replaced_key(self._key_of, change.identity, None)
            self.keys = (key, None)
            if self.fetched and self._already_fetched(change.xid, key):
                return []
            return self._remove(key) if key is not None else []
        raise TypeError(f"not a row change: {change!r}")

    def apply_fetched(self, old_key: Key | None, row: Row | None) -> list[DocOp]:
        """Finish a change answered with :class:`NeedsRow`: ``row`` is the current row by key
        (``None`` when it no longer exists: a later transaction deleted it, and that delete is
        still to come through the stream). Sets :attr:`keys`."""
        if row is None:
            self.keys = (old_key, None)
            return self._remove(old_key) if old_key is not None else []
        result = self._upsert(old_key, row)
        assert not isinstance(result, NeedsRow)  # a fetched row is complete
        return result

    def key_or_none(self, row: Row) -> Key | None:
        try:
            return self.key_of(row)
        except KeyError:
            return None

    def _upsert(self, old_key: Key | None, new: Row, identity: Row | None = None
                ) -> list[DocOp] | NeedsRow:
        kept = self.rows.get(old_key) if old_key is not None else None
        try:
            values = self._values_from_row(new)
        except KeyError:  # unchanged TOASTed values left out: complete the row first
            completed = self._complete(kept, new, identity, old_key)
            if type(completed) is not dict:
                self.keys = (old_key, self.key_or_none(new))
                return completed  # type: ignore[return-value]
            new = completed
            values = self._values_from_row(new)
        new_key = self._values_key_of(values)
        self.keys = (old_key, new_key)
        matches = self._matches(new)
        ops: list[DocOp] = []
        if kept is not None and (not matches or new_key != old_key):
            ops.extend(self._remove(old_key))  # type: ignore[arg-type]
        if not matches:
            return ops
        doc_id, fields = self._render_values(values)
        self.rows[new_key] = values
        current = self.docs.get(doc_id)  # present also when a change is seen twice
        if current is None:
            self.docs[doc_id] = fields
            ops.append(DocOp("added", self.collection, doc_id, fields))
            return ops
        changed, cleared = diff_visible(current, fields)
        if changed or cleared:
            self.docs[doc_id] = fields
            ops.append(DocOp("changed", self.collection, doc_id, changed, cleared, fields))
        return ops

    def _complete(self, kept: Values | None, new: Row, identity: Row | None,
                  old_key: Key | None = None) -> Row | list[DocOp] | NeedsRow:
        """A stream row lacking columns (unchanged TOASTed values), completed from our copy,
        else from a FULL identity; else [] (it cannot match anyway) or a fetch by key."""
        row = {c: new[c] for c in self.columns if c in new}
        previous = None if kept is None else dict(zip(self.columns, kept, strict=True))
        for source in (previous, identity):
            if source is not None:
                for c in self.columns:
                    if c not in row and c in source:
                        row[c] = source[c]
        if len(row) == len(self.columns):
            return row
        # previous is None here. No fetch if the row cannot match anyway.
        if self._filter_columns <= row.keys() and not self._matches(row):
            return []
        missing = tuple(c for c in self.columns if c not in row)
        key = tuple(new.get(c, (identity or {}).get(c)) for c in self.key_columns)
        return NeedsRow(key, missing, old_key)

    def _remove(self, key: Key) -> list[DocOp]:
        if self.rows.pop(key, None) is None:
            return []
        doc_id = _wire_id_of_key(key)
        del self.docs[doc_id]
        return [DocOp("removed", self.collection, doc_id)]

    def __len__(self) -> int:
        return len(self.docs)

    def holds(self, key: Key) -> bool:
        return key in self.rows


class LimitedObserver(Observer):
    """The first ``limit`` rows of a sorted cursor (see :mod:`cdcddp.publish.ordering`).

    It holds the rows its query returned: the first ``limit`` ones, published (``docs``), and
    as many again as a buffer (in ``rows`` only, like Meteor's oplog driver), so that a row
    leaving is replaced from the buffer without a query. It knows every matching row
    (``complete``) only while its query returned fewer than it asked for. Otherwise every
    matching row it does not hold ranks after all it holds, and each change keeps that true:
    a row ranking before the last held one comes in (and the last one goes when it holds too
    many); one ranking after it stays out; a held row that sinks to the end goes too (rows it
    does not hold may rank before it now). Only when fewer than ``limit`` rows are left is it
    ``needs_requery``: the caller reads its rows again, from a snapshot that sees the
    transaction, and skips it for the rest of that transaction.
    """

    limited = True

    def __init__(self, bound: BoundCursor, snapshot: Snapshot | None = None,
                 snapshot_lsn: int | None = None) -> None:
        super().__init__(bound, snapshot, snapshot_lsn)
        limit = bound.cursor.limit
        assert limit is not None
        self.limit = limit
        self.capacity = read_limit(limit)
        self._rank = rank_getter(bound.cursor.order, self.key_columns, self.columns)
        self._key_length = len(self.key_columns)
        self._ranks: list[Rank] = []  # every held row's rank, in order
        self.complete = True

    def fill(self, rows: Iterable[Values]) -> None:
        self.load(rows)

    def load(self, rows: Iterable[Row | Values]) -> list[DocOp]:
        """The rows a query gave (at most ``capacity``): the first ``limit`` are published."""
        ranked = sorted(map(self.values_of, rows), key=self._rank)
        ops = super().load(ranked[:self.limit])
        key_of = self._values_key_of
        for values in ranked[self.limit:]:
            self.rows[key_of(values)] = values
        self._ranks = sorted(map(self._rank, self.rows.values()))
        self.complete = len(ranked) < self.capacity
        self.evicted = ()
        self.needs_requery = False
        return ops

    def apply(self, change: RowChange) -> list[DocOp] | NeedsRow:
        kind = type(change)
        old_key = None if kind is Insert else replaced_key(
            self._key_of, change.identity,  # type: ignore[union-attr]
            change.new if kind is Update else None)  # type: ignore[union-attr]
        old_rank, published = self._before(old_key)
        new_key = None if kind is Delete else self.key_or_none(change.new)  # type: ignore[union-attr]
        held_rank = self._held_rank(new_key, old_key)
        result = super().apply(change)
        if type(result) is NeedsRow:
            self.evicted, self.needs_requery = (), False
            return result
        return self._settle(result, old_rank, published, held_rank)  # type: ignore[arg-type]

    def apply_fetched(self, old_key: Key | None, row: Row | None) -> list[DocOp]:
        old_rank, published = self._before(old_key)
        held_rank = self._held_rank(None if row is None else self.key_or_none(row), old_key)
        return self._settle(super().apply_fetched(old_key, row), old_rank, published, held_rank)

    def _held_rank(self, new_key: Key | None, old_key: Key | None) -> Rank | None:
        """The rank of a row already held under the key a change writes, when that is not the
        key it replaces: a row fetched ahead of the stream (see :meth:`Observer.apply`)."""
        if new_key is None or new_key == old_key:
            return None
        values = self.rows.get(new_key)
        return None if values is None else self._rank(values)

    def _before(self, key: Key | None) -> tuple[Rank | None, bool]:
        """The rank of the row ``key`` before the change (None: not held), and whether it
        was published."""
        values = self.rows.get(key) if key is not None else None
        if values is None:
            return None, False
        return self._rank(values), _wire_id_of_key(key) in self.docs  # type: ignore[arg-type]

    def _remove(self, key: Key) -> list[DocOp]:
        if self.rows.pop(key, None) is None:
            return []
        doc_id = _wire_id_of_key(key)
        if self.docs.pop(doc_id, None) is None:
            return []  # a buffered row: never published
        return [DocOp("removed", self.collection, doc_id)]

    def _settle(self, ops: list[DocOp], old_rank: Rank | None, was_published: bool,
                held_rank: Rank | None = None) -> list[DocOp]:
        """After the base class applied a change as if every held row were published: re-rank
        the row it wrote (``keys``; ``old_rank``: its rank before, if it was held;
        ``held_rank``: the rank of a row already held under the new key), keep the capacity,
        then publish exactly the first ``limit`` held rows."""
        self.evicted, self.needs_requery = (), False
        ranks, rows = self._ranks, self.rows
        old_key, new_key = self.keys
        for rank in (old_rank, held_rank):
            if rank is not None:
                at = bisect_left(ranks, rank)
                if at == len(ranks) or ranks[at] != rank:  # (the observer fails: resynced)
                    raise LookupError(f"a held row's rank is missing: {rank!r}")
                del ranks[at]
        kept = rows.get(old_key) if old_rank is not None and old_key != new_key else None
        if kept is not None:  # still held: the change was one a fetch by key already showed
            insort(ranks, self._rank(kept))
        new_values = rows.get(new_key) if new_key is not None else None
        new_rank = None
        if new_values is not None:
            new_rank = self._rank(new_values)
            insort(ranks, new_rank)
        let_go = None
        if not self.complete and new_rank is not None and ranks[-1] == new_rank and (
                old_rank is None or new_rank > old_rank):
            # Came in, or sank, after every held row: rows it does not hold may come first.
            let_go = ranks.pop()
        elif len(ranks) > self.capacity:
            let_go = ranks.pop()
            self.complete = False
        touched = {old_key, new_key}
        if let_go is not None:
            key = let_go[-self._key_length:]
            del rows[key]
            self.evicted = (key,)
            touched.add(key)
        limit = self.limit
        for index in (limit - 1, limit):  # the rows either side of the published boundary
            if index < len(ranks):
                touched.add(ranks[index][-self._key_length:])
        for key in touched:
            if key is None:
                continue
            doc_id = _wire_id_of_key(key)
            values = rows.get(key)
            publish = values is not None and bisect_left(ranks, self._rank(values)) < limit
            if publish and doc_id not in self.docs:
                fields = self._render_values(values)[1]  # type: ignore[arg-type]
                self.docs[doc_id] = fields
                ops.append(DocOp("added", self.collection, doc_id, fields))
            elif not publish and doc_id in self.docs:
                del self.docs[doc_id]
                # Published before this change (not just now by the base class): removed.
                before = was_published if key == old_key else key != new_key
                ops = [op for op in ops if op.doc_id != doc_id]
                if before:
                    ops.append(DocOp("removed", self.collection, doc_id))
        if not self.complete and len(ranks) < limit:
            self.needs_requery = True  # fewer than it publishes: rows it does not hold belong
        return ops


def make_observer(bound: BoundCursor, snapshot: Snapshot | None = None,
                  snapshot_lsn: int | None = None) -> Observer:
    """The observer for ``bound``: limited if its cursor has a limit."""
    if bound.cursor.limit is not None:
        return LimitedObserver(bound, snapshot, snapshot_lsn)
    return Observer(bound, snapshot, snapshot_lsn)
