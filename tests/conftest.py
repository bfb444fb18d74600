"""Shared fixtures: a real PostgreSQL cluster per test session, a fresh database per test."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import psycopg
import pytest

from cdcddp.devcluster import PG17_BINDIR, PG17_ROOT, LocalCluster, throwaway_cluster


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")
    parser.addoption("--postgres", choices=("15", "17"), default="15",
                     help="major version of the shared cluster (17: the Debian 13 root that "
                          "./tests/run installs as root)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "pg_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)  # ./tests/run runs these on 17 too
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="long version: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def pg_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    """A throwaway PostgreSQL cluster (wal_level=logical) for the whole test session."""
    where = {}
    if request.config.getoption("--postgres") == "17":
        where = {"chroot": PG17_ROOT, "bindir": PG17_BINDIR}
    with throwaway_cluster("cdcddp-pg-", full_page_writes="off", **where) as cluster:
        yield cluster


_db_numbers = itertools.count(1)


@pytest.fixture
def db_dsn(pg_cluster: LocalCluster) -> Iterator[str]:
    """A new, empty database for one test; its slots are dropped with it."""
    name = f"t{next(_db_numbers)}"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield pg_cluster.dsn(name)
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                "WHERE database = %s AND active_pid IS NOT NULL", (name,))
            for _ in range(50):
                rows = conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE database = %s AND NOT active",
                    (name,)).fetchall()
                for (slot,) in rows:
                    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
                if not conn.execute("SELECT 1 FROM pg_replication_slots WHERE database = %s",
                                    (name,)).fetchone():
                    break
                time.sleep(0.1)
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
