"""``cdcddp serve``, end to end: the real command in its own process against a real cluster.

Start-up (schema, health, the static page, live DDP), a graceful SIGTERM while a writer keeps
committing and a method is running, a restart on the same slot, and misconfigurations that must
end with one sentence on stderr.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.app import App
from cdcddp.client import DDPClient, connect
from cdcddp.ddp.messages import MeteorError
from cdcddp.examples import todos
from cdcddp.methods import MethodContext, Methods
from cdcddp.wal.slot import plugin_refused_advice
from tests.pg_support import refusing_wal2json, sql, standby_that_never_answers
from tests.server_support import get

ROOT = Path(__file__).resolve().parent.parent
CDCDDP = [sys.executable, "-m", "cdcddp.cli"]
TODOS = "cdcddp.examples.todos:app"
SLOW_TODOS = "tests.test_serve:slow_todos_app"  # imported by the served process (cwd = ROOT)
SERVING = re.compile(r"serving \S+ on http://127\.0\.0\.1:(\d+)/")

# The Todos app plus one slow method, to have a call under way when SIGTERM arrives.
slow_methods = Methods()


@slow_methods.method("test.slowInsertList")
async def slow_insert_list(ctx: MethodContext, list_id: str, seconds: float) -> str:
    await ctx.execute("INSERT INTO lists (id, name) VALUES (%s, %s)", (list_id, "slow"))
    await trio.sleep(seconds)  # inside the method's transaction: committed after this
    return list_id


slow_todos_app = App("todos-slow", methods=todos.methods, schemas=("accounts", "todos"))
slow_todos_app.include_methods(slow_methods)
slow_todos_app.include_publications(todos.publications)


# -- running the command ------------------------------------------------------------------------


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


def serve_command(dsn: str, slot: str, app: str = TODOS, *extra: str) -> list[str]:
    return [*CDCDDP, "serve", app, "--dsn", dsn, "--slot", slot, "--listen", "127.0.0.1:0",
            "--metrics-listen", "off", *extra]


async def start_serve(dsn: str, slot: str, app: str = TODOS, *extra: str,
                      env: dict[str, str] | None = None) -> Served:
    """Spawn ``cdcddp serve`` and wait until it logs its port (its output goes to a file)."""
    log_path = Path(tempfile.mkstemp(prefix="cdcddp-serve-", suffix=".log")[1])
    with log_path.open("wb") as out:
        proc = subprocess.Popen(serve_command(dsn, slot, app, *extra), stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT,
                                env=None if env is None else {**os.environ, **env})
    served = Served(proc, log_path)
    with trio.fail_after(20):
        while not (match := SERVING.search(served.output())):
            if proc.poll() is not None:
                raise AssertionError(f"cdcddp serve exited with {proc.returncode}:\n"
                                     f"{served.output()}")
            await trio.sleep(0.05)
    served.port = int(match[1])
    return served


async def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    with trio.fail_after(timeout):
        while proc.poll() is None:
            await trio.sleep(0.02)
    return proc.returncode


@asynccontextmanager
async def serving(dsn: str, slot: str, app: str = TODOS, *extra: str,
                  env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    served = await start_serve(dsn, slot, app, *extra, env=env)
    try:
        yield served
    finally:
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGTERM)
            try:
                await wait_exit(served.proc, 10)
            except trio.TooSlowError:
                served.proc.kill()
                served.proc.wait()
        served.log_path.unlink(missing_ok=True)


def public_lists(dsn: str) -> dict[str, str]:
    return dict(sql(dsn, "SELECT id, name FROM lists WHERE user_id IS NULL"))


def names(client: DDPClient) -> dict[str, str]:
    return {i: d.get("name") for i, d in client.collections.get("lists", {}).items()}


# -- (a) start-up: schema, HTTP routes, live DDP -------------------------------------------------


async def test_serve_starts_applies_the_schema_and_streams_sql_writes(db_dsn: str) -> None:
    assert sql(db_dsn, "SELECT to_regclass('public.todos') IS NULL") == [(True,)]
    async with serving(db_dsn, "serve_start") as served:
        # The app's schema files were applied before serving.
        assert sql(db_dsn, "SELECT to_regclass('public.lists') IS NOT NULL, "
                           "to_regclass('public.users') IS NOT NULL") == [(True, True)]
        # The slot exists, is wal2json's and is being consumed.
        assert sql(db_dsn, "SELECT plugin, active FROM pg_replication_slots "
                           "WHERE slot_name = 'serve_start'") == [("wal2json", True)]

        status, _, body = await get(served.port, "/healthz")
        assert (status, body.strip()) == (200, b"ok")
        status, headers, body = await get(served.port, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b"<script" in body
        status, headers, body = await get(served.port, "/sockjs/info")
        assert status == 200 and json.loads(body)["websocket"] is True

        async with connect(served.url) as client:
            await client.subscribe("lists.public")
            assert client.collections.get("lists", {}) == {}
            sql(db_dsn, "INSERT INTO lists (id, name) VALUES ('l1', 'from psql')",
                "INSERT INTO lists (id, name) VALUES ('l2', 'second')")
            await client.subscribe("todos.inList", {"listId": "l1"})
            sql(db_dsn, "INSERT INTO todos (id, list_id, text) VALUES ('t1', 'l1', 'milk')")
            await client.wait_for(lambda: "t1" in client.collections.get("todos", {}))
            assert names(client) == {"l1": "from psql", "l2": "second"}
            assert client.collections["lists"]["l1"] == {
                "name": "from psql", "incompleteCount": 0, "userId": None}
            todo = client.collections["todos"]["t1"]
            assert (todo["listId"], todo["text"], todo["checked"]) == ("l1", "milk", False)
            sql(db_dsn, "UPDATE lists SET name = 'renamed' WHERE id = 'l2'",
                "DELETE FROM todos WHERE id = 't1'")
            await client.wait_for(lambda: names(client).get("l2") == "renamed"
                                  and "t1" not in client.collections["todos"])
            # A method through the same process: committed, then visible to the subscriber.
            list_id = await client.call("lists.insert", {"name": "by method"},
                                        wait_updated=True)
            assert names(client)[list_id] == "by method"
            assert public_lists(db_dsn) == names(client)

        served.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(served.proc, 10) == 0
        output = served.output()
        assert "Traceback" not in output, output
        assert "received SIGTERM, shutting down" in output
        assert output.count("applied schema accounts, todos") == 1  # one log handler


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Writing an app"):text.index("## Dependencies")]
    return re.findall(rf"```{language}\n(.*?)```", section, re.DOTALL)


async def test_the_readme_example_app_runs_as_written(db_dsn: str, tmp_path: Path) -> None:
    (schema,), (module, client_code) = readme_blocks("sql"), readme_blocks("python")
    assert module.startswith("# notes_app.py\n")
    (tmp_path / "notes_app.py").write_text(module)
    sql(db_dsn, schema)
    checked = subprocess.run([*CDCDDP, "check", "notes_app:app", "--dsn", db_dsn],
                             capture_output=True, text=True, timeout=60, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip().endswith("0 error(s), 1 warning(s)")  # wal keep size
    async with serving(db_dsn, "serve_readme", "notes_app:app",
                       env={"PYTHONPATH": str(tmp_path)}) as served:
        # The README's client, pointed at this server, printing into a list.
        printed: list[Any] = []
        code = client_code.replace("ws://127.0.0.1:3000/websocket", served.url)
        body = "\n".join("    " + line for line in code.splitlines())
        namespace: dict[str, Any] = {"print": printed.append}
        exec(f"async def readme_client():\n{body}\n", namespace)
        await namespace["readme_client"]()
        (note,) = printed
        assert (note["board"], note["body"]) == ("kitchen", "milk")
        # A row written by plain SQL reaches a subscriber; other boards do not.
        async with connect(served.url) as client:
            await client.subscribe("notes.onBoard", {"board": "kitchen"})
            sql(db_dsn, "INSERT INTO notes (id, board, body) VALUES ('n1', 'kitchen', 'eggs'), "
                        "('n2', 'garage', 'oil')")
            await client.wait_for(lambda: "n1" in client.collections.get("notes", {}))
            assert {d["body"] for d in client.collections["notes"].values()} == {"milk", "eggs"}
            assert set(client.collections["notes"]["n1"]) == {"board", "body", "createdAt"}


# -- (b) SIGTERM under load, restart on the same slot ------------------------------------------


@dataclass
class Writer:
    """Commits one public list per transaction from a thread until stopped; each row's
    transaction id is its commit order."""

    dsn: str
    interval: float = 0.01
    committed: list[str] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                n = 0
                while not self._stop.is_set():
                    n += 1
                    row_id = f"w{n:05d}"
                    conn.execute("INSERT INTO lists (id, name) VALUES (%s, %s)",
                                 (row_id, f"row {n}"))
                    self.committed.append(row_id)  # after the commit returned
                    time.sleep(self.interval)
        except BaseException as exc:
            self.error = exc

    @contextmanager
    def running(self) -> Iterator[Writer]:
        thread = threading.Thread(target=self.run, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            thread.join(10)
        assert self.error is None, self.error


def pending_in_slot(dsn: str, slot: str) -> set[str]:
    """Ids of the lists inserted by transactions the slot still holds (not yet confirmed),
    read with a peek: nothing is consumed."""
    rows = sql(dsn, "SELECT data FROM pg_logical_slot_peek_changes(%s, NULL, NULL, "
                    "'format-version', '2', 'include-transaction', '0')", params=(slot,))
    ids = set()
    for (data,) in rows:
        change = json.loads(data)
        if change.get("action") == "I" and change.get("table") == "lists":
            ids.update(c["value"] for c in change["columns"] if c["name"] == "id")
    return ids


async def test_sigterm_under_load_loses_nothing_and_restart_resumes_the_slot(
        db_dsn: str) -> None:
    slot = "serve_sigterm"
    first = await start_serve(db_dsn, slot, SLOW_TODOS)
    try:
        writer = Writer(db_dsn)
        with writer.running():
            async with connect(first.url, log_messages=True) as watcher, \
                    connect(first.url, log_messages=True) as caller:
                await watcher.subscribe("lists.public")
                await watcher.wait_for(lambda: len(names(watcher)) >= 15)
                call = await caller.apply("test.slowInsertList", ["slow1", 1.0])
                await trio.sleep(0.3)  # the call is inside its transaction now
                assert not call.result_received.is_set()

                signalled = time.monotonic()
                first.proc.send_signal(signal.SIGTERM)
                await watcher.wait_for(lambda: watcher.closed, timeout=10)
                await caller.wait_for(lambda: caller.closed, timeout=10)
                assert await wait_exit(first.proc, 10) == 0
                stopped_in = time.monotonic() - signalled
                committed_at_exit = len(writer.committed)
                seen_before = set(names(watcher))

                # Both clients were told "going away"; the running call finished first.
                assert watcher.ws.closed is not None and watcher.ws.closed.code == 1001
                assert caller.ws.closed is not None and caller.ws.closed.code == 1001
                assert call.result_received.is_set() and call.error is None
                assert call.value == "slow1"

            output = first.output()
            assert "Traceback" not in output, output
            assert stopped_in < 5, f"shutdown took {stopped_in:.1f} s"

            # The process is gone and the slot inactive. Its final confirmation covers every
            # transaction delivered to clients (a graceful stop leaves no needless WAL), and
            # every row committed since the process exited is still held by the slot.
            await trio.sleep(0.2)  # more rows committed while nothing consumes the slot
            committed = writer.committed[:]
            pending = pending_in_slot(db_dsn, slot)
            assert sql(db_dsn, "SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                       params=(slot,)) == [(False,)]
            assert seen_before <= {*committed, "slow1"}  # only committed rows were ever sent
            assert not (seen_before & pending), "delivered rows were not confirmed"
            committed_while_down = set(committed[committed_at_exit + 1:])
            assert len(committed_while_down) >= 3
            assert committed_while_down <= pending, "the slot skipped rows nobody applied"

            # Restart on the same slot while the writer keeps going.
            second = await start_serve(db_dsn, slot, SLOW_TODOS)
            try:
                async with connect(second.url) as client:
                    await client.subscribe("lists.public")
                    after_subscribe = len(writer.committed)
                    # Rows committed after this subscription's snapshot reach it through the
                    # slot.
                    await client.wait_for(lambda: len(names(client)) >= after_subscribe + 15,
                                          timeout=15)
                    writer._stop.set()
                    await trio.sleep(0.1)
                    expected = public_lists(db_dsn)
                    await client.wait_for(lambda: names(client) == expected, timeout=15)
                    assert set(writer.committed) | {"slow1"} <= set(names(client))
            finally:
                second.proc.send_signal(signal.SIGTERM)
                assert await wait_exit(second.proc, 10) == 0
                assert "Traceback" not in second.output(), second.output()
                second.log_path.unlink(missing_ok=True)
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
            first.proc.wait()
        first.log_path.unlink(missing_ok=True)


# -- (c) misconfiguration: one sentence, non-zero, no traceback -----------------------------------


def run_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CDCDDP, "serve", *args], capture_output=True, text=True,
                          timeout=30, cwd=ROOT)


def one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("cdcddp: "), lines[0]
    return lines[0]


async def _terminate_method_backend(dsn: str, waiting_on: str) -> None:
    """Terminate the node's session that waits on ``waiting_on`` (a wait event) in ``dsn``'s
    database, once there is one."""
    with trio.fail_after(20):
        while not sql(dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                           "datname = current_database() AND application_name = 'cdcddp' "
                           "AND wait_event = %s", params=(waiting_on,)):
            await trio.sleep(0.02)


async def test_a_method_whose_connection_is_lost_during_its_commit_gets_the_outcome(
        db_dsn: str) -> None:
    """The connection to PostgreSQL is lost while a method's COMMIT runs, so the connection
    cannot say whether it took effect; the server asks PostgreSQL (``pg_xact_status``).
    Committed: the method's result, and ``updated`` once its change reached the client (a
    500 before). Rolled back: 503, which a client may retry, since nothing happened."""
    async with serving(db_dsn, "in_doubt", TODOS) as served, connect(served.url) as client:
        await client.subscribe("lists.public")

        # Committed, then lost: the commit waits for a synchronous standby that never
        # answers, and its session is terminated meanwhile (the commit stands).
        with standby_that_never_answers(db_dsn):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_terminate_method_backend, db_dsn, "SyncRep")
                list_id = await client.call("lists.insert", {"name": "in doubt"},
                                            wait_updated=True)
        assert names(client)[list_id] == "in doubt"
        assert public_lists(db_dsn)[list_id] == "in doubt"

        # Rolled back: a deferred trigger holds the COMMIT, and the session is terminated.
        sql(db_dsn, "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$ "
                    "BEGIN PERFORM pg_sleep(60); RETURN NULL; END $$",
            "CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON lists DEFERRABLE "
            "INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.name = 'slow commit') "
            "EXECUTE FUNCTION slow_commit()")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_terminate_method_backend, db_dsn, "PgSleep")
            with pytest.raises(MeteorError) as refused:
                await client.call("lists.insert", {"name": "slow commit"})
        assert (refused.value.error, refused.value.reason) == (503, "Database unavailable")
        assert "slow commit" not in public_lists(db_dsn).values()
        output = served.output()
    assert "transaction" in output and "committed" in output and "rolled back" in output
    assert "Traceback" not in output, output


async def test_a_node_rides_out_a_postgresql_restart() -> None:
    """PostgreSQL restarts (a minor upgrade, say) under a serving node: clients stay
    connected with their documents; while it is down, a method gets 503 (retry later), not
    500; and afterwards every part works at its first use — the stream (changes committed
    right after the restart arrive), methods and logins (no 500 from a pooled connection
    the restart closed), new subscriptions, lookups."""
    import hashlib

    from cdcddp.devcluster import free_port, throwaway_cluster

    with throwaway_cluster("cdcddp-restart-") as cluster:
        dsn = cluster.dsn()
        metrics_port = free_port()
        async with serving(dsn, "restarted", TODOS, "--metrics-listen",
                           f"127.0.0.1:{metrics_port}") as served, \
                connect(served.url) as client:
            digest = {"digest": hashlib.sha256(b"pw").hexdigest(), "algorithm": "sha-256"}
            await client.call("createUser", {"username": "ann", "password": digest})
            await client.subscribe("lists.public")
            list_id = await client.call("lists.insert", {"name": "before"}, wait_updated=True)
            await client.subscribe("todos.inList", {"listId": list_id})
            await client.call("todos.insert", {"listId": list_id, "text": "milk"},
                              wait_updated=True)

            await trio.to_thread.run_sync(cluster.stop)
            with pytest.raises(MeteorError) as refused:
                await client.call("lists.insert", {"name": "while down"})
            assert (refused.value.error, refused.value.reason) == (503, "Database unavailable")
            with pytest.raises(MeteorError) as refused:
                await client.subscribe("todos.inList", {"listId": "x"})
            assert refused.value.error == 503
            _, _, body = await get(metrics_port, "/metrics")
            assert ('cdcddp_methods_total{method="lists.insert",outcome="unavailable"} 1.0'
                    in body.decode().splitlines())
            await trio.to_thread.run_sync(cluster.start)
            sql(dsn, f"UPDATE lists SET name = 'after' WHERE id = '{list_id}'")
            await client.wait_for(lambda: names(client)[list_id] == "after", 30)
            assert len(client.collections["todos"]) == 1

            other = await client.call("lists.insert", {"name": "by method"},
                                      wait_updated=True)
            assert names(client)[other] == "by method"
            await client.call("todos.insert", {"listId": list_id, "text": "eggs"},
                              wait_updated=True)
            assert sorted(t["text"] for t in client.collections["todos"].values()) == [
                "eggs", "milk"]
            async with connect(served.url) as second:
                await second.call("login", {"user": {"username": "ann"}, "password": digest})
                await second.subscribe("todos.inList", {"listId": other})
                await second.subscribe("lists.public")
                assert names(second) == names(client)
            output = served.output()
        assert "Traceback" not in output, output


def test_misconfigurations_exit_with_one_sentence(db_dsn: str) -> None:
    unreachable = one_sentence(run_serve(
        TODOS, "--dsn", "host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2"))
    assert "cannot connect to PostgreSQL" in unreachable and "--dsn" in unreachable

    missing_socket = one_sentence(run_serve(TODOS, "--dsn", "host=/nonexistent dbname=x"))
    assert "cannot connect to PostgreSQL" in missing_socket

    garbled = one_sentence(run_serve(TODOS, "--dsn", "dbname=x password=hunter2 =="))
    assert garbled.startswith("cdcddp: dsn: not a valid libpq connection string")
    assert "hunter2" not in garbled

    unknown_app = one_sentence(run_serve("no.such:app", "--dsn", db_dsn))
    assert unknown_app.startswith("cdcddp: cannot load app 'no.such:app'")
    not_an_app = one_sentence(run_serve("cdcddp.examples.todos:methods", "--dsn", db_dsn))
    assert "is not a cdcddp.app.App" in not_an_app

    bad_listen = one_sentence(run_serve(TODOS, "--dsn", db_dsn, "--listen", "abc"))
    assert bad_listen == ("cdcddp: listen: expected HOST:PORT (like 127.0.0.1:3000 or "
                          "[::]:3000), got 'abc' (from --listen).")
    one_sentence(run_serve(TODOS, "--dsn", db_dsn, "--listen", "127.0.0.1:70000"))
    missing_dsn = subprocess.run([*CDCDDP, "serve", TODOS], capture_output=True, text=True,
                                 timeout=30, cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert one_sentence(missing_dsn) == ("cdcddp: dsn: required, set it in the config file, "
                                         "as CDCDDP_DSN or with --dsn.")
    # Nothing was left behind by the failed starts.
    assert sql(db_dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]


async def test_a_taken_port_is_one_sentence(db_dsn: str) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = await trio.to_thread.run_sync(lambda: run_serve(
            TODOS, "--dsn", db_dsn, "--slot", "serve_taken", "--metrics-listen", "off",
            "--listen", f"127.0.0.1:{port}"))
    line = one_sentence(done)
    assert line == (f"cdcddp: listen: cannot listen on 127.0.0.1:{port} (address already in "
                    f"use): stop what uses it or choose another --listen."), line
    assert sql(db_dsn, "SELECT count(*) FROM pg_replication_slots") == [(0,)]  # untouched


# -- an invalidated slot (max_slot_wal_keep_size exceeded) ------------------------------------


@contextmanager
def wal_keep_size(dsn: str, value: str) -> Iterator[None]:
    """Set max_slot_wal_keep_size on the (shared, throwaway) cluster for the block."""
    sql(dsn, f"ALTER SYSTEM SET max_slot_wal_keep_size = '{value}'", "SELECT pg_reload_conf()")
    try:
        yield
    finally:
        sql(dsn, "ALTER SYSTEM RESET max_slot_wal_keep_size", "SELECT pg_reload_conf()")


def invalidate_slot(dsn: str, slot: str) -> None:
    """Write and recycle WAL past max_slot_wal_keep_size until PostgreSQL invalidates ``slot``."""
    sql(dsn, "CREATE TABLE IF NOT EXISTS filler (id serial PRIMARY KEY, pad text)")
    for _ in range(10):
        for _ in range(3):
            sql(dsn, "INSERT INTO filler (pad) SELECT repeat('x', 1000) "
                     "FROM generate_series(1, 50)", "SELECT pg_switch_wal()")
        sql(dsn, "CHECKPOINT")
        if sql(dsn, "SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s",
               params=(slot,)) == [("lost",)]:
            return
    raise AssertionError(f"slot {slot} was not invalidated")


def test_a_server_that_refuses_wal2json_stops_it_with_the_setting_to_change(
        db_dsn: str) -> None:
    done = subprocess.run(serve_command(refusing_wal2json(db_dsn), "serve_refused"),
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip().splitlines()[-1] == f"cdcddp: {plugin_refused_advice()}"


async def test_an_invalidated_slot_is_named_and_the_documented_recovery_works(
        db_dsn: str) -> None:
    slot = "serve_lost"
    cli = [*CDCDDP, "slot"]
    created = subprocess.run([*cli, "create", "--dsn", db_dsn, "--slot", slot],
                             capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert created.returncode == 0, created.stderr
    with wal_keep_size(db_dsn, "1MB"):
        invalidate_slot(db_dsn, slot)
        status = subprocess.run([*cli, "status", "--dsn", db_dsn, "--slot", slot, "--json"],
                                capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert json.loads(status.stdout)["wal_status"] == "lost"
        checked = subprocess.run([*CDCDDP, "check", TODOS, "--dsn", db_dsn, "--slot", slot],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert checked.returncode == 1
        assert f"error: replication slot '{slot}' is invalidated (wal_status = lost" \
            in checked.stdout

        # cdcddp never streams from a lost slot: it stops, naming the fix.
        done = await trio.to_thread.run_sync(lambda: subprocess.run(
            serve_command(db_dsn, slot), capture_output=True, text=True, timeout=30, cwd=ROOT))
        assert "Traceback" not in done.stderr, done.stderr
        assert done.returncode == 1, done.stderr
        assert done.stderr.strip().splitlines()[-1] == (
            f"cdcddp: replication slot '{slot}' is invalidated (wal_status = lost: the WAL it "
            f"needed was removed): drop it (cdcddp slot drop --slot {slot}) and create a new "
            "one, then resync.")

        # docs/operations.md: drop it, start again; clients get current data.
        dropped = subprocess.run([*cli, "drop", "--dsn", db_dsn, "--slot", slot],
                                 capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert dropped.returncode == 0, dropped.stderr
        async with serving(db_dsn, slot) as served, connect(served.url) as client:
            sql(db_dsn, "INSERT INTO lists (id, name) VALUES ('before', 'kept')")
            await client.subscribe("lists.public")
            sql(db_dsn, "INSERT INTO lists (id, name) VALUES ('after', 'streamed')")
            await client.wait_for(lambda: names(client) == {"before": "kept",
                                                            "after": "streamed"})
            assert sql(db_dsn, "SELECT wal_status FROM pg_replication_slots "
                               "WHERE slot_name = %s", params=(slot,)) == [("reserved",)]
