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
