"""Pure parts of the live-data engine: the routing index and encode-once."""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from typing import Any

from cdcddp.ddp.mergebox import MergeBox
from cdcddp.publish.clients import EncodeCache, encode_transition, encode_transitions
from cdcddp.publish.definition import Cursor
from cdcddp.publish.filters import C
from cdcddp.publish.observer import Observer
from cdcddp.publish.routes import ObserverEntry, TableRoutes
from cdcddp.wal.events import Delete, Insert, Update


def entry_for(filter_: object, rows: list[dict[str, object]] = ()) -> ObserverEntry:  # type: ignore[assignment]
    bound = Cursor("items", fields=["category", "rank"], filter=filter_).bind()  # type: ignore[arg-type]
    entry = ObserverEntry(bound)
    entry.observer = Observer(bound)
    entry.observer.load([dict(r) for r in rows])
    return entry


def insert(**row: object) -> Insert:
    return Insert(1, 1, "public", "items", dict(row), ("id",))


def test_routes_by_equality_by_key_and_unconstrained() -> None:
    routes = TableRoutes()
    by_a = entry_for(C("category") == "a", [{"id": 1, "category": "a", "rank": 0}])
    by_b_or_c = entry_for(C("category").in_(["b", "c"]) & (C("rank") > 2))
    ranked = entry_for(C("rank") > 5)
    many = [entry_for(C("category") == f"x{n}") for n in range(1000)]
    for entry in [by_a, by_b_or_c, ranked, *many]:
        routes.add(entry)

    assert routes.candidates(insert(id=2, category="a", rank=0)) == {by_a, ranked}
    assert routes.candidates(insert(id=2, category="c", rank=0)) == {by_b_or_c, ranked}
    assert routes.candidates(insert(id=2, category="x7", rank=0)) == {many[7], ranked}
    # Moving out of "a": only the key finds the observer holding row 1.
    move_out = Update(1, 1, "public", "items", {"id": 1, "category": "q", "rank": 0},
                      {"id": 1}, ("id",))
    assert routes.candidates(move_out) == {by_a, ranked}
    # A delete finds the indexed observer holding the row by its key, and every unconstrained
    # one (whose keys are not indexed: it is a candidate for every change).
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 1}, ("id",))) == {
        by_a, ranked}
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 9}, ("id",))) == {ranked}
    # An unchanged TOASTed (absent) indexed column: every observer indexed on it may match.
    absent = Update(1, 1, "public", "items", {"id": 5, "rank": 0}, {"id": 5}, ("id",))
    assert len(routes.candidates(absent)) == 1003

    routes.remove(by_a)
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 1}, ("id",))) == {ranked}
    assert routes.candidates(insert(id=2, category="a", rank=0)) == {ranked}


def test_routes_index_the_keys_of_indexed_observers_only() -> None:
    """A whole-table observer's rows cost no index entries (a key each, for what may be
    millions of rows), yet it sees every change: deletes and moves included."""
    routes = TableRoutes()
    rows = [{"id": n, "category": "a", "rank": n} for n in range(100)]
    whole = entry_for(None, rows)
    ranked = entry_for(C("rank") >= 50, rows[50:])
    by_a = entry_for(C("category") == "a", rows)
    for entry in (whole, ranked):
        routes.add(entry)
    assert routes.holders == {} and not whole.keys_indexed and not ranked.keys_indexed
    routes.add(by_a)
    assert by_a.keys_indexed and len(routes.holders) == 100
    delete = Delete(1, 1, "public", "items", {"id": 7}, ("id",))
    assert routes.candidates(delete) == {whole, ranked, by_a}
    # Following a change's keys and reloading leave the unindexed observers out of the index.
    for entry in (whole, ranked, by_a):
        assert entry.observer is not None
        entry.observer.apply(delete)
        routes.follow_keys(entry, entry.observer.keys)
    assert (7,) not in routes.holders and len(routes.holders) == 99
    assert whole.observer is not None
    routes.release_keys(whole)
    whole.observer.load([dict(r) for r in rows])
    routes.hold_keys(whole)
    assert len(routes.holders) == 99
    routes.remove(whole)
    routes.remove(by_a)
    assert routes.holders == {}


def test_encode_cache_diffs_and_encodes_a_shared_transition_once() -> None:
    fields = {"title": "x", "n": 1}
    after = {"title": "y", "n": 1}
    boxes = [MergeBox() for _ in range(3)]
    for box in boxes:
        box.add("s", "items", "1", fields)
        box.add("s", "items", "3", fields)
        box.flush()
        box.change("s", "items", "1", {"title": "y"}, (), fields_after=after)
        box.add("s", "items", "2", fields)
        box.remove("s", "items", "3")
    cache = EncodeCache()
    texts = [[cache.transition(t) for t in box.settle()] for box in boxes]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0] == [
        b'{"msg":"changed","collection":"items","id":"1","fields":{"title":"y"}}',
        b'{"msg":"added","collection":"items","id":"2","fields":{"title":"x","n":1}}',
        b'{"msg":"removed","collection":"items","id":"3"}',
    ]
    assert cache.hits == 6  # the second and third client reuse all three texts
    # The same text as the uncached path.
    box = MergeBox()
    box.add("s", "items", "1", fields)
    assert [encode_transition(t) for t in box.settle()] == [texts[0][1].replace(b'"2"', b'"1"')]


def test_encode_cache_encodes_a_clients_flush_together_with_the_same_texts() -> None:
    fields, after = {"title": "x", "n": 1}, {"title": "y", "n": 1}
    dated = {"when": dt.datetime(2024, 5, 1, tzinfo=dt.UTC)}
    shared, own = MergeBox(), MergeBox()
    for box in (shared, own):
        box.add("s", "items", "1", fields)
        box.add("s", "items", "3", fields)
        box.add("s", "items", "4", {"n": float("nan")})
        box.flush()
        box.change("s", "items", "1", {"title": "y"}, (), fields_after=after)
        box.add("s", "items", "2", dated)
        box.remove("s", "items", "3")
        box.change("s", "items", "4", {"n": float("nan")}, ())  # NaN equals NaN: no message
    own.add("t", "items", "5", {"$weird": 1})  # only this client: encoded in its batch
    cache = EncodeCache()
    first = cache.encode(shared.settle())
    settled = own.settle()
    expected = [text for t in settled if (text := encode_transition(t)) is not None]
    assert cache.encode(settled) == expected
    assert first == expected[:3]
    assert len(expected) == 4 and cache.hits == 3  # the shared change, add and remove


def test_encoding_a_flush_together_equals_encoding_each_message() -> None:
    box = MergeBox()
    box.add("s", "items", "1", {"title": "x", "n": 1})
    box.add("s", "items", "2", {"title": "y", "when": dt.datetime(2024, 5, 1, tzinfo=dt.UTC)})
    box.add("s", "items", "3", {"_id": "3", "n": float("nan")})
    box.add("s", "items", "4", {})
    box.flush()
    box.change("s", "items", "1", {"title": "z"}, ("n",))
    box.remove("s", "items", "2")
    box.add("s", "items", "5", {"$weird": {"$date": 1}, "n": None})
    box.add("t", "other", "1", {"n": 2})
    for transitions in ([], box.settle()):
        assert encode_transitions(transitions) == [
            text for t in transitions if (text := encode_transition(t)) is not None]


def test_routes_hold_a_key_for_one_or_several_observers() -> None:
    routes = TableRoutes()
    first = entry_for(C("category") == "a", [{"id": 1, "category": "a", "rank": 1}])
    second = entry_for(C("category").in_(["a", "b"]), [{"id": 1, "category": "a", "rank": 1}])
    routes.add(first)  # bulk: nothing held before
    routes.add(second)
    delete = Delete(1, 1, "public", "items", {"id": 1}, ("id",))
    assert routes.candidates(delete) == {first, second}
    routes.release(first, (1,))
    assert routes.candidates(delete) == {second}
    routes.hold(first, (1,))
    routes.hold(first, (1,))
    assert routes.candidates(delete) == {first, second}
    routes.remove(second)
    routes.remove(first)
    assert routes.holders == {}


def test_observer_fill_is_load_without_ops() -> None:
    rows = [{"id": n, "category": "a", "rank": n} for n in (1, -2, 10**23)]
    loaded, filled = entry_for(C("rank") != 0, rows).observer, entry_for(C("rank") != 0)
    assert loaded is not None and filled.observer is not None
    filled.observer.fill([filled.observer.values_of(r) for r in rows])
    assert filled.observer.docs == loaded.docs
    assert filled.observer.rows == loaded.rows
    # Wire ids as Meteor stringifies them (a sign, or 24 hex-like digits, gets escaped).
    assert list(filled.observer.docs) == ["1", "--2", "-" + str(10**23)]


def test_delivered_xids_stay_in_delivery_order_when_delivered_again() -> None:
    from cdcddp.publish.handoff import DeliveredXids
    from cdcddp.publish.livedata import LiveData
    from cdcddp.publish.visibility import Snapshot

    live = LiveData.__new__(LiveData)  # only the bookkeeping under test
    live._delivered, live._applied, live._xid_waiters = DeliveredXids(), OrderedDict(), {}
    live._commits_seen = 0
    for xid in (100, 101, 102):
        live._note_delivered(xid)
    live._note_delivered(100)  # a reconnect delivers 100 again, as number 4
    # A snapshot taken after delivery 3 that does not see 101 missed it, whatever came later.
    lacking_101 = Snapshot.parse("100:103:101")
    assert live._delivered.first_missed(lacking_101, upto=3, prune=False) == (2, 101)
    assert list(live._delivered) == [101, 102, 100] and list(live._applied) == [101, 102, 100]
    # 100's first delivery does not count: it was delivered again, after number 3.
    assert live._delivered.first_missed(Snapshot.parse("100:103:100"), upto=3,
                                        prune=False) is None
    assert live._delivered.first_missed(Snapshot.parse("100:103:100"), upto=4,
                                        prune=False) == (4, 100)
    assert not live._delivered.first_missed(Snapshot.parse("103:103:"), upto=4, prune=True)
    assert not live._delivered  # all seen: forgotten


def _u(key: int, new: dict[str, Any], old_key: int | None = None, table: str = "t") -> Update:
    return Update(1, 0, "public", table, {"id": key, **new},
                  {"id": key if old_key is None else old_key}, ("id",))


def test_left_out_values_are_taken_from_the_rows_earlier_changes() -> None:
    """A change that left out unchanged TOASTed values: the earlier changes of its
    transaction to that row give them, newest first, and what none gave is the row as it
    was before the transaction (True) — unless that row's history in the transaction cannot
    be followed by key (None)."""
    from cdcddp.publish.livedata import _left_out_earlier
    from cdcddp.wal.events import Truncate

    moving = _u(1, {"cat": "b"})
    other_row = _u(2, {"body": "not this", "note": "nor this"})
    other_table = _u(1, {"body": "nor this"}, table="u")
    # Nothing earlier in the transaction: all from the version before it.
    assert _left_out_earlier(moving, [moving], ["body"]) == ({}, True)
    # Other rows and tables do not count.
    assert _left_out_earlier(moving, [other_row, other_table, moving],
                             ["body", "note"]) == ({}, True)
    # The newest earlier change of the row that has the value gives it.
    set_body = _u(1, {"body": "new", "cat": "a"})
    set_note = _u(1, {"note": "n2", "cat": "a"})
    assert _left_out_earlier(moving, [_u(1, {"body": "old"}), set_body, set_note, moving],
                             ["body", "note"]) == ({"body": "new", "note": "n2"}, False)
    assert _left_out_earlier(moving, [set_note, moving], ["body", "note"]) == (
        {"note": "n2"}, True)
    inserted = Insert(1, 0, "public", "t", {"id": 1, "body": "fresh", "note": None}, ("id",))
    assert _left_out_earlier(moving, [inserted, moving], ["body"]) == ({"body": "fresh"}, False)
    # Followed through the row's earlier key, when the history stays on one key only.
    assert _left_out_earlier(moving, [_u(1, {"cat": "c"}, old_key=3), moving], ["body"]) is None
    assert _left_out_earlier(_u(1, {"cat": "b"}, old_key=3), [moving], ["body"]) is None
    deleted = Delete(1, 0, "public", "t", {"id": 1}, ("id",))
    assert _left_out_earlier(moving, [deleted, moving], ["body"]) is None
    assert _left_out_earlier(moving, [Truncate(1, 0, "public", "t"), moving], ["body"]) is None
    assert _left_out_earlier(moving, [_u(1, {"x": 1}, old_key=1, table="t"), _u(5, {}, 1),
                                      moving], ["body"]) is None  # id 1 moved to 5
    # Not among the changes, or no primary key: it cannot tell.
    assert _left_out_earlier(moving, [], ["body"]) is None
    keyless = Update(1, 0, "public", "t", {"cat": "b"}, {}, ())
    assert _left_out_earlier(keyless, [keyless], ["body"]) is None
