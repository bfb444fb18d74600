"""Server limits and timings (one place to read what a connection may cost)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cdcddp.ddp.session import SessionConfig
from cdcddp.server.http import DEFAULT_MAX_HEAD_BYTES, StaticHandler


@dataclass
class ServerConfig:
    session: SessionConfig = field(default_factory=SessionConfig)
    # HTTP front: a client gets this long and this many bytes to send its request head.
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    head_timeout: float = 10.0
    # Absurd WebSocket messages close the connection (1009, cdcddp.server.websocket); anything
    # up to this size reaches the session, which answers a too-large DDP message with `error`.
    ws_max_message_chars: int = 16 * 1_048_576
    # A client that does not read: pending outgoing bytes beyond this, or one write stuck
    # longer than send_timeout, disconnects it. Other connections never wait for it.
    max_send_buffer_bytes: int = 8 * 1_048_576
    send_timeout: float = 30.0
    sockjs_heartbeat_interval: float = 25.0
    # Closing: how long to wait for a client's Close reply, and for all clients on shutdown.
    close_timeout: float = 3.0
    shutdown_timeout: float = 10.0
    # Static files (and other plain routes) later: return None to fall through to 404.
    static: StaticHandler | None = None
    # /readyz (with live data): not ready while the applied position is this far behind its
    # commits, or (with metrics' slot poller) the slot lags more bytes than this (None: no
    # byte limit).
    readiness_max_lag_seconds: float = 30.0
    readiness_max_lag_bytes: int | None = None
    # CPython's first GC threshold while serving (its default: 700 allocations). Fan-out
    # allocates per client and change: at 700 the collector runs hundreds of times a second,
    # promotes objects that are only in flight, and these trigger full collections of the
    # whole heap (0.1-0.2 s pauses with 1,000 clients). None: leave the setting alone.
    gc_threshold: int | None = 20_000
