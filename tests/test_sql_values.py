"""SQL reads (snapshots, row fetches, lookups) give exactly the values the stream decodes.

Every case of ``tests.test_wal_decode.CASES`` is written to a database while a real
replication stream (``open_stream``, which loads its own type catalog) runs; the values it
decodes are compared with what the real ``snapshot_reads``, ``fetch_row`` and
``SqlRowLookup.row`` read on connections made as ``Database`` makes them. Also: types created
after the stream and the pool loaded their catalogs, and subscriptions end to end.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import trio
from psycopg.pq import Format

from cdcddp.app import App
from cdcddp.client import connect as ddp_connect
from cdcddp.db import (
    _PSYCOPG_TEXT_LOADED,
    SQL_LOADERS_DIFFER,
    Database,
    connect,
    register_loaders,
)
from cdcddp.devcluster import LocalCluster
from cdcddp.publish import snapshots
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.filters import C, Param
from cdcddp.publish.lookup import SqlRowLookup
from cdcddp.publish.snapshots import (
    SnapshotRead,
    fetch_row,
    row_list,
    row_query,
    snapshot_reads,
)
from cdcddp.wal import pgtypes
from cdcddp.wal.events import Insert, Update
from cdcddp.wal.pgtypes import SharedCatalog, TypeCatalog
from cdcddp.wal.stream import ReplicationStream, open_stream
from tests.livedata_support import asql, live_server, store, wait_store
from tests.pg_support import sql
from tests.test_wal_decode import CASES, SCHEMA, TYPE_TABLES

# wal2json 2.5 prints NaN numeric/float8 as JSON null: the one known, unfixable difference.
NAN_CASES = {i for i, (sql_type, literal, _) in enumerate(CASES)
             if literal == "'NaN'" and sql_type in ("numeric", "float8")}

_slots = itertools.count(1)

Values = dict[tuple[str, int], Any]  # (table, id) -> decoded value of column v


def _slot() -> str:
    return f"sqlv_{os.getpid()}_{next(_slots)}"


async def _stream_values(dsn: str, write: Callable[[], None], expected: int,
                         types: SharedCatalog | None = None, **options: Any
                         ) -> tuple[Values, ReplicationStream]:
    """Open a stream, run ``write`` (blocking), collect the ``v`` of the first ``expected``
    inserted/updated rows of tables with a ``v`` column."""
    values: Values = {}
    async with open_stream(dsn, _slot(), temporary=True, type_catalog=types,
                           **options) as stream:
        await trio.to_thread.run_sync(write)
        with trio.fail_after(30):
            async for event in stream:
                if isinstance(event, Insert | Update) and "v" in event.new:
                    values[(event.table, event.new["id"])] = event.new["v"]
                    if len(values) == expected:
                        break
    return values, stream


@pytest.fixture(scope="module")
def typed_dsn(pg_cluster: LocalCluster) -> Iterator[str]:
    """A database with the typed tables of ``CASES`` (empty)."""
    dbname = "sql_values"
    sql(pg_cluster.dsn(), f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)',
        f'CREATE DATABASE "{dbname}"')
    dsn = pg_cluster.dsn(dbname)
    sql(dsn, SCHEMA, *(f"CREATE TABLE {table} (id int PRIMARY KEY, v {sql_type})"
                       for sql_type, table in TYPE_TABLES.items()))
    try:
        yield dsn
    finally:
        sql(pg_cluster.dsn(), "SELECT pg_terminate_backend(active_pid) FROM "
            "pg_replication_slots WHERE database = %s AND active_pid IS NOT NULL",
            params=(dbname,))
        sql(pg_cluster.dsn(), f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="module")
def streamed(typed_dsn: str) -> tuple[Values, SharedCatalog]:
    """Every case written, and what a real stream decoded of it (with the catalog it loads)."""
    def write() -> None:
        sql(typed_dsn, *(f"INSERT INTO {TYPE_TABLES[sql_type]} VALUES ({index}, {literal})"
                         for index, (sql_type, literal, _) in enumerate(CASES)))

    async def run() -> tuple[Values, SharedCatalog]:
        values, stream = await _stream_values(typed_dsn, write, len(CASES))
        return values, stream.types

    return trio.run(run)  # module scoped: outside the tests' own trio runs


def _snapshot_rows(conn: psycopg.Connection[Any], bound: Any) -> list[Any]:
    """The rows a snapshot read gives (in the transaction under way)."""
    read = SnapshotRead(bound, row_list)
    snapshot_reads(conn, [read])
    if read.error is not None:
        raise read.error
    return read.result  # type: ignore[no-any-return]


def _sql_reads(conn: psycopg.Connection[Any], table: str, row_id: int) -> dict[str, Any]:
    """Column ``v`` of one row, read by each of the server's SQL paths."""
    bound = Cursor(table, fields=["v"]).bind()
    reads: dict[str, Any] = {}
    with conn.transaction():
        rows = _snapshot_rows(conn, bound)
    by_id = {row[bound.columns.index("id")]: row for row in rows}
    reads["snapshot"] = by_id[row_id][bound.columns.index("v")]
    with conn.transaction():
        row, _, _ = fetch_row(conn, row_query(bound), (row_id,), bound.columns)
    assert row is not None
    reads["fetch"] = row["v"]
    with conn.transaction():
        found = SqlRowLookup(conn).row(table, row_id, columns=["v"])
    assert found is not None
    reads["lookup"] = found["v"]
    return reads


async def test_every_case_reads_as_the_stream_decodes(
        typed_dsn: str, streamed: tuple[Values, SharedCatalog]) -> None:
    stream_values, stream_types = streamed
    assert len(stream_types.catalog) > 0
    mismatches = []
    # A pool of its own: it loads its catalog itself.
    with connect(typed_dsn, SharedCatalog()) as conn:
        for index, (sql_type, literal, expected) in enumerate(CASES):
            table = TYPE_TABLES[sql_type]
            decoded = stream_values[(table, index)]
            if index not in NAN_CASES:
                assert repr(decoded) == repr(expected), (sql_type, literal)
            for path, value in _sql_reads(conn, table, index).items():
                if repr(value) != repr(decoded):
                    mismatches.append((sql_type, literal[:30], path, repr(value)[:50]))
    nan = [(CASES[i][0], CASES[i][1], path) for i in sorted(NAN_CASES)
           for path in ("snapshot", "fetch", "lookup")]
    assert [m[:3] for m in mismatches] == nan  # only the NaN cases


def test_plain_psycopg_differs_where_loaders_are_registered(typed_dsn: str) -> None:
    """The registered loaders are needed: psycopg's defaults fail or differ on the cases
    of those types (and the types psycopg already agrees on keep psycopg's loaders)."""
    differing = set()
    with psycopg.connect(typed_dsn, autocommit=True) as conn:
        catalog = TypeCatalog.from_rows(conn.execute(pgtypes.TYPE_CATALOG_SQL).fetchall())
        oids = dict(conn.execute(
            "SELECT attrelid::regclass::text, atttypid::int FROM pg_attribute "
            "WHERE attname = 'v' AND attrelid::regclass::text LIKE 'typed\\_%'").fetchall())
        for index, (sql_type, literal, expected) in enumerate(CASES):
            if index in NAN_CASES:
                continue
            try:
                value = conn.execute(f"SELECT ({literal})::{sql_type}").fetchone()[0]  # type: ignore[index]
            except psycopg.DataError:
                value = psycopg.DataError
            if repr(value) != repr(expected):
                oid = oids[TYPE_TABLES[sql_type]]
                while (entry := catalog.get(oid)) is not None and entry.kind == "d":
                    oid = entry.base  # results name a domain's base type
                differing.add(oid)
    resolved = {oid for oid in differing if oid >= pgtypes.FIRST_USER_OID}
    builtin = differing - resolved
    assert builtin <= SQL_LOADERS_DIFFER
    assert {1082, 1114, 1184, 1083, 1266, 869, 650, 3904, 5069, 22, 1185, 1182} <= builtin
    for oid in resolved:  # user arrays: loaded from the catalog
        entry = catalog.get(oid)
        assert entry is not None and entry.element, oid
    # Types psycopg agrees on keep its (C) loaders.
    adapters = psycopg.adapters
    kept = psycopg.adapters.__class__(adapters)
    register_loaders(kept, catalog)
    for oid in (16, 20, 21, 23, 25, 700, 701, 1700, 2950, 17, 114, 3802, 1007, 1009):
        assert kept.get_loader(oid, Format.TEXT) is adapters.get_loader(oid, Format.TEXT)
        assert oid in _PSYCOPG_TEXT_LOADED and oid not in SQL_LOADERS_DIFFER


async def test_types_created_after_startup_decode_as_snapshots_read_them(db_dsn: str) -> None:
    """A domain, an enum and its array created while the stream and the pool run (their
    catalogs already loaded): the stream reloads its catalog and decodes the same values a
    snapshot reads."""
    shared = SharedCatalog()
    database = Database(db_dsn, size=1, types=shared)
    try:
        await database.fetchall("SELECT 1")  # the pool's catalog is loaded now
        loaded_version = shared.version

        def write() -> None:
            sql(db_dsn,
                "CREATE TYPE late_mood AS ENUM ('meh', 'yay')",
                "CREATE DOMAIN late_pos AS int CHECK (VALUE > 0)",
                "CREATE DOMAIN late_stamp AS timestamptz",
                "CREATE TABLE late_a (id int PRIMARY KEY, v late_mood[])",
                "CREATE TABLE late_b (id int PRIMARY KEY, v late_pos)",
                "CREATE TABLE late_c (id int PRIMARY KEY, v late_stamp[])",
                "INSERT INTO late_a VALUES (1, '{yay,NULL,meh}')",
                "INSERT INTO late_b VALUES (1, 5)",
                "INSERT INTO late_c VALUES (1, '{infinity}')")

        values, stream = await _stream_values(db_dsn, write, 3, types=shared)
        assert stream.type_reloads >= 1
        assert values == {("late_a", 1): ["yay", None, "meh"], ("late_b", 1): 5,
                          ("late_c", 1): [datetime.max.replace(tzinfo=UTC)]}
        for table in ("late_a", "late_b", "late_c"):
            bound = Cursor(table, fields=["v"]).bind()
            rows = await database.run(_snapshot_rows, bound)
            assert repr(rows[0][bound.columns.index("v")]) == repr(values[(table, 1)])
        assert shared.version > loaded_version
    finally:
        database.close()


async def test_sql_reads_reload_the_catalog_for_a_new_type(db_dsn: str) -> None:
    """A snapshot, a fetch and a lookup meeting a type the pool's catalog lacks (no stream
    reloaded it) load it first."""
    for number, path in enumerate(("snapshot", "fetch", "lookup")):
        database = Database(db_dsn, size=1)
        try:
            await database.fetchall("SELECT 1")
            table = f"later_{number}"
            await asql(db_dsn, f"CREATE TYPE {table}_t AS ENUM ('x', 'y')",
                       f"CREATE TABLE {table} (id int PRIMARY KEY, v {table}_t[])",
                       f"INSERT INTO {table} VALUES (1, '{{y,x}}')")
            conn = await trio.to_thread.run_sync(database.checkout)
            try:
                reads = await trio.to_thread.run_sync(_sql_reads, conn, table, 1)
            finally:
                database.checkin(conn)
            assert reads[path] == ["y", "x"]
        finally:
            database.close()


async def test_a_new_type_oid_never_stops_the_stream(db_dsn: str) -> None:
    """A type gone by the time the stream reloads its catalog decodes as text."""
    def write() -> None:
        # One transaction: the stream meets the row only once its types are gone (else a
        # catalog reload racing the drops may still find them).
        sql(db_dsn, "BEGIN", "CREATE TYPE gone AS ENUM ('a')",
            "CREATE DOMAIN gone_d AS int",
            "CREATE TABLE t_gone (id int PRIMARY KEY, v gone_d, w gone[])",
            "INSERT INTO t_gone VALUES (1, 4, '{a}')",
            "DROP TABLE t_gone", "DROP DOMAIN gone_d", "DROP TYPE gone",
            "CREATE TABLE t_after (id int PRIMARY KEY, v int)",
            "INSERT INTO t_after VALUES (2, 7)", "COMMIT")

    values, stream = await _stream_values(db_dsn, write, 2)
    assert values == {("t_gone", 1): "4", ("t_after", 2): 7}
    assert stream.decode_errors == 0


# ---- subscriptions end to end ---------------------------------------------------------------

VALUES_SCHEMA = """
CREATE TABLE stamps (id serial PRIMARY KEY, at timestamptz, note text);
"""


def _values_app() -> App:
    app = App("sql-values")
    app.add_publication(Publication("stamps", Cursor("stamps", fields=["at", "note"])))
    app.add_publication(Publication("moods", Cursor("moods", fields=["v", "w", "note"])))
    return app


@pytest.fixture
async def values_server(db_dsn: str) -> AsyncIterator[Any]:
    async with live_server(db_dsn, _values_app(), schema=VALUES_SCHEMA) as server:
        yield server


async def test_an_infinity_timestamptz_can_be_subscribed_to(db_dsn: str, values_server: Any
                                                             ) -> None:
    await asql(db_dsn, "INSERT INTO stamps (at, note) VALUES ('infinity', 'forever'), "
                       "('2024-01-01 00:00:00+00', 'then')")
    async with ddp_connect(values_server.ws_url, log_messages=True) as client:
        await client.subscribe("stamps")  # ready: the snapshot did not fail
        got = store(client, "stamps")
        assert {doc["note"] for doc in got.values()} == {"forever", "then"}
        assert got["1"]["at"] is not None
        # A change to another column is just that change (the stream decodes `at` alike).
        mark = len(client.messages or [])
        await asql(db_dsn, "UPDATE stamps SET note = 'still forever' WHERE id = 1")
        await wait_store(client, {**got, "1": {**got["1"], "note": "still forever"}}, "stamps")
        await values_server.live.sync()
        changed = [m for m in (client.messages or [])[mark:] if m.get("msg") == "changed"]
        assert changed == [{"msg": "changed", "collection": "stamps", "id": "1",
                            "fields": {"note": "still forever"}}]


async def test_types_created_after_the_server_started_publish_alike(
        db_dsn: str, values_server: Any) -> None:
    await asql(db_dsn, "CREATE TYPE feel AS ENUM ('sad', 'happy')",
               "CREATE DOMAIN pos AS int CHECK (VALUE > 0)",
               "CREATE TABLE moods (id serial PRIMARY KEY, v feel[], w pos, note text)",
               "INSERT INTO moods (v, w, note) VALUES ('{happy,NULL}', 3, 'one')")
    async with ddp_connect(values_server.ws_url, log_messages=True) as client:
        await client.subscribe("moods")
        snapshot_doc = {"v": ["happy", None], "w": 3, "note": "one"}
        assert store(client, "moods") == {"1": snapshot_doc}
        mark = len(client.messages or [])
        await asql(db_dsn, "UPDATE moods SET note = 'two' WHERE id = 1",
                   "INSERT INTO moods (v, w, note) VALUES ('{sad}', 4, 'new')")
        await wait_store(client, {"1": {**snapshot_doc, "note": "two"},
                                  "2": {"v": ["sad"], "w": 4, "note": "new"}}, "moods")
        await values_server.live.sync()
        data = [m for m in (client.messages or [])[mark:] if m.get("msg") in
                ("added", "changed")]
        assert data == [
            {"msg": "changed", "collection": "moods", "id": "1", "fields": {"note": "two"}},
            {"msg": "added", "collection": "moods", "id": "2",
             "fields": {"v": ["sad"], "w": 4, "note": "new"}}]


@pytest.mark.parametrize("chunked", [True, False])
def test_snapshot_rows_arrive_whole_in_chunks_or_at_once(db_dsn: str, chunked: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot rows stream in chunks where libpq can (libpq 17+), else come in one result;
    either way ``take`` sees every row once, in query order, under the snapshot it is given."""
    if chunked and not snapshots._STREAM_CHUNKED:
        pytest.skip("this libpq cannot stream in chunks")
    monkeypatch.setattr(snapshots, "_STREAM_CHUNKED", chunked)
    count = snapshots._SNAPSHOT_CHUNK_ROWS * 2 + 7  # more than one chunk, and a partial one
    sql(db_dsn, "CREATE TABLE many (id int PRIMARY KEY, v text)",
        f"INSERT INTO many SELECT g, 'v' || g FROM generate_series(1, {count}) g")
    bound = Cursor("many", fields=["v"]).bind()
    seen: list[Any] = []

    def take(rows: Any, snapshot: Any, lsn: int) -> int:
        assert snapshot.is_visible(snapshot.xmin - 1) and lsn > 0
        seen.extend(rows)
        return len(seen)

    reads = [SnapshotRead(bound, take), SnapshotRead(bound, row_list)]
    with psycopg.connect(db_dsn) as conn, conn.transaction():
        snapshot_reads(conn, reads)  # (both in one transaction)
    taken, listed = (read.result for read in reads)
    ids = [row[bound.columns.index("id")] for row in seen]
    assert taken == count and sorted(ids) == list(range(1, count + 1))
    assert listed == seen


async def test_a_snapshot_load_that_fails_midway_leaves_the_pool_usable(db_dsn: str) -> None:
    """A ``take`` that raises while rows still stream (a bug in loading them, say) ends the
    query: the error is the one raised, the next read in the same transaction gets its rows,
    and the pooled connection serves the next transaction."""
    count = snapshots._SNAPSHOT_CHUNK_ROWS * 3
    sql(db_dsn, "CREATE TABLE many (id int PRIMARY KEY, v text)",
        f"INSERT INTO many SELECT g, 'v' || g FROM generate_series(1, {count}) g")
    bound = Cursor("many", fields=["v"]).bind()

    def fail_midway(rows: Any, snapshot: Any, lsn: int) -> None:
        for n, _ in enumerate(rows):
            if n == snapshots._SNAPSHOT_CHUNK_ROWS + 5:
                raise ValueError("cannot load this row")

    def backend(conn: psycopg.Connection[Any]) -> int:
        return conn.info.backend_pid

    database = Database(db_dsn, size=1)
    try:
        pid = await database.run(backend)
        failing, after = SnapshotRead(bound, fail_midway), SnapshotRead(bound, row_list)
        await database.run(snapshot_reads, [failing, after], snapshot=True)
        assert isinstance(failing.error, ValueError)
        assert str(failing.error) == "cannot load this row"
        assert after.error is None and len(after.result) == count
        rows = await database.run(_snapshot_rows, bound, snapshot=True)
        assert len(rows) == count
        assert await database.run(backend) == pid  # the same connection: it was left clean
    finally:
        database.close()


def test_snapshot_reads_of_oddly_named_tables_and_columns(db_dsn: str) -> None:
    """Quotes, braces, blanks and percent signs in names: the queries quote them (once per
    name, see ``filters.quoted``) and PostgreSQL finds them (a ``%`` once made psycopg refuse
    the query)."""
    sql(db_dsn, 'CREATE SCHEMA "we ird"',
        'CREATE TABLE "we ird"."ta""ble" (id int PRIMARY KEY, "x{y}" text, "z%" int, '
        '"a{}" int, "b%s" text)',
        'INSERT INTO "we ird"."ta""ble" VALUES (1, \'one\', 10, 3, NULL), '
        '(2, \'two\', 20, 3, \'set\'), (3, \'three\', 30, 4, NULL)')
    cursor = Cursor(("we ird", 'ta"ble'), fields=["x{y}", "z%"],
                    filter=(C("a{}") == Param("a")) & C("b%s").is_null())
    bound = cursor.bind({"a": 3})
    expected = {"id": 1, "x{y}": "one", "z%": 10, "a{}": 3, "b%s": None}
    with psycopg.connect(db_dsn) as conn:
        with conn.transaction():
            rows = _snapshot_rows(conn, bound)
        assert [dict(zip(bound.columns, row, strict=True)) for row in rows] == [expected]
        with conn.transaction():  # a row fetched by key (TOAST), a lookup by key
            row, _, _ = fetch_row(conn, row_query(bound), (1,), bound.columns)
            assert row == expected
            found = SqlRowLookup(conn).row(("we ird", 'ta"ble'), 1, columns=["z%", "b%s"])
            assert found == {"id": 1, "z%": 10, "b%s": None}
