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
documents follow the new cursors (only the difference reaches the client). The stream names
changed rows by primary key, so ``key_columns`` must be the table's primary key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import psycopg
from psycopg import sql

from cdcddp.db import execute_as_decoded
from cdcddp.publish.definition import PublicationError, TableName, split_table
from cdcddp.publish.filters import quoted
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Row

Dependency = tuple[str, str, tuple[Any, ...]]  # (schema, table, primary-key values)
# What a lookup read of each row: its columns' values, or None (no such row).
ReadRows = dict[Dependency, dict[str, Any] | None]


_MISSING: Any = object()


def read_differs(read: dict[str, Any] | None, now: Row | None) -> bool:
    """Could a function that read ``read`` of a row decide otherwise now that the row is
    ``now`` (None: gone)? Only if a column it read changed: a column missing from ``now``
    is an unchanged TOASTed value, so unchanged."""
    if read is None or now is None:
        return read is not now
    for column, value in read.items():
        current = now.get(column, _MISSING)
        if current is not _MISSING and current != value:
            return True
    return False


class RowLookup(Protocol):
    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None: ...


_WHY_PRIMARY_KEY = ("a lookup is re-run when its row changes, and changed rows are known by "
                    "primary key")
_PRIMARY_KEY_SQL = (
    "SELECT a.attname::text FROM pg_index i "
    "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.n")


class SqlRowLookup:
    """Reads rows on a psycopg connection (in a worker thread) and records what it read."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self.dependencies: ReadRows = {}
        self._primary_keys: dict[TableName, tuple[str, ...]] = {}

    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None:
        schema, name = split_table(table)
        key_values = tuple(key) if isinstance(key, tuple) else (key,)
        if len(key_values) != len(key_columns):
            raise ValueError(f"key {key!r} does not match key columns {list(key_columns)}")
        # The stream names a changed row by its primary key, in the key's column order.
        pk = self._primary_key(schema, name)
        if not pk:
            raise PublicationError(f"lookup.row({schema}.{name}): the table has no primary "
                                   f"key; {_WHY_PRIMARY_KEY}")
        if sorted(pk) != sorted(key_columns):
            raise PublicationError(
                f"lookup.row({schema}.{name}): key_columns {list(key_columns)} are not the "
                f"table's primary key {list(pk)}; {_WHY_PRIMARY_KEY}")
        by_column = dict(zip(key_columns, key_values, strict=True))
        dependency = (schema, name, tuple(by_column[c] for c in pk))
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
            self.dependencies.setdefault(dependency, None)
            return None
        names = [d.name for d in cursor.description or ()]
        row = dict(zip(names, found, strict=True))
        self.dependencies[dependency] = {**(self.dependencies.get(dependency) or {}), **row}
        return row

    def _primary_key(self, schema: str, name: str) -> tuple[str, ...]:
        pk = self._primary_keys.get((schema, name))
        if pk is None:
            relation = sql.SQL("{}.{}").format(quoted(schema), quoted(name)).as_string(
                self._conn)
            pk = self._primary_keys[(schema, name)] = tuple(
                r[0] for r in self._conn.execute(_PRIMARY_KEY_SQL, (relation,)))
        return pk


class RecentRowChanges:
    """The last delivered transaction that changed each row of the tables lookups read.

    A lookup reads rows under its own snapshot; the watch on them is registered afterwards.
    Was a row it read changed by a transaction its snapshot lacks (delivered while it ran, or
    decoded before it and not yet visible)? Then the function must run again. Asking that of
    the *table* re-ran it for as long as any other row of the table kept changing.

    A row's last change is enough: a transaction that changes a row waits for the one that
    changed it before to be visible (row locks outlive the synchronous-standby wait), so a
    snapshot that sees the last change sees the earlier ones. Rows are logged for tables
    lookups have read (:meth:`follow`), the ``max_rows`` most recently changed.
    """

    def __init__(self, max_rows: int = 16_384) -> None:
        self.max_rows = max_rows
        # row -> (delivery number, xid) of its last change, oldest first
        self._last: OrderedDict[Dependency, tuple[int, int]] = OrderedDict()
        # Logged tables -> the delivery number from which on their changes are all here.
        self._tables: dict[TableName, int] = {}
        self._trimmed = 0  # changes delivered up to this number may have been dropped

    def logs(self) -> dict[TableName, int]:
        """The logged tables (a dict: ``table in`` is the consumer's per-change test)."""
        return self._tables

    def follow(self, table: TableName, delivered: int) -> None:
        """Log ``table``'s changes delivered after number ``delivered`` (if not yet)."""
        self._tables.setdefault(table, delivered)

    def restart(self, table: TableName, delivered: int) -> None:
        """Every row of ``table`` changed at once (TRUNCATE): no row log covers what came
        before delivery ``delivered``."""
        self._tables[table] = delivered

    def record(self, rows: Iterable[Dependency], delivered: int, xid: int) -> None:
        last = self._last
        for row in rows:
            if row in last:
                last.move_to_end(row)
            last[row] = (delivered, xid)
        while len(last) > self.max_rows:
            _, (number, _) = last.popitem(last=False)
            self._trimmed = number

    def covers(self, tables: Iterable[TableName], after: int) -> bool:
        """Is every change to ``tables`` delivered after number ``after`` logged?"""
        if self._trimmed > after:
            return False
        logged = self._tables
        return all(table in logged and logged[table] <= after for table in tables)

    def unseen(self, rows: Iterable[Dependency], snapshot: Snapshot) -> bool:
        """Is one of ``rows``' last changes not in ``snapshot``?"""
        last = self._last
        for row in rows:
            change = last.get(row)
            if change is not None and not snapshot.is_visible(change[1]):
                return True
        return False
