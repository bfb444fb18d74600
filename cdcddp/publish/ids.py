"""Primary keys ↔ DDP document ids, and Meteor's id stringification.

Two layers, as in Meteor:

1. **Document ``_id``** — what the client sees as ``doc._id`` (always a string here):
   :func:`pk_to_doc_id` / :func:`doc_id_to_pk`.

   * one ``text`` / ``varchar`` column: the text itself;
   * one ``uuid`` column: its canonical lower-case form;
   * one integer column: its decimal form (``42`` → ``"42"``);
   * several columns (composite key): the compact JSON array of the values in key order,
     integers as JSON numbers, text and uuids as JSON strings: ``(7, "en")`` → ``'[7,"en"]'``.

   Within one collection every id has the same shape, so the encoding is injective, and it is
   reversible given the key's column types.

2. **Wire ``id``** — the ``id`` field of ``added``/``changed``/``removed``: Meteor's
   ``MongoID.idStringify`` of the ``_id`` (:func:`id_stringify`), reversed by the client's
   ``MongoID.idParse`` (:func:`id_parse`). A string goes through unchanged unless it starts with
   ``-``, ``~`` or ``{`` or is exactly 24 lower-case hex digits (an ObjectID look-alike): then
   ``-`` is prepended. ``""`` stays ``""``. Numbers, booleans and null become ``~`` + JSON.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias
from uuid import UUID

PkValue: TypeAlias = str | int | UUID
PkType: TypeAlias = type[str] | type[int] | type[UUID]

_OBJECT_ID: Final = re.compile(r"[0-9a-f]{24}")
_CANONICAL_INT: Final = re.compile(r"-?(0|[1-9][0-9]*)")


class IdError(ValueError):
    """A key value cannot be turned into an id, or an id does not decode to a key."""


@dataclass(frozen=True, slots=True)
class ObjectID:
    """Meteor's ``MongoID.ObjectID``: 24 lower-case hex digits."""

    hex: str

    def __post_init__(self) -> None:
        if not looks_like_object_id(self.hex):
            raise IdError(f"not an ObjectID hex string: {self.hex!r}")


def looks_like_object_id(text: str) -> bool:
    """Meteor's ``_looksLikeObjectID``: exactly 24 characters of ``[0-9a-f]``."""
    return _OBJECT_ID.fullmatch(text) is not None


# --------------------------------------------------------------------------- Meteor stringify


def id_stringify(doc_id: str | int | bool | ObjectID | None) -> str:
    """Meteor's ``MongoID.idStringify``: the wire form of a document ``_id``."""
    if isinstance(doc_id, ObjectID):
        return doc_id.hex
    if isinstance(doc_id, str):
        if doc_id and (doc_id[0] in "-~{" or looks_like_object_id(doc_id)):
            return "-" + doc_id  # escaped so that id_parse reads a string back
        return doc_id
    if doc_id is None or isinstance(doc_id, bool | int):
        # JSON.stringify; ints beyond 2**53 would lose precision in JavaScript.
        return "~" + json.dumps(doc_id)
    raise IdError(f"cannot stringify a {type(doc_id).__name__} id")


def id_parse(wire_id: str) -> Any:
    """Meteor's ``MongoID.idParse``: the ``_id`` a client reads from a wire ``id``.

    ``"-"`` is Meteor's encoding of ``undefined``, which no document has: it raises.
    """
    if wire_id == "":
        return wire_id
    if wire_id == "-":
        raise IdError("'-' is the id of an undefined _id")
    first = wire_id[0]
    if first == "-":
        return wire_id[1:]
    if first == "~":
        try:
            return json.loads(wire_id[1:])
        except ValueError as exc:
            raise IdError(f"bad ~-escaped id: {wire_id!r}") from exc
    if looks_like_object_id(wire_id):
        return ObjectID(wire_id)
    return wire_id


# --------------------------------------------------------------------------- primary keys


def _component(value: Any) -> str | int:
    # bool is an int subclass but never a key column type we map; reject it explicitly.
    if isinstance(value, bool) or value is None:
        raise IdError(f"primary key values cannot be {value!r}")
    if isinstance(value, int):
        return int(value)
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, str):
        return str.__str__(value)
    raise IdError(f"primary key values of type {type(value).__name__} are not supported "
                  "(use text, uuid or integer keys)")


def pk_to_doc_id(values: Sequence[Any]) -> str:
    """The document ``_id`` for a primary key, given its values in key column order."""
    if not values:
        raise IdError("a published table needs a primary key")
    parts = [_component(v) for v in values]
    if len(parts) == 1:
        return str(parts[0])
    return json.dumps(parts, separators=(",", ":"), ensure_ascii=False)


def _decode(text_or_value: Any, pk_type: PkType, doc_id: str) -> PkValue:
    if pk_type is int:
        if isinstance(text_or_value, str):
            # int() alone would accept " 7", "+7", "0_7": only the form we produce decodes.
            if not _CANONICAL_INT.fullmatch(text_or_value):
                raise IdError(f"not an integer key: {doc_id!r}")
            return int(text_or_value)
        if isinstance(text_or_value, int) and not isinstance(text_or_value, bool):
            return text_or_value
    elif isinstance(text_or_value, str):
        if pk_type is str:
            return text_or_value
        if pk_type is UUID:
            try:
                uuid = UUID(text_or_value)
            except ValueError:
                raise IdError(f"not a uuid key: {doc_id!r}") from None
            if str(uuid) != text_or_value:
                raise IdError(f"not a canonical uuid key: {doc_id!r}")
            return uuid
    raise IdError(f"id {doc_id!r} does not match key type {pk_type.__name__}")


def doc_id_to_pk(doc_id: str, pk_types: Sequence[PkType]) -> tuple[PkValue, ...]:
    """The primary key values of a document ``_id`` (the inverse of :func:`pk_to_doc_id`)."""
    if not isinstance(doc_id, str):
        raise IdError(f"document ids are strings, not {type(doc_id).__name__}")
    if len(pk_types) == 1:
        return (_decode(doc_id, pk_types[0], doc_id),)
    if not pk_types:
        raise IdError("no key columns")
    try:
        parts = json.loads(doc_id)
    except ValueError:
        raise IdError(f"not a composite key id: {doc_id!r}") from None
    if not isinstance(parts, list) or len(parts) != len(pk_types):
        raise IdError(f"not a {len(pk_types)}-column key id: {doc_id!r}")
    key = tuple(_decode(p, t, doc_id) for p, t in zip(parts, pk_types, strict=True))
    if pk_to_doc_id(key) != doc_id:
        raise IdError(f"not the canonical id of its key: {doc_id!r}")  # e.g. extra spaces
    return key


def pk_to_wire_id(values: Sequence[Any]) -> str:
    """Shortcut: the wire ``id`` of the document for these primary key values."""
    return id_stringify(pk_to_doc_id(values))
