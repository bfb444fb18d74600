"""Pure parts of the live-data engine: the routing index and encode-once."""

from __future__ import annotations

from cdcddp.ddp.mergebox import MergeBox
from cdcddp.publish.definition import Cursor
from cdcddp.publish.filters import C
from cdcddp.publish.livedata import EncodeCache, ObserverEntry, TableRoutes
from cdcddp.publish.observer import Observer
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
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 1}, ("id",))) == {by_a}
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 9}, ("id",))) == set()
    # An unchanged TOASTed (absent) indexed column: every observer indexed on it may match.
    absent = Update(1, 1, "public", "items", {"id": 5, "rank": 0}, {"id": 5}, ("id",))
    assert len(routes.candidates(absent)) == 1003

    routes.remove(by_a)
    assert routes.candidates(Delete(1, 1, "public", "items", {"id": 1}, ("id",))) == set()
    assert routes.candidates(insert(id=2, category="a", rank=0)) == {ranked}


def test_encode_cache_encodes_a_shared_op_once() -> None:
    fields = {"title": "x", "n": 1}
    after = {"title": "y", "n": 1}
    boxes = [MergeBox() for _ in range(3)]
    for box in boxes:
        box.add("s", "items", "1", fields)
        box.flush()
        box.change("s", "items", "1", {"title": "y"}, (), fields_after=after)
        box.add("s", "items", "2", fields)
    cache = EncodeCache()
    texts = [[cache.encode(op) for op in box.flush()] for box in boxes]
    assert texts[0] == texts[1] == texts[2]
    assert texts[0][0] == '{"msg":"changed","collection":"items","id":"1","fields":{"title":"y"}}'
    assert cache.hits == 4  # the second and third client reuse both texts
