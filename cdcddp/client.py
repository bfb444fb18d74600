"""A trio DDP client over raw WebSocket (``ws://host:port/websocket``).

    async with connect("ws://127.0.0.1:3000/websocket") as client:
        print(await client.call("echo", 1, "two"))
        await client.subscribe("lists", "alice")          # returns once `ready`
        print(client.collections["lists"])                 # {id: {field: value}}

Method errors raise ``MeteorError``; ``call(..., wait_updated=True)`` also waits for the
method's ``updated`` (the write fence). ``connect(url, log_messages=True)`` keeps every
received message (decoded JSON, wire form) in ``client.messages`` for tests. It answers the
server's pings; it does not reconnect.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
import trio
import trio_websocket

from cdcddp.ddp import ejson
from cdcddp.ddp.messages import MeteorError
from cdcddp.ddp.meteor_random import random_id

__all__ = ["DDPClient", "DDPConnectionClosed", "MeteorError", "MethodCall", "connect"]


class DDPConnectionClosed(ConnectionError):
    """The connection closed (or the server answered ``failed``) while waiting."""


def error_from_wire(error: Any) -> MeteorError:
    if not isinstance(error, dict):
        return MeteorError(500, str(error))
    return MeteorError(error.get("error", 500), error.get("reason"),
                       ejson.from_json_value(error.get("details")))


class MethodCall:
    """One method invocation: its ``result`` and its ``updated`` arrive independently."""

    def __init__(self, method_id: str, name: str) -> None:
        self.id = method_id
        self.name = name
        self.result_received = trio.Event()
        self.updated_received = trio.Event()
        self.value: Any = None
        self.has_value = False  # a `result` with no `result` key means "returned nothing"
        self.error: MeteorError | None = None

    def _set_result(self, message: dict[str, Any]) -> None:
        if "error" in message:
            self.error = error_from_wire(message["error"])
        elif "result" in message:
            self.value = ejson.from_json_value(message["result"])
            self.has_value = True
        self.result_received.set()

    async def result(self) -> Any:
        await self.result_received.wait()
        if self.error is not None:
            raise self.error
        return self.value


class DDPClient:
    """A connected DDP session; build it with ``connect()``."""

    def __init__(self, ws: trio_websocket.WebSocketConnection, *, log_messages: bool) -> None:
        self.ws = ws
        self.session: str | None = None
        self.collections: dict[str, dict[str, dict[str, Any]]] = {}
        self.messages: list[dict[str, Any]] | None = [] if log_messages else None
        self.ready_subs: set[str] = set()
        self.stopped_subs: dict[str, MeteorError | None] = {}
        self.closed = False
        self._calls: dict[str, MethodCall] = {}
        self._method_ids = (str(n) for n in itertools.count(1))
        self._ping_ids = (f"p{n}" for n in itertools.count(1))
        self._pongs: dict[str, trio.Event] = {}
        self._progress = trio.Event()
        self._failed_version: str | None = None

    # ---- sending ---------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        """Send one DDP message (values are EJSON-encoded)."""
        await self.send_text(ejson.dumps(message))

    async def send_text(self, text: str | bytes) -> None:
        """Send one frame exactly as given (tests use this for malformed input)."""
        try:
            await self.ws.send_message(text)
        except trio_websocket.ConnectionClosed as exc:
            raise DDPConnectionClosed(str(exc.reason)) from None

    async def apply(self, name: str, params: list[Any], *, random_seed: str | None = None
                    ) -> MethodCall:
        """Send a method call and return its handle without waiting."""
        call = MethodCall(next(self._method_ids), name)
        self._calls[call.id] = call
        message: dict[str, Any] = {"msg": "method", "method": name, "params": params,
                                   "id": call.id}
        if random_seed is not None:
            message["randomSeed"] = random_seed
        await self.send(message)
        return call

    async def call(self, name: str, *params: Any, wait_updated: bool = False,
                   timeout: float = 30.0) -> Any:
        """Call a method and return its result (raises MeteorError on an error result)."""
        call = await self.apply(name, list(params))
        with trio.fail_after(timeout):
            await self._wait_event(call.result_received)
            if wait_updated:
                await self._wait_event(call.updated_received)
        return await call.result()

    async def subscribe(self, name: str, *params: Any, sub_id: str | None = None,
                        timeout: float = 30.0) -> str:
        """Subscribe and wait for ``ready``; raises MeteorError if the server sends ``nosub``."""
        sub_id = sub_id or random_id()
        await self.send({"msg": "sub", "id": sub_id, "name": name, "params": list(params)})
        await self.wait_for(lambda: sub_id in self.ready_subs or sub_id in self.stopped_subs,
                            timeout)
        if sub_id in self.stopped_subs:
            error = self.stopped_subs[sub_id]
            raise error if error is not None else MeteorError(
                "subscription-stopped", f"subscription {name!r} stopped before ready")
        return sub_id

    async def unsubscribe(self, sub_id: str, timeout: float = 30.0) -> None:
        """Unsubscribe and wait for the server's ``nosub``."""
        self.stopped_subs.pop(sub_id, None)
        await self.send({"msg": "unsub", "id": sub_id})
        await self.wait_for(lambda: sub_id in self.stopped_subs, timeout)

    async def ping(self, timeout: float = 10.0) -> float:
        """DDP ping; returns the round-trip time in seconds."""
        ping_id = next(self._ping_ids)
        event = self._pongs[ping_id] = trio.Event()
        started = trio.current_time()
        await self.send({"msg": "ping", "id": ping_id})
        with trio.fail_after(timeout):
            await self._wait_event(event)
        return trio.current_time() - started

    # ---- waiting ---------------------------------------------------------------------------

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds (checked after every received message).

        Raises trio.TooSlowError on timeout, DDPConnectionClosed if the connection closes.
        """
        with trio.fail_after(timeout):
            while not predicate():
                if self.closed:
                    raise DDPConnectionClosed("connection closed while waiting")
                await self._progress.wait()

    async def wait_for_message(self, predicate: Callable[[dict[str, Any]], bool],
                               timeout: float = 10.0, *, since: int = 0) -> dict[str, Any]:
        """The first logged message from index ``since`` on that matches (needs log_messages).
        """
        if self.messages is None:
            raise RuntimeError("connect(..., log_messages=True) to wait for messages")
        log = self.messages
        found: list[dict[str, Any]] = []

        def match() -> bool:
            found[:] = [m for m in log[since:] if predicate(m)][:1]
            return bool(found)

        await self.wait_for(match, timeout)
        return found[0]

    async def _wait_event(self, event: trio.Event) -> None:
        await self.wait_for(event.is_set, math.inf)

    # ---- receiving -------------------------------------------------------------------------

    async def _reader(self) -> None:
        try:
            while True:
                text = await self.ws.get_message()
                try:
                    message = orjson.loads(text)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(message, dict):
                    await self._handle(message)
                self._notify()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._notify()

    def _notify(self) -> None:
        self._progress.set()
        self._progress = trio.Event()

    async def _handle(self, message: dict[str, Any]) -> None:
        if self.messages is not None:
            self.messages.append(message)
        kind = message.get("msg")
        if kind == "ping":
            pong: dict[str, Any] = {"msg": "pong"}
            if "id" in message:
                pong["id"] = message["id"]
            try:
                await self.send(pong)
            except DDPConnectionClosed:
                pass
        elif kind == "pong":
            event = self._pongs.pop(str(message.get("id")), None)
            if event is not None:
                event.set()
        elif kind == "connected":
            self.session = message.get("session")
        elif kind == "failed":
            self._failed_version = str(message.get("version"))
        elif kind in ("added", "changed", "removed"):
            self._apply_data(kind, message)
        elif kind == "ready":
            self.ready_subs.update(message.get("subs") or [])
        elif kind == "nosub":
            sub_id = message.get("id")
            self.ready_subs.discard(sub_id)
            error = message.get("error")
            self.stopped_subs[sub_id] = error_from_wire(error) if error is not None else None
        elif kind == "result":
            call = self._calls.get(str(message.get("id")))
            if call is not None:
                call._set_result(message)
        elif kind == "updated":
            for method_id in message.get("methods") or []:
                call = self._calls.get(method_id)
                if call is not None:
                    call.updated_received.set()

    def _apply_data(self, kind: str, message: dict[str, Any]) -> None:
        collection = self.collections.setdefault(str(message.get("collection")), {})
        doc_id = str(message.get("id"))
        if kind == "removed":
            collection.pop(doc_id, None)
            return
        fields = ejson.from_json_value(message.get("fields") or {})
        if kind == "added":
            collection[doc_id] = dict(fields)
            return
        document = collection.setdefault(doc_id, {})
        document.update(fields)
        for name in message.get("cleared") or []:
            document.pop(name, None)


@asynccontextmanager
async def connect(url: str, *, version: str = "1", timeout: float = 10.0,
                  log_messages: bool = False, handshake: bool = True,
                  max_message_size: int = 64 * 1_048_576) -> AsyncIterator[DDPClient]:
    """Open a DDP connection; with ``handshake`` (default) send ``connect`` and wait for
    ``connected`` (raises DDPConnectionClosed on ``failed``)."""
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(timeout):
                ws = await trio_websocket.connect_websocket_url(
                    nursery, url, max_message_size=max_message_size)
            client = DDPClient(ws, log_messages=log_messages)
            nursery.start_soon(client._reader)
            try:
                if handshake:
                    await client.send({"msg": "connect", "version": version,
                                       "support": [version]})
                    await client.wait_for(lambda: client.session is not None
                                          or client._failed_version is not None, timeout)
                    if client.session is None:
                        raise DDPConnectionClosed(
                            f"server refused DDP {version} (suggests {client._failed_version})")
                yield client
            finally:
                with trio.move_on_after(2) as scope:
                    scope.shield = True
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The nursery is an implementation detail: callers get the one real error.
        real = [e for e in group.exceptions if not isinstance(e, trio.Cancelled)]
        if len(real) == 1:
            raise real[0] from None
        raise
