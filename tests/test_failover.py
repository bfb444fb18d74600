"""A node on the primary, through a failover to its standby (PostgreSQL 17 failover slots).

The node's slot is a failover slot (``failover_slot``); the standby keeps a copy of it
(``pg_sync_replication_slots()``, what its slotsync worker does with
``sync_replication_slots = on``). When the primary is lost and the standby promoted, the
node's DSN (both servers, ``target_session_attrs=read-write``) reaches the promoted server,
where the copy lets it resume: no change lost, no resync. Without
``synchronized_standby_slots`` on the primary the node can deliver commits the standby never
got; after the failover they are gone, and the node must notice it (the history forked
before them), resync, and stream the new history from where it parts.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.client import DDPClient, MeteorError, connect
from cdcddp.devcluster import PG17_BINDIR, LocalCluster, streaming_standby, throwaway_cluster
from cdcddp.wal.preflight import Finding, check_failover_slot
from cdcddp.wal.slot import running_xacts_logged
from tests.pg_support import sql, wait_replayed
from tests.test_serve import ROOT, TODOS, names, public_lists, serve_command, serving
from tests.test_standby import _postgres17


@contextmanager
def failover_pair(synchronized: bool) -> Iterator[tuple[LocalCluster, LocalCluster, str]]:
    """A PostgreSQL 17 primary with a database ``shop`` (the Todos schema), a standby that
    can copy its failover slots, and a DSN naming both that reaches the writable one.
    ``synchronized``: the primary's logical walsenders wait for the standby
    (``synchronized_standby_slots``)."""
    with throwaway_cluster("cdcddp-primary-", chroot=_postgres17(),
                           bindir=PG17_BINDIR) as primary:
        with streaming_standby(
                primary, primary_conninfo=f"'host=127.0.0.1 port={primary.port} "
                                          f"user={primary.superuser} dbname=postgres'") as standby:
            if synchronized:
                (physical,), = sql(primary.dsn(), "SELECT slot_name FROM pg_replication_slots "
                                                  "WHERE slot_type = 'physical'")
                sql(primary.dsn(), f"ALTER SYSTEM SET synchronized_standby_slots = '{physical}'",
                    "SELECT pg_reload_conf()")
            # The node confirms its position every wal_sender_timeout / 3 (at most 10 s): the
            # standby's copy of its slot becomes usable once that passed a running-xacts record.
            sql(primary.dsn(), "ALTER SYSTEM SET wal_sender_timeout = '1500ms'",
                "SELECT pg_reload_conf()")
            sql(primary.dsn(), "CREATE DATABASE shop")
            sql(primary.dsn("shop"), (ROOT / "schema/accounts.sql").read_text(),
                (ROOT / "schema/todos.sql").read_text(),
                "INSERT INTO users (id, username) VALUES ('u1', 'ann')",
                "INSERT INTO lists (id, name) VALUES ('before', 'in the snapshot')",
                "INSERT INTO todos (id, list_id, text) VALUES ('t1', 'before', 'a todo')")
            wait_replayed(primary.dsn(), standby.dsn())
            either = (f"host=127.0.0.1,127.0.0.1 port={primary.port},{standby.port} "
                      f"user={primary.superuser} dbname=shop target_session_attrs=read-write")
            yield primary, standby, either


def copy_slot_to_standby(primary: LocalCluster, standby: LocalCluster, slot: str) -> None:
    """Until the standby holds a usable copy of the primary's failover slot (a copy is
    temporary until the standby has replayed what the slot needs)."""
    deadline = time.monotonic() + 60
    while True:
        sql(primary.dsn(), "SELECT pg_log_standby_snapshot()")
        wait_replayed(primary.dsn(), standby.dsn())
        sql(standby.dsn(), "SELECT pg_sync_replication_slots()")
        if sql(standby.dsn(), "SELECT synced AND NOT temporary FROM pg_replication_slots "
                              "WHERE slot_name = %s", params=(slot,)) == [(True,)]:
            return
        assert time.monotonic() < deadline, "the standby did not copy the failover slot"
        time.sleep(0.2)


def todos(client: DDPClient) -> dict[str, Any]:
    return client.collections.get("todos", {})


def slot_finding(primary: LocalCluster, slot: str) -> Finding:
    """What ``cdcddp check --slot`` says of the node's slot being a failover slot."""
    with psycopg.connect(primary.dsn("shop"), autocommit=True) as conn:
        finding = check_failover_slot(conn, slot)
    assert finding is not None
    return finding


def cut_off(standby: LocalCluster) -> None:
    """The standby stops receiving WAL: what the primary commits from now on it never gets."""
    sql(standby.dsn(), "ALTER SYSTEM SET primary_conninfo = ''", "SELECT pg_reload_conf()")
    deadline = time.monotonic() + 10
    while sql(standby.dsn(), "SELECT count(*) FROM pg_stat_wal_receiver") != [(0,)]:
        assert time.monotonic() < deadline, "the standby kept receiving"
        time.sleep(0.05)


def fail_over(primary: LocalCluster, standby: LocalCluster) -> None:
    primary.stop("immediate")
    assert sql(standby.dsn(), "SELECT pg_promote()") == [(True,)]


async def test_a_node_resumes_from_its_failover_slot_on_the_promoted_standby() -> None:
    with failover_pair(synchronized=True) as (primary, standby, either):
        async with serving(either, "shop_node", TODOS,
                           env={"CDCDDP_FAILOVER_SLOT": "true"}) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            assert names(client) == {"before": "in the snapshot"}
            assert sql(primary.dsn("shop"), "SELECT failover FROM pg_replication_slots "
                                            "WHERE slot_name = 'shop_node'") == [(True,)]
            await client.call("lists.insert", {"name": "on the primary"}, wait_updated=True)
            assert slot_finding(primary, "shop_node").code == "failover_slot"
            copy_slot_to_standby(primary, standby, "shop_node")
            # The copy is not for a node on the standby: one sentence says so.
            refused = subprocess.run(
                serve_command(standby.dsn("shop"), "shop_node", TODOS, "--primary-dsn",
                              primary.dsn("shop")),
                capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert refused.returncode != 0 and "Traceback" not in refused.stderr
            assert refused.stderr.strip().splitlines()[-1] == (
                "cdcddp: replication slot 'shop_node' on this standby is a copy of its "
                "primary's failover slot, which cannot be decoded before the standby is "
                "promoted: choose another --slot for a node on this standby.")

            # Commits after the copy: the node resumes past them (its own position), the
            # copy's is older.
            sql(primary.dsn("shop"), "INSERT INTO lists (id, name) VALUES ('last', 'kept')")
            await client.wait_for(lambda: names(client).get("last") == "kept", 10)
            fail_over(primary, standby)

            with trio.fail_after(30):
                list_id = await client.call("lists.insert", {"name": "after the failover"},
                                            wait_updated=True)
            sql(standby.dsn("shop"), "UPDATE lists SET name = 'any writer' WHERE id = 'before'")
            await client.wait_for(lambda: names(client).get("before") == "any writer", 10)
            assert names(client)[list_id] == "after the failover"
            assert names(client) == public_lists(standby.dsn("shop"))
            output = served.output()
        assert "Traceback" not in output and "out of order" not in output, output
        assert "stream gap" not in output, output  # resumed: no resync
        assert sql(standby.dsn("shop"), "SELECT failover FROM pg_replication_slots "
                                        "WHERE slot_name = 'shop_node'") == [(True,)]


@pytest.mark.parametrize("failover_slot", [True, False])
async def test_commits_the_promoted_standby_never_got_are_taken_back_from_clients(
        failover_slot: bool) -> None:
    """Without ``synchronized_standby_slots`` the node delivers commits the standby never got
    (cut off here). After the failover they are gone: the node sees that the new history
    left the old one before them, resyncs (the client loses them) and streams the new
    history from the fork, so the promoted server's first commits are not skipped (the node
    had read far past the fork on the old primary). Without a failover slot, the node
    creates a slot on the promoted server: the same holds. A publication function's read
    (``todos.inList`` reads its list) follows the new history at once: it is not held
    waiting for the vanished transaction that last changed the row it read."""
    with failover_pair(synchronized=False) as (primary, standby, either):
        async with serving(either, "shop_node", TODOS,
                           env={"CDCDDP_FAILOVER_SLOT": str(failover_slot)}) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            await client.subscribe("todos.inList", {"listId": "before"})
            assert set(todos(client)) == {"t1"}
            if failover_slot:
                finding = slot_finding(primary, "shop_node")
                assert (finding.severity, finding.code) == ("warning",
                                                            "failover_unsynchronized")
                copy_slot_to_standby(primary, standby, "shop_node")

            cut_off(standby)
            # Megabytes of WAL the standby does not get, then commits the client sees (with
            # xids the promoted server will not give out soon: 2,000 are used up first).
            sql(primary.dsn("shop"), "DO $$ BEGIN FOR i IN 1..2000 LOOP "
                                     "PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
            sql(primary.dsn("shop"), "CREATE TABLE padding (t text)",
                "INSERT INTO padding SELECT repeat('x', 500) FROM generate_series(1, 8000)",
                "INSERT INTO lists (id, name) VALUES ('lost', 'only on the old primary')",
                "UPDATE lists SET user_id = 'u1' WHERE id = 'before'")  # private: hidden
            await client.wait_for(lambda: "lost" in names(client) and "before" not in
                                  names(client) and not todos(client), 10)
            fail_over(primary, standby)

            sql(standby.dsn("shop"), "INSERT INTO lists (id, name) VALUES ('new1', 'first')")
            sql(standby.dsn("shop"), "INSERT INTO lists (id, name) VALUES ('new2', 'second')")
            await client.wait_for(lambda: "lost" not in names(client)
                                  and {"before", "new1", "new2"} <= set(names(client)), 20)
            # (A function waiting for the vanished transaction would run after 10 s.)
            await client.wait_for(lambda: set(todos(client)) == {"t1"}, 5)
            sql(standby.dsn("shop"), "UPDATE lists SET user_id = 'u1' WHERE id = 'before'")
            await client.wait_for(lambda: not todos(client), 5)
            sql(standby.dsn("shop"), "UPDATE lists SET name = 'streamed' WHERE id = 'new1'")
            await client.wait_for(lambda: names(client).get("new1") == "streamed", 10)
            assert names(client) == public_lists(standby.dsn("shop"))
            output = served.output()
        assert "left timeline 1" in output, output
        assert "Traceback" not in output and "out of order" not in output, output


async def test_a_method_committed_before_the_node_sees_the_fork_waits_for_its_change() -> None:
    """The write fence across a forked failover. The node delivered a commit the promoted
    server never got; the promoted server gives its xid again, to the first transaction it
    runs: here a method's, committed before the node's stream is back (its slot there is
    busy until then). ``updated`` must wait until the client has the method's change: the
    delivered xid belongs to the history left behind, and the node can only tell once its
    stream has reconnected and seen the fork. The stream's attempts while the slot is busy
    must not make it forget which history it read: the fork is still told at the attempt
    that succeeds."""
    with failover_pair(synchronized=False) as (primary, standby, either):
        async with serving(either, "shop_node", TODOS) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            # The node's slot on the standby, busy until the test lets the stream have it.
            with running_xacts_logged(primary.dsn("shop")):
                sql(standby.dsn("shop"), "SELECT pg_create_logical_replication_slot("
                                         "'shop_node', 'wal2json')")
            holder = psycopg.connect(standby.dsn("shop"), autocommit=True,
                                     replication="database")
            holder.execute("START_REPLICATION SLOT shop_node LOGICAL 0/0")
            cut_off(standby)
            (xid,), = sql(primary.dsn("shop"),
                          "INSERT INTO lists (id, name) VALUES ('lost', 'only on the old primary') "
                          "RETURNING pg_current_xact_id()::text")
            await client.wait_for(lambda: "lost" in names(client), 10)
            fail_over(primary, standby)
            (next_xid,), = sql(standby.dsn("shop"), "SELECT pg_snapshot_xmax("
                                                    "pg_current_snapshot())::text")
            assert next_xid == xid  # the method's transaction is given the delivered xid

            deadline = time.monotonic() + 20
            while True:
                call = await client.apply("lists.insert", [{"name": "by a method"}])
                try:
                    list_id = await call.result()
                    break
                except MeteorError as exc:  # the pool's connection to the lost primary
                    assert exc.error == 503 and time.monotonic() < deadline, exc
                    await trio.sleep(0.1)
            (method_xid,), = sql(standby.dsn("shop"), "SELECT xmin::text FROM lists "
                                                      "WHERE id = %s", params=(list_id,))
            assert method_xid == xid
            with trio.move_on_after(2):
                await call.updated_received.wait()
            # Before the stream is back, the change cannot have come: nor may `updated`.
            assert list_id not in names(client)
            assert not call.updated_received.is_set()
            holder.close()  # (not "with": leaving it would COMMIT in the middle of COPY BOTH)
            with trio.fail_after(30):
                await call.updated_received.wait()
            assert names(client).get(list_id) == "by a method"  # before `updated`
            assert "lost" not in names(client)
            output = served.output()
        assert "left timeline 1" in output, output
        assert "Traceback" not in output, output


def crash(cluster: LocalCluster) -> None:
    """The server is lost at once, as with its machine: every process of it killed."""
    postmaster = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    children = [int(stat.parent.name) for stat in Path("/proc").glob("[0-9]*/stat")
                if _parent_pid(stat) == postmaster]
    for pid in [postmaster, *children]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _parent_pid(stat: Path) -> int | None:
    try:
        return int(stat.read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


async def test_a_method_whose_commit_a_failover_took_before_the_node_got_it_gets_updated(
        ) -> None:
    """A method commits on the primary, whose walsender for the node is stopped: the node
    never receives the commit. The primary is lost and the standby, which never got it
    either, promoted. The node resumes from its failover slot there: it had delivered
    nothing the promoted server lacks (no fork, no resync), but the method's commit is gone
    and its xid is one the promoted server has not given out: without asking, its write
    fence would wait until some other transaction gets that xid. The node asks the new
    primary about the commits its fences wait for (``TimelineSwitch``) and ends theirs."""
    with failover_pair(synchronized=False) as (primary, standby, either):
        async with serving(either, "shop_node", TODOS,
                           env={"CDCDDP_FAILOVER_SLOT": "true"}) as served, \
                connect(served.url) as client:
            await client.subscribe("lists.public")
            copy_slot_to_standby(primary, standby, "shop_node")
            cut_off(standby)
            (walsender,), = sql(primary.dsn(), "SELECT active_pid FROM pg_replication_slots "
                                               "WHERE slot_name = 'shop_node'")
            os.kill(walsender, signal.SIGSTOP)
            call = await client.apply("lists.insert", [{"name": "taken by the failover"}])
            list_id = await call.result()
            with trio.move_on_after(1):
                await call.updated_received.wait()
            assert not call.updated_received.is_set() and list_id not in names(client)
            crash(primary)
            assert sql(standby.dsn(), "SELECT pg_promote()") == [(True,)]
            with trio.fail_after(30):
                await call.updated_received.wait()
            assert list_id not in names(client)
            sql(standby.dsn("shop"), "INSERT INTO lists (id, name) VALUES ('new1', 'first')")
            await client.wait_for(lambda: "new1" in names(client), 10)
            assert names(client) == public_lists(standby.dsn("shop"))
            output = served.output()
        assert "switched from timeline 1 to 2" in output, output
        assert "resyncing" not in output and "Traceback" not in output, output
