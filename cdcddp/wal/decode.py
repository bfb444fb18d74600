"""wal2json format-version 2 documents -> typed change events (``cdcddp.wal.events``).

The hot path: one call per XLogData payload. Documents are parsed with orjson; per-column
conversion uses a tuple of converters cached per column type-oid signature, so the per-row
work is one dict build plus one call per column that is not already the right Python type.

Numerics: wal2json prints numeric as a bare JSON number, which orjson turns into a float when
it has a fraction or exceeds 64 bits (silently). So numeric columns ignore orjson's value and
take their exact digits (and scale: ``1.10`` stays ``Decimal('1.10')``) from the payload text
with one regex pass, only in documents that have a numeric column. NaN/±Infinity numeric and
float values arrive as JSON null from wal2json 2.5 and so decode as ``None``; inside arrays
they are text and decode as ``Decimal('NaN')``, ``float('inf')`` etc.

Types are resolved by oid (``include-types`` is off: it costs the walsender ~25 % of its time).
Built-in types need nothing else; domains and arrays of user types need a ``TypeCatalog``
(``pgtypes.TYPE_CATALOG_SQL``) given by the caller; an oid the decoder cannot resolve decodes
as the value's text and is recorded in ``Decoder.unresolved_oids`` so the caller can reload
the catalog (e.g. after ``CREATE DOMAIN``) and decode the payload again, as
``cdcddp.wal.stream`` does.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from decimal import Decimal
from operator import itemgetter
from typing import Any, Final

import orjson

from cdcddp.wal import pgtypes
from cdcddp.wal.events import (
    Begin,
    Commit,
    Delete,
    Event,
    Insert,
    Message,
    Relation,
    Row,
    Truncate,
    Update,
)
from cdcddp.wal.pgtypes import Converter, TypeCatalog, timestamptz_from_text

WAL2JSON_OPTIONS: Final[dict[str, str]] = {
    "format-version": "2",
    "include-xids": "1",
    "include-lsn": "1",
    "include-timestamp": "1",
    "include-pk": "1",
    "include-type-oids": "1",
    # Type names cost the walsender ~25 % of its time (and ~20 % of the bytes); oids suffice.
    "include-types": "0",
    "include-transaction": "1",
}
"""Options for START_REPLICATION (all known to wal2json 2.5; an unknown one aborts it)."""

SESSION_SETTINGS: Final[dict[str, str]] = {
    "DateStyle": "ISO",
    "TimeZone": "UTC",
    "IntervalStyle": "iso_8601",
    "bytea_output": "hex",
    "extra_float_digits": "3",
}
"""GUCs the decoding session must pin: wal2json prints most values in the session's style."""


def libpq_options(settings: dict[str, str] = SESSION_SETTINGS) -> str:
    """``settings`` as a libpq ``options`` conninfo value (``-c name=value ...``)."""

    def escape(text: str) -> str:  # libpq splits options on blanks; backslash protects them
        return text.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join(f"-c {escape(name)}={escape(value)}" for name, value in settings.items())


class DecodeError(ValueError):
    """The payload is not a wal2json v2 document this decoder understands."""


# wal2json writes a column as {"name":..,["type":..,]"typeoid":..,"value":..}; only the
# built-in numeric (not a domain over it: those are quoted text) is a bare number. These
# cannot match inside a JSON string, where every '"' is escaped.
_NUMERIC_VALUE: Final = re.compile(rb'"typeoid":1700,"value":(-?[0-9][0-9.eE+-]*)')

# Python's int() refuses more than 4300 digits; numeric allows 131072 before the point.
_INT_DIGITS_LIMIT: Final = 4000


def _int_or_decimal(text: str) -> int | Decimal:
    return int(text) if len(text) < _INT_DIGITS_LIMIT else Decimal(text)


def _lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def _timestamp(doc: dict[str, Any]) -> Any:
    text = doc.get("timestamp")
    return None if text is None else timestamptz_from_text(text)


# A table's known shape: (type oids, column names, accepted (oids, names) variants).
_Shape = tuple[tuple[int, ...], tuple[str, ...], set[tuple[tuple[int, ...], tuple[str, ...]]]]


class Decoder:
    """Decodes wal2json v2 payloads; caches converters per column type signature.

    Not thread-safe (one per stream). ``catalog`` resolves domains and user array types.
    """

    __slots__ = ("_catalog", "_handlers", "_numeric_texts", "_payload", "_plans",
                 "_record_lsn", "_shapes", "relations", "track_shapes", "unresolved_oids")

    def __init__(self, catalog: TypeCatalog | None = None) -> None:
        self._catalog = catalog
        # type-oid signature of a row -> ((column index, converter), ...) for columns to convert
        self._plans: dict[tuple[int, ...], tuple[tuple[int, Converter], ...]] = {}
        self.unresolved_oids: set[int] = set()
        # With ``track_shapes``: (schema, table) -> (type oids, column names, other accepted
        # (oids, names) variants: UPDATEs lacking unchanged TOASTed columns). A change that
        # does not fit queues a ``Relation`` in ``relations``: the caller delivers (and
        # clears) them before the change.
        self.track_shapes = False
        self._shapes: dict[tuple[str, str], _Shape] = {}
        self.relations: list[Relation] = []
        self._payload: bytes | memoryview = b""
        self._numeric_texts: Iterator[bytes] | None = None
        self._record_lsn: int | None = None
        self._handlers: dict[str, Callable[[dict[str, Any]], Event]] = {
            "I": self._insert, "U": self._update, "D": self._delete,
            "B": self._begin, "C": self._commit, "T": self._truncate, "M": self._message,
        }

    @property
    def catalog(self) -> TypeCatalog | None:
        return self._catalog

    def set_catalog(self, catalog: TypeCatalog | None) -> None:
        """Use a freshly loaded type catalog from now on (drops cached converters)."""
        self._catalog = catalog
        self._plans.clear()
        self.unresolved_oids.clear()

    def decode(self, payload: bytes | memoryview, record_lsn: int | None = None) -> Event:
        """One wal2json v2 document -> one event. Raises ``DecodeError`` if malformed.

        ``record_lsn``: the XLogData header's start LSN, when the payload came from the
        replication stream. For a row change it equals the document's ``lsn`` (both are the
        change record's LSN), so the text need not be parsed again."""
        try:
            doc = orjson.loads(payload)
        except orjson.JSONDecodeError:
            doc = _slow_loads(payload)  # e.g. a numeric too large for a double
        if type(doc) is not dict:
            raise DecodeError(f"not a JSON object: {_excerpt(payload)}")
        try:
            handler = self._handlers[doc["action"]]
        except (KeyError, TypeError):
            raise DecodeError(f"unknown or missing action: {_excerpt(payload)}") from None
        # The numeric converter reads exact digits from the payload text, found on first use.
        self._payload = payload
        self._numeric_texts = None
        self._record_lsn = record_lsn
        try:
            return handler(doc)
        except DecodeError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise DecodeError(f"cannot decode {_excerpt(payload)}: {exc!r}") from exc

    def _exact_numeric(self, value: Any) -> Decimal:
        # Takes the next numeric's digits in document order (columns, then identity, as
        # wal2json writes them and as the handlers convert them), not orjson's float.
        if self._numeric_texts is None:
            self._numeric_texts = iter(_NUMERIC_VALUE.findall(self._payload))
        text = next(self._numeric_texts, None)
        if text is None:
            raise DecodeError(f"numeric value {value!r} not found in the payload text")
        return Decimal(text.decode("ascii"))

    # -- rows -------------------------------------------------------------------------------

    def _plan(self, signature: tuple[int, ...]) -> tuple[tuple[int, Converter], ...]:
        steps = []
        for index, oid in enumerate(signature):
            converter = (self._exact_numeric if oid == pgtypes.NUMERIC_OID
                         else pgtypes.json_converter(oid, self._catalog))
            if converter is not None:
                steps.append((index, converter))
            elif not pgtypes.is_known(oid, self._catalog):
                self.unresolved_oids.add(oid)
        plan = tuple(steps)
        self._plans[signature] = plan
        return plan

    def _row(self, entries: list[dict[str, Any]], signature: tuple[int, ...] | None = None
             ) -> Row:
        if signature is None:
            signature = tuple([entry["typeoid"] for entry in entries])
        plan = self._plans.get(signature)
        if plan is None:
            plan = self._plan(signature)
        row = {entry["name"]: entry["value"] for entry in entries}
        for index, convert in plan:
            entry = entries[index]
            value = entry["value"]
            if value is not None:
                row[entry["name"]] = convert(value)
        return row

    # -- one handler per action -------------------------------------------------------------

    def _change_lsn(self, doc: dict[str, Any]) -> int:
        lsn = self._record_lsn
        return _lsn(doc["lsn"]) if lsn is None else lsn

    def _insert(self, doc: dict[str, Any]) -> Insert:
        return Insert(doc["xid"], self._change_lsn(doc), doc["schema"], doc["table"],
                      self._new_row(doc, complete=True), _pk(doc))

    def _update(self, doc: dict[str, Any]) -> Update:
        return Update(doc["xid"], self._change_lsn(doc), doc["schema"], doc["table"],
                      self._new_row(doc, complete=False), self._row(doc["identity"]), _pk(doc))

    def _new_row(self, doc: dict[str, Any], complete: bool) -> Row:
        """The change's new row; with ``track_shapes``, a ``Relation`` queued when it does not
        fit the table's known shape (``complete``: an INSERT has every column, an UPDATE may
        lack unchanged TOASTed ones)."""
        entries = doc["columns"]
        signature = tuple([entry["typeoid"] for entry in entries])
        new = self._row(entries, signature)
        if self.track_shapes:
            schema, table = doc["schema"], doc["table"]
            known = self._shapes.get((schema, table))
            names = tuple(new)
            if (known is None or known[0] != signature or known[1] != names) and (
                    complete or known is None or (signature, names) not in known[2]):
                self._reshaped(doc["xid"], schema, table, signature, names, complete)
        return new

    def _reshaped(self, xid: int, schema: str, table: str, signature: tuple[int, ...],
                  names: tuple[str, ...], complete: bool) -> None:
        """A change that does not fit the table's known shape (slow path, rare)."""
        key = (schema, table)
        known = self._shapes.get(key)
        present = tuple(zip(names, signature, strict=True))
        previous = None if known is None else tuple(zip(known[1], known[0], strict=True))
        if known is not None and not complete:
            # An UPDATE leaves out unchanged TOASTed columns: if what it has fits, it is a
            # variant of the known shape, not a new one.
            old = dict(previous or ())
            absent = tuple(n for n, _ in previous or () if n not in names)
            if all(old.get(name, -1) == oid for name, oid in present):
                known[2].add((signature, names))
                self.relations.append(Relation(xid, schema, table, previous or (), False,
                                               previous, absent))
                return
            present += tuple((n, o) for n, o in previous or () if n not in names)
        else:
            absent = ()
        columns = present
        self._shapes[key] = (tuple(o for _, o in columns), tuple(n for n, _ in columns),
                             set() if complete else {(signature, names)})
        self.relations.append(Relation(xid, schema, table, columns, complete, previous,
                                       absent))

    def _delete(self, doc: dict[str, Any]) -> Delete:
        return Delete(doc["xid"], self._change_lsn(doc), doc["schema"], doc["table"],
                      self._row(doc["identity"]), _pk(doc))

    def _begin(self, doc: dict[str, Any]) -> Begin:
        return Begin(doc["xid"], _lsn(doc["lsn"]), _lsn(doc["nextlsn"]), _timestamp(doc))

    def _commit(self, doc: dict[str, Any]) -> Commit:
        return Commit(doc["xid"], _lsn(doc["lsn"]), _lsn(doc["nextlsn"]), _timestamp(doc))

    def _truncate(self, doc: dict[str, Any]) -> Truncate:
        return Truncate(doc["xid"], _lsn(doc["lsn"]), doc["schema"], doc["table"])

    def _message(self, doc: dict[str, Any]) -> Message:
        transactional = doc["transactional"]
        if type(transactional) is not bool:
            raise DecodeError(f"message 'transactional' is not a boolean: {transactional!r}")
        return Message(doc["xid"], _lsn(doc["lsn"]), transactional, doc["prefix"],
                       doc["content"])


_NAME = itemgetter("name")


def _pk(doc: dict[str, Any]) -> tuple[str, ...]:
    pk = doc.get("pk")
    return tuple(map(_NAME, pk)) if pk else ()


def _slow_loads(payload: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(payload), parse_float=Decimal, parse_int=_int_or_decimal)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"invalid JSON: {_excerpt(payload)}") from exc


def _excerpt(payload: bytes | memoryview, limit: int = 200) -> str:
    text = bytes(payload[:limit]).decode("utf-8", "replace")
    return repr(text) + ("..." if len(payload) > limit else "")


_default_decoder = Decoder()


def decode(payload: bytes | memoryview) -> Event:
    """Decode with a shared catalog-less ``Decoder`` (built-in types only)."""
    return _default_decoder.decode(payload)
