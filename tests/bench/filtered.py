"""Filtered-subscription benchmark: many distinct ``owner = k`` subscriptions, one backlog.

    .venv/bin/python tests/bench/filtered.py [--dsn DSN] [--clients 1000] [--subs-per-client 10]
                                             [--changes 100000]

Without --dsn it starts a throwaway cluster. Table ``items`` holds 2 rows per owner for
``clients x subs-per-client`` owners; publication ``items.byOwner`` (positional param ``owner``)
publishes ``owner = k``. The cdcddp server (live engine) runs in a child process; the clients
run in another child (raw-socket swarm, see ddpbench.py), each with ``subs-per-client``
subscriptions to distinct owners.

How a backlog is measured: the server process is stopped (SIGSTOP), a backlog of --changes row
updates (10 per transaction) is written and a fresh slot per phase lets ``pg_recvlogical``
drain exactly the same WAL; then the server resumes (SIGCONT) and catches up. cdcddp's time is
from the resume to the later of "the engine applied every change" (reported by the server
child) and "the last resulting DDP message reached a client". Phases:

1. ``100 subs``: 10 clients x 10 subscriptions (owners 0..99); the backlog updates rows of
   owners 0..99.
2. ``all subs``: every client subscribed (owners 0..N-1); the same backlog (owners 0..99), so
   the delivered work is the same as in phase 1 and only the number of idle subscriptions
   grows. The drop from phase 1 to 2 is what N subscriptions cost a change that matches few.
3. ``spread``: the same subscriptions; the backlog updates rows of every owner, so every
   subscription receives changes.

Figures: rows/s of pg_recvlogical and of cdcddp per phase, their ratio, and the drop.
Last line: ``filtered_ingest_ratio=`` (phase 3, cdcddp rate / pg_recvlogical rate).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import psycopg
from ddpbench import ROOT  # noqa: F401
from ingest import run_recvlogical

from cdcddp.devcluster import find_bindir, throwaway_cluster

ROWS_PER_OWNER = 2
PER_TX = 10
PUBLICATION = "items.byOwner"

LOAD_PROCEDURE = f"""
CREATE OR REPLACE PROCEDURE filtered_load(changes int, owners int, seed int)
LANGUAGE plpgsql AS $$
DECLARE
    done int := 0;
    n int := owners * {ROWS_PER_OWNER};
BEGIN
    WHILE done < changes LOOP
        -- 10 rows per transaction, spread over the owners' rows by a stride coprime to n
        UPDATE items SET v = v + 1
            WHERE id IN (SELECT ((seed + done + g)::bigint * 7919) % n
                         FROM generate_series(0, {PER_TX} - 1) g);
        COMMIT;
        done := done + {PER_TX};
    END LOOP;
END $$
"""


def bench_app():  # type: ignore[no-untyped-def]
    from pydantic import BaseModel

    from cdcddp.app import App
    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C, Param

    class OwnerParams(BaseModel):
        owner: int

    app = App("filtered")
    app.add_publication(Publication(
        PUBLICATION, Cursor("items", fields=["owner", "v", "label"],
                            filter=C("owner") == Param("owner")),
        params=OwnerParams, positional_params=True))
    return app


def serve(dsn: str, profile: str | None = None) -> None:
    """Server child: prints its port; then answers stdin lines ``count`` (changes applied so
    far) and ``until N`` (prints the wall time once N changes have been applied)."""
    import trio

    from cdcddp.ddp.session import SessionConfig
    from cdcddp.publish.livedata import LiveDataConfig
    from cdcddp.server.config import ServerConfig
    from cdcddp.server.server import Server

    ddpbench.raise_fd_limit(20000)

    async def main() -> None:
        # Heartbeats off: the process is stopped on purpose while the backlog is written.
        config = ServerConfig(session=SessionConfig(heartbeat_interval=0))
        server = Server(bench_app(), config, dsn=dsn,
                        live_config=LiveDataConfig(slot="bench_filtered", temporary_slot=True))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            print(port, flush=True)
            live = server.live
            assert live is not None
            while True:
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                if not line:
                    break
                if line.startswith("count"):
                    print(f"COUNT {live.changes_applied}", flush=True)
                elif line.startswith("until"):
                    target = int(line.split()[1])
                    while live.changes_applied < target:
                        await trio.sleep(0.001)
                    print(f"APPLIED {time.time()}", flush=True)
            nursery.cancel_scope.cancel()

    if profile is None:
        trio.run(main)
        return
    import cProfile

    with cProfile.Profile() as profiler:
        trio.run(main)
    profiler.dump_stats(profile)


class ServerChild:
    def __init__(self, dsn: str, profile: str | None = None) -> None:
        extra = ["--profile", profile] if profile else []
        self.proc, self.port = ddpbench.start_child([__file__, "--serve", "--dsn", dsn, *extra])

    def ask(self, line: str, prefix: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        while True:
            answer = self.proc.stdout.readline()
            if not answer:
                sys.exit("server child exited")
            if answer.startswith(prefix + " "):
                return answer.split(" ", 1)[1].strip()

    def stop(self) -> None:
        ddpbench.stop_child(self.proc)


def prepare(dsn: str, owners: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, owner int NOT NULL, v int, "
                     "label text)")
        conn.execute("INSERT INTO items SELECT g, g / %s, 0, 'item ' || g "
                     "FROM generate_series(0, %s) g", (ROWS_PER_OWNER, owners * ROWS_PER_OWNER - 1))
        conn.execute("CREATE INDEX ON items (owner)")
        conn.execute("ANALYZE items")
        conn.execute(LOAD_PROCEDURE)


def run_phase(name: str, dsn: str, server: ServerChild, swarm: ddpbench.Swarm,
              changes: int, owners: int, seed: int) -> tuple[float, float]:
    """One backlog; returns (pg_recvlogical rows/s, cdcddp rows/s)."""
    slot = f"bench_filtered_recv_{seed}"
    before = int(server.ask("count", "COUNT"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.perf_counter()
            conn.execute("CALL filtered_load(%s, %s, %s)", (changes, owners, seed))
            written = time.perf_counter() - t0
            (endpos,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
            swarm.start()
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        resumed = time.time()
    print(f"{name}: server resumed, catching up", flush=True)  # (a profiler can attach now)
    applied_at = float(server.ask(f"until {before + changes}", "APPLIED"))
    result = swarm.stop()
    delivered_at = result["last_at"] or applied_at
    ours = max(applied_at, delivered_at) - resumed
    recv = run_recvlogical(find_bindir(), dsn, slot, str(endpos))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    messages = result["changed"]
    print(f"{name}: backlog of {changes:,} updates over {owners:,} owners written in "
          f"{written:.2f} s; pg_recvlogical {recv:.2f} s = {changes / recv:,.0f} rows/s; "
          f"cdcddp applied in {applied_at - resumed:.2f} s, last message at "
          f"{delivered_at - resumed:.2f} s = {changes / ours:,.0f} rows/s; "
          f"{messages:,} changed messages (updates of one row in one flush coalesce)",
          flush=True)
    if messages == 0:
        sys.exit(f"{name}: no client received a change")
    return changes / recv, changes / ours


def subscriptions(first: int, count: int) -> list[list[Any]]:
    return [[PUBLICATION, [k]] for k in range(first, first + count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--subs-per-client", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--profile", metavar="FILE",
                        help="write a cProfile of the server process to FILE")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.dsn, args.profile)
        return
    ddpbench.raise_fd_limit(args.clients + 1024)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(
            throwaway_cluster("cdcddp-bench-", max_wal_size="4GB",
                              wal_sender_timeout="300s")).dsn()
        run(args, dsn)


def run(args: argparse.Namespace, dsn: str) -> None:
    per = args.subs_per_client
    owners = args.clients * per
    small_clients = max(1, 100 // per)
    small = small_clients * per
    changes = args.changes - args.changes % PER_TX
    prepare(dsn, owners)
    server = ServerChild(dsn, args.profile)
    swarm: ddpbench.Swarm | None = None
    try:
        swarm = ddpbench.Swarm(server.port, small_clients, subscriptions(0, small), per)
        swarm.wait_ready()
        recv1, ours1 = run_phase(f"phase 1, {small} subscriptions", dsn, server, swarm,
                                 changes, small, seed=1)
        t0 = time.perf_counter()
        swarm = ddpbench.Swarm(server.port, args.clients, subscriptions(0, owners), per)
        ready = swarm.wait_ready()
        print(f"{args.clients:,} clients x {per} subscriptions ready in "
              f"{time.perf_counter() - t0:.1f} s (last sub->ready {ready['seconds']:.1f} s)",
              flush=True)
        recv2, ours2 = run_phase(f"phase 2, {owners:,} subscriptions, same backlog", dsn,
                                 server, swarm, changes, small, seed=2)
        swarm = ddpbench.Swarm(server.port, args.clients, subscriptions(0, owners), per)
        swarm.wait_ready()
        recv3, ours3 = run_phase(f"phase 3, {owners:,} subscriptions, spread backlog", dsn,
                                 server, swarm, changes, owners, seed=3)
    finally:
        if swarm is not None:
            swarm.kill()
        server.stop()
    drop = 1 - (ours2 / recv2) / (ours1 / recv1)
    print(f"ratio to pg_recvlogical: {small} subs {ours1 / recv1:.2f}, {owners:,} subs "
          f"{ours2 / recv2:.2f}, spread {ours3 / recv3:.2f}")
    print(f"drop from {small} to {owners:,} subscriptions (rates relative to pg_recvlogical "
          f"in the same phase): {100 * drop:.1f} %")
    print(f"filtered_subscription_drop_pct={100 * drop:.1f}")
    print(f"filtered_ingest_ratio={ours3 / recv3:.2f}")


if __name__ == "__main__":
    main()
