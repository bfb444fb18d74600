"""The recent-transactions ring used by the snapshot/stream handoff (pure)."""

import pytest

from cdcddp.publish.handoff import CommittedTransaction, RecentTransactions
from cdcddp.wal.events import Insert


def txn(xid: int, n: int = 1) -> CommittedTransaction:
    rows = [Insert(xid=xid, lsn=xid * 10 + i, schema="public", table="t", new={"id": i},
                   pk=("id",)) for i in range(n)]
    return CommittedTransaction(xid=xid, end_lsn=xid * 10 + 9, changes=rows)


def test_nothing_is_kept_without_pins() -> None:
    ring = RecentTransactions()
    ring.delivered(txn(1))
    assert len(ring) == 0


def test_pin_sees_exactly_what_came_after_it() -> None:
    ring = RecentTransactions()
    ring.delivered(txn(1))
    pin = ring.pin()
    ring.delivered(txn(2))
    ring.delivered(txn(3))
    assert [t.xid for t in ring.since(pin)] == [2, 3]
    late = ring.pin()
    ring.delivered(txn(4))
    assert [t.xid for t in ring.since(pin)] == [2, 3, 4]
    assert [t.xid for t in ring.since(late)] == [4]
    ring.release(pin)
    assert [t.xid for t in ring.since(late)] == [4]
    assert len(ring) == 1  # 2 and 3 are no longer needed by anyone
    ring.release(late)
    assert len(ring) == 0


def test_overflow_breaks_the_pins_that_needed_dropped_transactions() -> None:
    ring = RecentTransactions(max_changes=5)
    old = ring.pin()
    ring.delivered(txn(1, n=3))
    young = ring.pin()
    ring.delivered(txn(2, n=2))
    ring.delivered(txn(3, n=1))  # 6 changes > 5: transaction 1 is dropped
    with pytest.raises(LookupError):
        list(ring.since(old))
    assert [t.xid for t in ring.since(young)] == [2, 3]


def test_a_younger_pin_released_first_keeps_what_the_older_one_needs() -> None:
    ring = RecentTransactions()
    old = ring.pin()
    ring.delivered(txn(1))
    young = ring.pin()
    ring.delivered(txn(2))
    ring.release(young)
    assert ring.has_pins and [t.xid for t in ring.since(old)] == [1, 2]
    ring.release(old)
    assert not ring.has_pins and len(ring) == 0
    ring.delivered(txn(3))
    assert len(ring) == 0


def test_thousands_of_pins_release_in_linear_time() -> None:
    ring = RecentTransactions()
    pins = []
    for i in range(20_000):
        pins.append(ring.pin())
        ring.delivered(txn(i))
    for pin in pins:  # oldest first, as snapshots usually finish
        ring.release(pin)
    assert not ring.has_pins and len(ring) == 0


def test_recent_transactions_are_retained_and_a_pin_can_reach_back_to_them() -> None:
    ring = RecentTransactions(retain_changes=3)
    for xid in (1, 2, 3, 4):
        ring.delivered(txn(xid))
    assert len(ring) == 3  # the last 3 changes' transactions, with no pin
    whole = ring.pin(replayable_from=1)  # reaches back to the oldest kept (2)
    assert [t.xid for t in ring.since(whole)] == [2, 3, 4]
    assert ring.first_since(whole) is ring.since(whole)[0]
    partial = ring.pin(replayable_from=4)  # the table is kept whole from the 4th on
    assert [t.xid for t in ring.since(partial)] == [4]
    now = ring.pin()
    assert ring.since(now) == [] and ring.first_since(now) is None
    for xid in (5, 6, 7):
        ring.delivered(txn(xid))
    # Beyond retain_changes while pinned: kept for the pin that reaches back furthest.
    assert [t.xid for t in ring.since(whole)] == [2, 3, 4, 5, 6, 7]
    assert [t.xid for t in ring.since(now)] == [5, 6, 7]
    ring.release(now)
    ring.release(whole)  # taken first, yet the one reaching back furthest
    assert [t.xid for t in ring.since(partial)] == [4, 5, 6, 7]
    ring.release(partial)
    assert [t.xid for t in ring.since(ring.pin(replayable_from=1))] == [5, 6, 7]


def test_a_pin_reaching_back_is_broken_when_what_it_needs_overflows() -> None:
    ring = RecentTransactions(max_changes=4, retain_changes=2)
    ring.delivered(txn(1))
    ring.delivered(txn(2))
    back = ring.pin(replayable_from=1)
    ring.delivered(txn(3, n=3))  # 5 changes > 4: transaction 1 goes
    with pytest.raises(LookupError):
        ring.since(back)
    assert ring.first_since(back) is None
