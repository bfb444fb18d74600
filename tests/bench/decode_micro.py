"""Micro-benchmark: decode rate of real wal2json v2 payloads for five-column rows.

    .venv/bin/python tests/bench/decode_micro.py [--rows 100000] [--dsn DSN]

Without ``--dsn`` a throwaway cluster is started. The payloads are produced by wal2json with
``WAL2JSON_OPTIONS`` (through the SQL API, with ``SESSION_SETTINGS``), held in memory as bytes,
then decoded in a tight loop; the figure is decoder work only (no socket, no protocol).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import orjson
import psycopg

from cdcddp.devcluster import throwaway_cluster
from cdcddp.wal.decode import SESSION_SETTINGS, WAL2JSON_OPTIONS, Decoder

WORKLOADS = {
    # int pk, int, text, timestamptz, numeric(12,2)
    "numeric": ("id int PRIMARY KEY, qty int, label text, at timestamptz, price numeric(12,2)",
                "SELECT g, g %% 1000, 'label ' || g, now() - g * interval '1 second', "
                "(g %% 100000) / 100.0 FROM generate_series(1, %s) g"),
    # int pk, int, text, timestamptz, bool
    "bool": ("id int PRIMARY KEY, qty int, label text, at timestamptz, done bool",
             "SELECT g, g %% 1000, 'label ' || g, now() - g * interval '1 second', g %% 2 = 0 "
             "FROM generate_series(1, %s) g"),
}


@contextmanager
def _database(dsn: str | None) -> Iterator[str]:
    if dsn is not None:
        yield dsn
        return
    with throwaway_cluster("cdcddp-bench-") as cluster:
        yield cluster.dsn()


def capture(dsn: str, workload: str, rows: int) -> list[bytes]:
    columns, select = WORKLOADS[workload]
    slot = f"decode_bench_{workload}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, value in SESSION_SETTINGS.items():
            conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        conn.execute(f"DROP TABLE IF EXISTS bench_{workload}")
        conn.execute(f"CREATE TABLE bench_{workload} ({columns})")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        try:
            conn.execute(f"INSERT INTO bench_{workload} {select}", (rows,))
            options = [part for item in WAL2JSON_OPTIONS.items() for part in item]
            marks = ", ".join(["%s"] * len(options))
            cur = conn.cursor(binary=True)
            cur.execute(f"SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL, {marks})",
                        (slot, *options))
            return [row[0].encode() for row in cur]
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def measure(payloads: list[bytes], decode: Callable[[bytes], object], repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for payload in payloads:
            decode(payload)
        best = min(best, time.perf_counter() - start)
    return len(payloads) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    with _database(args.dsn) as dsn:
        for workload in WORKLOADS:
            payloads = capture(dsn, workload, args.rows)
            rows = payloads[1:-1]  # drop B and C
            size = sum(map(len, rows)) / len(rows)
            rate = measure(rows, Decoder().decode)
            # Baseline in the same run: the machine is shared, so absolute rates wander.
            parse_only = measure(rows, orjson.loads)
            print(f"{workload:8} {len(rows)} rows, {size:.0f} B/row: {rate:,.0f} rows/s "
                  f"({1e6 / rate:.2f} us/row); orjson.loads alone {parse_only:,.0f}/s "
                  f"({1e6 / parse_only:.2f} us/row)")


if __name__ == "__main__":
    main()
