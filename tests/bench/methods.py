"""Methods benchmark: a writing method's result and its ``updated`` (the write fence), against
the same statement committed directly over psycopg.

    .venv/bin/python tests/bench/methods.py [--dsn DSN] [--clients 20] [--seconds 10]

Without --dsn it starts a throwaway cluster. Table ``notes`` has a row per client. The cdcddp
server (live engine, temporary slot) runs in a child process; this process runs --clients DDP
clients (cdcddp.client on one trio loop), each subscribed to its own row and calling
``notes.bump`` (a typed method: one UPDATE of that row in the method's transaction) one call
after another, timing the ``result`` and the ``updated``. ``updated`` comes once the stream has
applied the method's commit and the client got the row's ``changed``.

Baseline in the same run, before the server starts: --clients threads each run the same UPDATE
of its own row, one autocommit statement after another, over psycopg (a connection each).
Reported: calls (commits) per second, p50/p99 of each latency. Last line:
``method_updated_p50_ratio=`` (the updated's p50 over the direct commit's p50).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import psycopg
from ddpbench import ROOT  # noqa: F401
from pydantic import BaseModel

from cdcddp.app import App
from cdcddp.devcluster import throwaway_cluster
from cdcddp.methods import MethodContext, Methods
from cdcddp.publish.definition import Cursor, Publication, Publications
from cdcddp.publish.filters import C, Param

UPDATE = "UPDATE notes SET n = n + 1, body = %s WHERE id = %s"


class Bump(BaseModel):
    id: str
    body: str


class One(BaseModel):
    id: str


methods = Methods()


@methods.method("notes.bump")
async def bump(ctx: MethodContext, args: Bump) -> None:
    await ctx.execute(UPDATE, (args.body, args.id))


def bench_app() -> App:
    publications = Publications()
    publications.add(Publication("notes.one", Cursor("notes", fields=["n", "body"],
                                                     filter=C("id") == Param("id")),
                                 params=One))
    app = App("methods-bench", publications)
    app.include_methods(methods)
    return app


def prepare(dsn: str, clients: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS notes")
        conn.execute("CREATE TABLE notes (id text PRIMARY KEY, n int NOT NULL, body text)")
        conn.execute("INSERT INTO notes SELECT 'c' || g, 0, '' FROM generate_series(0, %s) g",
                     (clients - 1,))


def summary(name: str, latencies: list[float], seconds: float) -> float:
    ordered = sorted(latencies)
    p50 = ddpbench.percentile(ordered, 0.50) * 1000
    p99 = ddpbench.percentile(ordered, 0.99) * 1000
    print(f"{name}: {len(ordered):,} in {seconds:.1f} s = {len(ordered) / seconds:,.0f}/s; "
          f"p50 {p50:.2f} ms, p99 {p99:.2f} ms", flush=True)
    return p50


def run_direct(dsn: str, clients: int, seconds: float) -> list[float]:
    latencies: list[float] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def work(k: int) -> None:
        mine: list[float] = []
        with psycopg.connect(dsn, autocommit=True) as conn:
            start.wait()
            stop = time.perf_counter() + seconds
            i = 0
            while (t0 := time.perf_counter()) < stop:
                conn.execute(UPDATE, (f"direct {i}", f"c{k}"))
                mine.append(time.perf_counter() - t0)
                i += 1
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies


def run_methods(port: int, clients: int, seconds: float) -> tuple[list[float], list[float]]:
    import trio

    from cdcddp.client import connect

    results: list[float] = []
    updates: list[float] = []

    async def one(k: int, go: trio.Event) -> None:
        async with connect(f"ws://127.0.0.1:{port}/websocket") as client:
            await client.subscribe("notes.one", {"id": f"c{k}"})
            await go.wait()
            stop = trio.current_time() + seconds
            i = 0
            while (t0 := trio.current_time()) < stop:
                body = f"method {i}"
                call = await client.apply("notes.bump", [{"id": f"c{k}", "body": body}])
                await client.wait_for(lambda call=call: call.result_received.is_set(), 30)
                t1 = trio.current_time()
                await call.result()
                await client.wait_for(lambda call=call: call.updated_received.is_set(), 30)
                results.append(t1 - t0)
                updates.append(trio.current_time() - t0)
                # The fence's promise: the change came before `updated`.
                assert client.collections["notes"][f"c{k}"]["body"] == body
                i += 1

    async def main() -> None:
        go = trio.Event()
        async with trio.open_nursery() as nursery:
            for k in range(clients):
                nursery.start_soon(one, k, go)
            await trio.sleep(1.0)  # connected and subscribed
            go.set()

    trio.run(main)
    return results, updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        ddpbench.serve_live(bench_app(), args.dsn, "bench_methods")
        return
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        prepare(dsn, args.clients)
        print(f"{args.clients} clients, {args.seconds:g} s each part", flush=True)
        direct = run_direct(dsn, args.clients, args.seconds)
        direct_p50 = summary("direct UPDATE commits (psycopg)", direct, args.seconds)
        server, port = ddpbench.start_child([__file__, "--serve", "--dsn", dsn])
        try:
            cpu0 = ddpbench.proc_cpu_seconds(server.pid)
            results, updates = run_methods(port, args.clients, args.seconds)
            cpu = ddpbench.proc_cpu_seconds(server.pid) - cpu0
        finally:
            ddpbench.stop_child(server)
    summary("method result", results, args.seconds)
    updated_p50 = summary("method updated", updates, args.seconds)
    print(f"server CPU {cpu:.1f} s, {cpu / max(len(updates), 1) * 1e6:.0f} us per call")
    print(f"method_updated_p50_ratio={updated_p50 / direct_p50:.2f}")


if __name__ == "__main__":
    main()
