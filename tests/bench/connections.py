"""Connections benchmark: N idle DDP connections against one server process.

    .venv/bin/python tests/bench/connections.py            # 5,000 connections
    .venv/bin/python tests/bench/connections.py --n 1000

Starts the server in a child process, opens N raw-WebSocket DDP connections (connect +
connected) from this process, then reports the connection setup rate, the server's RSS per idle
connection (VmRSS from /proc before and after) and DDP ping round trips at that load. The last
line is machine-readable: ``idle_conn_kb=…``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cdcddp.app import App, MethodContext  # noqa: E402
from cdcddp.client import DDPClient, connect  # noqa: E402
from cdcddp.server.server import serve  # noqa: E402


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def bench_app() -> App:
    app = App("bench")

    @app.method("echo")
    async def echo(ctx: MethodContext, *args: object) -> list[object]:
        return list(args)

    return app


def run_server(fd_limit: int) -> None:
    raise_fd_limit(fd_limit)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(serve, bench_app())
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
            nursery.cancel_scope.cancel()

    trio.run(main)


async def bench(n: int, concurrency: int, pings: int, fd_limit: int) -> None:
    server = subprocess.Popen([sys.executable, __file__, "--serve", "--fd-limit", str(fd_limit)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = int(await trio.to_thread.run_sync(server.stdout.readline))
        url = f"ws://127.0.0.1:{port}/websocket"
        # warm up (imports, first-connection allocations), then take the baseline
        async with connect(url) as warm:
            await warm.call("echo", 1)
        await trio.sleep(0.5)
        baseline_kb = rss_kb(server.pid)

        clients: list[DDPClient] = []
        failures = 0
        release = trio.Event()
        all_done = trio.Event()
        limiter = trio.CapacityLimiter(concurrency)

        async def hold() -> None:
            nonlocal failures
            await limiter.acquire()  # bounds handshakes in flight, not open connections
            released = False
            try:
                async with connect(url, timeout=60) as client:
                    limiter.release()
                    released = True
                    clients.append(client)
                    if len(clients) + failures >= n:
                        all_done.set()
                    await release.wait()
            except Exception as exc:
                if not released:
                    failures += 1
                    if failures <= 3:
                        print(f"connect failed: {exc!r}", file=sys.stderr)
                    if len(clients) + failures >= n:
                        all_done.set()
            finally:
                if not released:
                    limiter.release()

        async with trio.open_nursery() as nursery:
            started = trio.current_time()
            for _ in range(n):
                nursery.start_soon(hold)
            await all_done.wait()
            setup_seconds = trio.current_time() - started
            await trio.sleep(1.0)  # let the server settle
            loaded_kb = rss_kb(server.pid)

            rtts = []
            sample = clients[:: max(1, len(clients) // pings)][:pings]
            for client in sample:
                rtts.append(await client.ping(timeout=10))
            rtts.sort()
            burst_started = trio.current_time()
            async with trio.open_nursery() as burst:
                for client in clients:
                    burst.start_soon(client.ping, 30)
            burst_seconds = trio.current_time() - burst_started
            release.set()

        opened = len(clients)
        per_conn_kb = (loaded_kb - baseline_kb) / max(opened, 1)
        p50 = statistics.median(rtts) * 1000
        p99 = rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] * 1000
        print(f"connections opened: {opened}/{n} (failures {failures}), "
              f"{setup_seconds:.2f} s -> {opened / setup_seconds:.0f} connections/s "
              f"(concurrency {concurrency})")
        print(f"server RSS: {baseline_kb} KB before, {loaded_kb} KB with {opened} idle "
              f"connections -> {per_conn_kb:.1f} KB per connection (target <= 32)")
        print(f"ping RTT over {len(rtts)} sequential pings at load: p50 {p50:.2f} ms, "
              f"p99 {p99:.2f} ms")
        print(f"ping burst: {opened} concurrent pings answered in {burst_seconds:.2f} s "
              f"({opened / burst_seconds:.0f}/s)")
        print(f"idle_conn_kb={per_conn_kb:.1f}")
    finally:
        if server.stdin:
            server.stdin.close()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="idle connections (default 5000)")
    parser.add_argument("--concurrency", type=int, default=200,
                        help="handshakes in flight at once")
    parser.add_argument("--pings", type=int, default=1000, help="sequential pings to time")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fd-limit", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    fd_limit = args.fd_limit or args.n + 1024
    if args.serve:
        run_server(fd_limit)
        return
    got = raise_fd_limit(fd_limit)
    if got < args.n + 100:
        sys.exit(f"RLIMIT_NOFILE is {got}; need about {args.n + 100} (raise the hard limit)")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trio.run(bench, args.n, args.concurrency, args.pings, fd_limit)


if __name__ == "__main__":
    main()
