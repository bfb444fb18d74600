"""The DDP session state machine, sans-IO.

The I/O layer feeds it incoming WebSocket messages (`receive`) and the clock (`tick`, with
`next_deadline` saying when), acts on the returned events, calls the outgoing methods (`ready`,
`added`, `result`, ...) and writes whatever `data_to_send` drains. Nothing here reads a clock or
touches a socket; every time is the caller's monotonic `now` in seconds.

Behaviour follows Meteor's server (livedata_server.js, heartbeat.js):
- version negotiation: a valid `connect` gets the first version of the client's `support` list
  that we support (else our preferred "1"); if that is not the `version` it asked for, `failed`
  and `CloseRequested`. Meteor never resumes a session; `session` is ignored.
- before `connect`, everything else is "Must connect first"; a second `connect` is "Already
  connected". Top-level errors never close the connection.
- `ping` is answered at once, echoing `id`; any incoming message counts as proof of life.
  Version pre1 has no heartbeats (`ping`/`pong` are "Bad request" there).
- a `sub` whose id is already active is ignored (Meteor: needed for reconnect idempotence); an
  `unsub` for an unknown id is still answered with `nosub`.
- every accepted `method` is pending until both its `result` and `updated` went out; a second
  `result`/`updated` for it, or one for an id the client never sent, is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from cdcddp.ddp import messages
from cdcddp.ddp.messages import (
    UNDEFINED,
    Connect,
    DDPProtocolError,
    MeteorError,
    Method,
    Ping,
    Pong,
    Sub,
    Unsub,
)
from cdcddp.ddp.meteor_random import random_id

__all__ = [
    "CLOSE_CONNECT_TIMEOUT",
    "CLOSE_HEARTBEAT_TIMEOUT",
    "CLOSE_VERSION_FAILED",
    "CloseRequested",
    "Event",
    "MethodRequested",
    "ServerSession",
    "SessionConfig",
    "SubscribeRequested",
    "UnsubscribeRequested",
    "random_id",
]

# (code, reason) of the CloseRequested events. 3000 "No response from heartbeat" is what
# SockJS uses for the same situation.
CLOSE_VERSION_FAILED: Final = (1000, "DDP version negotiation failed")
CLOSE_HEARTBEAT_TIMEOUT: Final = (3000, "No response from heartbeat")
CLOSE_CONNECT_TIMEOUT: Final = (3001, "No connect message")


@dataclass
class SessionConfig:
    heartbeat_interval: float = 17.5  # ping the client after this much silence; <= 0: never
    heartbeat_timeout: float = 15.0  # close if nothing arrives within this after our ping
    max_message_bytes: int = 1_048_576  # larger incoming message -> `error`, stays open
    max_subscriptions: int = 1000
    max_pending_methods: int = 100
    send_server_id: bool = True  # send {"server_id": "0"} on open, as Meteor <= 2.2 did
    connect_timeout: float = 45.0  # close a socket that sends no `connect` (Meteor: 45 s idle)


@dataclass(frozen=True, slots=True)
class SubscribeRequested:
    sub_id: str
    name: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class UnsubscribeRequested:
    """The I/O layer removes the sub's data, then calls `session.nosub(sub_id)`."""

    sub_id: str


@dataclass(frozen=True, slots=True)
class MethodRequested:
    method_id: str
    name: str
    params: list[Any]
    random_seed: str | None


@dataclass(frozen=True, slots=True)
class CloseRequested:
    code: int
    reason: str


Event = SubscribeRequested | UnsubscribeRequested | MethodRequested | CloseRequested

# bits of a pending method's progress
_RESULT_SENT: Final = 1
_UPDATED_SENT: Final = 2
_DONE: Final = _RESULT_SENT | _UPDATED_SENT

State = Literal["awaiting_connect", "connected", "closed"]


class ServerSession:
    """One DDP connection, server side."""

    def __init__(self, config: SessionConfig | None = None, session_id: str | None = None) -> None:
        self.config = config or SessionConfig()
        self.session_id: str = session_id or random_id()
        self.state: State = "awaiting_connect"
        self.version: str | None = None  # negotiated DDP version once connected
        self.subscriptions: set[str] = set()  # after SubscribeRequested, until nosub
        self._unsubscribing: set[str] = set()  # UnsubscribeRequested sent, nosub not yet
        self._pending_methods: dict[str, int] = {}  # method id -> _RESULT_SENT|_UPDATED_SENT
        self._outgoing: list[messages.Encoded] = []
        self._opened_at: float | None = None
        self._last_received = 0.0
        self._ping_sent_at: float | None = None  # outstanding server ping

    # ---- lifecycle -------------------------------------------------------------------------

    def opened(self, now: float) -> None:
        """The socket is open: start the connect timer and greet, if configured."""
        self._opened_at = now
        self._last_received = now
        if self.config.send_server_id and self.state == "awaiting_connect":
            self._outgoing.append(messages.server_id())

    def close(self) -> None:
        self.state = "closed"

    @property
    def pending_methods(self) -> frozenset[str]:
        """Method ids that still await their `result` and/or `updated`."""
        return frozenset(self._pending_methods)

    @property
    def _heartbeats(self) -> bool:
        return self.version != "pre1" and self.config.heartbeat_interval > 0

    # ---- incoming --------------------------------------------------------------------------

    def receive(self, text: str | bytes, now: float) -> list[Event]:
        """One incoming WebSocket message (`bytes`: a binary frame)."""
        if self.state == "closed":
            return []
        # any message, even a bad one, shows the peer is alive (Meteor's messageReceived)
        self._last_received = now
        self._ping_sent_at = None
        if not isinstance(text, str):
            self._queue_error(messages.BINARY_NOT_SUPPORTED)
            return []
        limit = self.config.max_message_bytes
        # UTF-8 needs 1..4 bytes a character: only encode when the length is in doubt
        if len(text) > limit or (len(text) * 4 > limit and len(text.encode()) > limit):
            self._queue_error(messages.MESSAGE_TOO_LARGE)
            return []
        try:
            frame = messages.parse_frame(text)
            if frame.msg == "connect":
                if self.state == "connected":
                    raise DDPProtocolError(messages.ALREADY_CONNECTED, frame.raw)
                connect = messages.validate_client_message(frame)
                assert isinstance(connect, Connect)
                return self._handle_connect(connect, now)
            if self.state != "connected":
                raise DDPProtocolError(messages.MUST_CONNECT_FIRST, frame.raw)
            if self.version == "pre1" and frame.msg in ("ping", "pong"):
                raise DDPProtocolError(messages.BAD_REQUEST, frame.raw)
            message = messages.validate_client_message(frame)
        except DDPProtocolError as exc:
            self._queue_error(exc.reason, exc.offending)
            return []
        return self._dispatch(message, frame.raw)

    def _handle_connect(self, connect: Connect, now: float) -> list[Event]:
        version, ok = messages.negotiate_version(connect)
        if not ok:
            self._outgoing.append(messages.failed(version))
            self.state = "closed"  # later messages (sent optimistically) are ignored
            return [CloseRequested(*CLOSE_VERSION_FAILED)]
        self.version = version
        self.state = "connected"
        self._last_received = now
        self._outgoing.append(messages.connected(self.session_id))
        return []

    def _dispatch(self, message: messages.ClientMessage, raw: dict[str, Any]) -> list[Event]:
        match message:
            case Ping(id=ping_id):
                self._outgoing.append(messages.pong(ping_id))
            case Pong():
                pass
            case Sub(id=sub_id, name=name, params=params):
                return self._handle_sub(sub_id, name, params)
            case Unsub(id=sub_id):
                return self._handle_unsub(sub_id)
            case Method():
                return self._handle_method(message, raw)
            case _:  # a second connect is caught earlier; nothing else validates
                self._queue_error(messages.BAD_REQUEST, raw)
        return []

    def _handle_sub(self, sub_id: str, name: str, params: list[Any]) -> list[Event]:
        if sub_id in self.subscriptions:
            return []  # Meteor ignores a sub whose id is already active (reconnect idempotence)
        if len(self.subscriptions) >= self.config.max_subscriptions:
            error = MeteorError.too_many_requests("Too many subscriptions")
            self._outgoing.append(messages.nosub(sub_id, error))
            return []
        self.subscriptions.add(sub_id)
        return [SubscribeRequested(sub_id, name, params)]

    def _handle_unsub(self, sub_id: str | None) -> list[Event]:
        if sub_id is None or sub_id not in self.subscriptions:
            self._outgoing.append(messages.nosub(sub_id))  # clients wait for it regardless
            return []
        if sub_id in self._unsubscribing:
            return []  # its nosub is on the way
        self._unsubscribing.add(sub_id)
        return [UnsubscribeRequested(sub_id)]

    def _handle_method(self, method: Method, raw: dict[str, Any]) -> list[Event]:
        if method.id in self._pending_methods:
            # a result now would settle the first call with that id
            self._queue_error(messages.DUPLICATE_METHOD_ID, raw)
            return []
        if len(self._pending_methods) >= self.config.max_pending_methods:
            error = MeteorError.too_many_requests("Too many pending method calls")
            self._outgoing.append(messages.result(method.id, error=error))
            self._outgoing.append(messages.updated([method.id]))
            return []
        self._pending_methods[method.id] = 0
        return [MethodRequested(method.id, method.method, method.params, method.random_seed)]

    def _queue_error(self, reason: str, offending: Any = UNDEFINED) -> None:
        self._outgoing.append(messages.error(reason, offending))

    # ---- time ------------------------------------------------------------------------------

    def tick(self, now: float) -> list[Event]:
        """Heartbeats and the connect timeout: queue a `ping`, or ask for the close."""
        if self.state == "awaiting_connect":
            if self._opened_at is not None and now >= self._opened_at + self.config.connect_timeout:
                self.state = "closed"
                return [CloseRequested(*CLOSE_CONNECT_TIMEOUT)]
            return []
        if self.state != "connected" or not self._heartbeats:
            return []
        if self._ping_sent_at is not None:
            if now >= self._ping_sent_at + self.config.heartbeat_timeout:
                self.state = "closed"
                return [CloseRequested(*CLOSE_HEARTBEAT_TIMEOUT)]
        elif now >= self._last_received + self.config.heartbeat_interval:
            self._outgoing.append(messages.ping())
            self._ping_sent_at = now
        return []

    def next_deadline(self) -> float:
        """When `tick` next has something to do (`inf`: never)."""
        if self.state == "awaiting_connect":
            if self._opened_at is None:
                return float("inf")
            return self._opened_at + self.config.connect_timeout
        if self.state != "connected" or not self._heartbeats:
            return float("inf")
        if self._ping_sent_at is not None:
            return self._ping_sent_at + self.config.heartbeat_timeout
        return self._last_received + self.config.heartbeat_interval

    # ---- outgoing --------------------------------------------------------------------------

    def ready(self, sub_ids: list[str]) -> None:
        live = [sub_id for sub_id in sub_ids if sub_id in self.subscriptions]
        if live and self.state == "connected":
            self._outgoing.append(messages.ready(live))

    def nosub(self, sub_id: str, error: MeteorError | None = None) -> None:
        """Ends a subscription; dropped for an id that is not active (never two nosubs)."""
        if sub_id not in self.subscriptions:
            return
        self.subscriptions.discard(sub_id)
        self._unsubscribing.discard(sub_id)
        if self.state == "connected":
            self._outgoing.append(messages.nosub(sub_id, error))

    def added(self, collection: str, doc_id: str, fields: dict[str, Any] | None) -> None:
        if self.state == "connected":
            self._outgoing.append(messages.added(collection, doc_id, fields))

    def changed(
        self,
        collection: str,
        doc_id: str,
        fields: dict[str, Any] | None,
        cleared: list[str] | None,
    ) -> None:
        """Nothing is sent when both `fields` and `cleared` are empty (Meteor never does)."""
        if self.state == "connected" and (fields or cleared):
            self._outgoing.append(messages.changed(collection, doc_id, fields, cleared))

    def removed(self, collection: str, doc_id: str) -> None:
        if self.state == "connected":
            self._outgoing.append(messages.removed(collection, doc_id))

    def result(
        self, method_id: str, result: Any = UNDEFINED, error: MeteorError | None = None
    ) -> None:
        """`result=UNDEFINED` (the default) sends no `result` key; `None` sends null.

        A value EJSON cannot encode raises ``EJSONError`` and leaves the method pending, so the
        caller can still answer with an error."""
        progress = self._pending_methods.get(method_id)
        if progress is None or progress & _RESULT_SENT:
            return
        text = messages.result(method_id, result, error)  # encode first: may raise
        self._advance_method(method_id, progress | _RESULT_SENT)
        if self.state == "connected":
            self._outgoing.append(text)

    def updated(self, method_ids: list[str]) -> None:
        due = []
        for method_id in method_ids:
            progress = self._pending_methods.get(method_id)
            if progress is not None and not progress & _UPDATED_SENT:
                self._advance_method(method_id, progress | _UPDATED_SENT)
                due.append(method_id)
        if due and self.state == "connected":
            self._outgoing.append(messages.updated(due))

    def _advance_method(self, method_id: str, progress: int) -> None:
        if progress == _DONE:
            del self._pending_methods[method_id]
        else:
            self._pending_methods[method_id] = progress

    def send_encoded(self, text: messages.Encoded) -> None:
        """Queue an already EJSON-encoded DDP message (encode once, send to many)."""
        if self.state == "connected":
            self._outgoing.append(text)

    def send_encoded_many(self, texts: list[messages.Encoded]) -> None:
        """Queue already encoded DDP messages, in order."""
        if self.state == "connected":
            self._outgoing.extend(texts)

    def data_to_send(self) -> list[messages.Encoded]:
        """Drain the queued outgoing DDP messages, oldest first."""
        out, self._outgoing = self._outgoing, []
        return out
