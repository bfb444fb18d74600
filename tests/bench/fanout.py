"""Fan-out benchmark: one writer, N clients subscribed to the same publication.

    .venv/bin/python tests/bench/fanout.py [--dsn DSN] [--clients 1000] [--seconds 20]
                                           [--rate 60] [--rows-per-tx 1] [--skip-baseline]

Without --dsn it starts a throwaway cluster. The cdcddp server (live engine, temporary slot)
runs in a child process; the N clients run in another child (raw sockets on one epoll loop, see
ddpbench.py), all subscribed to ``fan`` (100 rows). A writer thread in this process updates
--rows-per-tx rows per transaction, --rate transactions a second, writing
``extract(epoch from clock_timestamp())`` into the row; each client measures commit→receipt
latency from it. Reported: delivered DDP ``changed`` messages/s (messages / time from start to
the last message), latency p50/p99, CPU seconds of server and client processes.

Baseline in the same run: a bare trio server sending a pre-encoded frame to the same number of
swarm clients at the same message rate (what the transport plus the client process can do).
Last line: ``fanout_msgs_per_s=``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import psycopg
from ddpbench import ROOT  # noqa: F401

from cdcddp.devcluster import throwaway_cluster

ROWS = 100


def bench_app():  # type: ignore[no-untyped-def]
    from cdcddp.app import App
    from cdcddp.publish.definition import Cursor, Publication

    app = App("fanout")
    app.add_publication(Publication("fan", Cursor("fan", fields=["ts", "v", "label"])))
    return app


def prepare(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS fan")
        conn.execute("CREATE TABLE fan (id int PRIMARY KEY, ts float8, v int, label text)")
        conn.execute("INSERT INTO fan SELECT g, extract(epoch from clock_timestamp()), 0, "
                     "'row ' || g FROM generate_series(0, %s) g", (ROWS - 1,))


def report(name: str, result: dict, cpu: dict[str, float], wall: float) -> float:
    msgs = result["changed"]
    span = max(result["last_at"], result["stop_at"]) - result["start_at"]
    span = (result["last_at"] - result["start_at"]) if result["last_at"] else span
    rate = msgs / span if span > 0 else 0.0
    cpu_txt = ", ".join(f"{k} {v:.1f} s ({100 * v / wall:.0f}% of a core)" for k, v in cpu.items())
    print(f"{name}: {msgs:,} messages in {span:.2f} s = {rate:,.0f} msgs/s; latency over "
          f"{result['lat_count']:,}: p50 {result['lat_p50'] * 1000:.1f} ms, "
          f"p90 {result['lat_p90'] * 1000:.1f} ms, p99 {result['lat_p99'] * 1000:.1f} ms, "
          f"max {result['lat_max'] * 1000:.1f} ms", flush=True)
    print(f"  CPU over {wall:.1f} s: {cpu_txt}", flush=True)
    return rate


def run_live(args: argparse.Namespace, dsn: str) -> tuple[float, dict]:
    prepare(dsn)
    server, port = ddpbench.start_child([__file__, "--serve", "--dsn", dsn])
    swarm = None
    try:
        t0 = time.perf_counter()
        swarm = ddpbench.Swarm(port, args.clients, [["fan", []]])
        ready = swarm.wait_ready()
        print(f"{args.clients} clients connected and subscribed in "
              f"{time.perf_counter() - t0:.2f} s (last sub->ready {ready['seconds']:.2f} s)",
              flush=True)
        writer = ddpbench.Writer(dsn, "fan", ROWS, args.rate, args.rows_per_tx)
        server_cpu0 = ddpbench.proc_cpu_seconds(server.pid)
        swarm.start()
        wall0 = time.perf_counter()
        elapsed = writer.run(args.seconds)
        result = swarm.stop()
        wall = time.perf_counter() - wall0
        server_cpu = ddpbench.proc_cpu_seconds(server.pid) - server_cpu0
        expected = writer.commits * args.rows_per_tx * args.clients
        print(f"writer: {writer.commits} commits ({writer.commits * args.rows_per_tx} row "
              f"updates) in {elapsed:.2f} s = {writer.commits / elapsed:.1f} commits/s "
              f"(max behind schedule {writer.behind_max * 1000:.1f} ms); offered "
              f"{expected / elapsed:,.0f} msgs/s; expected {expected:,} messages, "
              f"got {result['changed']:,}", flush=True)
        rate = report("cdcddp live", result,
                      {"server": server_cpu, "clients": result["cpu_seconds"]}, wall)
        return rate, result
    finally:
        if swarm is not None:
            swarm.kill()
        ddpbench.stop_child(server)


def run_baseline(args: argparse.Namespace) -> None:
    rate = args.rate * args.rows_per_tx
    server, port = ddpbench.start_child([ddpbench.__file__, "broadcast", "--rate", str(rate)])
    swarm = None
    try:
        swarm = ddpbench.Swarm(port, args.clients, [["fan", []]], max_drain=0.0)
        swarm.wait_ready()
        cpu0 = ddpbench.proc_cpu_seconds(server.pid)
        swarm.start()
        wall0 = time.perf_counter()
        time.sleep(args.seconds)
        result = swarm.stop()
        wall = time.perf_counter() - wall0
        cpu = ddpbench.proc_cpu_seconds(server.pid) - cpu0
        print(f"baseline: pre-encoded frame broadcast, {rate:g} frames/s to each of "
              f"{args.clients} clients (offered {rate * args.clients:,.0f} msgs/s)", flush=True)
        report("baseline broadcast", result, {"server": cpu, "clients": result["cpu_seconds"]},
               wall)
    finally:
        if swarm is not None:
            swarm.kill()
        ddpbench.stop_child(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=60.0, help="writer transactions/s")
    parser.add_argument("--rows-per-tx", type=int, default=1)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        ddpbench.serve_live(bench_app(), args.dsn, "bench_fanout")
        return
    ddpbench.raise_fd_limit(args.clients + 1024)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        print(f"{args.clients} clients, writer {args.rate:g} tx/s x {args.rows_per_tx} row(s), "
              f"{args.seconds:g} s", flush=True)
        rate, result = run_live(args, dsn)
    if not args.skip_baseline:
        run_baseline(args)
    ok = rate >= 50_000 and result["lat_p99"] <= 0.25
    print(f"targets: >= 50,000 msgs/s, p99 <= 250 ms -> {'met' if ok else 'NOT met'}")
    print(f"fanout_msgs_per_s={rate:.0f}")


if __name__ == "__main__":
    main()
