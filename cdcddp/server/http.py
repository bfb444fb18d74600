"""The HTTP front: request-head parsing, routing and plain responses (pure functions, no I/O).

The server reads each request head itself, routes it here, answers plain routes
(``/sockjs/info``, ``/healthz``, ``/readyz``, static files) and accepts WebSocket upgrades
(:mod:`cdcddp.server.websocket`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from urllib.parse import unquote

HEAD_TERMINATOR = b"\r\n\r\n"
DEFAULT_MAX_HEAD_BYTES = 16_384
MAX_HEADERS = 100

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SOCKJS_WEBSOCKET = re.compile(r"^/sockjs/([^/.]+)/([^/.]+)/websocket/?$")

REASONS = {
    200: "OK", 204: "No Content", 304: "Not Modified", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


class BadRequest(ValueError):
    """The bytes are not an HTTP/1.1 request head we accept; answer with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class RequestHead:
    method: str
    target: str  # as sent: path plus query
    path: str  # percent-decoded, without the query
    query: str
    version: str  # "HTTP/1.1"
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of a header (name case-insensitive)."""
        wanted = name.lower()
        for key, value in self.headers:
            if key == wanted:
                return value
        return default

    def header_tokens(self, name: str) -> set[str]:
        """Comma-separated tokens of every instance of a header, lower-cased."""
        wanted = name.lower()
        return {token.strip().lower() for key, value in self.headers if key == wanted
                for token in value.split(",") if token.strip()}


def find_head_end(buffer: bytes, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> int | None:
    """Index just past the blank line ending the head, or None if more bytes are needed.

    Raises BadRequest(431) once the head would exceed max_head_bytes.
    """
    end = buffer.find(HEAD_TERMINATOR, 0, max_head_bytes + len(HEAD_TERMINATOR))
    if end >= 0:
        return end + len(HEAD_TERMINATOR)
    if len(buffer) >= max_head_bytes:
        raise BadRequest("request head too large", 431)
    return None


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a complete request head (request line, headers, blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError as exc:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest("undecodable head") from exc
    lines = text.split("\r\n")
    while lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise BadRequest("empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.match(method.encode("latin-1")):
        raise BadRequest("malformed method")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest("unsupported HTTP version")
    if not target.startswith("/") or any(c in target for c in "\x00\r\n\t"):
        raise BadRequest("malformed target")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (" ", "\t"):
            raise BadRequest("obsolete header folding")
        name, sep, value = line.partition(":")
        if not sep or not name or not _TOKEN.match(name.encode("latin-1")):
            raise BadRequest("malformed header")
        headers.append((name.lower(), value.strip(" \t")))
        if len(headers) > MAX_HEADERS:
            raise BadRequest("too many headers", 431)
    raw_path, _, query = target.partition("?")
    return RequestHead(method=method, target=target, path=unquote(raw_path), query=query,
                       version=version, headers=tuple(headers))


class RouteKind(Enum):
    RAW_WEBSOCKET = "raw-websocket"
    SOCKJS_WEBSOCKET = "sockjs-websocket"
    SOCKJS_INFO = "sockjs-info"
    SOCKJS_INFO_OPTIONS = "sockjs-info-options"
    SOCKJS_GREETING = "sockjs-greeting"
    HEALTH = "health"
    READY = "ready"
    OTHER = "other"  # static-file hook, else 404


def is_websocket_upgrade(head: RequestHead) -> bool:
    return "websocket" in head.header_tokens("upgrade") and "upgrade" in head.header_tokens(
        "connection")


def route(head: RequestHead) -> RouteKind:
    """Which handler a request head goes to (the path alone decides; the handler checks more)."""
    path = head.path
    if path in ("/websocket", "/websocket/", "/sockjs/websocket", "/sockjs/websocket/"):
        return RouteKind.RAW_WEBSOCKET
    if _SOCKJS_WEBSOCKET.match(path):
        return RouteKind.SOCKJS_WEBSOCKET
    if path in ("/sockjs/info", "/sockjs/info/"):
        return RouteKind.SOCKJS_INFO_OPTIONS if head.method == "OPTIONS" else RouteKind.SOCKJS_INFO
    if path in ("/sockjs", "/sockjs/"):
        return RouteKind.SOCKJS_GREETING
    if path == "/healthz":
        return RouteKind.HEALTH
    if path == "/readyz":
        return RouteKind.READY
    return RouteKind.OTHER


def websocket_handshake_problem(head: RequestHead) -> str | None:
    """Why this head is not a WebSocket handshake we accept (None if it is): a plain 400."""
    if head.method != "GET" or head.version != "HTTP/1.1":
        return "WebSocket handshake must be GET over HTTP/1.1"
    if not is_websocket_upgrade(head):
        return 'Can "Upgrade" only to "WebSocket".'
    if head.header("sec-websocket-version") != "13":
        return "Unsupported WebSocket version"
    if not head.header("sec-websocket-key") or not head.header("host"):
        return "Missing Sec-WebSocket-Key or Host"
    return None


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    def encode(self, *, head_only: bool = False) -> bytes:
        """Serialized response; the connection is closed after it (no keep-alive)."""
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Unknown')}"]
        names = {name.lower() for name, _ in self.headers}
        lines.extend(f"{name}: {value}" for name, value in self.headers)
        if "content-length" not in names:
            lines.append(f"Content-Length: {len(self.body)}")
        lines.append("Connection: close")
        data = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return data if head_only else data + self.body


# A hook for static files (and other plain routes added later): return None to fall through.
StaticHandler = Callable[[RequestHead], HttpResponse | None]

_NO_CACHE = ("Cache-Control", "no-store, no-cache, no-transform, must-revalidate, max-age=0")


def text_response(status: int, text: str, headers: list[tuple[str, str]] | None = None
                  ) -> HttpResponse:
    return HttpResponse(status, [("Content-Type", "text/plain; charset=UTF-8"), *(headers or [])],
                        text.encode("utf-8"))


def cors_headers(head: RequestHead) -> list[tuple[str, str]]:
    """SockJS's CORS headers: echo the Origin with credentials (the client sets
    withCredentials, so ``*`` would be refused by browsers)."""
    origin = head.header("origin")
    headers = [("Access-Control-Allow-Origin", origin if origin and origin != "null" else "*")]
    if origin and origin != "null":
        headers.append(("Access-Control-Allow-Credentials", "true"))
    headers.append(("Vary", "Origin"))
    requested = head.header("access-control-request-headers")
    if requested:
        headers.append(("Access-Control-Allow-Headers", requested))
    return headers


def sockjs_info_response(head: RequestHead, entropy: int) -> HttpResponse:
    body = json.dumps({"websocket": True, "origins": ["*:*"], "cookie_needed": False,
                       "entropy": entropy}, separators=(",", ":")).encode()
    return HttpResponse(200, [("Content-Type", "application/json; charset=UTF-8"), _NO_CACHE,
                              *cors_headers(head)], body)


def sockjs_info_options_response(head: RequestHead) -> HttpResponse:
    year = 31_536_000
    return HttpResponse(204, [("Access-Control-Allow-Methods", "OPTIONS, GET"),
                              ("Access-Control-Max-Age", str(year)),
                              ("Cache-Control", f"public, max-age={year}"),
                              *cors_headers(head)])


def health_response(ok: bool, detail: str) -> HttpResponse:
    return text_response(200 if ok else 503, detail + "\n", [_NO_CACHE])


def plain_response(head: RequestHead, kind: RouteKind, *, entropy: int, healthy: bool,
                   static: StaticHandler | None = None,
                   readiness: tuple[bool, str] | None = None) -> HttpResponse:
    """The response to a non-WebSocket request (``readiness``: the server's (ready, reason)
    for ``/readyz``; without it readiness is health)."""
    if kind is RouteKind.SOCKJS_INFO_OPTIONS:
        return sockjs_info_options_response(head)
    if head.method not in ("GET", "HEAD"):
        return text_response(405, "Method Not Allowed\n", [("Allow", "GET, HEAD")])
    if kind is RouteKind.SOCKJS_INFO:
        return sockjs_info_response(head, entropy)
    if kind is RouteKind.SOCKJS_GREETING:
        return text_response(200, "Welcome to SockJS!\n")
    if kind is RouteKind.HEALTH:
        return health_response(healthy, "ok" if healthy else "shutting down")
    if kind is RouteKind.READY:
        if readiness is None:
            return health_response(healthy, "ok" if healthy else "shutting down")
        return health_response(*readiness)
    if kind in (RouteKind.RAW_WEBSOCKET, RouteKind.SOCKJS_WEBSOCKET):
        return text_response(400, 'Can "Upgrade" only to "WebSocket".\n')
    if static is not None:
        response = static(head)
        if response is not None:
            return response
    return text_response(404, "Not Found\n")
