"""EJSON, exactly as Meteor's `ejson` package puts it on the wire.

Wire forms: `{"$date": ms}`, `{"$binary": base64}`, `{"$InfNaN": 1|-1|0}`,
`{"$regexp": src, "$flags": f}`, `{"$type": name, "$value": json}` and `{"$escape": {...}}` for
plain objects that would otherwise be mistaken for one of those.

Python → wire (encoding):

| Python                         | wire                                                          |
|--------------------------------|---------------------------------------------------------------|
| `datetime` (naive = UTC)       | `{"$date": ms}` (whole ms since the epoch, floored)           |
| `date`                         | `{"$date": ms}` of midnight UTC                               |
| `bytes`/`bytearray`/`memoryview` | `{"$binary": "<standard base64, padded>"}`                 |
| `float` NaN/±inf               | `{"$InfNaN": 0 / 1 / -1}`                                     |
| `int` beyond ±(2**53-1)        | decimal string (a JS number would silently lose digits)      |
| `Decimal`                      | number when exact (see `decimal_to_json`), else plain string  |
| `UUID`, `time`, IP addresses   | string (`str()` / ISO 8601)                                   |
| `timedelta`                    | number of seconds (int when whole)                            |
| `set`/`frozenset`/`tuple`      | array                                                         |
| `EJSONRegExp`                  | `{"$regexp": source, "$flags": flags}`                        |
| registered custom type         | `{"$type": name, "$value": to_json(obj)}`                     |

Decoding reverses the `$` forms: `$date` → aware UTC `datetime`, `$binary` → `bytes`,
`$InfNaN` → `float`, `$regexp` → `EJSONRegExp`, `$type` → the registered factory (an unknown
type raises `EJSONError`, which a DDP server reports as "Parse error").

`dumps` is on the hot path (every data message): it runs orjson with a `default=` hook and only
falls back to the exact Python walk (`to_json_value`) when orjson's output could differ from
Meteor's (a non-finite float, an object needing `$escape`, an unsafe integer, an unusual key).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import ipaddress
import math
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any

import orjson

__all__ = [
    "EPOCH",
    "MAX_SAFE_INTEGER",
    "EJSONError",
    "EJSONRegExp",
    "datetime_to_ms",
    "decimal_to_json",
    "dumpb",
    "dumps",
    "from_json_value",
    "loads",
    "ms_to_datetime",
    "register_type",
    "to_json_value",
    "unregister_type",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_SAFE_INTEGER = 2**53 - 1  # JavaScript's Number.MAX_SAFE_INTEGER
_ONE_MS = timedelta(milliseconds=1)


class EJSONError(ValueError):
    """A value cannot be encoded, or a `$` form cannot be decoded."""


class EJSONRegExp:
    """A JavaScript regular expression as EJSON carries it (Python's `re` flags differ)."""

    __slots__ = ("flags", "source")

    def __init__(self, source: str, flags: str = "") -> None:
        self.source = source
        self.flags = flags

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EJSONRegExp):
            return NotImplemented
        return (self.source, self.flags) == (other.source, other.flags)

    def __hash__(self) -> int:
        return hash((self.source, self.flags))

    def __repr__(self) -> str:
        return f"EJSONRegExp({self.source!r}, {self.flags!r})"


# ---- custom types ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, slots=True)
class _CustomType:
    name: str
    cls: type
    to_json: Callable[[Any], Any]
    from_json: Callable[[Any], Any]


_types_by_name: dict[str, _CustomType] = {}
_types_by_class: dict[type, _CustomType] = {}


def register_type(
    name: str, cls: type, to_json: Callable[[Any], Any], from_json: Callable[[Any], Any]
) -> None:
    """Add an EJSON custom type (Meteor's `EJSON.addType`): instances of `cls` are sent as
    `{"$type": name, "$value": to_json(obj)}`; `to_json` must return plain JSON (it is not
    EJSON-processed, as in Meteor). Decoding calls `from_json($value)`."""
    if name in _types_by_name:
        raise ValueError(f"EJSON type {name!r} already registered")
    custom = _CustomType(name, cls, to_json, from_json)
    _types_by_name[name] = custom
    _types_by_class[cls] = custom


def unregister_type(name: str) -> None:
    custom = _types_by_name.pop(name, None)
    if custom is not None:
        _types_by_class.pop(custom.cls, None)


def _custom_for(value: Any) -> _CustomType | None:
    if not _types_by_class:
        return None
    custom = _types_by_class.get(type(value))
    if custom is None:
        for cls, candidate in _types_by_class.items():
            if isinstance(value, cls):
                return candidate
    return custom


def _custom_fragment(custom: _CustomType, value: Any) -> bytes:
    try:
        inner = orjson.dumps(custom.to_json(value))
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise EJSONError(f"custom type {custom.name!r} did not produce JSON: {exc}") from None
    return b'{"$type":' + orjson.dumps(custom.name) + b',"$value":' + inner + b"}"


# ---- scalar conversions shared by the fast and the exact path ------------------------------

def datetime_to_ms(value: datetime) -> int:
    """Whole milliseconds since the epoch, floored like a JS Date; naive datetimes are UTC."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // _ONE_MS


def ms_to_datetime(ms: float) -> datetime:
    return EPOCH + timedelta(milliseconds=ms)


def _date_to_ms(value: date) -> int:
    return (value - EPOCH.date()).days * 86_400_000


def decimal_to_json(value: Decimal) -> int | float | str | dict[str, int]:
    """A `Decimal` goes out as a JSON number when a JS client reads back exactly that value:
    an integer within ±(2**53-1), or a float whose shortest repr equals the decimal
    (so `12.34` is a number, `0.1000000000000000000001` and `2**60` are strings). Otherwise the
    plain decimal string (`format(d, "f")`, PostgreSQL's own text form). NaN/±inf → `$InfNaN`."""
    if not value.is_finite():
        return {"$InfNaN": 0 if value.is_nan() else (-1 if value.is_signed() else 1)}
    if value == value.to_integral_value():
        as_int = int(value)
        if -MAX_SAFE_INTEGER <= as_int <= MAX_SAFE_INTEGER:
            return as_int
    else:
        as_float = float(value)
        if math.isfinite(as_float) and Decimal(repr(as_float)) == value:
            return as_float
    return format(value, "f")


def _timedelta_to_json(value: timedelta) -> int | float:
    if value.microseconds == 0:
        return value.days * 86_400 + value.seconds
    return value.total_seconds()


def _binary_to_json(value: bytes | bytearray | memoryview) -> dict[str, str]:
    return {"$binary": base64.b64encode(value).decode("ascii")}


def _float_to_json(value: float) -> float | dict[str, int]:
    if math.isfinite(value):
        return value
    return {"$InfNaN": 0 if math.isnan(value) else (1 if value > 0 else -1)}


# An object is escaped when it has exactly the shape of one of the `$` forms
# (Meteor: the Escape converter's matchObject runs every converter's matchJSONValue).
_ONE_KEY_FORMS = frozenset({"$date", "$InfNaN", "$binary", "$escape"})
_TWO_KEY_FORMS = (frozenset({"$regexp", "$flags"}), frozenset({"$type", "$value"}))


def _needs_escape(obj: Mapping[Any, Any]) -> bool:
    size = len(obj)
    if size == 1:
        return next(iter(obj)) in _ONE_KEY_FORMS
    if size == 2:
        keys = obj.keys()
        return keys == _TWO_KEY_FORMS[0] or keys == _TWO_KEY_FORMS[1]
    return False


# ---- exact encoder ---------------------------------------------------------------------------

def to_json_value(value: Any) -> Any:
    """The JSON-compatible form of `value` (Meteor's `EJSON.toJSONValue`). Exact but slow-ish;
    `dumps` uses it only when its fast path cannot be trusted."""
    kind = type(value)
    if value is None or kind is str or kind is bool:
        return value
    if kind is int:
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if kind is float:
        return _float_to_json(value)
    if kind is dict or isinstance(value, Mapping):
        converted = {str(key): to_json_value(item) for key, item in value.items()}
        return {"$escape": converted} if _needs_escape(value) else converted
    if kind is list or kind is tuple:
        return [to_json_value(item) for item in value]
    return _to_json_other(value)


def _to_json_other(value: Any) -> Any:
    custom = _custom_for(value)
    if custom is not None:
        return orjson.Fragment(_custom_fragment(custom, value))
    if isinstance(value, datetime):
        return {"$date": datetime_to_ms(value)}
    if isinstance(value, date):
        return {"$date": _date_to_ms(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return _binary_to_json(value)
    if isinstance(value, Decimal):
        return decimal_to_json(value)
    if isinstance(value, enum.Enum):
        return to_json_value(value.value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return to_json_value(int(value))
    if isinstance(value, float):
        return _float_to_json(float(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, time):
        return value.isoformat()
    if isinstance(value, timedelta):
        return _timedelta_to_json(value)
    if isinstance(value, EJSONRegExp):
        return {"$regexp": value.source, "$flags": value.flags}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_json_value(item) for item in value]
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address
                  | ipaddress.IPv4Network | ipaddress.IPv6Network
                  | ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        # same shape orjson gives a dataclass on the fast path
        return to_json_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise EJSONError(f"cannot encode a {type(value).__name__} as EJSON")


# ---- fast encoder ----------------------------------------------------------------------------

# orjson handles str/int/float/bool/None/dict/list/tuple/UUID/enum/dataclass itself; datetime,
# date and time are passed to the hook so they become `$date`. STRICT_INTEGER makes it raise on
# integers JavaScript cannot hold, which sends us to the exact path.
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_STRICT_INTEGER
_PLAIN_SCALARS = frozenset({str, int, bool, type(None), datetime, date, Decimal, bytes, uuid.UUID})


def _may_hold_nonfinite(value: Any) -> bool:
    """orjson writes NaN/±inf as `null`; find out whether a `null` in the output may be one.
    Unknown containers answer True so the exact path decides. (Plain loops: this runs for
    every message holding a null, and generators cost more than the check.)"""
    kind = type(value)
    if kind is dict:
        items: Any = value.values()
    elif kind is list or kind is tuple:
        items = value
    elif kind is float:
        return not math.isfinite(value)
    else:
        return kind not in _PLAIN_SCALARS
    for item in items:
        kind = type(item)
        if kind is float:
            if not math.isfinite(item):
                return True
        elif kind not in _PLAIN_SCALARS and _may_hold_nonfinite(item):
            return True
    return False


def dumpb(value: Any) -> bytes:
    """EJSON text of `value` as UTF-8 bytes (compact, key order kept)."""
    # Plain JSON values (the common row: str/int/float/bool/None) need no hook: orjson alone,
    # without building the hook closure. Anything the hook would convert raises TypeError here
    # and takes the hooked path, so the output is the same either way.
    try:
        out = orjson.dumps(value, option=_ORJSON_OPTIONS)
    except TypeError:
        return _dumpb_hooked(value)
    # (find, not `in`: bytes.__contains__ first tries the needle as an int, which costs more
    # than the search on a message-sized text; this runs for every message)
    if out.find(b'{"$') >= 0 or (out.find(b"null") >= 0 and _may_hold_nonfinite(value)):
        return _dumpb_exact(value)  # a `$` key to escape, or maybe a NaN/inf written as null
    return out


def _dumpb_hooked(value: Any) -> bytes:
    try:
        out, produced = _dumps_with_hook(value)
    except TypeError:  # unsafe int, non-str key, unknown type: the exact path decides/raises
        return _dumpb_exact(value)
    if (out.find(b'{"$') >= 0 and out.count(b'{"$') != produced) or (
        out.find(b"null") >= 0 and _may_hold_nonfinite(value)
    ):
        return _dumpb_exact(value)
    return out


def _dumps_with_hook(value: Any) -> tuple[bytes, int]:
    """orjson's text of `value`, converting what it does not know to EJSON, and how many
    `{"$` objects the hook made (any other `{"$` in the text may need `$escape`). Raises
    TypeError where only the exact path can decide."""
    produced = 0

    def default(obj: Any) -> Any:
        nonlocal produced
        custom = _custom_for(obj)
        if custom is not None:
            fragment = _custom_fragment(custom, obj)
            produced += fragment.count(b'{"$')
            return orjson.Fragment(fragment)
        if isinstance(obj, datetime):
            produced += 1
            return {"$date": datetime_to_ms(obj)}
        if isinstance(obj, date):
            produced += 1
            return {"$date": _date_to_ms(obj)}
        if isinstance(obj, bytes | bytearray | memoryview):
            produced += 1
            return _binary_to_json(obj)
        if isinstance(obj, Decimal):
            converted = decimal_to_json(obj)
            if type(converted) is dict:
                produced += 1
            return converted
        if isinstance(obj, EJSONRegExp):
            produced += 1
            return {"$regexp": obj.source, "$flags": obj.flags}
        if isinstance(obj, set | frozenset):
            return list(obj)
        converted = _to_json_other(obj)  # time, timedelta, IP addresses, ...; raises if unknown
        if isinstance(converted, dict):
            raise TypeError  # unexpected `$` form: let the exact path handle it
        return converted

    out = orjson.dumps(value, default=default, option=_ORJSON_OPTIONS)
    return out, produced


# Between the values of a batch: a byte JSON text never holds raw (control characters inside
# strings are escaped, and compact output has no whitespace), so the batch splits on it.
_BATCH_SEPARATOR = orjson.Fragment(b"\x1e")
_BATCH_SPLIT = b",\x1e,"


def dumpb_many(values: Sequence[Any]) -> list[bytes]:
    """``[dumpb(v) for v in values]`` with one orjson call for the lot (a large initial
    result: the per-call overhead and the output checks dominate for small messages). Only
    the values whose text might differ from :func:`dumpb`'s are encoded again, one by one."""
    if len(values) < 2:
        return [dumpb(value) for value in values]
    items: list[Any] = [_BATCH_SEPARATOR] * (2 * len(values) - 1)
    items[::2] = values
    try:
        out = orjson.dumps(items, option=_ORJSON_OPTIONS)
        produced = 0
    except TypeError:
        try:
            out, produced = _dumps_with_hook(items)
        except TypeError:
            return [dumpb(value) for value in values]
    pieces = out[1:-1].split(_BATCH_SPLIT)
    # No `$` at all (a memchr, ~100x cheaper than the count): nothing to escape, and the hook
    # produced no `$` form either (produced is 0).
    escape_suspect = out.find(b"$") >= 0 and out.count(b'{"$') != produced
    if escape_suspect or out.find(b"null") >= 0:
        # Some piece may hold an object needing `$escape` or a non-finite float written as
        # null: those pieces take the single-value path (which decides exactly).
        return [dumpb(value) if (escape_suspect and piece.find(b'{"$') >= 0) or (
                    piece.find(b"null") >= 0 and _may_hold_nonfinite(value)) else piece
                for value, piece in zip(values, pieces, strict=True)]
    return pieces


def _dumpb_exact(value: Any) -> bytes:
    try:
        return orjson.dumps(to_json_value(value))
    except RecursionError:
        raise EJSONError("value nested too deeply") from None
    except TypeError as exc:  # orjson's own limits (nesting depth)
        raise EJSONError(str(exc)) from None


def dumps(value: Any) -> str:
    """EJSON text of `value` (Meteor's `EJSON.stringify`, compact)."""
    return dumpb(value).decode()


# ---- decoder ---------------------------------------------------------------------------------

def _filter_regexp_flags(flags: str) -> str:
    # Meteor: first 50 chars, only g/i/m/u/y, and a repeated flag keeps its last occurrence.
    kept = [ch for ch in flags[:50] if ch in "gimuy"]
    return "".join(ch for i, ch in enumerate(kept) if ch not in kept[i + 1:])


def _is_number(value: Any) -> bool:
    return type(value) is int or type(value) is float


def _decode_form(obj: dict[str, Any]) -> Any:
    """Decode `obj` if it is one of the `$` forms, else return it unchanged (not recursing)."""
    size = len(obj)
    if size == 1:
        key, inner = next(iter(obj.items()))
        if key == "$date":
            if not _is_number(inner):
                raise EJSONError("$date must be a number")
            try:
                return ms_to_datetime(inner)
            except (OverflowError, ValueError):
                raise EJSONError(f"$date out of range: {inner!r}") from None
        if key == "$InfNaN":
            if not _is_number(inner):
                raise EJSONError("$InfNaN must be a number")
            return math.inf if inner > 0 else (-math.inf if inner < 0 else math.nan)
        if key == "$binary":
            if not isinstance(inner, str):
                raise EJSONError("$binary must be a string")
            try:
                return base64.b64decode(inner, validate=True)
            except (binascii.Error, ValueError):
                raise EJSONError("$binary is not valid base64") from None
        if key == "$escape":
            if not isinstance(inner, dict):
                raise EJSONError("$escape must hold an object")
            return {k: from_json_value(v) for k, v in inner.items()}
    elif size == 2:
        if "$regexp" in obj and "$flags" in obj:
            source, flags = obj["$regexp"], obj["$flags"]
            if not isinstance(source, str) or not isinstance(flags, str):
                raise EJSONError("$regexp and $flags must be strings")
            return EJSONRegExp(source, _filter_regexp_flags(flags))
        if "$type" in obj and "$value" in obj:
            custom = _types_by_name.get(obj["$type"]) if isinstance(obj["$type"], str) else None
            if custom is None:
                raise EJSONError(f"Custom EJSON type {obj['$type']!r} is not defined")
            try:
                return custom.from_json(obj["$value"])
            except EJSONError:
                raise
            except Exception as exc:  # a factory's own failure is still just bad input
                raise EJSONError(f"cannot decode $type {custom.name!r}: {exc}") from None
    return obj


def from_json_value(value: Any) -> Any:
    """Python value of parsed JSON (Meteor's `EJSON.fromJSONValue`). Input is not modified."""
    kind = type(value)
    if kind is dict:
        # only objects of at most two keys, all starting with `$`, are candidates (Meteor)
        if len(value) <= 2 and all(key[:1] == "$" for key in value):
            decoded = _decode_form(value)
            if decoded is not value:
                return decoded
        return {key: from_json_value(item) for key, item in value.items()}
    if kind is list:
        return [from_json_value(item) for item in value]
    return value


def _may_hold_forms(text: str | bytes) -> bool:
    # a `$` key shows up as `"$` or, written escaped, `"\u0024`
    if isinstance(text, str):
        return '"$' in text or "\\u0024" in text
    return text.find(b'"$') >= 0 or text.find(b"\\u0024") >= 0  # (find: see dumpb)


def loads(text: str | bytes) -> Any:
    """Parse EJSON text (Meteor's `EJSON.parse`). Raises `EJSONError` on bad JSON or bad forms."""
    try:
        parsed = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise EJSONError(f"invalid JSON: {exc}") from None
    if not _may_hold_forms(text):
        return parsed
    try:
        return from_json_value(parsed)
    except RecursionError:
        raise EJSONError("value nested too deeply") from None
