"""The recent-transactions ring used by the snapshot/stream handoff (pure)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcddp.publish.handoff import CommittedTransaction, DeliveredXids, RecentTransactions
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Insert


def txn(xid: int, n: int = 1) -> CommittedTransaction:
    rows = [Insert(xid=xid, lsn=xid * 10 + i, schema="public", table="t", new={"id": i},
                   pk=("id",)) for i in range(n)]
    return CommittedTransaction(xid=xid, end_lsn=xid * 10 + 9, changes=rows)


def xids(kept: list[tuple[int, CommittedTransaction]]) -> list[int]:
    return [t.xid for _, t in kept]


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
    assert xids(ring.since(pin)) == [2, 3]
    late = ring.pin()
    ring.delivered(txn(4))
    assert xids(ring.since(pin)) == [2, 3, 4]
    assert xids(ring.since(late)) == [4]
    ring.release(pin)
    assert xids(ring.since(late)) == [4]
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
    assert xids(ring.since(young)) == [2, 3]


def test_a_younger_pin_released_first_keeps_what_the_older_one_needs() -> None:
    ring = RecentTransactions()
    old = ring.pin()
    ring.delivered(txn(1))
    young = ring.pin()
    ring.delivered(txn(2))
    ring.release(young)
    assert ring.has_pins and xids(ring.since(old)) == [1, 2]
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
    assert xids(ring.since(whole)) == [2, 3, 4]
    assert ring.first_since(whole) is ring.since(whole)[0][1]
    partial = ring.pin(replayable_from=4)  # the table is kept whole from the 4th on
    assert xids(ring.since(partial)) == [4]
    now = ring.pin()
    assert ring.since(now) == [] and ring.first_since(now) is None
    for xid in (5, 6, 7):
        ring.delivered(txn(xid))
    # Beyond retain_changes while pinned: kept for the pin that reaches back furthest.
    assert xids(ring.since(whole)) == [2, 3, 4, 5, 6, 7]
    assert xids(ring.since(now)) == [5, 6, 7]
    ring.release(now)
    ring.release(whole)  # taken first, yet the one reaching back furthest
    assert xids(ring.since(partial)) == [4, 5, 6, 7]
    ring.release(partial)
    assert xids(ring.since(ring.pin(replayable_from=1))) == [5, 6, 7]


def test_a_pin_reaching_back_is_broken_when_what_it_needs_overflows() -> None:
    ring = RecentTransactions(max_changes=4, retain_changes=2)
    ring.delivered(txn(1))
    ring.delivered(txn(2))
    back = ring.pin(replayable_from=1)
    ring.delivered(txn(3, n=3))  # 5 changes > 4: transaction 1 goes
    with pytest.raises(LookupError):
        ring.since(back)
    assert ring.first_since(back) is None


def snapshot(xmin: int, xmax: int, *xip: int) -> Snapshot:
    return Snapshot(xmin, xmax, frozenset(xip))


def test_the_leading_transactions_a_snapshot_surely_saw_are_skipped() -> None:
    ring = RecentTransactions(retain_changes=100)
    for xid in (10, 12, 11, 15, 13, 20):  # commit order is not xid order
        ring.delivered(txn(xid))
    pin = ring.pin(replayable_from=1)
    seen = snapshot(14, 21, 15)
    # 10, 12 and 11 are below xmin, and so is every xid before them; 13 is too, but comes
    # after 15: it is left to the caller's visibility test.
    kept = ring.since(pin, seen_by=seen)
    assert xids(kept) == [15, 13, 20]
    assert xids(ring.since(pin, kept[0][0], seen)) == [13, 20]
    assert xids(ring.since(pin, kept[-1][0], seen)) == []
    assert xids(ring.since(pin)) == [10, 12, 11, 15, 13, 20]
    assert ring.since(pin, seen_by=snapshot(21, 21)) == []
    assert xids(ring.since(pin, seen_by=snapshot(5, 9))) == [10, 12, 11, 15, 13, 20]


def test_skipping_what_a_snapshot_saw_holds_across_xid_wraparound() -> None:
    ring = RecentTransactions(retain_changes=100)
    for xid in (0xFFFF_FFF0, 0xFFFF_FFFE, 3, 5):
        ring.delivered(txn(xid))
    pin = ring.pin(replayable_from=1)
    epoch1 = 1 << 32  # the snapshot's 64-bit xids are in the next epoch
    assert xids(ring.since(pin, seen_by=snapshot(epoch1 + 4, epoch1 + 9))) == [5]
    assert xids(ring.since(pin, seen_by=snapshot(0xFFFF_FFF5, epoch1 + 9))) == [
        0xFFFF_FFFE, 3, 5]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=30, unique=True),
       st.integers(0, 45), st.integers(0, 10), st.sets(st.integers(0, 45)))
def test_what_a_snapshot_lacks_is_never_skipped(order: list[int], xmin: int, width: int,
                                                  xip: set[int]) -> None:
    base = 0xFFFF_FFE0  # across the wraparound
    ring = RecentTransactions(retain_changes=100)
    for offset in order:
        ring.delivered(txn((base + offset) & 0xFFFF_FFFF))
    pin = ring.pin(replayable_from=1)
    seen = snapshot(base + xmin, base + xmin + width,
                    *(base + x for x in xip if xmin <= x < xmin + width))
    kept = xids(ring.since(pin, seen_by=seen))
    every = xids(ring.since(pin))
    assert kept == every[len(every) - len(kept):]  # a tail: only leading ones are skipped
    assert all(seen.is_visible(xid) for xid in every[:len(every) - len(kept)])


T = ("public", "t")
U = ("public", "u")


def test_the_delivered_xids_a_snapshot_surely_saw_are_not_tested_one_by_one() -> None:
    delivered = DeliveredXids(max_kept=5)
    for number, xid in enumerate((10, 12, 11, 15, 13, 20), start=1):
        delivered.note(xid, number, {T})
    assert list(delivered) == [12, 11, 15, 13, 20]  # five kept: 10 went first
    lacking_15 = snapshot(14, 21, 15)
    assert delivered.first_missed(lacking_15, upto=6, prune=False) == (4, 15)
    assert delivered.first_missed(lacking_15, upto=3, prune=False) is None
    # Pruned: the leading run it saw (12, 11), not 13 (after 15, which it lacks).
    assert delivered.first_missed(lacking_15, upto=6, prune=True) == (4, 15)
    assert list(delivered) == [15, 13, 20]
    assert delivered.first_missed(snapshot(21, 21), upto=6, prune=True) is None
    assert not delivered and list(delivered) == []


def test_a_transaction_that_changed_none_of_the_tables_read_is_not_missed() -> None:
    """A read of table t need not see a transaction that changed only u (a commit to u held
    by a synchronous standby must not hold up t's new subscriptions); nor is that
    transaction forgotten while some snapshot lacks it: a read of u still needs it."""
    delivered = DeliveredXids()
    delivered.note(10, 1, {T})
    delivered.note(11, 2, {U})  # held: not visible below
    delivered.note(12, 3, {T, U})
    lacking_11 = snapshot(11, 13, 11)
    assert delivered.first_missed(lacking_11, upto=3, prune=True, tables={T}) is None
    assert list(delivered) == [11, 12]  # 10 is forgotten; 11 is kept for readers of u
    assert delivered.first_missed(lacking_11, upto=3, prune=True, tables={U}) == (2, 11)
    assert delivered.first_missed(lacking_11, upto=3, prune=False) == (2, 11)
    assert delivered.first_missed(snapshot(13, 13), upto=3, prune=True, tables={U}) is None
    assert not delivered


def test_past_so_many_combinations_of_tables_a_transaction_counts_for_every_table() -> None:
    delivered = DeliveredXids(max_table_sets=1)
    delivered.note(10, 1, {T})
    delivered.note(11, 2, {U})  # a second combination: counts for any table
    delivered.note(12, 3, {T})
    assert delivered.first_missed(snapshot(10, 13, 10, 11), upto=3, prune=False,
                                  tables={T}) == (1, 10)
    assert delivered.first_missed(snapshot(11, 13, 11), upto=3, prune=False,
                                  tables={T}) == (2, 11)  # (it may not have changed t)


TABLE_SETS = st.sampled_from([frozenset(), frozenset({T}), frozenset({U}), frozenset({T, U})])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), TABLE_SETS), min_size=1, max_size=30),
       st.integers(0, 45), st.integers(0, 10), st.sets(st.integers(0, 45)),
       st.integers(0, 30), st.booleans(), st.one_of(st.none(), TABLE_SETS))
def test_the_first_delivered_xid_a_snapshot_lacks_is_found(
        order: list[tuple[int, frozenset[tuple[str, str]]]], xmin: int, width: int,
        xip: set[int], upto: int, prune: bool,
        tables: frozenset[tuple[str, str]] | None) -> None:
    """Against the definition: the earliest delivery number up to ``upto``, at an xid's
    latest delivery, whose xid the snapshot does not see and whose transaction changed one
    of ``tables`` (across the xid wraparound, with xids delivered again)."""
    base = 0xFFFF_FFE0
    delivered = DeliveredXids()
    latest: dict[int, tuple[int, frozenset[tuple[str, str]]]] = {}
    for number, (offset, changed) in enumerate(order, start=1):
        xid = (base + offset) & 0xFFFF_FFFF
        delivered.note(xid, number, changed)
        latest[xid] = number, changed
    seen = snapshot(base + xmin, base + xmin + width,
                    *(base + x for x in xip if xmin <= x < xmin + width))
    expected = min(((number, xid) for xid, (number, changed) in latest.items()
                    if number <= upto and not seen.is_visible(xid)
                    and (tables is None or tables & changed)), default=None)
    assert delivered.first_missed(seen, upto, prune, tables) == expected
    kept = list(delivered)
    # Pruning changes nothing, and forgets no transaction the snapshot lacks.
    assert delivered.first_missed(seen, upto, prune, tables) == expected
    assert set(kept) >= {xid for xid in latest if not seen.is_visible(xid)}
