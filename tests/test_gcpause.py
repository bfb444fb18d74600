"""Collector helpers used while building large results."""

from __future__ import annotations

import gc

from cdcddp.gcpause import Promotion, gc_paused, promote_young_objects


def test_promoting_moves_young_objects_to_the_oldest_generation_without_freezing() -> None:
    with gc_paused():
        built = [[i] for i in range(1000)]  # tracked containers, young
        promote_young_objects()
        assert gc.get_count()[0] == 0
        oldest = {id(obj) for obj in gc.get_objects(generation=2)}
    assert all(id(item) in oldest for item in built)
    assert gc.get_freeze_count() == 0  # nothing stays exempt from collection
    assert gc.isenabled()


def test_garbage_cycles_promoted_along_are_still_collected() -> None:
    class Node:
        pass

    with gc_paused():
        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        marker = id(a)
        del a, b
        promote_young_objects()
    gc.collect()
    assert all(id(obj) != marker for obj in gc.get_objects() if isinstance(obj, Node))


def test_promotion_promotes_once_every_so_many_built() -> None:
    promotion = Promotion(3)
    with gc_paused():
        promotion.built(2)
        young = [[i] for i in range(100)]
        assert any(id(obj) == id(young[0]) for obj in gc.get_objects(generation=0))
        promotion.built()  # the third: everything young moves to the oldest generation
        oldest = {id(obj) for obj in gc.get_objects(generation=2)}
        assert all(id(item) in oldest for item in young)
        later = [[i] for i in range(100)]
        promotion.built(2)  # counting starts again: not yet
        assert any(id(obj) == id(later[0]) for obj in gc.get_objects(generation=0))
