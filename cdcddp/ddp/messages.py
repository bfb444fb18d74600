"""DDP message models: validation of client messages, construction of server messages.

Client messages are parsed in two steps, because Meteor's order of checks decides which error
a client sees: `parse_frame` (JSON, EJSON of `params`, a `msg` present) runs first; the
session then checks `connect`/"Must connect first"; `validate_client_message` last checks the
shape of `sub`, `method`, ... Both raise `DDPProtocolError`, answered with a top-level `error`.

Server messages are built as EJSON text with Meteor's key order. Hand-written validation: it is
a few `type() is` checks per message, cheaper and clearer than a model library here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson

from cdcddp.ddp import ejson

__all__ = [
    "ALREADY_CONNECTED",
    "BAD_REQUEST",
    "BINARY_NOT_SUPPORTED",
    "DUPLICATE_METHOD_ID",
    "MALFORMED_METHOD",
    "MALFORMED_SUB",
    "MESSAGE_TOO_LARGE",
    "MUST_CONNECT_FIRST",
    "NO_OFFENDING_MESSAGE",
    "PARSE_ERROR",
    "SUPPORTED_VERSIONS",
    "UNDEFINED",
    "ClientMessage",
    "Connect",
    "DDPProtocolError",
    "Encoded",
    "Frame",
    "MeteorError",
    "Method",
    "Ping",
    "Pong",
    "Sub",
    "Unsub",
    "added",
    "added_message",
    "changed",
    "changed_message",
    "client_connect",
    "client_method",
    "client_sub",
    "client_unsub",
    "connected",
    "encode",
    "encode_added",
    "encode_many",
    "error",
    "failed",
    "negotiate_version",
    "nosub",
    "parse_client_message",
    "parse_frame",
    "parse_server_message",
    "ping",
    "pong",
    "ready",
    "removed",
    "removed_message",
    "result",
    "server_id",
    "updated",
    "validate_client_message",
]

# Meteor's DDPCommon.SUPPORTED_DDP_VERSIONS, most preferred first.
SUPPORTED_VERSIONS: Final = ("1", "pre2", "pre1")

# `reason` texts of top-level `error` messages (Meteor's where Meteor has one).
BAD_REQUEST: Final = "Bad request"
PARSE_ERROR: Final = "Parse error"
MUST_CONNECT_FIRST: Final = "Must connect first"
ALREADY_CONNECTED: Final = "Already connected"
MALFORMED_SUB: Final = "Malformed subscription"
MALFORMED_METHOD: Final = "Malformed method invocation"
MESSAGE_TOO_LARGE: Final = "Message too large"
BINARY_NOT_SUPPORTED: Final = "Binary frames are not supported"
DUPLICATE_METHOD_ID: Final = "Duplicate method id"


class _Undefined:
    """JavaScript's `undefined`: the key is left out of the message."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDEFINED"

    def __bool__(self) -> bool:
        return False


UNDEFINED: Final = _Undefined()
NO_OFFENDING_MESSAGE: Final = UNDEFINED


# ---- errors ----------------------------------------------------------------------------------

class MeteorError(Exception):
    """Meteor.Error: the client-safe error carried by `result` and `nosub`."""

    def __init__(self, error: int | str, reason: str | None = None, details: Any = None) -> None:
        super().__init__(reason or str(error))
        self.error = error
        self.reason = reason
        self.details = details

    @property
    def message(self) -> str:
        # Meteor: reason + ' [' + error + ']', or '[' + error + ']' without a reason
        return f"{self.reason} [{self.error}]" if self.reason else f"[{self.error}]"

    def to_ddp(self) -> dict[str, Any]:
        """Wire form, in the key order Meteor's Error object serialises to."""
        out: dict[str, Any] = {"isClientSafe": True, "error": self.error}
        if self.reason is not None:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["message"] = self.message
        out["errorType"] = "Meteor.Error"
        return out

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MeteorError):
            return NotImplemented
        return (self.error, self.reason, self.details) == (other.error, other.reason,
                                                           other.details)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"MeteorError({self.error!r}, {self.reason!r}, {self.details!r})"

    @classmethod
    def method_not_found(cls, name: str) -> MeteorError:
        return cls(404, f"Method '{name}' not found")

    @classmethod
    def subscription_not_found(cls, name: str) -> MeteorError:
        return cls(404, f"Subscription '{name}' not found")

    @classmethod
    def bad_request(cls, reason: str = "Bad request", details: Any = None) -> MeteorError:
        return cls(400, reason, details)

    @classmethod
    def forbidden(cls, reason: str = "Access denied") -> MeteorError:
        return cls(403, reason)

    @classmethod
    def internal(cls) -> MeteorError:
        """What a client sees for an exception that is not a MeteorError: never its text."""
        return cls(500, "Internal server error")

    @classmethod
    def unavailable(cls) -> MeteorError:
        """The database cannot be reached (restarting, failing over): worth a retry."""
        return cls(503, "Database unavailable")

    @classmethod
    def too_many_requests(cls, reason: str) -> MeteorError:
        return cls("too-many-requests", reason)


class DDPProtocolError(Exception):
    """A client message to answer with a top-level `error` (the connection stays open)."""

    def __init__(self, reason: str, offending: Any = UNDEFINED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offending = offending  # raw JSON as received, or UNDEFINED


# ---- client messages -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Connect:
    version: str | None
    support: list[str] | None
    session: str | None = None

    @property
    def is_valid(self) -> bool:
        """Meteor: `version` a string, `support` strings only, and containing `version`."""
        return self.version is not None and self.support is not None \
            and self.version in self.support


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Pong:
    id: Any = None


@dataclass(frozen=True, slots=True)
class Sub:
    id: str
    name: str
    params: list[Any]


@dataclass(frozen=True, slots=True)
class Unsub:
    id: str | None  # Meteor answers `{"msg":"nosub"}` to an unsub without id


@dataclass(frozen=True, slots=True)
class Method:
    id: str
    method: str
    params: list[Any]
    random_seed: str | None = None


ClientMessage = Connect | Ping | Pong | Sub | Unsub | Method


@dataclass(frozen=True, slots=True)
class Frame:
    """One parsed client message: `message` has EJSON-decoded `params`, `raw` is the JSON as
    received (echoed as `offendingMessage`)."""

    msg: str
    message: dict[str, Any]
    raw: dict[str, Any]


def parse_frame(text: str | bytes) -> Frame:
    """JSON → a message object with EJSON-decoded `params` and a non-empty `msg`.

    As Meteor's parseDDP + stream handler: not JSON, or JSON that is not an object → "Bad
    request" without offendingMessage (an array is echoed, as Meteor does); bad EJSON in
    `params` → "Parse error"; no `msg` → "Bad request" echoing the object."""
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise DDPProtocolError(BAD_REQUEST) from None
    if type(raw) is list:
        raise DDPProtocolError(BAD_REQUEST, raw)
    if type(raw) is not dict:
        raise DDPProtocolError(BAD_REQUEST)
    message = raw
    if "params" in raw and ejson._may_hold_forms(text):
        try:
            params = ejson.from_json_value(raw["params"])
        except (ejson.EJSONError, RecursionError):
            raise DDPProtocolError(PARSE_ERROR) from None
        message = {**raw, "params": params}
    msg = raw.get("msg")
    if not msg:
        raise DDPProtocolError(BAD_REQUEST, raw)
    if type(msg) is not str:  # Meteor would look it up as a handler name and find none
        raise DDPProtocolError(BAD_REQUEST, raw)
    return Frame(msg, message, raw)


def _is_str_list(value: Any) -> bool:
    return type(value) is list and all(type(item) is str for item in value)


def validate_client_message(frame: Frame) -> ClientMessage:
    """Check a message from `parse_frame` and build its model; raises `DDPProtocolError`."""
    kind, message = frame.msg, frame.message
    if kind == "sub":
        sub_id, name, params = message.get("id"), message.get("name"), message.get("params", [])
        if type(sub_id) is not str or type(name) is not str or type(params) is not list:
            raise DDPProtocolError(MALFORMED_SUB, frame.raw)
        return Sub(sub_id, name, params)
    if kind == "method":
        method_id, name = message.get("id"), message.get("method")
        params, seed = message.get("params", []), message.get("randomSeed")
        if (type(method_id) is not str or type(name) is not str or type(params) is not list
                or ("randomSeed" in message and type(seed) is not str)):
            raise DDPProtocolError(MALFORMED_METHOD, frame.raw)
        return Method(method_id, name, params, seed)
    if kind == "unsub":
        sub_id = message.get("id")
        if sub_id is not None and type(sub_id) is not str:
            raise DDPProtocolError(BAD_REQUEST, frame.raw)
        return Unsub(sub_id)
    if kind == "ping":
        ping_id = message.get("id")
        if ping_id is not None and type(ping_id) is not str:
            raise DDPProtocolError(BAD_REQUEST, frame.raw)
        return Ping(ping_id)
    if kind == "pong":
        return Pong(message.get("id"))  # needs no answer, so any id will do
    if kind == "connect":
        version, support = message.get("version"), message.get("support")
        session = message.get("session")
        return Connect(
            version if type(version) is str else None,
            support if _is_str_list(support) else None,
            session if type(session) is str else None,
        )
    raise DDPProtocolError(BAD_REQUEST, frame.raw)


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Both steps at once (for tests and tools; the session needs the steps apart)."""
    return validate_client_message(parse_frame(text))


def negotiate_version(connect: Connect) -> tuple[str, bool]:
    """(version, ok). Meteor: an invalid connect fails with our best version; otherwise the
    first of the client's `support` we support (else our best) — `ok` only if that is the
    version the client asked for."""
    if not connect.is_valid:
        return SUPPORTED_VERSIONS[0], False
    assert connect.support is not None
    chosen = next((v for v in connect.support if v in SUPPORTED_VERSIONS), SUPPORTED_VERSIONS[0])
    return chosen, chosen == connect.version


# ---- server messages (EJSON text) -----------------------------------------------------------

# A server message ready to frame: its text, or that text as UTF-8 bytes (the data messages
# of the live-data path, see encode_many).
Encoded: TypeAlias = str | bytes

_dumps = ejson.dumps


def server_id() -> str:
    return '{"server_id":"0"}'


def connected(session: str) -> str:
    return _dumps({"msg": "connected", "session": session})


def failed(version: str) -> str:
    return _dumps({"msg": "failed", "version": version})


def ping(ping_id: str | None = None) -> str:
    return '{"msg":"ping"}' if ping_id is None else _dumps({"msg": "ping", "id": ping_id})


def pong(ping_id: str | None = None) -> str:
    return '{"msg":"pong"}' if ping_id is None else _dumps({"msg": "pong", "id": ping_id})


def ready(sub_ids: list[str]) -> str:
    return _dumps({"msg": "ready", "subs": sub_ids})


def nosub(sub_id: str | None, error: MeteorError | None = None) -> str:
    message: dict[str, Any] = {"msg": "nosub"}
    if sub_id is not None:
        message["id"] = sub_id
    if error is not None:
        message["error"] = error.to_ddp()
    return _dumps(message)


def added(collection: str, doc_id: str, fields: Mapping[str, Any] | None) -> str:
    return _dumps(added_message(collection, doc_id, fields))


def changed(collection: str, doc_id: str, fields: Mapping[str, Any] | None,
            cleared: Sequence[str] | None) -> str:
    """`fields` and `cleared` are each left out when empty (Meteor); callers skip the message
    when both are."""
    return _dumps(changed_message(collection, doc_id, fields, cleared))


def removed(collection: str, doc_id: str) -> str:
    return _dumps(removed_message(collection, doc_id))


# The data messages as dicts, for callers that encode many at once (encode_many): the
# live-data path, whose output stays UTF-8 bytes from here to the socket.

def added_message(collection: str, doc_id: str,
                  fields: Mapping[str, Any] | None) -> dict[str, Any]:
    if fields:
        return {"msg": "added", "collection": collection, "id": doc_id, "fields": fields}
    return {"msg": "added", "collection": collection, "id": doc_id}


def changed_message(collection: str, doc_id: str, fields: Mapping[str, Any] | None,
                    cleared: Sequence[str] | None) -> dict[str, Any]:
    message: dict[str, Any] = {"msg": "changed", "collection": collection, "id": doc_id}
    if fields:
        message["fields"] = fields
    if cleared:
        message["cleared"] = list(cleared)
    return message


def removed_message(collection: str, doc_id: str) -> dict[str, Any]:
    return {"msg": "removed", "collection": collection, "id": doc_id}


encode = ejson.dumpb  # one message dict -> EJSON text as UTF-8 bytes
encode_many = ejson.dumpb_many  # the same for a list of them, at a fraction of the cost


def encode_added(collection: str, documents: Sequence[tuple[str, Mapping[str, Any] | None]]
                 ) -> list[bytes]:
    """``[encode(added_message(collection, doc_id, fields)) for doc_id, fields in
    documents]``, without building the message dicts: the ids and the fields are each encoded
    with one encoder call and set into the message's fixed frame (a large initial result
    makes 100,000s of them; this costs about 15 % less)."""
    head = b'{"msg":"added","collection":' + encode(collection) + b',"id":'
    ids = encode_many([doc_id for doc_id, _ in documents])
    fields = encode_many([fields or {} for _, fields in documents])
    return [b"".join((head, doc_id, b',"fields":', text, b"}")) if text != b"{}"
            else b"".join((head, doc_id, b"}"))
            for doc_id, text in zip(ids, fields, strict=True)]


def result(method_id: str, value: Any = UNDEFINED, error: MeteorError | None = None) -> str:
    """`error` wins; `value=UNDEFINED` (a method returning nothing) leaves out `result`,
    `None` sends `"result":null`."""
    message: dict[str, Any] = {"msg": "result", "id": method_id}
    if error is not None:
        message["error"] = error.to_ddp()
    elif value is not UNDEFINED:
        message["result"] = value
    return _dumps(message)


def updated(method_ids: list[str]) -> str:
    return _dumps({"msg": "updated", "methods": method_ids})


def error(reason: str, offending: Any = UNDEFINED) -> str:
    """Top-level `error`. `offending` is raw JSON as received and is echoed verbatim."""
    if offending is UNDEFINED:
        return _dumps({"msg": "error", "reason": reason})
    try:
        echoed = orjson.Fragment(orjson.dumps(offending))
    except TypeError:
        return _dumps({"msg": "error", "reason": reason})
    return orjson.dumps({"msg": "error", "reason": reason, "offendingMessage": echoed}).decode()


# ---- client side (for DDP clients and tests) -----------------------------------------------

def client_connect(
    version: str = "1", support: list[str] | None = None, session: str | None = None
) -> str:
    message: dict[str, Any] = {"msg": "connect", "version": version,
                               "support": support if support is not None else [version]}
    if session is not None:
        message["session"] = session
    return _dumps(message)


def client_sub(sub_id: str, name: str, params: list[Any] | None = None) -> str:
    return _dumps({"msg": "sub", "id": sub_id, "name": name, "params": params or []})


def client_unsub(sub_id: str) -> str:
    return _dumps({"msg": "unsub", "id": sub_id})


def client_method(
    method_id: str, name: str, params: list[Any] | None = None, random_seed: str | None = None
) -> str:
    message: dict[str, Any] = {"msg": "method", "method": name, "params": params or [],
                               "id": method_id}
    if random_seed is not None:
        message["randomSeed"] = random_seed
    return _dumps(message)


def parse_server_message(text: str | bytes) -> dict[str, Any]:
    """A server message as a dict with EJSON-decoded `fields` and `result` (what Meteor's
    client decodes); `{"server_id": ...}` comes back as is. Raises `ejson.EJSONError`."""
    try:
        message = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ejson.EJSONError(f"invalid JSON: {exc}") from None
    if type(message) is not dict:
        raise ejson.EJSONError("a DDP message must be a JSON object")
    if ejson._may_hold_forms(text):
        for key in ("fields", "result"):
            if key in message:
                try:
                    message[key] = ejson.from_json_value(message[key])
                except RecursionError:
                    raise ejson.EJSONError("value nested too deeply") from None
    return message
