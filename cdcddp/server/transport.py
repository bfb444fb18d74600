"""Transports: how DDP messages map onto WebSocket frames, and the stream glue for handing an
already-read HTTP head to trio-websocket.

Raw (``/websocket``): one DDP message per text frame. SockJS (``/sockjs/<s>/<id>/websocket``):
``o`` first, batches as ``a[...]``, ``h`` heartbeats, ``c[code,reason]`` before closing.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio
import trio_websocket
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, TextMessage
from wsproto.utilities import LocalProtocolError

from cdcddp.ddp.messages import Encoded
from cdcddp.server import sockjs

if TYPE_CHECKING:
    from cdcddp.metrics import SendCounts


class ReplayStream(trio.abc.Stream):
    """Hands trio-websocket a connection whose request head we already read.

    It first returns the head; bytes the client sent after the head (pipelined frames) are
    held back until ``release()`` is called once the handshake is accepted, because wsproto's
    server handshake drops data that arrives in the same read as the request. Writes go
    straight through, and :meth:`send_nowait` writes without a task switch.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, after_head: bytes = b"") -> None:
        self.stream = stream
        self._head = head
        self._after_head = after_head
        self._released = trio.Event()
        self._sending = False  # a send_all is under way (its bytes may be partly written)
        self._backlog = b""  # what send_nowait could not write: goes first in the next send_all

    def release(self) -> None:
        """The handshake is done: deliver what followed the head, then the socket."""
        self._released.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._head:
            return self._take("_head", max_bytes)
        await self._released.wait()
        if self._after_head:
            return self._take("_after_head", max_bytes)
        return await self.stream.receive_some(max_bytes)

    def _take(self, attribute: str, max_bytes: int | None) -> bytes:
        data: bytes = getattr(self, attribute)
        size = len(data) if max_bytes is None else max_bytes
        setattr(self, attribute, data[size:])
        return data[:size]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._sending = True
        try:
            if self._backlog:
                data, self._backlog = self._backlog + data, b""
            await self.stream.send_all(data)
        finally:
            self._sending = False

    def send_nowait(self, data: bytes) -> bool:
        """Write ``data`` now if no other write is under way; what the socket does not take
        is kept and goes out first with the next ``send_all``, so bytes never interleave.

        False (nothing written): a write or backlog is pending, the stream is not a plain TCP
        socket, or the socket failed (the next ``send_all`` raises it).
        """
        stream = self.stream
        if self._sending or self._backlog or type(stream) is not trio.SocketStream:
            return False
        fd = stream.socket.fileno()  # -1 once closed
        if fd < 0:
            return False
        try:
            sent = os.write(fd, data)  # the socket is non-blocking (trio)
        except BlockingIOError:
            sent = 0
        except OSError:
            return False
        if sent < len(data):
            self._backlog = data[sent:]
        return True

    @property
    def has_backlog(self) -> bool:
        return bool(self._backlog)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        self._released.set()
        await self.stream.aclose()


@dataclass(frozen=True)
class Framing:
    """How outgoing DDP messages become WebSocket text frames and incoming frames become DDP
    messages, for one transport."""

    sockjs: bool
    sockjs_max_frame_chars: int = 262_144

    def outgoing(self, messages: list[Encoded]) -> list[Encoded]:
        if not self.sockjs:
            return messages
        return sockjs.encode_message_batches(messages, self.sockjs_max_frame_chars)

    def incoming(self, frame: str | bytes) -> list[str | bytes]:
        """DDP messages in one client frame (raises SockJSFramingError on bad SockJS frames).

        Raw binary frames go to the session as bytes, which answers them with an error.
        """
        if not self.sockjs:
            return [frame]
        return list(sockjs.decode_client_frame(frame))

    def opening_frames(self) -> list[str]:
        return [sockjs.OPEN_FRAME] if self.sockjs else []

    def closing_frames(self, code: int, reason: str) -> list[str]:
        return [sockjs.encode_close(code, reason)] if self.sockjs else []


def sendable_close_code(code: int) -> int:
    """A close code that may appear in a Close frame (RFC 6455 §7.4); others become 1000."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999:
        return code
    return 1000


_TEXT_HEADS = tuple(bytes((0x81, n)) for n in range(126))  # FIN + text, 7-bit length
_TEXT_HEAD_16 = struct.Struct("!BBH")
_TEXT_HEAD_64 = struct.Struct("!BBQ")


def text_frames(messages: Iterable[Encoded]) -> bytes:
    """Unmasked, uncompressed WebSocket text frames, one per message (RFC 6455 §5.2): what
    wsproto produces for a server without extensions, at a fraction of its per-frame cost."""
    parts: list[bytes] = []
    append = parts.append
    for message in messages:
        payload = message if type(message) is bytes else message.encode()  # type: ignore[union-attr]
        size = len(payload)
        if size < 126:
            append(_TEXT_HEADS[size])
        elif size < 65536:
            append(_TEXT_HEAD_16.pack(0x81, 126, size))
        else:
            append(_TEXT_HEAD_64.pack(0x81, 127, size))
        append(payload)
    return b"".join(parts)


def _without_extensions(ws: trio_websocket.WebSocketConnection) -> bool:
    """No permessage-deflate or other extension negotiated (trio-websocket offers none)."""
    connection = getattr(ws._wsproto, "connection", None)
    return getattr(getattr(connection, "_proto", None), "extensions", None) == []


class FrameWriter:
    """Writes many text frames to a trio-websocket connection with one ``send_all``.

    trio-websocket's ``send_message`` costs one socket write per message; batching a flush
    into one write is what makes fan-out cheap (see DESIGN.md). This is the one place that
    reaches into trio-websocket internals (pinned 0.12): its wsproto state machine (so frames
    stay legal for the connection's state) and its stream lock (so our writes never interleave
    with the pongs and close replies its reader task sends). :meth:`try_write` writes without
    awaiting when the socket takes the bytes, so flushing a client costs no task switch.
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection,
                 counts: SendCounts | None = None) -> None:
        self._ws = ws
        self._counts = counts  # metrics: bytes written
        self._plain: bool | None = None  # frames built here (no extensions); known once open
        stream = ws._stream
        self._replay = stream if isinstance(stream, ReplayStream) else None  # try_write's way

    @property
    def open(self) -> bool:
        return self._ws.closed is None

    def encode(self, frames: list[Encoded]) -> bytes:
        proto = self._ws._wsproto
        if proto.state is not ConnectionState.OPEN:  # the peer's Close arrived first
            raise trio_websocket.ConnectionClosed(self._ws.closed)
        if self._plain is None:
            self._plain = _without_extensions(self._ws)
        if self._plain:
            return text_frames(frames)
        try:
            return b"".join(proto.send(TextMessage(
                data=frame if type(frame) is str else frame.decode()))  # type: ignore[union-attr]
                for frame in frames)
        except LocalProtocolError:
            raise trio_websocket.ConnectionClosed(self._ws.closed) from None

    @property
    def backlog(self) -> bool:
        """Bytes :meth:`try_write` could not write yet (the next :meth:`write` sends them)."""
        replay = self._replay
        return replay is not None and replay.has_backlog

    def try_write(self, frames: list[Encoded]) -> bool:
        """Write ``frames`` without awaiting, if no write is under way; bytes the socket does
        not take now wait in the stream's backlog (check :attr:`backlog`, then ``write([])``).

        False: nothing was written (use :meth:`write`, which also raises what went wrong).
        """
        replay = self._replay
        if replay is None or self._ws.closed is not None:
            return False
        try:
            data = self.encode(frames)
        except trio_websocket.ConnectionClosed:
            return False
        if not replay.send_nowait(data):
            return False
        if self._counts is not None:
            self._counts.bytes += len(data)
        return True

    async def write(self, frames: list[Encoded]) -> None:
        """Raises trio_websocket.ConnectionClosed when the connection is closed or breaks.
        With no frames, it still sends the backlog :meth:`try_write` left."""
        if not frames and not self.backlog:
            return
        if not self.open:
            raise trio_websocket.ConnectionClosed(self._ws.closed)
        data = self.encode(frames)
        await self._write_bytes(data)

    async def write_close_frame(self, code: int, reason: str) -> None:
        """Send a Close frame without waiting for the reply (used when tearing down)."""
        if not self.open:
            return
        try:
            data = self._ws._wsproto.send(CloseConnection(code=sendable_close_code(code),
                                                          reason=reason))
        except LocalProtocolError:
            return
        await self._write_bytes(data)

    async def _write_bytes(self, data: bytes) -> None:
        ws = self._ws
        async with ws._stream_lock:
            try:
                await ws._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise trio_websocket.ConnectionClosed(ws.closed) from None
        if self._counts is not None:
            self._counts.bytes += len(data)
