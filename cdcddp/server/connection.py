"""One DDP connection: drives the sans-IO session with a reader, a writer/heartbeat pump and an
ordered queue of method and publication calls.

Everything that queues outgoing DDP on the session (the reader, the method queue, publication
contexts, later the fan-out) calls ``flush_soon()``: it moves the session's messages into this
connection's bounded outbox and wakes the pump, which writes the whole outbox as few frames in
one socket write. Nothing but the pump ever awaits the socket, so a client that stops reading
only ever stalls its own pump, and is disconnected once its outbox or one write passes a bound.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import trio
import trio_websocket

from cdcddp.app import App, MethodContext, MethodHandler, PublicationHandler, bind_params
from cdcddp.ddp.messages import UNDEFINED, MeteorError
from cdcddp.ddp.session import (
    CloseRequested,
    MethodRequested,
    ServerSession,
    SubscribeRequested,
    UnsubscribeRequested,
)
from cdcddp.server.config import ServerConfig
from cdcddp.server.sockjs import HEARTBEAT_FRAME, SockJSFramingError
from cdcddp.server.transport import FrameWriter, Framing

log = logging.getLogger(__name__)

BAD_REQUEST_ERROR = '{"msg":"error","reason":"Bad request"}'
INTERNAL_ERROR = '{"msg":"error","reason":"Internal server error"}'
GOING_AWAY = (1001, "Going away")


def internal_error() -> MeteorError:
    return MeteorError(500, "Internal server error")


def to_meteor_error(exc: BaseException, where: str) -> MeteorError:
    """The error a client may see: MeteorError as is; anything else is logged (with its
    traceback) and becomes 500 without internals."""
    if isinstance(exc, MeteorError):
        return exc
    log.error("%s failed", where, exc_info=exc)
    return internal_error()


class Subscription:
    """A running subscription; the ``PublicationContext`` its handler publishes through.

    Documents are reference-counted per connection so that unsubscribing removes only what no
    other subscription still publishes. This is the interim stand-in for the merge box (which
    also tracks field precedence); the live-data issue replaces it.
    """

    def __init__(self, connection: Connection, sub_id: str, name: str) -> None:
        self.connection_id = connection.connection_id
        self.user_id: str | None = None
        self.sub_id = sub_id
        self.name = name
        self._connection = connection
        self._docs: dict[tuple[str, str], None] = {}  # ordered: removals go out in add order
        self._stopped = False
        self._readied = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    def added(self, collection: str, doc_id: str, fields: Mapping[str, Any]) -> None:
        if self._stopped:
            return
        key = (collection, doc_id)
        holders = self._connection.doc_holders.setdefault(key, set())
        first = not holders
        holders.add(self.sub_id)
        self._docs[key] = None
        session = self._connection.session
        if first:
            session.added(collection, doc_id, dict(fields))
        elif fields:
            session.changed(collection, doc_id, dict(fields), [])
        self._connection.flush_soon()

    def changed(self, collection: str, doc_id: str, fields: Mapping[str, Any],
                cleared: list[str] | tuple[str, ...] = ()) -> None:
        if self._stopped or (collection, doc_id) not in self._docs:
            return
        if fields or cleared:
            self._connection.session.changed(collection, doc_id, dict(fields), list(cleared))
            self._connection.flush_soon()

    def removed(self, collection: str, doc_id: str) -> None:
        key = (collection, doc_id)
        if self._stopped or key not in self._docs:
            return
        del self._docs[key]
        self._connection.release_document(key, self.sub_id)
        self._connection.flush_soon()

    def ready(self) -> None:
        if self._stopped or self._readied:
            return
        self._readied = True
        self._connection.session.ready([self.sub_id])
        self._connection.flush_soon()

    def error(self, error: BaseException) -> None:
        if self._stopped:
            return
        self._connection.stop_subscription(self.sub_id,
                                           to_meteor_error(error, f"publication {self.name!r}"))

    def stop(self) -> None:
        """Mark stopped and give up this subscription's documents (sending ``removed`` for
        those nobody else holds); the caller sends ``nosub``."""
        self._stopped = True
        for key in self._docs:
            self._connection.release_document(key, self.sub_id)
        self._docs.clear()

    def forget(self) -> None:
        """Disconnect: stop without sending anything."""
        self._stopped = True
        self._docs.clear()


class Connection:
    """The I/O side of one DDP session over one WebSocket."""

    def __init__(self, *, app: App, session: ServerSession, ws: trio_websocket.WebSocketConnection,
                 framing: Framing, config: ServerConfig) -> None:
        self.app = app
        self.session = session
        self.connection_id = session.session_id
        self.framing = framing
        self.config = config
        self.doc_holders: dict[tuple[str, str], set[str]] = {}
        self._ws = ws
        self._writer = FrameWriter(ws)
        self._wake = trio.Event()
        self._outbox: list[str] = []
        self._outbox_chars = 0
        self._close_request: tuple[int, str] | None = None
        self._abort_reason: str | None = None
        self._subs: dict[str, Subscription] = {}
        self._work: deque[Callable[[], Awaitable[None]]] = deque()
        self._worker_running = False
        self._nursery: trio.Nursery | None = None
        self._last_write = 0.0

    # ---- called from anywhere (sync) -------------------------------------------------------

    def flush_soon(self) -> None:
        """Move the session's queued messages to the outbox and wake the writer."""
        if self._drain_session():
            self._wake.set()

    def _drain_session(self) -> bool:
        """Move the session's queued messages to the bounded outbox; True if any moved."""
        messages = self.session.data_to_send()
        if not messages:
            return False
        self._outbox.extend(messages)
        self._outbox_chars += sum(len(m) for m in messages)
        if self._outbox_chars > self.config.max_send_buffer_bytes:
            self.abort("send buffer size limit exceeded (client not reading)")
        return True

    def request_close(self, code: int, reason: str) -> None:
        """Flush what is queued, then close with a proper Close frame (SockJS: ``c`` first)."""
        if self._close_request is None:
            self._close_request = (code, reason)
        self._wake.set()

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
                self.session.opened(now)
                self.flush_soon()
                nursery.start_soon(self._pump)
                await self._read_loop()
                if self._close_request is None:
                    nursery.cancel_scope.cancel()  # the peer left: nothing more to send
                # else the pump flushes, closes, then cancels
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            for sub in self._subs.values():
                sub.forget()
            self._subs.clear()
            self._work.clear()
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
            except trio_websocket.ConnectionClosed:
                pass

    # ---- tasks -----------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while True:
            try:
                frame = await self._ws.get_message()
            except trio_websocket.ConnectionClosed:
                return
            # Once closing, keep draining (so trio-websocket can see the peer's Close reply)
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
            if self._close_request is not None:
                break
        self.flush_soon()

    async def _pump(self) -> None:
        """Writer and heartbeat driver: write the outbox, run session heartbeats, close."""
        heartbeat = self.config.sockjs_heartbeat_interval if self.framing.sockjs else None
        while True:
            deadline = self.session.next_deadline()
            if heartbeat is not None:
                deadline = min(deadline, self._last_write + heartbeat)
            with trio.move_on_at(deadline):
                await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            self._dispatch(self.session.tick(now))
            self._drain_session()  # not flush_soon(): that would re-arm the event just reset
            if self._outbox:
                pending, self._outbox, self._outbox_chars = self._outbox, [], 0
                await self._write(self.framing.outgoing(pending))
            elif heartbeat is not None and now >= self._last_write + heartbeat:
                await self._write([HEARTBEAT_FRAME])
            if self._close_request is not None:
                code, reason = self._close_request
                await self.close_gracefully(code, reason)
                assert self._nursery is not None
                self._nursery.cancel_scope.cancel()
                return

    async def _write(self, frames: list[str]) -> None:
        if not frames:
            return
        with trio.move_on_after(self.config.send_timeout) as scope:
            await self._writer.write(frames)
        if scope.cancelled_caught:
            self.abort("write time limit exceeded (client not reading)")
            await trio.lowlevel.checkpoint()  # deliver the cancellation
        self._last_write = trio.current_time()

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
        handler = self.app.methods.get(event.name)
        if handler is None:
            self.session.result(event.method_id,
                                error=MeteorError(404, f"Method '{event.name}' not found"))
            self._method_finished(event.method_id)
            return
        self._enqueue(lambda: self._run_method(event, handler))

    def _on_subscribe(self, event: SubscribeRequested) -> None:
        handler = self.app.publications.get(event.name)
        if handler is None:
            self.session.nosub(event.sub_id,
                               MeteorError(404, f"Subscription '{event.name}' not found"))
            return
        sub = Subscription(self, event.sub_id, event.name)
        self._subs[event.sub_id] = sub
        self._enqueue(lambda: self._run_publication(sub, handler, event.params))

    def stop_subscription(self, sub_id: str, error: MeteorError | None) -> None:
        """unsub, or a publication error: remove its documents, then ``nosub``."""
        sub = self._subs.pop(sub_id, None)
        if sub is not None:
            sub.stop()
        self.session.nosub(sub_id, error)
        self.flush_soon()

    def release_document(self, key: tuple[str, str], sub_id: str) -> None:
        holders = self.doc_holders.get(key)
        if holders is None:
            return
        holders.discard(sub_id)
        if not holders:
            del self.doc_holders[key]
            self.session.removed(*key)

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
                job = self._work.popleft()
                await job()
                self.flush_soon()
        finally:
            self._worker_running = False

    async def _run_method(self, event: MethodRequested, handler: MethodHandler) -> None:
        context = MethodContext(connection_id=self.connection_id, user_id=None,
                                random_seed=event.random_seed, method_id=event.method_id)
        bound = bind_params(handler, context, event.params)
        if bound is None:
            self.session.result(event.method_id, error=MeteorError(400, "Match failed"))
        else:
            try:
                value = await handler(*bound.args, **bound.kwargs)
            except Exception as exc:
                self.session.result(event.method_id,
                                    error=to_meteor_error(exc, f"method {event.name!r}"))
            else:
                try:
                    # Python's "returned nothing" is None: like Meteor's undefined, no value
                    self.session.result(event.method_id, UNDEFINED if value is None else value)
                except Exception as exc:  # a value that cannot be sent is the method's bug: 500
                    self.session.result(event.method_id,
                                        error=to_meteor_error(exc, f"method {event.name!r}"))
        self._method_finished(event.method_id)

    def _method_finished(self, method_id: str) -> None:
        # Write-fence hook: `updated` promises that every data message the method caused has
        # been sent. Until methods write to the database there is nothing to wait for; the
        # methods issue defers this call until the stream passed the method's commit and this
        # connection's merge box flushed.
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
