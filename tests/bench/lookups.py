"""Lookup benchmark: clients of a publication whose function reads a row, against the same
clients on a plain filter.

    .venv/bin/python tests/bench/lookups.py [--dsn DSN] [--clients 1000] [--lists 1]
                                            [--todos 20] [--rounds 3] [--repeat 2]

Tables ``lists (id, open)`` and ``todos (id, list_id, text)``: --lists lists of --todos todos
each. Two publications of a list's todos: ``todos.inOpenList``, a function that reads the
list's row with a lookup and publishes nothing while the list is closed, and the baseline
``todos.inList``, a plain ``list_id = k`` filter. The clients are dealt over the lists: with
one list (the default) every function reads the same row; with as many lists as clients, each
reads its own. The server runs in a child process; --clients raw-socket clients (ddpbench
swarm, in another process) subscribe to one of the two (timed: "ready in"). Then --rounds
rounds of a change that takes every todo out of every client's view, and one that brings them
back:

* lookup: closing the lists, and opening them again: every client's function runs again;
* baseline: moving the todos to the lists' negated ids, and back: the observers' rows move out
  and in.

Each change is timed from just before its commit to the last message it caused at a client (the
swarm drains until no message came for 3 s), with the server process's CPU time meanwhile, and
the swarm's counts are checked (--todos ``removed``, then --todos ``added``, per client). The
two publications alternate --repeat times (one swarm each time), so that the machine's drift
falls on both alike. Figures: per publication the median "ready in", the median time to
follow a change and the median server CPU per change; the ratio of the follow times is the
last line, ``lookup_follow_ratio=``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
import psycopg
from ddpbench import ROOT  # noqa: F401

from cdcddp.devcluster import throwaway_cluster

# A change counts as followed once no message came for this long (a server that runs each
# function in a transaction of its own sends the first one more than a second after it).
_DRAIN_IDLE = 3.0
LOOKUP = "todos.inOpenList"
PLAIN = "todos.inList"
# The change that empties every client's view and the one that fills it again, per publication.
CHANGES = {
    LOOKUP: ("UPDATE lists SET open = false", "UPDATE lists SET open = true"),
    PLAIN: ("UPDATE todos SET list_id = -list_id", "UPDATE todos SET list_id = -list_id"),
}


def bench_app():  # type: ignore[no-untyped-def]
    from pydantic import BaseModel

    from cdcddp.app import App
    from cdcddp.publish.definition import Cursor, Publication, Publications
    from cdcddp.publish.filters import C, Param

    class ListParams(BaseModel):
        listId: int

    app = App("lookups")
    app.add_publication(Publication(
        PLAIN, Cursor("todos", fields=["text"], filter=C("list_id") == Param("listId")),
        params=ListParams))
    publications = Publications()

    @publications.publication(LOOKUP, params=ListParams)
    def in_open_list(params: ListParams, user_id: Any, lookup: Any) -> Cursor | None:
        found = lookup.row("lists", params.listId, columns=["open"])
        if found is None or not found["open"]:
            return None
        return Cursor("todos", fields=["text"], filter=C("list_id") == params.listId)

    app.include_publications(publications)
    return app


def prepare(dsn: str, lists: int, todos: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS todos, lists")
        conn.execute("CREATE TABLE lists (id int PRIMARY KEY, open bool NOT NULL)")
        conn.execute("CREATE TABLE todos (id int PRIMARY KEY, list_id int NOT NULL, text text)")
        conn.execute("CREATE INDEX ON todos (list_id)")
        conn.execute("INSERT INTO lists SELECT g, true FROM generate_series(1, %s) g", (lists,))
        conn.execute("INSERT INTO todos SELECT g, 1 + g %% %s, 'todo ' || g "
                     "FROM generate_series(1, %s) g", (lists, lists * todos))
        conn.execute("VACUUM ANALYZE lists, todos")


def follow(swarm: ddpbench.Swarm, conn: psycopg.Connection[Any], statement: str,
           kind: str, expected: int, server_pid: int) -> tuple[float, float]:
    """Seconds from just before ``statement`` commits to the last message it caused, and the
    server's CPU seconds until the swarm reported (it idles meanwhile, once done)."""
    swarm.start()
    cpu = ddpbench.proc_cpu_seconds(server_pid)
    committed = time.time()
    conn.execute(statement)
    result = swarm.report()
    cpu = ddpbench.proc_cpu_seconds(server_pid) - cpu
    if result[kind] != expected:
        sys.exit(f"{statement!r}: {result[kind]} {kind} messages, expected {expected}")
    return float(result["last_at"]) - committed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--lists", type=int, default=1)
    parser.add_argument("--todos", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        ddpbench.serve_live(bench_app(), args.dsn, "bench_lookups")
        return
    if not 1 <= args.lists <= args.clients:
        parser.error("--lists must be between 1 and --clients")
    ddpbench.raise_fd_limit(args.clients + 1024)
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        prepare(dsn, args.lists, args.todos)
        run(args, dsn)


def run(args: argparse.Namespace, dsn: str) -> None:
    server, port = ddpbench.start_child([__file__, "--serve", "--dsn", dsn])
    ready: dict[str, list[float]] = {LOOKUP: [], PLAIN: []}
    follows: dict[str, list[float]] = {LOOKUP: [], PLAIN: []}
    cpus: dict[str, list[float]] = {LOOKUP: [], PLAIN: []}
    expected = args.clients * args.todos
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for i in range(args.repeat):
                for name in (LOOKUP, PLAIN):
                    subs = [[name, [{"listId": k}]] for k in range(1, args.lists + 1)]
                    swarm = ddpbench.Swarm(port, args.clients, subs, idle=_DRAIN_IDLE)
                    try:
                        ready[name].append(swarm.wait_ready()["seconds"])
                        empty, fill = CHANGES[name]
                        times = []
                        for _ in range(args.rounds):
                            for statement, kind in ((empty, "removed"), (fill, "added")):
                                seconds, cpu = follow(swarm, conn, statement, kind, expected,
                                                      server.pid)
                                times.append(seconds)
                                cpus[name].append(cpu)
                        follows[name] += times
                        print(f"{name}, pass {i + 1}/{args.repeat}: {args.clients:,} clients "
                              f"ready in {ready[name][-1]:.2f} s; a change followed by every "
                              f"client in {', '.join(f'{t * 1000:.0f}' for t in times)} ms",
                              flush=True)
                        swarm.stop()
                    finally:
                        swarm.kill()
    finally:
        ddpbench.stop_child(server)
    for name in (LOOKUP, PLAIN):
        print(f"{name}: ready in {statistics.median(ready[name]):.2f} s (median); a change "
              f"followed in {statistics.median(follows[name]) * 1000:.0f} ms (median of "
              f"{len(follows[name])}: {args.todos} messages to each of {args.clients:,} "
              f"clients, on {args.lists:,} list(s)), the server's CPU "
              f"{statistics.median(cpus[name]) * 1000:.0f} ms")
    ratio = statistics.median(follows[LOOKUP]) / statistics.median(follows[PLAIN])
    print(f"lookup_follow_ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
