"""SockJS: pure framing, then the framed WebSocket transport through trio-websocket."""

from __future__ import annotations

import json

import pytest
import trio
import trio_websocket

from cdcddp.ddp.session import SessionConfig
from cdcddp.server import sockjs
from tests.server_support import CONNECT, FIXED_ITEMS, fast_config, running_server

# ---- pure framing -----------------------------------------------------------------------------


def test_encode_messages_double_encodes_and_escapes() -> None:
    frame = sockjs.encode_messages(['{"msg":"ping"}', '{"x":"\u2028é"}'])
    assert frame == 'a["{\\"msg\\":\\"ping\\"}","{\\"x\\":\\"\\u2028é\\"}"]'
    assert json.loads(frame[1:]) == ['{"msg":"ping"}', '{"x":"\u2028é"}']


def test_batches_respect_the_frame_cap_and_order() -> None:
    messages = [json.dumps({"n": n, "pad": "x" * 50}) for n in range(100)]
    frames = sockjs.encode_message_batches(messages, max_frame_chars=1_000)
    assert len(frames) > 5
    assert all(len(f) <= 1_100 for f in frames)
    decoded = [m for f in frames for m in json.loads(f[1:])]
    assert decoded == messages
    assert sockjs.encode_message_batches([]) == []


def test_close_frame_and_server_frame_decoding() -> None:
    assert sockjs.encode_close(1001, "Going away") == 'c[1001,"Going away"]'
    assert sockjs.decode_server_frame('c[3000,"No response"]') == ("c", (3000, "No response"))
    assert sockjs.decode_server_frame("o") == ("o", None)
    assert sockjs.decode_server_frame('a["1","2"]') == ("a", ["1", "2"])
    assert sockjs.decode_server_frame('m"1"') == ("a", ["1"])
    with pytest.raises(sockjs.SockJSFramingError):
        sockjs.decode_server_frame("x[]")


@pytest.mark.parametrize(("frame", "messages"), [
    ('["a","b"]', ["a", "b"]),
    ('"single"', ["single"]),
    ("", []),
    ("  ", []),
    (b'["bytes"]', ["bytes"]),
])
def test_decode_client_frames(frame: str | bytes, messages: list[str]) -> None:
    assert sockjs.decode_client_frame(frame) == messages


@pytest.mark.parametrize("frame", ["[1]", "{}", "nope", '["a", 2]', b"\xff"])
def test_decode_client_frame_rejects(frame: str | bytes) -> None:
    with pytest.raises(sockjs.SockJSFramingError):
        sockjs.decode_client_frame(frame)


# ---- over a real WebSocket --------------------------------------------------------------------


async def recv_messages(ws: trio_websocket.WebSocketConnection, timeout: float = 5.0
                        ) -> list[dict]:
    """The DDP messages of the next `a` frame (skipping heartbeats and the server_id)."""
    with trio.fail_after(timeout):
        while True:
            kind, payload = sockjs.decode_server_frame(await ws.get_message())
            if kind == "a":
                assert isinstance(payload, list)
                messages = [json.loads(m) for m in payload]
                messages = [m for m in messages if "msg" in m]
                if messages:
                    return messages


async def test_sockjs_session() -> None:
    async with running_server() as server, trio_websocket.open_websocket_url(
            server.sockjs_url()) as ws:
        with trio.fail_after(0.5):  # SockJS falls back to polling if `o` is late
            assert await ws.get_message() == "o"
        await ws.send_message(json.dumps([CONNECT]))
        (connected,) = await recv_messages(ws)
        assert connected["msg"] == "connected"

        # several messages in one client frame; the answers share one `a` frame, in order
        await ws.send_message(json.dumps([json.dumps({"msg": "ping", "id": "a"}),
                                          json.dumps({"msg": "ping", "id": "b"})]))
        assert await recv_messages(ws) == [{"msg": "pong", "id": "a"}, {"msg": "pong", "id": "b"}]

        # a bare JSON string is one message
        await ws.send_message(json.dumps(json.dumps({"msg": "ping", "id": "c"})))
        assert await recv_messages(ws) == [{"msg": "pong", "id": "c"}]

        # a publication's initial set arrives batched
        await ws.send_message(json.dumps([json.dumps({"msg": "sub", "id": "s", "name": "fixed"})]))
        got: list[dict] = []
        while not any(m["msg"] == "ready" for m in got):
            got += await recv_messages(ws)
        assert {m["id"]: m["fields"] for m in got if m["msg"] == "added"} == FIXED_ITEMS

        # bad framing: an error, and the session goes on
        for bad in ("[1,2]", "not json", "{}"):
            await ws.send_message(bad)
            (error,) = await recv_messages(ws)
            assert error == {"msg": "error", "reason": "Bad request"}
        await ws.send_message('["{\\"msg\\":\\"method\\",\\"id\\":\\"1\\",\\"method\\":\\"echo\\",'
                              '\\"params\\":[\\"ok\\"]}"]')
        got = await recv_messages(ws)
        while len(got) < 2:
            got += await recv_messages(ws)
        assert {"msg": "result", "id": "1", "result": ["ok"]} in got


async def test_sockjs_heartbeat_and_close_frame() -> None:
    config = fast_config(sockjs_heartbeat_interval=0.2,
                         session=SessionConfig(heartbeat_interval=0.6, heartbeat_timeout=0.3))
    async with running_server(config=config) as server, trio_websocket.open_websocket_url(
            server.sockjs_url("999", "zzzzzzzz")) as ws:
        assert await ws.get_message() == "o"
        await ws.send_message(json.dumps([CONNECT]))
        frames = []
        with trio.fail_after(3):
            try:
                while True:
                    frames.append(await ws.get_message())
            except trio_websocket.ConnectionClosed as closed:
                code = closed.reason.code
        assert "h" in frames  # SockJS heartbeats while idle
        assert any(f.startswith("a[") and '\\"ping\\"' in f for f in frames)  # DDP ping
        assert frames[-1] == 'c[3000,"No response from heartbeat"]'
        assert code == 3000
