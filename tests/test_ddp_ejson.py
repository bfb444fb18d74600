"""EJSON: exact wire forms, cross-checked against Meteor's own implementation (node)."""

from __future__ import annotations

import ipaddress
import json
import math
import random
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcddp.ddp import ejson, messages
from cdcddp.ddp.ejson import EJSONError, EJSONRegExp

JS_DIR = Path(__file__).parent / "js"
NODE = shutil.which("node")
needs_node = pytest.mark.skipif(
    NODE is None or not (JS_DIR / "node_modules" / "meteor-standalone-ejson").is_dir(),
    reason="node or meteor-standalone-ejson missing",
)


def run_node(mode: str, stdin: str = "") -> Any:
    proc = subprocess.run(
        [NODE or "node", str(JS_DIR / "ejson_check.js"), mode],
        input=stdin, capture_output=True, text=True, timeout=30, check=True, cwd=JS_DIR,
    )
    return json.loads(proc.stdout)


def ordered(value: Any) -> Any:
    """JSON value with key order made significant (1 and 1.0 still compare equal)."""
    if isinstance(value, dict):
        return [(key, ordered(item)) for key, item in value.items()]
    if isinstance(value, list):
        return [ordered(item) for item in value]
    return value


def same_json_text(ours: str, theirs: str) -> bool:
    return ordered(orjson.loads(ours)) == ordered(orjson.loads(theirs))


def same(a: Any, b: Any, numbers_by_value: bool = False) -> bool:
    """Deep equality, key order included, where NaN equals NaN. A float never equals an int
    unless `numbers_by_value` (JS prints 4.0 as 4)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if numbers_by_value and type(a) in (int, float) and type(b) in (int, float):
        return a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], numbers_by_value) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(
            same(x, y, numbers_by_value) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class ObjectID:
    def __init__(self, hex_string: str) -> None:
        self.hex = hex_string

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectID) and other.hex == self.hex

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture
def oid_type():
    ejson.register_type("oid", ObjectID, lambda o: o.hex, ObjectID)
    yield
    ejson.unregister_type("oid")


def utc_ms(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


# Python equivalents of the JS values in tests/js/ejson_check.js
PY_FIXTURES: dict[str, Any] = {
    "brief": {"a": utc_ms(0), "b": bytes([1, 2]), "c": {"$date": 5}, "d": math.inf},
    "dates": [utc_ms(-1), utc_ms(1700000000123), datetime(2024, 2, 29, tzinfo=UTC)],
    "infnan": [math.nan, math.inf, -math.inf, 1.5, -0.25],
    "binary": [b"", bytes([0, 255, 254]), b"hi!?"],
    "escapes": [
        {"$date": 5}, {"$InfNaN": 1}, {"$binary": "AQI="}, {"$escape": {"$date": 1}},
        {"$type": "oid", "$value": "x"}, {"$date": 5, "x": 1}, {"$foo": 1},
        {"$date": utc_ms(7)}, {"$type": "t", "$value": {"$date": utc_ms(3)}}, {},
    ],
    "nested": {"list": [{"deep": {"when": utc_ms(86400000)}}, [bytes([9])]], "s": "$date"},
    "custom": {"id": ObjectID("0123456789abcdef01234567")},
}


def test_brief_example_exact_text() -> None:
    value = {"a": datetime(1970, 1, 1), "b": bytes([1, 2]), "c": {"$date": 5}, "d": math.inf}
    assert ejson.dumps(value) == (
        '{"a":{"$date":0},"b":{"$binary":"AQI="},"c":{"$escape":{"$date":5}},'
        '"d":{"$InfNaN":1}}'
    )


@needs_node
def test_matches_meteor_encoding_and_decoding(oid_type: None) -> None:
    meteor = run_node("fixtures")
    assert set(meteor) == set(PY_FIXTURES)
    for name, value in PY_FIXTURES.items():
        assert ejson.dumps(value) == meteor[name], name  # byte-for-byte
        assert same_or_equal(ejson.loads(meteor[name]), value), name


def same_or_equal(a: Any, b: Any) -> bool:
    return same(a, b) or a == b


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Values whose JSON text JS and Python print alike (no integral floats, no int keys)."""
    kinds = ["none", "bool", "int", "float", "str", "date", "bytes", "nonfinite"]
    if depth < 3:
        kinds += ["list", "dict", "dict", "dollar"]
    kind = rng.choice(kinds)
    if kind == "none":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.randint(-(2**53) + 1, 2**53 - 1)
    if kind == "float":
        return rng.choice([0.5, -2.25, 3.141592653589793, 1e-7, 6.02e23]) * rng.randint(1, 9) + 0.5
    if kind == "str":
        return rng.choice(["", "$date", "héllo", "a\"b\\c", "\u2028", "{\"$x\":1}", "😀"])
    if kind == "date":
        return utc_ms(rng.randint(-(10**12), 10**13))
    if kind == "bytes":
        return bytes(rng.randrange(256) for _ in range(rng.randrange(7)))
    if kind == "nonfinite":
        return rng.choice([math.nan, math.inf, -math.inf])
    if kind == "list":
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["$date", "$binary", "$InfNaN", "$escape", "$type", "$value", "$foo", "a", "b", "_c"]
    if kind == "dollar":  # exactly the shapes that need escaping
        shape = rng.choice([["$date"], ["$binary"], ["$InfNaN"], ["$escape"],
                            ["$type", "$value"], ["$value", "$type"]])
        return {key: random_value(rng, depth + 1) for key in shape}
    return {rng.choice(keys): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


@needs_node
def test_meteor_decodes_and_reencodes_our_output_identically() -> None:
    rng = random.Random(20240501)
    values = [random_value(rng) for _ in range(400)]
    ours = [ejson.dumps(v) for v in values]
    theirs = run_node("roundtrip", json.dumps(ours))
    for value, our_text, their_text in zip(values, ours, theirs, strict=True):
        assert isinstance(their_text, str), (value, their_text)
        assert same_json_text(our_text, their_text), (value, our_text, their_text)
        # and we read Meteor's text back to the same Python value
        assert same(ejson.loads(their_text), ejson.loads(our_text), numbers_by_value=True)


@needs_node
def test_unknown_custom_type_is_refused_like_meteor() -> None:
    text = '{"x":{"$type":"nope","$value":1}}'
    assert "error" in run_node("roundtrip", json.dumps([text]))[0]
    with pytest.raises(EJSONError, match="not defined"):
        ejson.loads(text)


# ---- Python-side rules -----------------------------------------------------------------------

def test_datetime_rules() -> None:
    # naive = UTC; aware converted; microseconds floored to ms like a JS Date (also before 1970)
    assert ejson.to_json_value(datetime(2020, 1, 1, 0, 0, 0, 999)) == {"$date": 1577836800000}
    plus2 = timezone(timedelta(hours=2))
    assert ejson.dumps(datetime(1970, 1, 1, 2, tzinfo=plus2)) == '{"$date":0}'
    assert ejson.dumps(datetime(1969, 12, 31, 23, 59, 59, 999_500)) == '{"$date":-1}'
    assert ejson.dumps(date(1970, 1, 2)) == '{"$date":86400000}'
    decoded = ejson.loads('{"$date":1577836800123}')
    assert decoded == datetime(2020, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)
    assert decoded.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Decimal("12.34"), "12.34"),
        (Decimal("-0.5"), "-0.5"),
        (Decimal("42"), "42"),
        (Decimal("1E+2"), "100"),
        (Decimal("42.000"), "42"),
        (Decimal("9007199254740991"), "9007199254740991"),
        (Decimal("9007199254740992"), '"9007199254740992"'),  # 2**53: not a safe integer
        (Decimal("0.1000000000000000000001"), '"0.1000000000000000000001"'),
        (Decimal("12345678901234567890.5"), '"12345678901234567890.5"'),
        (Decimal("1E-30"), "1e-30"),
        (Decimal("NaN"), '{"$InfNaN":0}'),
        (Decimal("-Infinity"), '{"$InfNaN":-1}'),
    ],
)
def test_decimal_rules(value: Decimal, wire: str) -> None:
    assert ejson.dumps(value) == wire
    assert ejson.dumps([value]) == f"[{wire}]"


def test_other_python_types() -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    assert ejson.dumps(u) == '"12345678-1234-5678-1234-567812345678"'
    assert ejson.dumps(timedelta(hours=1)) == "3600"
    assert ejson.dumps(timedelta(seconds=1, milliseconds=500)) == "1.5"
    assert ejson.dumps(dtime(12, 30, 1)) == '"12:30:01"'
    assert ejson.dumps((1, 2)) == "[1,2]"
    assert ejson.dumps({"s": {3}}) == '{"s":[3]}'
    assert ejson.dumps(frozenset()) == "[]"
    assert ejson.dumps(ipaddress.ip_address("10.0.0.1")) == '"10.0.0.1"'
    assert ejson.dumps(bytearray(b"\x01\x02")) == '{"$binary":"AQI="}'
    assert ejson.dumps(memoryview(b"\x01\x02")) == '{"$binary":"AQI="}'
    # integers a JS number cannot hold exactly go as strings
    assert ejson.dumps(2**53 - 1) == "9007199254740991"
    assert ejson.dumps({"n": 2**53}) == '{"n":"9007199254740992"}'
    assert ejson.dumps([-(2**70)]) == f'["{-(2**70)}"]'
    with pytest.raises(EJSONError):
        ejson.dumps(object())


def test_dataclass_and_set_with_special_contents() -> None:
    @dataclass
    class Row:
        a: Any
        b: Any

    assert ejson.dumps(Row({"$date": 1}, math.nan)) == (
        '{"a":{"$escape":{"$date":1}},"b":{"$InfNaN":0}}'
    )
    assert ejson.dumps({"s": frozenset([math.inf])}) == '{"s":[{"$InfNaN":1}]}'


def test_regexp_forms() -> None:
    assert ejson.dumps(EJSONRegExp("a.b", "gi")) == '{"$regexp":"a.b","$flags":"gi"}'
    # Meteor keeps only gimuy, the last of repeated flags, and at most 50 chars of input
    assert ejson.loads('{"$regexp":"x","$flags":"igxgm"}') == EJSONRegExp("x", "igm")
    assert ejson.dumps({"$regexp": "x", "$flags": ""}) == (
        '{"$escape":{"$regexp":"x","$flags":""}}'
    )
    assert ejson.loads('{"$escape":{"$regexp":"x","$flags":""}}') == {"$regexp": "x",
                                                                      "$flags": ""}


def test_custom_type_roundtrip(oid_type: None) -> None:
    text = ejson.dumps({"_id": ObjectID("ab" * 12), "when": utc_ms(1)})
    assert text == '{"_id":{"$type":"oid","$value":"' + "ab" * 12 + '"},"when":{"$date":1}}'
    assert ejson.loads(text) == {"_id": ObjectID("ab" * 12), "when": utc_ms(1)}
    with pytest.raises(ValueError, match="already"):
        ejson.register_type("oid", ObjectID, str, str)


def test_decoding_forms_and_errors() -> None:
    assert ejson.loads('{"$InfNaN":-1}') == -math.inf
    assert math.isnan(ejson.loads('{"$InfNaN":0}'))
    assert ejson.loads('{"$binary":"AQI="}') == b"\x01\x02"
    assert ejson.loads('{"$escape":{"$date":{"$date":0}}}') == {"$date": utc_ms(0)}
    # a `$` key written with a \u escape is still a `$` key
    assert ejson.loads('{"\\u0024date":0}') == utc_ms(0)
    # not candidates: a non-$ key, or more than two keys
    assert ejson.loads('{"$date":0,"x":1}') == {"$date": 0, "x": 1}
    assert ejson.loads('{"$date":0,"$binary":"","$x":1}') == {"$date": 0, "$binary": "",
                                                              "$x": 1}
    assert ejson.loads('{"$date":0,"$x":{"$date":0}}') == {"$date": 0, "$x": utc_ms(0)}
    for bad in ('{"$date":"yesterday"}', '{"$binary":"***"}', '{"$binary":5}',
                '{"$escape":3}', '{"$type":"nope","$value":1}', '{"$InfNaN":"x"}',
                '{"$date":1e300}', "not json", "[1,"):
        with pytest.raises(EJSONError):
            ejson.loads(bad)


# ---- properties ------------------------------------------------------------------------------

dollar_keys = st.sampled_from(
    ["$date", "$binary", "$InfNaN", "$escape", "$type", "$value", "$regexp", "$flags", "$x",
     "a", "b"]
)
ms_datetimes = st.integers(-(10**13), 10**13).map(utc_ms)
leaves = (
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8) | ms_datetimes
    | st.binary(max_size=8)
)
ejson_values = st.recursive(
    leaves,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(dollar_keys | st.text(max_size=4), children, max_size=3),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(ejson_values)
def test_roundtrip_property(value: Any) -> None:
    text = ejson.dumps(value)
    assert same(ejson.loads(text), value)
    # the fast path and the exact walk agree byte for byte
    assert text.encode() == orjson.dumps(ejson.to_json_value(value))


extra_leaves = st.decimals(allow_nan=True) | st.integers() | st.timedeltas() | st.uuids()


@settings(max_examples=200, deadline=None)
@given(st.recursive(leaves | extra_leaves,
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(dollar_keys, c,
                                                                        max_size=2),
                    max_leaves=10))
def test_fast_path_equals_exact_path_for_all_types(value: Any) -> None:
    assert ejson.dumpb(value) == orjson.dumps(ejson.to_json_value(value))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.recursive(leaves | extra_leaves,
                             lambda c: st.lists(c, max_size=3)
                             | st.dictionaries(dollar_keys | st.text(max_size=3), c,
                                               max_size=3),
                             max_leaves=8), max_size=12))
def test_batch_encoding_equals_encoding_each_value(values: list[Any]) -> None:
    # One orjson call for the lot, split apart: the same bytes as one call per value,
    # whatever mix of hooked types, `$` keys, non-finite floats and nulls the batch holds.
    assert ejson.dumpb_many(values) == [ejson.dumpb(value) for value in values]


def test_batch_encoding_splits_only_between_values() -> None:
    # Control characters (the split marker among them) stay escaped inside strings.
    values = ["a\x1eb", {"k": ",\x1e,"}, [1, "\x1e"], {"$date": 1}, float("nan"), None]
    assert ejson.dumpb_many(values) == [ejson.dumpb(value) for value in values]
    assert len(ejson.dumpb_many(values)) == len(values)


def test_batch_encoding_with_and_without_any_dollar() -> None:
    # No `$` anywhere (the scan for `{"$` is skipped), a `$` only inside strings (scanned,
    # nothing to escape), and a `$` key nested in one value (that value is escaped).
    plain = [{"msg": "added", "id": str(i), "fields": {"n": i, "s": "x"}} for i in range(3)]
    in_strings = [{"a": "$date", "b": "{\"$x"}, {"$": 1, "k": ["$"]}, "$"]
    nested = [{"a": 1}, {"fields": {"d": {"$date": 5}}}, {"b": [{"$escape": {}}]}, {"c": 2}]
    hooked = [{"t": datetime(2024, 1, 1, tzinfo=UTC)}, {"k": "$x"}, {"x": {"$binary": "AA=="}}]
    for values in (plain, in_strings, nested, hooked):
        assert ejson.dumpb_many(values) == [ejson.dumpb(value) for value in values]
    assert ejson.dumpb_many(nested)[1] == b'{"fields":{"d":{"$escape":{"$date":5}}}}'


def test_dumps_throughput_of_a_typical_changed_message() -> None:
    fields = {"title": "Buy milk", "done": False, "priority": 3, "score": 0.75,
              "updated_at": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), "note": None}
    n = 20_000
    start = time.perf_counter()
    for _ in range(n):
        messages.changed("todos", "x7Yk2", fields, ["tag"])
    elapsed = time.perf_counter() - start
    rate = n / elapsed
    print(f"changed messages encoded: {rate:,.0f}/s")
    assert messages.changed("todos", "x7Yk2", fields, ["tag"]) == (
        '{"msg":"changed","collection":"todos","id":"x7Yk2","fields":{"title":"Buy milk",'
        '"done":false,"priority":3,"score":0.75,"updated_at":{"$date":1714564800123},'
        '"note":null},"cleared":["tag"]}'
    )
    assert rate > 20_000  # generous floor for slow CI; measured ~210-260k/s here (2 cores)
