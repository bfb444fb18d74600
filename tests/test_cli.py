"""The ``cdcddp`` command, run as a subprocess like an operator would."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from cdcddp.wal.lsn import parse_lsn
from tests.pg_support import sql

CDCDDP = [sys.executable, "-m", "cdcddp.cli"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDCDDP, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT)


def test_slot_create_status_drop(db_dsn: str) -> None:
    created = run("slot", "create", "--dsn", db_dsn, "--slot", "cli_slot")
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created replication slot cli_slot at ")

    status = run("slot", "status", "--dsn", db_dsn, "--slot", "cli_slot")
    assert status.returncode == 0, status.stderr
    fields = dict(line.split(": ", 1) for line in status.stdout.strip().splitlines())
    assert fields["active"] == "false" and fields["plugin"] == "wal2json"
    assert fields["wal_status"] == "reserved" and fields["safe_wal_size"] == "unlimited"
    assert fields["invalidation"] == "none"
    parse_lsn(fields["confirmed_flush_lsn"])
    assert int(fields["retained_wal_bytes"]) >= 0

    as_json = json.loads(run("slot", "status", "--dsn", db_dsn, "--slot", "cli_slot",
                             "--json").stdout)
    assert as_json["slot_name"] == "cli_slot" and as_json["active"] is False

    again = run("slot", "create", "--dsn", db_dsn, "--slot", "cli_slot")
    assert again.returncode == 1
    assert again.stderr == ("cdcddp: replication slot 'cli_slot' already exists: use it, or "
                            "drop it first (cdcddp slot drop --slot cli_slot).\n")

    assert run("slot", "drop", "--dsn", db_dsn, "--slot", "cli_slot").returncode == 0
    missing = run("slot", "status", "--dsn", db_dsn, "--slot", "cli_slot")
    assert missing.returncode == 1
    assert missing.stderr == ("cdcddp: replication slot 'cli_slot' does not exist: create it "
                              "with cdcddp slot create --slot cli_slot.\n")


def test_slot_create_failover_makes_a_failover_slot_where_the_server_has_them(
        db_dsn: str) -> None:
    (version,), = sql(db_dsn, "SELECT current_setting('server_version_num')::int")
    created = run("slot", "create", "--dsn", db_dsn, "--slot", "cli_failover", "--failover")
    if version < 170000:
        assert created.returncode == 1
        assert created.stderr == (
            f"cdcddp: failover slots need PostgreSQL 17 or later (this server is "
            f"{version // 10000}.{version % 10000}): leave out --failover.\n")
        return
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("created failover replication slot cli_failover at ")
    status = json.loads(run("slot", "status", "--dsn", db_dsn, "--slot", "cli_failover",
                            "--json").stdout)
    assert (status["failover"], status["synced"]) == (True, False)
    assert run("slot", "drop", "--dsn", db_dsn, "--slot", "cli_failover").returncode == 0


def test_serve_refuses_a_temporary_failover_slot_in_one_sentence(db_dsn: str) -> None:
    done = run("serve", "cdcddp.examples.todos:app", "--dsn", db_dsn, "--listen",
               "127.0.0.1:0", "--metrics-listen", "off", "--temporary-slot", "--failover-slot")
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "cdcddp: failover_slot: a temporary slot cannot be a failover slot: turn one of "
        "temporary_slot and failover_slot off.")


def test_operator_errors_are_one_line() -> None:
    bad = run("slot", "status", "--dsn", "host=127.0.0.1 port=1 dbname=x", "--slot", "s")
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert bad.stderr.startswith("cdcddp: cannot connect to PostgreSQL (")
    assert bad.stderr.endswith("check --dsn.\n")
    usage = run("slot", "status", "--slot", "s", "--dsn", "x", "--bogus")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


def test_tail_without_slot_creation(db_dsn: str) -> None:
    tail = run("tail", "--dsn", db_dsn, "--slot", "nope", "--no-create")
    assert tail.returncode == 1
    assert tail.stderr == ("cdcddp: replication slot 'nope' does not exist: create it "
                           "(cdcddp slot create --slot nope) or allow --create.\n")


def test_tail_prints_json_lines_and_stops_cleanly(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, price numeric, data bytea, "
                     "at timestamptz, v text)")
        conn.execute("CREATE TABLE ignored (id int PRIMARY KEY)")
    proc = subprocess.Popen([*CDCDDP, "tail", "--dsn", db_dsn, "--slot", "cli_tail",
                             "--tables", "t", "--status-interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert proc.stdout is not None
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            deadline = time.monotonic() + 20
            while not conn.execute("SELECT 1 FROM pg_replication_slots WHERE "
                                   "slot_name = 'cli_tail' AND active").fetchone():
                assert time.monotonic() < deadline, proc.stderr.read1().decode()  # type: ignore[union-attr]
                time.sleep(0.05)
            conn.execute("INSERT INTO ignored VALUES (1)")
            conn.execute("INSERT INTO t VALUES (1, 12.50, '\\x00ff', "
                         "'2024-05-06 07:08:09.5+02', 'a')")
            conn.execute("UPDATE t SET v = 'b' WHERE id = 1")
        records = []
        while len([r for r in records if r["action"] == "C"]) < 3:
            records.append(json.loads(proc.stdout.readline()))
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        proc.kill()
        proc.wait()
    changes = [r for r in records if r["action"] not in ("B", "C")]
    assert [c["action"] for c in changes] == ["I", "U"]  # the other table is filtered out
    insert = changes[0]
    assert insert["table"] == "t" and insert["pk"] == ["id"]
    assert insert["new"]["price"] == "12.50"
    assert base64.b64decode(insert["new"]["data"]) == b"\x00\xff"
    assert insert["new"]["at"] == "2024-05-06T05:08:09.500000+00:00"
    commit = records[-1]
    parse_lsn(commit["end_lsn"])
    # Printed, acknowledged, and confirmed by the final status update on SIGINT.
    with psycopg.connect(db_dsn) as conn:
        confirmed, active = conn.execute(
            "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots "
            "WHERE slot_name = 'cli_tail'").fetchone()  # type: ignore[misc]
    assert not active and parse_lsn(confirmed) >= parse_lsn(commit["end_lsn"])
