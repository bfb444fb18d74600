"""Preflight of declared publications against a real database (``cdcddp check``).

For each cursor of a publication with fixed cursors: the table exists and streams its UPDATEs
and DELETEs (primary key or replica identity), the key, published, filtered and sort columns
exist, a limited cursor's sort columns have a type it can sort by, and its filter runs with
values of its parameters' declared types (a ``str`` parameter compared with a uuid column has
no operator in PostgreSQL). Publication functions produce their cursors per subscription, so
only their presence is reported; their cursors are checked when they are resolved.
"""

from __future__ import annotations

import datetime as dt
import enum
import types
import typing
import uuid
from collections.abc import Iterable
from decimal import Decimal
from typing import Any, Final

import psycopg
import pydantic
from psycopg import sql

from cdcddp.db import first_line
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.filters import FilterError
from cdcddp.publish.ordering import SORTABLE_TYPE_OIDS, SORTABLE_TYPES
from cdcddp.publish.snapshots import table_shapes, text_columns
from cdcddp.wal.preflight import Finding, check_table

# A value of each parameter type a filter may compare with a column (the kinds of
# cdcddp.publish.filters); a parameter of another type is not probed.
_SAMPLES: Final[dict[Any, Any]] = {
    str: "", bool: False, int: 0, float: 0.0, Decimal: Decimal(0), uuid.UUID: uuid.UUID(int=0),
    dt.datetime: dt.datetime(2000, 1, 1, tzinfo=dt.UTC), dt.date: dt.date(2000, 1, 1),
    dt.time: dt.time(0), dt.timedelta: dt.timedelta(0), bytes: b""}
_UNKNOWN: Final = object()


def _sample(annotation: Any) -> Any:
    """A value of a parameter declared ``annotation`` (``_UNKNOWN`` when there is none to
    make): Optional[X] and Annotated[X, ...] are X's; a list is one of its items."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _sample(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return _sample(kinds[0]) if len(kinds) == 1 else _UNKNOWN
    if origin is typing.Literal:
        return args[0]
    if origin in (list, tuple, set, frozenset):
        item = _sample(args[0]) if args else _UNKNOWN
        return _UNKNOWN if item is _UNKNOWN else [item]
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return next(iter(annotation)).value
    return _SAMPLES.get(annotation, _UNKNOWN)


def _columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, tuple[int, str]]:
    """The table's columns: name -> (type oid, type name)."""
    rows = conn.execute(
        "SELECT attname, atttypid::int, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass AND attnum > 0 "
        "AND NOT attisdropped", (schema, table)).fetchall()
    return {name: (oid, type_name) for name, oid, type_name in rows}


def _filter_finding(conn: psycopg.Connection, publication: str, cursor: Cursor,
                    params: type[pydantic.BaseModel] | None) -> Finding | None:
    """Run the cursor's snapshot query (``LIMIT 0``) with values of its parameters' declared
    types: a comparison PostgreSQL has no operator for is named now, not at a first
    subscription."""
    fields = params.model_fields if params is not None else {}
    samples = {name: _sample(fields[name].annotation) if name in fields else _UNKNOWN
               for name in cursor.condition.param_names}
    if _UNKNOWN in samples.values():
        return None
    try:
        bound = cursor.bind(samples, "")
    except FilterError:
        return None  # (a value the filter refuses: reported when it is bound)
    table = (cursor.schema_name, cursor.table_name)
    shape = table_shapes(conn, [table]).get(table)
    query, values = bound.snapshot_query(shape=shape, text_columns=text_columns(shape))
    try:
        with conn.transaction():
            conn.execute(sql.SQL("SELECT FROM ({}) AS probe LIMIT 0").format(query), values)
    except psycopg.errors.UndefinedFunction as exc:
        return Finding("error", "filter_type", (
            f"publication {publication!r}: its filter fails: {first_line(exc)}: give the "
            "parameter the column's type in the publication's params model (UUID for a uuid "
            "column, datetime for a timestamp, int for an integer), or compare with a "
            "literal of it."))
    return None


def check_cursor(conn: psycopg.Connection, publication: str, cursor: Cursor,
                 params: type[pydantic.BaseModel] | None = None) -> list[Finding]:
    qualified = conn.execute("SELECT quote_ident(%s) || '.' || quote_ident(%s)",
                             (cursor.schema_name, cursor.table_name)).fetchone()[0]  # type: ignore[index]
    table = check_table(conn, qualified)
    if table.severity != "ok":
        return [table]
    existing = _columns(conn, cursor.schema_name, cursor.table_name)
    wanted = {
        "primary key": list(cursor.key_columns),
        "published": [column for column, _ in cursor.field_map],
        "filter": sorted(cursor.condition.column_names),
        "sort": [column for column, _ in cursor.order],
    }
    findings = []
    for role, columns in wanted.items():
        missing = [c for c in columns if c not in existing]
        if missing:
            findings.append(Finding(
                "error", "column_missing",
                f"publication {publication!r}: {role} column(s) {', '.join(missing)} do not exist "
                f"in {qualified}: fix the cursor or add the column(s)."))
    if cursor.limit is not None:
        unsortable = [f"{c} ({existing[c][1]})" for c in (*wanted["sort"], *cursor.key_columns)
                      if c in existing and existing[c][0] not in SORTABLE_TYPE_OIDS]
        if unsortable:
            findings.append(Finding(
                "error", "sort_type",
                f"publication {publication!r}: cannot sort by {', '.join(unsortable)}: sort "
                f"by {SORTABLE_TYPES} columns."))
    if not findings:
        found = _filter_finding(conn, publication, cursor, params)
        if found is not None:
            findings.append(found)
    if not findings:
        findings.append(Finding("ok", "publication",
                                f"publication {publication!r}: {qualified} is publishable."))
    return findings


def check_publications(conn: psycopg.Connection,
                       publications: Iterable[Publication]) -> list[Finding]:
    findings: list[Finding] = []
    for publication in dict.fromkeys(publications):
        label = publication.name or "(universal)"
        if callable(publication.source):
            findings.append(Finding(
                "ok", "publication_function",
                f"publication {label!r} is a function: its cursors are checked per subscription."))
            continue
        for cursor in publication._static_cursors():
            findings.extend(check_cursor(conn, label, cursor, publication.params))
    return findings
