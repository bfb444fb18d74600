"""One DDP connection: drives the sans-IO session with a reader, a writer/heartbeat pump and an
ordered queue of method and publication calls.

Everything that queues outgoing DDP on the session (the reader, the method queue, publication
contexts, the live-data fan-out) calls ``flush_soon()``: it moves the session's messages into
this connection's bounded outbox and writes it as one socket write — at once, without a task
switch, when no write is under way and the socket takes the bytes (the fan-out flushes every
client a commit touched: a wake-up per client would cost more than its write); otherwise it
wakes the pump, which writes the outbox (and whatever the socket did not take). Nothing but
the pump ever awaits the socket, so a client that stops reading only ever stalls its own pump,
and is disconnected once its outbox or one write passes a bound.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import trio

from cdcddp.app import App, MethodContext, MethodHandler, PublicationHandler, bind_params
from cdcddp.db import Database
from cdcddp.ddp.messages import UNDEFINED, Encoded, MeteorError
from cdcddp.ddp.session import (
    CLOSE_CONNECT_TIMEOUT,
    CLOSE_HEARTBEAT_TIMEOUT,
    CLOSE_VERSION_FAILED,
    CloseRequested,
    MethodRequested,
    ServerSession,
    SubscribeRequested,
    UnsubscribeRequested,
)
from cdcddp.methods.context import ConnectionInfo, LoginState, is_loopback_address
from cdcddp.methods.registry import InvocationOutcome, invoke, to_meteor_error
from cdcddp.publish.clients import OPEN_GATE, LiveClient, SubKey
from cdcddp.publish.definition import (
    BoundCursor,
    Publication,
    PublicationParamsError,
)
from cdcddp.publish.filters import FilterError
from cdcddp.publish.livedata import LiveData
from cdcddp.publish.lookup import ReadRows
from cdcddp.publish.routes import ObserverEntry
from cdcddp.publish.visibility import Snapshot
from cdcddp.server.config import ServerConfig
from cdcddp.server.sockjs import HEARTBEAT_FRAME, SockJSFramingError
from cdcddp.server.transport import FrameWriter, Framing
from cdcddp.server.websocket import ConnectionClosed, ServerWebSocket

if TYPE_CHECKING:
    from cdcddp.metrics import Metrics

log = logging.getLogger(__name__)

BAD_REQUEST_ERROR = '{"msg":"error","reason":"Bad request"}'
INTERNAL_ERROR = '{"msg":"error","reason":"Internal server error"}'
GOING_AWAY = (1001, "Going away")


# Metrics: the close a session ended with -> its reason label.
SLOW_CLIENT_ABORTS = frozenset({"send buffer size limit exceeded (client not reading)",
                                "write time limit exceeded (client not reading)"})
CLOSE_REASONS = {CLOSE_HEARTBEAT_TIMEOUT: "heartbeat_timeout",
                 CLOSE_CONNECT_TIMEOUT: "connect_timeout",
                 CLOSE_VERSION_FAILED: "protocol_error", GOING_AWAY: "shutdown",
                 (1000, "Login token revoked"): "token_revoked"}
PROTOCOL_ERROR_CODES = frozenset({1002, 1003, 1007, 1009})


def _publication_name(sub: Subscription | LiveSubscription) -> str:
    return sub.name if isinstance(sub, Subscription) else sub.publication.name or "(universal)"


def _error_outcome(error: MeteorError) -> str:
    """A failed method call's outcome label (metrics)."""
    if error.error == 500:
        return "internal_error"
    return "unavailable" if error.error == 503 else "error"


class Subscription:
    """A running handler-style subscription; the ``PublicationContext`` its handler publishes
    through, into the connection's merge box (shared with declarative publications).

    The box is flushed after every call, so a handler gets exactly Meteor's messages (unless
    the client's socket is busy: then changes coalesce until it is free).
    """

    def __init__(self, connection: Connection, sub_id: str, name: str) -> None:
        self.connection_id = connection.connection_id
        self.user_id: str | None = connection.user_id
        self.sub_id = sub_id
        self.name = name
        self._connection = connection
        self._client = connection.client
        self._stopped = False
        self._readied = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def added(self, collection: str, doc_id: str, fields: Mapping[str, Any]) -> None:
        if self._stopped:
            return
        box = self._client.box
        fields = dict(fields)  # the box keeps a reference: the handler may reuse its dict
        if box.published_fields(self.sub_id, collection, doc_id) is not None:
            box.change(self.sub_id, collection, doc_id, fields)  # added twice: a change
        else:
            box.add(self.sub_id, collection, doc_id, fields)
        self._client.request_flush()

    def changed(self, collection: str, doc_id: str, fields: Mapping[str, Any],
                cleared: list[str] | tuple[str, ...] = ()) -> None:
        box = self._client.box
        if self._stopped or box.published_fields(self.sub_id, collection, doc_id) is None:
            return
        box.change(self.sub_id, collection, doc_id, dict(fields), tuple(cleared))
        self._client.request_flush()

    def removed(self, collection: str, doc_id: str) -> None:
        box = self._client.box
        if self._stopped or box.published_fields(self.sub_id, collection, doc_id) is None:
            return
        box.remove(self.sub_id, collection, doc_id)
        self._client.request_flush()

    def ready(self) -> None:
        if self._stopped or self._readied:
            return
        self._readied = True
        session, sub_id = self._connection.session, self.sub_id
        self._client.after_flush(lambda: session.ready([sub_id]))
        self._client.request_flush()

    def error(self, error: BaseException) -> None:
        if self._stopped:
            return
        self._connection.stop_subscription(self.sub_id,
                                           to_meteor_error(error, f"publication {self.name!r}"))

    def stop(self) -> None:
        """Mark stopped; the connection removes its documents from the box."""
        self._stopped = True

    def forget(self) -> None:
        """Disconnect: stop without sending anything."""
        self._stopped = True


class LiveSubscription:
    """A subscription to a declarative publication: its observers, one per bound cursor.

    ``key`` is its merge-box id: the DDP sub id, or a handle for a universal publication.
    """

    def __init__(self, key: SubKey, publication: Publication, params: list[Any]) -> None:
        self.key = key
        self.publication = publication
        self.params = params
        self.entries: list[ObserverEntry] = []
        self.stopped = False
        # Rows its publication function read (lookup): watched while it runs.
        self.unwatch: Callable[[], None] | None = None
        self.rerun_pending = False
        # Where the stream was, and the snapshot, when its lookup read rows (see _watch).
        self.lookup_guard: tuple[int, Snapshot] | None = None
        # Its observers are attached (its first run is done); until then a login need not
        # re-run it: its first run resolves for the user of that moment.
        self.attached = False

    @property
    def sub_id(self) -> str | None:
        return self.key if isinstance(self.key, str) else None


class Connection:
    """The I/O side of one DDP session over one WebSocket."""

    # Slots: a server holds thousands of these; an attribute dict this size costs ~1.3 KB
    # more per connection.
    __slots__ = ("_abort_reason", "_close_request", "_last_write", "_nursery", "_on_login",
                 "_on_tokens_revoked", "_outbox", "_outbox_chars", "_pump_deadline",
                 "_send_counts", "_subs", "_universal", "_universal_started", "_wake", "_work",
                 "_worker_running", "_writer", "_writing", "_ws", "app", "client", "config",
                 "connection_id", "database", "framing", "live", "login", "metrics",
                 "peer_address", "secure_transport", "session", "user_id")

    def __init__(self, *, app: App, session: ServerSession, ws: ServerWebSocket,
                 framing: Framing, config: ServerConfig, live: LiveData | None = None,
                 database: Database | None = None, peer_address: str | None = None,
                 tls: bool = False,
                 on_login: Callable[[Connection, LoginState, LoginState], None] | None = None,
                 on_tokens_revoked: Callable[[Connection, tuple[str, ...]], None] | None = None,
                 metrics: Metrics | None = None,
                 ) -> None:
        self.app = app
        self.metrics = metrics
        self.database = database if database is not None else (
            live.database if live is not None else None)
        self.peer_address = peer_address
        # Plain-text passwords are accepted only over loopback or TLS.
        self.secure_transport = tls or is_loopback_address(peer_address)
        self.login = LoginState()  # the accounts layer's view: user and resume-token hash
        self._on_login = on_login
        self._on_tokens_revoked = on_tokens_revoked
        self.session = session
        self.connection_id = session.session_id
        self.framing = framing
        self.config = config
        self.live = live
        self.user_id: Any = None  # the logged-in user (set_user); None: anonymous
        self.client = LiveClient(session, self.flush_soon, output_busy=self._output_busy,
                                 gate=live.gate if live is not None else OPEN_GATE,
                                 on_failure=self.abort)
        self.client.on_subscription_failed = self._observer_failed
        self._writing = True  # until run() has written the opening frames
        self._pump_deadline = float("inf")  # when the pump wakes up by itself
        self._universal: list[LiveSubscription] = []
        self._universal_started = False
        self._ws = ws
        self._writer = FrameWriter(ws, metrics.send_counts if metrics is not None else None)
        self._send_counts = metrics.send_counts if metrics is not None else None
        self._wake = trio.Event()
        self._outbox: list[Encoded] = []
        self._outbox_chars = 0
        self._close_request: tuple[int, str] | None = None
        self._abort_reason: str | None = None
        self._subs: dict[str, Subscription | LiveSubscription] = {}
        # Queued calls, first in front (a list: a deque costs 760 B per connection; the
        # session bounds pending calls to a few).
        self._work: list[Callable[[], Awaitable[None]]] = []
        self._worker_running = False
        self._nursery: trio.Nursery | None = None
        self._last_write = 0.0

    # ---- called from anywhere (sync) -------------------------------------------------------

    def flush_soon(self) -> None:
        """Move the session's queued messages to the outbox and write them: at once if the
        socket takes them, else by waking the writer."""
        if self._drain_session() and not self._write_now():
            self._wake.set()

    def _write_now(self) -> bool:
        """Write the outbox without awaiting (FrameWriter.try_write). The engine flushes every
        client a commit touched; a task switch per client would cost more than the write.
        False: the pump must act (a write under way, a backlog, a large flush's next piece)."""
        if self._writing or self._close_request is not None or self.aborted:
            return False
        if not self._writer.try_write(self.framing.outgoing(self._outbox)):
            return False
        self._outbox, self._outbox_chars = [], 0
        self._written()
        return not self._writer.backlog and not self.client.flush_wanted

    def _drain_session(self) -> bool:
        """Move the session's queued messages to the bounded outbox; True if any moved."""
        messages = self.session.data_to_send()
        if not messages:
            return False
        self._outbox.extend(messages)
        if self._send_counts is not None:
            self._send_counts.count_messages(messages)
        self._outbox_chars += sum(map(len, messages))
        if self._outbox_chars > self.config.max_send_buffer_bytes:
            self.abort("send buffer size limit exceeded (client not reading)")
        return True

    def request_close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with a proper Close frame (SockJS: ``c`` first)."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self._wake.set()

    @property
    def close_reason(self) -> str:
        """Why the session ended (after ``run``), for ``cdcddp_sessions_closed_total``:
        client, heartbeat_timeout, connect_timeout, protocol_error, slow_client, shutdown,
        token_revoked, server_error or closed (another close the server asked for)."""
        abort = self._abort_reason
        if abort is not None:
            return "slow_client" if abort in SLOW_CLIENT_ABORTS else "server_error"
        request = self._close_request
        if request is not None:
            return CLOSE_REASONS.get(request, "closed")
        closed = self._ws.closed
        if closed is not None and closed.code in PROTOCOL_ERROR_CODES:
            return "protocol_error"  # the WebSocket layer closed on a bad frame or size
        return "client"

    def abort(self, reason: str) -> None:
        """Drop the connection without a closing handshake (its socket is stuck)."""
        if self._abort_reason is None:
            self._abort_reason = reason
            log.info("connection %s aborted: %s", self.connection_id, reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def aborted(self) -> bool:
        return self._abort_reason is not None

    def _output_busy(self) -> bool:
        # While a write is under way (or queued), merge-box changes wait and coalesce.
        return self._writing or bool(self._outbox) or self._writer.backlog

    # ---- lifetime --------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until the peer leaves, the session asks to close, or we are told to close."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self._abort_reason is not None:
                    nursery.cancel_scope.cancel()
                now = trio.current_time()
                self._last_write = now
                await self._write(self.framing.opening_frames())
                self._writing = False
                self.session.opened(now)
                self.flush_soon()
                nursery.start_soon(self._pump)
                await self._read_loop()
                if self._close_request is None:
                    nursery.cancel_scope.cancel()  # the peer left: nothing more to send
                # else the pump flushes, closes, then cancels
        except* ConnectionClosed:
            pass  # the peer left, also while the pump was writing (then in a group)
        finally:
            for sub in [*self._subs.values(), *self._universal]:
                if isinstance(sub, LiveSubscription):
                    self._detach(sub, remove_documents=False)
                else:
                    sub.forget()
            if self.metrics is not None:
                for sub in self._subs.values():
                    self.metrics.subscription_stopped(_publication_name(sub))
            self._subs.clear()
            self._universal.clear()
            self._work.clear()
            self.client.close()
            self.session.close()

    async def close_gracefully(self, code: int, reason: str) -> None:
        """After run(): send what is left and a Close frame, wait (bounded) for the reply."""
        if self.aborted or not self._writer.open:
            return
        with trio.move_on_after(self.config.close_timeout):
            try:
                self.flush_soon()
                pending, self._outbox, self._outbox_chars = self._outbox, [], 0
                await self._write(self.framing.outgoing(pending)
                                  + self.framing.closing_frames(code, reason))
                await self._ws.aclose(code, reason)
            except ConnectionClosed:
                pass

    # ---- tasks -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await self._ws.get_message()
            except ConnectionClosed:
                return
            # Once closing, keep draining (so the WebSocket sees the peer's Close reply)
            # but act on nothing: messages after `failed` or a close are ignored.
            if self._close_request is None:
                self._receive_frame(frame, trio.current_time())

    def _receive_frame(self, frame: str | bytes, now: float) -> None:
        try:
            messages = self.framing.incoming(frame)
        except SockJSFramingError:
            # sockjs-node would close on broken framing; one bad frame must not cost the
            # connection, so answer it like any malformed DDP message.
            self.session.send_encoded(BAD_REQUEST_ERROR)
            self.flush_soon()
            return
        for message in messages:
            try:
                events = self.session.receive(message, now)
            except Exception:
                log.exception("session failed on a message")
                self.session.send_encoded(INTERNAL_ERROR)
                continue
            self._dispatch(events)
            if not self._universal_started and self.session.state == "connected":
                self._start_universal()
            if self._close_request is not None:
                break
        self.flush_soon()
        if self.session.next_deadline() < self._pump_deadline:
            self._wake.set()  # e.g. heartbeats start after `connect`: re-arm the pump's timer

    async def _pump(self) -> None:
        """Writer and heartbeat driver: write the outbox, run session heartbeats, close."""
        heartbeat = self.config.sockjs_heartbeat_interval if self.framing.sockjs else None
        while True:
            deadline = self.session.next_deadline()
            if heartbeat is not None:
                deadline = min(deadline, self._last_write + heartbeat)
            self._pump_deadline = deadline
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self._dispatch(self.session.tick(now))
            self._drain_session()
            if self.client.flush_wanted and not self._outbox and not self._writer.backlog:
                # Changes that waited (coalescing) for the socket; one piece per write.
                self.client.flush()
                self._drain_session()  # not flush_soon(): that would re-arm the event just reset
            if self._outbox or self._writer.backlog:
                pending, self._outbox, self._outbox_chars = self._outbox, [], 0
                self._writing = True
                try:
                    await self._write(self.framing.outgoing(pending))
                finally:
                    self._writing = False
                if self.client.flush_wanted:
                    self._wake.set()
            elif heartbeat is not None and now >= self._last_write + heartbeat:
                await self._write([HEARTBEAT_FRAME])
            if self._close_request is not None:
                code, reason = self._close_request
                if code == GOING_AWAY[0] and self._worker_running:
                    # Server shutdown: the call under way finishes (the server bounds the wait
                    # by its shutdown_timeout) and its result goes out before the Close; calls
                    # not started are dropped (Meteor clients send them again on reconnect).
                    self._work.clear()
                    continue
                await self.close_gracefully(code, reason)
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return

    async def _write(self, frames: list[str]) -> None:
        if not frames and not self._writer.backlog:
            return
        with trio.move_on_after(self.config.send_timeout) as scope:
            await self._writer.write(frames)
        if scope.cancelled_caught:
            self.abort("write time limit exceeded (client not reading)")
            await trio.lowlevel.checkpoint()  # deliver the cancellation
        self._written()

    def _written(self) -> None:
        self._last_write = trio.current_time()
        if self.client.commit_time and self.metrics is not None:
            # These frames carried changes of a transaction committed at commit_time.
            self.metrics.commit_sent(time.time() - self.client.commit_time)
            self.client.commit_time = 0.0

    # ---- DDP events ------------------------------------------------------------------------

    def _dispatch(self, events: list[Any]) -> None:
        for event in events:
            if isinstance(event, MethodRequested):
                self._on_method(event)
            elif isinstance(event, SubscribeRequested):
                self._on_subscribe(event)
            elif isinstance(event, UnsubscribeRequested):
                self.stop_subscription(event.sub_id, None)
            elif isinstance(event, CloseRequested):
                self.request_close(event.code, event.reason)

    def _on_method(self, event: MethodRequested) -> None:
        received = time.monotonic()
        handler = self.app.methods.get(event.name)
        if handler is None and event.name in self.app.typed_methods:
            self._enqueue(lambda: self._run_typed_method(event, received))
            return
        if handler is None:
            self.session.result(event.method_id,
                                error=MeteorError(404, f"Method '{event.name}' not found"))
            self._count_method(event.name, "not_found", received)
            self._method_finished(event.method_id)
            return
        self._enqueue(lambda: self._run_method(event, handler, received))

    def _count_method(self, name: str, outcome: str, received: float) -> None:
        """Metrics: a call finished (ok, error, internal_error or not_found)."""
        if self.metrics is not None:
            self.metrics.method_finished(name, outcome, time.monotonic() - received)
            if name == "login":  # the accounts login method (password or resume token)
                self.metrics.login(outcome == "ok")

    def _on_subscribe(self, event: SubscribeRequested) -> None:
        publication = self.app.publications.get(event.name)
        if publication is not None:
            live_sub = LiveSubscription(event.sub_id, publication, event.params)
            self._subs[event.sub_id] = live_sub
            if self.metrics is not None:
                self.metrics.subscription_started(event.name)
            self._enqueue(lambda: self._run_live_subscription(live_sub))
            return
        handler = self.app.publish_handlers.get(event.name)
        if handler is None:
            self.session.nosub(event.sub_id,
                               MeteorError(404, f"Subscription '{event.name}' not found"))
            return
        sub = Subscription(self, event.sub_id, event.name)
        self._subs[event.sub_id] = sub
        if self.metrics is not None:
            self.metrics.subscription_started(event.name)
        self._enqueue(lambda: self._run_publication(sub, handler, event.params))

    def stop_subscription(self, sub_id: str, error: MeteorError | None) -> None:
        """unsub, or a publication error: remove its documents, then ``nosub``."""
        sub = self._subs.pop(sub_id, None)
        if sub is not None and self.metrics is not None:
            self.metrics.subscription_stopped(_publication_name(sub))
        if isinstance(sub, LiveSubscription):
            self._detach(sub)
        elif sub is not None:
            sub.stop()
            self.client.box.remove_subscription(sub_id)
        session = self.session
        self.client.after_flush(lambda: session.nosub(sub_id, error))
        self.client.request_flush()

    # ---- declarative (live) publications ---------------------------------------------------

    def _start_universal(self) -> None:
        self._universal_started = True
        for number, publication in enumerate(self.app.publications.universal):
            sub = LiveSubscription(("universal", number), publication, [])
            self._universal.append(sub)
            self._enqueue(functools.partial(self._run_live_subscription, sub))

    async def _resolve(self, sub: LiveSubscription, user_id: Any, after_xid: int = 0
                       ) -> tuple[tuple[BoundCursor, ...], ReadRows | None]:
        """The subscription's cursors for ``user_id``, and the rows its function read (None
        when it reads none). ``after_xid``: read rows under a snapshot that sees it."""
        publication = sub.publication
        if publication.wants_lookup and not (publication.requires_user and user_id is None):
            if self.live is None:
                raise RuntimeError("this publication reads rows: the server needs a database")

            result = await self.live.lookups.run(
                lambda lookup: publication.resolve(sub.params, user_id, lookup), after_xid,
                same_as=publication.inputs_key(sub.params, user_id),
                publication=_publication_name(sub))
            sub.lookup_guard = result.guard
            return result.value, result.dependencies
        return publication.resolve(sub.params, user_id), None

    def _watch(self, sub: LiveSubscription, dependencies: ReadRows | None) -> None:
        """Re-run ``sub``'s function when the stream changes a row it read."""
        if sub.unwatch is not None:
            sub.unwatch()
            sub.unwatch = None
        if dependencies and self.live is not None and not sub.stopped:
            sub.unwatch = self.live.watch_rows(
                dependencies, functools.partial(self._dependency_changed, sub),
                _publication_name(sub))
            # A change committed between the lookup's read and this watch went unseen: if one
            # may have, run the lookup again.
            guard, sub.lookup_guard = sub.lookup_guard, None
            stale = None if guard is None else self.live.lookup_stale(dependencies, *guard)
            if stale is not None:
                self._dependency_changed(sub, stale)

    def _dependency_changed(self, sub: LiveSubscription, xid: int) -> None:
        if sub.stopped or sub.rerun_pending:
            return
        sub.rerun_pending = True

        async def rerun() -> None:
            sub.rerun_pending = False
            if not sub.stopped:
                await self._rerun([sub], self.user_id, xid)
        self._enqueue(rerun)

    async def _run_live_subscription(self, sub: LiveSubscription) -> None:
        if sub.stopped:
            return
        name = sub.publication.name or "(universal)"
        try:
            user_id = self.user_id
            bounds, dependencies = await self._resolve(sub, user_id)
            if bounds and self.live is None:
                raise RuntimeError(f"publication {name!r} needs a database: serve with a DSN")
            entries = await self._acquire_all(bounds)
        except PublicationParamsError as exc:
            self._live_subscription_failed(sub, MeteorError(400, "Match failed", exc.reason))
            return
        except FilterError as exc:
            self._live_subscription_failed(sub, MeteorError(400, "Match failed", str(exc)))
            return
        except Exception as exc:
            self._live_subscription_failed(sub, to_meteor_error(exc, f"publication {name!r}"))
            return
        if sub.stopped:  # unsubscribed (or disconnected) while its snapshot ran
            self._release_all(entries)
            return
        live = self.live
        for entry in entries:
            assert live is not None
            live.add_subscriber(entry, self.client, sub.key)
        sub.entries = entries
        sub.attached = True
        self._watch(sub, dependencies)
        if self.user_id != user_id:  # logged in or out (set_user skipped it) while it resolved
            await self._rerun([sub], self.user_id)
        sub_id = sub.sub_id
        if sub_id is not None and not sub.stopped:
            session = self.session
            self.client.after_flush(lambda: session.ready([sub_id]))
        self.client.request_flush()

    def _observer_failed(self, key: SubKey, error: BaseException) -> None:
        """The engine stopped an observer this subscription used (its query can no longer
        run, e.g. a published column was dropped): the subscription stops, ``nosub`` says
        why."""
        sub = self._subs.get(key) if isinstance(key, str) else next(
            (s for s in self._universal if s.key == key), None)
        if not isinstance(sub, LiveSubscription) or sub.stopped:
            return
        self._detach(sub)
        name = sub.publication.name or "(universal)"
        self._live_subscription_failed(sub, to_meteor_error(error, f"publication {name!r}"))

    def _live_subscription_failed(self, sub: LiveSubscription, error: MeteorError) -> None:
        if sub.sub_id is not None:
            if self._subs.get(sub.sub_id) is sub:
                self.stop_subscription(sub.sub_id, error)
        else:
            sub.stopped = True  # a universal publication: nothing to tell the client

    async def _acquire_all(self, bounds: tuple[BoundCursor, ...]) -> list[ObserverEntry]:
        entries: list[ObserverEntry] = []
        try:
            for bound in bounds:
                assert self.live is not None
                entries.append(await self.live.acquire(bound))
        except BaseException:
            self._release_all(entries)
            raise
        return entries

    def _release_all(self, entries: list[ObserverEntry]) -> None:
        if self.live is not None:
            for entry in entries:
                self.live.release(entry)

    def _detach(self, sub: LiveSubscription, *, remove_documents: bool = True) -> None:
        sub.stopped = True
        self._watch(sub, None)
        entries, sub.entries = sub.entries, []
        if self.live is not None:
            for entry in entries:
                self.live.remove_subscriber(entry, self.client, sub.key,
                                            remove_documents=remove_documents)
                self.live.release(entry)
        if remove_documents:
            self.client.box.remove_subscription(sub.key)

    async def set_user(self, user_id: Any) -> None:
        """The connection logged in or out: re-run its declarative subscriptions for the new
        user; the client gets only the difference (as Meteor's ``_setUserId``), no
        ``nosub``/``ready`` round trip.

        The accounts layer calls it (from a method, in the connection's ordered queue).
        """
        if user_id == self.user_id:
            return
        self.user_id = user_id
        for other in self._subs.values():
            if isinstance(other, Subscription):
                other.user_id = user_id
        subs = [s for s in [*self._subs.values(), *self._universal]
                if isinstance(s, LiveSubscription) and s.attached and not s.stopped]
        await self._rerun(subs, user_id)

    async def _rerun(self, subs: list[LiveSubscription], user_id: Any, after_xid: int = 0
                     ) -> None:
        """Re-resolve ``subs`` for ``user_id`` and swap their observers; the client gets
        only the difference."""
        # Per sub, in order: (its new observers, the rows its function read), or its error.
        prepared: list[tuple[list[ObserverEntry], ReadRows | None] | MeteorError | None] = [
            None] * len(subs)

        async def prepare(index: int, sub: LiveSubscription) -> None:
            try:
                bounds, dependencies = await self._resolve(sub, user_id, after_xid)
                prepared[index] = (await self._acquire_all(bounds), dependencies)
            except Exception as exc:
                name = sub.publication.name or "(universal)"
                prepared[index] = to_meteor_error(exc, f"publication {name!r}")

        try:
            if len(subs) == 1:
                await prepare(0, subs[0])
            else:
                # All at once (a login re-runs every subscription): their functions share
                # lookup batches and their new observers' reads share snapshots, instead of a
                # database round trip each, one after another.
                async with trio.open_nursery() as nursery:
                    for index, sub in enumerate(subs):
                        nursery.start_soon(prepare, index, sub)
        except BaseException:
            for outcome in prepared:
                if isinstance(outcome, tuple):
                    self._release_all(outcome[0])
            raise
        plans: list[tuple[LiveSubscription, list[ObserverEntry], ReadRows | None]] = []
        failures: list[tuple[LiveSubscription, MeteorError]] = []
        for sub, outcome in zip(subs, prepared, strict=True):
            if isinstance(outcome, MeteorError):
                failures.append((sub, outcome))
            elif outcome is not None:
                plans.append((sub, *outcome))
        # One synchronous swap, then one flush: the box sends only what differs.
        live = self.live
        for sub, entries, dependencies in plans:
            if sub.stopped or self.user_id != user_id:
                self._release_all(entries)  # gone or overtaken
                continue
            self._watch(sub, dependencies)
            if entries == sub.entries:
                self._release_all(entries)  # the same observers
                continue
            assert live is not None
            for entry in sub.entries:
                live.remove_subscriber(entry, self.client, sub.key)
                live.release(entry)
            for entry in entries:
                live.add_subscriber(entry, self.client, sub.key)
            sub.entries = entries
        for sub, error in failures:
            self._detach(sub)
            self._live_subscription_failed(sub, error)
        self.client.request_flush()

    # ---- the ordered call queue ------------------------------------------------------------

    def _enqueue(self, job: Callable[[], Awaitable[None]]) -> None:
        # Calls run one at a time, in arrival order (Meteor's default without unblock). The
        # worker task exists only while there is work, so an idle connection costs no task.
        self._work.append(job)
        if not self._worker_running and self._nursery is not None:
            self._worker_running = True
            self._nursery.start_soon(self._run_work)

    async def _run_work(self) -> None:
        try:
            while self._work:
                job = self._work.pop(0)
                await job()
                self.flush_soon()
        finally:
            self._worker_running = False
            if self._close_request is not None:
                self._wake.set()  # a shutdown close was waiting for this call

    async def _run_method(self, event: MethodRequested, handler: MethodHandler,
                          received: float = 0.0) -> None:
        context = MethodContext(connection_id=self.connection_id, user_id=None,
                                random_seed=event.random_seed, method_id=event.method_id)
        bound = bind_params(handler, context, event.params)
        outcome = "ok"
        if bound is None:
            self.session.result(event.method_id, error=MeteorError(400, "Match failed"))
            outcome = "error"
        else:
            try:
                value = await handler(*bound.args, **bound.kwargs)
            except Exception as exc:
                error = to_meteor_error(exc, f"method {event.name!r}")
                self.session.result(event.method_id, error=error)
                outcome = "error" if isinstance(exc, MeteorError) else _error_outcome(error)
            else:
                try:
                    # Python's "returned nothing" is None: like Meteor's undefined, no value
                    self.session.result(event.method_id, UNDEFINED if value is None else value)
                except Exception as exc:  # a value that cannot be sent is the method's bug: 500
                    self.session.result(event.method_id,
                                        error=to_meteor_error(exc, f"method {event.name!r}"))
                    outcome = "internal_error"
        self._count_method(event.name, outcome, received)
        self._method_finished(event.method_id)

    async def _run_typed_method(self, event: MethodRequested, received: float = 0.0) -> None:
        info = ConnectionInfo(self.connection_id, self.login, self.peer_address,
                              self.secure_transport)
        outcome = await invoke(self.app.typed_methods, event.name, event.params, info,
                               method_id=event.method_id, random_seed=event.random_seed,
                               database=self.database)
        error = outcome.error
        self._count_method(event.name, "ok" if error is None else _error_outcome(error),
                           received)
        login_changed = False
        if outcome.login is not None and outcome.login != self.login:
            previous, self.login = self.login, outcome.login
            if self._on_login is not None:
                self._on_login(self, previous, outcome.login)
            if outcome.login.user_id != self.user_id:
                # Meteor re-runs the subscriptions before the login method's result.
                await self.set_user(outcome.login.user_id)
                login_changed = True
        if outcome.revoked_token_hashes and self._on_tokens_revoked is not None:
            self._on_tokens_revoked(self, outcome.revoked_token_hashes)
        if login_changed:
            self.client.after_flush(functools.partial(self._send_outcome, event, outcome))
            self.client.request_flush()
        else:
            self._send_outcome(event, outcome)
        xid = outcome.xid
        if xid is None or self.live is None or self._nursery is None:
            if login_changed:  # after the deferred result
                session, method_id = self.session, event.method_id
                self.client.after_flush(lambda: session.updated([method_id]))
                self.client.request_flush()
            else:
                self._method_finished(event.method_id)
        else:
            self._nursery.start_soon(self._fence, event.method_id, xid, outcome.commit.xid8)

    def _send_outcome(self, event: MethodRequested, outcome: InvocationOutcome) -> None:
        if outcome.error is not None:
            self.session.result(event.method_id, error=outcome.error)
            return
        try:
            self.session.result(event.method_id, outcome.result)
        except Exception as exc:  # a value that cannot be sent is the method's bug: 500
            self.session.result(event.method_id,
                                error=to_meteor_error(exc, f"method {event.name!r}"))

    async def _fence(self, method_id: str, xid: int, xid8: int | None) -> None:
        """The write fence: ``updated`` once the stream applied the method's commit and this
        client's merge box flushed what it caused."""
        assert self.live is not None
        await self.live.wait_applied(xid, xid8)
        session = self.session
        self.client.after_flush(lambda: session.updated([method_id]))
        self.client.request_flush()
        self.flush_soon()

    def _method_finished(self, method_id: str) -> None:
        # `updated` promises that every data message the method caused has been sent: here
        # the method wrote nothing (typed methods that wrote wait in _fence first).
        self.session.updated([method_id])
        self.flush_soon()

    async def _run_publication(self, sub: Subscription, handler: PublicationHandler,
                               params: list[Any]) -> None:
        if sub.stopped:
            return
        bound = bind_params(handler, sub, params)
        if bound is None:
            sub.error(MeteorError(400, "Match failed"))
            return
        try:
            await handler(*bound.args, **bound.kwargs)
        except Exception as exc:
            sub.error(exc)
