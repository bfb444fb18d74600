"""Ingest benchmark: cdcddp's stream + decode against pg_recvlogical on the same backlog.

    .venv/bin/python tests/bench/ingest.py [--dsn DSN] [--rows 300000] [--runs 3]
                                           [--big-rows 1000000 | --skip-big]

Without --dsn it starts a throwaway LocalCluster. A backlog of --rows row changes (5-column
rows; per transaction 6 inserts, 3 updates, 1 delete) is written once; one slot per drain is
created before the load, so every drain decodes the same WAL. Drains alternate pg_recvlogical
(same wal2json options, output to /dev/null, -E endpos) and cdcddp (a subprocess running
``open_stream`` + the decoder, discarding events and acknowledging commits). Then the peak RSS
of a cdcddp drain of one --big-rows transaction is measured. Last line: ``ingest_ratio=`` (cdcddp
rate / pg_recvlogical rate, medians).

Timing: pg_recvlogical is timed around its process; cdcddp from before connecting to after
the clean stop, inside its process (interpreter start-up and imports excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from cdcddp.devcluster import find_bindir, throwaway_cluster

PER_TX = 10  # 6 inserts, 3 updates, 1 delete

LOAD_PROCEDURE = """
CREATE OR REPLACE PROCEDURE bench_load(changes int) LANGUAGE plpgsql AS $$
DECLARE
    done int := 0;
    base int := 0;
BEGIN
    WHILE done < changes LOOP
        INSERT INTO bench SELECT g, g, 'row ' || g, g * 1.5, now()
            FROM generate_series(base, base + 5) g;
        UPDATE bench SET a = a + 1, b = b || '+' WHERE id BETWEEN base AND base + 2;
        DELETE FROM bench WHERE id = base + 5;
        COMMIT;
        done := done + 10;
        base := base + 6;
    END LOOP;
END $$
"""


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# -- the cdcddp side (child process) ---------------------------------------------------------


def drain(dsn: str, slot: str, expect_changes: int) -> None:
    import trio

    from cdcddp.wal.events import Begin, Commit, Message
    from cdcddp.wal.stream import open_stream

    async def run() -> dict[str, float]:
        started = time.perf_counter()
        changes = 0
        baseline = 0
        async with open_stream(dsn, slot, create_slot=False) as stream:
            baseline = rss_kb()
            async for event in stream:
                kind = type(event)
                if kind is Commit:
                    stream.acknowledge(event.end_lsn)  # type: ignore[union-attr]
                    if changes >= expect_changes:
                        break
                elif kind is not Begin and kind is not Message:
                    changes += 1
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"elapsed": elapsed, "changes": changes, "baseline_kb": baseline,
                "peak_kb": peak}

    print(json.dumps(trio.run(run)), flush=True)


def run_cdcddp(dsn: str, slot: str, expect: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--drain", "--dsn", dsn, "--slot", slot,
                          "--expect", str(expect)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"cdcddp drain failed: {out.stderr.strip()}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    if result["changes"] != expect:
        sys.exit(f"cdcddp drain saw {result['changes']} changes, expected {expect}")
    return result


# -- the pg_recvlogical side -------------------------------------------------------------------


def run_recvlogical(bindir: Path, dsn: str, slot: str, endpos: str) -> float:
    from cdcddp.wal.decode import WAL2JSON_OPTIONS

    cmd = [str(bindir / "pg_recvlogical"), "-d", dsn, "--slot", slot, "--start", "--no-loop",
           "-E", endpos, "-f", "/dev/null"]
    for key, value in WAL2JSON_OPTIONS.items():
        cmd += ["-o", f"{key}={value}"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"pg_recvlogical failed: {proc.stderr.strip()}")
    return elapsed


# -- orchestration -------------------------------------------------------------------------------


def prepare(dsn: str, slots: list[str], rows: int) -> str:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in slots:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (slot,))
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'wal2json')", (slot,))
        conn.execute("DROP TABLE IF EXISTS bench")
        conn.execute("CREATE TABLE bench (id int PRIMARY KEY, a int, b text, c float8, "
                     "d timestamptz)")
        conn.execute(LOAD_PROCEDURE)
        conn.execute("CALL bench_load(%s)", (rows,))
        (endpos,) = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
    return str(endpos)


def drop_slots(dsn: str, slots: list[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in slots:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (slot,))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="use this database instead of a throwaway cluster")
    parser.add_argument("--rows", type=int, default=300_000, help="row changes in the backlog")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--big-rows", type=int, default=1_000_000)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--drain", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slot", help=argparse.SUPPRESS)
    parser.add_argument("--expect", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        drain(args.dsn, args.slot, args.expect)
        return


    rows = args.rows - args.rows % PER_TX
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(
            throwaway_cluster("cdcddp-bench-", max_wal_size="4GB")).dsn()
        run_benchmark(args, dsn, rows)


def run_benchmark(args: argparse.Namespace, dsn: str, rows: int) -> None:
    bindir = find_bindir()
    recv_slots = [f"bench_recv_{i}" for i in range(args.runs)]
    ours_slots = [f"bench_cdcddp_{i}" for i in range(args.runs)]
    t0 = time.perf_counter()
    endpos = prepare(dsn, recv_slots + ours_slots, rows)
    print(f"backlog: {rows} row changes in {rows // PER_TX} transactions, "
          f"written in {time.perf_counter() - t0:.1f} s, endpos {endpos}", flush=True)
    recv_rates, ours_rates = [], []
    for i in range(args.runs):
        elapsed = run_recvlogical(bindir, dsn, recv_slots[i], endpos)
        recv_rates.append(rows / elapsed)
        print(f"run {i + 1}: pg_recvlogical {elapsed:.2f} s = {rows / elapsed:,.0f} rows/s",
              flush=True)
        result = run_cdcddp(dsn, ours_slots[i], rows)
        ours_rates.append(rows / result["elapsed"])
        print(f"run {i + 1}: cdcddp        {result['elapsed']:.2f} s = "
              f"{rows / result['elapsed']:,.0f} rows/s", flush=True)
    drop_slots(dsn, recv_slots + ours_slots)
    recv, ours = statistics.median(recv_rates), statistics.median(ours_rates)
    print(f"median: pg_recvlogical {recv:,.0f} rows/s, cdcddp {ours:,.0f} rows/s")

    if not args.skip_big:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("TRUNCATE bench")
            conn.execute("SELECT pg_create_logical_replication_slot('bench_big', 'wal2json')")
            t0 = time.perf_counter()
            conn.execute("INSERT INTO bench SELECT g, g, 'row ' || g, g * 1.5, now() "
                         "FROM generate_series(1, %s) g", (args.big_rows,))
        print(f"big transaction: {args.big_rows} rows written in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        result = run_cdcddp(dsn, "bench_big", args.big_rows)
        drop_slots(dsn, ["bench_big"])
        grown = (result["peak_kb"] - result["baseline_kb"]) / 1024
        print(f"big transaction drained in {result['elapsed']:.1f} s; RSS baseline "
              f"{result['baseline_kb'] / 1024:.1f} MB, peak {result['peak_kb'] / 1024:.1f} MB")
        print(f"big_tx_rss_mb={grown:.1f}")
    print(f"ingest_ratio={ours / recv:.2f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
