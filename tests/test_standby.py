"""Decoding on a streaming standby (PostgreSQL 16+); the engine there, writing on its primary.

A PostgreSQL 17 primary and a standby streaming from it through a physical slot with
``hot_standby_feedback``, both from the Debian 13 root that ``./tests/run`` installs (Debian 12
has only PostgreSQL 15, which cannot decode on a standby). ``CDCDDP_STANDBY_BINDIR`` names
another server's bin directory (16 or later, with wal2json in its ``pg_config --pkglibdir``)
to run them on instead.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.client import connect
from cdcddp.devcluster import (
    PG17_BINDIR,
    PG17_ROOT,
    LocalCluster,
    free_port,
    streaming_standby,
    throwaway_cluster,
)
from cdcddp.metrics import SLOT_STATUS_SQL
from cdcddp.wal.events import Insert, StreamGap
from cdcddp.wal.preflight import STANDBY_NEEDS_PRIMARY
from cdcddp.wal.stream import open_stream
from tests.pg_support import sql, wait_replayed
from tests.server_support import get
from tests.test_livedata_oracle import SEED, run_oracle
from tests.test_serve import CDCDDP, ROOT, TODOS, names, public_lists, serve_command, serving

_databases = itertools.count(1)


@dataclass
class Pair:
    primary: LocalCluster
    standby: LocalCluster

    def database(self) -> tuple[str, str]:
        """A new database: its DSN on the primary, and on the standby once it has it there."""
        name = f"sb{next(_databases)}"
        sql(self.primary.dsn(), f'CREATE DATABASE "{name}"')
        self.replayed()
        return self.primary.dsn(name), self.standby.dsn(name)

    def replayed(self) -> None:
        wait_replayed(self.primary.dsn(), self.standby.dsn())

    def drop_slots(self, standby_dsn: str) -> None:
        """Drop the standby's slots in that database (each holds back VACUUM on the primary
        through hot_standby_feedback), once their walsenders are gone."""
        deadline = time.monotonic() + 10
        while True:
            sql(standby_dsn, "SELECT pg_drop_replication_slot(slot_name) FROM "
                             "pg_replication_slots WHERE database = current_database() "
                             "AND NOT active")
            if sql(standby_dsn, "SELECT count(*) FROM pg_replication_slots "
                                "WHERE database = current_database()") == [(0,)]:
                return
            assert time.monotonic() < deadline, "a slot stayed active"
            time.sleep(0.05)


def _postgres17() -> Path:
    if shutil.which("chroot") is None or not (PG17_ROOT / str(PG17_BINDIR)[1:]).exists():
        pytest.skip(f"PostgreSQL 17 is not installed in {PG17_ROOT} (./tests/run installs it "
                    "when run as root)")
    return PG17_ROOT


def standby_server() -> dict[str, Any]:
    """Where the primary and standby servers come from: ``throwaway_cluster``'s ``chroot``
    and ``bindir`` (``CDCDDP_STANDBY_BINDIR``, or PostgreSQL 17 in its root)."""
    bindir = os.environ.get("CDCDDP_STANDBY_BINDIR")
    if bindir:
        return {"bindir": Path(bindir)}
    return {"chroot": _postgres17(), "bindir": PG17_BINDIR}


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    with throwaway_cluster("cdcddp-primary-", **standby_server()) as primary, \
            streaming_standby(primary) as standby:
        yield Pair(primary, standby)


def log_standby_snapshot(pair: Pair):  # type: ignore[no-untyped-def]
    async def nudge() -> None:
        await trio.to_thread.run_sync(sql, pair.primary.dsn(), "SELECT pg_log_standby_snapshot()")
    return nudge


async def test_the_stream_decodes_a_standbys_slot_created_there_in_moments(pair: Pair) -> None:
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, "CREATE TABLE t (id int PRIMARY KEY, v text)")
    started = time.monotonic()
    async with open_stream(standby_dsn, "on_standby", status_interval=0.2,
                           log_standby_snapshot=log_standby_snapshot(pair)) as stream:
        # Creating it waits for the primary's next record of its running transactions, which
        # it logs by itself every 15 s: the stream asks the primary for one.
        created_in = time.monotonic() - started
        assert stream.in_recovery
        sql(primary_dsn, "INSERT INTO t VALUES (1, 'written on the primary')")
        with trio.fail_after(10):
            async for event in stream:
                if isinstance(event, Insert):
                    break
    assert (event.table, event.new) == ("t", {"id": 1, "v": "written on the primary"})
    assert created_in < 5, created_in
    (slots, in_recovery), = sql(
        standby_dsn, "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                     "'on_standby'), pg_is_in_recovery()")
    assert (slots, in_recovery) == (1, True)  # the slot is the standby's own


async def test_a_walsender_killed_while_it_creates_the_slot_on_the_standby_is_retried(
        pair: Pair) -> None:
    """Creating a slot on a standby waits for the primary: the longest window there is for
    the walsender to go away (the oracle on a standby found a stream that stopped there)."""
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    nudge = log_standby_snapshot(pair)
    held = False
    waiting, go_on = trio.Event(), trio.Event()

    async def held_nudge() -> None:
        if held:  # this creation waits until the test lets it go on
            waiting.set()
            await go_on.wait()
        await nudge()

    def kill(pid: int) -> None:
        sql(standby_dsn, "SELECT pg_terminate_backend(%s)", params=(pid,))

    async with open_stream(standby_dsn, "killed_creating", temporary=True, status_interval=0.2,
                           log_standby_snapshot=held_nudge) as stream:
        held = True
        kill(stream.backend_pid)  # the temporary slot goes with it: the next one is created
        with trio.fail_after(10):
            await waiting.wait()
        kill(stream.backend_pid)  # while it waits for the primary
        go_on.set()
        with trio.fail_after(20):
            async for event in stream:  # a gap says a new slot starts after the old one
                if isinstance(event, StreamGap):
                    sql(primary_dsn, "INSERT INTO t VALUES (1)")
                if isinstance(event, Insert):
                    break
        assert event.new == {"id": 1}


async def test_a_node_on_a_standby_decodes_there_and_queries_its_primary(pair: Pair) -> None:
    """``cdcddp serve --dsn STANDBY --primary-dsn PRIMARY``: the slot and the stream on the
    standby; snapshots, methods and logins on the primary, and a method's ``updated`` still
    after its writes reached the subscriber (through the standby's stream)."""
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, (ROOT / "schema/accounts.sql").read_text(),
        (ROOT / "schema/todos.sql").read_text(),
        "INSERT INTO lists (id, name) VALUES ('before', 'in the snapshot')")
    pair.replayed()
    slot = "node_on_standby"
    metrics_port = free_port()
    async with serving(standby_dsn, slot, TODOS, "--metrics-listen",
                       f"127.0.0.1:{metrics_port}",
                       env={"CDCDDP_PRIMARY_DSN": primary_dsn}) as served, \
            connect(served.url) as client:
        await client.subscribe("lists.public")
        # A new observer waits for the stream to reach a mark written after its snapshot:
        # written on the primary (the standby would refuse it, and the observer would not
        # wait for the stream).
        _, _, body = await get(metrics_port, "/metrics")
        assert "cdcddp_observer_catch_up_timeouts_total 0.0" in body.decode().splitlines()
        assert names(client) == {"before": "in the snapshot"}
        sql(primary_dsn, "INSERT INTO lists (id, name) VALUES ('after', 'streamed')")
        await client.wait_for(lambda: names(client).get("after") == "streamed")

        # A method writes on the primary; its result and updated follow its change.
        list_id = await client.call("lists.insert", {"name": "by method"}, wait_updated=True)
        assert names(client)[list_id] == "by method"
        assert sql(primary_dsn, "SELECT name FROM lists WHERE id = %s",
                   params=(list_id,)) == [("by method",)]

        # Signing up and logging in store resume tokens: on the primary too.
        digest = {"digest": hashlib.sha256(b"pw").hexdigest(), "algorithm": "sha-256"}
        user = await client.call("createUser", {"username": "ann", "password": digest})
        assert user["id"] and user["token"]
        await client.subscribe("lists.private")
        private = await client.call("lists.makePrivate", {"listId": list_id},
                                    wait_updated=True)
        assert private is None
        assert client.collections["lists"][list_id]["userId"] == user["id"]

        # The slot's status and the metrics' poll read the standby's position.
        status = subprocess.run([*CDCDDP, "slot", "status", "--dsn", standby_dsn, "--slot",
                                 slot, "--json"],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["retained_wal_bytes"] >= 0
        (wal_status, active, lag, *_), = sql(standby_dsn, SLOT_STATUS_SQL, params=(slot,))
        assert (wal_status, active) == ("reserved", True) and lag >= 0
        output = served.output()
    assert "Traceback" not in output and "WARNING" not in output, output


async def test_a_node_on_a_standby_carries_on_when_the_standby_is_promoted() -> None:
    """Failover with the node on the standby: ``primary_dsn`` lists both servers with
    ``target_session_attrs=read-write``, so once the primary is gone and the standby
    promoted, the node's queries and methods reach the promoted server; its slot and stream
    (on the promoted server all along) carry on, with no change lost and no resync."""
    with throwaway_cluster("cdcddp-primary-", **standby_server()) as primary, \
            streaming_standby(primary) as standby:
        sql(primary.dsn(), "CREATE DATABASE failover")
        primary_dsn, standby_dsn = primary.dsn("failover"), standby.dsn("failover")
        sql(primary_dsn, (ROOT / "schema/accounts.sql").read_text(),
            (ROOT / "schema/todos.sql").read_text(),
            "INSERT INTO lists (id, name) VALUES ('before', 'in the snapshot')")
        wait_replayed(primary.dsn(), standby.dsn())
        either = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} "
                  f"user={primary.superuser} dbname=failover target_session_attrs=read-write")
        async with serving(standby_dsn, "failover", TODOS,
                           env={"CDCDDP_PRIMARY_DSN": either}) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            assert names(client) == {"before": "in the snapshot"}
            await client.call("lists.insert", {"name": "on the primary"}, wait_updated=True)

            # The primary is lost; its last commit reached the standby (synchronous
            # replication would ensure that): the standby is promoted.
            sql(primary_dsn, "INSERT INTO lists (id, name) VALUES ('last', 'last commit')")
            wait_replayed(primary_dsn, standby_dsn)
            primary.stop("immediate")
            assert sql(standby_dsn, "SELECT pg_promote()") == [(True,)]
            await client.wait_for(lambda: names(client).get("last") == "last commit", 10)

            # A method now writes on the promoted server, and its change reaches the client
            # through the same slot.
            with trio.fail_after(30):
                list_id = await client.call("lists.insert", {"name": "after the failover"},
                                            wait_updated=True)
            assert names(client)[list_id] == "after the failover"
            sql(standby_dsn, "UPDATE lists SET name = 'any writer' WHERE id = 'before'")
            await client.wait_for(lambda: names(client)["before"] == "any writer", 10)
            output = served.output()
        assert "Traceback" not in output, output
        assert sql(standby_dsn, "SELECT count(*) FROM pg_replication_slots WHERE "
                                "slot_name = 'failover'") == [(1,)]


async def test_a_node_on_a_standby_follows_it_to_another_promoted_standby() -> None:
    """Failover to *another* standby: the node's standby is pointed at the promoted one and
    follows it onto its new timeline; the node's slot there carries on (no change lost, no
    resync), and its queries and methods reach the new primary through ``primary_dsn``."""
    with throwaway_cluster("cdcddp-primary-", **standby_server()) as primary, \
            streaming_standby(primary) as node_standby, \
            streaming_standby(primary) as other:
        sql(primary.dsn(), "CREATE DATABASE follow")
        sql(primary.dsn("follow"), (ROOT / "schema/accounts.sql").read_text(),
            (ROOT / "schema/todos.sql").read_text(),
            "INSERT INTO lists (id, name) VALUES ('before', 'in the snapshot')")
        for standby in (node_standby, other):
            wait_replayed(primary.dsn(), standby.dsn())
        either = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{other.port} "
                  f"user={primary.superuser} dbname=follow target_session_attrs=read-write")
        async with serving(node_standby.dsn("follow"), "follow", TODOS,
                           env={"CDCDDP_PRIMARY_DSN": either}) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            assert names(client) == {"before": "in the snapshot"}
            await client.call("lists.insert", {"name": "on the primary"}, wait_updated=True)
            sql(primary.dsn("follow"), "INSERT INTO lists (id, name) VALUES ('last', 'kept')")
            for standby in (node_standby, other):
                wait_replayed(primary.dsn(), standby.dsn())
            await client.wait_for(lambda: names(client).get("last") == "kept", 10)

            primary.stop("immediate")
            assert sql(other.dsn(), "SELECT pg_promote()") == [(True,)]
            # What an operator (or Patroni) does: the node's standby streams from the new
            # primary, through a physical slot there that keeps what its slot needs.
            (physical,), = sql(node_standby.dsn(), "SHOW primary_slot_name")
            sql(other.dsn(), f"SELECT pg_create_physical_replication_slot('{physical}')")
            sql(node_standby.dsn(),
                f"ALTER SYSTEM SET primary_conninfo = 'host=127.0.0.1 port={other.port} "
                f"user={other.superuser}'", "SELECT pg_reload_conf()")

            with trio.fail_after(30):
                list_id = await client.call("lists.insert", {"name": "after the failover"},
                                            wait_updated=True)
            assert names(client)[list_id] == "after the failover"
            sql(other.dsn("follow"), "UPDATE lists SET name = 'any writer' WHERE id = 'before'")
            await client.wait_for(lambda: names(client)["before"] == "any writer", 10)
            assert sql(node_standby.dsn(), "SELECT received_tli FROM pg_stat_wal_receiver"
                       ) == [(2,)]
            assert names(client) == public_lists(other.dsn("follow"))
            output = served.output()
        assert "Traceback" not in output, output
        assert "stream gap" not in output, output


def test_serve_refuses_a_standby_without_its_primary_in_one_sentence(pair: Pair) -> None:
    _, standby_dsn = pair.database()

    def serve(dsn: str, *extra: str) -> str:
        done = subprocess.run(serve_command(dsn, "refused", TODOS, *extra),
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        (line,) = done.stderr.strip().splitlines()
        return line

    assert serve(standby_dsn) == f"cdcddp: dsn connects to a standby: {STANDBY_NEEDS_PRIMARY}"
    assert serve(standby_dsn, "--primary-dsn", standby_dsn) == (
        "cdcddp: primary_dsn connects to a standby: point --primary-dsn at the primary.")
    with throwaway_cluster("cdcddp-other-") as other:
        assert serve(standby_dsn, "--primary-dsn", other.dsn()) == (
            "cdcddp: dsn and primary_dsn connect to different clusters (their system "
            "identifiers differ): point --dsn at a standby of that primary, or at the primary "
            "itself.")
    assert serve(standby_dsn, "--primary-dsn", pair.primary.dsn(), "--failover-slot") == (
        "cdcddp: failover_slot: a slot on a standby cannot be a failover slot (the standby's "
        "own slot carries on when it is promoted): turn failover_slot off.")


def test_check_on_a_standby_needs_its_primary_and_verifies_the_plugin_there(pair: Pair
                                                                           ) -> None:
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, (ROOT / "schema/accounts.sql").read_text(),
        (ROOT / "schema/todos.sql").read_text())
    pair.replayed()

    def check(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CDCDDP, "-v", "check", TODOS, "--dsn", standby_dsn, *extra],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    alone = check()
    assert alone.returncode == 1
    assert f"error: the server is a standby: {STANDBY_NEEDS_PRIMARY}" \
        in alone.stdout.splitlines()
    started = time.monotonic()
    paired = check("--primary-dsn", primary_dsn)
    assert paired.returncode == 0, paired.stdout + paired.stderr
    # Its temporary slot was created within moments (the primary was asked to log its
    # running transactions), so wal2json was really verified there.
    assert "ok: wal2json is installed." in paired.stdout.splitlines()
    assert "ok: the server is a standby that can decode." in paired.stdout.splitlines()
    assert time.monotonic() - started < 8
    # What serve would refuse of primary_dsn, check reports too.
    swapped = subprocess.run([*CDCDDP, "check", TODOS, "--dsn", primary_dsn,
                              "--primary-dsn", standby_dsn],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert swapped.returncode == 1, swapped.stdout + swapped.stderr
    assert ("error: primary_dsn connects to a standby: point --primary-dsn at the primary."
            in swapped.stdout.splitlines())


async def test_a_slot_the_standby_invalidated_in_a_conflict_is_named_with_the_fix(
        pair: Pair) -> None:
    """With hot_standby_feedback off, VACUUM on the primary removes catalog rows a standby's
    logical slot still needs, and replaying it invalidates the slot (as PostgreSQL's own
    tests of decoding on a standby do it)."""
    primary_dsn, standby_dsn = pair.database()
    slot = "conflicted"
    async with open_stream(standby_dsn, slot, log_standby_snapshot=log_standby_snapshot(pair)):
        pass  # created, and kept
    sql(pair.standby.dsn(), "ALTER SYSTEM SET hot_standby_feedback = off",
        "SELECT pg_reload_conf()")
    try:
        deadline = time.monotonic() + 10
        while sql(pair.primary.dsn(), "SELECT xmin FROM pg_replication_slots "
                                      "WHERE slot_type = 'physical'") != [(None,)]:
            assert time.monotonic() < deadline, "the primary still holds the standby's xmin"
            time.sleep(0.05)
        sql(primary_dsn, "CREATE TABLE churn (x int)", "DROP TABLE churn", "VACUUM FULL pg_class")
        pair.replayed()
        assert sql(standby_dsn, "SELECT conflicting FROM pg_replication_slots "
                                "WHERE slot_name = %s", params=(slot,)) == [(True,)]
    finally:
        sql(pair.standby.dsn(), "ALTER SYSTEM SET hot_standby_feedback = on",
            "SELECT pg_reload_conf()")

    if sql(standby_dsn, "SHOW server_version_num")[0][0] >= "170000":  # (same digit count)
        # PostgreSQL 17 says why (invalidation_reason)
        cause = ("by a conflict with recovery on this standby (the primary removed rows it "
                 "still needed)")
        prevention = "prevents it"
    else:  # 16 only that it was invalidated (conflicting)
        cause = ("on this standby, by a conflict with recovery (the primary removed rows it "
                 "still needed, or its wal_level went below logical) or for want of WAL "
                 "(max_slot_wal_keep_size); PostgreSQL 16 does not say which")
        prevention = "prevents the first"
    fix = (f"replication slot '{slot}' was invalidated {cause}: drop it (cdcddp slot drop "
           f"--slot {slot}) and create a new one, then resync; hot_standby_feedback = on on the "
           f"standby {prevention}.")
    done = await trio.to_thread.run_sync(lambda: subprocess.run(
        [*CDCDDP, "tail", "--dsn", standby_dsn, "--slot", slot, "--no-create"],
        capture_output=True, text=True, timeout=30, cwd=ROOT))
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == f"cdcddp: {fix}"
    checked = subprocess.run([*CDCDDP, "check", TODOS, "--dsn", standby_dsn, "--slot", slot],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert checked.returncode == 1
    assert f"error: {fix}" in checked.stdout.splitlines()


# The oracle with the server decoding on the standby and querying the primary: the acceptance
# test for serving from a standby. It found two bugs on the way (a walsender killed while it
# created the slot stopped the stream; a limited observer kept two ranks for a row fetched
# ahead of the stream), and that a standby's own snapshots cannot be used (a version went back).


async def test_the_oracle_holds_on_a_standby(pair: Pair) -> None:
    """The correctness oracle with the server decoding on the standby (a persistent slot
    there, its walsender killed mid-way), querying the primary, and every writer on the
    primary."""
    primary_dsn, standby_dsn = pair.database()
    try:
        await run_oracle(standby_dsn, primary_dsn=primary_dsn, seed=SEED, transactions=120,
                         writers=3, subscription_steps=30, clients=8, kills=1,
                         temporary_slot=False)
    finally:
        pair.drop_slots(standby_dsn)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
async def test_the_oracle_holds_on_a_standby_long(pair: Pair, seed: int) -> None:
    primary_dsn, standby_dsn = pair.database()
    try:
        await run_oracle(standby_dsn, primary_dsn=primary_dsn, seed=seed, transactions=1500,
                         writers=4, subscription_steps=300, clients=8, kills=3,
                         temporary_slot=seed % 2 == 0, migrations=seed % 3 == 0,
                         partitioned=seed % 4 == 1)
    finally:
        pair.drop_slots(standby_dsn)


def test_the_slot_and_tail_commands_on_a_standby_ask_its_primary(pair: Pair) -> None:
    """``cdcddp slot create`` and ``cdcddp tail`` on a standby take --primary-dsn, so that
    creating their slot does not wait for the primary's own record (every 15 s)."""
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    started = time.monotonic()
    created = subprocess.run([*CDCDDP, "slot", "create", "--dsn", standby_dsn, "--slot",
                              "by_cli", "--primary-dsn", primary_dsn],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert created.returncode == 0, created.stderr
    assert time.monotonic() - started < 8

    tail = subprocess.Popen([*CDCDDP, "tail", "--dsn", standby_dsn, "--slot", "tailed",
                             "--temporary", "--primary-dsn", primary_dsn],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 8
        # (Active from the start of its creation; consistent once it has a position.)
        while sql(standby_dsn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name = "
                               "'tailed' AND confirmed_flush_lsn IS NOT NULL") == [(0,)]:
            if time.monotonic() > deadline or tail.poll() is not None:
                tail.kill()
                raise AssertionError(f"tail did not start: {tail.communicate()[1]!r}")
            time.sleep(0.05)
        sql(primary_dsn, "INSERT INTO t VALUES (7)")
        assert tail.stdout is not None
        ready, _, _ = select.select([tail.stdout], [], [], 10)
        assert ready, "tail printed nothing"
        lines = [json.loads(tail.stdout.readline()) for _ in range(3)]  # begin, insert, commit
        assert lines[1]["action"] == "I" and lines[1]["new"] == {"id": 7}
    finally:
        tail.send_signal(signal.SIGTERM)
        assert tail.wait(10) == 0
    pair.drop_slots(standby_dsn)


def test_a_snapshot_on_a_standby_lists_no_running_transactions(pair: Pair) -> None:
    """Why serving from a standby is refused: pg_current_snapshot() taken during recovery
    leaves out the transactions still running on the primary (the standby keeps them as
    subtransactions), so it cannot say which concurrent commits a snapshot saw. If a
    PostgreSQL release changes this, the refusal can be looked at again."""
    primary_dsn, standby_dsn = pair.database()
    sql(primary_dsn, "CREATE TABLE t (id int PRIMARY KEY)")
    with psycopg.connect(primary_dsn) as running:
        running.execute("INSERT INTO t VALUES (1)")
        (xid,), = running.execute("SELECT pg_current_xact_id()::text::bigint").fetchall()
        sql(primary_dsn, "INSERT INTO t VALUES (2)")  # a later commit: xmax passes xid
        pair.replayed()
        (on_primary, sees_it), = sql(
            primary_dsn, "SELECT pg_current_snapshot()::text, "
                         "pg_visible_in_snapshot(%s::text::xid8, pg_current_snapshot())",
            params=(xid,))
        (on_standby, standby_sees_it), = sql(
            standby_dsn, "SELECT pg_current_snapshot()::text, "
                         "pg_visible_in_snapshot(%s::text::xid8, pg_current_snapshot())",
            params=(xid,))
        assert sql(standby_dsn, "SELECT id FROM t") == [(2,)]  # its row is not visible...
        assert str(xid) in on_primary.split(":")[2].split(",") and not sees_it
        assert on_standby.split(":")[2] == "" and standby_sees_it  # ...yet it looks visible
        running.rollback()
