"""The snapshot/stream handoff: recent transactions kept for subscriptions being snapshotted.

A new subscription runs its snapshot query while the stream keeps applying transactions. A
transaction that commits after the snapshot was taken but is delivered by the stream before the
subscription registers would otherwise be lost. So, before its query starts, a subscription
*pins* the stream's current position; every transaction delivered after that position is kept
here until the subscription registers and replays those of them that its snapshot did not see
(``Snapshot.is_visible``). Transactions delivered before the pin committed before the snapshot
was taken (delivery follows commit), so the snapshot sees them — once they are visible: a
commit is decoded a moment before it is (longer while it waits for a synchronous standby), and
a snapshot that lacks one is retaken.

Memory is bounded: when the kept transactions exceed ``max_changes``, the oldest are dropped
and every pin that still needed them is marked broken; its subscription retakes its snapshot.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

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


@dataclass(eq=False, slots=True)
class Pin:
    """A subscription's claim on transactions delivered after ``after_seq``."""

    after_seq: int
    broken: bool = False
    released: bool = field(default=False)
    number: int = 0  # pins taken before this one


class RecentTransactions:
    """Transactions delivered since the oldest live pin, in commit order."""

    def __init__(self, max_changes: int = 100_000) -> None:
        self.max_changes = max_changes
        self._kept: deque[tuple[int, CommittedTransaction]] = deque()
        self._kept_changes = 0
        self._seq = 0  # number of transactions delivered so far
        # Pins in the order taken (so by after_seq); released ones leave from the left, so the
        # first is the oldest live pin: releasing costs O(1), not a pass over thousands.
        self._pins: deque[Pin] = deque()
        self.pins_taken = 0

    def pin(self) -> Pin:
        """Call before starting a snapshot query."""
        p = Pin(after_seq=self._seq, number=self.pins_taken)
        self.pins_taken += 1
        self._pins.append(p)
        return p

    def break_pins(self) -> None:
        """Every live pin must retake its snapshot: transactions it needs were not (or not
        wholly) recorded — a stream gap, or a huge transaction applied in chunks."""
        for p in self._pins:
            p.broken = True
        self._kept.clear()
        self._kept_changes = 0

    @property
    def has_pins(self) -> bool:
        return bool(self._pins)

    def release(self, pin: Pin) -> None:
        pin.released = True
        pins = self._pins
        while pins and pins[0].released:
            pins.popleft()
        self._trim()

    def delivered(self, txn: CommittedTransaction) -> None:
        """Record a transaction the stream just applied (only kept while someone needs it)."""
        self._seq += 1
        if not self._pins:
            return
        self._kept.append((self._seq, txn))
        self._kept_changes += max(1, len(txn.changes))
        while self._kept_changes > self.max_changes and self._kept:
            seq, dropped = self._kept.popleft()
            self._kept_changes -= max(1, len(dropped.changes))
            for p in self._pins:
                if p.after_seq < seq:
                    p.broken = True

    def since(self, pin: Pin) -> list[CommittedTransaction]:
        """Transactions delivered after ``pin`` was taken; raises if some were dropped.

        Walks from the newest end: the ring keeps everything since the *oldest* pin, and with
        thousands of subscriptions starting at once a walk from the start cost each of them
        the whole ring."""
        if pin.broken:
            raise LookupError("transactions needed by this handoff were dropped")
        newer: list[CommittedTransaction] = []
        for seq, txn in reversed(self._kept):
            if seq <= pin.after_seq:
                break
            newer.append(txn)
        newer.reverse()
        return newer

    def _trim(self) -> None:
        oldest_needed = self._pins[0].after_seq if self._pins else self._seq
        while self._kept and self._kept[0][0] <= oldest_needed:
            _, dropped = self._kept.popleft()
            self._kept_changes -= max(1, len(dropped.changes))

    def __len__(self) -> int:
        return len(self._kept)
