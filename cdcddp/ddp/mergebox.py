"""The per-client merge box: Meteor's SERVER_MERGE semantics with coalesced, pull-based output.

For each collection and document id a client can see, the box knows which of the client's
subscriptions publish it and with which fields. The client is shown the union:

* a document exists for the client while at least one subscription publishes it;
* a field's visible value comes from the subscription that has published that field the
  longest (Meteor's precedence list: a subscription that starts publishing a field that is
  already visible is appended to the end, so the first publisher wins; when it stops, the next
  one in line is revealed);
* a field disappears (``cleared``) when no subscription publishes it any more.

Output is not pushed per operation. Operations only mark documents dirty, remembering what the
client had at the last flush; :meth:`MergeBox.flush` then diffs "what the client has" against
"what it should have" and returns the minimal ops. Flushing after every operation yields
exactly the messages Meteor would send; flushing less often coalesces (add+change → one
``added``, add+remove → nothing, change and change back → nothing), so a slow client costs at
most one pending entry per document in its view, never a queue that grows with the change rate.

Memory: field mappings are *shared, immutable* objects owned by whoever publishes them (one
observer serving many clients). The box keeps references, never copies. A document held by a
single subscription costs two dict entries per client (one in the client view, one in the
subscription's published set); precedence lists exist only while subscriptions overlap on a
document, and disappear when the overlap ends.

The box is pure: no I/O, no clocks, no encoding. Raising :class:`MergeBoxError` means the
publisher broke its contract (added twice, changed or removed something it does not publish).
"""

from __future__ import annotations

import math
import operator
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from itertools import islice, repeat
from typing import Any, Literal, TypeAlias

__all__ = [
    "AddedOp",
    "ChangedOp",
    "Fields",
    "MergeBox",
    "MergeBoxError",
    "Op",
    "RemovedOp",
    "SubId",
    "Transition",
    "diff_visible",
    "transition_op",
    "values_equal",
]

# Field mappings are shared between clients and must never be mutated once handed to a box.
Fields: TypeAlias = Mapping[str, Any]
SubId: TypeAlias = Hashable

AddedOp: TypeAlias = tuple[Literal["added"], str, str, Fields]
ChangedOp: TypeAlias = tuple[Literal["changed"], str, str, Fields, tuple[str, ...]]
RemovedOp: TypeAlias = tuple[Literal["removed"], str, str]
Op: TypeAlias = AddedOp | ChangedOp | RemovedOp
# (collection, doc id, what the client has, what it should have); None: no such document.
Transition: TypeAlias = tuple[str, str, "Fields | None", "Fields | None"]

# Meteor's publish API ignores `_id` inside fields; it travels as the message's `id`.
_ID_KEY = "_id"
_MISSING: Any = object()
_NO_VIEW: dict[str, Any] = {}  # read-only stand-in for a collection the client has no view of
_FIRST = operator.itemgetter(0)


class MergeBoxError(ValueError):
    """A publisher violated the merge box contract; this is a bug in the caller."""


def values_equal(a: Any, b: Any) -> bool:
    """EJSON equality: what decides whether a client would see a different value.

    Python's ``==`` says ``True == 1`` and ``{"a": 1} == {"a": True}``; JavaScript clients
    distinguish booleans from numbers, so they must not be treated as unchanged. Numbers compare
    by value (``1 == 1.0`` is one JavaScript number), NaN equals NaN (as in ``EJSON.equals``),
    objects compare regardless of key order.
    """
    if a is b:
        return True
    type_a, type_b = type(a), type(b)
    if type_a is type_b and (type_a is str or type_a is int):
        return bool(a == b)  # the common column values, before the slower checks below
    if type_a is bool or type_b is bool:
        return type_a is type_b and a == b
    if type_a in (int, float) and type_b in (int, float):
        return a == b or (type_a is float and type_b is float and math.isnan(a) and math.isnan(b))
    if isinstance(a, Mapping):
        if not isinstance(b, Mapping) or len(a) != len(b):
            return False
        for key, value in a.items():
            other = b.get(key, _MISSING)
            if other is _MISSING or not values_equal(value, other):
                return False
        return True
    if type_a in (list, tuple):
        if type_b not in (list, tuple) or len(a) != len(b):
            return False
        return all(values_equal(x, y) for x, y in zip(a, b, strict=True))
    return type_a is type_b and bool(a == b)


class _Overlap:
    """A document published by two or more of the client's subscriptions.

    ``holders`` is Meteor's ``existsIn``; ``precedence[key]`` lists the holders that publish
    ``key``, first publisher first; the visible value is the head's. Values are not stored here:
    they are read from each holder's (shared) field mapping.
    """

    __slots__ = ("holders", "precedence")

    def __init__(self, sole_holder: SubId, sole_fields: Fields) -> None:
        self.holders: list[SubId] = [sole_holder]
        self.precedence: dict[str, list[SubId]] = {key: [sole_holder] for key in sole_fields}


# A client's view entry: the only holder's subscription id, or an _Overlap.
_ViewEntry: TypeAlias = SubId | _Overlap


def _apply_change(old: Fields, changed: Fields, cleared: Iterable[str]) -> dict[str, Any]:
    new = {**old, **changed}
    for key in cleared:
        new.pop(key, None)
    return new


def diff_visible(before: Fields, after: Fields) -> tuple[dict[str, Any], tuple[str, ...]]:
    """``changed`` fields and ``cleared`` names that take a client from ``before`` to
    ``after`` (``_id`` never travels in fields)."""
    # Runs per changed document per flush: values of the same plain type that compare equal
    # are equal for the client too, without a call (values_equal decides the rest).
    fields = {
        key: value
        for key, value in after.items()
        if (old := before.get(key, _MISSING)) is not value
        and (type(old) is not type(value) or type(value) not in _PLAIN_EQUALITY or old != value)
        and key != _ID_KEY and not values_equal(old, value)
    }
    if before.keys() == after.keys():
        return fields, ()
    cleared = tuple(key for key in before if key not in after and key != _ID_KEY)
    return fields, cleared


_PLAIN_EQUALITY = frozenset({str, int, float})  # types where == is the client's equality


def _without_id(fields: Fields) -> Fields:
    if _ID_KEY in fields:
        return {key: value for key, value in fields.items() if key != _ID_KEY}
    return fields


def transition_op(transition: Transition) -> Op | None:
    """The message for one settled document (None: the client already has it right)."""
    collection, doc_id, before, after = transition
    if before is None:
        return None if after is None else ("added", collection, doc_id, _without_id(after))
    if after is None:
        return ("removed", collection, doc_id)
    if before is after:
        return None
    fields, cleared = diff_visible(before, after)
    if fields or cleared:
        return ("changed", collection, doc_id, fields, cleared)
    return None


class _Run:
    """The rest of a new subscription's bulk-added documents in one collection, (doc id,
    fields) in the order they were added: all new to the client, all held by that one
    subscription. It stands in for their dirty entries (the collection's entry in
    ``MergeBox._dirty`` stays empty, keeping its place in line) until any other operation on
    the collection writes them out (``MergeBox._end_run``); a large initial result is then
    handed to the client in pieces without a dirty entry per document."""

    __slots__ = ("items", "left")

    def __init__(self, items: Iterator[tuple[str, Fields]], left: int) -> None:
        self.items = items
        self.left = left


class MergeBox:
    """One client's merge box. See the module docstring for the rules.

    Subscription ids are any hashable values (the session's sub ids, or handles for universal
    publications). Collections and document ids are strings (ids already stringified).
    """

    __slots__ = ("_dirty", "_published", "_runs", "_views")

    def __init__(self) -> None:
        # collection -> doc id -> sole holder's sub id, or _Overlap.
        self._views: dict[str, dict[str, _ViewEntry]] = {}
        # sub id -> collection -> doc id -> that subscription's fields for the doc.
        self._published: dict[SubId, dict[str, dict[str, Fields]]] = {}
        # collection -> doc id -> what the client had at the last flush (None: nothing).
        # Collections in the order they first got dirty, documents likewise within one.
        self._dirty: dict[str, dict[str, Fields | None]] = {}
        # collection -> its pending documents as a _Run (its _dirty entry is then empty).
        self._runs: dict[str, _Run] = {}

    # ---- publisher operations -------------------------------------------------------------

    def add(self, sub_id: SubId, collection: str, doc_id: str, fields: Fields) -> None:
        """Subscription ``sub_id`` starts publishing ``doc_id`` with ``fields``."""
        sub_docs = self._published.setdefault(sub_id, {}).setdefault(collection, {})
        if doc_id in sub_docs:
            raise MergeBoxError(f"{sub_id!r} already publishes {collection}/{doc_id}")
        collection_view = self._views.setdefault(collection, {})
        entry = collection_view.get(doc_id, _MISSING)
        dirty = self._dirty_in(collection)
        if doc_id not in dirty:
            dirty[doc_id] = None if entry is _MISSING else self.visible(collection, doc_id)
        if entry is _MISSING:
            collection_view[doc_id] = sub_id
        else:
            if type(entry) is not _Overlap:
                entry = _Overlap(entry, self._published[entry][collection][doc_id])
                collection_view[doc_id] = entry
            entry.holders.append(sub_id)
            for key in fields:
                # Joining an existing key's list at the end: the earlier publisher keeps it.
                entry.precedence.setdefault(key, []).append(sub_id)
        sub_docs[doc_id] = fields

    def add_many(self, sub_id: SubId, collection: str,
                 documents: Mapping[str, Fields] | Iterable[tuple[str, Fields]], *,
                 no_id_field: bool = False) -> None:
        """:meth:`add` for each document (``doc_id -> fields``, or ``(doc_id, fields)``
        pairs); a subscription's first documents in a collection nobody else publishes to
        this client take a bulk path (a large initial result costs a few C-level dict
        operations per document; from a dict, whose copy is cheaper still).

        ``no_id_field``: the caller vouches that no fields mapping has an ``_id`` key
        (documents rendered from a cursor, which cannot publish one), sparing the check."""
        sub_docs = self._published.get(sub_id, {}).get(collection)
        if sub_docs or self._views.get(collection):
            pairs = documents.items() if isinstance(documents, Mapping) else documents
            for doc_id, fields in pairs:
                self.add(sub_id, collection, doc_id, fields)
            return
        new_docs = dict(documents)
        if not new_docs:
            return
        self._published.setdefault(sub_id, {})[collection] = new_docs
        self._views[collection] = dict.fromkeys(new_docs, sub_id)
        # The client has none of them; a document already dirty keeps what it had then.
        dirty = self._dirty.get(collection)
        if dirty:
            for doc_id in new_docs:
                dirty.setdefault(doc_id, None)
        elif not no_id_field and any(map(operator.contains, new_docs.values(),
                                         repeat(_ID_KEY))):
            self._dirty[collection] = dict.fromkeys(new_docs)  # an `_id` to strip: no run
        else:
            self._dirty[collection] = {}
            self._runs[collection] = _Run(iter(new_docs.items()), len(new_docs))

    def change(
        self,
        sub_id: SubId,
        collection: str,
        doc_id: str,
        changed: Fields,
        cleared: Iterable[str] = (),
        *,
        fields_after: Fields | None = None,
    ) -> None:
        """Subscription ``sub_id`` changes fields of a document it publishes.

        ``cleared`` keys are applied after ``changed``. Pass ``fields_after`` (the publisher's
        new, shared mapping, equal to the old fields with the change applied) so that every
        client references it instead of building its own merged copy.
        """
        by_collection = self._published.get(sub_id)
        sub_docs = by_collection.get(collection) if by_collection is not None else None
        old = sub_docs.get(doc_id) if sub_docs is not None else None
        if old is None:
            raise MergeBoxError(f"{sub_id!r} does not publish {collection}/{doc_id}")
        if type(cleared) is not tuple:
            cleared = tuple(cleared)
        if not changed and not cleared:
            return
        entry = self._views[collection][doc_id]
        dirty = self._dirty_in(collection)
        if doc_id not in dirty:
            # A sole holder's mapping is exactly what the client sees.
            dirty[doc_id] = self.visible(collection, doc_id) if type(entry) is _Overlap else old
        if type(entry) is _Overlap:
            precedence = entry.precedence
            for key in changed:
                holders = precedence.get(key)
                if holders is None:
                    precedence[key] = [sub_id]
                elif sub_id not in holders:
                    holders.append(sub_id)
            for key in cleared:
                holders = precedence.get(key)
                if holders is not None and sub_id in holders:
                    holders.remove(sub_id)
                    if not holders:
                        del precedence[key]
        new = fields_after if fields_after is not None else _apply_change(old, changed, cleared)
        sub_docs[doc_id] = new  # type: ignore[index]

    def remove(self, sub_id: SubId, collection: str, doc_id: str) -> None:
        """Subscription ``sub_id`` stops publishing ``doc_id``."""
        by_collection = self._published.get(sub_id, {})
        sub_docs = by_collection.get(collection)
        if sub_docs is None or doc_id not in sub_docs:
            raise MergeBoxError(f"{sub_id!r} does not publish {collection}/{doc_id}")
        self._mark_dirty(collection, doc_id)
        del sub_docs[doc_id]
        if not sub_docs:
            del by_collection[collection]
            if not by_collection:
                del self._published[sub_id]
        collection_view = self._views[collection]
        entry = collection_view[doc_id]
        if type(entry) is not _Overlap:
            del collection_view[doc_id]
            if not collection_view:
                del self._views[collection]
            return
        entry.holders.remove(sub_id)
        precedence = entry.precedence
        for key in [key for key, holders in precedence.items() if sub_id in holders]:
            holders = precedence[key]
            holders.remove(sub_id)
            if not holders:
                del precedence[key]
        if len(entry.holders) == 1:
            # The remaining holder's mapping is now exactly the visible document.
            collection_view[doc_id] = entry.holders[0]

    def remove_subscription(self, sub_id: SubId) -> None:
        """Everything ``sub_id`` publishes goes (unsub, sub error, or a rerun's teardown)."""
        by_collection = self._published.get(sub_id)
        if by_collection is None:
            return
        for collection, sub_docs in list(by_collection.items()):
            for doc_id in list(sub_docs):
                self.remove(sub_id, collection, doc_id)

    def reset(self) -> None:
        """Forget everything, sending nothing: the client is gone (or starts from empty)."""
        self._views.clear()
        self._published.clear()
        self._dirty.clear()
        self._runs.clear()

    # ---- output -------------------------------------------------------------------------------

    def flush(self, limit: int | None = None) -> list[Op]:
        """The minimal ops that bring the client from what it has to what it should have.

        ``limit`` bounds how many documents one call settles (oldest changes first); the rest
        stay dirty for the next call, so a huge initial result goes out in socket-sized pieces
        instead of one unbounded burst.

        ``added`` carries the publisher's mapping itself when it has no ``_id`` key: callers
        must treat every ``fields`` in the output as read-only.
        """
        ops: list[Op] = []
        for transition in self.settle(limit):
            op = transition_op(transition)
            if op is not None:
                ops.append(op)
        return ops

    def settle(self, limit: int | None = None) -> list[Transition]:
        """Like :meth:`flush`, but the raw transitions ``(collection, doc_id, before, after)``
        (see :func:`transition_op`), where ``before``/``after`` are the (shared, read-only)
        mappings the client had and should have. An encoder shared by many clients can key
        on their identities: one observer change is then diffed and encoded once, not once
        per client. Documents whose state did not move are left out.
        """
        views, published = self._views, self._published
        settled: list[Transition] = []
        append = settled.append
        for collection, dirty in self._take_dirty(limit):
            view = views.get(collection, _NO_VIEW)
            holder: Any = _MISSING  # the last sole holder seen, and its documents
            holder_docs: dict[str, Fields] = {}
            for doc_id, before in dirty.items():
                # visible(), inlined: this runs for every document of every flush.
                entry = view.get(doc_id, _MISSING)
                if entry is _MISSING:
                    after = None
                elif type(entry) is _Overlap:
                    after = self.visible(collection, doc_id)
                else:
                    if entry is not holder:
                        holder, holder_docs = entry, published[entry][collection]
                    after = holder_docs[doc_id]
                if before is not after:
                    append((collection, doc_id, before, after))
        return settled

    def settle_fresh(self, limit: int) -> tuple[str, list[tuple[str, Fields]]] | None:
        """The oldest dirty documents, while they are new to the client and held by one
        subscription each: ``(collection, [(doc_id, fields), ...])``, at most ``limit``, all
        in one collection, settled like :meth:`settle` would. What a large initial result is
        made of, at a fraction of the cost per document (no transitions to build and read
        back). None when the oldest dirty document is anything else: use :meth:`settle`."""
        oldest = next(iter(self._dirty.items()), None)
        if oldest is None:
            return None
        collection, dirty = oldest
        run = self._runs.get(collection)
        if run is not None:
            if limit > 0:
                fresh = list(islice(run.items, limit))
                run.left -= len(fresh)
                if not run.left:
                    del self._dirty[collection], self._runs[collection]
                return collection, fresh
            dirty = self._end_run(collection)
        view = self._views.get(collection, _NO_VIEW)
        published = self._published
        if limit > 0:
            fresh = self._settle_fresh_piece(collection, dirty, view, limit)
            if fresh is not None:
                return collection, fresh
        fresh = []
        append = fresh.append
        holder: Any = _MISSING
        holder_docs: dict[str, Fields] = {}
        for doc_id, before in dirty.items():
            if before is not None or len(fresh) >= limit:
                break
            entry = view.get(doc_id, _MISSING)
            if entry is _MISSING or type(entry) is _Overlap:
                break
            if entry is not holder:
                holder, holder_docs = entry, published[entry][collection]
            fields = holder_docs[doc_id]
            if _ID_KEY in fields:
                break
            append((doc_id, fields))
        if not fresh:
            return None
        if len(fresh) == len(dirty):
            del self._dirty[collection]
        else:
            for doc_id, _ in fresh:
                del dirty[doc_id]
        return collection, fresh

    def _settle_fresh_piece(self, collection: str, dirty: dict[str, Fields | None],
                            view: dict[str, _ViewEntry],
                            limit: int) -> list[tuple[str, Fields]] | None:
        """:meth:`settle_fresh`'s result when its whole first piece (up to ``limit``) is fresh,
        checked with C-level operations on the piece instead of a Python step per document;
        None when some document is not (the caller's loop then finds the valid prefix)."""
        ids = list(islice(dirty, limit))
        count = len(ids)
        # The client had none of them (no before is anything but None).
        if list(islice(dirty.values(), count)).count(None) != count:
            return None
        # All in the view, held by one and the same subscription (no _Overlap, nothing
        # removed: a missing id reads as None). Sub ids are dict keys in the box, so == is
        # their identity.
        entries = list(map(view.get, ids))
        holder = entries[0]
        if holder is None or type(holder) is _Overlap or entries.count(holder) != count:
            return None
        holder_docs = self._published[holder][collection]
        fields = list(map(holder_docs.__getitem__, ids))
        if any(map(operator.contains, fields, repeat(_ID_KEY))):
            return None  # an `_id` to strip: the general path
        if count == len(dirty):
            del self._dirty[collection]
        else:
            deque(map(dirty.__delitem__, ids), maxlen=0)  # (a C loop; no list of Nones)
        return list(zip(ids, fields, strict=True))

    def _take_dirty(self, limit: int | None) -> list[tuple[str, dict[str, Fields | None]]]:
        """Remove and return up to ``limit`` dirty documents, by collection, oldest first."""
        for collection in list(self._runs):
            self._end_run(collection)
        if limit is None or self.pending_count <= limit:
            taken, self._dirty = self._dirty, {}
            return list(taken.items())
        parts: list[tuple[str, dict[str, Fields | None]]] = []
        for collection in list(self._dirty):
            dirty = self._dirty[collection]
            if len(dirty) <= limit:
                parts.append((collection, self._dirty.pop(collection)))
                limit -= len(dirty)
            else:
                part = {doc_id: dirty.pop(doc_id) for doc_id in list(islice(dirty, limit))}
                parts.append((collection, part))
                # To the back of the line: other collections' changes are not starved.
                self._dirty[collection] = self._dirty.pop(collection)
                break
            if not limit:
                break
        return parts

    @property
    def has_pending(self) -> bool:
        """Whether some document may differ from what the client has (a flush is due)."""
        return bool(self._dirty)

    @property
    def pending_count(self) -> int:
        return (sum(map(len, self._dirty.values()))
                + sum(run.left for run in self._runs.values()))

    # ---- inspection ---------------------------------------------------------------------------

    def visible(self, collection: str, doc_id: str) -> Fields | None:
        """The fields the client should see for a document (``None``: not in its view)."""
        entry = self._views.get(collection, {}).get(doc_id, _MISSING)
        if entry is _MISSING:
            return None
        if type(entry) is _Overlap:
            published = self._published
            return {
                key: published[holders[0]][collection][doc_id][key]
                for key, holders in entry.precedence.items()
            }
        return self._published[entry][collection][doc_id]

    def published_fields(self, sub_id: SubId, collection: str, doc_id: str) -> Fields | None:
        """What ``sub_id`` itself publishes for a document (``None``: nothing)."""
        return self._published.get(sub_id, {}).get(collection, {}).get(doc_id)

    def view(self) -> dict[str, dict[str, dict[str, Any]]]:
        """A copy of the whole view the client should have: collection -> id -> fields."""
        return {
            collection: {
                doc_id: dict(_without_id(self.visible(collection, doc_id) or {}))
                for doc_id in documents
            }
            for collection, documents in self._views.items()
        }

    @property
    def document_count(self) -> int:
        """Documents in the client's view, for the merge-box size metric."""
        return sum(len(documents) for documents in self._views.values())

    @property
    def overlap_count(self) -> int:
        """Documents currently held by more than one subscription (they cost more memory)."""
        return sum(
            type(entry) is _Overlap
            for documents in self._views.values()
            for entry in documents.values()
        )

    def subscriptions(self) -> list[SubId]:
        """Subscriptions that currently publish at least one document."""
        return list(self._published)

    def _mark_dirty(self, collection: str, doc_id: str) -> None:
        # Remember what the client had only at the first touch since the last flush; the
        # snapshot of a single-holder document is just the reference to its immutable mapping.
        dirty = self._dirty_in(collection)
        if doc_id not in dirty:
            dirty[doc_id] = self.visible(collection, doc_id)

    def _dirty_in(self, collection: str) -> dict[str, Fields | None]:
        if self._runs and collection in self._runs:
            return self._end_run(collection)  # about to change: no longer a plain run
        dirty = self._dirty.get(collection)
        if dirty is None:
            dirty = self._dirty[collection] = {}
        return dirty

    def _end_run(self, collection: str) -> dict[str, Fields | None]:
        """Write a run's documents out as dirty entries (the client has none of them), in
        its place in line; call before the documents it iterates over change."""
        run = self._runs.pop(collection)
        dirty = self._dirty[collection] = dict.fromkeys(map(_FIRST, run.items))
        return dirty
