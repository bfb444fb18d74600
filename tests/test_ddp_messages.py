"""DDP message models: client-message validation, server-message rendering, MeteorError."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from cdcddp.ddp import messages as m
from cdcddp.ddp.messages import DDPProtocolError, MeteorError


def parsed(text: str) -> Any:
    return json.loads(text)


# ---- MeteorError -----------------------------------------------------------------------------

def test_meteor_error_wire_shape_and_key_order() -> None:
    err = MeteorError.method_not_found("x")
    assert list(err.to_ddp().items()) == [
        ("isClientSafe", True), ("error", 404), ("reason", "Method 'x' not found"),
        ("message", "Method 'x' not found [404]"), ("errorType", "Meteor.Error"),
    ]
    assert MeteorError.subscription_not_found("p").to_ddp()["reason"] == (
        "Subscription 'p' not found"
    )
    internal = MeteorError.internal().to_ddp()
    assert (internal["error"], internal["reason"]) == (500, "Internal server error")
    assert MeteorError.bad_request().to_ddp()["error"] == 400
    with_details = MeteorError("validation-error", "Bad title", {"field": "title"}).to_ddp()
    assert with_details["details"] == {"field": "title"}
    assert with_details["message"] == "Bad title [validation-error]"
    no_reason = MeteorError(403).to_ddp()
    assert "reason" not in no_reason and no_reason["message"] == "[403]"


def test_result_and_nosub_render_errors() -> None:
    assert parsed(m.result("7", error=MeteorError.method_not_found("nope"))) == {
        "msg": "result", "id": "7",
        "error": {"isClientSafe": True, "error": 404, "reason": "Method 'nope' not found",
                  "message": "Method 'nope' not found [404]", "errorType": "Meteor.Error"},
    }
    assert parsed(m.nosub("s1", MeteorError.subscription_not_found("p")))["error"]["reason"] == (
        "Subscription 'p' not found"
    )
    assert m.nosub("s1") == '{"msg":"nosub","id":"s1"}'
    assert m.nosub(None) == '{"msg":"nosub"}'


# ---- server messages -------------------------------------------------------------------------

def test_server_messages_exact_text() -> None:
    assert m.server_id() == '{"server_id":"0"}'
    assert m.connected("abc") == '{"msg":"connected","session":"abc"}'
    assert m.failed("1") == '{"msg":"failed","version":"1"}'
    assert m.ping() == '{"msg":"ping"}'
    assert m.pong() == '{"msg":"pong"}'
    assert m.pong("h1") == '{"msg":"pong","id":"h1"}'
    assert m.ready(["a", "b"]) == '{"msg":"ready","subs":["a","b"]}'
    assert m.updated(["1"]) == '{"msg":"updated","methods":["1"]}'
    assert m.removed("c", "X") == '{"msg":"removed","collection":"c","id":"X"}'


def test_data_messages_exact_text() -> None:
    when = datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)
    assert m.added("c", "X", {"a": 1, "t": when}) == (
        '{"msg":"added","collection":"c","id":"X","fields":{"a":1,"t":{"$date":1000}}}'
    )
    assert m.added("c", "X", {}) == '{"msg":"added","collection":"c","id":"X"}'
    assert m.added("c", "X", None) == '{"msg":"added","collection":"c","id":"X"}'
    assert m.changed("c", "X", {"a": 2}, ["b", "c"]) == (
        '{"msg":"changed","collection":"c","id":"X","fields":{"a":2},"cleared":["b","c"]}'
    )
    assert m.changed("c", "X", None, ["b"]) == (
        '{"msg":"changed","collection":"c","id":"X","cleared":["b"]}'
    )
    assert m.changed("c", "X", {"a": None}, []) == (
        '{"msg":"changed","collection":"c","id":"X","fields":{"a":null}}'
    )
    # jsonb content that looks like EJSON is escaped
    assert m.added("c", "X", {"j": {"$date": 5}}) == (
        '{"msg":"added","collection":"c","id":"X","fields":{"j":{"$escape":{"$date":5}}}}'
    )


def test_encode_added_equals_encoding_each_added_message() -> None:
    documents: list[tuple[str, Any]] = [
        ("1", {"a": 1}), ("2", {}), ("3", None), ("4", {"j": {"$date": 5}}),  # `$`: escaped
        ("-x", {"when": datetime(2024, 5, 1, tzinfo=UTC), "f": float("nan")}),
        ('q"\\u', {"é": "ü\n", "nested": {"$x": [1, {"y": None}]}, "b": b"\x00"}),
        ("5", {"big": 2**60, "neg": -0.0, "inf": float("-inf")}),
    ]
    expected = [m.encode(m.added_message("c", d, f)) for d, f in documents]
    assert m.encode_added("c", documents) == expected
    assert m.encode_added('c"\\', documents[:1]) == [
        m.encode(m.added_message('c"\\', *documents[0]))]
    assert m.encode_added("c", [documents[0]]) == expected[:1]  # one: no batch
    assert m.encode_added("c", []) == []


def test_result_undefined_vs_null() -> None:
    assert m.result("1") == '{"msg":"result","id":"1"}'
    assert m.result("1", None) == '{"msg":"result","id":"1","result":null}'
    assert m.result("1", {"b": b"\x00"}) == (
        '{"msg":"result","id":"1","result":{"b":{"$binary":"AA=="}}}'
    )


def test_error_echoes_offending_message_verbatim() -> None:
    assert m.error("Bad request") == '{"msg":"error","reason":"Bad request"}'
    offending = {"msg": "x", "params": [{"$date": 1}]}
    assert parsed(m.error("Bad request", offending)) == {
        "msg": "error", "reason": "Bad request", "offendingMessage": offending,
    }


# ---- client messages -------------------------------------------------------------------------

def test_parse_valid_client_messages() -> None:
    assert m.parse_client_message('{"msg":"connect","version":"1","support":["1","pre2"]}') == (
        m.Connect("1", ["1", "pre2"], None)
    )
    assert m.parse_client_message('{"msg":"ping"}') == m.Ping(None)
    assert m.parse_client_message('{"msg":"ping","id":"a"}') == m.Ping("a")
    assert m.parse_client_message('{"msg":"pong","id":"a"}') == m.Pong("a")
    assert m.parse_client_message('{"msg":"sub","id":"s","name":"p"}') == m.Sub("s", "p", [])
    assert m.parse_client_message('{"msg":"unsub"}') == m.Unsub(None)
    method = m.parse_client_message(
        '{"msg":"method","id":"1","method":"echo","params":[{"$date":0}],"randomSeed":"r",'
        '"extra":true}'
    )
    assert method == m.Method("1", "echo", [datetime(1970, 1, 1, tzinfo=UTC)], "r")


@pytest.mark.parametrize(
    ("text", "reason", "offending"),
    [
        ("not json", m.BAD_REQUEST, m.UNDEFINED),
        ("42", m.BAD_REQUEST, m.UNDEFINED),
        ('"msg"', m.BAD_REQUEST, m.UNDEFINED),
        ("[1]", m.BAD_REQUEST, [1]),
        ('{"foo":"bar"}', m.BAD_REQUEST, {"foo": "bar"}),
        ('{"msg":""}', m.BAD_REQUEST, {"msg": ""}),
        ('{"msg":5}', m.BAD_REQUEST, {"msg": 5}),
        ('{"msg":"frobnicate"}', m.BAD_REQUEST, {"msg": "frobnicate"}),
        ('{"msg":"method","id":"1","params":[{"$type":"zz","$value":1}]}', m.PARSE_ERROR,
         m.UNDEFINED),
        ('{"msg":"sub","name":"p"}', m.MALFORMED_SUB, {"msg": "sub", "name": "p"}),
        ('{"msg":"sub","id":"s"}', m.MALFORMED_SUB, {"msg": "sub", "id": "s"}),
        ('{"msg":"sub","id":5,"name":"p"}', m.MALFORMED_SUB, {"msg": "sub", "id": 5,
                                                               "name": "p"}),
        ('{"msg":"sub","id":"s","name":"p","params":"x"}', m.MALFORMED_SUB,
         {"msg": "sub", "id": "s", "name": "p", "params": "x"}),
        ('{"msg":"method","id":"1"}', m.MALFORMED_METHOD, {"msg": "method", "id": "1"}),
        ('{"msg":"method","method":"echo"}', m.MALFORMED_METHOD,
         {"msg": "method", "method": "echo"}),
        ('{"msg":"method","id":"1","method":"e","params":{}}', m.MALFORMED_METHOD,
         {"msg": "method", "id": "1", "method": "e", "params": {}}),
        ('{"msg":"method","id":"1","method":"e","params":null}', m.MALFORMED_METHOD,
         {"msg": "method", "id": "1", "method": "e", "params": None}),
        ('{"msg":"method","id":"1","method":"e","params":[],"randomSeed":5}', m.MALFORMED_METHOD,
         {"msg": "method", "id": "1", "method": "e", "params": [], "randomSeed": 5}),
        ('{"msg":"ping","id":7}', m.BAD_REQUEST, {"msg": "ping", "id": 7}),
        ('{"msg":"unsub","id":7}', m.BAD_REQUEST, {"msg": "unsub", "id": 7}),
    ],
)
def test_bad_client_messages(text: str, reason: str, offending: Any) -> None:
    with pytest.raises(DDPProtocolError) as info:
        m.parse_client_message(text)
    assert info.value.reason == reason
    assert info.value.offending == offending


def test_offending_message_is_raw_json_not_decoded() -> None:
    with pytest.raises(DDPProtocolError) as info:
        m.parse_client_message('{"msg":"sub","name":"p","params":[{"$date":1}]}')
    assert info.value.offending == {"msg": "sub", "name": "p", "params": [{"$date": 1}]}


@pytest.mark.parametrize(
    ("connect", "expected"),
    [
        (m.Connect("1", ["1", "pre2", "pre1"]), ("1", True)),
        (m.Connect("pre2", ["pre2", "pre1"]), ("pre2", True)),
        (m.Connect("pre1", ["pre1"]), ("pre1", True)),
        (m.Connect("pre1", ["1", "pre1"]), ("1", False)),  # a better version exists
        (m.Connect("2", ["2"]), ("1", False)),  # nothing in common
        (m.Connect("2", ["2", "pre2"]), ("pre2", False)),
        (m.Connect(None, ["1"]), ("1", False)),
        (m.Connect("1", None), ("1", False)),
        (m.Connect("1", ["pre1"]), ("1", False)),  # support must contain version
    ],
)
def test_version_negotiation(connect: m.Connect, expected: tuple[str, bool]) -> None:
    assert m.negotiate_version(connect) == expected


def test_client_side_helpers_roundtrip() -> None:
    assert m.parse_client_message(m.client_connect()) == m.Connect("1", ["1"], None)
    assert m.parse_client_message(m.client_sub("s", "p", [1])) == m.Sub("s", "p", [1])
    assert m.parse_client_message(m.client_unsub("s")) == m.Unsub("s")
    when = datetime(2000, 1, 1, tzinfo=UTC)
    assert m.parse_client_message(m.client_method("1", "f", [when], "seed")) == (
        m.Method("1", "f", [when], "seed")
    )
    server = m.parse_server_message(m.added("c", "X", {"t": when, "j": {"$date": 1}}))
    assert server["fields"] == {"t": when, "j": {"$date": 1}}
    assert m.parse_server_message(m.result("1", b"\x01"))["result"] == b"\x01"
    assert m.parse_server_message(m.server_id()) == {"server_id": "0"}
