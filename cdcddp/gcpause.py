"""Pausing the cyclic garbage collector while building large, acyclic structures.

A snapshot of 100,000 rows allocates a few hundred thousand container objects that all stay
alive (keys, documents, merge-box entries). CPython runs a collection every 700 allocations
and a full one each time the surviving heap grew by a quarter, so building such a result
spends about as long in the collector as in the work itself, finding nothing to free (the
structures hold no reference cycles). Building them with collection paused and collecting
(once, incrementally by generation) afterwards costs one pass instead of many.
"""

from __future__ import annotations

import gc
from types import TracebackType


class gc_paused:  # lower case: used like a function, ``with gc_paused():``
    """Disable automatic collection for the (synchronous) block; nested uses and an already
    disabled collector are left alone. Never hold it across an ``await``. (A class, not a
    generator: it wraps every client flush, where contextlib's overhead shows.)"""

    __slots__ = ("_paused",)

    def __enter__(self) -> None:
        self._paused = gc.isenabled()
        if self._paused:
            gc.disable()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._paused:
            gc.enable()


# Results at least this large are promoted after they are built (see promote_young_objects).
LARGE_RESULT_ROWS = 5_000


def promote_young_objects() -> None:
    """Move every object the collector tracks into its oldest generation, without scanning.

    Call after building a large, long-lived result: otherwise the next young collections
    each walk all of it (a 100,000-row snapshot costs tens of milliseconds per walk) only to
    promote it. ``freeze`` then ``unfreeze`` moves the generation lists in constant time; the
    next full collection examines these objects like any other old ones, so young garbage
    cycles swept along are still freed then, only later.
    """
    gc.freeze()
    gc.unfreeze()


class Promotion:
    """Promotes the young generation (:func:`promote_young_objects`) once every ``every``
    long-lived things are built one after another (connections set up, observers created).

    In a storm of them (clients reconnecting after a deploy) young and middle collections
    otherwise walk everything built so far again and again, finding nothing to free: with
    4,000 connections set up one after another a middle collection took 60-100 ms, 14 % of
    the server's time. Outside storms it promotes rarely, and only what is young then.
    """

    __slots__ = ("_built", "every")

    def __init__(self, every: int) -> None:
        self.every = every
        self._built = 0

    def built(self, count: int = 1) -> None:
        self._built += count
        if self._built >= self.every:
            self._built = 0
            promote_young_objects()


# Shared by the server (connections) and the live-data engine (observers): one count of what
# the process builds to keep.
storm_promotion = Promotion(256)
