"""Transports: how DDP messages map onto WebSocket frames, and the stream glue for handing an
already-read HTTP head to trio-websocket.

Raw (``/websocket``): one DDP message per text frame. SockJS (``/sockjs/<s>/<id>/websocket``):
``o`` first, batches as ``a[...]``, ``h`` heartbeats, ``c[code,reason]`` before closing.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio_websocket
from wsproto.events import CloseConnection, TextMessage
from wsproto.utilities import LocalProtocolError

from cdcddp.server import sockjs


class ReplayStream(trio.abc.Stream):
    """Hands trio-websocket a connection whose request head we already read.

    It first returns the head; bytes the client sent after the head (pipelined frames) are
    held back until ``release()`` is called once the handshake is accepted, because wsproto's
    server handshake drops data that arrives in the same read as the request. Writes go
    straight through.
    """

    def __init__(self, stream: trio.abc.Stream, head: bytes, after_head: bytes = b"") -> None:
        self.stream = stream
        self._head = head
        self._after_head = after_head
        self._released = trio.Event()

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
        await self.stream.send_all(data)

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

    def outgoing(self, messages: list[str]) -> list[str]:
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


class FrameWriter:
    """Writes many text frames to a trio-websocket connection with one ``send_all``.

    trio-websocket's ``send_message`` costs one socket write per message; batching a flush
    into one write is what makes fan-out cheap (see DESIGN.md). This is the one place that
    reaches into trio-websocket internals (pinned 0.12): its wsproto state machine (so frames
    stay legal for the connection's state) and its stream lock (so our writes never interleave
    with the pongs and close replies its reader task sends).
    """

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self._ws = ws

    @property
    def open(self) -> bool:
        return self._ws.closed is None

    def encode(self, frames: list[str]) -> bytes:
        proto = self._ws._wsproto
        try:
            return b"".join(proto.send(TextMessage(data=frame)) for frame in frames)
        except LocalProtocolError:  # the peer's Close arrived first: no more data frames
            raise trio_websocket.ConnectionClosed(self._ws.closed) from None

    async def write(self, frames: list[str]) -> None:
        """Raises trio_websocket.ConnectionClosed when the connection is closed or breaks."""
        if not frames:
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
