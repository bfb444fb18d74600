"""The application registry: what a cdcddp app declares (methods and publications).

An app is a module that builds one ``App`` and declares its handlers on it::

    from cdcddp.app import App, MethodContext, PublicationContext
    from cdcddp.ddp.messages import MeteorError

    app = App()

    @app.method("echo")
    async def echo(ctx: MethodContext, *args):
        return list(args)

    @app.publish("lists")
    async def lists(ctx: PublicationContext, owner):
        ctx.added("lists", "a1", {"name": "groceries", "owner": owner})
        ctx.ready()

Declarative, SQL-backed publications (live: served from the replication stream when the
server has a database) are declared with :mod:`cdcddp.publish.definition`::

    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C, Param, UserId

    app.add_publication(Publication(
        "todos.mine", Cursor("todos", fields=["text", "checked"],
                             filter=C("owner_id") == UserId()), requires_user=True))

    @app.publication("todos.inList", params=ListParams)
    def todos_in_list(params, user_id):
        return Cursor("todos", fields=["text"], filter=C("list_id") == params.listId)

and is served with ``cdcddp serve mymodule:app --listen 127.0.0.1:3000``.

Secure by default: nothing is callable or published unless declared here; an undeclared name
gets a 404 error. Handlers are ``async`` functions called with a context and the DDP params
spread as positional arguments. A params list that does not fit the handler's signature is a
400 ("Match failed"), as Meteor's ``check`` would answer.

Handler-style publications (``@app.publish``) and declarative ones share each client's merge
box, so they may publish the same collections and documents.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import pydantic

from cdcddp.methods.registry import Methods
from cdcddp.publish.definition import CursorFunction, Publication, Publications

__all__ = [
    "App", "MethodContext", "MethodHandler", "PublicationContext", "PublicationHandler",
    "load_app",
]


@dataclass(frozen=True)
class MethodContext:
    """What a method handler knows about its call."""

    connection_id: str
    user_id: str | None  # None until accounts exist
    random_seed: Any | None  # the client's randomSeed (seeds ids of documents it inserts)
    method_id: str


class PublicationContext(Protocol):
    """What a publication handler uses to publish documents to one subscription.

    Calls after the subscription stopped (``unsub``, error, disconnect) are ignored, so a
    handler need not race against the client.
    """

    connection_id: str
    user_id: str | None
    sub_id: str

    @property
    def stopped(self) -> bool: ...

    def added(self, collection: str, doc_id: str, fields: Mapping[str, Any]) -> None: ...

    def changed(self, collection: str, doc_id: str, fields: Mapping[str, Any],
                cleared: list[str] | tuple[str, ...] = ()) -> None: ...

    def removed(self, collection: str, doc_id: str) -> None: ...

    def ready(self) -> None: ...

    def error(self, error: BaseException) -> None:
        """Stop the subscription: its documents are removed, then ``nosub`` with the error
        (a MeteorError as is, anything else as 500 "Internal server error")."""
        ...


MethodHandler = Callable[..., Awaitable[Any]]
PublicationHandler = Callable[..., Awaitable[None]]


class App:
    """The registry of an application's methods and publications."""

    def __init__(self, name: str = "cdcddp", publications: Publications | None = None, *,
                 methods: Methods | None = None, schemas: tuple[str, ...] = ()) -> None:
        self.name = name
        # Handler-style methods (``@app.method``).
        self.methods: dict[str, MethodHandler] = {}
        # Typed methods (``cdcddp.methods``): one transaction per call, accounts, write fence.
        self.typed_methods: Methods = Methods()
        # Schema files (``schema/<name>.sql``, idempotent) ``cdcddp serve`` applies at start.
        self.schemas: tuple[str, ...] = tuple(schemas)
        # Declarative (SQL-backed, live) publications; `cdcddp check` reads them too.
        self.publications: Publications = publications if publications is not None \
            else Publications()
        # Handler-style publications (``@app.publish``).
        self.publish_handlers: dict[str, PublicationHandler] = {}
        if methods is not None:
            self.include_methods(methods)

    def include_methods(self, methods: Methods) -> None:
        """Declare every typed method of a :class:`cdcddp.methods.Methods` registry."""
        for definition in methods:
            if definition.name in self.methods:
                raise ValueError(f"method {definition.name!r} is already declared")
        self.typed_methods.include(methods)

    def add_publication(self, publication: Publication) -> Publication:
        """Declare a declarative publication (see :class:`Publication`)."""
        if publication.name and publication.name in self.publish_handlers:
            raise ValueError(f"publication {publication.name!r} is already declared")
        return self.publications.add(publication)

    def include_publications(self, publications: Publications) -> None:
        """Declare every publication of a :class:`Publications` registry."""
        for publication in [*publications, *publications.universal]:
            if publication not in self.publications.universal and (
                    not publication.name or publication.name not in self.publications):
                self.add_publication(publication)

    def publication(self, name: str, *, params: type[pydantic.BaseModel] | None = None,
                    requires_user: bool = False, universal: bool = False,
                    positional_params: bool = False,
                    ) -> Callable[[CursorFunction], CursorFunction]:
        """Decorator: ``def fn(params, user_id) -> Cursor | [Cursor] | None`` as publication
        ``name`` (``params`` is the validated model instance, or None without a model)."""
        def register(function: CursorFunction) -> CursorFunction:
            self.add_publication(Publication(
                name, function, params=params, requires_user=requires_user,
                universal=universal, positional_params=positional_params))
            return function
        return register

    def method(self, name: str) -> Callable[[MethodHandler], MethodHandler]:
        """Declare ``async def handler(ctx: MethodContext, *params)`` as method ``name``.

        It returns an EJSON-able value (None → a ``result`` without a value) or raises
        ``MeteorError`` (sent to the client as is). Any other exception is logged with its
        traceback and reaches the client as 500 "Internal server error". Calls from one
        connection run one at a time, in order (Meteor's default without ``this.unblock()``).
        """
        def register(handler: MethodHandler) -> MethodHandler:
            _check_handler("method", name, handler, self.methods)
            if name in self.typed_methods:
                raise ValueError(f"method {name!r} is already declared")
            self.methods[name] = handler
            return handler
        return register

    def publish(self, name: str) -> Callable[[PublicationHandler], PublicationHandler]:
        """Declare ``async def handler(ctx: PublicationContext, *params)`` as publication
        ``name``. It calls ``ctx.added``/``changed``/``removed`` and ``ctx.ready()`` once its
        initial set is out; raising stops the subscription like ``ctx.error``. It runs in the
        connection's ordered queue with methods, so it should return once ready (live updates
        come from the live-data layer, not from a handler that keeps running).
        """
        def register(handler: PublicationHandler) -> PublicationHandler:
            _check_handler("publication", name, handler, self.publish_handlers)
            if name in self.publications:
                raise ValueError(f"publication {name!r} is already declared")
            self.publish_handlers[name] = handler
            return handler
        return register


def _check_handler(kind: str, name: str, handler: Callable[..., Any],
                   registry: Mapping[str, Any]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string")
    if name in registry:
        raise ValueError(f"{kind} {name!r} is already declared")
    if not inspect.iscoroutinefunction(handler):
        raise TypeError(f"{kind} {name!r} must be an async function")


def bind_params(handler: Callable[..., Any], context: object, params: list[Any]
                ) -> inspect.BoundArguments | None:
    """Bind (context, *params) to the handler's signature; None if they do not fit."""
    try:
        return inspect.signature(handler).bind(context, *params)
    except TypeError:
        return None


def load_app(spec: str) -> App:
    """Import ``"package.module:attribute"`` (attribute defaults to ``app``) and return it."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app", None)
    if not isinstance(app, App):
        raise TypeError(f"{spec!r} is not a cdcddp.app.App")
    return app
