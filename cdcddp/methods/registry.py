"""Typed methods: declaration, parameter validation and invocation in one transaction.

A method is an ``async`` function whose first argument is the :class:`MethodContext`; the DDP
``params`` list fills the others, validated by pydantic from their annotations::

    from pydantic import BaseModel
    from cdcddp.methods import Methods, MethodContext
    from cdcddp.ddp.messages import MeteorError

    methods = Methods()

    class InsertArgs(BaseModel):          # Meteor's validated-method style: ONE object argument
        listId: str
        text: str

    @methods.method("todos.insert")
    async def insert(ctx: MethodContext, args: InsertArgs) -> str:
        todo_id = ctx.new_id("todos")     # the id the client's simulation generated
        await ctx.execute("INSERT INTO todos (id, list_id, text) VALUES (%s, %s, %s)",
                          (todo_id, args.listId, args.text))
        return todo_id

    @methods.method("add")                # positional style: Meteor.call("add", 1, 2)
    async def add(ctx: MethodContext, a: int, b: int = 0) -> int:
        return a + b

A single parameter annotated with a pydantic model takes the first DDP param as an object
(``positional=True`` turns that off); otherwise each DDP param is validated against its
parameter's annotation (unannotated: anything), ``*args`` takes the rest. Too many or invalid
params give ``MeteorError(400, "Match failed: ...")`` with the pydantic errors (location into
the params list, message, type; never the offending input) as ``details``.

:func:`invoke` runs one call: the handler's database work is one transaction, committed when
it returns and rolled back when it raises. A ``MeteorError`` reaches the client as is; any other
exception is logged with its traceback and becomes 500 "Internal server error".
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pydantic
import trio

from cdcddp.db import Database, DatabaseSetupError, first_line, is_unavailable
from cdcddp.ddp import ejson
from cdcddp.ddp.messages import UNDEFINED, MeteorError
from cdcddp.ddp.meteor_random import RandomStream
from cdcddp.methods.context import (
    CommitInfo,
    ConnectionInfo,
    LoginState,
    MethodContext,
    MethodTransaction,
)

__all__ = ["InvocationOutcome", "MethodDefinition", "Methods", "invoke", "to_meteor_error"]

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]]

_ANY_ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(Any)


def _adapter(annotation: Any) -> pydantic.TypeAdapter[Any]:
    if annotation is inspect.Parameter.empty:
        return _ANY_ADAPTER
    return pydantic.TypeAdapter(annotation)


def to_meteor_error(exc: BaseException, where: str) -> MeteorError:
    """The error a client may see for ``exc`` (``where``: what failed, for the log):
    MeteorError as is; the database out of reach, 503 (one line in the log); anything else
    is logged with its traceback and becomes 500, without internals."""
    if isinstance(exc, MeteorError):
        return exc
    if isinstance(exc, DatabaseSetupError):
        log.error("%s failed: %s", where, exc)
        return MeteorError.internal()
    if is_unavailable(exc):
        log.warning("%s failed: the database is unavailable (%s)", where, first_line(exc))
        return MeteorError.unavailable()
    log.error("%s failed", where, exc_info=exc)
    return MeteorError.internal()


@dataclass(frozen=True)
class _Slot:
    """One declared parameter after the context."""

    name: str
    adapter: pydantic.TypeAdapter[Any]
    default: Any  # inspect.Parameter.empty when required


@dataclass(frozen=True)
class MethodDefinition:
    name: str
    handler: Handler
    slots: tuple[_Slot, ...]
    rest: pydantic.TypeAdapter[Any] | None  # *args
    object_model: type[pydantic.BaseModel] | None  # set in one-object style

    @classmethod
    def from_handler(cls, name: str, handler: Handler, positional: bool | None = None
                     ) -> MethodDefinition:
        if not isinstance(name, str) or not name:
            raise ValueError("a method name must be a non-empty string")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"method {name!r} must be an async function")
        try:
            signature = inspect.signature(handler, eval_str=True)
        except NameError as exc:
            raise TypeError(f"method {name!r}: cannot resolve an annotation ({exc})") from exc
        parameters = list(signature.parameters.values())
        if not parameters or parameters[0].kind not in (
                inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            raise TypeError(f"method {name!r} must take the context as its first argument")
        slots: list[_Slot] = []
        rest: pydantic.TypeAdapter[Any] | None = None
        for parameter in parameters[1:]:
            if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
                rest = _adapter(parameter.annotation)
            elif parameter.kind in (inspect.Parameter.POSITIONAL_ONLY,
                                    inspect.Parameter.POSITIONAL_OR_KEYWORD):
                slots.append(_Slot(parameter.name, _adapter(parameter.annotation),
                                   parameter.default))
            else:
                raise TypeError(f"method {name!r}: keyword-only parameter {parameter.name!r} "
                                "cannot be filled from DDP params")
        object_model = None
        if positional is not True and len(slots) == 1 and rest is None:
            annotation = parameters[1].annotation
            if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
                object_model = annotation
        if positional is False and object_model is None:
            raise TypeError(f"method {name!r}: one-object style needs exactly one parameter "
                            "annotated with a pydantic model")
        return cls(name, handler, tuple(slots), rest, object_model)

    def bind(self, params: list[Any]) -> list[Any]:
        """The handler's arguments (after the context) from DDP params; 400 when they do not
        fit."""
        if self.object_model is not None:
            if len(params) > 1:
                raise _match_failed(f"expected one object argument, got {len(params)} params")
            # No argument: validate an empty object, so a model with only optional fields works.
            raw = params[0] if params else {}
            if not isinstance(raw, dict):
                raise _match_failed("expected one object argument",
                                    [{"loc": [0], "msg": "Input should be an object",
                                      "type": "model_type"}])
            try:
                return [self.object_model.model_validate(raw)]
            except pydantic.ValidationError as exc:
                raise _from_validation_errors([(0, exc)]) from None
        if self.rest is None and len(params) > len(self.slots):
            raise _match_failed(
                f"expected at most {len(self.slots)} params, got {len(params)}")
        values: list[Any] = []
        failures: list[tuple[int, pydantic.ValidationError]] = []
        missing: list[dict[str, Any]] = []
        for index, slot in enumerate(self.slots):
            if index >= len(params):
                if slot.default is inspect.Parameter.empty:
                    missing.append({"loc": [index], "msg": f"Missing argument {slot.name!r}",
                                    "type": "missing_argument"})
                else:
                    values.append(slot.default)
                continue
            try:
                values.append(slot.adapter.validate_python(params[index]))
            except pydantic.ValidationError as exc:
                failures.append((index, exc))
        if self.rest is not None:
            for index in range(len(self.slots), len(params)):
                try:
                    values.append(self.rest.validate_python(params[index]))
                except pydantic.ValidationError as exc:
                    failures.append((index, exc))
        if failures or missing:
            raise _from_validation_errors(failures, missing)
        return values


def _match_failed(summary: str, details: list[dict[str, Any]] | None = None) -> MeteorError:
    return MeteorError(400, f"Match failed: {summary}", details or [])


def _from_validation_errors(failures: list[tuple[int, pydantic.ValidationError]],
                            extra: list[dict[str, Any]] | None = None) -> MeteorError:
    details = list(extra or [])
    for index, exc in failures:
        # Never the input: it may be a password.
        for error in exc.errors(include_url=False, include_context=False, include_input=False):
            details.append({"loc": [index, *error["loc"]], "msg": error["msg"],
                            "type": error["type"]})
    summary = "; ".join(f"params[{']['.join(map(str, d['loc']))}]: {d['msg']}"
                        for d in details[:5])
    if len(details) > 5:
        summary += f"; and {len(details) - 5} more"
    return _match_failed(summary, details)


class Methods:
    """A registry of methods by name. Nothing is callable unless declared here."""

    def __init__(self) -> None:
        self._by_name: dict[str, MethodDefinition] = {}

    def method(self, name: str, *, positional: bool | None = None
               ) -> Callable[[Handler], Handler]:
        """Declare ``async def handler(ctx, ...)`` as method ``name`` (see the module doc).

        ``positional``: None picks the one-object style when the only parameter is a pydantic
        model; True forces positional params; False requires the one-object style.
        """
        def register(handler: Handler) -> Handler:
            self.add(MethodDefinition.from_handler(name, handler, positional))
            return handler
        return register

    def add(self, definition: MethodDefinition) -> MethodDefinition:
        if definition.name in self._by_name:
            raise ValueError(f"method {definition.name!r} is already declared")
        self._by_name[definition.name] = definition
        return definition

    def include(self, other: Methods) -> None:
        """Declare every method of ``other`` here too (e.g. the accounts methods)."""
        for definition in other:
            self.add(definition)

    def get(self, name: str) -> MethodDefinition | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[MethodDefinition]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


@dataclass(frozen=True)
class InvocationOutcome:
    """The answer to one method call, for the server to send.

    Exactly one of ``result``/``error`` is meaningful: ``error`` is None on success, and
    ``result`` is ``UNDEFINED`` for a method that returned None (``result`` message without a
    value). ``commit`` says what the write fence must wait for (``commit.xid`` None: nothing
    was written, ``updated`` may go out at once). ``login`` is set when the call changed the
    connection's login (login, logout, createUser, getNewToken); ``revoked_token_hashes`` lists
    resume tokens the call deleted.
    """

    result: Any = UNDEFINED
    error: MeteorError | None = None
    commit: CommitInfo = field(default_factory=CommitInfo)
    login: LoginState | None = None
    revoked_token_hashes: tuple[str, ...] = ()

    @property
    def xid(self) -> int | None:
        return self.commit.xid

    @property
    def ok(self) -> bool:
        return self.error is None


def _to_result(value: Any) -> Any:
    if value is None:
        return UNDEFINED
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="python", by_alias=True)
    return value


async def invoke(methods: Methods, name: str, raw_params: list[Any] | None,
                 connection: ConnectionInfo, *, method_id: str, random_seed: Any = None,
                 database: Database | None = None,
                 connection_limiter: trio.CapacityLimiter | None = None) -> InvocationOutcome:
    """Run one DDP method call and say what to answer.

    ``connection_limiter`` bounds how many calls hold a database connection at once (default:
    the database's ``holders``). Cancellation (connection closed) rolls back
    and propagates.
    """
    definition = methods.get(name)
    if definition is None:
        return InvocationOutcome(error=MeteorError.method_not_found(name))
    params = [] if raw_params is None else raw_params
    if not isinstance(params, list):
        return InvocationOutcome(error=_match_failed("params must be a list"))
    try:
        arguments = definition.bind(params)
    except MeteorError as exc:
        return InvocationOutcome(error=exc)

    if connection_limiter is None and database is not None:
        connection_limiter = database.holders
    transaction = MethodTransaction(database, connection_limiter)
    context = MethodContext(connection=connection, method_id=method_id, method_name=name,
                            random=RandomStream(random_seed), transaction=transaction)
    try:
        value = _to_result(await definition.handler(context, *arguments))
        if value is not UNDEFINED:
            ejson.to_json_value(value)  # a value we cannot send is the method's bug: roll back
    except MeteorError as exc:
        await transaction.rollback()
        return InvocationOutcome(error=exc)
    except Exception as exc:
        await transaction.rollback()
        return InvocationOutcome(error=to_meteor_error(exc, f"method {name!r}"))
    except BaseException:
        await transaction.rollback()
        raise
    try:
        commit = await transaction.commit()
    except Exception as exc:  # (a connection lost during it is settled by commit itself)
        return InvocationOutcome(error=to_meteor_error(exc, f"method {name!r}: commit"))
    return InvocationOutcome(result=value, commit=commit, login=context.login_change,
                             revoked_token_hashes=context.revoked_token_hashes)

