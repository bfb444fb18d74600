"""The partition map and the renaming of partitions' changes (pure; the engine's use of them
against a real database: tests/test_livedata_partitions.py)."""

from __future__ import annotations

from cdcddp.publish.partitions import PartitionMap, StreamedTables, as_change_of, as_relation_of
from cdcddp.wal.events import Delete, Insert, Relation, Truncate, Update

ROOT = ("public", "events")
EU = ("public", "events_eu")  # a partitioned partition of ROOT
EU_1 = ("public", "events_eu_1", 101)
EU_2 = ("public", "events_eu_2", 102)
US = ("public", "events_us", 103)


def test_each_leaf_maps_to_every_followed_table_it_is_part_of() -> None:
    partitions = PartitionMap()
    assert partitions.set_leaves(ROOT, [EU_1, EU_2, US])
    assert partitions.set_leaves(EU, [EU_1, EU_2])
    assert not partitions.set_leaves(ROOT, [US, EU_2, EU_1])  # the same tree
    assert partitions.ancestors == {EU_1[:2]: (ROOT, EU), EU_2[:2]: (ROOT, EU), US[:2]: (ROOT,)}
    assert partitions.roots() == [ROOT, EU] and EU in partitions and US not in partitions

    assert partitions.set_leaves(ROOT, [EU_1, EU_2])  # US detached
    assert partitions.set_leaves(EU, [EU_1])  # EU_2 dropped
    assert partitions.ancestors == {EU_1[:2]: (ROOT, EU), EU_2[:2]: (ROOT,)}
    assert partitions.set_leaves(ROOT, [])
    assert partitions.ancestors == {EU_1[:2]: (EU,)}
    assert partitions.leaves(ROOT) == frozenset() and partitions.leaves(US[:2]) == frozenset()


def test_a_partition_made_again_under_its_name_or_renamed_changes_the_tree() -> None:
    partitions = PartitionMap()
    partitions.set_leaves(ROOT, [EU_1, US])
    assert partitions.set_leaves(ROOT, [(*EU_1[:2], 201), US])  # another oid
    assert partitions.ancestors == {EU_1[:2]: (ROOT,), US[:2]: (ROOT,)}
    assert partitions.set_leaves(ROOT, [("public", "events_eu_old", 201), US])  # renamed
    assert partitions.ancestors == {("public", "events_eu_old"): (ROOT,), US[:2]: (ROOT,)}


def test_changes_to_a_partition_become_changes_to_its_table() -> None:
    row, key = {"region": "eu", "id": 1, "title": "t"}, {"region": "eu", "id": 1}
    pk = ("region", "id")
    for change in (Insert(7, 70, "public", "events_eu_1", row, pk),
                   Update(7, 71, "public", "events_eu_1", row, key, pk),
                   Delete(7, 72, "public", "events_eu_1", key, pk)):
        renamed = as_change_of(change, ROOT)
        assert type(renamed) is type(change)
        assert (renamed.schema, renamed.table) == ROOT
        assert {**vars_of(renamed), "table": "events_eu_1"} == vars_of(change)
    truncate = as_change_of(Truncate(7, 73, "public", "events_eu_1"), EU)
    assert truncate == Truncate(7, 73, "public", "events_eu", partition=EU_1[:2])
    shape = Relation(7, "public", "events_eu_1", (("id", 23),), True, None, ("title",))
    assert as_relation_of(shape, ROOT) == Relation(7, "public", "events", (("id", 23),), True,
                                                   None, ("title",))


def vars_of(change: object) -> dict[str, object]:
    return {name: getattr(change, name) for name in change.__slots__  # type: ignore[attr-defined]
            if name != "schema"}


def test_lookups_older_than_a_tables_following_are_told() -> None:
    streamed = StreamedTables()
    streamed.add(("public", "items"), None)
    assert ("public", "items") in streamed and streamed.follows == 0
    before = streamed.follows
    streamed.add(ROOT, [EU_1, US])
    assert streamed.followed_since([ROOT], before)
    assert not streamed.followed_since([("public", "items")], before)
    assert not streamed.followed_since([ROOT], streamed.follows)
    streamed.add(ROOT, [EU_1])  # followed already: the engine's polls keep it current
    assert streamed.partitions.leaves(ROOT) == {EU_1, US} and streamed.follows == 1
    streamed.discard(ROOT)
    assert ROOT not in streamed and ROOT in streamed.partitions
