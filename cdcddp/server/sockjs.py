"""SockJS framing for the WebSocket transport (pure functions, no I/O).

The Meteor browser client talks DDP through SockJS. On the WebSocket transport the server
sends ``o`` once, ``h`` heartbeats, ``a[...]`` batches (each element a JSON *string* holding
one DDP message, so the JSON is encoded twice) and ``c[code,"reason"]`` before closing.
The client sends a JSON array of strings (or, tolerated, a single JSON string).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from cdcddp.ddp.messages import Encoded

OPEN_FRAME = "o"
HEARTBEAT_FRAME = "h"

# SockJS clients deliver frames through channels (XHR, iframes) that mangle some code points,
# so sockjs-node escapes them even on the WebSocket transport; we do the same.
_ESCAPABLE = re.compile(
    "[\u0000-\u001f\u007f-\u009f\u00ad\u0600-\u0604\u070f\u17b4\u17b5\u200c-\u200f"
    "\u2028-\u202f\u2060-\u206f\ufeff\ufff0-\uffff\ud800-\udfff]"
)


class SockJSFramingError(ValueError):
    """A client frame that is not a JSON string or an array of JSON strings."""


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def _quote(text: Encoded) -> str:
    if type(text) is bytes:
        text = text.decode()
    return _ESCAPABLE.sub(_escape, json.dumps(text, ensure_ascii=False))


def encode_messages(messages: Sequence[Encoded]) -> str:
    """One ``a[...]`` frame carrying every DDP message (already JSON text) in order."""
    return "a[" + ",".join(_quote(m) for m in messages) + "]"


def encode_message_batches(messages: Iterable[Encoded],
                           max_frame_chars: int = 262_144) -> list[str]:
    """``a[...]`` frames carrying the messages in order, each frame at most ~max_frame_chars.

    Batching keeps writes few; the cap keeps one huge flush from becoming a single frame that a
    client must buffer whole. A single message larger than the cap gets a frame of its own.
    """
    frames: list[str] = []
    batch: list[str] = []
    size = 0
    for message in messages:
        quoted = _quote(message)
        if batch and size + len(quoted) + 1 > max_frame_chars:
            frames.append("a[" + ",".join(batch) + "]")
            batch, size = [], 0
        batch.append(quoted)
        size += len(quoted) + 1
    if batch:
        frames.append("a[" + ",".join(batch) + "]")
    return frames


def encode_close(code: int, reason: str) -> str:
    """The ``c[code,"reason"]`` frame SockJS sends before closing the socket."""
    return f"c[{int(code)},{_quote(reason)}]"


def decode_client_frame(frame: str | bytes) -> list[str]:
    """The DDP messages in one client frame; an empty frame carries none.

    Raises SockJSFramingError when the frame is not a JSON string or array of strings.
    """
    if isinstance(frame, bytes):
        try:
            frame = frame.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SockJSFramingError("frame is not UTF-8") from exc
    if not frame.strip():
        return []
    try:
        payload = json.loads(frame)
    except ValueError as exc:
        raise SockJSFramingError("frame is not JSON") from exc
    if isinstance(payload, str):
        return [payload]
    if isinstance(payload, list) and all(isinstance(item, str) for item in payload):
        return payload
    raise SockJSFramingError("frame is not a string or an array of strings")


def decode_server_frame(frame: str) -> tuple[str, list[str] | tuple[int, str] | None]:
    """Split a server frame into (kind, payload); for clients and tests.

    ``o``/``h`` → payload None; ``a`` → list of messages; ``m`` → one message in a list;
    ``c`` → (code, reason). Raises SockJSFramingError on anything else.
    """
    if frame in (OPEN_FRAME, HEARTBEAT_FRAME):
        return frame, None
    kind, body = frame[:1], frame[1:]
    try:
        payload = json.loads(body) if body else None
    except ValueError as exc:
        raise SockJSFramingError(f"bad {kind!r} frame") from exc
    if kind == "a" and isinstance(payload, list) and all(isinstance(m, str) for m in payload):
        return "a", payload
    if kind == "m" and isinstance(payload, str):
        return "a", [payload]
    if (kind == "c" and isinstance(payload, list) and len(payload) == 2
            and isinstance(payload[0], int) and isinstance(payload[1], str)):
        return "c", (payload[0], payload[1])
    raise SockJSFramingError(f"unknown frame {frame[:20]!r}")
