"""Transports: how DDP messages map onto WebSocket frames, and the batched frame writer.

Raw (``/websocket``): one DDP message per text frame. SockJS (``/sockjs/<s>/<id>/websocket``):
``o`` first, batches as ``a[...]``, ``h`` heartbeats, ``c[code,reason]`` before closing.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from wsproto.connection import ConnectionState

from cdcddp.ddp.messages import Encoded
from cdcddp.server import sockjs
from cdcddp.server.websocket import ConnectionClosed, ServerWebSocket

if TYPE_CHECKING:
    from cdcddp.metrics import SendCounts


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


class FrameWriter:
    """Writes many DDP messages to a WebSocket as text frames with one write.

    One socket write per message would make fan-out expensive; a flush goes out as one
    write (see DESIGN.md). :meth:`try_write` writes without awaiting when the socket takes
    the bytes, so flushing a client costs no task switch.
    """

    __slots__ = ("_counts", "_ws")

    def __init__(self, ws: ServerWebSocket, counts: SendCounts | None = None) -> None:
        self._ws = ws
        self._counts = counts  # metrics: bytes written

    @property
    def open(self) -> bool:
        return self._ws.closed is None

    def encode(self, frames: list[Encoded]) -> bytes:
        ws = self._ws
        if ws.closed is not None or ws.state is not ConnectionState.OPEN:
            raise ConnectionClosed(ws.closed)  # a Close either way: nothing may follow it
        return text_frames(frames)

    @property
    def backlog(self) -> bool:
        """Bytes :meth:`try_write` could not write yet (the next :meth:`write` sends them)."""
        return self._ws.has_backlog

    def try_write(self, frames: list[Encoded]) -> bool:
        """Write ``frames`` without awaiting, if no write is under way; bytes the socket does
        not take now wait in the backlog (check :attr:`backlog`, then ``write([])``).

        False: nothing was written (use :meth:`write`, which also raises what went wrong).
        """
        try:
            data = self.encode(frames)
        except ConnectionClosed:
            return False
        if not self._ws.send_nowait(data):
            return False
        if self._counts is not None:
            self._counts.bytes += len(data)
        return True

    async def write(self, frames: list[Encoded]) -> None:
        """Raises ConnectionClosed when the connection is closed or breaks. With no frames,
        it still sends the backlog :meth:`try_write` left."""
        if not frames and not self.backlog:
            return
        data = self.encode(frames)
        await self._ws.send_all(data)
        if self._counts is not None:
            self._counts.bytes += len(data)
