"""Preflight findings against real servers (the shared cluster and a private one)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest

from cdcddp.devcluster import LocalCluster, throwaway_cluster
from cdcddp.wal.preflight import Finding, check_plugin, errors, run_preflight
from tests.pg_support import refusing_wal2json, sql

_roles = itertools.count(1)


def by_code(findings: list[Finding]) -> dict[str, Finding]:
    return {f.code: f for f in findings}


def test_healthy_database_has_no_errors(db_dsn: str) -> None:
    findings = run_preflight(db_dsn, slot="not_there_yet")
    assert errors(findings) == []
    codes = by_code(findings)
    assert {"wal_level", "replication_privilege", "plugin", "slot"} <= codes.keys()
    assert "creates it" in codes["slot"].message


def test_missing_plugin_is_named(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        if sql(db_dsn, "SELECT current_setting('output_plugin_libraries', true)")[0][0]:
            # Allowed, so that PostgreSQL goes on to look for its file.
            conn.execute("SET output_plugin_libraries = 'wal2json_not_installed'")
        finding = check_plugin(conn, plugin="wal2json_not_installed")
    assert finding.severity == "error" and finding.code == "plugin_missing"
    assert "apt-get install postgresql-15-wal2json" in finding.message


def test_a_plugin_the_server_does_not_allow_is_named_with_the_setting_to_change(
        db_dsn: str) -> None:
    with psycopg.connect(refusing_wal2json(db_dsn), autocommit=True) as conn:
        finding = check_plugin(conn)
    assert finding.severity == "error" and finding.code == "plugin_refused"
    assert finding.message == (
        "PostgreSQL does not allow wal2json as a logical decoding output plugin: add it to "
        "output_plugin_libraries (ALTER SYSTEM SET output_plugin_libraries = "
        "'pgoutput, wal2json'; then SELECT pg_reload_conf()).")


def test_missing_replication_privilege(db_dsn: str, pg_cluster: LocalCluster) -> None:
    role = f"cdcddp_norepl_{next(_roles)}"
    pg_cluster.psql(f'CREATE ROLE "{role}" LOGIN NOREPLICATION')
    try:
        findings = run_preflight(db_dsn.replace("user=postgres", f"user={role}"))
        finding = by_code(findings)["replication_privilege"]
        assert finding.severity == "error"
        assert finding.message == (f"role {role!r} lacks the REPLICATION privilege: run "
                                   f'ALTER ROLE "{role}" REPLICATION as a superuser.')
    finally:
        pg_cluster.psql(f'DROP ROLE "{role}"')


def test_sync_standby_waits_need_a_role_that_sees_them(db_dsn: str,
                                                      pg_cluster: LocalCluster) -> None:
    role = f"cdcddp_nostats_{next(_roles)}"
    pg_cluster.psql(f'CREATE ROLE "{role}" LOGIN REPLICATION')
    as_role = db_dsn.replace("user=postgres", f"user={role}")
    try:
        # No synchronous standbys: nothing to see.
        assert by_code(run_preflight(as_role))["sync_standby"].severity == "ok"
        pg_cluster.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby1'")
        pg_cluster.psql("SELECT pg_reload_conf()")
        finding = by_code(run_preflight(as_role))["sync_standby_waits_unseen"]
        assert finding.severity == "warning"
        assert finding.message.endswith(f'run GRANT pg_read_all_stats TO "{role}".')
        # (Not waiting for the standby that does not exist to confirm the GRANT.)
        pg_cluster.psql(f'SET synchronous_commit = local; GRANT pg_read_all_stats TO "{role}"')
        assert by_code(run_preflight(as_role))["sync_standby"].severity == "ok"
        assert by_code(run_preflight(db_dsn))["sync_standby"].severity == "ok"  # superuser
    finally:
        pg_cluster.psql("ALTER SYSTEM RESET synchronous_standby_names")
        pg_cluster.psql("SELECT pg_reload_conf()")
        pg_cluster.psql(f'DROP ROLE "{role}"')


def test_unreachable_server() -> None:
    (finding,) = run_preflight("host=127.0.0.1 port=1 dbname=x connect_timeout=2")
    assert finding.code == "connect" and finding.message.endswith("check --dsn.")


def test_tables_without_identity(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE good (id int PRIMARY KEY)")
        conn.execute("CREATE TABLE nopk (v int)")
        conn.execute("CREATE TABLE nothing (id int PRIMARY KEY)")
        conn.execute("ALTER TABLE nothing REPLICA IDENTITY NOTHING")
        conn.execute("CREATE TABLE full_ident (v int)")
        conn.execute("ALTER TABLE full_ident REPLICA IDENTITY FULL")
        conn.execute("CREATE TABLE by_index (v int NOT NULL)")
        conn.execute("CREATE UNIQUE INDEX by_index_v ON by_index (v)")
        conn.execute("ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_v")
        conn.execute("CREATE TABLE index_gone (v int NOT NULL)")
        conn.execute("CREATE UNIQUE INDEX index_gone_v ON index_gone (v)")
        conn.execute("ALTER TABLE index_gone REPLICA IDENTITY USING INDEX index_gone_v")
        conn.execute("DROP INDEX index_gone_v")  # (relreplident stays 'i': logged as NOTHING)
    findings = run_preflight(db_dsn, tables=["good", "public.nopk", "nothing", "full_ident",
                                             "by_index", "index_gone", "missing"])
    table_findings = findings[-7:]
    assert [f.severity for f in table_findings] == [
        "ok", "error", "error", "ok", "ok", "error", "error"]
    assert table_findings[1].message.startswith("table nopk has no primary key")
    assert "ALTER TABLE nothing REPLICA IDENTITY DEFAULT" in table_findings[2].message
    assert table_findings[5].message.startswith(
        "table index_gone has REPLICA IDENTITY USING INDEX, but that index was dropped")
    assert table_findings[6].message == ("table missing does not exist: create it or fix the "
                                         "table name.")


def test_relations_whose_changes_are_never_streamed(db_dsn: str) -> None:
    sql(db_dsn, "CREATE UNLOGGED TABLE loose (id int PRIMARY KEY)",
        "CREATE VIEW seen AS SELECT 1 AS id", "CREATE MATERIALIZED VIEW kept AS SELECT 1 AS id")
    found = run_preflight(db_dsn, tables=["loose", "seen", "kept"])[-3:]
    assert [f.code for f in found] == ["table_not_streamed"] * 3
    assert found[0].message == ("loose is UNLOGGED: its changes are not written to the WAL, "
                                "so never streamed: run ALTER TABLE loose SET LOGGED.")
    assert found[2].message.startswith("kept is a materialized view: ")


def table_finding(dsn: str, table: str) -> tuple[str, str]:
    """The code and message of ``cdcddp check``'s finding about ``table``."""
    (found,) = run_preflight(dsn, tables=[table])[-1:]
    return found.code, found.message


def test_a_partitioned_table_is_checked_partition_by_partition(db_dsn: str) -> None:
    """Its changes are its leaf partitions', at every level: each must be streamed, with a
    replica identity of its own (a partitioned table's is not theirs)."""
    sql(db_dsn, "CREATE TABLE parted (id int PRIMARY KEY, region text) PARTITION BY RANGE (id)",
        "CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10) "
        "PARTITION BY RANGE (id)",
        "CREATE TABLE parted_1a PARTITION OF parted_1 FOR VALUES FROM (0) TO (5)",
        "CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (10) TO (20)")
    found = run_preflight(db_dsn, tables=["parted", "parted_1"])[-2:]
    assert [(f.code, f.message) for f in found] == [
        ("table", "table parted has a replica identity and is readable."),
        ("table", "table parted_1 has a replica identity and is readable.")]
    sql(db_dsn, "ALTER TABLE parted_1a REPLICA IDENTITY NOTHING")
    assert table_finding(db_dsn, "parted") == (
        "table_identity_nothing", "table public.parted_1a (a partition of parted) has REPLICA "
        "IDENTITY NOTHING, so its UPDATEs and DELETEs are not streamed: run ALTER TABLE "
        "public.parted_1a REPLICA IDENTITY DEFAULT.")
    sql(db_dsn, "ALTER TABLE parted_1a REPLICA IDENTITY DEFAULT",
        "CREATE UNLOGGED TABLE parted_3 PARTITION OF parted FOR VALUES FROM (20) TO (30)")
    assert table_finding(db_dsn, "parted") == (
        "table_not_streamed", "public.parted_3 (a partition of parted) is UNLOGGED: its "
        "changes are not written to the WAL, so never streamed: run ALTER TABLE "
        "public.parted_3 SET LOGGED.")


def test_a_tables_inheritance_children_are_checked_too(db_dsn: str) -> None:
    """A query of a table reads its children's rows: each needs a replica identity of its
    own (a primary key is not inherited) and must be streamed."""
    sql(db_dsn, "CREATE TABLE cities (id int PRIMARY KEY, name text)",
        "CREATE TABLE capitals (state text) INHERITS (cities)")
    assert table_finding(db_dsn, "cities") == (
        "table_no_identity", "table public.capitals (a child table of cities) has no primary "
        "key, so its UPDATEs and DELETEs are not streamed: add one (ALTER TABLE "
        "public.capitals ADD PRIMARY KEY (...)) or set REPLICA IDENTITY USING INDEX or FULL.")
    sql(db_dsn, "ALTER TABLE capitals ADD PRIMARY KEY (id)")
    assert table_finding(db_dsn, "cities")[0] == "table"


def test_tables_the_role_cannot_read_or_reads_through_row_security(
        db_dsn: str, pg_cluster: LocalCluster) -> None:
    role = f"cdcddp_reader_{next(_roles)}"
    pg_cluster.psql(f'CREATE ROLE "{role}" LOGIN REPLICATION')
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        for table in ("open", "hidden", "policed", "forced"):
            conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        conn.execute(f'GRANT SELECT ON open, policed, forced TO "{role}"')
        conn.execute(f'ALTER TABLE forced OWNER TO "{role}"')
        for table in ("policed", "forced"):
            conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    as_role = db_dsn.replace("user=postgres", f"user={role}")
    try:
        tables = ["open", "hidden", "policed", "forced"]
        found = run_preflight(as_role, tables=tables)[-4:]
        # Its owner is not subject to a table's policies, unless they are forced on it.
        assert [f.code for f in found] == ["table", "table_unreadable", "table_row_security",
                                           "table"]
        assert found[1].message == (f"role {role!r} cannot read table hidden: run GRANT "
                                    f'SELECT ON hidden TO "{role}".')
        assert found[2].message == (
            f"row-level security on table policed applies to role {role!r}, so its snapshots "
            f'would lack rows the stream shows: run ALTER ROLE "{role}" BYPASSRLS as a '
            "superuser, or make the role the table's owner (without FORCE ROW LEVEL "
            "SECURITY).")
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("ALTER TABLE forced FORCE ROW LEVEL SECURITY")
        assert run_preflight(as_role, tables=["forced"])[-1].code == "table_row_security"
        pg_cluster.psql(f'ALTER ROLE "{role}" BYPASSRLS')
        assert [f.code for f in run_preflight(as_role, tables=tables)[-4:]] == [
            "table", "table_unreadable", "table", "table"]
        # A superuser reads everything.
        assert [f.code for f in run_preflight(db_dsn, tables=tables)[-4:]] == ["table"] * 4
    finally:
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute(f'DROP OWNED BY "{role}"')
        pg_cluster.psql(f'DROP ROLE "{role}"')


@pytest.fixture(scope="module")
def replica_cluster() -> Iterator[LocalCluster]:
    """A private cluster that starts at wal_level=replica (changing it needs a restart)."""
    with throwaway_cluster("cdcddp-pre-", wal_level="replica",
                           max_slot_wal_keep_size="1MB") as cluster:
        yield cluster


def test_wal_level_then_invalidated_slot(replica_cluster: LocalCluster) -> None:
    (finding,) = [f for f in run_preflight(replica_cluster.dsn()) if f.code == "wal_level"]
    assert finding.severity == "error"
    assert finding.message == ("wal_level is 'replica', not 'logical': run ALTER SYSTEM SET "
                               "wal_level = logical and restart PostgreSQL.")

    replica_cluster.psql("ALTER SYSTEM SET wal_level = logical")
    replica_cluster.restart()
    dsn = replica_cluster.dsn()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('doomed', 'wal2json')")
        conn.execute("CREATE TABLE filler (v text)")
        # Push WAL past max_slot_wal_keep_size and checkpoint: the slot is invalidated.
        for _ in range(4):
            conn.execute("INSERT INTO filler SELECT repeat('x', 100) FROM generate_series(1, 10)")
            conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")
        (wal_status,) = conn.execute(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'doomed'").fetchone()
    assert wal_status == "lost"
    finding = by_code(run_preflight(dsn, slot="doomed"))["slot_lost"]
    assert finding.severity == "error"
    assert finding.message.startswith("replication slot 'doomed' is invalidated")
    assert "cdcddp slot drop --slot doomed" in finding.message
