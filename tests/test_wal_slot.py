"""Slot management on an ordinary connection, and verification of existing slots."""

from __future__ import annotations

import psycopg
import pytest

from cdcddp.wal import slot as slots


def test_create_status_drop(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        created = slots.create(conn, "sl")
        assert created.plugin == "wal2json" and not created.active and not created.temporary
        conn.execute("CREATE TABLE t AS SELECT generate_series(1, 1000) AS n")
        status = slots.get_status(conn, "sl")
        assert status is not None and status.wal_status == "reserved"
        assert status.retained_wal_bytes is not None and status.retained_wal_bytes > 0
        assert status.safe_wal_size is None  # max_slot_wal_keep_size unlimited
        (dbname,) = conn.execute("SELECT current_database()").fetchone()  # type: ignore[misc]
        slots.verify(status, dbname)
        with pytest.raises(slots.SlotError, match="belongs to database"):
            slots.verify(status, "elsewhere")
        with pytest.raises(slots.SlotError, match="already exists"):
            slots.create(conn, "sl")
        slots.drop(conn, "sl")
        assert slots.get_status(conn, "sl") is None
        with pytest.raises(slots.SlotMissing, match="nothing to drop"):
            slots.drop(conn, "sl")


def test_slot_of_another_plugin_is_refused(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('po', 'pgoutput')")
        status = slots.get_status(conn, "po")
        assert status is not None
        with pytest.raises(slots.SlotError, match="uses 'pgoutput', not wal2json"):
            slots.verify(status, status.database or "")


def test_busy_slot_cannot_be_dropped(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        slots.create(conn, "busy")
        repl = psycopg.connect(db_dsn, autocommit=True, replication="database")
        try:
            repl.execute("START_REPLICATION SLOT busy LOGICAL 0/0")
            status = slots.get_status(conn, "busy")
            assert status is not None and status.active
            with pytest.raises(slots.SlotBusy, match="is in use by process"):
                slots.verify(status, status.database or "")
            with pytest.raises(slots.SlotBusy, match="stop that consumer first"):
                slots.drop(conn, "busy")
        finally:
            repl.close()  # not "with": leaving it would COMMIT in the middle of COPY BOTH


def test_a_timeline_history_says_where_each_ancestor_ended() -> None:
    # As TIMELINE_HISTORY returns it for timeline 3 (parent, switch point, reason).
    content = ("1\t0/3000148\tno recovery target specified\n\n"
               "2\t0/5A1B2C8\tat restore point \"before\"\n")
    assert slots.parse_timeline_history(content) == {1: 0x3000148, 2: 0x5A1B2C8}
    assert slots.parse_timeline_history("") == {}
