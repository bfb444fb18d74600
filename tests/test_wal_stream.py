"""The replication stream against real PostgreSQL: order, acknowledgements, reconnects."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psycopg
import pytest
import trio

from cdcddp.devcluster import LocalCluster, throwaway_cluster
from cdcddp.wal.events import (
    Begin,
    Commit,
    Insert,
    StreamEvent,
    StreamGap,
    TransactionRestart,
)
from cdcddp.wal.lsn import parse_lsn
from cdcddp.wal.slot import SlotBusy, plugin_refused_advice
from cdcddp.wal.stream import ReplicationStream, StreamError, open_stream
from tests.pg_support import refusing_wal2json, sql

FAST = {"status_interval": 0.2}
_slot_numbers = itertools.count(1)


def new_slot() -> str:
    return f"s{next(_slot_numbers)}"




async def asql(dsn: str, *statements: str) -> Any:
    return await trio.to_thread.run_sync(lambda: sql(dsn, *statements))


async def slot_row(dsn: str, slot: str) -> tuple[int, bool]:
    rows = await asql(dsn, "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots "
                           f"WHERE slot_name = '{slot}'")
    return parse_lsn(rows[0][0]), rows[0][1]


async def wait_for(predicate: Callable[[], Any], timeout: float = 15.0) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(0.05)


class Collector:
    """A consumer that applies whole transactions and acknowledges them."""

    def __init__(self, stream: ReplicationStream, ack: bool = True,
                 keep_empty: bool = False) -> None:
        self.stream = stream
        self.ack = ack
        # Autovacuum's ANALYZE takes an xid, so a transaction with no row changes may arrive
        # at any time (a Begin and its Commit). Tests that count transactions set those aside.
        self.keep_empty = keep_empty
        self.transactions: list[tuple[Commit, list[StreamEvent]]] = []
        self.empty: list[Commit] = []
        self.events: list[StreamEvent] = []
        self.restarts: list[TransactionRestart] = []
        self.gaps: list[StreamGap] = []
        self._open: list[StreamEvent] = []

    def rows(self, column: str = "n") -> list[Any]:
        return [e.new[column] for _, evs in self.transactions for e in evs
                if isinstance(e, Insert)]

    async def run(self, until: Callable[[Collector], bool] | None = None) -> None:
        async for event in self.stream:
            self.events.append(event)
            if isinstance(event, TransactionRestart):
                self.restarts.append(event)
                assert self._open and isinstance(self._open[0], Begin)
                assert self._open[0].xid == event.xid
                self._open = []
            elif isinstance(event, StreamGap):
                self.gaps.append(event)
            elif isinstance(event, Begin):
                assert not self._open, "a transaction began inside another"
                self._open = [event]
            elif isinstance(event, Commit):
                assert self._open and self._open[0].xid == event.xid  # type: ignore[union-attr]
                if len(self._open) > 1 or self.keep_empty:
                    self.transactions.append((event, self._open[1:]))
                else:
                    self.empty.append(event)
                self._open = []
                if self.ack:
                    self.stream.acknowledge(event.end_lsn)
            elif self._open:
                self._open.append(event)
            if until is not None and until(self):
                return


async def test_commit_order_across_concurrent_writers(db_dsn: str) -> None:
    sql(db_dsn, "CREATE TABLE t (writer int, n int, v text, PRIMARY KEY (writer, n))")
    writers, txs, per_tx = 4, 40, 3
    barrier = threading.Barrier(writers)

    def write(writer: int) -> None:
        with psycopg.connect(db_dsn) as conn:
            barrier.wait()
            for tx in range(txs):
                with conn.transaction():
                    for i in range(per_tx):
                        conn.execute("INSERT INTO t VALUES (%s, %s, 'x')",
                                     (writer, tx * per_tx + i))
                    conn.execute("UPDATE t SET v = 'y' WHERE writer = %s AND n = %s",
                                 (writer, tx * per_tx))

    async with open_stream(db_dsn, new_slot(), **FAST) as stream:
        collector = Collector(stream)
        total = writers * txs * per_tx
        async with trio.open_nursery() as nursery:
            for w in range(writers):
                nursery.start_soon(trio.to_thread.run_sync, write, w)
            with trio.fail_after(30):
                await collector.run(until=lambda c: len(c.rows()) == total)

    commit_lsns = [commit.lsn for commit, _ in collector.transactions]
    assert commit_lsns == sorted(commit_lsns) and len(set(commit_lsns)) == len(commit_lsns)
    rows = [(e.new["writer"], e.new["n"]) for _, evs in collector.transactions for e in evs
            if isinstance(e, Insert)]
    assert sorted(rows) == [(w, n) for w in range(writers) for n in range(txs * per_tx)]
    for commit, evs in collector.transactions:  # each transaction arrives whole, alone
        assert {e.xid for e in evs} == {commit.xid}  # type: ignore[union-attr]
        assert len(evs) == per_tx + 1
    # Per writer, its own transactions arrive in the order it committed them.
    for w in range(writers):
        mine = [n for writer, n in rows if writer == w]
        assert mine == sorted(mine)


async def test_row_change_lsns_are_the_documents_lsns(db_dsn: str) -> None:
    # The reader hands the decoder the XLogData start LSN instead of having it parse the
    # document's "lsn": they must be the same for every row change.
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY, v text)")
    sql(db_dsn, "SELECT pg_create_logical_replication_slot('lsn_check', 'wal2json')")
    async with open_stream(db_dsn, new_slot(), **FAST) as stream:
        collector = Collector(stream)
        await asql(db_dsn, "INSERT INTO t SELECT g, 'a' FROM generate_series(1, 20) g",
                   "UPDATE t SET v = 'b' WHERE n % 3 = 0", "DELETE FROM t WHERE n % 5 = 0",
                   "BEGIN", "UPDATE t SET n = n + 100 WHERE n < 4", "INSERT INTO t VALUES (0)",
                   "COMMIT")
        with trio.fail_after(30):
            await collector.run(until=lambda c: len(c.transactions) == 4)
    streamed = [(e.action, e.lsn) for _, evs in collector.transactions for e in evs]
    rows = sql(db_dsn, "SELECT data FROM pg_logical_slot_get_changes('lsn_check', NULL, NULL, "
                       "'format-version', '2', 'include-lsn', '1')")
    documents = [(d["action"], parse_lsn(d["lsn"])) for d in (orjson.loads(r[0]) for r in rows)
                 if d["action"] in "IUD"]
    assert streamed == documents and len(documents) == 20 + 6 + 4 + 3 + 1


async def test_rolled_back_transaction_yields_nothing(db_dsn: str) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    async with open_stream(db_dsn, new_slot(), **FAST) as stream:
        with psycopg.connect(db_dsn) as conn:
            conn.execute("INSERT INTO t VALUES (1)")
            conn.rollback()
            conn.execute("INSERT INTO t VALUES (2)")
            conn.commit()
        collector = Collector(stream)
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 1)
    assert collector.rows() == [2]
    assert all(getattr(e, "new", {}).get("n") != 1 for e in collector.events)


async def _terminate_walsender(admin_dsn: str, slot: str) -> int:
    rows = await asql(admin_dsn, "SELECT pg_terminate_backend(active_pid) FROM "
                                 f"pg_replication_slots WHERE slot_name = '{slot}' AND active")
    return len(rows or [])


async def test_reconnects_after_terminate_lose_and_duplicate_nothing(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    total, per_tx = 2000, 5

    writer_done = threading.Event()

    def write() -> None:
        with psycopg.connect(db_dsn) as conn:
            for start in range(1, total + 1, per_tx):
                with conn.transaction():
                    for n in range(start, start + per_tx):
                        conn.execute("INSERT INTO t VALUES (%s)", (n,))
                time.sleep(0.004)  # spread the load so several kills land during it
        writer_done.set()

    async with open_stream(db_dsn, slot, **FAST) as stream:
        collector = Collector(stream)
        kills = 0

        async def killer() -> None:
            nonlocal kills
            while not writer_done.is_set():
                await trio.sleep(0.2)
                while not stream.connected:
                    await trio.sleep(0.02)
                kills += await _terminate_walsender(pg_cluster.dsn(), slot)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, write)
            nursery.start_soon(killer)
            with trio.fail_after(40):
                await collector.run(until=lambda c: len(c.rows()) >= total)
        rows = collector.rows()
        assert sorted(rows) == list(range(1, total + 1))  # every row, exactly once
        assert kills >= 4 and stream.reconnects >= kills - 1  # the last may be in flight
        # The slot's position follows the consumer's acknowledgements.
        last = collector.transactions[-1][0].end_lsn
        await wait_for(lambda: _ge(slot_row(db_dsn, slot), last))


async def test_history_is_known_once_the_consumer_has_taken_a_sessions_opening(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    """``history_known`` (the write fence's guard across a failover): false from a dropped
    connection until the consumer has handled the events the next session opens with."""
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    async with open_stream(db_dsn, slot, **FAST) as stream:
        collector = Collector(stream)
        sql(db_dsn, "INSERT INTO t VALUES (1)")
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        assert stream.history_known
        assert await _terminate_walsender(pg_cluster.dsn(), slot) == 1
        with trio.fail_after(10):
            while stream.reconnects < 1:
                await trio.sleep(0.01)
        assert stream.connected and not stream.history_known  # the consumer has not been back
        known = trio.Event()

        async def wait_known() -> None:
            await stream.wait_history_known()
            known.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(wait_known)
            await trio.sleep(0.1)
            assert not known.is_set()
            sql(db_dsn, "INSERT INTO t VALUES (2)")
            with trio.fail_after(10):
                await collector.run(until=lambda c: len(c.transactions) == 2)
            with trio.fail_after(1):
                await known.wait()
        assert stream.history_known and collector.rows() == [1, 2]


async def test_a_server_that_stops_answering_is_left_and_found_again(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    """A walsender that stops (as a primary lost without closing its connections: its
    machine, a partition) keeps the connection open but says nothing, even when asked: after
    ``receive_timeout`` the stream leaves it and reconnects, instead of waiting minutes for
    TCP keepalives. A consumer that is merely slow is not taken for a silent server."""
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    async with open_stream(db_dsn, slot, receive_timeout=2, **FAST) as stream:
        collector = Collector(stream)
        sql(db_dsn, "INSERT INTO t SELECT generate_series(1, 20000)")
        await trio.sleep(3)  # the consumer takes nothing for longer than the timeout
        assert stream.reconnects == 0
        with trio.fail_after(20):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        (walsender,), = sql(pg_cluster.dsn(), "SELECT active_pid FROM pg_replication_slots "
                                              f"WHERE slot_name = '{slot}'")
        os.kill(walsender, signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                while stream.connected:
                    await trio.sleep(0.05)
            assert "sent nothing for 2 s" in (stream.last_error or "")
        finally:
            os.kill(walsender, signal.SIGCONT)  # it finds its connection gone and exits
        sql(db_dsn, "INSERT INTO t VALUES (0)")
        with trio.fail_after(20):
            await collector.run(until=lambda c: len(c.transactions) == 2)
        assert stream.reconnects == 1
    assert sorted(collector.rows()) == list(range(0, 20001))


async def _ge(row: Any, lsn: int) -> bool:
    return (await row)[0] >= lsn


async def test_drop_mid_transaction_restarts_it(db_dsn: str, pg_cluster: LocalCluster) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    # Far more than the socket, libpq and the stream can hold between them (a few thousand
    # rows): a smaller transaction may be wholly received before the termination lands.
    rows = 50_000
    async with open_stream(db_dsn, slot, buffer_batches=1, **FAST) as stream:
        sql(db_dsn, f"INSERT INTO t SELECT generate_series(1, {rows})")
        collector = Collector(stream)
        # Take the Begin and a few rows, then cut the connection under the consumer's feet.
        await collector.run(until=lambda c: len(c.events) == 10)
        assert isinstance(collector.events[0], Begin)
        assert await _terminate_walsender(pg_cluster.dsn(), slot) == 1
        with trio.fail_after(20):
            await collector.run(until=lambda c: len(c.transactions) == 1)
    assert len(collector.restarts) == 1
    assert collector.restarts[0].xid == collector.transactions[0][0].xid
    assert sorted(collector.rows()) == list(range(1, rows + 1))


async def test_flush_never_passes_what_was_acknowledged(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    async with open_stream(db_dsn, slot, **FAST) as stream:
        start, _ = await slot_row(db_dsn, slot)
        for n in range(3):
            sql(db_dsn, f"INSERT INTO t VALUES ({n})")
        collector = Collector(stream, ack=False)
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 3)
        # Keepalives keep coming (WAL is written elsewhere) but commits are pending.
        sql(pg_cluster.dsn(), "CREATE TEMP TABLE other AS SELECT 1")
        await trio.sleep(1.0)
        assert stream.status_updates_sent >= 3
        assert (await slot_row(db_dsn, slot))[0] == start
        first = collector.transactions[0][0].end_lsn
        stream.acknowledge(first)
        await wait_for(lambda: _ge(slot_row(db_dsn, slot), first))
        await trio.sleep(0.5)
        assert (await slot_row(db_dsn, slot))[0] == first  # not a byte further
        last = collector.transactions[-1][0].end_lsn
        stream.acknowledge(last)
        await wait_for(lambda: _ge(slot_row(db_dsn, slot), last))
    # Clean stop: the slot is released and remembers the acknowledged position.
    confirmed, active = await slot_row(db_dsn, slot)
    assert not active and confirmed >= last


async def test_idle_slot_confirms_keepalives(db_dsn: str, pg_cluster: LocalCluster) -> None:
    """Writes in another database reach this slot only as keepalives; they are confirmed."""
    slot = new_slot()
    async with open_stream(db_dsn, slot, **FAST) as stream:
        collector = Collector(stream)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collector.run)
            start, _ = await slot_row(db_dsn, slot)
            ((wal,),) = await asql(pg_cluster.dsn(),
                                   "CREATE TEMP TABLE busy AS SELECT generate_series(1, 1000)",
                                   "SELECT pg_current_wal_lsn()::text")
            assert parse_lsn(wal) > start
            await wait_for(lambda: _ge(slot_row(db_dsn, slot), parse_lsn(wal)))
            nursery.cancel_scope.cancel()
    # Nothing of the other database's writes. This database's own housekeeping (autovacuum's
    # ANALYZE takes an xid) may show up as an empty transaction: a Begin and its Commit.
    kinds = [(type(e).__name__, getattr(e, "xid", None)) for e in collector.events]
    assert all(kind in ("Begin", "Commit") for kind, _ in kinds), kinds
    assert kinds[0::2] == [("Begin", xid) for _, xid in kinds[1::2]], kinds


async def test_slow_consumer_survives_wal_sender_timeout(db_dsn: str) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY, pad text)")
    slot = new_slot()
    rows = 20000
    async with open_stream(db_dsn, slot, buffer_batches=1, status_interval=10,
                           session_settings={"wal_sender_timeout": "1s"}) as stream:
        assert stream.wal_sender_timeout == 1.0
        sql(db_dsn, f"INSERT INTO t SELECT g, repeat('p', 200) FROM generate_series(1, {rows}) g")
        collector = Collector(stream)
        await collector.run(until=lambda c: len(c.events) == 2)
        await trio.sleep(3.5)  # the reader is blocked on the full channel all this time
        with trio.fail_after(20):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        assert stream.reconnects == 0 and stream.connected
    assert len(collector.rows()) == rows


async def test_missing_primary_key_warning_is_counted(db_dsn: str) -> None:
    sql(db_dsn, "CREATE TABLE nopk (v int)")
    async with open_stream(db_dsn, new_slot(), **FAST) as stream:
        sql(db_dsn, "INSERT INTO nopk VALUES (1)", "UPDATE nopk SET v = 2", "DELETE FROM nopk")
        collector = Collector(stream, keep_empty=True)  # the UPDATE and DELETE decode to nothing
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 3)
        assert [len(evs) for _, evs in collector.transactions] == [1, 0, 0]
        assert stream.dropped_change_warnings == 2
        assert "no tuple identifier" in (stream.last_dropped_change_warning or "")


async def test_a_server_that_refuses_wal2json_says_which_setting_allows_it(
        db_dsn: str) -> None:
    # Both creating a slot and streaming from one created before an upgrade are refused.
    refusing = refusing_wal2json(db_dsn)
    existing = new_slot()
    async with open_stream(db_dsn, existing, **FAST):
        pass
    for slot in (new_slot(), existing):
        with pytest.raises(StreamError) as raised:
            async with open_stream(refusing, slot, **FAST):
                pass
        assert str(raised.value) == plugin_refused_advice()
        assert "ALTER SYSTEM SET output_plugin_libraries = 'pgoutput, test_decoding, wal2json'" \
            in str(raised.value)


async def test_busy_slot_is_refused(db_dsn: str) -> None:
    slot = new_slot()
    async with open_stream(db_dsn, slot, **FAST):
        with pytest.raises(SlotBusy, match="is in use by process"):
            async with open_stream(db_dsn, slot, busy_grace=0.3):
                pass


async def test_temporary_slot_lost_on_reconnect_gives_gap(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    async with open_stream(db_dsn, slot, temporary=True, **FAST) as stream:
        sql(db_dsn, "INSERT INTO t VALUES (1)")
        collector = Collector(stream)
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        await _terminate_walsender(pg_cluster.dsn(), slot)
        with trio.fail_after(15):
            await collector.run(until=lambda c: len(c.gaps) == 1)
        sql(db_dsn, "INSERT INTO t VALUES (2)")
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 2)
    assert collector.rows() == [1, 2]
    assert collector.gaps[0].slot == slot


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[LocalCluster]:
    """Our own cluster to restart, so the session-wide one is left alone."""
    with throwaway_cluster("cdcddp-restart-") as cluster:
        yield cluster


async def test_server_restart_is_survived(private_cluster: LocalCluster) -> None:
    dsn = private_cluster.dsn()
    sql(dsn, "DROP TABLE IF EXISTS t", "CREATE TABLE t (n int PRIMARY KEY)")
    async with open_stream(dsn, "restart_slot", **FAST) as stream:
        sql(dsn, "INSERT INTO t SELECT generate_series(1, 100)")
        collector = Collector(stream)
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.rows()) == 100)
        await trio.to_thread.run_sync(private_cluster.restart)
        sql(dsn, "INSERT INTO t SELECT generate_series(101, 200)")
        with trio.fail_after(30):
            await collector.run(until=lambda c: len(c.rows()) == 200)
        assert stream.reconnects >= 1 and collector.gaps == []
    assert collector.rows() == list(range(1, 201))


async def test_has_buffered_sees_bytes_the_reader_has_not_read_yet() -> None:
    """The reader shares the consumer's thread: between its batches the channel is empty
    while the server has sent more. ``has_buffered`` (the engine's "behind" signal for
    coalescing client writes) must count bytes waiting in the socket, and nothing once the
    reader is gone."""
    import os
    import resource
    import select
    import socket

    stream = ReplicationStream("dbname=unused", "unused")
    ours, server = socket.socketpair()
    with ours, server:
        assert not stream.has_buffered  # no reader
        stream._reader_poll = select.poll()
        stream._reader_poll.register(ours.fileno(), select.POLLIN)
        assert not stream.has_buffered  # nothing received, nothing waiting
        server.send(b"w")
        assert stream.has_buffered
        ours.recv(1)
        assert not stream.has_buffered
        server.send(b"w")
        stream._reader_poll = None  # the reader stopped (reconnecting): the socket is stale
        assert not stream.has_buffered
        # A descriptor past select()'s 1024, as on a server with thousands of clients.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
        high = os.dup2(ours.fileno(), 3000)
        try:
            stream._reader_poll = select.poll()
            stream._reader_poll.register(high, select.POLLIN)
            assert stream.has_buffered  # the byte sent above is still unread
        finally:
            os.close(high)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_slot_advanced_by_someone_else_while_away_gives_a_gap(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    """The server starts a stream at the slot's position if it is past the one asked for:
    what lies between was never delivered, and the consumer is told."""
    sql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY)")
    slot = new_slot()
    dbname = psycopg.conninfo.conninfo_to_dict(db_dsn)["dbname"]
    async with open_stream(db_dsn, slot, **FAST) as stream:
        sql(db_dsn, "INSERT INTO t VALUES (1)")
        collector = Collector(stream)
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        with psycopg.connect(db_dsn, autocommit=True) as other:
            # Keep the stream out while another session moves the slot on.
            sql(pg_cluster.dsn(), f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
            try:
                await _terminate_walsender(pg_cluster.dsn(), slot)
                other.execute("INSERT INTO t VALUES (2)")
                deadline = time.monotonic() + 10
                while True:
                    try:
                        other.execute("SELECT pg_replication_slot_advance(%s, "
                                      "pg_current_wal_lsn())", (slot,))
                        break
                    except psycopg.errors.ObjectInUse:  # not released yet
                        assert time.monotonic() < deadline
                        await trio.sleep(0.05)
            finally:
                sql(pg_cluster.dsn(), f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
        with trio.fail_after(15):
            await collector.run(until=lambda c: len(c.gaps) == 1)
        assert "advanced by another consumer" in collector.gaps[0].reason
        sql(db_dsn, "INSERT INTO t VALUES (3)")
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 2)
    assert collector.rows() == [1, 3]
