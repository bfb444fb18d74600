"""Publication definitions: which rows of which table a subscriber gets, and in what shape.

Nothing is published unless declared: a :class:`Cursor` names its table, the collection the
client sees, the columns it publishes (explicitly — there is no "all columns") and a filter.
A :class:`Publication` is either a fixed set of cursors or a function of the validated
parameters and the subscribing user returning cursors::

    from pydantic import BaseModel
    from cdcddp.publish.definition import Cursor, Publication, Publications
    from cdcddp.publish.filters import C, Param, UserId

    publications = Publications()

    class ListParams(BaseModel):
        listId: int

    publications.add(Publication(
        "todos.inList",
        Cursor("public.todos", collection="todos", camel_case=True,
               fields=["title", "done", "list_id", "created_at"],
               filter=(C("list_id") == Param("listId")) & (C("owner_id") == UserId())),
        params=ListParams, requires_user=True))

    @publications.publication("lists.mine", requires_user=True)
    def my_lists(params: None, user_id: str | None) -> Cursor:
        return Cursor("lists", fields={"name": "name"}, filter=C("owner_id") == user_id)

This module does no I/O: :meth:`BoundCursor.snapshot_query` produces the parametrised
``SELECT`` that an observer runs, :attr:`BoundCursor.predicate` tests stream rows, and
:meth:`Cursor.render` turns a row into ``(doc_id, fields)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final, TypeAlias

import pydantic
from psycopg import sql

from cdcddp.publish.filters import TRUE, BoundFilter, Condition, Row, quoted
from cdcddp.publish.ids import pk_to_doc_id
from cdcddp.publish.ordering import order_by, read_limit

UserIdValue: TypeAlias = Any  # the accounts layer's user id (str, int or UUID); None = anonymous
Fields: TypeAlias = dict[str, Any]
TableName: TypeAlias = tuple[str, str]  # (schema, table)

DEFAULT_SCHEMA: Final = "public"


class PublicationError(ValueError):
    """A publication or cursor is declared wrongly (a programming error, found early)."""


_DIRECTIONS: Final = {"asc": False, "desc": True, 1: False, -1: True}


def _sort_order(sort: Sequence[str | tuple[str, str | int]], limit: int | None
                ) -> tuple[tuple[str, bool], ...]:
    """``Cursor.order`` from its ``sort`` and ``limit`` (checked)."""
    if limit is not None and (type(limit) is not int or limit < 1):
        raise PublicationError(f"limit must be a positive integer, not {limit!r}")
    if isinstance(sort, str | Mapping):
        raise PublicationError("sort must be a list of columns or (column, direction) pairs")
    order: list[tuple[str, bool]] = []
    for entry in sort:
        pair = (entry, "asc") if isinstance(entry, str) else entry
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise PublicationError(f"bad sort entry {entry!r}: a column or (column, direction)")
        column, direction = pair
        if not isinstance(column, str) or not column:
            raise PublicationError(f"bad sort column {column!r}")
        if isinstance(direction, str):
            direction = direction.lower()
        if type(direction) not in (str, int) or direction not in _DIRECTIONS:
            raise PublicationError(
                f"sort direction of {column!r} must be 'asc', 'desc', 1 or -1, not "
                f"{direction!r}")
        if column not in dict(order):
            order.append((column, _DIRECTIONS[direction]))
    return tuple(order) if limit is not None else ()


class PublicationParamsError(ValueError):
    """A subscriber sent parameters the publication does not accept (DDP error 400)."""

    error_code: Final = 400

    def __init__(self, publication: str, reason: str,
                 details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(f"publication {publication!r}: {reason}")
        self.publication = publication
        self.reason = reason
        self.details = details or []  # JSON-safe: [{"loc": [...], "msg": ..., "type": ...}]


def camel_case(column: str) -> str:
    """``created_at`` → ``createdAt`` (leading underscores kept, later letters untouched)."""
    body = column.lstrip("_")
    head, *rest = body.split("_")
    return column[: len(column) - len(body)] + head + "".join(p[:1].upper() + p[1:] for p in rest)


def _check_field_name(name: str, column: str) -> None:
    # Meteor/Mongo field names: "_id" is the document id, "." means nesting, "$" is an operator.
    if not name or name == "_id" or "." in name or name.startswith("$"):
        raise PublicationError(f"column {column!r} cannot be published as field {name!r}")


def split_table(table: str | tuple[str, str]) -> tuple[str, str]:
    """``"schema.table"``, ``"table"`` (in ``public``) or ``(schema, table)`` as a pair."""
    if isinstance(table, tuple):
        schema, name = table
    elif "." in table:
        schema, name = table.split(".", 1)  # names containing dots: pass a (schema, name) tuple
    else:
        schema, name = DEFAULT_SCHEMA, table
    if not schema or not name:
        raise PublicationError(f"bad table name {table!r}")
    return schema, name


@dataclass(frozen=True, eq=False)
class Cursor:
    """Rows of one table published as documents of one collection.

    ``fields``: columns to publish, either a list (``"col"`` or ``("col", "fieldName")``) or a
    mapping column → field name. With ``camel_case=True`` plain list entries are renamed
    ``snake_case`` → ``camelCase``; explicit names are kept as given. Primary-key columns make
    the document ``_id`` (see :mod:`cdcddp.publish.ids`) and are repeated in the fields only
    when listed in ``fields``.
    """

    table: str | tuple[str, str]
    fields: Sequence[str | tuple[str, str]] | Mapping[str, str]
    collection: str | None = None  # default: the table name
    primary_key: Sequence[str] = ("id",)
    filter: Condition | None = None
    camel_case: bool = False
    # The first ``limit`` rows in ``sort`` order (see cdcddp.publish.ordering): columns, or
    # (column, "asc" | "desc" | 1 | -1) pairs. Without a limit the order changes nothing
    # (DDP documents are unordered: the client sorts).
    sort: Sequence[str | tuple[str, str | int]] = ()
    limit: int | None = None
    # Derived in __post_init__:
    schema_name: str = field(init=False)
    table_name: str = field(init=False)
    collection_name: str = field(init=False)
    field_map: tuple[tuple[str, str], ...] = field(init=False)  # (column, field name)
    key_columns: tuple[str, ...] = field(init=False)
    order: tuple[tuple[str, bool], ...] = field(init=False)  # (column, descending); () unlimited

    def __post_init__(self) -> None:
        schema, name = split_table(self.table)
        if isinstance(self.fields, str):
            raise PublicationError("fields must be a list or mapping of columns, not a string")
        if isinstance(self.fields, Mapping):
            pairs = list(self.fields.items())
        else:
            pairs = [(e, camel_case(e) if self.camel_case else e) if isinstance(e, str) else e
                     for e in self.fields]
        seen: set[str] = set()
        for column, field_name in pairs:
            if not isinstance(column, str) or not column:
                raise PublicationError(f"bad column name {column!r}")
            _check_field_name(field_name, column)
            if field_name in seen:
                raise PublicationError(f"field {field_name!r} is published twice")
            seen.add(field_name)
        key = tuple(self.primary_key)
        if not key or isinstance(self.primary_key, str):
            raise PublicationError("primary_key must be a non-empty list of column names")
        if self.filter is not None and not isinstance(self.filter, Condition):
            raise PublicationError(f"filter must be a filter condition, not {self.filter!r}")
        collection = self.collection or name
        order = _sort_order(self.sort, self.limit)
        for attr, value in (("schema_name", schema), ("table_name", name),
                            ("collection_name", collection), ("field_map", tuple(pairs)),
                            ("key_columns", key), ("order", order)):
            object.__setattr__(self, attr, value)

    @property
    def condition(self) -> Condition:
        return self.filter if self.filter is not None else TRUE

    def columns_for(self, bound_filter: BoundFilter) -> tuple[str, ...]:
        """Columns the snapshot selects: the key, the published columns, the filter's columns.

        The observer keeps all of them, so it can complete stream rows whose unchanged TOASTed
        values wal2json left out before re-evaluating the filter.
        """
        ordered = [*self.key_columns, *(c for c, _ in self.field_map),
                   *sorted(bound_filter.columns), *(c for c, _ in self.order)]
        return tuple(dict.fromkeys(ordered))

    def bind(self, params: Mapping[str, Any] | None = None,
             user_id: UserIdValue = None) -> BoundCursor:
        return BoundCursor(self, self.condition.bind(params, user_id))

    def doc_id(self, row: Row) -> str:
        """The document ``_id`` of a row (needs only the key columns)."""
        return pk_to_doc_id([row[c] for c in self.key_columns])

    def render(self, row: Row) -> tuple[str, Fields]:
        """``(doc_id, fields)`` for a row holding every published column.

        A column missing from the row raises ``KeyError``: the caller completes stream rows
        (unchanged TOAST) from its published copy first — a missing value is never sent as null.
        """
        return self.doc_id(row), {name: row[column] for column, name in self.field_map}


@dataclass(frozen=True)
class BoundCursor:
    """A cursor with its filter bound to one subscription's parameters and user."""

    cursor: Cursor
    filter: BoundFilter

    @property
    def table(self) -> TableName:
        """(schema, table) of the cursor's table."""
        return self.cursor.schema_name, self.cursor.table_name

    @property
    def key(self) -> tuple[Any, ...]:
        """Equal keys mean identical results: subscriptions with equal keys can share an
        observer (the user only matters if the filter used it)."""
        c = self.cursor
        return (c.schema_name, c.table_name, c.collection_name, c.field_map, c.key_columns,
                self.filter, c.order, c.limit)

    @cached_property
    def columns(self) -> tuple[str, ...]:
        return self.cursor.columns_for(self.filter)

    def snapshot_query(self, tag: int | None = None,
                       shape: Mapping[str, tuple[Any, ...]] | None = None,
                       text_columns: Mapping[str, str] | None = None
                       ) -> tuple[sql.Composed, list[Any]]:
        """``SELECT <columns> FROM <schema>.<table> WHERE <filter>`` and its parameters; with a
        ``tag``, each row starts with that number (reads combined in one statement). A limited
        cursor adds ``ORDER BY ... LIMIT``, for which it needs the table's ``shape`` (column ->
        (type oid, ...)): text sorts by code point. ``text_columns``: those of the table's
        columns that compare with text otherwise (see :mod:`cdcddp.publish.filters`)."""
        where, params = self.filter.where(text_columns)
        cursor = self.cursor
        columns = sql.SQL(", ").join(map(quoted, self.columns))
        if tag is not None:
            columns = sql.SQL("{}, {}").format(sql.Literal(tag), columns)
        query = sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
            columns, quoted(cursor.schema_name), quoted(cursor.table_name), where)
        if cursor.limit is not None:
            query = sql.SQL("{} {} LIMIT {}").format(
                query, order_by(cursor.order, cursor.key_columns, shape),
                sql.Literal(read_limit(cursor.limit)))
        return query, params

    @property
    def predicate(self) -> Callable[[Row], bool]:
        """Does a (complete) row belong to this cursor's result?"""
        return self.filter.predicate

    def render(self, row: Row) -> tuple[str, Fields]:
        return self.cursor.render(row)


CursorFunction: TypeAlias = Callable[..., "Cursor | Sequence[Cursor] | None"]
# (params, user_id) or, reading rows reactively, (params, user_id, lookup)


@dataclass(frozen=True, eq=False)
class Publication:
    """A named publication clients subscribe to.

    ``source``: one cursor, a list of cursors, or a function ``(params, user_id) -> cursors``
    (``params`` is the validated model instance, or ``None`` without a model).

    ``params``: a pydantic model for the subscription parameters. DDP sends a list; by default
    it must be empty or hold one object validated against the model (``Meteor.subscribe(name,
    {listId: 3})``); with ``positional_params=True`` the list's items fill the model's fields in
    declaration order (``Meteor.subscribe(name, 3)``). Without a model, any parameter is refused.
    Filters of fixed cursors may use ``Param(name)`` for the model's fields.

    ``requires_user``: anonymous subscribers get ``ready`` and no documents.
    ``universal``: sent to every connection without a ``sub`` (takes no parameters).
    """

    name: str
    source: Cursor | Sequence[Cursor] | CursorFunction
    params: type[pydantic.BaseModel] | None = None
    requires_user: bool = False
    universal: bool = False
    positional_params: bool = False

    def __post_init__(self) -> None:
        if not self.name and not self.universal:
            raise PublicationError("a publication needs a name")
        if self.universal and self.params is not None:
            raise PublicationError(f"universal publication {self.name!r} cannot take params")
        if self.params is not None and not (
                isinstance(self.params, type) and issubclass(self.params, pydantic.BaseModel)):
            raise PublicationError("params must be a pydantic BaseModel subclass")
        if not callable(self.source):
            cursors = self._static_cursors()
            _check_collections(self.name, cursors)
            declared = set(self.params.model_fields) if self.params is not None else set()
            for cursor in cursors:
                unknown = cursor.condition.param_names - declared
                if unknown:
                    raise PublicationError(
                        f"publication {self.name!r} filters on undeclared params {sorted(unknown)}")

    def _static_cursors(self) -> tuple[Cursor, ...]:
        source = self.source
        cursors = (source,) if isinstance(source, Cursor) else tuple(source)  # type: ignore[arg-type]
        for cursor in cursors:
            if not isinstance(cursor, Cursor):
                raise PublicationError(f"publication {self.name!r}: not a Cursor: {cursor!r}")
        return cursors

    def validate_params(self, raw_params: Sequence[Any] | None) -> pydantic.BaseModel | None:
        """Validate DDP ``sub`` params; :class:`PublicationParamsError` when they are bad."""
        raw = [] if raw_params is None else raw_params
        if not isinstance(raw, list | tuple):
            raise PublicationParamsError(self.name, "params must be a list")
        if self.params is None:
            if raw:
                raise PublicationParamsError(self.name, "this publication takes no parameters")
            return None
        if self.positional_params:
            names = list(self.params.model_fields)
            if len(raw) > len(names):
                raise PublicationParamsError(
                    self.name, f"expected at most {len(names)} parameters, got {len(raw)}")
            data: Any = dict(zip(names, raw, strict=False))
        elif not raw:
            data = {}
        elif len(raw) == 1 and isinstance(raw[0], dict):
            data = raw[0]
        else:
            raise PublicationParamsError(self.name, "expected one object of parameters")
        try:
            return self.params.model_validate(data)
        except pydantic.ValidationError as exc:
            details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                       for e in exc.errors()]
            reason = "; ".join(f"{'.'.join(map(str, d['loc'])) or 'params'}: {d['msg']}"
                               for d in details)
            raise PublicationParamsError(self.name, f"invalid parameters: {reason}",
                                         details) from None

    @cached_property  # (inspect.signature takes ~40 µs: once, not per subscription)
    def wants_lookup(self) -> bool:
        """A function source declared with a third parameter reads rows reactively
        (``cdcddp.publish.lookup``): it must be resolved with a lookup, off the trio thread."""
        if not callable(self.source) or isinstance(self.source, Cursor):
            return False
        try:
            parameters = inspect.signature(self.source).parameters
        except (TypeError, ValueError):
            return False
        return len(parameters) >= 3

    def inputs_key(self, raw_params: Sequence[Any] | None, user_id: UserIdValue = None
                   ) -> Hashable | None:
        """Equal keys mean :meth:`resolve` gets equal inputs: this publication, the same
        parameters as sent (types included: ``1``, ``1.0`` and ``true`` differ) and the
        same user. None when a value cannot be hashed."""
        try:
            key = (self, _frozen(raw_params), user_id)
            hash(key)
        except TypeError:
            return None
        return key

    def resolve(self, raw_params: Sequence[Any] | None,
                user_id: UserIdValue = None, lookup: Any = None) -> tuple[BoundCursor, ...]:
        """The bound cursors of one subscription (empty: ``ready`` with no documents).

        Raises :class:`PublicationParamsError` for bad parameters (checked before the user, so
        the error does not depend on being logged in).
        """
        params = self.validate_params(raw_params)
        if self.requires_user and user_id is None:
            return ()
        if callable(self.source):
            if self.wants_lookup:
                if lookup is None:
                    raise PublicationError(
                        f"publication {self.name!r} reads rows: resolve it with a lookup")
                produced = self.source(params, user_id, lookup)  # type: ignore[call-arg]
            else:
                produced = self.source(params, user_id)
            if produced is None:
                cursors: tuple[Cursor, ...] = ()
            elif isinstance(produced, Cursor):
                cursors = (produced,)
            else:
                cursors = tuple(produced)
            for cursor in cursors:
                if not isinstance(cursor, Cursor):
                    raise PublicationError(
                        f"publication {self.name!r} returned {cursor!r}, not a Cursor")
            _check_collections(self.name, cursors)
        else:
            cursors = self._static_cursors()
        values = params.model_dump() if params is not None else {}
        return tuple(cursor.bind(values, user_id) for cursor in cursors)


def _frozen(value: Any) -> Hashable:
    """``value`` (EJSON: dicts, lists, scalars) as nested tuples tagged with their types;
    raises TypeError for a value that cannot be hashed."""
    kind = type(value)
    if kind is dict:
        return kind, tuple(sorted((key, _frozen(item)) for key, item in value.items()))
    if kind is list or kind is tuple:
        return kind, tuple(map(_frozen, value))
    hash(value)
    return kind, value


def _check_collections(name: str, cursors: Sequence[Cursor]) -> None:
    # As Meteor: two cursors of one publication may not feed the same collection.
    collections = [c.collection_name for c in cursors]
    if len(set(collections)) != len(collections):
        raise PublicationError(f"publication {name!r} has several cursors for one collection")


class Publications:
    """The declared publications, by name (nothing else can be subscribed to)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Publication] = {}
        self._universal: list[Publication] = []

    def add(self, publication: Publication) -> Publication:
        if publication.universal:
            self._universal.append(publication)
            if not publication.name:
                return publication
        if publication.name in self._by_name:
            raise PublicationError(f"publication {publication.name!r} is already defined")
        self._by_name[publication.name] = publication
        return publication

    def publication(self, name: str, *, params: type[pydantic.BaseModel] | None = None,
                    requires_user: bool = False, universal: bool = False,
                    positional_params: bool = False,
                    ) -> Callable[[CursorFunction], CursorFunction]:
        """Decorator declaring a publication function ``(params, user_id) -> cursors``."""
        def register(function: CursorFunction) -> CursorFunction:
            self.add(Publication(name, function, params=params, requires_user=requires_user,
                                 universal=universal, positional_params=positional_params))
            return function
        return register

    def get(self, name: str) -> Publication | None:
        return self._by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __iter__(self) -> Iterator[Publication]:
        return iter(self._by_name.values())

    @property
    def universal(self) -> tuple[Publication, ...]:
        return tuple(self._universal)
