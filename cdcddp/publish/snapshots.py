"""Reading rows under REPEATABLE READ snapshots, in worker threads: a new observer's initial
result and a resync's (several reads sharing one transaction and snapshot, reads of the same
columns of a table combined in one statement), a row fetched by key, and the snapshot, WAL
position and table shape each read comes with."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import psycopg
import trio
from psycopg import sql

from cdcddp.db import DatabaseSetupError, ensure_types, execute_as_decoded, is_transient
from cdcddp.gcpause import LARGE_RESULT_ROWS, gc_paused, promote_young_objects
from cdcddp.publish.definition import BoundCursor, TableName
from cdcddp.publish.filters import COLLATED, ENUM, quoted
from cdcddp.publish.observer import Key, Row, Values
from cdcddp.publish.partitions import Leaf
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Relation
from cdcddp.wal.lsn import SERVER_LSN_SQL, parse_lsn
from cdcddp.wal.pgtypes import BINARY_LOADS_AS_DECODED
from cdcddp.wal.preflight import (
    IDENTITY_INDEX_SQL,
    partitions_of,
    unidentified_partition,
    unidentified_reason,
    unstreamed_partition,
    unstreamed_reason,
)

__all__ = [
    "ReadsInterrupted",
    "SnapshotRead",
    "TableNotStreamed",
    "TableShape",
    "begin_snapshot",
    "catalog_change",
    "check_streamed",
    "current_wal_lsn",
    "describe_shape_change",
    "failed_read_advice",
    "fetch_row",
    "horizon_snapshot",
    "next_batch",
    "read_partitions",
    "row_list",
    "row_query",
    "shape_differs",
    "snapshot_reads",
    "table_columns",
    "table_shapes",
    "text_columns",
]


# The first statement of a REPEATABLE READ transaction takes its snapshot; the WAL insert
# position read in it is past the commit record of every transaction that snapshot sees.
# Primary only, on purpose: a snapshot taken on a standby lists no running transactions in
# pg_current_snapshot() (they are kept as subtransactions, which it leaves out), so it could
# not be matched to the stream; a node that decodes on a standby queries its primary
# (LiveData), and this fails loudly ("recovery is in progress") if that is ever not so.
# It also turns row-level security off for the transaction: the stream shows every row, so
# a read that a policy would filter must fail (loudly: "query would be affected by row-level
# security policy") rather than show fewer rows than the stream then changes.
_SNAPSHOT_SQL: Final = ("SELECT pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text, "
                        "set_config('row_security', 'off', true)")


def _repeatable_read(conn: psycopg.Connection[Any]) -> None:
    """Make the transaction just begun REPEATABLE READ, READ ONLY, unless it already is
    (``Database.run(..., snapshot=True)`` begins it so, saving a round trip)."""
    if conn.isolation_level != psycopg.IsolationLevel.REPEATABLE_READ:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")


def _begin_snapshot(conn: psycopg.Connection[Any]) -> tuple[Snapshot, int]:
    _repeatable_read(conn)
    found = conn.execute(_SNAPSHOT_SQL).fetchone()
    assert found is not None
    return Snapshot.parse(found[0]), parse_lsn(found[1])


T = TypeVar("T")

log = logging.getLogger(__name__)


async def next_batch(queue: trio.MemoryReceiveChannel[T], most: int) -> list[T]:
    """The next queued item and all those already waiting behind it, up to ``most``: work
    queued while a batch ran goes together in the next one (one transaction for many)."""
    batch = [await queue.receive()]
    while len(batch) < most:
        try:
            batch.append(queue.receive_nowait())
        except trio.WouldBlock:
            break
    return batch


def begin_snapshot(conn: psycopg.Connection[Any]) -> Snapshot:
    """Begin a REPEATABLE READ transaction on ``conn`` (this must be its first statement);
    returns its snapshot."""
    return _begin_snapshot(conn)[0]


# A table's columns: (name, type oid, varlena, type modifier, how it compares with text),
# NULL when the table is gone. (Collation 100: the database's default, deterministic.)
_COLUMN_ARRAY: Final = (
    "array_agg(array[a.attname::text, a.atttypid::text, (a.attlen < 0)::text, "
    "a.atttypmod::text, CASE "
    "WHEN (SELECT CASE t.typtype WHEN 'd' THEN (SELECT b.typtype FROM pg_type b "
    "WHERE b.oid = t.typbasetype) ELSE t.typtype END FROM pg_type t WHERE t.oid = a.atttypid)"
    f" = 'e' THEN '{ENUM}' "  # (an enum, or a domain over one)
    "WHEN a.attcollation NOT IN (0, 100) AND NOT (SELECT collisdeterministic "
    f"FROM pg_collation WHERE oid = a.attcollation) THEN '{COLLATED}' ELSE '' END])")
_TABLE_COLUMNS_SQL: Final = (
    f"SELECT {_COLUMN_ARRAY} "
    "FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped")

# The snapshot statement plus the table's columns as of that snapshot (read in the same
# statement, so without another round trip): what the rows are expected to look like in the
# stream.
_SNAPSHOT_SHAPE_SQL: Final = f"{_SNAPSHOT_SQL}, ({_TABLE_COLUMNS_SQL})"

# column -> (type oid, varlena: may be TOASTed, type modifier: numeric(10,2)'s precision...,
# how it compares with text if not as its own type: filters.COLLATED, filters.ENUM or "")
TableShape = dict[str, tuple[int, bool, int, str]]


def text_columns(shape: TableShape | None) -> dict[str, str]:
    """The columns a filter compares with text otherwise than as their own type (see
    :mod:`cdcddp.publish.filters`), and how."""
    return {name: column[3] for name, column in (shape or {}).items() if column[3]}


def row_list(rows: Iterable[Values], snapshot: Snapshot, lsn: int) -> list[Values]:
    taken = list(rows)
    if len(taken) >= LARGE_RESULT_ROWS:
        promote_young_objects()  # kept by the observer they are for
    return taken


# Rows per chunk of a snapshot read: the server sends the next chunks while we load these.
_SNAPSHOT_CHUNK_ROWS: Final = 2_000
_STREAM_CHUNKED: Final = psycopg.capabilities.has_stream_chunked()  # libpq 17 or later


def _table_shape(columns: Iterable[tuple[str, str, str, str, str]] | None) -> TableShape:
    return {name: (int(oid), varlena == "true", int(typmod), as_text)
            for name, oid, varlena, typmod, as_text in columns or ()}


def _result_cursor(conn: psycopg.Connection[Any], bound: BoundCursor, shape: TableShape
                   ) -> psycopg.Cursor[Any]:
    """A cursor for ``bound``'s snapshot rows, loading them as the stream decodes them."""
    # A column of a type created since the type catalog was loaded: reload it first, so the
    # rows load as the stream decodes them.
    ensure_types(conn, [shape[column][0] for column in bound.columns if column in shape])
    # Binary results parse faster (a large snapshot reads about a third faster), where they
    # give the values the stream decodes.
    binary = all(shape.get(column, (0,))[0] in BINARY_LOADS_AS_DECODED
                 for column in bound.columns)
    return conn.cursor(binary=binary)


@contextmanager
def _result_rows(cursor: psycopg.Cursor[Any], query: sql.Composed, params: list[Any]
                 ) -> Iterator[Iterable[Values]]:
    """The query's rows as they arrive, in chunks where libpq can (so loading them overlaps
    the server's reading and sending them)."""
    if not _STREAM_CHUNKED:
        yield cursor.execute(query, params).fetchall()
        return
    stream = cursor.stream(query, params, size=_SNAPSHOT_CHUNK_ROWS)
    try:
        yield stream
    finally:
        # Rows not taken (a take that failed midway): cancel and drain the query here, or
        # the rollback that follows waits on it forever.
        stream.close()


def _read_rows(conn: psycopg.Connection[Any], bound: BoundCursor, shape: TableShape,
               take: Callable[[Iterable[Values], Snapshot, int], T],
               snapshot: Snapshot, lsn: int) -> T:
    """``take(rows, snapshot, lsn)`` of the cursor's rows (values tuples in the order the
    query selects the bound cursor's ``columns``, as the observer keeps them), read in the
    transaction under way (whose snapshot, WAL position and table shape are given).
    ``take`` gets the rows as they arrive."""
    cursor = _result_cursor(conn, bound, shape)
    query, params = bound.snapshot_query(shape=shape, text_columns=text_columns(shape))
    with _result_rows(cursor, query, params) as rows, gc_paused():  # (see cdcddp.gcpause)
        return take(rows, snapshot, lsn)


def _read_together(conn: psycopg.Connection[Any], reads: Sequence[SnapshotRead],
                   shape: TableShape, snapshot: Snapshot, lsn: int) -> None:
    """Reads of the same columns of one table, in one statement: their queries joined by
    UNION ALL, each row tagged with its read's place. A round trip and a statement cost far
    more than a small result (about a tenth of the CPU per read, for the one or two rows
    of a typical subscription). A failure in PostgreSQL fails the statement, so it raises;
    a take that fails fails its own read."""
    queries = []
    params: list[Any] = []
    compared_as_text = text_columns(shape)
    for tag, read in enumerate(reads):
        query, read_params = read.bound.snapshot_query(tag, shape, compared_as_text)
        queries.append(sql.SQL("({})").format(query))
        params += read_params
    rows_of: list[list[Values]] = [[] for _ in reads]
    cursor = _result_cursor(conn, reads[0].bound, shape)
    with _result_rows(cursor, sql.SQL(" UNION ALL ").join(queries), params) as rows, \
            gc_paused():
        for row in rows:
            rows_of[row[0]].append(row[1:])
    for read, rows in zip(reads, rows_of, strict=True):
        try:
            with gc_paused():
                read.result = read.take(rows, snapshot, lsn)
            read.shape = shape
        except Exception as exc:
            read.error = exc


@dataclass(eq=False, slots=True)
class SnapshotRead:
    """One cursor's rows to read under a snapshot shared with others read at the same time
    (see :func:`snapshot_reads`): ``take(rows, snapshot, lsn)`` gives ``result``.

    ``must_see``: how many of the stream's delivered transactions the snapshot must see (a new
    observer's pin: those delivered after it are replayed from the ring); None: all those
    delivered when the read starts (a resync: nothing replays anything to it)."""

    bound: BoundCursor
    take: Callable[[Iterable[Values], Snapshot, int], Any]
    must_see: int | None = None
    result: Any = None
    snapshot: Snapshot | None = None
    lsn: int = 0
    shape: TableShape | None = None
    error: BaseException | None = None
    finished: trio.Event = field(default_factory=trio.Event)


class ReadsInterrupted(Exception):
    """A read failed in PostgreSQL, which ends its transaction: the reads without an error
    are to be read again in a new one (``together``: reads combined in one statement
    failed, and which one it was is unknown: read them one by one)."""

    def __init__(self, together: bool = False) -> None:
        super().__init__()
        self.together = together


def snapshot_reads(conn: psycopg.Connection[Any], reads: Sequence[SnapshotRead],
                    together: bool = True) -> tuple[Snapshot | None, int]:
    """Every read's rows in this one REPEATABLE READ transaction (one snapshot, each table's
    shape read once), and that snapshot and its WAL position (None: every read failed before
    it was taken); a read that fails gets its error and the others go on, unless the
    transaction failed (:class:`ReadsInterrupted`). With ``together``, reads of the same
    columns of a table are read in one statement (:func:`_read_together`).

    Subscriptions that start together (clients reconnecting after a restart) then cost one
    transaction, snapshot statement and thread hand-off per batch instead of each, and a
    statement per table and column list."""
    _repeatable_read(conn)
    snapshot: Snapshot | None = None
    lsn = 0
    shapes: dict[TableName, TableShape] = {}
    groups: dict[Hashable, list[SnapshotRead]] = {}
    for read in reads:
        read.result = read.error = None  # (run again after a transient error: see Database.run)
        table = read.bound.table
        try:
            shape = shapes.get(table)
            if shape is None:
                if snapshot is None:
                    found = conn.execute(_SNAPSHOT_SHAPE_SQL, table).fetchone()
                    assert found is not None
                    snapshot, lsn = Snapshot.parse(found[0]), parse_lsn(found[1])
                    columns = found[-1]
                else:
                    found = conn.execute(_TABLE_COLUMNS_SQL, table).fetchone()
                    assert found is not None
                    columns = found[0]
                shapes[table] = _table_shape(columns)
        except Exception as exc:
            if is_transient(exc):
                raise  # (Database.run reads them all again)
            read.error = exc
            if _transaction_failed(conn):
                raise ReadsInterrupted from exc
            continue
        groups.setdefault((table, read.bound.columns) if together else read, []).append(read)
    for group in groups.values():
        assert snapshot is not None
        shape = shapes[group[0].bound.table]
        if len(group) > 1:
            try:
                _read_together(conn, group, shape, snapshot, lsn)
                continue
            except Exception as exc:
                if is_transient(exc):
                    raise
                if _transaction_failed(conn):
                    raise ReadsInterrupted(together=True) from exc
                # Failed in Python before any take (a value that does not load, say), and
                # whose it is is unknown: one by one, in this transaction.
        for read in group:
            try:
                read.result = _read_rows(conn, read.bound, shape, read.take, snapshot, lsn)
                read.shape = shape
            except Exception as exc:
                if is_transient(exc):
                    raise
                read.error = exc
                if _transaction_failed(conn):
                    raise ReadsInterrupted from exc
    return snapshot, lsn


def _transaction_failed(conn: psycopg.Connection[Any]) -> bool:
    """An error ended the transaction (PostgreSQL's, or the connection's)."""
    return conn.info.transaction_status != psycopg.pq.TransactionStatus.INTRANS


class TableNotStreamed(DatabaseSetupError):
    """A published relation whose changes never reach the stream (see
    :func:`cdcddp.wal.preflight.unstreamed_reason`): its snapshot would never change."""


_RELATION_KINDS_SQL: Final = (
    "SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text, "
    f"c.relreplident::text, {IDENTITY_INDEX_SQL} "
    "FROM unnest(%s::text[], %s::text[]) AS r(nspname, relname) "
    "JOIN pg_namespace n ON n.nspname = r.nspname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.relname")


def _unstreamed_reasons(conn: psycopg.Connection[Any], tables: Sequence[TableName]
                        ) -> dict[TableName, str | None]:
    """For each of ``tables`` that exists, why its changes (or its UPDATEs and DELETEs:
    no replica identity) are not streamed (None: they are)."""
    rows = conn.execute(_RELATION_KINDS_SQL, ([t[0] for t in tables], [t[1] for t in tables]))
    return {(schema, name): unstreamed_reason(f"{schema}.{name}", relkind, persistence)
            or (unidentified_reason(f"{schema}.{name}", identity, has_index)
                if relkind == "r" else None)
            for schema, name, relkind, persistence, identity, has_index in rows}


def check_streamed(conn: psycopg.Connection[Any], table: TableName
                   ) -> frozenset[Leaf] | None:
    """Raise :class:`TableNotStreamed` when no change to ``table`` is ever streamed (a
    missing table is left to the snapshot query to report). Its partitions' (or inheritance
    children's) changes are its too, under their names: returns them (None for a missing
    table)."""
    trees, unstreamed = read_partitions(conn, [table])
    if table in unstreamed:
        raise TableNotStreamed(unstreamed[table])
    return trees.get(table)


def read_partitions(conn: psycopg.Connection[Any], tables: Sequence[TableName]
                    ) -> tuple[dict[TableName, frozenset[Leaf]], dict[TableName, str]]:
    """The partitions with rows of each of ``tables`` that exists (or inheritance children:
    see :func:`cdcddp.wal.preflight.partitions_of`), and why the changes of those whose
    changes (or UPDATEs and DELETEs) are not all streamed are not: one of them is an
    UNLOGGED, foreign or unidentified table, or a partition or child of theirs is."""
    own = _unstreamed_reasons(conn, tables)
    found = {table: leaves for table, leaves in partitions_of(conn, tables).items()
             if table in own}
    unstreamed = {table: reason for table, leaves in found.items()
                  if (reason := own[table]
                      or unstreamed_partition(f"{table[0]}.{table[1]}", leaves)
                      or unidentified_partition(f"{table[0]}.{table[1]}", leaves))}
    return ({table: frozenset((leaf.schema, leaf.table, leaf.oid) for leaf in leaves)
             for table, leaves in found.items()}, unstreamed)


# Of these partitions, those with no page (no row written since the table was made, or
# TRUNCATEd: the engine also asks whether the stream showed one) and that kept their names
# since they became partitions: neither their table's pg_class row nor their schema's is
# newer than their pg_inherits rows (xmin ages: older is larger). A rename writes the row
# anew; ATTACH writes the partition's row too, in the transaction that makes its
# pg_inherits row.
_QUIET_PARTITIONS_SQL: Final = (
    "SELECT c.oid::int8 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = ANY(%s::oid[]) AND pg_relation_size(c.oid) = 0 "
    "AND EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid) "
    "AND NOT EXISTS (SELECT 1 FROM pg_inherits i WHERE i.inhrelid = c.oid "
    "AND (age(i.xmin) > age(c.xmin) OR age(i.xmin) > age(n.xmin)))")


def quiet_partitions(conn: psycopg.Connection[Any], oids: Iterable[int]) -> frozenset[int]:
    """Of these partitions' oids, those that never held a row and kept their names since
    they became partitions (so every change to their rows since is streamed under the name
    the catalog shows): see :meth:`LiveData._follow_partitions_due`. A partition locked
    by someone's DDL counts as not quiet rather than hold the catalog poll up."""
    try:
        with conn.transaction():  # (a savepoint: a lock timeout leaves the rest usable)
            conn.execute("SET LOCAL lock_timeout = '200ms'")  # (pg_relation_size locks)
            rows = conn.execute(_QUIET_PARTITIONS_SQL, (list(oids),)).fetchall()
    except psycopg.errors.LockNotAvailable:
        return frozenset()
    return frozenset(oid for (oid,) in rows)


def failed_read_advice(exc: BaseException) -> str | None:
    """What an operator should change when PostgreSQL refused a read of a published table
    to the server's role, found no such table or column, or no operator for a filter's
    comparison (None: another error)."""
    if isinstance(exc, (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn)):
        return ("the publication's cursor names what the database lacks: fix the cursor or "
                "the schema (cdcddp check lists such problems)")
    if isinstance(exc, psycopg.errors.UndefinedFunction):  # ("operator does not exist")
        return ("the publication's filter compares a column with a value of another type: "
                "give the parameter that type in the publication's params model (UUID for a "
                "uuid column, datetime for a timestamp, int for an integer) or compare with "
                "a literal of it")
    if not isinstance(exc, psycopg.errors.InsufficientPrivilege):
        return None
    if exc.diag.source_function == "check_enable_rls":  # (not translated, unlike the message)
        return ("the server's database role is subject to the table's row-level security, "
                "so a snapshot would lack rows the stream shows: give it BYPASSRLS (ALTER "
                "ROLE ... BYPASSRLS) or make it the table's owner without FORCE ROW LEVEL "
                "SECURITY")
    return ("grant the server's database role what the message names (SELECT on the table, "
            "USAGE on its schema)")


def shape_differs(expected: TableShape | None, relation: Relation,
                  columns: Iterable[str]) -> bool:
    """Does the stream's shape of a table contradict what an observer's snapshot saw of the
    ``columns`` it reads (key, published, filter and sort columns)? The table's other columns
    (added, dropped, retyped by a migration) change nothing it publishes or decides."""
    if expected is None:
        return False
    seen = dict(relation.columns)
    for name in columns:
        known = expected.get(name)
        oid = seen.get(name)
        if known is None:
            return True  # its snapshot read no such column: take no chances
        if oid is None:
            # The stream lacks it: dropped or renamed — unless the shape came from an UPDATE
            # and it may be an unchanged TOASTed value left out.
            if relation.complete or not known[1]:
                return True
        elif oid != known[0]:
            return True  # another type
    return False


def describe_shape_change(relation: Relation) -> str:
    before = dict(relation.previous or ())
    after = dict(relation.columns)
    parts = [f"{n} added" for n in after if n not in before]
    parts += [f"{n} gone" for n in before if n not in after]
    parts += [f"{n} type oid {before[n]} -> {after[n]}" for n in after
              if n in before and before[n] != after[n]]
    if not parts and relation.absent:
        parts = [f"{n} not in an UPDATE" for n in relation.absent]
    return ", ".join(parts) or "columns differ from the snapshot"


_TABLES_COLUMNS_SQL: Final = (
    f"SELECT r.nspname, r.relname, {_COLUMN_ARRAY} "
    "FROM unnest(%s::text[], %s::text[]) AS r(nspname, relname) "
    "JOIN pg_namespace n ON n.nspname = r.nspname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.relname "
    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
    "GROUP BY r.nspname, r.relname")


def table_shapes(conn: psycopg.Connection[Any], tables: Sequence[TableName]
                 ) -> dict[TableName, TableShape]:
    """The shapes of ``tables`` now (a table that is gone has none)."""
    rows = conn.execute(_TABLES_COLUMNS_SQL, ([t[0] for t in tables], [t[1] for t in tables]))
    return {(schema, name): _table_shape(columns) for schema, name, columns in rows}


def catalog_change(expected: TableShape | None, current: TableShape, columns: Iterable[str]
                   ) -> str | None:
    """How the catalog's shape of a table contradicts what an observer's snapshot saw of the
    ``columns`` it reads, if it does. Unlike the stream's it shows type modifiers (a column
    made numeric(10,0) from numeric(10,2) has its values rounded, with no row change in the
    stream), and a change to a table nobody writes. (A collation changes nothing a filter
    decides: text compares by code point, see :mod:`cdcddp.publish.filters`.)"""
    if expected is None:
        return None
    parts = []
    for name in columns:
        known, now = expected.get(name), current.get(name)
        if now is None:
            parts.append(f"{name} gone")
        elif known is None or known[0] != now[0]:
            parts.append(f"{name} type oid {known and known[0]} -> {now[0]}")
        elif known[2] != now[2]:
            parts.append(f"{name} type modifier {known[2]} -> {now[2]}")
    return ", ".join(parts) or None


def table_columns(conn: psycopg.Connection[Any], table: TableName) -> set[str]:
    """The table's columns now (empty when it is gone)."""
    found = conn.execute(_TABLE_COLUMNS_SQL, table).fetchone()
    return set(_table_shape(found[0] if found else None))


def current_wal_lsn(conn: psycopg.Connection[Any]) -> int:
    found = conn.execute(f"SELECT {SERVER_LSN_SQL}::text").fetchone()
    assert found is not None
    return parse_lsn(found[0])


# A snapshot; whether a transaction it lists as running is committed in the commit log
# already (about to become visible); and the transactions whose sessions wait for a
# synchronous standby to confirm their written commit (visible once one does: if the
# snapshot lacks them, they are running for it, in its xip or at or past its xmax). Other
# roles' sessions are seen by a superuser or a member of pg_read_all_stats only.
_HORIZON_SQL: Final = (
    "SELECT pg_current_snapshot()::text, EXISTS (SELECT FROM "
    "pg_snapshot_xip(pg_current_snapshot()) x WHERE pg_xact_status(x) <> 'in progress'), "
    "ARRAY(SELECT backend_xid::text::bigint FROM pg_stat_activity "
    "WHERE wait_event = 'SyncRep' AND backend_xid IS NOT NULL)")


def horizon_snapshot(conn: psycopg.Connection[Any], timeout: float = 5.0) -> Snapshot:
    """A snapshot that sees every transaction whose commit was already written: retaken
    while it lacks one (see ``_HORIZON_SQL``), for ``timeout`` seconds at most (then with a
    warning: a commit stays invisible as long as its synchronous standby does not answer).
    Blocking: run it in a worker thread."""
    deadline = time.monotonic() + timeout
    # Every transaction once seen waiting: released, its session stops waiting a moment
    # before the transaction becomes visible, and a poll in between would miss it.
    written: set[int] = set()
    while True:
        found = conn.execute(_HORIZON_SQL).fetchone()
        assert found is not None
        snapshot = Snapshot.parse(found[0])
        written.update(found[2])
        if not found[1] and all(snapshot.is_visible(xid) for xid in written):
            return snapshot
        if time.monotonic() > deadline:
            log.warning(
                "transactions committed before a replication stream gap are still not "
                "visible after %.0f s (a synchronous standby not answering?); rows they "
                "changed reach clients with those rows' next change", timeout)
            return snapshot
        time.sleep(0.002)


def fetch_row(conn: psycopg.Connection[Any], query: sql.Composable, key: Key,
               columns: tuple[str, ...]) -> tuple[Row | None, Snapshot, int]:
    snapshot, lsn = _begin_snapshot(conn)
    found = execute_as_decoded(conn, query, list(key)).fetchone()
    return (None if found is None else dict(zip(columns, found, strict=True))), snapshot, lsn


def row_query(bound: BoundCursor) -> sql.Composed:
    cursor = bound.cursor
    where = sql.SQL(" AND ").join(
        sql.SQL("{} = %s").format(quoted(c)) for c in cursor.key_columns)
    return sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
        sql.SQL(", ").join(map(quoted, bound.columns)),
        quoted(cursor.schema_name), quoted(cursor.table_name), where)


