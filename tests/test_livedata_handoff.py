"""The snapshot/stream handoff (DESIGN invariant 2) against real PostgreSQL: forced races, and
subscriptions racing continuous writers."""

from __future__ import annotations

import contextlib
import random
import threading
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.client import connect
from cdcddp.metrics import Metrics
from cdcddp.publish.routes import ObserverEntry
from tests.livedata_support import (
    asql,
    check_message_log,
    data_messages,
    expected_view,
    live_server,
    scraped,
    store,
    wait_store,
)
from tests.pg_support import (
    held_commit,
    release_commit_wait,
    settled,
    standby_that_never_answers,
)


async def test_transaction_delivered_between_snapshot_and_registration_is_replayed(
        db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'before')")

        async def commit_and_deliver(entry: ObserverEntry) -> None:
            # After our snapshot, before we register: commit a change and let the stream
            # deliver it (into the ring) — the snapshot cannot have it.
            live.after_snapshot = None
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'late')")
            await asql(db_dsn, "UPDATE items SET title = 'before, changed', version = 1 "
                               "WHERE id = 1")
            await live.sync()

        live.after_snapshot = commit_and_deliver
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            assert live.ring_replays == 2
            assert store(client) == expected_view(db_dsn, [("items.all", [])])
            assert store(client)["1"]["title"] == "before, changed"
            assert "2" in store(client)
            check_message_log(client)


async def test_transactions_seen_by_the_snapshot_are_not_applied_again(db_dsn: str) -> None:
    metrics = Metrics()
    async with live_server(db_dsn, metrics=metrics) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.byCategory", {"category": "zzz"})  # table observed
            live.hold = trio.Event()  # the consumer stops before applying the next commit
            await asql(db_dsn, "UPDATE items SET title = 'v1', version = 1")
            await asql(db_dsn, "UPDATE items SET title = 'v2', version = 2")
            await client.subscribe("items.all")  # its snapshot already has v2
            assert store(client) == {"1": {"owner": None, "category": "a", "title": "v2",
                                           "body": None, "rank": 0, "version": 2}}
            skipped = live.skipped_by_snapshot
            live.hold.set()
            live.hold = None
            await live.sync()
            await client.ping()
            assert live.skipped_by_snapshot >= skipped + 2
            # Held: it could not wait for the stream (and registered ahead of it).
            assert scraped(metrics, "cdcddp_observer_catch_up_timeouts_total") == 1
            # v1 was never re-sent after v2: no `changed` at all
            assert [m["msg"] for m in data_messages(client)] == ["added"]


async def test_subscriptions_racing_continuous_writers_end_equal_to_sql(db_dsn: str) -> None:
    rng = random.Random(20261128)
    categories = ["a", "b", "c"]
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, rank) "
                           "SELECT (ARRAY['a','b','c'])[1 + i % 3], 't' || i, i % 10 "
                           "FROM generate_series(1, 60) i")
        writing = True
        written = [threading.Event() for _ in range(3)]

        def write_loop(seed: int) -> None:
            local = random.Random(seed)
            with contextlib.ExitStack() as stack:
                stack.callback(written[seed].set)
                conn = stack.enter_context(psycopg.connect(db_dsn, autocommit=True))
                while writing:
                    with conn.transaction():
                        for _ in range(local.randint(1, 4)):
                            item = local.randint(1, 80)
                            action = local.random()
                            if action < 0.6:
                                conn.execute(
                                    "UPDATE items SET category = %s, rank = %s, "
                                    "version = version + 1 WHERE id = %s",
                                    (local.choice(categories), local.randint(0, 9), item))
                            elif action < 0.8:
                                conn.execute("INSERT INTO items (category, title, rank) "
                                             "VALUES (%s, 'new', %s)",
                                             (local.choice(categories), local.randint(0, 9)))
                            else:
                                conn.execute("DELETE FROM items WHERE id = %s", (item,))

        async with trio.open_nursery() as writers:
            for n in range(3):
                writers.start_soon(trio.to_thread.run_sync, write_loop, n)
            clients = []
            async with connect(server.ws_url, log_messages=True) as c1, \
                    connect(server.ws_url, log_messages=True) as c2, \
                    connect(server.ws_url, log_messages=True) as c3, \
                    connect(server.ws_url, log_messages=True) as c4:
                clients = [c1, c2, c3, c4]
                subscriptions: dict[int, dict[str, tuple[str, list[object]]]] = {
                    i: {} for i in range(len(clients))}
                for _ in range(40):
                    i = rng.randrange(len(clients))
                    client, held = clients[i], subscriptions[i]
                    if held and rng.random() < 0.3:
                        sub_id = rng.choice(sorted(held))
                        del held[sub_id]
                        await client.unsubscribe(sub_id)
                    elif rng.random() < 0.5:
                        params: list[object] = [{"category": rng.choice(categories)}]
                        held[await client.subscribe("items.byCategory", *params)] = (
                            "items.byCategory", params)
                    else:
                        params = [rng.randint(0, 9)]
                        held[await client.subscribe("items.ranked", *params)] = (
                            "items.ranked", params)
                    await trio.sleep(rng.random() * 0.02)
                writing = False
                # Every writer's last transaction is over (under load one can take long).
                assert await trio.to_thread.run_sync(
                    lambda: all(done.wait(30) for done in written))
                await server.live.sync()
                for i, client in enumerate(clients):
                    await wait_store(client, expected_view(db_dsn, list(subscriptions[i].values())))
                    check_message_log(client)
        live = server.live
        assert live.snapshot_queries >= 10


async def test_huge_transaction_is_applied_in_chunks_and_seen_whole(db_dsn: str) -> None:
    async with live_server(db_dsn, max_transaction_buffer=50) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'seed')")
        async with connect(server.ws_url, log_messages=True) as client, \
                connect(server.ws_url, log_messages=True) as late:
            await client.subscribe("items.byCategory", {"category": "a"})
            mark = len(client.messages or [])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, _big_transaction, db_dsn)
                # A subscription racing the chunked transaction still ends exact.
                await late.subscribe("items.byCategory", {"category": "a"})
            await server.live.sync()
            expected = expected_view(db_dsn, [("items.byCategory", [{"category": "a"}])])
            assert len(expected) == 401
            await wait_store(client, expected)
            await wait_store(late, expected)
            # the inserts and updates of one transaction coalesce into one `added` each
            added = [m for m in data_messages(client, mark) if m["msg"] == "added"]
            assert len(added) == 400 and all(m["fields"]["version"] == 1 for m in added)
            check_message_log(client)
            check_message_log(late)


def _big_transaction(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("INSERT INTO items (category, title) "
                     "SELECT 'a', 'bulk ' || i FROM generate_series(1, 400) i")
        conn.execute("UPDATE items SET version = 1 WHERE title LIKE 'bulk%'")


# ---- commit order is not visibility order ---------------------------------------------------
# With synchronous_standby_names naming a standby that never connects, a commit is written to
# WAL (so logical decoding delivers it) and then waits, still invisible to new snapshots,
# until its wait is cancelled. That holds a transaction in PostgreSQL's own race window.


class InvisibleCommit:
    """UPDATE in a session whose commit is decoded but not yet visible (until ``release``)."""

    def __init__(self, dsn: str, admin_dsn: str, statement: str) -> None:
        self.dsn, self.admin_dsn, self.statement = dsn, admin_dsn, statement
        self.pid: int | None = None

    def _run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            self.pid = conn.info.backend_pid
            conn.execute("SET synchronous_commit = on")
            conn.execute(self.statement)  # returns once the wait is cancelled

    async def start(self, nursery: trio.Nursery) -> None:
        await asql(self.admin_dsn, "ALTER SYSTEM SET synchronous_standby_names = 'nobody'",
                   "SELECT pg_reload_conf()")
        await trio.to_thread.run_sync(settled, self.dsn, "synchronous_standby_names", "nobody")
        nursery.start_soon(trio.to_thread.run_sync, self._run)
        with trio.fail_after(10):
            while True:
                await trio.sleep(0.02)
                if self.pid is not None and await asql(
                        self.admin_dsn, "SELECT 1 FROM pg_stat_activity WHERE pid = %s "
                                        "AND wait_event = 'SyncRep'", params=(self.pid,)):
                    return

    async def release(self) -> None:
        await asql(self.admin_dsn, "ALTER SYSTEM RESET synchronous_standby_names",
                   "SELECT pg_reload_conf()")
        await trio.to_thread.run_sync(settled, self.dsn, "synchronous_standby_names", "")
        if self.pid is not None:
            await asql(self.admin_dsn, "SELECT pg_cancel_backend(%s)", params=(self.pid,))


def local_commit(dsn: str, *statements: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = local")  # not waiting for the missing standby
        for statement in statements:
            conn.execute(statement)


async def test_snapshot_is_retaken_while_a_delivered_commit_is_not_yet_visible(
        db_dsn: str, pg_cluster: Any) -> None:
    # Nothing kept beyond the pins: the snapshot must wait for the commit to be visible.
    async with live_server(db_dsn, ring_retain_changes=0) as server, \
            trio.open_nursery() as nursery:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.all")
            stuck = InvisibleCommit(db_dsn, pg_cluster.dsn(),
                                    "UPDATE items SET title = 'A', version = 1")
            try:
                await stuck.start(nursery)
                await wait_store(watcher, {"1": {**ROW, "title": "A", "version": 1}})
                # Delivered and applied; a new snapshot still has it in progress.
                async with trio.open_nursery() as subscribing:
                    subscribing.start_soon(client.subscribe, "items.byCategory",
                                           {"category": "a"})
                    with trio.fail_after(10):
                        while server.live.invisible_delivered_retries == 0:
                            await trio.sleep(0.01)
                    await stuck.release()
            finally:
                await stuck.release()
            assert store(client) == {"1": {**ROW, "title": "A", "version": 1}}
            check_message_log(client)


async def test_transactions_visible_out_of_commit_order_are_skipped(
        db_dsn: str, pg_cluster: Any) -> None:
    async with live_server(db_dsn) as server, trio.open_nursery() as nursery:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'q'), ('a', 'r')")
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.byCategory", {"category": "zzz"})  # table observed
            stuck = InvisibleCommit(db_dsn, pg_cluster.dsn(),
                                    "UPDATE items SET title = 'A', version = 1 WHERE id = 1")
            try:
                live.hold = trio.Event()  # nothing is delivered before the subscription
                await stuck.start(nursery)
                # B and C commit after A but are visible before it.
                await trio.to_thread.run_sync(
                    local_commit, db_dsn,
                    "UPDATE items SET title = 'B', version = 1 WHERE id = 2",
                    "UPDATE items SET title = 'C', version = 2 WHERE id = 2")
                await client.subscribe("items.all")  # sees B and C, not A
                assert store(client)["2"]["version"] == 2
                assert store(client)["1"]["version"] == 0
                skipped = live.skipped_by_snapshot
                live.hold.set()
                live.hold = None
                # A arrives (applied), then B and C (already in the snapshot: skipped, not
                # B's version 1 going back over C's 2).
                await wait_store(client, {"1": {**ROW, "title": "A", "version": 1},
                                          "2": {**ROW, "title": "C", "version": 2}})
            finally:
                if live.hold is not None:
                    live.hold.set()
                    live.hold = None
                await stuck.release()
            await live.sync()
            await client.ping()
            # (A busy client's merge box could even coalesce B-then-C away: look at the engine.)
            assert live.skipped_by_snapshot == skipped + 2
            check_message_log(client)
            assert [(m["msg"], m["id"]) for m in data_messages(client)] == [
                ("added", "1"), ("added", "2"), ("changed", "1")]


ROW: dict[str, Any] = {"owner": None, "category": "a", "title": "x", "body": None, "rank": 0,
                       "version": 0}


async def test_new_observer_is_not_ahead_of_the_stream(db_dsn: str) -> None:
    # A snapshot can see a commit the stream has not delivered yet. An observer registered
    # from it at once would be ahead of the older observers: a client moving from it to one
    # of those would see the row go back. The new observer waits for the stream instead.
    async with live_server(db_dsn) as server, trio.open_nursery() as nursery:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.byCategory", {"category": "a"})  # the older one
            live.hold = trio.Event()  # the stream's copy of the next commit waits
            await asql(db_dsn, "UPDATE items SET title = 'v1', version = 1")

            async def release_soon(entry: ObserverEntry) -> None:
                live.after_snapshot = None  # (its snapshot has v1)

                async def release() -> None:
                    await trio.sleep(0.5)
                    assert live.hold is not None
                    live.hold.set()
                    live.hold = None
                nursery.start_soon(release)

            live.after_snapshot = release_soon
            sub = await client.subscribe("items.all")
            assert live.hold is None  # ready only once the stream caught up
            await client.unsubscribe(sub)
            await client.subscribe("items.byCategory", {"category": "a"})
            assert store(client)["1"]["version"] == 1
            check_message_log(client)
            assert live.catch_up_timeouts == 0


class _SlowConsumer:
    """A consumer hold (``LiveData.hold``) that lets each commit through after a pause: the
    consumer keeps moving, slower than the writers (a busy machine)."""

    def __init__(self, pause: float) -> None:
        self.pause = pause

    async def wait(self) -> None:
        await trio.sleep(self.pause)


def _backlog(commits: int) -> str:
    """One statement committing ``commits`` one-row transactions to ``items`` row 2."""
    return (f"DO $$ BEGIN FOR i IN 1..{commits} LOOP "
            "UPDATE items SET rank = i WHERE id = 2; COMMIT; END LOOP; END $$")


async def test_a_new_observer_waits_for_a_consumer_that_is_behind_but_moving(
        db_dsn: str) -> None:
    """The consumer is more than ``catch_up_timeout`` behind a new snapshot, but moving: the
    new observer waits for it (while it is on course to arrive within ``catch_up_limit``)
    rather than register ahead of the stream, where a client moving from it to an older
    observer would see a row go back."""
    async with live_server(db_dsn, catch_up_timeout=0.3) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('b', 'y')")
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.byCategory", {"category": "a"})  # the older one
            await live.sync()
            live.hold = _SlowConsumer(0.003)  # type: ignore[assignment]
            # ~1.2 s of commits for the consumer, then row 1's new version.
            await asql(db_dsn, _backlog(400), "UPDATE items SET version = 1 WHERE id = 1")
            started = trio.current_time()
            sub = await client.subscribe("items.all", timeout=20)  # its snapshot has v1
            waited = trio.current_time() - started
            await client.subscribe("items.byCategory", {"category": "a"})
            await client.unsubscribe(sub)
            await client.ping()
            assert store(client)["1"]["version"] == 1
            live.hold = None
            await live.sync()
            check_message_log(client)
            assert live.catch_up_timeouts == 0
            assert waited > 0.3, f"ready after {waited:.2f} s: the consumer was not behind"


async def test_a_new_observer_does_not_wait_for_a_consumer_too_far_behind(
        db_dsn: str) -> None:
    """A consumer moving, but too slowly to reach the new snapshot within ``catch_up_limit``:
    the subscription does not wait for it (its observer registers ahead of the stream, exact
    by itself)."""
    async with live_server(db_dsn, catch_up_timeout=0.3, catch_up_limit=0.8) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('b', 'y')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "b"})
            await live.sync()
            live.hold = _SlowConsumer(0.01)  # type: ignore[assignment]
            await asql(db_dsn, _backlog(400), "UPDATE items SET version = 1 WHERE id = 1")
            started = trio.current_time()
            await client.subscribe("items.all", timeout=20)
            waited = trio.current_time() - started
            assert store(client)["1"]["version"] == 1
            assert live.catch_up_timeouts == 1
            assert waited < 0.8, f"ready after {waited:.2f} s"
            live.hold = None
            await live.sync()
            await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            check_message_log(client)



async def test_a_catch_up_mark_whose_write_hangs_is_given_up_on(db_dsn: str) -> None:
    """The catch-up mark's write never returns (a database out of reach, say): each
    subscription waits ``catch_up_timeout`` for it, not for ever, and later ones are not
    stuck behind it."""
    async with live_server(db_dsn, catch_up_timeout=0.3) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        writes = 0
        released = trio.Event()

        async def hangs(token: str) -> int:
            nonlocal writes
            writes += 1
            with trio.CancelScope(shield=True):  # as a database call in a thread: no cancel
                await released.wait()
            raise psycopg.OperationalError("connection timeout expired")

        live._write_mark = hangs  # type: ignore[method-assign]
        try:
            async with connect(server.ws_url) as client:
                with trio.fail_after(5):
                    await client.subscribe("items.all")
                    await client.subscribe("items.byCategory", {"category": "a"})
                assert live.catch_up_timeouts == 2 and writes == 2
                assert store(client)["1"]["title"] == "x"
        finally:
            released.set()


def _commit_held_briefly(dsn: str, admin_dsn: str, row: int, hold: float,
                         stop: threading.Event) -> int:
    """Until ``stop``: update ``row``, each commit held ``hold`` seconds by the standby that
    never answers (decoded at once, visible only once its wait is cancelled). Returns the
    number of commits."""
    commits = 0
    with psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(admin_dsn, autocommit=True) as admin:
        conn.execute("SET synchronous_commit = on")
        pid = conn.info.backend_pid
        while not stop.is_set():
            # Each commit has its releaser until it returns (one told to stop early could
            # miss the wait and leave the commit waiting for good).
            finished = threading.Event()
            releaser = threading.Thread(target=release_commit_wait,
                                        args=(admin, pid, hold, finished))
            releaser.start()
            try:
                conn.execute("UPDATE items SET version = version + 1 WHERE id = %s", (row,))
            finally:
                finished.set()
                releaser.join()
            commits += 1
    return commits


@pytest.mark.parametrize("retain", [0, 2_000], ids=["retake", "replay"])
async def test_a_subscription_is_ready_while_every_commit_waits_for_a_standby(
        db_dsn: str, retain: int) -> None:
    """Every commit is decoded a while before it becomes visible (a synchronous standby that
    answers in 50 ms), and there is always one in that state.

    With the ring keeping recent transactions (``replay``, the default), the subscription
    replays those its snapshot lacks and waits for none. Without (``retake``), the snapshot
    must see what was delivered before the subscription pinned the ring (what came after is
    replayed from the ring): it is retaken until then. Asking it to see everything delivered
    before each new attempt would retake it for as long as the writers go on."""
    async with live_server(db_dsn, ring_retain_changes=retain) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) "
                           "SELECT 'a', 'w' || i FROM generate_series(1, 3) i")
        done = threading.Event()
        async with connect(server.ws_url) as watcher, \
                connect(server.ws_url, log_messages=True) as client:
            await watcher.subscribe("items.all")  # the stream delivers and notes every commit
            with standby_that_never_answers(db_dsn):
                async with trio.open_nursery() as nursery:
                    for row in (1, 2, 3):
                        nursery.start_soon(trio.to_thread.run_sync, _commit_held_briefly,
                                           db_dsn, db_dsn, row, 0.05, done)
                    try:
                        with trio.fail_after(10):
                            while live.transactions_applied < 20:
                                await trio.sleep(0.01)
                        replays = live.ring_replays
                        started = trio.current_time()
                        await client.subscribe("items.byCategory", {"category": "a"},
                                               timeout=20)
                        waited = trio.current_time() - started
                        await trio.sleep(0.3)  # more commits, now applied to it live
                    finally:
                        done.set()
            if retain:
                assert live.invisible_delivered_retries == 0
                assert live.ring_replays > replays  # it did meet one not yet visible
                assert waited < 0.5, f"ready after {waited:.1f} s"
            else:
                assert live.invisible_delivered_retries > 0  # it did meet one not yet visible
                assert waited < 2.0, f"ready after {waited:.1f} s"
            await live.sync()
            assert store(client) == expected_view(
                db_dsn, [("items.byCategory", [{"category": "a"}])])
            assert store(watcher) == store(client)
            check_message_log(client)


async def test_a_table_observed_first_while_a_held_commit_arrives_misses_nothing(
        db_dsn: str) -> None:
    """The stream is receiving a transaction on a table nobody observes (its changes are not
    kept) when the table's first subscription starts. That commit waits for a standby, so the
    subscription's snapshot lacks it too, and the catch-up times out while the consumer is
    held. The observer must not register as if it had that transaction: it takes its
    snapshot again once the transaction is in, and sees it."""
    async with live_server(db_dsn, catch_up_timeout=0.3) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        await live.sync()  # delivered: the next commit the consumer receives is the held one
        async with connect(server.ws_url, log_messages=True) as client:
            with standby_that_never_answers(db_dsn), \
                    psycopg.connect(db_dsn, autocommit=True) as held, \
                    psycopg.connect(db_dsn, autocommit=True) as admin:
                seen = live.last_commit_end_lsn
                live.hold = trio.Event()  # the consumer stops at the next commit it receives
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, held.execute,
                                       "UPDATE items SET title = 'y' WHERE id = 1")
                    try:
                        with trio.fail_after(10):  # received, not applied; not visible either
                            while live.last_commit_end_lsn == seen:
                                await trio.sleep(0.01)

                        async def release() -> None:
                            await trio.sleep(1.0)  # past the catch-up timeout
                            hold, live.hold = live.hold, None
                            if hold is not None:
                                hold.set()
                            await trio.sleep(1.0)
                            await trio.to_thread.run_sync(
                                admin.execute, "SELECT pg_cancel_backend(%s)",
                                (held.info.backend_pid,))
                        nursery.start_soon(release)
                        await client.subscribe("items.all", timeout=20)
                    finally:  # whatever happened, the held commit ends (else the thread hangs)
                        if live.hold is not None:
                            live.hold.set()
                            live.hold = None
                        admin.execute("SELECT pg_cancel_backend(%s)", (held.info.backend_pid,))
            assert live.catch_up_timeouts >= 1
            assert live.snapshot_retries >= 1  # the incomplete transaction: retaken
            await live.sync()
            assert store(client) == expected_view(db_dsn, [("items.all", [])])
            assert store(client)["1"]["title"] == "y"
            check_message_log(client)


async def test_a_held_commit_to_another_table_holds_up_no_new_subscription(
        db_dsn: str) -> None:
    """A commit delivered but held by a standby, which changed only ``other``: a new
    subscription to ``items`` need not see it, and is ready at once (its snapshot was
    retaken until every delivered commit was visible, whatever table it changed). One whose
    function reads the held row gets the row as visible now, then follows the commit."""
    async with live_server(db_dsn, ring_retain_changes=0) as server, \
            connect(server.ws_url) as client, connect(server.ws_url) as reader:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')",
                   "INSERT INTO other (id, note) VALUES (1, 'a')")
        async with held_commit(db_dsn, "UPDATE other SET note = 'b' WHERE id = 1") as held:
            while not held.waits():
                await trio.sleep(0.01)
            await server.live.sync()  # delivered
            with trio.fail_after(2):
                await client.subscribe("items.byCategory", {"category": "a"})
                await reader.subscribe("items.gated", {"gate": 1})
            assert len(store(client)) == 1 and len(store(reader)) == 1
            assert server.live.invisible_delivered_retries == 0
        await reader.wait_for(lambda: not store(reader), timeout=10)  # gate 1 names 'b' now
        assert len(store(client)) == 1
