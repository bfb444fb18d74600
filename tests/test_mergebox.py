"""The per-client merge box: Meteor's SERVER_MERGE rules, coalescing, sharing, and a model check.

Rule tests flush after every operation, which must give exactly Meteor's messages; their
scenarios follow Meteor's own `livedata - sessionview` tests. The stateful test compares the
box against an independent re-statement of Meteor's precedence-list algorithm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cdcddp.ddp.mergebox import (
    MergeBox,
    MergeBoxError,
    Op,
    Transition,
    transition_op,
    values_equal,
)

C = "items"


def changed(doc_id: str, fields: dict[str, Any], cleared: Iterable[str] = ()) -> Op:
    return ("changed", C, doc_id, fields, tuple(cleared))


def added(doc_id: str, fields: dict[str, Any]) -> Op:
    return ("added", C, doc_id, fields)


def removed(doc_id: str) -> Op:
    return ("removed", C, doc_id)


# ---- Meteor's rules, one flush per operation ----------------------------------------------------


def test_first_add_sends_added_with_all_fields_without_id() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"_id": "d1", "a": 1, "b": "x"})
    assert box.flush() == [added("d1", {"a": 1, "b": "x"})]
    assert box.flush() == []


def test_add_with_no_fields_is_added_with_empty_fields() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {})
    assert box.flush() == [added("d1", {})]


def test_exists_reveal_sends_nothing_until_last_sub_leaves() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {})
    box.flush()
    box.add("B", C, "d1", {})
    assert box.flush() == []
    box.remove("A", C, "d1")
    assert box.flush() == []
    box.remove("B", C, "d1")
    assert box.flush() == [removed("d1")]
    assert box.document_count == 0


def test_second_sub_reports_only_new_keys() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": "foo"})
    box.flush()
    box.add("B", C, "d1", {"a": "foo", "b": "bar"})
    assert box.flush() == [changed("d1", {"b": "bar"})]
    box.remove("A", C, "d1")
    assert box.flush() == []
    box.remove("B", C, "d1")
    assert box.flush() == [removed("d1")]


def test_first_publisher_wins_and_removal_reveals_next() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.flush()
    box.add("B", C, "d1", {"foo": "baz"})
    assert box.flush() == []  # A published foo first: the client keeps "bar"
    assert box.visible(C, "d1") == {"foo": "bar"}
    box.remove("A", C, "d1")
    assert box.flush() == [changed("d1", {"foo": "baz"})]
    box.remove("B", C, "d1")
    assert box.flush() == [removed("d1")]


def test_change_by_head_is_sent_change_by_others_is_not() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.add("B", C, "d1", {"foo": "bar"})
    box.flush()
    box.change("B", C, "d1", {"foo": "other"})
    assert box.flush() == []
    box.change("A", C, "d1", {"foo": "baz"})
    assert box.flush() == [changed("d1", {"foo": "baz"})]
    box.remove("A", C, "d1")  # B's value is revealed
    assert box.flush() == [changed("d1", {"foo": "other"})]


def test_change_to_same_value_sends_nothing() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar", "n": {"x": 1, "y": [1, 2]}})
    box.flush()
    box.change("A", C, "d1", {"foo": "bar", "n": {"y": [1, 2], "x": 1}})
    assert box.flush() == []


def test_change_makes_a_new_field_and_weird_key_names() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.flush()
    box.change("A", C, "d1", {"baz": "quux", "constructor": "bla"})
    assert box.flush() == [changed("d1", {"baz": "quux", "constructor": "bla"})]


def test_new_field_of_visible_value_from_another_sub_sends_nothing() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.add("B", C, "d1", {})
    box.flush()
    box.change("B", C, "d1", {"foo": "bar"})  # B joins foo's list at the end
    assert box.flush() == []
    box.remove("A", C, "d1")
    assert box.flush() == []
    box.remove("B", C, "d1")
    assert box.flush() == [removed("d1")]


def test_new_field_of_other_value_from_non_head_waits_its_turn() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.add("B", C, "d1", {})
    box.flush()
    box.change("B", C, "d1", {"foo": "mine"})
    assert box.flush() == []
    box.change("A", C, "d1", {}, ["foo"])
    assert box.flush() == [changed("d1", {"foo": "mine"})]


def test_field_clear_and_clear_of_absent_field() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"field": "value"})
    box.flush()
    box.change("A", C, "d1", {}, ["field"])
    assert box.flush() == [changed("d1", {}, ["field"])]
    box.change("A", C, "d1", {}, ["field"])
    assert box.flush() == []
    assert box.visible(C, "d1") == {}


def test_field_clear_reveal() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.add("B", C, "d1", {"foo": "baz"})
    box.flush()
    box.change("A", C, "d1", {}, ["foo"])
    assert box.flush() == [changed("d1", {"foo": "baz"})]
    box.remove("A", C, "d1")
    assert box.flush() == []


def test_clear_all_clears_only_once_and_change_all_changes_only_once() -> None:
    box = MergeBox()
    for sub in "ABC":
        box.add(sub, C, "d1", {"foo": "bar"})
    box.flush()
    for sub in "BAC":
        box.change(sub, C, "d1", {"foo": "baz"})
        assert box.flush() == ([changed("d1", {"foo": "baz"})] if sub == "A" else [])
    for sub in "ABC":
        box.change(sub, C, "d1", {}, ["foo"])
        assert box.flush() == ([changed("d1", {}, ["foo"])] if sub == "C" else [])


def test_multiple_operations_in_one_change_and_remove_reveal() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar", "baz": "quux"})
    box.flush()
    box.add("B", C, "d1", {"foo": "baz"})
    box.change("A", C, "d1", {"thing": "stuff"}, ["foo", "baz"])
    assert box.flush() == [changed("d1", {"foo": "baz", "thing": "stuff"}, ["baz"])]
    box.remove("A", C, "d1")
    assert box.flush() == [changed("d1", {}, ["thing"])]
    box.remove("B", C, "d1")
    assert box.flush() == [removed("d1")]


def test_add_remove_add_again() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"foo": "bar"})
    box.flush()
    box.remove("A", C, "d1")
    assert box.flush() == [removed("d1")]
    box.add("A", C, "d1", {"foo": "bar"})
    assert box.flush() == [added("d1", {"foo": "bar"})]


def test_remove_subscription_removes_only_unshared_documents() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.add("A", C, "d2", {"a": 2})
    box.add("A", "other", "d3", {"a": 3})
    box.add("B", C, "d2", {"b": 2})
    box.flush()
    box.remove_subscription("A")
    ops = box.flush()
    assert sorted(ops, key=repr) == sorted(
        [removed("d1"), changed("d2", {}, ["a"]), ("removed", "other", "d3")], key=repr
    )
    assert box.subscriptions() == ["B"]
    box.remove_subscription("A")  # unknown / already gone: nothing happens
    assert box.flush() == []
    assert box.view() == {C: {"d2": {"b": 2}}}


def test_collections_are_independent() -> None:
    box = MergeBox()
    box.add("A", "x", "d1", {"v": 1})
    box.add("A", "y", "d1", {"v": 2})
    assert box.flush() == [("added", "x", "d1", {"v": 1}), ("added", "y", "d1", {"v": 2})]
    box.remove("A", "x", "d1")
    assert box.flush() == [("removed", "x", "d1")]
    assert box.visible("y", "d1") == {"v": 2}


def test_booleans_are_not_numbers_but_int_and_float_are_one_number() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"flag": 1, "n": 1, "nested": {"x": 1}})
    box.flush()
    box.change("A", C, "d1", {"flag": True, "n": 1.0, "nested": {"x": True}})
    assert box.flush() == [changed("d1", {"flag": True, "nested": {"x": True}})]
    assert values_equal(float("nan"), float("nan"))
    assert not values_equal([1], (1, 2))
    assert not values_equal({"a": None}, {"b": None})
    assert not values_equal("1", 1)


def test_contract_violations_raise() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {})
    with pytest.raises(MergeBoxError):
        box.add("A", C, "d1", {})  # one subscription cannot publish a document twice
    with pytest.raises(MergeBoxError):
        box.change("B", C, "d1", {"x": 1})
    with pytest.raises(MergeBoxError):
        box.remove("B", C, "d1")
    with pytest.raises(MergeBoxError):
        box.remove("A", C, "nope")
    box.remove("A", C, "d1")
    with pytest.raises(MergeBoxError):
        box.remove("A", C, "d1")
    # Failed calls leave nothing pending that would be sent.
    assert box.flush() == []


# ---- coalescing ---------------------------------------------------------------------------------


def test_add_then_changes_before_flush_is_one_added_with_final_fields() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1, "b": 2})
    box.change("A", C, "d1", {"a": 5, "c": 3}, ["b"])
    box.change("A", C, "d1", {"a": 6})
    assert box.flush() == [added("d1", {"a": 6, "c": 3})]


def test_add_then_remove_before_flush_is_nothing() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.add("B", C, "d1", {"b": 1})
    box.remove_subscription("A")
    box.remove("B", C, "d1")
    assert box.flush() == []
    assert not box.has_pending and box.document_count == 0


def test_change_and_change_back_is_nothing() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.flush()
    box.change("A", C, "d1", {"a": 2, "b": 1})
    box.change("A", C, "d1", {"a": 1}, ["b"])
    assert box.flush() == []


def test_remove_then_readd_before_flush_is_a_changed_not_removed_added() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1, "b": 1})
    box.flush()
    box.remove("A", C, "d1")
    box.add("B", C, "d1", {"a": 1, "c": 1})
    assert box.flush() == [changed("d1", {"c": 1}, ["b"])]
    box.remove("B", C, "d1")
    box.add("B", C, "d1", {"a": 1, "c": 1})
    assert box.flush() == []


def test_remove_after_changes_before_flush_is_just_removed() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.flush()
    box.change("A", C, "d1", {"a": 2})
    box.remove("A", C, "d1")
    assert box.flush() == [removed("d1")]


def test_pending_work_is_bounded_by_documents_not_by_change_rate() -> None:
    box = MergeBox()
    for i in range(10):
        box.add("A", C, f"d{i}", {"n": 0})
    box.flush()
    for n in range(1, 1001):
        box.change("A", C, f"d{n % 10}", {"n": n})
    assert box.pending_count == 10
    ops = box.flush()
    assert len(ops) == 10
    assert {op[2]: op[3]["n"] for op in ops if op[0] == "changed"} == {
        f"d{i}": 1000 - (10 - i) % 10 for i in range(10)
    }


def test_user_change_rerun_sends_only_the_difference() -> None:
    # Rule 8 (login/logout): tear all subscriptions down and rerun them before one flush.
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.add("A", C, "d2", {"a": 2})
    box.flush()
    box.remove_subscription("A")
    box.add("A", C, "d2", {"a": 2, "private": True})
    box.add("A", C, "d3", {"a": 3})
    ops = box.flush()
    assert sorted(ops, key=repr) == sorted(
        [removed("d1"), changed("d2", {"private": True}), added("d3", {"a": 3})], key=repr
    )


def test_reset_forgets_everything_silently() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.reset()
    assert box.flush() == [] and box.document_count == 0 and box.subscriptions() == []


# ---- sharing: references, not copies ------------------------------------------------------------


def test_clients_share_the_publishers_field_mappings() -> None:
    shared = {"title": "t", "done": False}
    boxes = [MergeBox() for _ in range(3)]
    for box in boxes:
        box.add("sub", C, "d1", shared)
    outputs = [box.flush() for box in boxes]
    assert all(out[0][3] is shared for out in outputs)
    assert all(box.visible(C, "d1") is shared for box in boxes)

    after = {"title": "t2", "done": False}
    for box in boxes:
        box.change("sub", C, "d1", {"title": "t2"}, fields_after=after)
    assert all(box.published_fields("sub", C, "d1") is after for box in boxes)
    assert [box.flush() for box in boxes] == [[changed("d1", {"title": "t2"})]] * 3
    assert shared == {"title": "t", "done": False}  # never mutated


def test_change_without_fields_after_does_not_mutate_the_shared_mapping() -> None:
    shared = {"a": 1, "b": 2}
    box = MergeBox()
    box.add("A", C, "d1", shared)
    box.change("A", C, "d1", {"a": 9}, ["b"])
    assert shared == {"a": 1, "b": 2}
    assert box.visible(C, "d1") == {"a": 9}


def test_overlap_structures_exist_only_while_subscriptions_overlap() -> None:
    box = MergeBox()
    box.add("A", C, "d1", {"a": 1})
    box.add("A", C, "d2", {"a": 2})
    assert box.overlap_count == 0
    box.add("B", C, "d1", {"a": 9, "b": 1})
    assert box.overlap_count == 1
    assert box.visible(C, "d1") == {"a": 1, "b": 1}
    box.remove("A", C, "d1")
    assert box.overlap_count == 0
    assert box.visible(C, "d1") is box.published_fields("B", C, "d1")


# ---- model-based check against Meteor's algorithm -----------------------------------------------


def canonical(value: Any) -> str:
    # Independent of values_equal: JSON text distinguishes true from 1 and ignores key order.
    return json.dumps(value, sort_keys=True)


# existsIn, and key -> precedence list of [subscription, value], first publisher first.
MeteorDoc = tuple[set[str], dict[str, list[list[Any]]]]


class MeteorSessionView:
    """Meteor's SessionCollectionView/SessionDocumentView restated from DDP's documented rules.

    Per document: the set of subscriptions it exists in, and per key a precedence list of
    [subscription, value]; emits Meteor's messages (empty `changed` suppressed).
    """

    def __init__(self) -> None:
        self.docs: dict[tuple[str, str], MeteorDoc] = {}
        self.messages: list[tuple[Any, ...]] = []

    def _change_field(
        self,
        doc: MeteorDoc,
        sub: str,
        key: str,
        value: Any,
        collector: dict[str, Any],
        is_add: bool,
    ) -> None:
        data = doc[1]
        if key not in data:
            data[key] = [[sub, value]]
            collector[key] = value
            return
        entries = data[key]
        mine = None if is_add else next((e for e in entries if e[0] == sub), None)
        if mine is None:
            entries.append([sub, value])
        else:
            if mine is entries[0] and canonical(mine[1]) != canonical(value):
                collector[key] = value
            mine[1] = value

    def _clear_field(self, doc: MeteorDoc, sub: str, key: str, collector: dict[str, Any]) -> None:
        data = doc[1]
        entries = data.get(key)
        if entries is None:
            return
        removed_head = None
        for i, entry in enumerate(entries):
            if entry[0] == sub:
                if i == 0:
                    removed_head = entry
                del entries[i]
                break
        if not entries:
            del data[key]
            collector[key] = None  # stands for `undefined`
            collector.setdefault("__cleared__", []).append(key)
        elif removed_head is not None and canonical(removed_head[1]) != canonical(entries[0][1]):
            collector[key] = entries[0][1]

    def _emit_changed(self, coll: str, doc_id: str, collector: dict[str, Any]) -> None:
        cleared = collector.pop("__cleared__", [])
        fields = {k: v for k, v in collector.items() if k not in cleared}
        if fields or cleared:
            self.messages.append(("changed", coll, doc_id, canonical(fields), sorted(cleared)))

    def added(self, sub: str, coll: str, doc_id: str, fields: dict[str, Any]) -> None:
        doc = self.docs.get((coll, doc_id))
        is_new = doc is None
        if doc is None:
            doc = self.docs[(coll, doc_id)] = (set(), {})
        doc[0].add(sub)
        collector: dict[str, Any] = {}
        for key, value in fields.items():
            self._change_field(doc, sub, key, value, collector, True)
        if is_new:
            self.messages.append(("added", coll, doc_id, canonical(collector)))
        else:
            self._emit_changed(coll, doc_id, collector)

    def changed(self, sub: str, coll: str, doc_id: str, changes: dict[str, Any]) -> None:
        doc = self.docs[(coll, doc_id)]
        collector: dict[str, Any] = {}
        for key, value in changes.items():
            if value is CLEAR:
                self._clear_field(doc, sub, key, collector)
            else:
                self._change_field(doc, sub, key, value, collector, False)
        self._emit_changed(coll, doc_id, collector)

    def removed(self, sub: str, coll: str, doc_id: str) -> None:
        doc = self.docs[(coll, doc_id)]
        doc[0].discard(sub)
        if not doc[0]:
            del self.docs[(coll, doc_id)]
            self.messages.append(("removed", coll, doc_id))
            return
        collector: dict[str, Any] = {}
        for key in list(doc[1]):
            self._clear_field(doc, sub, key, collector)
        self._emit_changed(coll, doc_id, collector)

    def client_view(self) -> dict[tuple[str, str], str]:
        return {
            key: canonical({k: entries[0][1] for k, entries in doc[1].items()})
            for key, doc in self.docs.items()
        }


CLEAR = object()
SUBS = ["s1", "s2", "s3"]
COLLECTIONS = ["c1", "c2"]
DOC_IDS = ["d1", "d2"]
KEYS = ["a", "b", "c"]
VALUES = st.sampled_from([0, 1, 2, True, False, None, "x", [1], {"n": 1}, {"n": True}])
FIELDS = st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=3)


def normalize(op: Op) -> tuple[Any, ...]:
    if op[0] == "added":
        return ("added", op[1], op[2], canonical(dict(op[3])))
    if op[0] == "changed":
        return ("changed", op[1], op[2], canonical(dict(op[3])), sorted(op[4]))
    return op


def apply_to_client(store: dict[tuple[str, str], dict[str, Any]], op: Op) -> None:
    """Apply one op the way a strict client (Meteor's server-side DDP client) would."""
    key = (op[1], op[2])
    if op[0] == "added":
        assert key not in store, f"duplicate added {key}"
        store[key] = dict(op[3])
    elif op[0] == "changed":
        assert key in store, f"changed for a document the client lacks {key}"
        fields, cleared = op[3], op[4]
        assert fields or cleared, "empty changed"
        doc = store[key]
        for field, value in fields.items():
            assert field not in doc or not values_equal(doc[field], value), "no-op change sent"
            doc[field] = value
        for field in cleared:
            assert field in doc, "cleared a field the client lacks"
            del doc[field]
    else:
        assert key in store, f"removed for a document the client lacks {key}"
        del store[key]


class MergeBoxMachine(RuleBasedStateMachine):
    """Two boxes fed the same operations: one flushed after every operation (must equal
    Meteor's messages exactly), one flushed only by the `flush` rule (must converge to the
    same client view with valid, coalesced ops)."""

    @initialize()
    def setup(self) -> None:
        self.meteor = MeteorSessionView()
        self.eager = MergeBox()
        self.lazy = MergeBox()
        self.eager_client: dict[tuple[str, str], dict[str, Any]] = {}
        self.lazy_client: dict[tuple[str, str], dict[str, Any]] = {}
        self.published: dict[tuple[str, str, str], dict[str, Any]] = {}

    def _check_eager(self) -> None:
        ops = self.eager.flush()
        expected = self.meteor.messages
        self.meteor.messages = []
        assert [normalize(op) for op in ops] == expected
        for op in ops:
            apply_to_client(self.eager_client, op)

    @rule(
        sub=st.sampled_from(SUBS),
        coll=st.sampled_from(COLLECTIONS),
        doc_id=st.sampled_from(DOC_IDS),
        fields=FIELDS,
    )
    def add(self, sub: str, coll: str, doc_id: str, fields: dict[str, Any]) -> None:
        if (sub, coll, doc_id) in self.published:
            with pytest.raises(MergeBoxError):
                self.lazy.add(sub, coll, doc_id, fields)
            return
        self.published[(sub, coll, doc_id)] = fields
        self.meteor.added(sub, coll, doc_id, fields)
        self.eager.add(sub, coll, doc_id, fields)
        self.lazy.add(sub, coll, doc_id, fields)
        self._check_eager()

    @rule(
        sub=st.sampled_from(SUBS),
        coll=st.sampled_from(COLLECTIONS),
        doc_id=st.sampled_from(DOC_IDS),
        changes=FIELDS,
        cleared=st.sets(st.sampled_from(KEYS)),
        share=st.booleans(),
    )
    def change(
        self,
        sub: str,
        coll: str,
        doc_id: str,
        changes: dict[str, Any],
        cleared: set[str],
        share: bool,
    ) -> None:
        old = self.published.get((sub, coll, doc_id))
        if old is None:
            with pytest.raises(MergeBoxError):
                self.lazy.change(sub, coll, doc_id, changes)
            return
        cleared_keys = sorted(cleared - set(changes))
        new = {k: v for k, v in {**old, **changes}.items() if k not in cleared_keys}
        self.published[(sub, coll, doc_id)] = new
        self.meteor.changed(sub, coll, doc_id, {**changes, **dict.fromkeys(cleared_keys, CLEAR)})
        after = new if share else None
        self.eager.change(sub, coll, doc_id, changes, cleared_keys, fields_after=after)
        self.lazy.change(sub, coll, doc_id, changes, cleared_keys, fields_after=after)
        self._check_eager()

    @rule(
        sub=st.sampled_from(SUBS),
        coll=st.sampled_from(COLLECTIONS),
        doc_id=st.sampled_from(DOC_IDS),
    )
    def remove(self, sub: str, coll: str, doc_id: str) -> None:
        if self.published.pop((sub, coll, doc_id), None) is None:
            with pytest.raises(MergeBoxError):
                self.lazy.remove(sub, coll, doc_id)
            return
        self.meteor.removed(sub, coll, doc_id)
        self.eager.remove(sub, coll, doc_id)
        self.lazy.remove(sub, coll, doc_id)
        self._check_eager()

    @rule(sub=st.sampled_from(SUBS))
    def remove_subscription(self, sub: str) -> None:
        # Meteor's _removeAllDocuments: rule 5 for each document; order does not matter for
        # the final view, and the eager box must still match message for message.
        for key in sorted(k for k in self.published if k[0] == sub):
            del self.published[key]
            self.meteor.removed(*key)
            self.eager.remove(*key)
        self.lazy.remove_subscription(sub)
        self._check_eager()

    @rule(
        sub=st.sampled_from(SUBS),
        coll=st.sampled_from(COLLECTIONS),
        ids=st.lists(st.sampled_from(DOC_IDS), min_size=1, unique=True),
        fields=st.lists(FIELDS, min_size=len(DOC_IDS), max_size=len(DOC_IDS)),
    )
    def add_many(self, sub: str, coll: str, ids: list[str],
                 fields: list[dict[str, Any]]) -> None:
        """A subscription's initial documents in bulk (a new subscription's snapshot): on a
        fresh collection they become a run (``MergeBox._runs``)."""
        if any((sub, coll, doc_id) in self.published for doc_id in ids):
            return  # add_many's contract: documents new to the subscription
        documents = list(zip(ids, fields, strict=False))
        for doc_id, doc_fields in documents:
            self.published[(sub, coll, doc_id)] = doc_fields
            self.meteor.added(sub, coll, doc_id, doc_fields)
        self.eager.add_many(sub, coll, documents)
        # The engine's form: a dict, vouched free of `_id` fields when it is.
        self.lazy.add_many(sub, coll, dict(documents),
                           no_id_field=not any("_id" in f for _, f in documents))
        self._check_eager()

    @precondition(lambda self: self.lazy.has_pending)
    @rule(limit=st.integers(min_value=1, max_value=3))
    def flush_in_pieces(self, limit: int) -> None:
        """What a client's flush does: new documents in pieces (``settle_fresh``), else
        settled transitions, ``limit`` documents at a time, until nothing is pending."""
        ops: list[Op] = []
        while self.lazy.has_pending:
            before = self.lazy.pending_count
            fresh = self.lazy.settle_fresh(limit)
            if fresh is not None:
                collection, documents = fresh
                ops.extend(("added", collection, doc_id, doc_fields)
                           for doc_id, doc_fields in documents)
            else:
                ops.extend(op for op in map(transition_op, self.lazy.settle(limit))
                           if op is not None)
            assert self.lazy.pending_count < before
        touched = [(op[1], op[2]) for op in ops]
        assert len(touched) == len(set(touched)), "more than one op per document per flush"
        for op in ops:
            apply_to_client(self.lazy_client, op)
        assert {k: canonical(v) for k, v in self.lazy_client.items()} == self.meteor.client_view()

    @precondition(lambda self: self.lazy.has_pending)
    @rule()
    def flush(self) -> None:
        ops = self.lazy.flush()
        touched = [(op[1], op[2]) for op in ops]
        assert len(touched) == len(set(touched)), "more than one op per document per flush"
        for op in ops:
            apply_to_client(self.lazy_client, op)
        assert {k: canonical(v) for k, v in self.lazy_client.items()} == self.meteor.client_view()
        assert not self.lazy.has_pending

    @invariant()
    def eager_client_matches_meteor(self) -> None:
        assert {k: canonical(v) for k, v in self.eager_client.items()} == (
            self.meteor.client_view()
        )
        view = self.lazy.view()
        assert {
            (coll, doc_id): canonical(fields)
            for coll, docs in view.items()
            for doc_id, fields in docs.items()
        } == self.meteor.client_view()
        assert self.lazy.document_count == len(self.meteor.docs)


MergeBoxMachine.TestCase.settings = settings(
    max_examples=250, stateful_step_count=40, deadline=None
)
TestMergeBoxAgainstMeteor = MergeBoxMachine.TestCase


def test_flush_with_a_limit_settles_the_oldest_documents_first() -> None:
    box = MergeBox()
    for i in range(5):
        box.add("s", "c", str(i), {"n": i})
    first = box.flush(limit=2)
    assert [op[2] for op in first] == ["0", "1"]
    assert box.has_pending and box.pending_count == 3
    box.change("s", "c", "0", {"n": 10})  # a settled document changes again
    rest = box.flush(limit=10)
    assert [(op[0], op[2]) for op in rest] == [
        ("added", "2"), ("added", "3"), ("added", "4"), ("changed", "0")]
    assert not box.has_pending


def test_a_large_collection_does_not_starve_another_one() -> None:
    box = MergeBox()
    box.add_many("s", "big", [(str(i), {"n": i}) for i in range(5)])
    first = box.flush(limit=2)
    assert [op[2] for op in first] == ["0", "1"]
    box.add("t", "small", "x", {"n": 0})  # dirty after the big one's first piece
    for i in range(5, 9):
        box.add("s", "big", str(i), {"n": i})
    # A partly settled collection goes to the back of the line: whatever else is dirty waits
    # at most one more piece, however much the big one keeps growing.
    assert [(op[1], op[2]) for op in box.flush(limit=2)] == [("big", "2"), ("big", "3")]
    assert [(op[1], op[2]) for op in box.flush(limit=2)] == [("small", "x"), ("big", "4")]
    assert [op[2] for op in box.flush(limit=10)] == ["5", "6", "7", "8"]
    assert not box.has_pending and box.pending_count == 0


# ---- bulk add and raw transitions ------------------------------------------------------------


def test_add_many_matches_one_add_per_document() -> None:
    docs = [(str(n), {"n": n}) for n in range(5)]
    one_by_one, bulk = MergeBox(), MergeBox()
    for doc_id, fields in docs:
        one_by_one.add("A", C, doc_id, fields)
    bulk.add_many("A", C, docs)
    assert bulk.flush() == one_by_one.flush()
    assert bulk.view() == one_by_one.view()
    # Not the first publisher any more: the per-document path (precedence) applies.
    bulk.add_many("B", C, [("1", {"n": 1, "m": 2}), ("9", {"n": 9})])
    assert bulk.flush() == [changed("1", {"m": 2}), added("9", {"n": 9})]


def test_add_many_keeps_what_a_dirty_document_had() -> None:
    box = MergeBox()
    box.add("A", C, "1", {"n": 1})
    box.flush()
    box.remove("A", C, "1")  # dirty: the client has {"n": 1}
    box.add_many("B", C, [("1", {"n": 2}), ("2", {"n": 3})])
    assert box.flush() == [changed("1", {"n": 2}), added("2", {"n": 3})]


def test_settle_reports_shared_mappings_and_skips_unmoved_documents() -> None:
    box = MergeBox()
    before, after = {"n": 1}, {"n": 2}
    box.add("A", C, "1", before)
    box.add("A", C, "2", {"n": 0})
    assert [t[:3] for t in box.settle()] == [(C, "1", None), (C, "2", None)]
    box.change("A", C, "1", {"n": 2}, fields_after=after)
    box.add("A", C, "3", {"n": 3})
    box.remove("A", C, "3")  # added and removed between flushes: nothing moved
    assert box.settle() == [(C, "1", before, after)]
    assert box.settle() == []


def test_settle_fresh_takes_the_oldest_new_documents_and_settle_the_rest() -> None:
    def transitions(box: MergeBox) -> list[Transition]:
        out: list[Transition] = []
        while box.has_pending:
            fresh = box.settle_fresh(2)
            if fresh is None:
                out += box.settle(2)
            else:
                out += [(fresh[0], doc_id, None, fields) for doc_id, fields in fresh[1]]
        return out

    def scenario(box: MergeBox) -> None:
        box.add_many("s", "c", [(str(i), {"n": i}) for i in range(5)])
        box.change("s", "c", "3", {"n": 30})  # still new to the client: added with 30
        box.remove("s", "c", "4")  # never sent: nothing
        box.add("t", "c", "1", {"m": 1})  # a second holder: the general path
        box.add("s", "d", "x", {"_id": "x", "n": 0})  # `_id` in fields: the general path
        box.add("s", "e", "y", {"n": 0})

    fast, slow = MergeBox(), MergeBox()
    scenario(fast)
    scenario(slow)
    got = transitions(fast)
    expected = slow.settle()
    assert sorted(got, key=repr) == sorted(expected, key=repr)
    assert fast.view() == slow.view()
    assert fast.settle_fresh(10) is None  # nothing dirty
    fast.change("s", "c", "0", {"n": 7})  # the client has it now: not fresh
    assert fast.settle_fresh(10) is None
    assert [t[1] for t in fast.settle()] == ["0"]


def _settled_fresh(box: MergeBox, limit: int) -> list[Transition]:
    out: list[Transition] = []
    while box.has_pending:
        fresh = box.settle_fresh(limit)
        if fresh is None:
            out += box.settle(limit)
        else:
            out += [(fresh[0], doc_id, None, fields) for doc_id, fields in fresh[1]]
    return out


def _spoil_middle(box: MergeBox, how: str) -> None:
    """Make document "3" of the fresh documents 0..7 (sub "s", collection C) not fresh."""
    if how == "overlapped":
        box.add("t", C, "3", {"m": 1})
    elif how == "removed":
        box.remove("s", C, "3")  # dirty, but gone from the view
    elif how == "has _id":
        box.remove("s", C, "3")
        box.add("s", C, "3", {"_id": "3", "n": 3})
    elif how == "client has it":
        box.reset()
        box.add("s", C, "3", {"n": 3})
        box.settle()  # the client has 3 now
        for i in (0, 1, 2):
            box.add("s", C, str(i), {"n": i})
        box.change("s", C, "3", {"n": 33})  # dirty with what the client had
        for i in (4, 5, 6, 7):
            box.add("s", C, str(i), {"n": i})
    elif how == "sole holder is another sub":
        box.remove("s", C, "3")
        box.add("u", C, "3", {"n": 3})


@pytest.mark.parametrize("how", ["none", "overlapped", "removed", "has _id", "client has it",
                                 "sole holder is another sub"])
@pytest.mark.parametrize("limit", [1, 3, 5, 8, 100])
def test_settle_fresh_fast_path_and_fallback_equal_settle(how: str, limit: int) -> None:
    def scenario(box: MergeBox) -> None:
        box.add_many("s", C, [(str(i), {"n": i}) for i in range(8)])
        _spoil_middle(box, how)

    fast, slow = MergeBox(), MergeBox()
    scenario(fast)
    scenario(slow)
    assert _settled_fresh(fast, limit) == slow.settle()
    assert not fast.has_pending
    assert fast.view() == slow.view()


def test_settle_fresh_checks_a_whole_piece_at_once_or_returns_the_valid_prefix() -> None:
    box = MergeBox()
    box.add_many("s", C, [(str(i), {"n": i}) for i in range(8)])
    dirty, view = box._end_run(C), box._views[C]  # dirty entries, as after any other op
    # all fresh: the fast path answers, and takes the piece off the dirty list
    assert box._settle_fresh_piece(C, dirty, view, 3) == [(str(i), {"n": i}) for i in range(3)]
    assert list(box._dirty[C]) == [str(i) for i in range(3, 8)]
    box.add("t", C, "5", {"m": 1})  # 5 is overlapped now: the fast path declines ...
    assert box._settle_fresh_piece(C, dirty, view, 4) is None
    assert list(box._dirty[C]) == [str(i) for i in range(3, 8)]  # ... touching nothing
    fresh = box.settle_fresh(4)  # and the loop returns the prefix before it
    assert fresh == (C, [("3", {"n": 3}), ("4", {"n": 4})])
    assert box.settle_fresh(4) is None  # 5 is first now
    assert box.settle_fresh(0) is None
    fresh_all = MergeBox()
    fresh_all.add_many("s", C, [("a", {"n": 1}), ("b", {"n": 2})])
    assert fresh_all.settle_fresh(2) == (C, [("a", {"n": 1}), ("b", {"n": 2})])
    assert not fresh_all.has_pending  # the whole collection went


@pytest.mark.parametrize("op", ["change", "remove", "overlap", "add", "remove all", "settle",
                                "reset", "other collection"])
def test_a_bulk_run_interrupted_after_a_piece_settles_like_settle(op: str) -> None:
    """A new subscription's bulk-added documents go out as a run (``_runs``); any other
    operation on the collection ends the run, and what is left settles exactly as
    :meth:`settle` would settle it."""
    def scenario(box: MergeBox, first_piece: Any) -> list[Transition]:
        box.add_many("s", C, [(str(i), {"n": i}) for i in range(10)])
        out = first_piece(box)
        if op == "change":
            box.change("s", C, "1", {"n": 10})  # sent already: changed
            box.change("s", C, "7", {"n": 70})  # not yet: added with 70
        elif op == "remove":
            box.remove("s", C, "2")  # sent: removed
            box.remove("s", C, "8")  # never sent: nothing
        elif op == "overlap":
            box.add("t", C, "6", {"m": 6})
        elif op == "add":
            box.add("s", C, "new", {"n": -1})
        elif op == "remove all":
            box.remove_subscription("s")
        elif op == "settle":
            out += box.settle(2)
        elif op == "reset":
            box.reset()
            box.add_many("s", C, [("a", {"n": 1})])
        else:
            box.add("s", "other", "x", {"n": 0})
        return out

    def fresh_piece(box: MergeBox) -> list[Transition]:
        fresh = box.settle_fresh(4)
        assert fresh is not None and C in box._runs
        assert box.pending_count == 6 and box.has_pending  # the run's rest counts
        return [(C, doc_id, None, fields) for doc_id, fields in fresh[1]]

    fast, slow = MergeBox(), MergeBox()
    got = scenario(fast, fresh_piece)
    expected = scenario(slow, lambda box: box.settle(4))
    assert got == expected  # the same first piece
    assert fast.pending_count == slow.pending_count
    assert sorted(_settled_fresh(fast, 3), key=repr) == sorted(slow.settle(), key=repr)
    assert fast.view() == slow.view()
    assert not fast.has_pending and not fast._runs


def test_a_bulk_run_with_an_id_field_takes_the_general_path() -> None:
    box = MergeBox()
    box.add_many("s", C, [("1", {"n": 1}), ("2", {"_id": "2", "n": 2})])
    assert not box._runs
    assert _settled_fresh(box, 10) == [(C, "1", None, {"n": 1}),
                                       (C, "2", None, {"_id": "2", "n": 2})]
