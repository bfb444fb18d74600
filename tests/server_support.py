"""A test App and helpers to run a real cdcddp server on a free port inside a test."""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio
import trio_websocket

from cdcddp.app import App, MethodContext, PublicationContext
from cdcddp.ddp.messages import MeteorError
from cdcddp.ddp.session import SessionConfig
from cdcddp.server.config import ServerConfig
from cdcddp.server.server import Server

FIXED_ITEMS: dict[str, dict[str, Any]] = {
    "a": {"name": "alpha", "n": 1},
    "b": {"name": "beta", "n": 2, "tags": ["x", "y"]},
    "c": {"name": "gamma", "n": 3, "nested": {"deep": True}},
}

CONNECT = json.dumps({"msg": "connect", "version": "1", "support": ["1"]})


def build_test_app() -> App:
    app = App("test")
    app.calls: list[str] = []  # type: ignore[attr-defined]

    @app.method("echo")
    async def echo(ctx: MethodContext, *args: Any) -> list[Any]:
        return list(args)

    @app.method("nothing")
    async def nothing(ctx: MethodContext) -> None:
        return None

    @app.method("boom_meteor")
    async def boom_meteor(ctx: MethodContext) -> None:
        raise MeteorError("not-allowed", "Nope", {"why": "test"})

    @app.method("boom_internal")
    async def boom_internal(ctx: MethodContext) -> None:
        raise RuntimeError("secret internals: password=hunter2")

    @app.method("whoami")
    async def whoami(ctx: MethodContext) -> dict[str, Any]:
        return {"connection": ctx.connection_id, "user": ctx.user_id, "seed": ctx.random_seed}

    @app.method("sleep_then_echo")
    async def sleep_then_echo(ctx: MethodContext, seconds: float, value: Any) -> Any:
        await trio.sleep(seconds)
        app.calls.append(value)  # type: ignore[attr-defined]
        return value

    @app.method("blob")
    async def blob(ctx: MethodContext, size: int) -> str:
        return "x" * size

    @app.publish("fixed")
    async def fixed(ctx: PublicationContext) -> None:
        for doc_id, fields in FIXED_ITEMS.items():
            ctx.added("items", doc_id, fields)
        ctx.ready()

    @app.publish("one")
    async def one(ctx: PublicationContext, doc_id: str) -> None:
        ctx.added("items", doc_id, {"name": f"only {doc_id}"})
        ctx.ready()

    @app.publish("evolving")
    async def evolving(ctx: PublicationContext) -> None:
        ctx.added("things", "x", {"a": 1, "b": 2})
        ctx.added("things", "y", {"a": 3})
        ctx.changed("things", "x", {"a": 5}, ["b"])
        ctx.removed("things", "y")
        ctx.ready()

    @app.publish("failing")
    async def failing(ctx: PublicationContext) -> None:
        ctx.added("items", "doomed", {"name": "doomed"})
        raise RuntimeError("secret publication internals")

    return app


def fast_config(**overrides: Any) -> ServerConfig:
    """Short timings so timeout behaviour is testable in well under a second."""
    session = overrides.pop("session", SessionConfig())
    config = ServerConfig(session=session, close_timeout=1.0, shutdown_timeout=3.0)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


@dataclass
class RunningServer:
    server: Server
    port: int

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    def sockjs_url(self, server_id: str = "123", session_id: str = "abcdefgh") -> str:
        return f"ws://127.0.0.1:{self.port}/sockjs/{server_id}/{session_id}/websocket"


@asynccontextmanager
async def running_server(app: App | None = None, config: ServerConfig | None = None
                         ) -> AsyncIterator[RunningServer]:
    server = Server(app or build_test_app(), config or fast_config())
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield RunningServer(server, port)
        finally:
            nursery.cancel_scope.cancel()


async def http_request(port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, dict[str, str],
                                                                             bytes]:
    """Send raw request bytes, read until the server closes; (status, headers, body)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            data = b""
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
              ) -> tuple[int, dict[str, str], bytes]:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return await http_request(port, ("\r\n".join(lines) + "\r\n\r\n").encode())


class RawDDP:
    """A raw-WebSocket DDP peer for protocol-level tests (decoded JSON in, frames out)."""

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws

    async def send(self, message: dict[str, Any] | str | bytes) -> None:
        text = message if isinstance(message, str | bytes) else json.dumps(message)
        await self.ws.send_message(text)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        with trio.fail_after(timeout):
            while True:
                message = json.loads(await self.ws.get_message())
                if "msg" in message:  # skip the server_id greeting
                    return message

    async def connect(self) -> str:
        await self.send(CONNECT)
        message = await self.recv()
        assert message["msg"] == "connected", message
        return message["session"]


@asynccontextmanager
async def raw_ddp(url: str, *, handshake: bool = True, **kwargs: Any) -> AsyncIterator[RawDDP]:
    async with trio_websocket.open_websocket_url(url, **kwargs) as ws:
        peer = RawDDP(ws)
        if handshake:
            await peer.connect()
        yield peer


# RFC 6455's example key; the server's 101 answers it with this accept value.
WEBSOCKET_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
WEBSOCKET_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
CONNECT_MESSAGE = '{"msg":"connect","version":"1","support":["1"]}'


def masked_text_frame(text: str, mask: bytes = b"mask") -> bytes:
    """One client text frame (clients mask theirs), for messages under 64 KiB."""
    payload = text.encode()
    size = len(payload)
    head = bytes([0x81, 0x80 | size]) if size < 126 else (
        bytes([0x81, 0x80 | 126]) + struct.pack("!H", size))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def open_raw_websocket(port: int, messages: list[str],
                             receive_buffer: int | None = None) -> trio.SocketStream:
    """A raw WebSocket client that sends ``connect`` and ``messages`` pipelined behind its
    handshake, in one write (the server must cope); the 101 and all else is left to read."""
    sock = trio.socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(
        b"GET /websocket HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + WEBSOCKET_KEY.encode() + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        + masked_text_frame(CONNECT_MESSAGE)
        + b"".join(masked_text_frame(m) for m in messages))
    return stream


async def open_stuck_websocket(port: int, messages: list[str]) -> trio.SocketStream:
    """A raw WebSocket client with a tiny receive buffer: it sends ``messages`` pipelined
    behind its handshake, then never reads."""
    return await open_raw_websocket(port, messages, receive_buffer=4096)
