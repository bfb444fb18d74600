"""The server side of a WebSocket, after the HTTP front accepted the upgrade (RFC 6455).

wsproto's frame protocol (sans-IO) parses what the client sends, answers pings and runs the
closing handshake; this module only moves bytes between it and one trio stream. Outgoing DDP
frames are built by :func:`cdcddp.server.transport.text_frames` (no extension is ever
negotiated, so every frame is a plain text frame) and written in batches, without a task
switch when the socket takes them (:meth:`ServerWebSocket.send_nowait`).

trio-websocket served this before. Its reader task, channel and events per connection cost
CPU at every handshake and memory per idle connection, and batched writes had to reach into
its private state for the protocol and the stream lock. The client side (``cdcddp.client``)
still uses it.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass

import trio
from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, TextMessage
from wsproto.utilities import LocalProtocolError

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
RECEIVE_CHUNK = 65536
ABNORMAL_CLOSURE = 1006  # the connection was lost without a Close frame (never sent)
MESSAGE_TOO_BIG = 1009


def accept_key(client_key: str) -> str:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    digest = hashlib.sha1(client_key.encode("latin-1") + _ACCEPT_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_response(client_key: str) -> bytes:
    """The 101 response accepting a WebSocket upgrade (no subprotocol, no extension)."""
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_key(client_key).encode("ascii") + b"\r\n\r\n")


@dataclass(frozen=True, slots=True)
class CloseReason:
    """How the connection closed: the Close frame's code and reason (1006: it was lost)."""

    code: int
    reason: str | None = None


class ConnectionClosed(Exception):
    """The WebSocket is closed (``reason``: how)."""

    def __init__(self, reason: CloseReason | None) -> None:
        super().__init__(reason)
        self.reason = reason


def sendable_close_code(code: int) -> int:
    """A close code that may appear in a Close frame (RFC 6455 §7.4); others become 1000."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999:
        return code
    return 1000


class ServerWebSocket:
    """One accepted WebSocket over ``stream``; ``received``: bytes the client sent after the
    request head (pipelined frames).

    Reading is :meth:`get_message`, by one task, for the connection's whole life: it also
    answers pings and the client's Close, so it keeps running while the server closes.
    Writing is :meth:`send_all` or :meth:`send_nowait`; bytes never interleave, whoever
    writes (the reader's pongs and Close replies go through :meth:`send_all` too).
    """

    __slots__ = ("_backlog", "_closed_handshake", "_max_message", "_parts", "_proto",
                 "_read_done", "_sending", "_size", "_stream", "_write_lock", "closed")

    def __init__(self, stream: trio.abc.Stream, received: bytes = b"", *,
                 max_message_size: int) -> None:
        self._stream = stream
        self._proto = Connection(ConnectionType.SERVER, trailing_data=received)
        self._max_message = max_message_size
        self._parts: list[str | bytes] = []  # of the message being received
        self._size = 0
        self._write_lock = trio.Lock()
        self._sending = False  # a send_all is under way (its bytes may be partly written)
        self._backlog = b""  # what send_nowait could not write: goes first in the next send_all
        self._closed_handshake: trio.Event | None = None  # set when the client's Close arrives
        self._read_done = False  # the client's Close (or its absence) was read
        # Set by the first close either side starts (or a lost connection): no more messages
        # go out; reading goes on until the client's Close.
        self.closed: CloseReason | None = None

    @property
    def state(self) -> ConnectionState:
        return self._proto.state

    # ---- reading -----------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next complete message (text as str, binary as bytes); raises
        :class:`ConnectionClosed` once the connection is closed or breaks."""
        while True:
            if self._read_done:
                raise ConnectionClosed(self.closed)
            for event in self._proto.events():
                kind = type(event)
                if kind is TextMessage or kind is BytesMessage:
                    message = self._message_part(event)  # type: ignore[arg-type]
                    if message is not None:
                        return message
                    if self._read_done:  # too big: say so and stop reading
                        await self._send_close(MESSAGE_TOO_BIG, self._too_big)
                        raise ConnectionClosed(self.closed)
                elif kind is Ping:
                    await self._send_event(event.response())  # type: ignore[union-attr]
                elif kind is CloseConnection:
                    await self._on_close(event)  # type: ignore[arg-type]
                    raise ConnectionClosed(self.closed)
            try:
                data = await self._stream.receive_some(RECEIVE_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            self._proto.receive_data(data or None)  # None: the peer is gone (a 1006 event)

    def _message_part(self, event: TextMessage | BytesMessage) -> str | bytes | None:
        data = event.data
        self._size += len(data)
        if self._size > self._max_message:
            self._parts, self._size = [], 0
            self._read_done = True
            if self.closed is None:
                self.closed = CloseReason(MESSAGE_TOO_BIG, self._too_big)
            return None
        if not event.message_finished:
            self._parts.append(data)
            return None
        if self._parts:
            self._parts.append(data)
            parts, self._parts, self._size = self._parts, [], 0
            return ("" if type(data) is str else b"").join(parts)  # type: ignore[attr-defined]
        self._size = 0
        return data

    @property
    def _too_big(self) -> str:
        return f"Exceeded maximum message size: {self._max_message} bytes"

    async def _on_close(self, event: CloseConnection) -> None:
        self._read_done = True
        state = self._proto.state
        if self.closed is None:
            self.closed = CloseReason(event.code, event.reason or None)
        if state is ConnectionState.REMOTE_CLOSING:  # the client closes: reply, then done
            await self._send_event(event.response())
        elif state is ConnectionState.OPEN:  # a frame wsproto could not parse (1002, 1007)
            await self._send_close(event.code, event.reason)
        if self._closed_handshake is not None:
            self._closed_handshake.set()

    # ---- writing -----------------------------------------------------------------------

    async def send_all(self, data: bytes) -> None:
        """Write ``data`` (after any backlog :meth:`send_nowait` left); raises
        :class:`ConnectionClosed` if the socket breaks."""
        async with self._write_lock:
            self._sending = True
            try:
                if self._backlog:
                    data, self._backlog = self._backlog + data, b""
                if data:
                    await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                if self.closed is None:
                    self.closed = CloseReason(ABNORMAL_CLOSURE, "connection lost")
                raise ConnectionClosed(self.closed) from None
            finally:
                self._sending = False

    def send_nowait(self, data: bytes) -> bool:
        """Write ``data`` now if no other write is under way; what the socket does not take
        is kept and goes out first with the next :meth:`send_all`, so bytes never interleave.

        False (nothing written): a write or backlog is pending, the stream is not a plain TCP
        socket, or the socket failed (the next :meth:`send_all` raises it).
        """
        stream = self._stream
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

    async def send_close(self, code: int, reason: str | None = None) -> None:
        """Send a Close frame (if none was sent yet) without waiting for the reply."""
        await self._send_close(sendable_close_code(code), reason)

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        """Closing handshake: send a Close frame, wait for the client's (bound the wait
        with a cancel scope), then close the stream. The reply is read by the task in
        :meth:`get_message`."""
        if self._proto.state is ConnectionState.OPEN:
            self._closed_handshake = trio.Event()
            await self.send_close(code, reason)
            await self._closed_handshake.wait()
        await self._stream.aclose()

    async def _send_close(self, code: int, reason: str | None) -> None:
        if self._proto.state is not ConnectionState.OPEN:
            return
        if self.closed is None:
            self.closed = CloseReason(code, reason)
        await self._send_event(CloseConnection(code=code, reason=reason))

    async def _send_event(self, event: Event) -> None:
        try:
            data = self._proto.send(event)
        except LocalProtocolError:  # the state moved on (e.g. closed meanwhile)
            return
        try:
            await self.send_all(data)
        except ConnectionClosed:
            pass
