"""Micro-benchmark: decode rate of real wal2json v2 payloads for five-column rows.

    .venv/bin/python tests/bench/decode_micro.py [--rows 100000] [--dsn DSN]

Without ``--dsn`` a throwaway cluster is started. The payloads are produced by wal2json with
``WAL2JSON_OPTIONS`` (through the SQL API, with ``SESSION_SETTINGS``), held in memory as bytes,
then decoded in a tight loop; the figure is decoder work only (no socket, no protocol). Each
payload is decoded the way the replication stream does it (with the XLogData start LSN, which
the SQL API returns as ``lsn``) and, for comparison, parsing the document's LSN text. Last line:
``decode_rows_per_s=`` (the slower workload, as the stream decodes).
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
from cdcddp.wal.lsn import parse_lsn

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


def capture(dsn: str, workload: str, rows: int) -> list[tuple[int, bytes]]:
    """(record LSN, payload) of each change the workload writes."""
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
            cur = conn.execute("SELECT lsn::text, data FROM pg_logical_slot_get_changes("
                               f"%s, NULL, NULL, {marks})", (slot, *options))
            return [(parse_lsn(lsn), data.encode()) for lsn, data in cur]
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


def measure(changes: list[tuple[int, bytes]], decode: Callable[[bytes, int | None], object],
            repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for lsn, payload in changes:
            decode(payload, lsn)
        best = min(best, time.perf_counter() - start)
    return len(changes) / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dsn")
    args = parser.parse_args()
    rates = []
    with _database(args.dsn) as dsn:
        for workload in WORKLOADS:
            rows = capture(dsn, workload, args.rows)[1:-1]  # drop B and C
            size = sum(len(payload) for _, payload in rows) / len(rows)
            rate = measure(rows, Decoder().decode)
            text_lsn = measure([(None, payload) for _, payload in rows], Decoder().decode)  # type: ignore[misc]
            # Baseline in the same run: the machine is shared, so absolute rates wander.
            parse_only = measure(rows, lambda payload, _: orjson.loads(payload))
            rates.append(rate)
            print(f"{workload:8} {len(rows)} rows, {size:.0f} B/row: {rate:,.0f} rows/s "
                  f"({1e6 / rate:.2f} us/row; {1e6 / text_lsn:.2f} parsing the LSN text); "
                  f"orjson.loads alone {parse_only:,.0f}/s ({1e6 / parse_only:.2f} us/row)")
    print(f"decode_rows_per_s={min(rates):.0f}")


if __name__ == "__main__":
    main()
