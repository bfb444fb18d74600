"""Filtered-subscription benchmark: many distinct ``owner = k`` subscriptions, one backlog.

    .venv/bin/python tests/bench/filtered.py [--dsn DSN] [--clients 1000] [--subs-per-client 10]
                                             [--changes 100000] [--repeat 5]
                                             [--rows-per-transaction 10] [--partitions 0]

Without --dsn it starts a throwaway cluster. Table ``items`` holds 2 rows per owner for
``clients x subs-per-client`` owners (N owners); publication ``items.byOwner`` (positional
param ``owner``) publishes ``owner = k``. The cdcddp server (live engine) runs in a child
process; the clients run in another child (raw-socket swarm, see ddpbench.py), each with
``subs-per-client`` subscriptions to distinct owners. With ``--partitions N``, ``items`` is
a table partitioned by a hash of the id into N partitions: the stream names the partitions,
and the server gives each change to the table (what following a partitioned table costs,
against the same pg_recvlogical baseline).

How one backlog is measured (a "run"): ``VACUUM items``; a fresh logical slot is created for
``pg_recvlogical``; the server process is stopped (SIGSTOP); a backlog of --changes row updates
(--rows-per-transaction per transaction, 10 by default) is written; the server resumes
(SIGCONT) and catches up. cdcddp's time is from the resume to the later of "the engine applied
every change" (reported by the server child) and "the last resulting DDP message reached a
client" (the swarm drains until idle for 1 s and reports, keeping its connections:
``Swarm.report``). Then ``pg_recvlogical`` (wal2json, output to /dev/null) drains exactly the
same WAL from its slot, timed from start to exit, and the slot is dropped. Both rates are
--changes / seconds. Phases:

Two client swarms: ``small``, 10 clients x 10 subscriptions (owners 0..99), connected
throughout; ``rest``, the other clients (owners 100..N-1), connected only for phases 2 and 3.
Phases 1 and 2 alternate, one run each per round, so that the machine's drift over minutes
falls on both alike:

1. ``100 subs``: only ``small`` is connected; the backlog updates rows of owners 0..99.
2. ``all subs``: ``rest`` connects and subscribes (timed: "ready in"; each subscription hands
   off across the transactions the server retains, the last 2,000 changes': with one row per
   transaction, 2,000 of them), then the same backlog as
   phase 1 (owners 0..99, identical row sequence), so the delivered work is that of phase 1
   and only the number of idle subscriptions grows; ``rest`` then disconnects. The drop from
   phase 1 to 2 is what N subscriptions cost a change that matches few.
3. ``spread``: both swarms connected; --repeat runs of one backlog that updates rows of every
   owner, so every subscription receives changes (a message to its own client for each
   change).

Figures: each run's rates; per phase the median cdcddp rate, the median pg_recvlogical rate
and their ratio (median / median), with the min-max of each over the runs. The drop from phase
1 to 2 is printed on raw cdcddp rates (1 - median2 / median1; fair because the backlogs are
identical) and relative to pg_recvlogical, per round (1 - ratio2 / ratio1 of the two runs of a
round, each ratio = cdcddp rate / pg_recvlogical rate of that run).
``filtered_subscription_drop_pct=`` is the median of the rounds' relative drops. Last line:
``filtered_ingest_ratio=`` (phase 3, median cdcddp rate / median pg_recvlogical rate).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
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
PUBLICATION = "items.byOwner"

LOAD_PROCEDURE = f"""
CREATE OR REPLACE PROCEDURE filtered_load(changes int, owners int, seed int, per_tx int)
LANGUAGE plpgsql AS $$
DECLARE
    done int := 0;
    n int := owners * {ROWS_PER_OWNER};
BEGIN
    WHILE done < changes LOOP
        -- per_tx rows per transaction, spread over the owners' rows by a stride coprime to n
        UPDATE items SET v = v + 1
            WHERE id IN (SELECT ((seed + done + g)::bigint * 7919) % n
                         FROM generate_series(0, per_tx - 1) g);
        COMMIT;
        done := done + per_tx;
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
    far), ``until N`` (prints the wall time once N changes have been applied) and ``observers
    N`` (answers once at most N observers are left: a swarm's unsubscriptions are done)."""
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
                elif line.startswith("observers"):
                    target = int(line.split()[1])
                    while live.observer_count > target:
                        await trio.sleep(0.01)
                    print(f"OBSERVERS {live.observer_count}", flush=True)
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


def prepare(dsn: str, owners: int, partitions: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS items")
        conn.execute("CREATE TABLE items (id int PRIMARY KEY, owner int NOT NULL, v int, "
                     "label text)" + (" PARTITION BY HASH (id)" if partitions else ""))
        for i in range(partitions):
            conn.execute(f"CREATE TABLE items_p{i} PARTITION OF items "
                         f"FOR VALUES WITH (MODULUS {partitions}, REMAINDER {i})")
        conn.execute("INSERT INTO items SELECT g, g / %s, 0, 'item ' || g "
                     "FROM generate_series(0, %s) g", (ROWS_PER_OWNER, owners * ROWS_PER_OWNER - 1))
        conn.execute("CREATE INDEX ON items (owner)")
        conn.execute("ANALYZE items")
        conn.execute(LOAD_PROCEDURE)


def run_phase(name: str, dsn: str, server: ServerChild, swarms: list[ddpbench.Swarm],
              changes: int, owners: int, seed: int, slot: str, per_tx: int
              ) -> tuple[float, float]:
    """One backlog; returns (pg_recvlogical rows/s, cdcddp rows/s). The swarms stay
    connected."""
    before = int(server.ask("count", "COUNT"))
    with psycopg.connect(dsn, autocommit=True) as conn:
        (walsender,) = conn.execute(  # type: ignore[misc]
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = 'bench_filtered'"
        ).fetchone()
        conn.execute("VACUUM items")
        conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                     "WHERE slot_name = %s", (slot,))
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.perf_counter()
                conn.execute("CALL filtered_load(%s, %s, %s, %s)",
                             (changes, owners, seed, per_tx))
                written = time.perf_counter() - t0
                (endpos,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
                for swarm in swarms:
                    swarm.start()
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            resumed = time.time()
            cpu0 = cpu_seconds(server.proc.pid, walsender)
        print(f"{name}: server resumed, catching up", flush=True)  # (a profiler can attach now)
        applied_at = float(server.ask(f"until {before + changes}", "APPLIED"))
        results = [swarm.report() for swarm in swarms]
        server_cpu, walsender_cpu = (b - a for a, b in zip(
            cpu0, cpu_seconds(server.proc.pid, walsender), strict=True))
        delivered_at = max((r["last_at"] for r in results if r["last_at"]), default=applied_at)
        ours = max(applied_at, delivered_at) - resumed
        recv = run_recvlogical(find_bindir(), dsn, slot, str(endpos))
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (slot,))
    messages = sum(r["changed"] for r in results)
    clients_cpu = sum(r["cpu_seconds"] for r in results)
    print(f"{name}: backlog of {changes:,} updates over {owners:,} owners written in "
          f"{written:.2f} s; pg_recvlogical {recv:.2f} s = {changes / recv:,.0f} rows/s; "
          f"cdcddp applied in {applied_at - resumed:.2f} s, last message at "
          f"{delivered_at - resumed:.2f} s = {changes / ours:,.0f} rows/s "
          f"(ratio {recv / ours:.2f}); "
          f"{messages:,} changed messages (updates of one row in one flush coalesce); "
          f"CPU during the catch-up: server {server_cpu:.2f} s, its walsender "
          f"{walsender_cpu:.2f} s, clients {clients_cpu:.2f} s",
          flush=True)
    if messages == 0:
        sys.exit(f"{name}: no client received a change")
    return changes / recv, changes / ours


def cpu_seconds(*pids: int) -> tuple[float, ...]:
    return tuple(ddpbench.proc_cpu_seconds(pid) if pid else float("nan") for pid in pids)


class PhaseRuns:
    """The runs of one phase: (pg_recvlogical rows/s, cdcddp rows/s) each."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.recv: list[float] = []
        self.ours: list[float] = []

    def add(self, rates: tuple[float, float]) -> None:
        self.recv.append(rates[0])
        self.ours.append(rates[1])

    @property
    def ratio(self) -> float:
        """Median cdcddp rate / median pg_recvlogical rate."""
        return statistics.median(self.ours) / statistics.median(self.recv)

    def summary(self) -> str:
        if len(self.ours) == 1:
            return (f"{self.label} (1 run): cdcddp {self.ours[0]:,.0f} rows/s; pg_recvlogical "
                    f"{self.recv[0]:,.0f} rows/s; ratio {self.ratio:.2f}")

        def rates(values: list[float]) -> str:
            return (f"median {statistics.median(values):,.0f} rows/s "
                    f"(min-max {min(values):,.0f}-{max(values):,.0f})")

        ratios = [o / r for o, r in zip(self.ours, self.recv, strict=True)]
        return (f"{self.label} ({len(self.ours)} runs): "
                f"cdcddp {rates(self.ours)}; pg_recvlogical {rates(self.recv)}; "
                f"ratio of medians {self.ratio:.2f} "
                f"(per-run ratios min-max {min(ratios):.2f}-{max(ratios):.2f})")


def subscriptions(first: int, count: int) -> list[list[Any]]:
    return [[PUBLICATION, [k]] for k in range(first, first + count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--subs-per-client", type=int, default=10)
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--rows-per-transaction", type=int, default=10,
                        help="rows each backlog transaction updates")
    parser.add_argument("--repeat", type=int, default=5,
                        help="runs of each phase (medians are reported)")
    parser.add_argument("--partitions", type=int, default=0,
                        help="items partitioned into this many partitions (0: not)")
    parser.add_argument("--profile", metavar="FILE",
                        help="write a cProfile of the server process to FILE")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
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
    per_tx = args.rows_per_transaction
    changes = args.changes - args.changes % per_tx
    repeat = args.repeat
    prepare(dsn, owners, args.partitions)
    server = ServerChild(dsn, args.profile)
    small_swarm: ddpbench.Swarm | None = None
    rest: ddpbench.Swarm | None = None
    phase1 = PhaseRuns(f"phase 1, {small} subscriptions")
    phase2 = PhaseRuns(f"phase 2, {owners:,} subscriptions, same backlog")
    phase3 = PhaseRuns(f"phase 3, {owners:,} subscriptions, spread backlog")
    ready_seconds: list[float] = []

    def connect_rest() -> ddpbench.Swarm:
        t0 = time.perf_counter()
        swarm = ddpbench.Swarm(server.port, args.clients - small_clients,
                               subscriptions(small, owners - small), per)
        ready = swarm.wait_ready()
        ready_seconds.append(time.perf_counter() - t0)
        print(f"{args.clients - small_clients:,} more clients x {per} subscriptions ready in "
              f"{ready_seconds[-1]:.1f} s (last sub->ready {ready['seconds']:.1f} s)",
              flush=True)
        return swarm

    try:
        small_swarm = ddpbench.Swarm(server.port, small_clients, subscriptions(0, small), per)
        small_swarm.wait_ready()
        for i in range(repeat):
            # seed 1 in phases 1 and 2: every run of both phases writes the same row sequence
            phase1.add(run_phase(f"{phase1.label}, run {i + 1}/{repeat}", dsn, server,
                                 [small_swarm], changes, small, seed=1,
                                 slot=f"bench_filtered_recv_1_{i}", per_tx=per_tx))
            rest = connect_rest()
            phase2.add(run_phase(f"{phase2.label}, run {i + 1}/{repeat}", dsn, server,
                                 [small_swarm, rest], changes, small, seed=1,
                                 slot=f"bench_filtered_recv_2_{i}", per_tx=per_tx))
            if i < repeat - 1:
                rest.stop()
                rest = None
                # The next phase-1 run starts once the server has let go of their observers.
                server.ask(f"observers {small}", "OBSERVERS")
        assert rest is not None
        for i in range(repeat):
            phase3.add(run_phase(f"{phase3.label}, run {i + 1}/{repeat}", dsn, server,
                                 [small_swarm, rest], changes, owners, seed=3,
                                 slot=f"bench_filtered_recv_3_{i}", per_tx=per_tx))
        rest.stop()
        small_swarm.stop()
    finally:
        for swarm in (small_swarm, rest):
            if swarm is not None:
                swarm.kill()
        server.stop()
    print(f"{owners - small:,} more subscriptions ready in "
          f"{', '.join(f'{t:.1f}' for t in ready_seconds)} s")
    for phase in (phase1, phase2, phase3):
        print(phase.summary())
    raw = 1 - statistics.median(phase2.ours) / statistics.median(phase1.ours)
    rounds = [1 - (o2 / r2) / (o1 / r1) for o1, r1, o2, r2 in zip(
        phase1.ours, phase1.recv, phase2.ours, phase2.recv, strict=True)]
    drop = statistics.median(rounds)
    print(f"drop from {small} to {owners:,} subscriptions, raw cdcddp rates (median to median, "
          f"identical backlogs): {100 * raw:.1f} %")
    print(f"drop from {small} to {owners:,} subscriptions relative to pg_recvlogical, per round: "
          f"{', '.join(f'{100 * d:.1f}' for d in rounds)} %; median {100 * drop:.1f} %")
    print(f"filtered_subscription_drop_pct={100 * drop:.1f}")
    print(f"filtered_ingest_ratio={phase3.ratio:.2f}")


if __name__ == "__main__":
    main()
