"""The sans-IO DDP session: feed messages and time in, read DDP messages and events out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cdcddp.ddp.messages import MeteorError
from cdcddp.ddp.session import (
    CloseRequested,
    MethodRequested,
    ServerSession,
    SessionConfig,
    SubscribeRequested,
    UnsubscribeRequested,
    random_id,
)

CONNECT = '{"msg":"connect","version":"1","support":["1","pre2","pre1"]}'


def sent(session: ServerSession) -> list[dict[str, Any]]:
    return [json.loads(text) for text in session.data_to_send()]


def connected(config: SessionConfig | None = None, now: float = 0.0) -> ServerSession:
    session = ServerSession(config, session_id="SESSION")
    session.opened(now)
    assert session.receive(CONNECT, now) == []
    assert sent(session) == [{"server_id": "0"}, {"msg": "connected", "session": "SESSION"}]
    return session


def assert_usable(session: ServerSession, now: float = 0.0) -> None:
    session.receive('{"msg":"ping","id":"still-there"}', now)
    assert sent(session) == [{"msg": "pong", "id": "still-there"}]


# ---- handshake -------------------------------------------------------------------------------

def test_connect_and_session_id() -> None:
    session = ServerSession(SessionConfig(send_server_id=False))
    session.opened(0)
    assert session.data_to_send() == []
    session.receive('{"msg":"connect","version":"1","support":["1"],"session":"old"}', 0)
    (message,) = sent(session)
    assert message["msg"] == "connected" and message["session"] == session.session_id
    assert message["session"] != "old"  # Meteor never resumes
    assert session.state == "connected" and session.version == "1"
    assert len(random_id()) == 17


@pytest.mark.parametrize(
    ("connect", "failed_version"),
    [
        ('{"msg":"connect","version":"pre1","support":["1","pre1"]}', "1"),
        ('{"msg":"connect","version":"2","support":["2"]}', "1"),
        ('{"msg":"connect","support":["1"]}', "1"),
        ('{"msg":"connect","version":"1"}', "1"),
        ('{"msg":"connect","version":"1","support":["pre1"]}', "1"),
    ],
)
def test_failed_version_negotiation_closes(connect: str, failed_version: str) -> None:
    session = ServerSession(SessionConfig(send_server_id=False))
    session.opened(0)
    events = session.receive(connect, 0)
    assert events == [CloseRequested(1000, "DDP version negotiation failed")]
    # optimistic messages after the failed connect are ignored
    assert session.receive('{"msg":"method","id":"1","method":"echo","params":[1]}', 0) == []
    assert sent(session) == [{"msg": "failed", "version": failed_version}]
    assert session.state == "closed"


def test_older_versions_connect() -> None:
    for version, support in (("pre2", ["pre2", "pre1"]), ("pre1", ["pre1"])):
        session = ServerSession(SessionConfig(send_server_id=False))
        session.receive(json.dumps({"msg": "connect", "version": version,
                                    "support": support}), 0)
        assert sent(session)[0]["msg"] == "connected"
        assert session.version == version


def test_messages_before_connect() -> None:
    session = ServerSession(SessionConfig(send_server_id=False))
    for text in ('{"msg":"ping","id":"a"}', '{"msg":"ping"}', '{"msg":"sub","id":"s","name":"p"}',
                 '{"msg":"unsub","id":"s"}', '{"msg":"method","id":"1","method":"m"}',
                 '{"msg":"sub"}'):
        assert session.receive(text, 0) == []
        assert sent(session) == [{"msg": "error", "reason": "Must connect first",
                                  "offendingMessage": json.loads(text)}]
    session.receive(CONNECT, 0)
    assert sent(session)[0]["msg"] == "connected"


def test_second_connect_is_an_error_and_keeps_the_session() -> None:
    session = connected()
    session.receive(CONNECT, 1)
    assert sent(session) == [{"msg": "error", "reason": "Already connected",
                              "offendingMessage": json.loads(CONNECT)}]
    assert session.state == "connected"
    assert_usable(session)


# ---- heartbeat -------------------------------------------------------------------------------

def test_ping_pong() -> None:
    session = connected()
    session.receive('{"msg":"ping","id":"h1"}', 1)
    session.receive('{"msg":"ping"}', 1)
    session.receive('{"msg":"pong","id":"zz"}', 1)
    assert session.data_to_send() == ['{"msg":"pong","id":"h1"}', '{"msg":"pong"}']


def test_server_pings_after_silence_and_closes_after_missed_pong() -> None:
    session = connected(SessionConfig(heartbeat_interval=10, heartbeat_timeout=5))
    assert session.next_deadline() == 10
    assert session.tick(9.9) == [] and session.data_to_send() == []
    assert session.tick(10) == []
    assert sent(session) == [{"msg": "ping"}]
    assert session.next_deadline() == 15
    assert session.tick(14.9) == [] and session.data_to_send() == []  # one ping, no repeats
    assert session.tick(15) == [CloseRequested(3000, "No response from heartbeat")]
    assert session.state == "closed"
    assert session.receive('{"msg":"ping"}', 16) == [] and session.data_to_send() == []


def test_any_message_counts_as_activity() -> None:
    session = connected(SessionConfig(heartbeat_interval=10, heartbeat_timeout=5))
    session.tick(10)
    assert sent(session) == [{"msg": "ping"}]
    # not a pong, and not even a valid message: still proof of life
    session.receive("garbage", 12)
    session.data_to_send()
    assert session.tick(17) == []
    assert session.next_deadline() == 22
    session.receive('{"msg":"pong"}', 21)
    assert session.tick(30.9) == [] and session.data_to_send() == []
    assert session.tick(31) == [] and sent(session) == [{"msg": "ping"}]
    session.receive('{"msg":"method","id":"1","method":"m"}', 34)
    assert session.tick(40) == [] and session.state == "connected"


def test_pre1_has_no_heartbeats() -> None:
    session = ServerSession(SessionConfig(send_server_id=False, heartbeat_interval=1))
    session.receive('{"msg":"connect","version":"pre1","support":["pre1"]}', 0)
    session.data_to_send()
    assert session.next_deadline() == float("inf")
    assert session.tick(100) == [] and session.data_to_send() == []
    session.receive('{"msg":"ping"}', 1)
    assert sent(session) == [{"msg": "error", "reason": "Bad request",
                              "offendingMessage": {"msg": "ping"}}]


def test_connect_timeout() -> None:
    session = ServerSession(SessionConfig(connect_timeout=45))
    session.opened(100)
    assert session.next_deadline() == 145
    assert session.tick(144) == []
    assert session.tick(145) == [CloseRequested(3001, "No connect message")]


# ---- errors: each answered, the session stays usable ------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("not json", {"msg": "error", "reason": "Bad request"}),
        ("42", {"msg": "error", "reason": "Bad request"}),
        ('{"foo":"bar"}', {"msg": "error", "reason": "Bad request",
                           "offendingMessage": {"foo": "bar"}}),
        ('{"msg":"frobnicate"}', {"msg": "error", "reason": "Bad request",
                                  "offendingMessage": {"msg": "frobnicate"}}),
        ('{"msg":"sub","id":"s","name":"p","params":"x"}',
         {"msg": "error", "reason": "Malformed subscription",
          "offendingMessage": {"msg": "sub", "id": "s", "name": "p", "params": "x"}}),
        ('{"msg":"sub","id":5,"name":"p"}',
         {"msg": "error", "reason": "Malformed subscription",
          "offendingMessage": {"msg": "sub", "id": 5, "name": "p"}}),
        ('{"msg":"method","id":"1","method":"e","params":{}}',
         {"msg": "error", "reason": "Malformed method invocation",
          "offendingMessage": {"msg": "method", "id": "1", "method": "e", "params": {}}}),
        ('{"msg":"method","id":"1","method":"e","params":[{"$type":"zz","$value":0}]}',
         {"msg": "error", "reason": "Parse error"}),
    ],
)
def test_bad_messages_get_error_and_session_survives(text: str, expected: dict[str, Any]) -> None:
    session = connected()
    assert session.receive(text, 1) == []
    assert sent(session) == [expected]
    assert_usable(session)
    assert session.pending_methods == frozenset()


def test_oversized_and_binary_messages() -> None:
    session = connected(SessionConfig(max_message_bytes=100))
    big = json.dumps({"msg": "method", "id": "1", "method": "m", "params": ["x" * 200]})
    assert session.receive(big, 1) == []
    assert sent(session) == [{"msg": "error", "reason": "Message too large"}]
    # 40 characters, but 120 bytes of UTF-8
    wide = json.dumps({"msg": "ping", "id": "€" * 36}, ensure_ascii=False)
    assert len(wide) <= 100 < len(wide.encode())
    session.receive(wide, 1)
    assert sent(session) == [{"msg": "error", "reason": "Message too large"}]
    session.receive(b'{"msg":"ping"}', 1)
    assert sent(session) == [{"msg": "error", "reason": "Binary frames are not supported"}]
    assert_usable(session)


# ---- subscriptions ---------------------------------------------------------------------------

def test_sub_unsub_bookkeeping() -> None:
    session = connected()
    events = session.receive('{"msg":"sub","id":"s1","name":"p","params":[1,{"$date":0}]}', 1)
    assert len(events) == 1 and isinstance(events[0], SubscribeRequested)
    assert (events[0].sub_id, events[0].name) == ("s1", "p")
    assert events[0].params[0] == 1 and events[0].params[1].year == 1970
    assert session.receive('{"msg":"sub","id":"s2","name":"p0"}', 1) == [
        SubscribeRequested("s2", "p0", [])
    ]
    assert session.subscriptions == {"s1", "s2"}
    # a duplicate id while active is ignored, as Meteor does
    assert session.receive('{"msg":"sub","id":"s1","name":"p"}', 1) == []
    session.ready(["s1", "s2"])
    assert sent(session) == [{"msg": "ready", "subs": ["s1", "s2"]}]

    assert session.receive('{"msg":"unsub","id":"s1"}', 2) == [UnsubscribeRequested("s1")]
    assert session.receive('{"msg":"unsub","id":"s1"}', 2) == []  # its nosub is coming
    assert session.data_to_send() == []
    session.removed("c", "A")
    session.nosub("s1")
    session.nosub("s1")  # never two nosubs
    session.ready(["s1"])  # nor a ready after nosub
    assert sent(session) == [{"msg": "removed", "collection": "c", "id": "A"},
                             {"msg": "nosub", "id": "s1"}]
    assert session.subscriptions == {"s2"}
    # the id is free again
    assert session.receive('{"msg":"sub","id":"s1","name":"p"}', 3) == [
        SubscribeRequested("s1", "p", [])
    ]


def test_unsub_of_unknown_id_still_gets_nosub() -> None:
    session = connected()
    assert session.receive('{"msg":"unsub","id":"never"}', 1) == []
    assert session.receive('{"msg":"unsub"}', 1) == []
    assert session.data_to_send() == ['{"msg":"nosub","id":"never"}', '{"msg":"nosub"}']


def test_nosub_with_error_for_unknown_publication() -> None:
    session = connected()
    session.receive('{"msg":"sub","id":"s1","name":"nope","params":[]}', 1)
    session.nosub("s1", MeteorError.subscription_not_found("nope"))
    assert sent(session) == [{"msg": "nosub", "id": "s1", "error": {
        "isClientSafe": True, "error": 404, "reason": "Subscription 'nope' not found",
        "message": "Subscription 'nope' not found [404]", "errorType": "Meteor.Error"}}]
    assert session.subscriptions == set()


def test_subscription_limit() -> None:
    session = connected(SessionConfig(max_subscriptions=2))
    session.receive('{"msg":"sub","id":"a","name":"p"}', 1)
    session.receive('{"msg":"sub","id":"b","name":"p"}', 1)
    assert session.receive('{"msg":"sub","id":"c","name":"p"}', 1) == []
    (refusal,) = sent(session)
    assert refusal["msg"] == "nosub" and refusal["id"] == "c"
    assert refusal["error"]["error"] == "too-many-requests"
    assert session.subscriptions == {"a", "b"}
    session.receive('{"msg":"unsub","id":"a"}', 2)
    session.nosub("a")
    session.data_to_send()
    assert session.receive('{"msg":"sub","id":"c","name":"p"}', 2) == [
        SubscribeRequested("c", "p", [])
    ]


# ---- data messages ---------------------------------------------------------------------------

def test_data_messages_render_exactly() -> None:
    session = connected()
    session.added("c", "X", {"a": 1})
    session.added("c", "Y", {})
    session.changed("c", "X", {"a": 2}, ["b"])
    session.changed("c", "X", None, ["b"])
    session.changed("c", "X", {}, [])  # empty: never sent
    session.removed("c", "X")
    session.send_encoded('{"msg":"removed","collection":"c","id":"Y"}')
    assert session.data_to_send() == [
        '{"msg":"added","collection":"c","id":"X","fields":{"a":1}}',
        '{"msg":"added","collection":"c","id":"Y"}',
        '{"msg":"changed","collection":"c","id":"X","fields":{"a":2},"cleared":["b"]}',
        '{"msg":"changed","collection":"c","id":"X","cleared":["b"]}',
        '{"msg":"removed","collection":"c","id":"X"}',
        '{"msg":"removed","collection":"c","id":"Y"}',
    ]
    assert session.data_to_send() == []


def test_nothing_is_queued_after_close() -> None:
    session = connected()
    session.receive('{"msg":"method","id":"1","method":"m"}', 1)
    session.close()
    session.added("c", "X", {"a": 1})
    session.result("1", 5)
    session.send_encoded('{"msg":"ping"}')
    assert session.receive('{"msg":"ping"}', 2) == []
    assert session.data_to_send() == []
    assert session.tick(1000) == [] and session.next_deadline() == float("inf")


# ---- methods ---------------------------------------------------------------------------------

def test_method_result_and_updated_once_each() -> None:
    session = connected()
    events = session.receive(
        '{"msg":"method","id":"1","method":"echo","params":["x"],"randomSeed":"seed"}', 1
    )
    assert events == [MethodRequested("1", "echo", ["x"], "seed")]
    assert session.pending_methods == {"1"}
    session.result("1", "x")
    session.result("1", "again")  # dropped
    assert session.pending_methods == {"1"}  # still waiting for updated
    session.updated(["1", "never-sent"])
    session.updated(["1"])  # dropped
    assert session.pending_methods == frozenset()
    session.result("2", 1)  # an id the client never sent: dropped
    assert session.data_to_send() == [
        '{"msg":"result","id":"1","result":"x"}', '{"msg":"updated","methods":["1"]}'
    ]


def test_unknown_method_error_result_and_undefined_result() -> None:
    session = connected()
    session.receive('{"msg":"method","id":"7","method":"nope","params":[]}', 1)
    session.receive('{"msg":"method","id":"8","method":"noop"}', 1)
    session.updated(["8"])  # updated may come first
    session.result("7", error=MeteorError.method_not_found("nope"))
    session.updated(["7"])
    session.result("8")
    assert sent(session) == [
        {"msg": "updated", "methods": ["8"]},
        {"msg": "result", "id": "7", "error": {
            "isClientSafe": True, "error": 404, "reason": "Method 'nope' not found",
            "message": "Method 'nope' not found [404]", "errorType": "Meteor.Error"}},
        {"msg": "updated", "methods": ["7"]},
        {"msg": "result", "id": "8"},
    ]


def test_method_id_not_reused_while_pending() -> None:
    session = connected()
    session.receive('{"msg":"method","id":"1","method":"a"}', 1)
    assert session.receive('{"msg":"method","id":"1","method":"b"}', 1) == []
    assert sent(session) == [{"msg": "error", "reason": "Duplicate method id",
                              "offendingMessage": {"msg": "method", "id": "1", "method": "b"}}]
    session.result("1", None)
    session.updated(["1"])
    assert sent(session) == [{"msg": "result", "id": "1", "result": None},
                             {"msg": "updated", "methods": ["1"]}]
    assert session.receive('{"msg":"method","id":"1","method":"b"}', 2) == [
        MethodRequested("1", "b", [], None)
    ]


def test_pending_method_limit() -> None:
    session = connected(SessionConfig(max_pending_methods=1))
    assert len(session.receive('{"msg":"method","id":"1","method":"slow"}', 1)) == 1
    assert session.receive('{"msg":"method","id":"2","method":"slow"}', 1) == []
    refusal, updated = sent(session)
    assert refusal["msg"] == "result" and refusal["id"] == "2"
    assert refusal["error"]["error"] == "too-many-requests"
    assert updated == {"msg": "updated", "methods": ["2"]}
    assert session.pending_methods == {"1"}


# ---- robustness ------------------------------------------------------------------------------

def test_deeply_nested_params_are_a_parse_error() -> None:
    session = connected()
    deep = "[" * 1000 + '{"$date":1}' + "]" * 1000
    assert session.receive('{"msg":"method","id":"1","method":"m","params":' + deep + "}", 1) == []
    assert sent(session) == [{"msg": "error", "reason": "Parse error"}]
    assert_usable(session)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["id", "name", "params", "method", "randomSeed", "version", "support",
                         "$date", "$binary", "$type", "$value", "$escape", "x"]), c, max_size=4),
    max_leaves=12,
)
messages_st = st.builds(
    lambda msg, rest: {"msg": msg, **rest},
    st.sampled_from(["connect", "ping", "pong", "sub", "unsub", "method", "nosub", "x", ""]),
    st.dictionaries(st.sampled_from(["id", "name", "params", "method", "randomSeed", "version",
                                     "support", "session"]), json_values, max_size=4),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(messages_st.map(json.dumps) | st.text(max_size=20) | st.binary(max_size=5),
                max_size=6))
def test_no_input_breaks_the_session(texts: list[str | bytes]) -> None:
    session = connected()
    for text in texts:
        events = session.receive(text, 1)
        for event in events:
            if isinstance(event, CloseRequested):
                pytest.fail(f"closed on {text!r}")
        for message in sent(session):  # every output is a well-formed DDP message
            assert isinstance(message.get("msg"), str)
    assert_usable(session)
