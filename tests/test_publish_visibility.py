"""Snapshot visibility of stream xids, checked against what a real snapshot sees."""

import logging
import threading
import time

import psycopg
import pytest

from cdcddp.db import transaction_statuses
from cdcddp.publish.snapshots import horizon_snapshot
from cdcddp.publish.visibility import Snapshot
from tests.pg_support import (
    release_commit_wait,
    sql,
    standby_that_never_answers,
    waits_for_standby,
)


def test_parse_and_rules() -> None:
    snap = Snapshot.parse("100:110:102,105")
    assert snap == Snapshot(100, 110, frozenset({102, 105}))
    assert snap.is_visible(99)
    assert snap.is_visible(101)
    assert not snap.is_visible(102)
    assert snap.is_visible(104)
    assert not snap.is_visible(105)
    assert not snap.is_visible(110)
    assert not snap.is_visible(111)
    with pytest.raises(ValueError):
        Snapshot.parse("garbage")
    with pytest.raises(ValueError):
        Snapshot.parse("10:5:")


def test_widen_across_epoch_boundary() -> None:
    epoch1 = 1 << 32
    snap = Snapshot.parse(f"{epoch1 - 5}:{epoch1 + 3}:{epoch1 - 2}")
    # 32-bit xids just below the wrap belong to epoch 0, just above to epoch 1.
    assert snap.widen((1 << 32) - 3) == epoch1 - 3
    assert snap.widen(2) == epoch1 + 2
    assert snap.is_visible((1 << 32) - 6)
    assert snap.is_visible((1 << 32) - 3)
    assert not snap.is_visible((1 << 32) - 2)  # in xip
    assert snap.is_visible(2)
    assert not snap.is_visible(3)


def test_matches_what_a_real_snapshot_sees(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as setup:
        setup.execute("CREATE TABLE t (id int primary key, xid bigint)")
    conns = [psycopg.connect(db_dsn) for _ in range(4)]
    try:
        before, running, after, snap_conn = conns

        def write(conn: psycopg.Connection, row_id: int) -> int:
            (xid,) = conn.execute("SELECT txid_current()").fetchone()  # type: ignore[misc]
            conn.execute("INSERT INTO t VALUES (%s, %s)", (row_id, xid))
            return int(xid) & 0xFFFFFFFF  # what wal2json reports

        xid_before = write(before, 1)
        before.commit()
        xid_running = write(running, 2)  # still open when the snapshot is taken
        snap_conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        (text,) = snap_conn.execute("SELECT pg_current_snapshot()::text").fetchone()  # type: ignore[misc]
        seen = {r[0] for r in snap_conn.execute("SELECT id FROM t")}
        running.commit()
        xid_after = write(after, 3)
        after.commit()
        seen_later = {r[0] for r in snap_conn.execute("SELECT id FROM t")}
        snap_conn.commit()

        snap = Snapshot.parse(text)
        assert seen == seen_later == {1}
        assert snap.is_visible(xid_before)
        assert not snap.is_visible(xid_running)
        assert not snap.is_visible(xid_after)
    finally:
        for c in conns:
            c.close()


def test_horizon_snapshot_waits_for_written_commits_to_become_visible(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A commit whose record is written but which is not visible yet (held by a synchronous
    standby that never answers): the horizon snapshot waits for it to become visible, and,
    past its timeout, goes on without it, saying so."""
    sql(db_dsn, "CREATE TABLE held (n int)")
    with standby_that_never_answers(db_dsn), \
            psycopg.connect(db_dsn, autocommit=True) as admin, \
            psycopg.connect(db_dsn, autocommit=True) as reader:
        for patience, delay in ((0.3, 2.0), (10.0, 0.3)):
            with psycopg.connect(db_dsn, autocommit=True) as held:
                held.execute("SET synchronous_commit = on")
                pid = held.info.backend_pid
                held.execute("BEGIN")
                xid = held.execute("INSERT INTO held VALUES (1) "
                                   "RETURNING pg_current_xact_id()::text::bigint").fetchone()
                writer = threading.Thread(target=held.execute, args=("COMMIT",))
                writer.start()
                releaser = threading.Thread(target=release_commit_wait,
                                            args=(admin, pid, delay))
                releaser.start()
                try:
                    while not waits_for_standby(admin, pid):
                        time.sleep(0.005)
                    started = time.monotonic()
                    with caplog.at_level(logging.WARNING, "cdcddp.publish.snapshots"):
                        snapshot = horizon_snapshot(reader, timeout=patience)
                    waited = time.monotonic() - started
                finally:
                    releaser.join()
                    writer.join()
                assert xid is not None
                if patience < delay:  # it gave up: the commit was still held
                    assert not snapshot.is_visible(xid[0])
                    assert 0.3 <= waited < 1.5, waited
                    assert "still not visible after 0 s" in caplog.text
                else:  # released while it waited
                    assert snapshot.is_visible(xid[0])
                    assert 0.25 <= waited < 5, waited
                    assert "still not visible" not in caplog.text
                caplog.clear()


def test_transaction_statuses_include_ids_this_server_never_gave_out(db_dsn: str) -> None:
    """After a failover the new primary is asked about commits write fences wait for: one it
    never gave out (past its next id) counts as aborted, where pg_xact_status would raise."""
    with psycopg.connect(db_dsn, autocommit=True) as conn, \
            psycopg.connect(db_dsn, autocommit=True) as other:
        conn.execute("CREATE TABLE t (n int)")

        def xid8(connection: psycopg.Connection, commit: bool) -> int:
            with connection.transaction(force_rollback=not commit):
                connection.execute("INSERT INTO t VALUES (1)")
                (found,), = connection.execute("SELECT pg_current_xact_id()::text").fetchall()
                return int(found)

        committed, rolled_back = xid8(conn, True), xid8(conn, False)
        other.execute("BEGIN")
        other.execute("INSERT INTO t VALUES (2)")
        (running,), = other.execute("SELECT pg_current_xact_id()::text").fetchall()
        future = int(running) + 1000
        with conn.transaction():  # as Database.run calls it
            statuses = transaction_statuses(conn, [future, committed, int(running),
                                                   rolled_back])
        other.execute("ROLLBACK")
    assert statuses == ["aborted", "committed", "in progress", "aborted"]
