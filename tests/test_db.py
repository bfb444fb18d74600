"""The thread-backed connection pool used from trio."""

import os
import resource
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from cdcddp.db import Database, preparable


async def test_run_commits_and_rolls_back(db_dsn: str) -> None:
    db = Database(db_dsn, size=2)
    try:
        await db.execute("CREATE TABLE t (id int primary key)")
        await db.execute("INSERT INTO t VALUES (%s)", (1,))

        def fail(conn: psycopg.Connection) -> None:
            conn.execute("INSERT INTO t VALUES (2)")
            raise ValueError("boom")

        with pytest.raises(ValueError):
            await db.run(fail)
        assert await db.fetchall("SELECT id FROM t ORDER BY id") == [(1,)]
        # The session settings are pinned.
        assert await db.fetchall("SHOW TimeZone") == [("UTC",)]
    finally:
        db.close()


async def test_concurrent_calls_are_bounded_by_the_pool(db_dsn: str) -> None:
    db = Database(db_dsn, size=3)
    results: list[int] = []
    try:
        async def one(i: int) -> None:
            rows = await db.fetchall("SELECT %s::int FROM pg_sleep(0.05)", (i,))
            results.append(rows[0][0])

        async with trio.open_nursery() as nursery:
            for i in range(9):
                nursery.start_soon(one, i)
        assert sorted(results) == list(range(9))
        assert len(db._idle) <= 3
    finally:
        db.close()


async def test_an_idle_connection_the_server_ended_is_not_handed_out(db_dsn: str) -> None:
    """The server ends idle sessions when it restarts or fails over, or an operator
    terminates them: the pool opens a new connection instead of handing out a dead one."""
    db = Database(db_dsn, size=2)
    try:
        (pid,), = await db.fetchall("SELECT pg_backend_pid()")
        with psycopg.connect(db_dsn, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
        (new_pid,), = await db.fetchall("SELECT pg_backend_pid()")
        assert new_pid != pid
        assert len(db._idle) == 1
    finally:
        db.close()


async def test_queries_repeated_before_a_migration_still_run_after_it(db_dsn: str) -> None:
    """A migration elsewhere retypes a column, or adds one under a ``SELECT *``: a statement
    psycopg had prepared on its own would now fail once on every pooled connection ("cached
    plan must not change result type"), an engine read or a method call alike."""
    db = Database(db_dsn, size=1)
    try:
        await db.execute("CREATE TABLE t (id int PRIMARY KEY, title text)")
        await db.execute("INSERT INTO t VALUES (1, 'x')")
        for _ in range(8):  # (psycopg's default: prepared from the 6th run on)
            assert await db.fetchall("SELECT title FROM t WHERE id = %s", (1,)) == [("x",)]
            assert await db.fetchall("SELECT * FROM t WHERE id = %s", (1,)) == [(1, "x")]
        with psycopg.connect(db_dsn, autocommit=True) as other:
            other.execute("ALTER TABLE t ALTER COLUMN title TYPE varchar(20)")
            other.execute("ALTER TABLE t ADD COLUMN extra int DEFAULT 7")
        assert await db.fetchall("SELECT title FROM t WHERE id = %s", (1,)) == [("x",)]
        assert await db.fetchall("SELECT * FROM t WHERE id = %s", (1,)) == [(1, "x", 7)]
        # A statement that returns no rows stays prepared: it is planned again, not refused.
        for _ in range(8):
            await db.execute("UPDATE t SET title = %s WHERE id = %s", ("y", 1))
        with psycopg.connect(db_dsn, autocommit=True) as other:
            other.execute("ALTER TABLE t ALTER COLUMN title TYPE text")
        await db.execute("UPDATE t SET title = %s WHERE id = %s", ("z", 1))
        assert await db.fetchall("SELECT title FROM t") == [("z",)]
    finally:
        db.close()


@pytest.mark.parametrize(("query", "prepare"), [
    ("UPDATE t SET a = %s", None),
    ("  insert into t values (%s)", None),
    ("DELETE FROM t WHERE id = %s", None),
    (b"UPDATE t SET a = 1", None),
    ("UPDATE t SET a = 1\nRETURNING a", False),
    ("insert into t values (1) returning *", False),
    ("SELECT 1", False),
    ("WITH x AS (DELETE FROM t RETURNING *) SELECT count(*) FROM x", False),
    ("updated", False),
    (sql.SQL("UPDATE t SET a = 1"), False),  # (not read: never prepared)
])
def test_only_statements_that_return_no_rows_are_prepared(query: Any, prepare: bool | None
                                                          ) -> None:
    assert preparable(query) is prepare


async def test_a_pooled_connection_past_descriptor_1023_is_reused(db_dsn: str) -> None:
    """A server with thousands of clients opens its pool's connections on high descriptors
    (select() refuses those): they are still checked and reused, not reopened each time."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) is too low")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    db = Database(db_dsn, size=2)
    try:
        (pid,), = await db.fetchall("SELECT pg_backend_pid()")
        assert db._idle[0].fileno() > 1023
        assert await db.fetchall("SELECT pg_backend_pid()") == [(pid,)]
    finally:
        db.close()
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_values_load_as_the_stream_decodes_them(db_dsn: str) -> None:
    """Pooled connections load what psycopg would refuse or load otherwise (see
    tests/test_sql_values.py for every type) as the decoder does, user arrays included."""
    db = Database(db_dsn, size=1)
    try:
        await db.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
        rows = await db.fetchall(
            "SELECT 'infinity'::timestamptz, '-infinity'::date, '24:00:00'::time, "
            "'10.0.0.1/8'::inet, '{sad,NULL}'::mood[], '1 day'::interval, 1::int4")
        assert rows == [(datetime.max.replace(tzinfo=UTC), date.min, "24:00:00", "10.0.0.1/8",
                         ["sad", None], timedelta(days=1), 1)]
        assert await db.fetchall("SHOW IntervalStyle") == [("iso_8601",)]
        (array_oid,), = await db.fetchall("SELECT 'mood[]'::regtype::oid::int")
        assert db.types.catalog.get(array_oid) is not None  # reloaded for the new type
    finally:
        db.close()


async def test_a_snapshot_run_is_one_repeatable_read_read_only_transaction(db_dsn: str) -> None:
    db = Database(db_dsn, size=1)  # one connection: the next run reuses it

    def settings(conn: psycopg.Connection) -> tuple[str, str]:
        found = conn.execute("SELECT current_setting('transaction_isolation'), "
                             "current_setting('transaction_read_only')").fetchone()
        assert found is not None
        return found[0], found[1]
    try:
        assert await db.run(settings, snapshot=True) == ("repeatable read", "on")
        assert await db.run(settings) == ("read committed", "off")  # reset for the next user
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await db.run(lambda conn: conn.execute("CREATE TABLE nope (x int)"), snapshot=True)
        assert await db.run(settings) == ("read committed", "off")
    finally:
        db.close()
