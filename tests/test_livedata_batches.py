"""New observers' snapshots read in shared transactions (a reconnect storm), against real
PostgreSQL: batches form while the pool is busy, every subscription still gets exactly its
rows, and one read that fails does not fail the others read with it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import psycopg
import trio

from cdcddp.client import connect
from cdcddp.metrics import Metrics
from cdcddp.publish.definition import Cursor
from cdcddp.publish.snapshots import SnapshotRead, row_list
from cdcddp.publish.visibility import Snapshot
from tests.livedata_support import (
    SCHEMA,
    asql,
    check_message_log,
    expected_view,
    live_server,
    sql,
    store,
)

CATEGORIES = [f"c{i}" for i in range(40)]


async def test_subscriptions_started_together_share_snapshot_transactions(db_dsn: str) -> None:
    async with live_server(db_dsn, resyncs=True) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) "
                           "SELECT 'c' || (g % 40), 'item ' || g FROM generate_series(1, 120) g")
        # Hold the table: the first snapshot reads wait on it, so the others queue meanwhile.
        locker = await trio.to_thread.run_sync(psycopg.connect, db_dsn)
        try:
            await trio.to_thread.run_sync(
                locker.execute, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            before = live.snapshot_transactions
            async with contextlib.AsyncExitStack() as stack:
                # One client each: a connection runs its subscriptions one at a time.
                clients = [await stack.enter_async_context(connect(server.ws_url,
                                                                   log_messages=True))
                           for _ in CATEGORIES]
                async with trio.open_nursery() as nursery:
                    for client, category in zip(clients, CATEGORIES, strict=True):
                        nursery.start_soon(client.subscribe, "items.byCategory",
                                           {"category": category})
                    with trio.fail_after(10):
                        while len(live._observers) < len(CATEGORIES):
                            await trio.sleep(0.01)
                    await trio.sleep(0.2)  # every runner is waiting on the lock by now
                    assert live.snapshot_transactions - before < len(CATEGORIES) // 4
                    await trio.to_thread.run_sync(locker.rollback)
                transactions = live.snapshot_transactions - before
                # (the first reads went alone, the rest in batches of up to 32)
                assert transactions <= 8, transactions
                assert live.snapshot_queries >= len(CATEGORIES)

                def check() -> None:
                    for client, category in zip(clients, CATEGORIES, strict=True):
                        assert store(client) == expected_view(
                            db_dsn, [("items.byCategory", [{"category": category}])])
                        check_message_log(client)
                check()
                assert all(len(store(client)) == 3 for client in clients)
                # and live from there, each observer on its own
                await asql(db_dsn, "UPDATE items SET title = 'moved', category = 'c1', "
                                   "version = 1 WHERE category = 'c0'")
                await live.sync()
                for client in clients:
                    await client.ping()
                assert store(clients[0]) == {} and len(store(clients[1])) == 6
                check()

                # A resync of every observer (as after a stream gap) reads in batches too.
                before, resyncs = live.snapshot_transactions, live.resyncs
                retries = live.invisible_delivered_retries
                sent = [len(client.messages or ()) for client in clients]
                await live._with_gate_closed(live._resync(set(live.observers()), "test"))
                assert live.resyncs - resyncs == len(CATEGORIES)
                # read at once (not queued), in two batches of up to 32
                assert live.snapshot_transactions - before == 2 + (
                    live.invisible_delivered_retries - retries)
                await live.sync()
                for client in clients:
                    await client.ping()
                check()  # nothing changed: nothing sent
                assert [len(client.messages or ()) - n for client, n in
                        zip(clients, sent, strict=True)] == [1] * len(CATEGORIES)  # the pong
        finally:
            await trio.to_thread.run_sync(locker.close)


def _rows(dsn: str, columns: tuple[str, ...], where: str) -> list[tuple[Any, ...]]:
    listed = ", ".join(columns)
    return [tuple(r) for r in sql(dsn, f"SELECT {listed} FROM items WHERE {where} ORDER BY id")]


async def test_a_failing_read_does_not_fail_the_others_in_its_transaction(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one'), "
                           "('b', 'two'), ('a', 'three')")
        by_category = server.server.app.publications.get("items.byCategory")
        assert by_category is not None and isinstance(by_category.source, Cursor)
        cursor = by_category.source
        a, b = cursor.bind({"category": "a"}), cursor.bind({"category": "b"})
        gone = Cursor("no_such_table", fields=["title"]).bind()

        def failing_take(rows: Iterable[Any], snapshot: Snapshot, lsn: int) -> Any:
            next(iter(rows))
            raise ValueError("take failed")

        reads = [SnapshotRead(a, row_list), SnapshotRead(gone, row_list),
                 SnapshotRead(b, failing_take), SnapshotRead(b, row_list),
                 SnapshotRead(a, row_list)]
        before = live.snapshot_transactions
        await live._read_snapshots(reads)
        good_a, missing, failed, good_b, again_a = reads
        # PostgreSQL refused one: its transaction ended, the others were read in a new one
        assert isinstance(missing.error, psycopg.errors.UndefinedTable)
        assert live.snapshot_transactions - before == 2
        # one failed in Python: the transaction went on
        assert isinstance(failed.error, ValueError)
        for read, where in ((good_a, "category = 'a'"), (good_b, "category = 'b'"),
                            (again_a, "category = 'a'")):
            assert read.error is None
            assert sorted(read.result) == _rows(db_dsn, read.bound.columns, where)
            assert read.snapshot is good_a.snapshot  # one snapshot for all of them
            assert read.shape is not None and "title" in read.shape
        # the pool's connections are fine afterwards
        assert await live.database.fetchall("SELECT 1") == [(1,)]


async def test_a_read_chosen_as_a_deadlock_victim_is_read_again(db_dsn: str) -> None:
    """Waiting for a lock, a snapshot read can end up in a deadlock with writers, and
    PostgreSQL may cancel the read to break it: the reads are then read again in a new
    transaction, and no subscription gets the error."""
    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one')",
                   "INSERT INTO other (note) VALUES ('x')")
        items = Cursor("items", fields=["title"]).bind()
        other = Cursor("other", fields=["note"]).bind()
        reads = [SnapshotRead(items, row_list), SnapshotRead(other, row_list)]
        locker = await trio.to_thread.run_sync(
            lambda: psycopg.connect(db_dsn, autocommit=True))
        try:
            # The writer holds other and will want items, which the read (items first, in
            # one transaction) holds while it waits for other: a cycle. The read's server
            # process looks for deadlocks first (deadlock_timeout, 1 s; the writer's 60 s).
            locker.execute("BEGIN")
            locker.execute("SET LOCAL deadlock_timeout = '60s'")
            locker.execute("LOCK TABLE other IN ACCESS EXCLUSIVE MODE")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(live._read_snapshots, reads)
                with trio.fail_after(10):
                    while not await asql(db_dsn, "SELECT 1 FROM pg_locks WHERE NOT granted "
                                                 "AND relation = 'other'::regclass"):
                        await trio.sleep(0.01)
                # Blocks until the read is cancelled (it held items), then gets items.
                await trio.to_thread.run_sync(
                    locker.execute, "LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                locker.execute("COMMIT")
        finally:
            await trio.to_thread.run_sync(locker.close)
        assert live.database.transient_retries == 1
        metrics = Metrics()
        metrics.sync_live(live)
        assert metrics.registry.get_sample_value("cdcddp_read_retries_total") == 1
        assert [read.error for read in reads] == [None, None]
        assert [[row[-1] for row in read.result] for read in reads] == [["one"], ["x"]]


class CountingCursor(psycopg.Cursor[Any]):
    """A real cursor that counts the statements run through it."""

    statements = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return super().execute(*args, **kwargs)

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        CountingCursor.statements += 1
        return super().stream(*args, **kwargs)


def test_reads_of_the_same_columns_share_one_statement(db_dsn: str) -> None:
    """A batch's reads of one table and column list are one UNION ALL statement; each read
    still gets exactly its rows (none, one, several), and a read of other columns its own."""
    from cdcddp.publish.filters import C
    from cdcddp.publish.snapshots import snapshot_reads

    sql(db_dsn, SCHEMA)
    sql(db_dsn, "INSERT INTO items (category, title, rank) SELECT 'c' || (g % 7), 't' || g, g "
                "FROM generate_series(1, 60) g")
    by_category = [Cursor("items", fields=["title", "rank"], filter=C("category") == f"c{k}")
                   for k in range(9)]  # c7 and c8 match nothing
    by_rank = Cursor("items", fields=["title", "rank"],  # the same columns: id, title, rank,
                     filter=(C("rank") < 5) & (C("category") != "c1"))  # category
    other = Cursor("items", fields=["title"], filter=C("rank") >= 58)
    reads = [SnapshotRead(c.bind(), row_list) for c in [*by_category, by_rank, other]]
    with psycopg.connect(db_dsn, cursor_factory=CountingCursor) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ  # as the pool begins it
        CountingCursor.statements = 0
        snapshot, _ = snapshot_reads(conn, reads)
        # the snapshot (with the table's shape), one statement for the ten reads of
        # (title, rank) columns, one for the read of other columns
        assert CountingCursor.statements == 3
    assert snapshot is not None
    wheres = [f"category = 'c{k}'" for k in range(9)] + ["rank < 5 AND category <> 'c1'",
                                                          "rank >= 58"]
    for read, where in zip(reads, wheres, strict=True):
        assert read.error is None
        assert sorted(read.result) == _rows(db_dsn, read.bound.columns, where)
        assert read.shape is not None and "rank" in read.shape


async def test_a_failure_in_a_shared_statement_fails_only_its_own_read(db_dsn: str) -> None:
    """PostgreSQL refuses one read of a shared statement (a text compared with an integer
    column): the reads are read again one by one, and only that one fails."""
    from cdcddp.publish.filters import C

    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title, rank) VALUES ('a', 'one', 1), "
                           "('b', 'two', 2)")
        rank = [Cursor("items", fields=["title", "rank"], filter=C("rank") == value)
                for value in (1, "not a number", 2)]
        reads = [SnapshotRead(c.bind(), row_list) for c in rank]
        before = live.snapshot_transactions
        await live._read_snapshots(reads)
        one, bad, two = reads
        assert isinstance(bad.error, psycopg.errors.UndefinedFunction), repr(bad.error)
        assert one.error is two.error is None
        assert [one.result, two.result] == [[(1, "one", 1)], [(2, "two", 2)]]
        # together (failed), one by one (the bad one failed), the others again
        assert live.snapshot_transactions - before == 3
        assert one.snapshot is two.snapshot is not None
        assert await live.database.fetchall("SELECT 1") == [(1,)]
