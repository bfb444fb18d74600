"""The observer core (pure): result maintenance, move in/out, TOAST completion, handoff."""

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from cdcddp.ddp.mergebox import diff_visible, values_equal
from cdcddp.publish.definition import Cursor
from cdcddp.publish.filters import C, Param
from cdcddp.publish.observer import DocOp, NeedsRow, Observer
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Delete, Insert, Update

CURSOR = Cursor("public.todos", collection="todos", camel_case=True,
                fields=["list_id", "text", "checked"],
                filter=(C("list_id") == Param("listId")) & (C("checked") == False))  # noqa: E712


def obs(snapshot: Snapshot | None = None) -> Observer:
    return Observer(CURSOR.bind({"listId": 1}), snapshot)


def row(i: int, list_id: int = 1, text: str = "t", checked: bool = False) -> dict:
    return {"id": i, "list_id": list_id, "text": text, "checked": checked}


def ins(r: dict) -> Insert:
    return Insert(xid=1, lsn=1, schema="public", table="todos", new=r, pk=("id",))


def upd(r: dict, old_id: int | None = None) -> Update:
    ident = {"id": r["id"] if old_id is None else old_id}
    return Update(xid=1, lsn=1, schema="public", table="todos", new=r, identity=ident, pk=("id",))


def test_load_then_diff_on_reload() -> None:
    o = obs()
    ops = o.load([row(1), row(2)])
    assert [(op.kind, op.doc_id) for op in ops] == [("added", "1"), ("added", "2")]
    assert ops[0].fields == {"listId": 1, "text": "t", "checked": False}
    kept = o.docs["2"]
    ops = o.load([row(2), row(3, text="x")])  # resync: 1 gone, 3 new, 2 unchanged
    assert sorted((op.kind, op.doc_id) for op in ops) == [("added", "3"), ("removed", "1")]
    assert o.docs["2"] is kept  # unchanged documents keep their identity (shared references)


def test_insert_update_delete_and_move_in_out() -> None:
    o = obs()
    assert o.apply(ins(row(1, list_id=2))) == []  # not matching
    assert o.apply(ins(row(2))) == [DocOp("added", "todos", "2",
                                          {"listId": 1, "text": "t", "checked": False})]
    assert o.apply(upd(row(2, text="u"))) == [DocOp("changed", "todos", "2", {"text": "u"})]
    assert o.apply(upd(row(2, text="u"))) == []  # no visible change, no message
    assert o.apply(upd(row(2, text="u", checked=True))) == [DocOp("removed", "todos", "2")]
    assert o.apply(upd(row(1))) == [DocOp("added", "todos", "1",
                                          {"listId": 1, "text": "t", "checked": False})]
    assert o.apply(Delete(xid=1, lsn=1, schema="public", table="todos", identity={"id": 1},
                          pk=("id",))) == [DocOp("removed", "todos", "1")]
    assert len(o) == 0


def test_key_change_is_remove_plus_add() -> None:
    o = obs()
    o.load([row(1)])
    ops = o.apply(upd(row(5), old_id=1))
    assert [(op.kind, op.doc_id) for op in ops] == [("removed", "1"), ("added", "5")]


def test_keys_of_each_change_for_the_holders_index() -> None:
    """``keys``: the (old, new) keys whose documents the last change may have removed or
    added, whatever came of it (the engine's holders index follows them)."""
    o = obs()
    o.apply(ins(row(1, list_id=2)))  # not matching: its key is still reported
    assert o.keys == (None, (1,))
    o.apply(ins(row(2)))
    assert o.keys == (None, (2,))
    o.apply(upd(row(5), old_id=2))  # a key change
    assert o.keys == ((2,), (5,))
    o.apply(upd({"id": 7, "list_id": 1, "checked": False}))  # NeedsRow
    assert o.keys == ((7,), (7,))
    o.apply_fetched((7,), row(7))
    assert o.keys == ((7,), (7,)) and o.holds((7,))
    o.apply_fetched((7,), None)
    assert o.keys == ((7,), None) and not o.holds((7,))
    o.apply(Delete(xid=1, lsn=1, schema="public", table="todos", identity={"id": 5},
                   pk=("id",)))
    assert o.keys == ((5,), None) and not o.holds((5,))


def test_type_changes_are_changes() -> None:
    o = Observer(Cursor("t", fields=["v"]).bind())
    o.load([{"id": 1, "v": 1}])
    assert o.apply(upd({"id": 1, "v": True})) == [DocOp("changed", "t", "1", {"v": True})]
    assert o.apply(upd({"id": 1, "v": 1})) == [DocOp("changed", "t", "1", {"v": 1})]
    assert o.apply(upd({"id": 1, "v": 1.0})) == []  # the same JSON on the wire


def test_absent_toast_columns_come_from_the_published_copy() -> None:
    o = obs()
    o.load([row(1, text="big")])
    partial = {"id": 1, "list_id": 1, "checked": False}  # "text" unchanged, left out
    assert o.apply(upd(partial)) == []
    assert o.row((1,))["text"] == "big"  # type: ignore[index]
    ops = o.apply(upd({"id": 1, "list_id": 1, "checked": True}))
    assert ops == [DocOp("removed", "todos", "1")]


def test_absent_column_of_a_row_moving_in_needs_a_fetch() -> None:
    o = obs()
    partial = {"id": 7, "list_id": 1, "checked": False}
    need = o.apply(upd(partial))
    assert need == NeedsRow((7,), ("text",), replaces=(7,))
    # ...unless the row cannot match whatever the missing value is.
    assert o.apply(upd({"id": 8, "list_id": 3, "checked": False})) == []
    ops = o.apply_fetched((7,), row(7, text="fetched"))
    assert ops == [DocOp("added", "todos", "7",
                         {"listId": 1, "text": "fetched", "checked": False})]
    assert o.apply_fetched((7,), None) == [DocOp("removed", "todos", "7")]


def test_snapshot_visibility_is_checked_until_the_stream_passes_the_snapshot_lsn() -> None:
    o = Observer(CURSOR.bind({"listId": 1}), Snapshot.parse("100:105:102"), snapshot_lsn=1000)
    assert not o.wants_transaction(99, 900)
    assert not o.wants_transaction(104, 950)
    assert o.wants_transaction(102, 960)
    # Commit order is not visibility order: 103 committed after 102 yet the snapshot has it.
    assert not o.wants_transaction(103, 980)
    assert o.snapshot is not None
    assert o.wants_transaction(101, 1001)  # written after the snapshot: so is all that follows
    assert o.snapshot is None
    assert o.wants_transaction(50, 1100)


def test_doc_ops_carry_the_meteor_wire_id() -> None:
    o = Observer(Cursor("t", fields=["v"], primary_key=["code"]).bind())
    ops = o.load([{"code": "-x", "v": 1}, {"code": "abc", "v": 2}])
    assert [op.doc_id for op in ops] == ["--x", "abc"]


def test_observers_of_one_cursor_shape_share_their_row_functions() -> None:
    # Thousands of observers of one publication with different parameters: one set of
    # key/render functions (memory, and CPU caches), each still rendering its own rows.
    first, second = Observer(CURSOR.bind({"listId": 1})), Observer(CURSOR.bind({"listId": 2}))
    assert first._render_values is second._render_values
    assert first._key_of is second._key_of
    other_shape = Cursor("public.todos", collection="todos", fields=["text"])
    assert Observer(other_shape.bind())._render_values is not first._render_values
    first.load([row(1, list_id=1)])
    second.load([row(2, list_id=2, text="two")])
    assert first.docs == {"1": {"listId": 1, "text": "t", "checked": False}}
    assert second.docs == {"2": {"listId": 2, "text": "two", "checked": False}}
    # A cursor made anew per call (a publication function) with the same shape shares them.
    again = Cursor("public.todos", collection="todos", camel_case=True,
                   fields=["list_id", "text", "checked"],
                   filter=(C("list_id") == Param("listId")) & (C("checked") == False))  # noqa: E712
    assert Observer(again.bind({"listId": 3}))._render_values is first._render_values


def test_a_delete_finds_its_document_whatever_form_its_wire_id_takes() -> None:
    # Documents are kept by wire id; a delete carries only the key, so the id is derived
    # from it again: every escaping and encoding must agree with the rendered one.
    def delete(identity: dict, pk: tuple[str, ...]) -> Delete:
        return Delete(xid=1, lsn=1, schema="public", table="t", identity=identity, pk=pk)

    single = Observer(Cursor("t", fields=["v"], primary_key=["k"]).bind())
    keys = [5, -2, 10**23, "-x", "abc", "0123456789abcdef01234567", "{y"]
    single.load([{"k": k, "v": 1} for k in keys])
    for k in keys:
        [op] = single.apply(delete({"k": k}, ("k",)))  # type: ignore[misc]
        assert op.kind == "removed"
    assert single.docs == {} and single.rows == {}

    composite = Observer(Cursor("t", fields=["v"], primary_key=["a", "b"]).bind())
    composite.load([{"a": 7, "b": "en", "v": 1}, {"a": -1, "b": "x,y", "v": 2}])
    ids = set(composite.docs)
    removed = {op.doc_id for k in ((7, "en"), (-1, "x,y"))
               for op in composite.apply(delete({"a": k[0], "b": k[1]}, ("a", "b")))}  # type: ignore[union-attr]
    assert removed == ids and composite.docs == {}


def test_fill_loads_what_load_loads_for_every_key_form() -> None:
    # fill runs a loop compiled per cursor shape (single key) or a plain one (composite);
    # field names reach the compiled source only as literals, whatever they hold.
    cursors_and_rows = [
        (Cursor("t", fields=[("v", "it's \"q\"\\n"), ("w", "ü")], primary_key=["k"]),
         [{"k": k, "v": k, "w": None} for k in (0, 7, -2, 10**23)]),
        (Cursor("t", fields=["v"], primary_key=["k"]),
         [{"k": k, "v": 1} for k in ("abc", "-x", "0123456789abcdef01234567")]),
        (Cursor("t", fields=["v", "a"], primary_key=["a", "b"]),
         [{"a": 7, "b": "en", "v": 1}, {"a": -1, "b": "x,y", "v": None}]),
    ]
    for cursor, rows in cursors_and_rows:
        loaded, filled = Observer(cursor.bind()), Observer(cursor.bind())
        loaded.load(rows)
        filled.fill([filled.values_of(r) for r in rows])
        assert filled.docs == loaded.docs and filled.rows == loaded.rows
        assert list(filled.docs) == list(loaded.docs)  # in snapshot order
        assert all(type(v) is dict for v in filled.docs.values())


def test_an_observer_diff_compares_as_the_client_would() -> None:
    nan = float("nan")
    old = {"a": 1, "b": True, "c": nan, "d": 1, "e": {"x": 1, "y": 2}, "f": "s", "g": 0.5,
           "gone": 1}
    new = {"a": 1.0, "b": 1, "c": nan, "d": True, "e": {"y": 2, "x": 1}, "f": "t", "g": 0.5,
           "h": None}
    changed, cleared = diff_visible(old, new)
    # 1 == 1.0 (one JS number), NaN equals NaN, key order does not matter; a bool is not a
    # number; a new key is a change even when null; a key that disappears is cleared.
    assert changed == {"b": 1, "d": True, "f": "t", "h": None}
    assert cleared == ("gone",)
    assert diff_visible(old, dict(old)) == ({}, ())


@given(st.dictionaries(st.sampled_from("abcd"),
                       st.none() | st.booleans() | st.integers(-3, 3)
                       | st.floats(allow_nan=True) | st.text(max_size=2), max_size=4),
       st.dictionaries(st.sampled_from("abcd"),
                       st.none() | st.booleans() | st.integers(-3, 3)
                       | st.floats(allow_nan=True) | st.text(max_size=2), max_size=4))
def test_the_diff_agrees_with_values_equal(old: dict[str, Any], new: dict[str, Any]) -> None:
    changed, cleared = diff_visible(old, new)
    assert list(changed) == [k for k, v in new.items()
                             if k not in old or not values_equal(old[k], v)]
    assert all(changed[k] is new[k] for k in changed)
    assert cleared == tuple(k for k in old if k not in new)


def test_a_fetch_by_the_old_key_does_not_hide_where_the_row_went() -> None:
    """A row fetched by key under a snapshot that already saw its key change is gone from
    that key; the key change is still applied where the row went (it was skipped whole, and
    the row was lost under its new key: the oracle's primary key changes found it)."""
    sees_10 = Snapshot.parse("11:11:")
    o = obs()
    o.load([row(1)])
    o.note_fetched((7,), sees_10)  # fetched: no row 7 any more (transaction 10 moved it)
    moved = Update(xid=10, lsn=1, schema="public", table="todos", new=row(-7),
                   identity={"id": 7}, pk=("id",))
    assert o.apply(moved) == [DocOp("added", "todos", "--7",
                                    {"listId": 1, "text": "t", "checked": False})]
    assert o.keys == (None, (-7,))
    # Moving in without its TOASTed text: fetched by its new key, replacing the old one.
    o = obs()
    o.note_fetched((7,), sees_10)
    left_out = {k: v for k, v in row(-7).items() if k != "text"}
    needs = o.apply(Update(xid=10, lsn=1, schema="public", table="todos", new=left_out,
                           identity={"id": 7}, pk=("id",)))
    assert needs == NeedsRow((-7,), ("text",))  # it replaces nothing at key 7: see below
    # Key 7 was fetched after a new row took that key: the fetched row for -7 leaves it be.
    o = obs()
    o.load([row(7, text="a new row 7")])
    o.note_fetched((7,), sees_10)
    needs = o.apply(Update(xid=10, lsn=1, schema="public", table="todos", new=left_out,
                           identity={"id": 7}, pk=("id",)))
    assert needs == NeedsRow((-7,), ("text",), replaces=None)
    assert o.apply_fetched((-7,), row(-7)) == [
        DocOp("added", "todos", "--7", {"listId": 1, "text": "t", "checked": False})]
    assert o.holds((7,)) and o.holds((-7,))
    # The other way round: the new key was fetched, showing the row there; the old key
    # still has to let go of it.
    o = obs()
    o.load([row(7)])
    o.note_fetched((-7,), sees_10)
    assert o.apply(moved) == [DocOp("removed", "todos", "7")]
    assert o.keys == ((7,), (-7,)) and not o.holds((7,))
    # Both keys shown (or an unchanged key): nothing left to apply.
    o.note_fetched((7,), sees_10)
    assert o.apply(moved) == []
    assert o.apply(Update(xid=10, lsn=1, schema="public", table="todos", new=row(-7),
                          identity={"id": -7}, pk=("id",))) == []
