"""Small synchronous SQL helpers shared by tests, and a way to hold a commit between its
commit record and its visibility."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import trio


def sql(dsn: str, *statements: str, params: Any = None) -> Any:
    """Run statements in autocommit; the rows of the last one that returns rows (else None)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        result = None
        for statement in statements:
            cur = conn.execute(statement, params)
            result = cur.fetchall() if cur.description else None
        return result


def wait_replayed(primary_dsn: str, standby_dsn: str, timeout: float = 10.0) -> None:
    """Wait until the standby has replayed all the primary has written so far."""
    from cdcddp.wal.lsn import parse_lsn

    (target,), = sql(primary_dsn, "SELECT pg_current_wal_lsn()::text")
    deadline = time.monotonic() + timeout
    while True:
        (done,), = sql(standby_dsn, "SELECT pg_last_wal_replay_lsn()::text")
        if parse_lsn(done) >= parse_lsn(target):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the standby replayed up to {done}, not {target}")
        time.sleep(0.01)


def refusing_wal2json(dsn: str) -> str:
    """``dsn`` for sessions whose server lets no output plugin but pgoutput decode, as a server
    upgraded to 15.19 / 17.11 or later is until wal2json is added to its
    ``output_plugin_libraries`` (a superuser may narrow it per session). Skips the test on a
    server that has no such setting."""
    import pytest

    (allowed,), = sql(dsn, "SELECT current_setting('output_plugin_libraries', true)")
    if allowed is None:
        pytest.skip("this PostgreSQL lets any output plugin decode (before 15.19 / 17.11)")
    return f"{dsn} options='-c output_plugin_libraries=pgoutput'"


@contextmanager
def standby_that_never_answers(dsn: str) -> Iterator[None]:
    """While inside, a commit made with ``synchronous_commit = on`` waits for a synchronous
    standby that does not exist: its commit record is written (and decoded by logical
    replication), but it stays invisible to new snapshots until the wait is cancelled
    (:func:`release_commit_wait`; the commit then stands, with a warning). Sessions with
    ``synchronous_commit = local`` do not wait. Changes the cluster's configuration: one
    test at a time."""
    sql(dsn, "ALTER SYSTEM SET synchronous_standby_names = 'nobody_answers'",
        "SELECT pg_reload_conf()")
    try:
        settled(dsn, "synchronous_standby_names", "nobody_answers")
        yield
    finally:
        sql(dsn, "ALTER SYSTEM RESET synchronous_standby_names", "SELECT pg_reload_conf()")
        settled(dsn, "synchronous_standby_names", "")


def settled(dsn: str, name: str, value: str, timeout: float = 10.0) -> None:
    """Wait until new sessions see setting ``name`` at ``value`` (``pg_reload_conf`` only
    signals the postmaster: a session started just after may still have the old value)."""
    deadline = time.monotonic() + timeout
    while sql(dsn, "SELECT current_setting(%s)", params=(name,))[0][0] != value:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name} is not {value!r} after {timeout} s")
        time.sleep(0.01)


def waits_for_standby(admin: psycopg.Connection[Any], pid: int) -> bool:
    """Does session ``pid`` wait for a synchronous standby to confirm its commit?"""
    found = admin.execute("SELECT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s "
                          "AND wait_event = 'SyncRep')", (pid,)).fetchone()
    return bool(found and found[0])


def release_commit_wait(admin: psycopg.Connection[Any], pid: int, delay: float,
                        done: threading.Event | None = None) -> bool:
    """Once session ``pid`` waits for the standby, let it wait ``delay`` seconds more, then
    cancel the wait. Gives up (False) when ``done`` is set first."""
    while done is None or not done.is_set():
        if waits_for_standby(admin, pid):
            time.sleep(delay)
            admin.execute("SELECT pg_cancel_backend(%s)", (pid,))
            return True
        time.sleep(0.002)
    return False


@dataclass
class HeldCommit:
    pid: int  # the session whose commit waits
    admin: psycopg.Connection[Any]  # another session, to look at it

    def waits(self) -> bool:
        return waits_for_standby(self.admin, self.pid)

    def still_waits(self, timeout: float = 5.0) -> bool:
        """Does the commit wait? Its session shows the wait a moment after the commit record
        is written, and so decoded: on a loaded machine, after a test may see it delivered."""
        deadline = time.monotonic() + timeout
        while not self.waits():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True


@asynccontextmanager
async def held_commit(dsn: str, *statements: str | tuple[str, tuple[Any, ...]]
                      ) -> AsyncIterator[HeldCommit]:
    """Run ``statements`` in one transaction whose COMMIT waits for a standby that never
    answers (see :func:`standby_that_never_answers`): decoded and delivered by the stream,
    not visible to new snapshots. On leaving, the wait is cancelled: the commit stands."""
    with standby_that_never_answers(dsn), psycopg.connect(dsn, autocommit=True) as held, \
            psycopg.connect(dsn, autocommit=True) as admin:
        held.execute("BEGIN")
        for statement in statements:
            held.execute(*((statement,) if isinstance(statement, str) else statement))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.to_thread.run_sync, held.execute, "COMMIT")
            try:
                yield HeldCommit(held.info.backend_pid, admin)
            finally:
                await trio.to_thread.run_sync(
                    admin.execute, "SELECT pg_cancel_backend(%s)", (held.info.backend_pid,))
