"""Primary key → document id → wire id, against Meteor's MongoID.idStringify / idParse."""

from __future__ import annotations

from uuid import UUID

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdcddp.publish.ids import (
    IdError,
    ObjectID,
    doc_id_to_pk,
    id_parse,
    id_stringify,
    pk_to_doc_id,
    pk_to_wire_id,
)

HEX24 = "0123456789abcdef01234567"

# (document _id, wire id) pairs, following packages/mongo-id/id.js branch by branch.
STRINGIFY_VECTORS = [
    ("", ""),  # id === '' → returned as is
    ("abc", "abc"),  # other strings go through unchanged
    ("42", "42"),  # a numeric-looking string is still a string
    ("[7,\"en\"]", "[7,\"en\"]"),  # our composite ids pass unchanged ('[' is not special)
    ("-", "--"),  # firstChar '-' → escaped
    ("-abc", "--abc"),
    ("--", "---"),
    ("~5", "-~5"),  # firstChar '~' → escaped
    ("{a}", "-{a}"),  # firstChar '{' → escaped
    (HEX24, "-" + HEX24),  # _looksLikeObjectID: 24 chars of [0-9a-f] → escaped
    (HEX24.upper(), HEX24.upper()),  # the regexp is lower-case only: unchanged
    (HEX24[:-1], HEX24[:-1]),  # 23 hex chars: unchanged
    (HEX24 + "0", HEX24 + "0"),  # 25 hex chars: unchanged
    ("a-b~c{", "a-b~c{"),  # only the first character matters
    ("日本", "日本"),
]

# Non-string ids: `~` + JSON.stringify, ObjectIDs as their hex.
OTHER_VECTORS = [
    (5, "~5"),
    (-1, "~-1"),
    (True, "~true"),
    (False, "~false"),
    (None, "~null"),
    (ObjectID(HEX24), HEX24),
]


@pytest.mark.parametrize(("doc_id", "wire"), STRINGIFY_VECTORS + OTHER_VECTORS)
def test_id_stringify_and_parse_follow_meteor(doc_id: object, wire: str) -> None:
    assert id_stringify(doc_id) == wire  # type: ignore[arg-type]
    assert id_parse(wire) == doc_id


def test_id_parse_special_forms() -> None:
    assert id_parse("~\"x\"") == "x"  # a JSON string after '~'
    assert id_parse("~1.5") == 1.5
    assert id_parse(HEX24) == ObjectID(HEX24)  # unescaped 24-hex is an ObjectID
    with pytest.raises(IdError, match="undefined"):
        id_parse("-")  # Meteor's encoding of undefined
    with pytest.raises(IdError):
        id_parse("~{not json")
    with pytest.raises(IdError):
        ObjectID("XYZ")
    with pytest.raises(IdError):
        id_stringify(1.5)  # type: ignore[arg-type]  # JS number formatting: not needed, refused


@given(st.text())
def test_every_string_id_round_trips(doc_id: str) -> None:
    assert id_parse(id_stringify(doc_id)) == doc_id


def test_single_column_keys() -> None:
    uuid = UUID("12345678-1234-5678-1234-567812345678")
    assert pk_to_doc_id(["abc"]) == "abc"
    assert pk_to_doc_id([42]) == "42"
    assert pk_to_doc_id([-7]) == "-7"
    assert pk_to_doc_id([2**70]) == str(2**70)
    assert pk_to_doc_id([uuid]) == "12345678-1234-5678-1234-567812345678"
    # The wire form escapes what Meteor would misread:
    assert pk_to_wire_id([-7]) == "--7"
    assert pk_to_wire_id([HEX24]) == "-" + HEX24
    assert pk_to_wire_id(["{x"]) == "-{x"
    assert pk_to_wire_id([42]) == "42"
    assert doc_id_to_pk("42", [int]) == (42,)
    assert doc_id_to_pk("-7", [int]) == (-7,)
    assert doc_id_to_pk("abc", [str]) == ("abc",)
    assert doc_id_to_pk(str(uuid), [UUID]) == (uuid,)


def test_composite_keys_are_compact_json_arrays() -> None:
    uuid = UUID(int=1)
    assert pk_to_doc_id([7, "en"]) == '[7,"en"]'
    assert pk_to_doc_id(["a\"b", "é", 0]) == '["a\\"b","é",0]'
    assert pk_to_doc_id([uuid, -1]) == '["00000000-0000-0000-0000-000000000001",-1]'
    assert pk_to_wire_id([7, "en"]) == '[7,"en"]'
    assert doc_id_to_pk('[7,"en"]', [int, str]) == (7, "en")
    assert doc_id_to_pk('["00000000-0000-0000-0000-000000000001",-1]', [UUID, int]) == (uuid, -1)


@pytest.mark.parametrize(("doc_id", "types"), [
    ("007", [int]), ("+7", [int]), (" 7", [int]), ("1_000", [int]), ("7.0", [int]), ("", [int]),
    ("12345678-1234-5678-1234-56781234567X", [UUID]),
    ("12345678123456781234567812345678", [UUID]),  # parses, but is not the canonical form
    ('[7, "en"]', [int, str]),  # not the canonical (compact) form
    ('[7,"en"]', [int, str, str]),
    ('["7","en"]', [int, str]),
    ('[true,"en"]', [int, str]),
    ('{"a":1}', [int, str]),
    ("[7", [int, str]),
])
def test_ids_that_are_not_canonical_keys_are_refused(doc_id: str, types: list[type]) -> None:
    with pytest.raises(IdError):
        doc_id_to_pk(doc_id, types)  # type: ignore[arg-type]


@pytest.mark.parametrize("values", [[], [None], [True], [1.5], [b"x"], [1, None]])
def test_unsupported_key_values_are_refused(values: list[object]) -> None:
    with pytest.raises(IdError):
        pk_to_doc_id(values)


keys = st.lists(st.one_of(st.integers(), st.text(), st.uuids()), min_size=1, max_size=4)


@given(keys)
def test_keys_round_trip_through_doc_and_wire_ids(values: list[object]) -> None:
    types = [type(v) for v in values]
    doc_id = pk_to_doc_id(values)
    assert doc_id_to_pk(doc_id, types) == tuple(values)  # type: ignore[arg-type]
    assert id_parse(pk_to_wire_id(values)) == doc_id
