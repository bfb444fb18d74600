"""The test harness itself: a real cluster with logical decoding and wal2json."""

import psycopg


def test_cluster_is_logical_and_has_wal2json(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        assert conn.execute("SHOW wal_level").fetchone() == ("logical",)
        conn.execute("CREATE TABLE t (id int primary key, v text)")
        conn.execute(
            "SELECT pg_create_logical_replication_slot('harness', 'wal2json')")
        conn.execute("INSERT INTO t VALUES (1, 'a')")
        rows = conn.execute(
            "SELECT data FROM pg_logical_slot_get_changes('harness', NULL, NULL, "
            "'format-version', '2')").fetchall()
        actions = [r[0] for r in rows]
        assert any('"action":"I"' in a and '"table":"t"' in a for a in actions)
