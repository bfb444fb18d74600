"""The correctness oracle: concurrent writers (inserts, updates moving rows in and out of filters,
primary key changes, deletes, TOASTed values, truncates, rollbacks, multi-row transactions)
while clients subscribe and unsubscribe with overlapping publications and parameters (one of
them a function whose cursor follows a row it looks up, which the writers move too, and one
whose cursors, that row's and its items', come and go with it; one a sorted cursor limited
to its first rows, which the writers' rank changes reorder; one the items of the logged-in
user, in a collection of its own too, as clients log in and out and the writers change
owners), and the walsender is killed mid-way. One more writer's commits are *held*:
decoded and delivered by the stream, yet not visible to new snapshots for a while (a
synchronous standby that never answers holds them, until the oracle gives up waiting for it),
PostgreSQL's widest window between the two. With ``migrations``, schema changes race all
of that (:func:`migrator`). With ``partitioned``, the items are a partitioned table (rows
move between partitions when their id changes, a partition is truncated alone, and the
migrator replaces and renames partitions).
At quiescence each client's store equals what SQL returns for its subscriptions, and its
message log keeps the merge-box promises (no duplicate ``added``, no ``changed``/``removed``
of a document it does not hold, no ``version`` going back).

Seeded and reproducible in what it does (``CDCDDP_ORACLE_SEED=n``); the interleaving is
whatever the machine makes of it. The long version runs with ``--runslow``.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.client import DDPClient, connect
from tests.livedata_support import (
    PARTITIONED_SCHEMA,
    SCHEMA,
    asql,
    check_message_log,
    expected_view,
    live_server,
    task_stacks,
    wait_store,
)
from tests.pg_support import release_commit_wait, standby_that_never_answers

CATEGORIES = ["a", "b", "c", "d"]
USERS = ["ann", "bob", None]  # the items' owners, and whom the clients log in as
SEED = int(os.environ.get("CDCDDP_ORACLE_SEED", "7"))
# Writers' transactions PostgreSQL aborts over concurrency (the second: an UPDATE of a row
# another moved to another partition meanwhile): left out, as an application would retry.
_CONFLICTS = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)


def writer(dsn: str, seed: int, transactions: int, stop: list[bool], partitioned: bool = False
           ) -> int:
    """Runs ``transactions`` random transactions; returns how many committed."""
    rng = random.Random(seed)
    committed = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(transactions):
            if stop:
                break
            roll_back = rng.random() < 0.05
            try:
                with conn.transaction() as txn:
                    if rng.random() < 0.01:
                        conn.execute("TRUNCATE items")
                    if partitioned and rng.random() < 0.01:
                        conn.execute("TRUNCATE items_h0_2")  # a partition's rows only
                    if rng.random() < 0.005:
                        conn.execute("TRUNCATE other")  # every gate closes at once
                    for _ in range(rng.choice([1, 1, 1, 2, 3, 8])):
                        _random_change(conn, rng)
                    if roll_back:
                        raise psycopg.Rollback(txn)
            except _CONFLICTS:
                continue
            committed += not roll_back
    return committed


def held_writer(dsn: str, seed: int, transactions: int, stop: list[bool],
                progress: list[bool]) -> int:
    """Like :func:`writer`, but each commit waits for a synchronous standby that does not
    exist (``synchronous_standby_names`` names nobody) until another session cancels the wait
    a random moment later: the commit is written, decoded and streamed, and only then
    becomes visible. Returns how many committed; appends to ``progress`` at each commit."""
    rng = random.Random(seed)
    committed = 0
    with psycopg.connect(dsn, autocommit=True) as conn, \
            psycopg.connect(dsn, autocommit=True) as admin:
        conn.execute("SET synchronous_commit = on")
        pid = conn.info.backend_pid
        for _ in range(transactions):
            if stop:
                break
            done = threading.Event()
            releaser = threading.Thread(target=release_commit_wait,
                                        args=(admin, pid, rng.random() * 0.2, done))
            releaser.start()
            try:
                with conn.transaction():
                    for _ in range(rng.choice([1, 1, 2, 3])):
                        _random_change(conn, rng)
                committed += 1  # (the cancelled wait is a warning: the commit stands)
                progress.append(True)
            except (*_CONFLICTS, psycopg.errors.QueryCanceled):
                pass
            finally:
                done.set()
                releaser.join()
    return committed


def migrator(dsn: str, seed: int, stop: list[bool], partitioned: bool = False) -> int:
    """Schema changes racing the writers and the subscriptions, as a deploy's migrations do
    on a live database: published columns change type (keeping their values), an unpublished
    column comes (sometimes filled in the same transaction) and goes, the replica identity
    changes, the table is rewritten; a partitioned one's partitions are renamed and replaced.
    Returns how many were made. A partitioned table's partition is replaced last: only the
    server's reading of its partitions can show clients what that did.

    A migration waits for its locks behind the writers' and the engine's transactions, never
    for long: one that waits 10 s is a server holding a lock while it waits for something
    queued behind the migration, and fails the oracle."""
    rng = random.Random(seed)
    made = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET lock_timeout = '10s'")
        while not stop:
            time.sleep(0.1 + rng.random() * 0.4)
            if stop:
                break
            made += _migrate(conn, lambda: _random_migration(conn, rng, partitioned))
        if partitioned:
            def replace_partition() -> None:
                with conn.transaction():
                    _replace_partition(conn)

            while not _migrate(conn, replace_partition):
                pass
    return made + partitioned


def _migrate(conn: psycopg.Connection[Any], migration: Callable[[], None]) -> bool:
    """Whether ``migration`` was made (not: a deadlock)."""
    try:
        migration()
    except psycopg.errors.DeadlockDetected:
        return False
    except psycopg.errors.LockNotAvailable:
        locks = conn.execute(
            "SELECT l.pid, l.mode, l.granted, a.application_name, a.state, a.query "
            "FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
            "WHERE l.relation = 'items'::regclass").fetchall()
        raise AssertionError(f"a migration waited 10 s for its lock: {locks}") from None
    return True


def _random_migration(conn: psycopg.Connection[Any], rng: random.Random,
                      partitioned: bool) -> None:
    def type_of(column: str) -> str | None:
        found = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                             "WHERE attrelid = 'items'::regclass AND attname = %s "
                             "AND NOT attisdropped", (column,)).fetchone()
        return None if found is None else found[0]

    choice = rng.random()
    if choice < 0.1:
        conn.execute("VACUUM FULL items")  # a rewrite the stream does not show
        return
    with conn.transaction():
        if partitioned and choice < 0.45:
            (_rename_partition if rng.random() < 0.5 else _replace_partition)(conn)
        elif choice < 0.4:
            if type_of("scratch") is None:
                conn.execute("ALTER TABLE items ADD COLUMN scratch int DEFAULT 0")
                if rng.random() < 0.5:  # filled in the same transaction: new-shape changes
                    conn.execute("UPDATE items SET scratch = 1, version = version + 1 "
                                 "WHERE id %% 4 = %s", (rng.randrange(4),))
            else:
                conn.execute("ALTER TABLE items DROP COLUMN scratch")
        elif choice < 0.6:
            new = "varchar(200)" if type_of("title") == "text" else "text"
            conn.execute(f"ALTER TABLE items ALTER COLUMN title TYPE {new}")
        elif choice < 0.75:
            new = "bigint" if type_of("rank") == "integer" else "integer"
            conn.execute(f"ALTER TABLE items ALTER COLUMN rank TYPE {new}")
        elif choice < 0.85:
            new = "bigint" if type_of("version") == "integer" else "integer"
            conn.execute(f"ALTER TABLE items ALTER COLUMN version TYPE {new}")
        else:
            (identity,) = conn.execute("SELECT relreplident FROM pg_class "
                                       "WHERE oid = 'items'::regclass").fetchone()  # type: ignore[misc]
            conn.execute("ALTER TABLE items REPLICA IDENTITY "
                         + ("DEFAULT" if identity == "f" else "FULL"))


def _second_partition(conn: psycopg.Connection[Any]) -> str:
    ((name,),) = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'items'::regclass "
        "AND pg_get_expr(c.relpartbound, c.oid) ILIKE '%%remainder 1)'").fetchall()
    return str(name)


def _rename_partition(conn: psycopg.Connection[Any]) -> None:
    """Its changes stream under the new name from then on."""
    name = _second_partition(conn)
    conn.execute(f"ALTER TABLE {name} RENAME TO "
                 f"{'items_h1b' if name == 'items_h1' else 'items_h1'}")


def _replace_partition(conn: psycopg.Connection[Any]) -> None:
    """The items' second partition replaced with a copy of itself under its name whose
    rows are a version ahead: another table. The stream shows the copy's rows under the
    copy's name, and nothing of the swap."""
    name = _second_partition(conn)
    conn.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")  # (no write is lost)
    conn.execute("CREATE TABLE items_copy (LIKE items INCLUDING DEFAULTS)")
    conn.execute(f"INSERT INTO items_copy SELECT id, owner, category, title, body, rank, "
                 f"version + 1 FROM {name}")
    conn.execute(f"ALTER TABLE items DETACH PARTITION {name}")
    conn.execute(f"DROP TABLE {name}")
    conn.execute(f"ALTER TABLE items_copy RENAME TO {name}")
    conn.execute(f"ALTER TABLE items ATTACH PARTITION {name} "
                 "FOR VALUES WITH (MODULUS 2, REMAINDER 1)")


GATES = [1, 2, 3]


def _random_change(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    if rng.random() < 0.06:
        _random_gate_change(conn, rng)
        return
    (top,) = conn.execute("SELECT coalesce(max(abs(id)), 0) FROM items").fetchone()  # type: ignore[misc]
    item = rng.randint(max(1, top - 40), top + 2)
    action = rng.random()
    if action < 0.3:
        body = secrets.token_urlsafe(6000) if rng.random() < 0.3 else None
        conn.execute("INSERT INTO items (owner, category, title, body, rank) "
                     "VALUES (%s, %s, %s, %s, %s)",
                     (rng.choice(USERS), rng.choice(CATEGORIES),
                      f"t{rng.randint(0, 99)}", body, rng.randint(0, 9)))
    elif action < 0.8:
        assignments = ["version = version + 1"]
        params: list[Any] = []
        if rng.random() < 0.6:
            assignments.append("category = %s")
            params.append(rng.choice(CATEGORIES))
        if rng.random() < 0.5:
            assignments.append("rank = %s")
            params.append(rng.randint(0, 9))
        if rng.random() < 0.3:
            assignments.append("title = %s")
            params.append(f"t{rng.randint(0, 99)}")
        if rng.random() < 0.15:  # in or out of its owners' items.mine
            assignments.append("owner = %s")
            params.append(rng.choice(USERS))
        body_choice = rng.random()
        if body_choice < 0.15:
            assignments.append("body = %s")  # a new TOASTed value
            params.append(secrets.token_urlsafe(6000))
        elif body_choice < 0.2:
            assignments.append("body = NULL")
        # otherwise the body stays: wal2json leaves an unchanged TOASTed value out
        conn.execute(f"UPDATE items SET {', '.join(assignments)} WHERE id = %s",
                     (*params, item))
    elif action < 0.86:
        # A new primary key (its document is another one), its TOASTed body left unchanged:
        # the row's old key is in the change's identity, and a new id starts with "-".
        conn.execute("UPDATE items SET id = -id, version = version + 1 WHERE id = %s",
                     (rng.choice([item, -item]),))
    else:
        conn.execute("DELETE FROM items WHERE id = %s", (item,))


def _random_gate_change(conn: psycopg.Connection[Any], rng: random.Random) -> None:
    """Moves a gate (``items.gated``: its subscriptions follow by lookup) to another
    category, closes it, or removes it."""
    gate = rng.choice(GATES)
    if rng.random() < 0.15:
        conn.execute("DELETE FROM other WHERE id = %s", (gate,))
        return
    conn.execute("INSERT INTO other (id, note) VALUES (%s, %s) "
                 "ON CONFLICT (id) DO UPDATE SET note = EXCLUDED.note",
                 (gate, rng.choice([*CATEGORIES, "closed", None])))


async def run_oracle(dsn: str, *, seed: int, transactions: int, writers: int,
                     subscription_steps: int, clients: int, kills: int,
                     temporary_slot: bool, migrations: bool = False,
                     partitioned: bool = False, primary_dsn: str | None = None) -> None:
    """``migrations``: schema changes race everything else (:func:`migrator`).
    ``partitioned``: the items are a partitioned table.
    ``primary_dsn``: the server decodes and reads on ``dsn``, a standby of that primary,
    where everyone writes."""
    rng = random.Random(seed)
    writes = primary_dsn or dsn
    # Only the held writer's sessions wait for the standby that never answers.
    name = psycopg.conninfo.conninfo_to_dict(writes)["dbname"]
    await asql(writes, f'ALTER DATABASE "{name}" SET synchronous_commit = local')
    with standby_that_never_answers(writes):
        await _run_oracle(dsn, rng, seed=seed, transactions=transactions, writers=writers,
                          subscription_steps=subscription_steps, clients=clients,
                          kills=kills, temporary_slot=temporary_slot, migrations=migrations,
                          partitioned=partitioned, writes=writes)


async def _run_oracle(dsn: str, rng: random.Random, *, seed: int, transactions: int,
                      writers: int, subscription_steps: int, clients: int, kills: int,
                      temporary_slot: bool, migrations: bool, partitioned: bool, writes: str
                      ) -> None:
    # A temporary slot is a new one after the walsender is killed: a stream gap.
    resyncs: bool | set[str] = temporary_slot or {
        *(["schema_change"] if migrations else []),
        *(["partitions_changed", "partition_truncate"] if partitioned else [])}
    async with live_server(dsn, schema=PARTITIONED_SCHEMA if partitioned else SCHEMA,
                           temporary_slot=temporary_slot, resyncs=resyncs,
                           catalog_check_interval=0.2,
                           primary_dsn=None if writes == dsn else writes) as server:
        await asql(writes, "INSERT INTO items (category, title, rank, body) "
                        "SELECT (ARRAY['a','b','c','d'])[1 + i % 4], 't' || i, i % 10, "
                        "CASE WHEN i % 5 = 0 THEN repeat(md5(i::text), 300) END "
                        "FROM generate_series(1, 50) i",
                   "INSERT INTO other (id, note) VALUES (1, 'a'), (2, 'b'), (3, NULL)")
        stop: list[bool] = []
        committed: list[int] = []
        held_committed: list[int] = []
        held_progress: list[bool] = []
        migrated: list[int] = []

        migrations_over: list[bool] = []  # once the writers are done, or the churn

        async def write(n: int) -> None:
            committed.append(await trio.to_thread.run_sync(
                writer, writes, seed * 100 + n, transactions, stop, partitioned))
            if len(committed) == writers:
                migrations_over.append(True)

        async def write_held() -> None:
            held_committed.append(await trio.to_thread.run_sync(
                held_writer, writes, seed * 100 + 99, transactions // 4, stop, held_progress))

        async def migrate() -> None:
            migrated.append(await trio.to_thread.run_sync(
                migrator, writes, seed * 100 + 98, migrations_over, partitioned))

        async def kill_walsender() -> None:
            for _ in range(kills):
                await trio.sleep(0.3 + rng.random() * 0.5)
                await asql(dsn, "SELECT pg_terminate_backend(active_pid) "
                                "FROM pg_replication_slots WHERE slot_name = %s "
                                "AND active_pid IS NOT NULL",
                           params=(server.live.config.slot,))

        async with contextlib.AsyncExitStack() as stack:
            pool = [await stack.enter_async_context(connect(server.ws_url, log_messages=True))
                    for _ in range(clients)]
            states = [ClientState() for _ in pool]

            async def churn() -> None:
                for _ in range(subscription_steps):
                    if rng.random() < 0.15:
                        # A burst: every client takes a step at once (more subscriptions at
                        # once than the engine has snapshot readers: their reads share
                        # transactions, racing the writers like any other).
                        steps = [(random.Random(rng.random()), client, state)
                                 for client, state in zip(pool, states, strict=True)]
                        async with trio.open_nursery() as burst:
                            for step in steps:
                                burst.start_soon(_subscription_step, *step)
                    else:
                        i = rng.randrange(len(pool))
                        await _subscription_step(rng, pool[i], states[i])
                    await trio.sleep(rng.random() * 0.03)

            async with trio.open_nursery() as nursery:
                for n in range(writers):
                    nursery.start_soon(write, n)
                nursery.start_soon(write_held)
                if migrations:
                    nursery.start_soon(migrate)
                nursery.start_soon(kill_walsender)
                try:
                    await churn()
                    # A short churn must not cut the writes short (a deadlock between writers
                    # stalls them all for deadlock_timeout, 1 s): the writers run all their
                    # transactions, the held one until one of its commits went through.
                    with trio.move_on_after(60):
                        while len(committed) < writers or not (held_progress or held_committed):
                            await trio.sleep(0.05)
                finally:  # (also when a task failed: the threads cannot be cancelled)
                    stop.append(True)  # writers finish their current transaction
                    migrations_over.append(True)
            try:
                await server.live.sync(timeout=30)
            except trio.TooSlowError:
                raise AssertionError(f"seed {seed}: the engine did not catch up; its tasks:\n"
                                     + task_stacks()) from None
            for i, client in enumerate(pool):
                subscriptions, user = list(states[i].subscriptions.values()), states[i].user
                try:
                    for collection in ("items", "mine", "gates"):
                        expected = expected_view(writes, subscriptions, user, collection)
                        await wait_store(client, expected, collection, timeout=20)
                        check_message_log(client, collection)
                except AssertionError as exc:
                    # An observer (or a resync) that gave up waiting for the consumer goes
                    # ahead of the stream by design, and a client can then see a value go
                    # back: a consumer held, or far behind on a loaded machine.
                    live = server.live
                    raise AssertionError(
                        f"client {i} (seed {seed}; catch-up timeouts: observers "
                        f"{live.catch_up_timeouts}, resync holds {live.hold_timeouts}): {exc}"
                    ) from None
        live = server.live
        assert sum(committed) > 0 and held_committed[0] > 0
        ((rekeyed,),) = await asql(writes, "SELECT count(*) FROM items WHERE id < 0")
        assert live.stream is not None and live.stream.reconnects >= min(kills, 1)
        print(f"oracle seed={seed}: {sum(committed)} transactions committed "
              f"(and {held_committed[0]} held ones), "
              f"{live.transactions_applied} applied, {live.snapshot_queries} snapshot queries "
              f"in {live.snapshot_transactions} transactions, "
              f"{live.ring_replays} ring replays, {live.snapshot_retries} retries, "
              f"{live.invisible_delivered_retries} snapshots retaken for an invisible commit, "
              f"{live.rows_fetched} rows fetched, {live.resyncs} resyncs, "
              f"{rekeyed} rows under a changed key at the end, "
              f"{sum(state.logins for state in states)} logins or logouts, "
              f"{migrated[0] if migrated else 0} migrations "
              f"({live.resync_reasons['schema_change']} observers resynced for them, "
              f"{live.resync_reasons['partitions_changed']} for partitions), "
              f"{live.stream.reconnects} reconnects")


@dataclass
class ClientState:
    subscriptions: dict[str, tuple[str, list[Any]]] = field(default_factory=dict)  # by sub id
    user: str | None = None
    logins: int = 0  # changes of user


async def _subscription_step(rng: random.Random, client: DDPClient, state: ClientState
                             ) -> None:
    held = state.subscriptions
    if held and rng.random() < 0.35:
        sub_id = rng.choice(sorted(held))
        del held[sub_id]
        await client.unsubscribe(sub_id)
        return
    if rng.random() < 0.1:
        # Logging in or out re-runs the connection's subscriptions for the new user (its
        # items.mine changes owner, the others stay), racing the writers like a subscription.
        user = rng.choice(USERS)
        await client.call("test.logInAs", user, timeout=60)
        state.logins += user != state.user
        state.user = user
        return
    choice = rng.random()
    if choice < 0.35:
        name, params = "items.byCategory", [{"category": rng.choice(CATEGORIES)}]
    elif choice < 0.58:
        name, params = "items.ranked", [rng.randint(0, 9)]
    elif choice < 0.7:
        name, params = "items.top", [{"category": rng.choice(CATEGORIES)}]
    elif choice < 0.78:
        name, params = "items.gated", [{"gate": rng.choice(GATES)}]
    elif choice < 0.82:
        name, params = "gates.withItems", [{"gate": rng.choice(GATES)}]
    elif choice < 0.88:
        name, params = "items.mine", []
    elif choice < 0.94:
        name, params = "mine.items", []
    else:
        name, params = "items.all", []
    held[await client.subscribe(name, *params, timeout=60)] = (name, params)


@pytest.mark.parametrize("temporary_slot", [True, False], ids=["temporary-slot", "persistent-slot"])
async def test_oracle_short(db_dsn: str, temporary_slot: bool) -> None:
    await run_oracle(db_dsn, seed=SEED, transactions=120, writers=3, subscription_steps=30,
                     clients=8, kills=1, temporary_slot=temporary_slot)


async def test_oracle_short_with_migrations(db_dsn: str) -> None:
    await run_oracle(db_dsn, seed=SEED, transactions=200, writers=3, subscription_steps=60,
                     clients=8, kills=1, temporary_slot=False, migrations=True)


async def test_oracle_short_partitioned(db_dsn: str) -> None:
    await run_oracle(db_dsn, seed=SEED, transactions=200, writers=3, subscription_steps=60,
                     clients=8, kills=1, temporary_slot=False, migrations=True,
                     partitioned=True)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [SEED, SEED + 1, SEED + 2])
async def test_oracle_long(db_dsn: str, seed: int) -> None:
    await run_oracle(db_dsn, seed=seed, transactions=1500, writers=4, subscription_steps=300,
                     clients=8, kills=3, temporary_slot=seed % 2 == 0, migrations=seed % 3 == 0,
                     partitioned=seed % 4 == 1)
