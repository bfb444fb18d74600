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


def test_postgresql_16s_invalidated_slots_are_told_apart_by_where_they_are(db_dsn: str
                                                                          ) -> None:
    """PostgreSQL 16 has no invalidation_reason and shows every invalidated logical slot as
    ``conflicting``, WAL removal included (seen on 16.2). The status query, run here on this
    server against a view with 16's columns (ahead of pg_catalog in the search path, with
    pg_is_in_recovery() beside it), reads that as WAL removal on a primary, where conflicts
    with recovery cannot happen, and as either cause on a standby."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA pg16")
        conn.execute(
            "CREATE VIEW pg16.pg_replication_slots AS SELECT 'gone'::name AS slot_name, "
            "'wal2json'::name AS plugin, 'logical'::text AS slot_type, "
            "current_database()::name AS database, false AS temporary, false AS active, "
            "NULL::int AS active_pid, '0/16B3748'::pg_lsn AS confirmed_flush_lsn, "
            "'0/16B3710'::pg_lsn AS restart_lsn, 'lost'::text AS wal_status, "
            "NULL::bigint AS safe_wal_size, false AS two_phase, true AS conflicting")
        conn.execute("CREATE FUNCTION pg16.pg_is_in_recovery() RETURNS boolean LANGUAGE sql "
                     "AS $$ SELECT current_setting('pg16.in_recovery')::boolean $$")
        conn.execute("SET search_path = pg16, pg_catalog, public")
        found = {}
        for in_recovery in ("off", "on"):
            conn.execute("SELECT set_config('pg16.in_recovery', %s, false)", (in_recovery,))
            status = slots.get_status(conn, "gone")
            assert status is not None and status.invalidated
            with pytest.raises(slots.SlotInvalidated) as raised:
                slots.verify(status, status.database or "")
            found[in_recovery] = (status.invalidation, str(raised.value))
    assert found["off"] == ("wal_removed", (
        "replication slot 'gone' is invalidated (wal_status = lost: the WAL it needed was "
        "removed): drop it (cdcddp slot drop --slot gone) and create a new one, then resync."))
    assert found["on"] == ("conflict", (
        "replication slot 'gone' was invalidated on this standby, by a conflict with recovery "
        "(the primary removed rows it still needed, or its wal_level went below logical) or "
        "for want of WAL (max_slot_wal_keep_size); PostgreSQL 16 does not say which: drop it "
        "(cdcddp slot drop --slot gone) and create a new one, then resync; "
        "hot_standby_feedback = on on the standby prevents the first."))


def test_a_timeline_history_says_where_each_ancestor_ended() -> None:
    # As TIMELINE_HISTORY returns it for timeline 3 (parent, switch point, reason).
    content = ("1\t0/3000148\tno recovery target specified\n\n"
               "2\t0/5A1B2C8\tat restore point \"before\"\n")
    assert slots.parse_timeline_history(content) == {1: 0x3000148, 2: 0x5A1B2C8}
    assert slots.parse_timeline_history("") == {}
