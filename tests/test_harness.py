"""The test harness itself: a real cluster with logical decoding and wal2json."""

import os
from pathlib import Path

import psycopg
import pytest

from cdcddp.devcluster import LocalCluster, ensure_local, free_port


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


def test_the_dev_cluster_of_a_checkout_postgres_cannot_reach_is_kept_where_it_can(
        tmp_path: Path) -> None:
    """./deploy/up as root in a checkout under /root (mode 700): PostgreSQL runs as another
    user, who cannot reach .cdcddp there, so it becomes a link to a directory in /var/tmp."""
    if os.geteuid() != 0:
        pytest.skip("only root runs PostgreSQL as another user")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    tmp_path.chmod(0o700)  # as /root is
    cluster = ensure_local(checkout / ".cdcddp", port=free_port())
    try:
        assert (checkout / ".cdcddp").is_symlink()
        assert cluster.root.parent == Path("/var/tmp")
        assert cluster.psql("SHOW wal_level").strip() == "logical"
        # deploy/up's way of stopping it, by the checkout's path, finds it.
        LocalCluster(checkout / ".cdcddp").stop()
        assert not cluster.is_running()
    finally:
        cluster.destroy()
