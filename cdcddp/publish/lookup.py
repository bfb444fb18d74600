"""Reactive row look-ups for publication functions.

A publication function may need another table's row to decide what to publish — the Todos
app's ``todos.inList`` publishes a list's todos only while the list is public or owned by the
subscriber. Declared with a third parameter, the function receives a :class:`RowLookup`::

    @publications.publication("todos.inList", params=InListParams)
    def todos_in_list(params, user_id, lookup):
        lst = lookup.row("lists", params.listId, columns=["user_id"])
        if lst is None or lst["user_id"] not in (None, user_id):
            return None
        return Cursor("todos", fields=[...], filter=C("list_id") == params.listId)

Every row read is recorded as a dependency ``(schema, table, key)``; the live-data engine
re-runs the function when the stream changes one of those rows, and the subscription's
documents follow the new cursors (only the difference reaches the client).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql

from cdcddp.db import execute_as_decoded
from cdcddp.publish.definition import split_table
from cdcddp.publish.filters import quoted

Dependency = tuple[str, str, tuple[Any, ...]]  # (schema, table, primary-key values)


class RowLookup(Protocol):
    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None: ...


class SqlRowLookup:
    """Reads rows on a psycopg connection (in a worker thread) and records what it read."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.dependencies: set[Dependency] = set()

    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None:
        schema, name = split_table(table)
        key_values = tuple(key) if isinstance(key, tuple) else (key,)
        if len(key_values) != len(key_columns):
            raise ValueError(f"key {key!r} does not match key columns {list(key_columns)}")
        self.dependencies.add((schema, name, key_values))
        selected = sql.SQL("*") if columns is None else sql.SQL(", ").join(
            map(quoted, dict.fromkeys([*key_columns, *columns])))
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %s").format(quoted(c)) for c in key_columns)
        query = sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
            selected, quoted(schema), quoted(name), where)
        # Values as the stream decodes them (the function may compare them with published ones).
        cursor = execute_as_decoded(self._conn, query, key_values)
        found = cursor.fetchone()
        if found is None:
            return None
        names = [d.name for d in cursor.description or ()]
        return dict(zip(names, found, strict=True))
