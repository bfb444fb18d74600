"""PostgreSQL value text -> Python values, by type oid. Pure: no I/O.

Two converter families per type:

- *JSON-value converters* take what wal2json put in a column's ``"value"`` (after JSON parsing):
  a bare JSON number for int2/int4/int8/oid/float4/float8/numeric, a JSON bool for bool, the
  type's text output (a JSON string) for everything else — including domains, whatever their
  base type. ``None`` as a converter means "use the parsed JSON value as it is".
- *text converters* take the type's text output (array elements, domain values, and any caller
  that reads values in text format, e.g. a snapshot query, so both sides agree exactly).

The text assumes the session settings in ``cdcddp.wal.decode.SESSION_SETTINGS`` (ISO dates,
UTC, ``IntervalStyle=iso_8601``, hex bytea). SQL reads must give the same values: the server's
connections (``cdcddp.db``) load every type where psycopg's own loader differs through these
converters, so this is the one place for the rules. Conventions (psycopg 3's where it has one):

- interval -> ``timedelta`` with 1 year = 365 days and 1 month = 30 days (psycopg's rule);
- timestamp/timestamptz/date ``infinity``/``-infinity`` -> ``max``/``min`` of the Python type
  (timestamptz ones carry ``tzinfo=UTC``); values Python cannot represent (BC, year > 9999,
  time ``24:00:00``, intervals beyond ``timedelta``) stay as their text (``str``);
- json/jsonb -> parsed with the standard library (exact big ints, floats for fractions);
- arrays -> ``list`` (nested lists for several dimensions; explicit lower bounds are dropped);
- enums, composites, ranges, network and other types without a converter -> ``str``.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any, Final
from uuid import UUID

Converter = Callable[[Any], Any]
TextConverter = Callable[[str], Any]

FIRST_USER_OID: Final = 16384  # FirstNormalObjectId: oids below are built in and stable
NUMERIC_OID: Final = 1700


# -- scalars ------------------------------------------------------------------------------------


def numeric_from_json(value: Any) -> Decimal:
    """A numeric from a JSON number parsed exactly (ints, or Decimals: ``parse_float``)."""
    if type(value) is float:
        raise ValueError("numeric parsed as float: digits may be lost")
    return Decimal(value)


def bool_from_text(text: str) -> bool:
    if text == "t":
        return True
    if text == "f":
        return False
    raise ValueError(f"not a boolean: {text!r}")


def bytea_from_text(text: str) -> bytes:
    if not text.startswith("\\x"):
        raise ValueError("bytea text is not hex (bytea_output must be 'hex')")
    return bytes.fromhex(text[2:])


def _out_of_python_range(text: str) -> bool:
    # BC dates and years past 9999 are valid in PostgreSQL but not in datetime.
    return text.endswith(" BC") or text[:5].isdigit()


_TS_MAX_UTC: Final = datetime.max.replace(tzinfo=UTC)
_TS_MIN_UTC: Final = datetime.min.replace(tzinfo=UTC)


def timestamptz_from_text(text: str) -> datetime | str:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        if text == "infinity":
            return _TS_MAX_UTC
        if text == "-infinity":
            return _TS_MIN_UTC
        if _out_of_python_range(text):
            return text
        raise


def timestamp_from_text(text: str) -> datetime | str:
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        if text == "infinity":
            return datetime.max
        if text == "-infinity":
            return datetime.min
        if _out_of_python_range(text):
            return text
        raise


def date_from_text(text: str) -> date | str:
    try:
        return date.fromisoformat(text)
    except ValueError:
        if text == "infinity":
            return date.max
        if text == "-infinity":
            return date.min
        if _out_of_python_range(text):
            return text
        raise


def time_from_text(text: str) -> time | str:
    try:
        return time.fromisoformat(text)
    except ValueError:
        if text.startswith("24:00:00"):  # valid in PostgreSQL, not in datetime.time
            return text
        raise


# IntervalStyle=iso_8601 output: every field carries its own sign, e.g. P-1Y-2M3DT-4H5M-6.5S.
_ISO_INTERVAL: Final = re.compile(
    r"P(?:(-?\d+)Y)?(?:(-?\d+)M)?(?:(-?\d+)D)?"
    r"(?:T(?:(-?\d+)H)?(?:(-?\d+)M)?(?:(-?)(\d+)(?:\.(\d{1,6}))?S)?)?"
)


def interval_from_text(text: str) -> timedelta | str:
    match = _ISO_INTERVAL.fullmatch(text)
    if match is None or text == "P":
        raise ValueError(f"not an iso_8601 interval: {text!r}")
    years, months, days, hours, minutes, sec_sign, secs, frac = match.groups()
    total_months = 12 * int(years or 0) + int(months or 0)
    # psycopg's rule: whole years are 365 days, the remaining months 30 days each.
    whole_years, rest_months = divmod(abs(total_months), 12)
    month_days = 365 * whole_years + 30 * rest_months
    seconds = 3600 * int(hours or 0) + 60 * int(minutes or 0)
    micros = 0
    if secs is not None:
        sec_micros = int(secs) * 1_000_000 + (int(frac.ljust(6, "0")) if frac else 0)
        micros = -sec_micros if sec_sign else sec_micros
    try:
        return timedelta(
            days=int(days or 0) + (month_days if total_months >= 0 else -month_days),
            seconds=seconds,
            microseconds=micros,
        )
    except OverflowError:
        return text


def json_from_text(text: str) -> Any:
    return json.loads(text)


def int_vector_from_text(text: str) -> list[int]:
    return [int(part) for part in text.split()]


# -- arrays -------------------------------------------------------------------------------------

_ARRAY_TOKENIZERS: dict[str, re.Pattern[str]] = {}
_BACKSLASH_ESCAPE: Final = re.compile(r"\\(.)", re.DOTALL)


def _array_tokenizer(delimiter: str) -> re.Pattern[str]:
    tokenizer = _ARRAY_TOKENIZERS.get(delimiter)
    if tokenizer is None:
        d = re.escape(delimiter)
        tokenizer = re.compile(rf'"((?:[^"\\]|\\.)*)"|[{{}}]|{d}|[^{{}}"{d}]+', re.DOTALL)
        _ARRAY_TOKENIZERS[delimiter] = tokenizer
    return tokenizer


def parse_array(text: str, element: TextConverter | None, delimiter: str = ",") -> list[Any]:
    """Parse an array's text output (``{1,NULL,"a,b"}``, ``{{1,2},{3,4}}``) into lists."""
    if text.startswith("["):  # explicit bounds, e.g. "[0:1]={1,2}": keep the elements only
        text = text[text.index("=") + 1 :]
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"not an array literal: {text!r}")
    if '"' not in text and text.find("{", 1) < 0:
        # One dimension, nothing quoted: array_out quotes anything holding delimiters,
        # braces, quotes, backslashes or blanks, so a plain split is exact.
        inner = text[1:-1]
        if not inner:
            return []
        items = inner.split(delimiter)
        if element is None:
            return [None if item == "NULL" else item for item in items]
        return [None if item == "NULL" else element(item) for item in items]
    return _parse_nested_array(text, element, delimiter)


def _parse_nested_array(text: str, element: TextConverter | None, delimiter: str) -> list[Any]:
    stack: list[list[Any]] = []
    current: list[Any] | None = None
    result: list[Any] | None = None
    position = 0
    for match in _array_tokenizer(delimiter).finditer(text):
        if match.start() != position or result is not None:
            raise ValueError(f"malformed array literal: {text!r}")
        position = match.end()
        token = match.group(0)
        quoted = match.group(1)
        if token == "{":
            child: list[Any] = []
            if current is not None:
                current.append(child)
                stack.append(current)
            current = child
        elif token == "}":
            if current is None:
                raise ValueError(f"malformed array literal: {text!r}")
            if stack:
                current = stack.pop()
            else:
                result, current = current, None
        elif token == delimiter:
            continue
        elif current is None:
            raise ValueError(f"malformed array literal: {text!r}")
        elif quoted is not None:
            if "\\" in quoted:
                quoted = _BACKSLASH_ESCAPE.sub(r"\1", quoted)
            current.append(quoted if element is None else element(quoted))
        elif token == "NULL":
            current.append(None)
        else:
            current.append(token if element is None else element(token))
    if result is None or position != len(text):
        raise ValueError(f"malformed array literal: {text!r}")
    return result


def array_converter(element: TextConverter | None, delimiter: str = ",") -> TextConverter:
    def convert(text: str) -> list[Any]:
        return parse_array(text, element, delimiter)

    return convert


# -- built-in types -----------------------------------------------------------------------------


def _uuid(text: str) -> UUID:
    return UUID(text)


# oid -> (JSON-value converter, text converter); None means "leave as is".
_BUILTIN_SCALARS: Final[dict[int, tuple[Converter | None, TextConverter | None]]] = {
    16: (None, bool_from_text),  # bool
    17: (bytes.fromhex, bytea_from_text),  # bytea: wal2json strips the "\x"
    18: (None, None),  # "char"
    19: (None, None),  # name
    20: (None, int),  # int8
    21: (None, int),  # int2
    22: (int_vector_from_text, int_vector_from_text),  # int2vector
    23: (None, int),  # int4
    25: (None, None),  # text
    26: (None, int),  # oid
    28: (int, int),  # xid
    29: (int, int),  # cid
    30: (int_vector_from_text, int_vector_from_text),  # oidvector
    114: (json_from_text, json_from_text),  # json
    700: (float, float),  # float4 (ints arrive as JSON ints)
    701: (float, float),  # float8
    1042: (None, None),  # bpchar
    1043: (None, None),  # varchar
    1082: (date_from_text, date_from_text),
    1083: (time_from_text, time_from_text),
    1114: (timestamp_from_text, timestamp_from_text),
    1184: (timestamptz_from_text, timestamptz_from_text),
    1186: (interval_from_text, interval_from_text),
    1266: (time_from_text, time_from_text),  # timetz
    1700: (numeric_from_json, Decimal),
    2950: (_uuid, _uuid),
    3802: (json_from_text, json_from_text),  # jsonb
    5069: (int, int),  # xid8
}

# Built-in array type oid -> element type oid (all use "," except box, handled via catalog).
BUILTIN_ARRAYS: Final[dict[int, int]] = {
    1000: 16, 1001: 17, 1002: 18, 1003: 19, 1016: 20, 1005: 21, 1006: 22, 1007: 23, 1009: 25,
    1028: 26, 1011: 28, 1012: 29, 1013: 30, 199: 114, 1021: 700, 1022: 701, 1014: 1042,
    1015: 1043, 1182: 1082, 1183: 1083, 1115: 1114, 1185: 1184, 1187: 1186, 1270: 1266,
    1231: 1700, 2951: 2950, 3807: 3802, 271: 5069,
}


# Types whose psycopg binary loader gives exactly the value the decoder makes of the stream's
# text for every value (tests/test_wal_decode.py checks each): a query reading only these may
# ask for binary results, which skips parsing text. Not float4 (binary gives the float32's
# full double expansion, 0.10000000149011612, where the text gives 0.1), nor dates and times
# (infinity and BC values), nor anything needing the catalog.
BINARY_LOADS_AS_DECODED: Final = frozenset({
    16, 17, 19, 20, 21, 23, 25, 26, 114, 701, 1042, 1043, 1700, 2950, 3802,  # scalars
    1000, 1001, 1003, 1016, 1005, 1007, 1009, 1028, 199, 1022, 1014, 1015, 1231, 2951, 3807,
})


# -- catalog of other types (user types, arrays of them, domains) --------------------------------

TYPE_CATALOG_SQL: Final = (
    "SELECT t.oid, t.typname, t.typtype, t.typbasetype, t.typelem, t.typdelim, t.typcategory"
    " FROM pg_catalog.pg_type t WHERE t.oid >= 16384 OR t.typcategory = 'A' ORDER BY t.oid"
)
"""Rows for ``TypeCatalog.from_rows``; plain SQL, fine on a ``replication=database`` session."""


@dataclass(slots=True, frozen=True)
class PgType:
    oid: int
    name: str
    kind: str  # pg_type.typtype: b base, c composite, d domain, e enum, r range, m multirange
    base: int  # domain's base type oid, else 0
    element: int  # array's element type oid, else 0
    delimiter: str = ","


class TypeCatalog:
    """What the decoder needs to know about types it has no built-in converter for."""

    def __init__(self, types: Iterable[PgType] = ()) -> None:
        self._types = {t.oid: t for t in types}

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> TypeCatalog:
        """Build from ``TYPE_CATALOG_SQL`` rows, typed or text (as libpq's text results)."""
        types = []
        for oid, name, kind, base, element, delimiter, category in rows:
            is_array = str(category) == "A" and int(element) != 0
            types.append(PgType(int(oid), str(name), str(kind), int(base),
                                int(element) if is_array else 0, str(delimiter)))
        return cls(types)

    def get(self, oid: int) -> PgType | None:
        return self._types.get(oid)

    def __len__(self) -> int:
        return len(self._types)

    def __iter__(self) -> Iterator[PgType]:
        return iter(self._types.values())

    def resolves(self, oids: Iterable[int]) -> bool:
        """Whether every oid is built in or in this catalog (else a reload may help)."""
        return all(is_known(oid, self) for oid in oids)

    def merged(self, newer: TypeCatalog) -> TypeCatalog:
        """Both catalogs' types, ``newer``'s winning: a load read under an older snapshot
        must not make types another load already found unknown again."""
        return TypeCatalog([*self._types.values(), *newer._types.values()])


class SharedCatalog:
    """The current ``TypeCatalog`` of one database, shared by the replication stream's
    decoder and the SQL connections (which load values the way the decoder does).

    Either side loads the catalog when it meets a type oid the catalog lacks (a type
    created after the last load) and merges it in here; ``version`` grows with every change,
    so a connection knows when its loaders are stale. Thread-safe.
    """

    def __init__(self, catalog: TypeCatalog | None = None) -> None:
        self._lock = threading.Lock()
        # One attribute, so readers get a consistent (version, catalog) pair without a lock.
        self._current: tuple[int, TypeCatalog] = (0, catalog or TypeCatalog())

    @property
    def current(self) -> tuple[int, TypeCatalog]:
        return self._current

    @property
    def catalog(self) -> TypeCatalog:
        return self._current[1]

    @property
    def version(self) -> int:
        return self._current[0]

    def merge(self, loaded: TypeCatalog) -> TypeCatalog:
        """Add a freshly loaded catalog; returns the merged one now current."""
        with self._lock:
            version, catalog = self._current
            merged = catalog.merged(loaded) if len(catalog) else loaded
            if merged._types == catalog._types:
                return catalog  # nothing new: connections keep their loaders
            self._current = (version + 1, merged)
            return merged

    def resolves(self, oids: Iterable[int]) -> bool:
        return self._current[1].resolves(oids)


_MAX_TYPE_DEPTH: Final = 16  # domains of domains of arrays...: bounded, against catalog cycles


def text_converter(oid: int, catalog: TypeCatalog | None = None, _depth: int = 0) -> (
        TextConverter | None):
    """Converter for the type's text output; None means keep the text (``str``)."""
    builtin = _BUILTIN_SCALARS.get(oid)
    if builtin is not None:
        return builtin[1]
    if _depth > _MAX_TYPE_DEPTH:
        return None
    element = BUILTIN_ARRAYS.get(oid)
    if element is not None:
        return array_converter(text_converter(element, catalog, _depth + 1))
    pg_type = catalog.get(oid) if catalog is not None else None
    if pg_type is None:
        return None
    if pg_type.kind == "d":
        return text_converter(pg_type.base, catalog, _depth + 1)
    if pg_type.element:
        return array_converter(text_converter(pg_type.element, catalog, _depth + 1),
                               pg_type.delimiter)
    return None


def json_converter(oid: int, catalog: TypeCatalog | None = None) -> Converter | None:
    """Converter for a wal2json column ``"value"`` of type ``oid``; None means keep it."""
    builtin = _BUILTIN_SCALARS.get(oid)
    if builtin is not None:
        return builtin[0]
    # Everything else (arrays, domains of any base type, user types) is the text output.
    return text_converter(oid, catalog)


def is_known(oid: int, catalog: TypeCatalog | None = None) -> bool:
    """Whether ``oid`` is built in or in the catalog (unknown user types decode as str)."""
    return (oid in _BUILTIN_SCALARS or oid in BUILTIN_ARRAYS or oid < FIRST_USER_OID
            or (catalog is not None and catalog.get(oid) is not None))
