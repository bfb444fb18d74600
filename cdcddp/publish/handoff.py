"""The snapshot/stream handoff: recent transactions kept for subscriptions being snapshotted.

A new subscription runs its snapshot query while the stream keeps applying transactions. A
transaction that commits after the snapshot was taken but is delivered by the stream before the
subscription registers would otherwise be lost. So, before its query starts, a subscription
*pins* the ring; every transaction kept after the pin's position stays here until the
subscription registers and replays those of them that its snapshot did not see
(``Snapshot.is_visible``).

Transactions delivered before that position committed before the snapshot was taken (delivery
follows commit), so the snapshot sees them — once they are visible: a commit is decoded a
moment before it is (longer while it waits for a synchronous standby), and a snapshot that lacks
one is retaken. To spare most of those retakes the ring also keeps the last
``retain_changes`` changes' transactions when nobody needs them, and a pin can reach back over
them (``replayable_from``): a snapshot lacking one of those replays it instead of waiting.

Memory is bounded: when the kept transactions exceed ``max_changes``, the oldest are dropped
and every pin that still needed them is marked broken; its subscription retakes its snapshot.
"""

from __future__ import annotations

import bisect
import heapq
from collections import deque
from collections.abc import Iterator, Sequence, Set
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from cdcddp.publish.definition import TableName
from cdcddp.publish.visibility import Snapshot, later_xid
from cdcddp.wal.events import RowChange, Truncate


@dataclass(frozen=True, slots=True)
class CommittedTransaction:
    xid: int
    end_lsn: int
    changes: Sequence[RowChange | Truncate]
    # Set when a table became of interest while this transaction was being delivered: pins
    # numbered from this on may lack its earlier changes to their table, so it cannot be
    # replayed for them (only skipped, if their snapshot saw it).
    incomplete_for_pins_from: int | None = None
    delivery: int = 0  # the stream's delivery number of this transaction (0: unknown)


@dataclass(eq=False, slots=True)
class Pin:
    """A subscription's claim on transactions kept after ``after_seq``."""

    after_seq: int
    broken: bool = False
    released: bool = field(default=False)
    number: int = 0  # pins taken before this one

    def __lt__(self, other: Pin) -> bool:  # (the live pins' heap)
        return self.after_seq < other.after_seq


class RecentTransactions:
    """Transactions delivered recently (and since the oldest live pin), in commit order."""

    def __init__(self, max_changes: int = 100_000, retain_changes: int = 0) -> None:
        self.max_changes = max_changes
        self.retain_changes = retain_changes
        # (number, transaction, the newest xid delivered up to it): that last one only grows
        # along the ring, so the run of transactions a snapshot surely saw (every xid so far
        # below its xmin) is found by bisection instead of a visibility test each.
        self._kept: deque[tuple[int, CommittedTransaction, int]] = deque()
        self._kept_changes = 0
        self._seq = 0  # number of transactions kept so far
        self._newest_xid: int | None = None  # 32-bit, compared modulo 2^32
        # Live pins by after_seq (released ones leave when they reach the top): the first is
        # the one that needs the oldest transactions.
        self._pins: list[Pin] = []
        self._live_pins = 0
        self.pins_taken = 0

    @property
    def kept_count(self) -> int:
        """How many transactions were ever kept (the next one is numbered this plus one)."""
        return self._seq

    def pin(self, replayable_from: int | None = None) -> Pin:
        """Call before starting a snapshot query. ``replayable_from``: the caller can replay
        the kept transactions numbered from this on (they hold all their changes to its
        table); None: only those kept from now on."""
        after = self._seq
        if replayable_from is not None and self._kept:
            after = min(after, max(replayable_from, self._kept[0][0]) - 1)
        p = Pin(after_seq=after, number=self.pins_taken)
        self.pins_taken += 1
        heapq.heappush(self._pins, p)
        self._live_pins += 1
        return p

    def break_pins(self) -> None:
        """Every live pin must retake its snapshot: transactions it needs were not (or not
        wholly) recorded — a stream gap, or a huge transaction applied in chunks."""
        for p in self._pins:
            p.broken = True
        self._kept.clear()
        self._kept_changes = 0

    def forget_xids(self) -> None:
        """The xids delivered so far belong to a history the server left (a failover): new
        transactions may be given them again."""
        self._newest_xid = None

    @property
    def has_pins(self) -> bool:
        return self._live_pins > 0

    def release(self, pin: Pin) -> None:
        if pin.released:
            return
        pin.released = True
        self._live_pins -= 1
        pins = self._pins
        while pins and pins[0].released:
            heapq.heappop(pins)
        self._trim()

    def delivered(self, txn: CommittedTransaction) -> None:
        """Record a transaction the stream just applied (kept while someone may need it)."""
        self._seq += 1
        newest = self._newest_xid = later_xid(self._newest_xid, txn.xid)
        if not self._pins and not self.retain_changes:
            return
        self._kept.append((self._seq, txn, newest))
        self._kept_changes += max(1, len(txn.changes))
        while self._kept_changes > self.max_changes and self._kept:
            seq, dropped, _ = self._kept.popleft()
            self._kept_changes -= max(1, len(dropped.changes))
            for p in self._pins:
                if p.after_seq < seq:
                    p.broken = True
        self._trim()

    def first_since(self, pin: Pin) -> CommittedTransaction | None:
        """The first kept transaction the pin covers, if any (kept transactions are numbered
        without gaps: while anything is kept, every delivered one is)."""
        kept = self._kept
        if pin.broken or not kept:
            return None
        index = pin.after_seq + 1 - kept[0][0]
        return kept[index][1] if 0 <= index < len(kept) else None

    def since(self, pin: Pin, after: int = 0, seen_by: Snapshot | None = None
              ) -> list[tuple[int, CommittedTransaction]]:
        """(number, transaction) of those kept after ``pin``'s position and after number
        ``after``, less the leading ones ``seen_by`` surely saw; raises if some were dropped.

        Located by number, not walked: the ring keeps everything since the *oldest* pin
        (and the last ``retain_changes`` changes), and thousands of subscriptions starting at
        once each needed only its end. The transactions a snapshot saw are skipped the same
        way: a subscription's snapshot usually saw the whole retained ring, and testing each
        transaction's visibility cost every new subscription milliseconds."""
        if pin.broken:
            raise LookupError("transactions needed by this handoff were dropped")
        kept = self._kept
        if not kept:
            return []
        start = max(pin.after_seq, after) + 1 - kept[0][0]
        if start >= len(kept):
            return []
        if seen_by is not None:
            start = _past_surely_seen(kept, seen_by, start)
        return [(seq, txn) for seq, txn, _ in islice(kept, start, None)]

    def _trim(self) -> None:
        """Drop what no pin needs, down to ``retain_changes`` changes."""
        oldest_needed = self._pins[0].after_seq if self._pins else self._seq
        kept = self._kept
        while kept and kept[0][0] <= oldest_needed and self._kept_changes > self.retain_changes:
            _, dropped, _ = kept.popleft()
            self._kept_changes -= max(1, len(dropped.changes))

    def __len__(self) -> int:
        return len(self._kept)


def _past_surely_seen(log: Sequence[tuple[Any, ...]], snapshot: Snapshot, start: int = 0
                      ) -> int:
    """The index, from ``start`` on, of the first entry of ``log`` (in delivery order, the
    newest xid delivered so far at index 2) that ``snapshot`` may lack: those before it are
    surely in it, found by bisection instead of a visibility test each."""
    saw_all_up_to = snapshot.saw_all_up_to
    return bisect.bisect_left(log, True, lo=start,
                              key=lambda entry: not saw_all_up_to(entry[2]))


class DeliveredXids:
    """The xids the stream delivered, in delivery order with their delivery numbers, until
    snapshots see them: which delivered transaction does a snapshot lack?

    A commit is decoded (and may be delivered) before it is visible to new snapshots; a
    snapshot that still has such a transaction running must be retaken, and a lookup that
    read under it may be stale; but only if that transaction changed a table it reads, so
    each entry records the tables its transaction changed (a commit to another table, held
    by a standby, held up every new subscription). Each entry also records the newest xid
    delivered up to it, so the leading run a snapshot surely saw is skipped by bisection: a
    walk over all kept xids (65,536 after as many commits without a new observer) cost each
    lookup 17 ms.

    Entries hold only ints (the tables as the number of an interned set: a set per entry,
    65,536 of them alive, were objects for the garbage collector to walk).
    """

    def __init__(self, max_kept: int = 65_536, max_table_sets: int = 4096) -> None:
        self.max_kept = max_kept
        # (delivery number, xid, newest xid delivered up to it, number of the set of tables
        # it changed: -1 for "any", once more distinct sets than max_table_sets were seen)
        self._entries: deque[tuple[int, int, int, int]] = deque()
        self._table_sets: list[frozenset[TableName]] = []
        self._table_set_numbers: dict[frozenset[TableName], int] = {}
        self.max_table_sets = max_table_sets
        # xid -> its latest delivery number: an entry with another number is stale (the
        # transaction was delivered again, after a reconnect; judged at its later number).
        self._latest: dict[int, int] = {}
        self._newest: int | None = None

    def note(self, xid: int, number: int, tables: Set[TableName]) -> None:
        self._newest = later_xid(self._newest, xid)
        self._entries.append((number, xid, self._newest, self._table_set_number(tables)))
        self._latest[xid] = number
        if len(self._entries) > self.max_kept:
            self._drop_first(1)

    def first_missed(self, snapshot: Snapshot, upto: int, prune: bool,
                     tables: Set[TableName] | None = None) -> tuple[int, int] | None:
        """(delivery number, xid) of the first transaction delivered as number ``upto`` or
        earlier that ``snapshot`` lacks (still running for it: in ``xip``, or at or past its
        ``xmax``) and that changed one of ``tables`` (None: any), or None.

        Xids a snapshot sees are visible to every later snapshot: with ``prune`` (only when
        no earlier snapshot is still being checked), the leading run it sees is forgotten."""
        entries, latest, table_sets = self._entries, self._latest, self._table_sets
        seen = _past_surely_seen(entries, snapshot)
        missed: tuple[int, int] | None = None
        leading = True  # the entries so far are all seen (or stale): forgettable
        for number, xid, _, changed in islice(entries, seen, None):
            if number > upto:
                break  # delivered after the query started: the ring has it (and the rest)
            if latest[xid] == number and not snapshot.is_visible(xid):
                if tables is None or changed < 0 or not tables.isdisjoint(table_sets[changed]):
                    missed = number, xid
                    break
                leading = False  # lacked, but no matter here: kept for other readers
            elif leading:
                seen += 1
        if prune:
            self._drop_first(seen)
        return missed

    def _table_set_number(self, tables: Set[TableName]) -> int:
        key = frozenset(tables)
        number = self._table_set_numbers.get(key)
        if number is None:
            if len(self._table_sets) >= self.max_table_sets:
                return -1  # so many combinations: this one counts for every table
            number = self._table_set_numbers[key] = len(self._table_sets)
            self._table_sets.append(key)
        return number

    def _drop_first(self, count: int) -> None:
        entries, latest = self._entries, self._latest
        for _ in range(count):
            number, xid, _, _ = entries.popleft()
            if latest[xid] == number:
                del latest[xid]

    def __iter__(self) -> Iterator[int]:
        """The xids kept, in delivery order (at their latest delivery)."""
        latest = self._latest
        return (xid for number, xid, _, _ in self._entries if latest[xid] == number)

    def __len__(self) -> int:
        return len(self._latest)
