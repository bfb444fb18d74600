"""Snapshot benchmark: sub→ready for a large publication versus COPY of the same query.

    .venv/bin/python tests/bench/snapshot.py [--dsn DSN] [--rows 100000] [--runs 3]

A table of --rows rows (id, ts float8, v int, label text) is published whole. Each run: one
raw-socket DDP client (ddpbench swarm, separate process) connects, subscribes and waits for
``ready`` (time from before the TCP connect to ``ready``; every ``added`` frame is read, and
recognised by its first bytes without a JSON parse, so the client is not what is timed); then
``COPY (SELECT id, ts, v, label FROM snap) TO STDOUT`` through psycopg, all blocks read, timed
in this process. Each run also reads the server process's CPU time from the connect to
``ready`` (its threads take turns holding the GIL, so sub->ready cannot go much below it).
Medians; target ratio <= 3. The server runs with the default send-buffer bound
(--send-buffer-mb, 8): the initial result goes out in write-sized pieces. Last line:
``snapshot_ratio=``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import psycopg

from cdcddp.devcluster import throwaway_cluster

QUERY = "SELECT id, ts, v, label FROM snap"


def bench_app():  # type: ignore[no-untyped-def]
    from cdcddp.app import App
    from cdcddp.publish.definition import Cursor, Publication

    app = App("snapshot")
    app.add_publication(Publication("snap", Cursor("snap", fields=["ts", "v", "label"])))
    return app


def copy_seconds(dsn: str) -> tuple[float, int]:
    with psycopg.connect(dsn) as conn:
        started = time.perf_counter()
        size = 0
        with conn.cursor() as cur, cur.copy(f"COPY ({QUERY}) TO STDOUT") as copy:
            for block in copy:
                size += len(block)
        return time.perf_counter() - started, size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--send-buffer-mb", type=int, default=8,
                        help="server max_send_buffer_bytes (default config: 8 MiB, which a "
                             "100,000-row snapshot exceeds: the client gets disconnected)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        ddpbench.serve_live(bench_app(), args.dsn, "bench_snapshot",
                            max_send_buffer_bytes=args.send_buffer_mb * 1_048_576)
        return
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("DROP TABLE IF EXISTS snap")
            conn.execute("CREATE TABLE snap (id int PRIMARY KEY, ts float8, v int, label text)")
            conn.execute("INSERT INTO snap SELECT g, extract(epoch from clock_timestamp()), g, "
                         "'label number ' || g FROM generate_series(1, %s) g", (args.rows,))
            conn.execute("VACUUM ANALYZE snap")
        server, port = ddpbench.start_child([__file__, "--serve", "--dsn", dsn,
                                             "--send-buffer-mb", str(args.send_buffer_mb)])
        print(f"server max_send_buffer_bytes = {args.send_buffer_mb} MiB", flush=True)
        subs, copies, cpus = [], [], []
        try:
            copy_seconds(dsn)  # warm the buffer cache
            for i in range(args.runs):
                cpu = ddpbench.proc_cpu_seconds(server.pid)
                swarm = ddpbench.Swarm(port, 1, [["snap", []]])
                try:
                    ready = swarm.wait_ready()
                    cpus.append(ddpbench.proc_cpu_seconds(server.pid) - cpu)
                    swarm.start()
                    swarm.stop()
                finally:
                    swarm.kill()
                subs.append(ready["seconds"])
                c, size = copy_seconds(dsn)
                copies.append(c)
                print(f"run {i + 1}: sub->ready {ready['seconds'] * 1000:.0f} ms (server CPU "
                      f"{cpus[-1] * 1000:.0f} ms), COPY {c * 1000:.0f} ms ({size / 1e6:.1f} MB), "
                      f"ratio {ready['seconds'] / c:.2f}", flush=True)
                time.sleep(0.5)  # let the server release the observer
        finally:
            ddpbench.stop_child(server)
    sub, copy = statistics.median(subs), statistics.median(copies)
    ratio = sub / copy
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    print(f"server CPU from connect to ready (all its threads; counted in ticks of "
          f"{tick_ms:.0f} ms): median {statistics.median(cpus) * 1000:.0f} ms")
    print(f"median: sub->ready {sub * 1000:.0f} ms ({args.rows / sub:,.0f} rows/s), COPY "
          f"{copy * 1000:.0f} ms ({args.rows / copy:,.0f} rows/s); target ratio <= 3 -> "
          f"{'met' if ratio <= 3 else 'NOT met'}")
    print(f"snapshot_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
