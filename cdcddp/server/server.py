"""The trio server: one port, an HTTP front that routes each request head, DDP over raw
WebSocket (``/websocket``) and SockJS (``/sockjs/<server>/<session>/websocket``).

Start it from code::

    port = await nursery.start(serve, app)          # host 127.0.0.1, port 0 = any free port

or keep a handle for a graceful stop::

    server = Server(app, ServerConfig())
    port = await nursery.start(server.serve, "0.0.0.0", 3000)
    ...
    await server.shutdown()   # stop accepting, close every session with 1001, wait (bounded)

Cancelling ``serve`` also closes sessions gracefully (bounded by ``shutdown_timeout``).

Given a database DSN, the server also runs the live-data engine (one replication slot, see
:mod:`cdcddp.publish.livedata`) in its nursery and serves the app's declarative publications
live; without one it serves methods and handler-style publications only::

    server = Server(app, ServerConfig(), dsn="dbname=app", live_config=LiveDataConfig(slot="n1"))
"""

from __future__ import annotations

import functools
import gc
import logging
import secrets
import signal
from typing import NamedTuple

import trio

from cdcddp.app import App
from cdcddp.db import Database
from cdcddp.ddp.session import ServerSession
from cdcddp.gcpause import storm_promotion
from cdcddp.methods.context import LoginState
from cdcddp.metrics import Metrics
from cdcddp.publish.livedata import LiveData, LiveDataConfig
from cdcddp.server import http, websocket
from cdcddp.server.config import ServerConfig
from cdcddp.server.connection import GOING_AWAY, Connection
from cdcddp.server.transport import Framing

log = logging.getLogger(__name__)

RECEIVE_CHUNK = 4096
LINGER_SECONDS = 1.0
LINGER_MAX_BYTES = 1_048_576
TOKEN_REVOKED = (1000, "Login token revoked")


class WebSocketUpgrade(NamedTuple):
    """A request head the HTTP front accepted as a WebSocket upgrade."""

    framing: Framing
    key: str  # Sec-WebSocket-Key
    received: bytes  # what the client sent after the head (pipelined frames)


class Server:
    """Serves one App on one or more listening sockets."""

    def __init__(self, app: App, config: ServerConfig | None = None, *, dsn: str | None = None,
                 live_config: LiveDataConfig | None = None,
                 database: Database | None = None, metrics: Metrics | None = None) -> None:
        self.app = app
        self.config = config or ServerConfig()
        self.dsn = dsn  # the replication stream's (a standby's, when database is its primary)
        self.database = database if database is not None or dsn is None else Database(dsn)
        # Optional Prometheus metrics: the engine and connections keep plain counters that
        # the on_collect hook copies at scrape time; None costs nothing.
        self.metrics = metrics
        self.live: LiveData | None = None
        if dsn is not None:
            assert self.database is not None
            self.live = LiveData(self.database, dsn, live_config, metrics=metrics)
        if metrics is not None:
            metrics.on_collect(self._collect_metrics)
        self.port: int | None = None
        # Every live handler's cancel scope, with its Connection once the WebSocket is open.
        self._handlers: dict[trio.CancelScope, Connection | None] = {}
        self._accept_scope: trio.CancelScope | None = None
        self._shutting_down = False
        self._handlers_gone = trio.Event()
        self._stopped = trio.Event()
        # Resume-token hash → connections logged in with it (to close them when revoked).
        self._by_token: dict[str, set[Connection]] = {}

    @property
    def connections(self) -> list[Connection]:
        return [c for c in self._handlers.values() if c is not None]

    def _collect_metrics(self) -> None:
        metrics = self.metrics
        assert metrics is not None
        if self.live is not None:
            metrics.sync_live(self.live)
        metrics.set_mergebox_documents(
            sum(c.client.box.document_count for c in self.connections))

    def readiness(self) -> tuple[bool, str]:
        """``/readyz``: (ready, one-line reason). Ready while serving and, with live data,
        while the replication stream is connected and the applied position is no more than
        ``readiness_max_lag_seconds`` behind (see ``LiveData.replication_lag``) and the slot's
        last polled lag (metrics) is within ``readiness_max_lag_bytes``."""
        if self._shutting_down:
            return False, "shutting down"
        if self.port is None:
            return False, "not serving yet"
        live = self.live
        if live is None:
            return True, "ok"
        if not live.stream_connected:
            return False, "replication stream disconnected"
        lag = live.replication_lag()
        limit = self.config.readiness_max_lag_seconds
        if lag > limit:
            return False, f"replication lag {lag:.1f}s exceeds {limit:g}s"
        max_bytes = self.config.readiness_max_lag_bytes
        slot_lag = self.metrics.last_slot_lag_bytes if self.metrics is not None else None
        if max_bytes is not None and slot_lag is not None and slot_lag > max_bytes:
            return False, f"replication slot lag {slot_lag} bytes exceeds {max_bytes}"
        return True, "ok"

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen and serve until ``shutdown()`` or cancellation; reports the bound port.

        With a DSN the live-data engine starts first (its slot must exist before any
        subscription takes its snapshot); it stops when serving stops.
        """
        thresholds = gc.get_threshold()
        if self.config.gc_threshold is not None:
            gc.set_threshold(self.config.gc_threshold, *thresholds[1:])
        try:
            if self.live is None:
                await self._serve(host, port, task_status=task_status)
                return
            async with trio.open_nursery() as nursery:
                await nursery.start(self.live.run)
                await self._serve(host, port, task_status=task_status)
                nursery.cancel_scope.cancel()
        finally:
            gc.set_threshold(*thresholds)

    async def _serve(self, host: str, port: int, *,
                     task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host, backlog=4096)
        self.port = listeners[0].socket.getsockname()[1]
        try:
            async with trio.open_nursery() as handler_nursery:
                try:
                    async with trio.open_nursery() as accept_nursery:
                        self._accept_scope = accept_nursery.cancel_scope
                        await accept_nursery.start(functools.partial(
                            trio.serve_listeners, self._handle_stream, listeners,
                            handler_nursery=handler_nursery))
                        task_status.started(self.port)
                        if self._shutting_down:
                            accept_nursery.cancel_scope.cancel()
                finally:
                    # Reached by shutdown() and by cancellation alike: handlers are shielded,
                    # so sessions can still send their Close frames.
                    with trio.CancelScope(shield=True):
                        await self._close_all()
        finally:
            for listener in listeners:
                await trio.aclose_forcefully(listener)
            self._stopped.set()

    async def shutdown(self) -> None:
        """Stop accepting, close every session (1001 going away), return once all are gone."""
        self._shutting_down = True
        if self._accept_scope is not None:
            self._accept_scope.cancel()
            await self._stopped.wait()

    async def _close_all(self) -> None:
        self._shutting_down = True
        for scope, connection in list(self._handlers.items()):
            if connection is None:
                scope.cancel()  # still reading a request head: nothing to close gracefully
            else:
                connection.request_close(*GOING_AWAY)
        with trio.move_on_after(self.config.shutdown_timeout):
            if self._handlers:
                await self._handlers_gone.wait()
        for scope in list(self._handlers):
            scope.cancel()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        # Shielded so that cancelling serve() does not cut connections before their Close
        # frame; _close_all cancels these scopes itself once sessions had their chance.
        with trio.CancelScope(shield=True) as scope:
            self._handlers[scope] = None
            if self._shutting_down:
                scope.cancel()
            try:
                try:
                    peer = stream.socket.getpeername()[0]
                except (OSError, AttributeError, IndexError):
                    peer = None
                upgrade = await self._serve_http(stream, peer)
                if upgrade is not None:
                    # (called here, not from _serve_http: the request head it parsed is
                    # garbage before the connection starts its long life)
                    await self._serve_websocket(stream, upgrade, scope, peer)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                log.exception("connection handler failed")
            finally:
                del self._handlers[scope]
                if self._shutting_down and not self._handlers:
                    self._handlers_gone.set()
                await trio.aclose_forcefully(stream)

    # ---- accounts ------------------------------------------------------------------------

    def _login_changed(self, connection: Connection, previous: LoginState,
                       current: LoginState) -> None:
        self._forget_token(connection, previous.login_token_hash)
        if current.login_token_hash is not None:
            self._by_token.setdefault(current.login_token_hash, set()).add(connection)

    def _forget_token(self, connection: Connection, token_hash: str | None) -> None:
        if token_hash is None:
            return
        connections = self._by_token.get(token_hash)
        if connections is not None:
            connections.discard(connection)
            if not connections:
                del self._by_token[token_hash]

    def _tokens_revoked(self, caller: Connection, token_hashes: tuple[str, ...]) -> None:
        """Resume tokens were deleted (logout, logoutOtherClients...): other connections
        logged in with them are closed, as Meteor does; their clients reconnect anonymous."""
        for token_hash in token_hashes:
            for connection in list(self._by_token.pop(token_hash, ())):
                if connection is caller:
                    if connection.login.login_token_hash == token_hash:
                        self._by_token.setdefault(token_hash, set()).add(connection)
                    continue
                log.info("closing connection %s: its login token was revoked",
                         connection.connection_id)
                connection.request_close(*TOKEN_REVOKED)

    # ---- HTTP front ------------------------------------------------------------------------

    async def _serve_http(self, stream: trio.SocketStream, peer: str | None = None
                          ) -> WebSocketUpgrade | None:
        """Read and answer one HTTP request; a WebSocket upgrade is returned to be served."""
        config = self.config
        buffer = bytearray()
        end: int | None = None
        with trio.move_on_after(config.head_timeout):
            try:
                while (end := http.find_head_end(bytes(buffer), config.max_head_bytes)) is None:
                    data = await stream.receive_some(RECEIVE_CHUNK)
                    if not data:
                        return
                    buffer += data
            except http.BadRequest as exc:
                await self._respond(stream, http.text_response(exc.status, f"{exc}\n"))
                return
        if end is None:
            await self._respond(stream, http.text_response(408, "Request Timeout\n"))
            return
        try:
            head = http.parse_request_head(bytes(buffer[:end]))
        except http.BadRequest as exc:
            await self._respond(stream, http.text_response(exc.status, f"{exc}\n"))
            return
        kind = http.route(head)
        if kind in (http.RouteKind.RAW_WEBSOCKET, http.RouteKind.SOCKJS_WEBSOCKET) and (
                http.is_websocket_upgrade(head)):
            problem = http.websocket_handshake_problem(head)
            if problem is not None:
                await self._respond(stream, http.text_response(400, problem + "\n"))
                return
            if self._shutting_down:
                await self._respond(stream, http.text_response(503, "Shutting down\n"))
                return
            return WebSocketUpgrade(
                Framing(sockjs=kind is http.RouteKind.SOCKJS_WEBSOCKET),
                head.header("sec-websocket-key") or "", bytes(buffer[end:]))
        response = http.plain_response(
            head, kind, entropy=secrets.randbits(32), healthy=not self._shutting_down,
            static=config.static,
            readiness=self.readiness() if kind is http.RouteKind.READY else None)
        await self._respond(stream, response, head_only=head.method == "HEAD")

    async def _respond(self, stream: trio.abc.Stream, response: http.HttpResponse, *,
                       head_only: bool = False) -> None:
        with trio.move_on_after(self.config.send_timeout):
            await stream.send_all(response.encode(head_only=head_only))
        # Lingering close: closing with unread request bytes makes the kernel send a reset,
        # which can destroy the response before the client reads it (e.g. a 431). Half-close,
        # then drain briefly and boundedly.
        with trio.move_on_after(LINGER_SECONDS):
            if isinstance(stream, trio.SocketStream):
                await stream.send_eof()
            drained = 0
            while drained < LINGER_MAX_BYTES and (chunk := await stream.receive_some(65536)):
                drained += len(chunk)

    # ---- WebSocket -------------------------------------------------------------------------

    async def _serve_websocket(self, stream: trio.SocketStream, upgrade: WebSocketUpgrade,
                               scope: trio.CancelScope, peer: str | None = None) -> None:
        config = self.config
        with trio.move_on_after(config.send_timeout) as handshake:
            await stream.send_all(websocket.handshake_response(upgrade.key))
        if handshake.cancelled_caught:
            return
        ws = websocket.ServerWebSocket(stream, upgrade.received,
                                       max_message_size=config.ws_max_message_chars)
        session = ServerSession(config.session)
        connection = Connection(app=self.app, session=session, ws=ws, framing=upgrade.framing,
                                config=config, live=self.live, database=self.database,
                                peer_address=peer, on_login=self._login_changed,
                                on_tokens_revoked=self._tokens_revoked,
                                metrics=self.metrics)
        self._handlers[scope] = connection
        storm_promotion.built()  # (a connection lives long: see cdcddp.gcpause.Promotion)
        metrics = self.metrics
        if metrics is not None:
            metrics.session_opened()
        finished = False
        try:
            if self._shutting_down:
                connection.request_close(*GOING_AWAY)
            await connection.run()
            finished = True
        finally:
            if metrics is not None:
                reason = connection.close_reason
                if not finished and reason == "client":  # cancelled, or run() failed
                    reason = "shutdown" if self._shutting_down else "server_error"
                metrics.session_closed(reason)
            self._forget_token(connection, connection.login.login_token_hash)
            self._handlers[scope] = None


async def serve(app: App, *, host: str = "127.0.0.1", port: int = 0,
                config: ServerConfig | None = None, dsn: str | None = None,
                live_config: LiveDataConfig | None = None,
                task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``app`` until cancelled (closing sessions gracefully); reports the bound port."""
    await Server(app, config, dsn=dsn, live_config=live_config).serve(
        host, port, task_status=task_status)


async def serve_until_signal(app: App, *, host: str, port: int,
                             config: ServerConfig | None = None, dsn: str | None = None,
                             live_config: LiveDataConfig | None = None) -> None:
    """The CLI's entry: serve until SIGINT/SIGTERM, then shut down gracefully."""
    server = Server(app, config, dsn=dsn, live_config=live_config)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(server.serve, host, port)
            log.info("cdcddp serving %s on %s:%s", app.name, host, bound)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                await server.shutdown()
                nursery.cancel_scope.cancel()
                break
