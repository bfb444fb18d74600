"""Limited-cursor benchmark: what a sorted, limited subscription costs per change.

    .venv/bin/python tests/bench/limited.py [--dsn DSN] [--rows 10000] [--limit 20]
                                            [--changes 200]

A table of --rows posts in one room (index on (room, at)). DDP clients (in this process, with
the server) subscribe to the whole room (an unlimited cursor) and, from phase 2 on, to the
room's --limit latest posts (``sort=[("at", "desc")]``; its observer holds as many more in
reserve). Each change is one transaction, timed from before its commit until every client
holds its result:

- ``push``: a new latest post. The limited view takes it and lets its last post go;
- ``take``: the latest post is deleted. The limited view takes the next one from its reserve;
  once the reserve is used up, its observer reads its rows again (``limit_requery``), and
  until the stream has caught up with that read no client is flushed
  (``LiveData._hold_until_caught_up``).

Phase 1, the baseline: the unlimited view alone, pushes and takes alternating. Phase 2, a
feed: the same with both views. Phase 3, a drain: takes only, with both views (a re-read
every --limit + 1 takes). Prints p50/p99 per phase, view and kind, and the re-reads counted;
last line ``limited_drain_take_p99_ms=``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ddpbench
from ddpbench import ROOT  # noqa: F401

from cdcddp.app import App
from cdcddp.client import DDPClient, connect
from cdcddp.devcluster import throwaway_cluster
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.filters import C
from cdcddp.publish.livedata import LiveDataConfig
from cdcddp.server.config import ServerConfig
from cdcddp.server.server import Server

FIELDS = ["room", "at", "text"]


def bench_app(limit: int) -> App:
    app = App("limited-bench")
    app.add_publication(Publication("room.latest", Cursor(
        "posts", fields=FIELDS, filter=C("room") == 1, sort=[("at", "desc")], limit=limit)))
    app.add_publication(Publication("room.all", Cursor(
        "posts", fields=FIELDS, filter=C("room") == 1)))
    return app


def setup(dsn: str, rows: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS posts")
        conn.execute("CREATE TABLE posts (id bigserial PRIMARY KEY, room int NOT NULL, "
                     "at timestamptz NOT NULL, text text)")
        conn.execute("CREATE INDEX ON posts (room, at)")
        conn.execute("INSERT INTO posts (room, at, text) SELECT 1, now() - g * interval '1 s', "
                     "'post ' || g FROM generate_series(1, %s) g", (rows,))
        conn.execute("ANALYZE posts")


async def run(dsn: str, args: argparse.Namespace) -> dict[str, Any]:
    server = Server(bench_app(args.limit), ServerConfig(), dsn=dsn,
                    live_config=LiveDataConfig(slot="limited_bench", temporary_slot=True))
    samples: dict[str, list[float]] = {}
    requeries: dict[str, int] = {}
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        url = f"ws://127.0.0.1:{port}/websocket"
        live = server.live
        assert live is not None
        with psycopg.connect(dsn, autocommit=True) as conn:
            async with connect(url) as everything:
                await everything.subscribe("room.all")
                await changes(conn, {"1 unlimited (alone)": everything}, args.changes,
                              ("push", "take"), samples)
                async with connect(url) as latest:
                    await latest.subscribe("room.latest")
                    both = {"limited": latest, "unlimited (beside it)": everything}
                    for phase, kinds in (("2 feed", ("push", "take")), ("3 drain", ("take",))):
                        before = live.resync_reasons["limit_requery"]
                        await changes(conn, {f"{phase}, {view}": client
                                             for view, client in both.items()},
                                      args.changes, kinds, samples)
                        requeries[phase] = live.resync_reasons["limit_requery"] - before
                    assert len(_docs(latest)) == args.limit
        nursery.cancel_scope.cancel()
    return {"samples": samples, "requeries": requeries}


async def changes(conn: psycopg.Connection[Any], clients: dict[str, DDPClient], count: int,
                  kinds: tuple[str, ...], samples: dict[str, list[float]]) -> None:
    """``count`` rounds of ``kinds``; each change timed until every client has it."""
    for n in range(count):
        for kind in kinds:
            started = time.perf_counter()
            if kind == "push":
                (doc,), = conn.execute(
                    "INSERT INTO posts (room, at, text) VALUES (1, clock_timestamp() "
                    "+ interval '1 day', %s) RETURNING id::text", (f"new {n}",))
            else:
                (doc,), = conn.execute(
                    "DELETE FROM posts WHERE id = (SELECT id FROM posts WHERE room = 1 "
                    "ORDER BY at DESC, id LIMIT 1) RETURNING id::text")

            async def one(name: str, client: DDPClient, kind: str = kind,
                          doc: str = doc, started: float = started) -> None:
                await client.wait_for(
                    lambda: (doc in _docs(client)) == (kind == "push"), 30)
                samples.setdefault(f"{name} {kind}", []).append(time.perf_counter() - started)
            async with trio.open_nursery() as nursery:
                for name, client in clients.items():
                    nursery.start_soon(one, name, client)


def _docs(client: DDPClient) -> dict[str, Any]:
    return client.collections.get("posts", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn")
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        dsn = args.dsn or stack.enter_context(throwaway_cluster("cdcddp-bench-")).dsn()
        setup(dsn, args.rows)
        print(f"{args.rows:,} posts, the latest {args.limit} against all of them; "
              f"{args.changes} changes of each kind per phase, one transaction each",
              flush=True)
        result = trio.run(run, dsn, args)
    samples = result["samples"]
    for name, values in samples.items():
        ordered = sorted(values)
        print(f"{name}: p50 {statistics.median(ordered) * 1000:.2f} ms, "
              f"p99 {ddpbench.percentile(ordered, 0.99) * 1000:.2f} ms")
    for phase, count in result["requeries"].items():
        print(f"phase {phase}: the limited view read its rows again {count} times in "
              f"{args.changes} takes")
    drain = sorted(samples["3 drain, limited take"])
    print(f"limited_drain_take_p99_ms={ddpbench.percentile(drain, 0.99) * 1000:.2f}")


if __name__ == "__main__":
    main()
