"""DDP over raw WebSocket against a real server: handshake, errors that keep the connection,
heartbeats, methods and publications through the App, limits, stuck clients, shutdown."""

from __future__ import annotations

import gc
import json
import logging
import socket
import struct

import pytest
import trio
import trio_websocket
import wsproto.events

from cdcddp.app import App, MethodContext
from cdcddp.ddp.session import SessionConfig
from cdcddp.server import http
from cdcddp.server.connection import Connection
from cdcddp.server.server import Server
from tests.server_support import (
    FIXED_ITEMS,
    WEBSOCKET_ACCEPT,
    build_test_app,
    fast_config,
    open_raw_websocket,
    open_stuck_websocket,
    raw_ddp,
    running_server,
)


async def test_connect_ping_and_pipelining() -> None:
    async with running_server() as server, raw_ddp(server.ws_url, handshake=False) as peer:
        # the pre-2.3 greeting comes first (ddptest needs a first message)
        assert json.loads(await peer.ws.get_message()) == {"server_id": "0"}
        await peer.send({"msg": "connect", "version": "1", "support": ["1"]})
        await peer.send({"msg": "method", "id": "1", "method": "echo", "params": ["x"]})
        await peer.send({"msg": "ping", "id": "h1"})
        assert (await peer.recv())["msg"] == "connected"
        got = [await peer.recv() for _ in range(3)]
        assert {"msg": "pong", "id": "h1"} in got
        assert {"msg": "result", "id": "1", "result": ["x"]} in got
        assert {"msg": "updated", "methods": ["1"]} in got
        await peer.send({"msg": "ping"})
        assert await peer.recv() == {"msg": "pong"}


async def test_an_open_connection_keeps_nothing_of_its_handshake() -> None:
    """An idle connection's memory is what the server holds by the thousand: the parsed
    request head is garbage once the WebSocket is open, and neither the Connection nor its
    WebSocket has an attribute dict (idle_conn_kb in tests/bench/connections.py)."""
    async with running_server() as server, raw_ddp(server.ws_url) as peer:
        await peer.send({"msg": "method", "id": "1", "method": "echo", "params": ["x"]})
        assert (await peer.recv())["msg"] == "result"
        gc.collect()
        alive = gc.get_objects()
        connections = [o for o in alive if isinstance(o, Connection)]
        assert len(connections) == 1
        assert not hasattr(connections[0], "__dict__")
        assert not hasattr(connections[0]._ws, "__dict__")
        assert [o for o in alive if isinstance(o, http.RequestHead)] == []


async def test_websocket_pings_fragments_and_pipelined_frames() -> None:
    """WebSocket-level details a client may use: a ping is answered, a message in fragments
    arrives whole, and frames sent right behind the upgrade request are not lost."""
    async with running_server() as server:
        async with raw_ddp(server.ws_url) as peer:
            with trio.fail_after(5):
                await peer.ws.ping(b"are you there")  # returns once the pong arrives
            await peer.ws._send(wsproto.events.TextMessage(  # (trio-websocket has no API
                '{"msg":"method","id":"f","method":"echo",', message_finished=False))  # for it)
            await peer.ws._send(wsproto.events.TextMessage('"params":[1]}'))
            assert await peer.recv() == {"msg": "result", "id": "f", "result": [1]}
        # one write: the connect frame follows the head
        async with await open_raw_websocket(server.port, []) as stream:
            received = b""
            with trio.fail_after(5):
                while b"connected" not in received:
                    received += await stream.receive_some(4096)
        assert received.startswith(b"HTTP/1.1 101 ")
        assert f"Sec-WebSocket-Accept: {WEBSOCKET_ACCEPT}\r\n".encode() in received


async def test_a_client_vanishing_while_the_server_writes_is_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """A client that resets its connection while the server writes to it (large results
    under way) has just left: nothing is logged as an error, and the server serves on."""
    caplog.set_level(logging.INFO)
    app = App("vanishing")

    @app.method("big")
    async def big(ctx: MethodContext) -> str:
        return "x" * 500_000

    async with running_server(app) as server:
        for _ in range(5):
            stream = await open_stuck_websocket(server.port, [json.dumps(
                {"msg": "method", "id": str(i), "method": "big", "params": []})
                for i in range(3)])
            await trio.sleep(0.05)
            assert (await stream.receive_some(1000)).startswith(b"HTTP/1.1 101")
            sock = stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()  # a reset, with megabytes still to write
            await trio.sleep(0.05)
        with trio.fail_after(5):
            while server.server.connections:
                await trio.sleep(0.01)
        async with raw_ddp(server.ws_url) as peer:
            await peer.send({"msg": "method", "id": "1", "method": "big", "params": []})
            assert len((await peer.recv())["result"]) == 500_000
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []


async def test_failed_version_closes() -> None:
    async with running_server() as server, raw_ddp(server.ws_url, handshake=False) as peer:
        await peer.send({"msg": "connect", "version": "2", "support": ["2"]})
        await peer.send({"msg": "method", "id": "1", "method": "echo", "params": [1]})
        assert await peer.recv() == {"msg": "failed", "version": "1"}
        with trio.fail_after(3):
            try:
                while True:
                    message = json.loads(await peer.ws.get_message())
                    assert message.get("msg") != "result"
            except trio_websocket.ConnectionClosed as closed:
                assert closed.reason.code == 1000


async def test_bad_messages_get_error_and_connection_stays_usable() -> None:
    config = fast_config(session=SessionConfig(max_message_bytes=2_000))
    async with running_server(config=config) as server, raw_ddp(server.ws_url) as peer:
        cases: list[tuple[str | bytes, str]] = [
            ("not json", "Bad request"),
            ("42", "Bad request"),
            (json.dumps({"foo": "bar"}), "Bad request"),
            (json.dumps({"msg": "frobnicate"}), "Bad request"),
            (json.dumps({"msg": "method", "id": 1, "method": "echo"}),
             "Malformed method invocation"),
            (json.dumps({"msg": "method", "id": "1", "method": "echo", "params": {}}),
             "Malformed method invocation"),
            (json.dumps({"msg": "sub", "id": "s", "name": "p", "params": "x"}),
             "Malformed subscription"),
            (json.dumps({"msg": "ping", "id": "x" * 5_000}), "Message too large"),
            (b"\x00\x01binary", "Binary frames are not supported"),
        ]
        for frame, reason in cases:
            await peer.send(frame)
            error = await peer.recv()
            assert error["msg"] == "error" and error["reason"] == reason, (frame, error)
            await peer.send({"msg": "ping", "id": "still"})
            assert await peer.recv() == {"msg": "pong", "id": "still"}


async def test_absurd_frame_closes_with_1009() -> None:
    config = fast_config(ws_max_message_chars=50_000)
    async with running_server(config=config) as server:
        async with raw_ddp(server.ws_url) as peer:
            await peer.send("x" * 60_000)
            with trio.fail_after(3):
                try:
                    await peer.recv()
                    raise AssertionError("expected a close")
                except trio_websocket.ConnectionClosed as closed:
                    assert closed.reason.code == 1009
        async with raw_ddp(server.ws_url) as peer:  # the server is fine
            await peer.send({"msg": "ping"})
            assert await peer.recv() == {"msg": "pong"}


async def test_methods_errors_and_order() -> None:
    app = build_test_app()
    async with running_server(app) as server, raw_ddp(server.ws_url) as peer:
        await peer.send({"msg": "method", "id": "1", "method": "nope", "params": []})
        first, second = await peer.recv(), await peer.recv()
        assert first["error"]["error"] == 404
        assert first["error"]["reason"] == "Method 'nope' not found"
        assert second == {"msg": "updated", "methods": ["1"]}

        await peer.send({"msg": "method", "id": "2", "method": "boom_internal", "params": []})
        result = await peer.recv()
        assert result["error"] == {"isClientSafe": True, "error": 500,
                                   "reason": "Internal server error",
                                   "message": "Internal server error [500]",
                                   "errorType": "Meteor.Error"}
        assert "secret" not in json.dumps(result)
        assert await peer.recv() == {"msg": "updated", "methods": ["2"]}

        await peer.send({"msg": "method", "id": "3", "method": "echo", "params": [1],
                         "randomSeed": "seed"})
        await peer.send({"msg": "method", "id": "4", "method": "whoami", "params": [],
                         "randomSeed": "seed-4"})
        await peer.send({"msg": "method", "id": "5", "method": "sleep_then_echo",
                         "params": [1, 2, 3]})
        await peer.send({"msg": "method", "id": "6", "method": "nothing", "params": []})
        got = [await peer.recv() for _ in range(8)]
        results = [m for m in got if m["msg"] == "result"]
        assert [r["id"] for r in results] == ["3", "4", "5", "6"]
        assert results[1]["result"]["seed"] == "seed-4"
        assert results[1]["result"]["user"] is None
        assert results[2]["error"]["error"] == 400  # params do not fit the handler
        assert "result" not in results[3]  # returned nothing: no result key

        # one connection's calls run in order, even when the first is slower
        await peer.send({"msg": "method", "id": "7", "method": "sleep_then_echo",
                         "params": [0.2, "slow"]})
        await peer.send({"msg": "method", "id": "8", "method": "sleep_then_echo",
                         "params": [0, "fast"]})
        got = [await peer.recv() for _ in range(4)]
        assert [m["id"] for m in got if m["msg"] == "result"] == ["7", "8"]
        assert app.calls == ["slow", "fast"]  # type: ignore[attr-defined]


async def test_publications() -> None:
    async with running_server() as server, raw_ddp(server.ws_url) as peer:
        await peer.send({"msg": "sub", "id": "s1", "name": "fixed"})
        added = [await peer.recv() for _ in range(3)]
        assert {m["id"]: m["fields"] for m in added} == FIXED_ITEMS
        assert all(m["msg"] == "added" and m["collection"] == "items" for m in added)
        assert await peer.recv() == {"msg": "ready", "subs": ["s1"]}

        # Merge box (Meteor): s1 published "name" first, so s2's value stays hidden...
        await peer.send({"msg": "sub", "id": "s2", "name": "one", "params": ["a"]})
        assert await peer.recv() == {"msg": "ready", "subs": ["s2"]}

        await peer.send({"msg": "unsub", "id": "s1"})  # "a" is still published by s2
        got = [await peer.recv() for _ in range(4)]
        # ...until s1 lets go: s2's value is revealed, the field only s1 had is cleared.
        assert got == [{"msg": "changed", "collection": "items", "id": "a",
                        "fields": {"name": "only a"}, "cleared": ["n"]},
                       {"msg": "removed", "collection": "items", "id": "b"},
                       {"msg": "removed", "collection": "items", "id": "c"},
                       {"msg": "nosub", "id": "s1"}]

        await peer.send({"msg": "sub", "id": "s3", "name": "nope"})
        nosub = await peer.recv()
        assert nosub["id"] == "s3" and nosub["error"]["error"] == 404
        assert nosub["error"]["reason"] == "Subscription 'nope' not found"

        await peer.send({"msg": "sub", "id": "s4", "name": "failing"})
        got = [await peer.recv() for _ in range(3)]
        assert got[0]["msg"] == "added" and got[1]["msg"] == "removed"
        assert got[2]["msg"] == "nosub" and got[2]["error"]["error"] == 500
        assert "secret" not in json.dumps(got)

        await peer.send({"msg": "sub", "id": "s5", "name": "one", "params": []})
        nosub = await peer.recv()
        assert nosub["msg"] == "nosub" and nosub["error"]["error"] == 400

        await peer.send({"msg": "unsub", "id": "never"})
        assert await peer.recv() == {"msg": "nosub", "id": "never"}


async def test_heartbeat_timeout_closes_a_silent_client() -> None:
    session = SessionConfig(heartbeat_interval=0.3, heartbeat_timeout=0.3)
    async with running_server(config=fast_config(session=session)) as server:
        async with raw_ddp(server.ws_url) as silent, raw_ddp(server.ws_url) as lively:
            pings_answered = 0

            async def answer_pings() -> None:
                nonlocal pings_answered
                while True:
                    message = await lively.recv()
                    if message == {"msg": "ping"}:
                        await lively.send({"msg": "pong"})
                        pings_answered += 1

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer_pings)
                started = trio.current_time()
                assert await silent.recv() == {"msg": "ping"}
                with trio.fail_after(2):
                    try:
                        while True:
                            await silent.recv()
                    except trio_websocket.ConnectionClosed as closed:
                        assert closed.reason.code == 3000
                assert trio.current_time() - started < 1.5
                # the one that answers stays connected over several intervals
                await trio.sleep(0.7)
                nursery.cancel_scope.cancel()
            assert pings_answered >= 3
            await lively.send({"msg": "method", "id": "1", "method": "echo", "params": [1]})
            assert (await lively.recv())["result"] == [1]


async def _open_stuck_client(port: int, blobs: int) -> trio.SocketStream:
    """A raw client that asks for `blobs` 1 MB method results, then never reads."""
    return await open_stuck_websocket(port, [
        f'{{"msg":"method","id":"{n}","method":"blob","params":[1000000]}}'
        for n in range(blobs)])


@pytest.mark.parametrize(("bound", "blobs", "buffer_bytes"), [
    ("send buffer size", 40, 4_000_000),
    ("write time", 12, 64_000_000),
])
async def test_stuck_client_is_dropped_and_does_not_block_others(
        bound: str, blobs: int, buffer_bytes: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cdcddp.server.connection")
    config = fast_config(send_timeout=1.0, max_send_buffer_bytes=buffer_bytes)
    async with running_server(config=config) as server:
        async with raw_ddp(server.ws_url) as other:
            stuck = await _open_stuck_client(server.port, blobs)
            async with stuck:
                for n in range(10):
                    started = trio.current_time()
                    await other.send({"msg": "ping", "id": str(n)})
                    assert await other.recv() == {"msg": "pong", "id": str(n)}
                    assert trio.current_time() - started < 0.5
                    await trio.sleep(0.02)
                with trio.fail_after(5):
                    while len(server.server.connections) > 1:
                        await trio.sleep(0.05)
                (dropped,) = [r.getMessage() for r in caplog.records if "aborted" in r.getMessage()]
                assert bound in dropped
            await other.send({"msg": "method", "id": "1", "method": "echo", "params": [1]})
            assert await other.recv() == {"msg": "result", "id": "1", "result": [1]}


async def _read_until_closed(ws: trio_websocket.WebSocketConnection) -> tuple[list[str], int]:
    frames = []
    with trio.fail_after(5):
        try:
            while True:
                frames.append(await ws.get_message())
        except trio_websocket.ConnectionClosed as closed:
            return frames, closed.reason.code


async def test_graceful_shutdown_sends_close_frames() -> None:
    server = Server(build_test_app(), fast_config())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        async with (raw_ddp(f"ws://127.0.0.1:{port}/websocket") as raw,
                    trio_websocket.open_websocket_url(
                        f"ws://127.0.0.1:{port}/sockjs/000/shutdown/websocket") as sockjs_ws):
            assert await sockjs_ws.get_message() == "o"
            async with trio.open_nursery() as readers:
                outcome: dict[str, tuple[list[str], int]] = {}

                async def read(name: str, ws: trio_websocket.WebSocketConnection) -> None:
                    outcome[name] = await _read_until_closed(ws)

                readers.start_soon(read, "raw", raw.ws)
                readers.start_soon(read, "sockjs", sockjs_ws)
                await trio.sleep(0.05)
                with trio.fail_after(5):
                    await server.shutdown()
            assert outcome["raw"][1] == 1001
            frames, code = outcome["sockjs"]
            assert code == 1001 and frames[-1] == 'c[1001,"Going away"]'
        with trio.fail_after(1):  # no longer listening
            try:
                await trio.open_tcp_stream("127.0.0.1", port)
                raise AssertionError("still accepting")
            except OSError:
                pass


async def test_cancelling_serve_also_closes_sessions_with_1001() -> None:
    server = Server(build_test_app(), fast_config())
    outcome: list[tuple[list[str], int]] = []
    async with trio.open_nursery() as nursery:
        server_scope = trio.CancelScope()

        async def run_server(task_status: trio.TaskStatus[int]) -> None:
            with server_scope:
                await server.serve("127.0.0.1", 0, task_status=task_status)

        port = await nursery.start(run_server)
        async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/websocket") as ws:
            await ws.send_message('{"msg":"connect","version":"1","support":["1"]}')
            await trio.sleep(0.05)
            server_scope.cancel()  # the client is outside that scope
            outcome.append(await _read_until_closed(ws))
    frames, code = outcome[0]
    assert code == 1001
    assert any('"connected"' in f for f in frames)
