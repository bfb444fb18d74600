"""Latency benchmark: commit→client latency at a modest load (default 100 tx/s, 100 clients).

    .venv/bin/python tests/bench/latency.py [--dsn DSN] [--clients 100] [--rate 100]
                                            [--seconds 20]

Same setup as fanout.py (server child with the live engine, raw-socket client swarm child, one
row updated per transaction with ``clock_timestamp()`` in it), at a load far below saturation.
Targets: p50 <= 5 ms, p99 <= 25 ms. Last line: ``latency_p99_ms=``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import fanout

from cdcddp.devcluster import throwaway_cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=100.0, help="writer transactions/s")
    args = parser.parse_args()
    args.rows_per_tx = 1
    ddpbench.raise_fd_limit(args.clients + 1024)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        print(f"{args.clients} clients, writer {args.rate:g} tx/s, {args.seconds:g} s",
              flush=True)
        _, result = fanout.run_live(args, dsn)
    p50, p99 = result["lat_p50"] * 1000, result["lat_p99"] * 1000
    ok = p50 <= 5 and p99 <= 25
    print(f"targets: p50 <= 5 ms, p99 <= 25 ms -> {'met' if ok else 'NOT met'} "
          f"(p50 {p50:.2f} ms, p99 {p99:.2f} ms)")
    print(f"latency_p99_ms={p99:.2f}")


if __name__ == "__main__":
    main()
