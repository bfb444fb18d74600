"""Shared pieces of the live-data benchmarks (fanout, latency, snapshot, filtered).

* ``serve_live(app, dsn, slot)``: a cdcddp server with the live engine (temporary slot) in this
  process; prints its port, serves until stdin closes. Benchmarks run it in a child process.
* ``serve_broadcast(rate)``: the baseline — a bare trio server that answers the WebSocket
  handshake and DDP ``connect``/``sub`` by hand and then sends one pre-encoded ``changed`` frame
  (carrying ``time.time()``) to every connection ``rate`` times a second.
* The client swarm (``python tests/bench/ddpbench.py clients ...``): N raw-socket WebSocket DDP
  clients in one process on one epoll loop (no trio, no wsproto: the client side must stay
  cheaper than the server). Each subscribes to the given subscriptions; the swarm prints
  ``READY {json}`` once every subscription is ready, counts and times ``changed``/``added``
  messages between the ``start`` and ``stop`` lines it reads on stdin (parsing each), then
  drains until idle for ``--idle`` seconds, prints ``RESULT {json}`` and exits. ``report``
  instead of ``stop`` drains and prints ``RESULT`` the same way, then resets the counters and
  keeps its connections and subscriptions for the next ``start`` (``Swarm.report()``).
  Outside a counted window ``added``/``changed`` frames are recognised by their first bytes
  and not parsed.

Latency is ``receive time - fields.ts`` where ``ts`` is an epoch-seconds float the writer put in
the row with ``extract(epoch from clock_timestamp())`` (same machine, same clock).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ADDED_PREFIX = b'{"msg":"added"'
CHANGED_PREFIX = b'{"msg":"changed"'


def raise_fd_limit(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(soft, wanted), hard), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (and its reaped children excluded), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(sorted_values: list[float] | array, q: float) -> float:
    if not len(sorted_values):
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


# ------------------------------------------------------------------------------ servers


def serve_live(app: Any, dsn: str, slot: str, fd_limit: int = 20000,
               **config: Any) -> None:
    import trio

    from cdcddp.publish.livedata import LiveDataConfig
    from cdcddp.server.config import ServerConfig
    from cdcddp.server.server import Server

    raise_fd_limit(fd_limit)

    async def main() -> None:
        server = Server(app, ServerConfig(**config), dsn=dsn,
                        live_config=LiveDataConfig(slot=slot, temporary_slot=True))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(server.serve)
            print(port, flush=True)
            await trio.to_thread.run_sync(sys.stdin.read)  # until the parent closes stdin
            nursery.cancel_scope.cancel()

    trio.run(main)


def ws_frame(payload: bytes, mask: bool = False) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, n | (0x80 if mask else 0))
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 126 | (0x80 if mask else 0), n)
    else:
        head = struct.pack("!BBQ", 0x81, 127 | (0x80 if mask else 0), n)
    return head + (b"\0\0\0\0" if mask else b"") + payload  # zero mask key: XOR is identity


def serve_broadcast(rate: float, collection: str = "fan") -> None:
    """Baseline server: pre-encoded frames, one send_all per client per tick."""
    import trio

    from cdcddp.server.websocket import handshake_response

    raise_fd_limit(20000)
    clients: list[trio.SocketStream] = []

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            data = await stream.receive_some(4096)
            if not data:
                return
            buf += data
        key = next(line.split(b":", 1)[1].strip() for line in buf.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        await stream.send_all(handshake_response(key.decode("latin-1")))
        # the client pipelines connect + sub after the 101; answer without parsing them
        await stream.send_all(ws_frame(b'{"msg":"connected","session":"x"}')
                              + ws_frame(b'{"msg":"ready","subs":["s0"]}'))
        clients.append(stream)
        with contextlib.suppress(Exception):
            while await stream.receive_some(65536):
                pass

    async def ticker() -> None:
        period = 1.0 / rate
        next_at = trio.current_time()
        i = 0
        while True:
            next_at += period
            await trio.sleep_until(next_at)
            i += 1
            frame = ws_frame(b'{"msg":"changed","collection":"' + collection.encode()
                             + b'","id":"' + str(i % 100).encode() + b'","fields":{"ts":'
                             + repr(time.time()).encode() + b',"v":' + str(i).encode() + b"}}")
            for stream in list(clients):
                try:
                    await stream.send_all(frame)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    clients.remove(stream)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
            print(listeners[0].socket.getsockname()[1], flush=True)
            nursery.start_soon(trio.serve_listeners, handle, listeners)
            nursery.start_soon(ticker)
            await trio.to_thread.run_sync(sys.stdin.read)
            nursery.cancel_scope.cancel()

    trio.run(main)


def start_child(args: list[str]) -> tuple[subprocess.Popen[str], int]:
    """Start a server child (prints its port first); returns (process, port)."""
    proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.strip():
        proc.kill()
        sys.exit(f"server child {args} exited before reporting its port")
    return proc, int(line)


def stop_child(proc: subprocess.Popen[str]) -> None:
    if proc.stdin:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ client swarm


class Conn:
    __slots__ = ("buf", "pending_subs", "ready_at", "sock")

    def __init__(self, sock: socket.socket, subs: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pending_subs = subs
        self.ready_at = 0.0


def run_swarm(port: int, n: int, subs: list[list[Any]], subs_per_conn: int) -> None:
    """subs: [name, params] pairs, dealt round-robin, subs_per_conn per connection."""
    raise_fd_limit(n + 1024)
    conns: dict[int, Conn] = {}
    ep = select.epoll()
    sub_started = time.time()
    k = 0
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        s.sendall(b"GET /websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                  b"Connection: Upgrade\r\nSec-WebSocket-Key: " + key
                  + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                sys.exit(f"connection {i}: closed during handshake")
            head += chunk
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit(f"connection {i}: handshake refused: {head[:200]!r}")
        rest = head.split(b"\r\n\r\n", 1)[1]
        out = [ws_frame(b'{"msg":"connect","version":"1","support":["1"]}', mask=True)]
        mine = 0
        for _ in range(subs_per_conn):
            if k >= len(subs) and subs_per_conn > 1:
                break
            name, params = subs[k % len(subs)]
            out.append(ws_frame(orjson.dumps({"msg": "sub", "id": f"s{mine}", "name": name,
                                              "params": params}), mask=True))
            k += 1
            mine += 1
        s.sendall(b"".join(out))
        s.setblocking(False)
        c = Conn(s, mine)
        c.buf += rest
        conns[s.fileno()] = c
        ep.register(s.fileno(), select.EPOLLIN)
    ep.register(sys.stdin.fileno(), select.EPOLLIN)

    counting = False
    stopping = False
    reporting = False  # the drain ends with a RESULT and the swarm stays connected
    changed = added = removed = other = 0
    lat = array("d")
    first_at = last_at = 0.0
    start_at = stop_at = 0.0
    not_ready = n
    ready_times = array("d")
    cpu0 = 0.0
    pong = ws_frame(b'{"msg":"pong"}', mask=True)
    loads = orjson.loads
    now = time.time

    def handle_message(c: Conn, payload: bytes, t: float) -> None:
        nonlocal changed, added, removed, other, first_at, last_at, not_ready
        m = loads(payload)
        kind = m.get("msg")
        if kind == "changed" or kind == "added":
            if counting:
                if kind == "changed":
                    changed += 1
                else:
                    added += 1
                if not first_at:
                    first_at = t
                last_at = t
                ts = m.get("fields", {}).get("ts")
                if ts is not None:
                    lat.append(t - ts)
        elif kind == "ready":
            c.pending_subs -= len(m["subs"])
            if c.pending_subs <= 0 and not c.ready_at:
                c.ready_at = t
                ready_times.append(t - sub_started)
                not_ready -= 1
        elif kind == "ping":
            pid = m.get("id")
            c.sock.send(ws_frame(orjson.dumps({"msg": "pong", "id": pid}), mask=True)
                        if pid is not None else pong)
        elif kind == "removed":
            if counting:
                removed += 1
                if not first_at:
                    first_at = t
                last_at = t
        elif kind == "nosub" or kind == "error":
            sys.exit(f"subscription failed: {payload[:300]!r}")
        else:
            other += 1

    def parse(c: Conn, t: float) -> None:
        buf = c.buf
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b1 = buf[pos + 1] & 0x7F
            hl = 2
            if b1 == 126:
                if end - pos < 4:
                    break
                b1 = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif b1 == 127:
                if end - pos < 10:
                    break
                b1 = struct.unpack_from("!Q", buf, pos + 2)[0]
                hl = 10
            if end - pos < hl + b1:
                break
            op = buf[pos] & 0x0F
            if op == 1:
                # Outside the counted window, data messages are only skipped (the server
                # writes "msg" first): the swarm must stay cheaper than the server it measures.
                if counting or not (buf.startswith(ADDED_PREFIX, pos + hl)
                                    or buf.startswith(CHANGED_PREFIX, pos + hl)):
                    handle_message(c, bytes(buf[pos + hl:pos + hl + b1]), t)
            elif op == 8:
                raise ConnectionError("server closed the WebSocket")
            pos += hl + b1
        if pos:
            del buf[:pos]

    idle = float(os.environ.get("SWARM_IDLE", "1.0"))
    max_drain = float(os.environ.get("SWARM_MAX_DRAIN", "30"))
    ready_printed = False
    stdin_fd = sys.stdin.fileno()

    def print_result() -> None:
        cpu = time.process_time() - cpu0
        lats = sorted(lat)
        result = {
            "changed": changed, "added": added, "removed": removed, "other": other,
            "start_at": start_at, "stop_at": stop_at, "first_at": first_at, "last_at": last_at,
            "lat_count": len(lats),
            "lat_p50": percentile(lats, 0.50), "lat_p90": percentile(lats, 0.90),
            "lat_p99": percentile(lats, 0.99), "lat_max": lats[-1] if lats else float("nan"),
            "cpu_seconds": cpu,
        }
        print("RESULT " + json.dumps(result), flush=True)

    while True:
        timeout = idle if stopping else 1.0
        events = ep.poll(timeout)
        t = now()
        if stopping and (not events or t - stop_at >= max_drain):
            print_result()
            if not reporting:
                break
            # ``report``: back to the state after READY, connections and subscriptions kept
            counting = stopping = reporting = False
            changed = added = removed = other = 0
            lat = array("d")
            first_at = last_at = start_at = stop_at = 0.0
            continue
        for fd, _ in events:
            if fd == stdin_fd:
                line = os.read(stdin_fd, 4096).decode()
                if "start" in line:
                    counting = True
                    start_at = now()
                    cpu0 = time.process_time()
                if "report" in line:
                    stopping = reporting = True
                    stop_at = now()
                if "stop" in line or not line:
                    stopping = True
                    reporting = False
                    stop_at = now()
                    if not line:
                        ep.unregister(stdin_fd)
                continue
            c = conns[fd]
            try:
                data = c.sock.recv(262144)
            except BlockingIOError:
                continue
            if not data:
                sys.exit("server closed a connection")
            c.buf += data
            parse(c, t)
        if not ready_printed and not_ready == 0:
            ready_printed = True
            rt = sorted(ready_times)
            print("READY " + json.dumps({"seconds": max(rt), "p50": statistics.median(rt)}),
                  flush=True)
    for c in conns.values():
        c.sock.close()


class Swarm:
    """Parent-side handle on a client swarm child process."""

    def __init__(self, port: int, n: int, subs: list[list[Any]], subs_per_conn: int = 1,
                 idle: float = 1.0, max_drain: float = 30.0) -> None:
        env = dict(os.environ, SWARM_IDLE=str(idle), SWARM_MAX_DRAIN=str(max_drain))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "clients", "--port", str(port), "--n", str(n),
             "--subs", self._subs_argument(subs), "--subs-per-conn", str(subs_per_conn)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    @staticmethod
    def _subs_argument(subs: list[list[Any]]) -> str:
        """The subscriptions as JSON, or ``@file`` holding it (one argument is at most 128 KiB
        on Linux: 10,000 subscriptions do not fit)."""
        text = json.dumps(subs)
        if len(text) < 65536:
            return text
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(text)
        return "@" + f.name

    def _line(self, prefix: str) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                self.proc.wait()
                sys.exit(f"client swarm exited ({self.proc.returncode}) before {prefix}")
            if line.startswith(prefix + " "):
                return json.loads(line[len(prefix) + 1:])  # type: ignore[no-any-return]

    def wait_ready(self) -> dict[str, Any]:
        return self._line("READY")

    def start(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("start\n")
        self.proc.stdin.flush()

    def report(self) -> dict[str, Any]:
        """Like ``stop`` (drain, RESULT) but the swarm stays connected and subscribed, its
        counters reset for the next ``start``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("report\n")
        self.proc.stdin.flush()
        return self._line("RESULT")

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        result = self._line("RESULT")
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Writer:
    """Updates rows ``UPDATE <table> SET ts = clock_timestamp epoch, v = v + 1`` at a fixed
    rate (one statement per transaction, autocommit), cycling over ids 0..rows-1, in a thread."""

    def __init__(self, dsn: str, table: str, rows: int, rate: float,
                 rows_per_tx: int = 1) -> None:
        self.dsn, self.table, self.rows, self.rate = dsn, table, rows, rate
        self.rows_per_tx = rows_per_tx
        self.commits = 0
        self.behind_max = 0.0

    def run(self, seconds: float) -> float:
        """Blocking; returns elapsed seconds."""
        import psycopg

        with psycopg.connect(self.dsn, autocommit=True) as conn:
            stmt = (f"UPDATE {self.table} SET ts = extract(epoch from clock_timestamp()), "
                    f"v = v + 1 WHERE id = ANY(%s)")
            period = 1.0 / self.rate
            started = time.perf_counter()
            next_at = started
            i = 0
            while next_at - started < seconds:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                else:
                    self.behind_max = max(self.behind_max, -delay)
                ids = [(i * self.rows_per_tx + j) % self.rows for j in range(self.rows_per_tx)]
                conn.execute(stmt, (ids,), prepare=True)
                self.commits += 1
                i += 1
                next_at += period
            return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("clients")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--n", type=int, required=True)
    c.add_argument("--subs", required=True)
    c.add_argument("--subs-per-conn", type=int, default=1)
    b = sub.add_parser("broadcast")
    b.add_argument("--rate", type=float, required=True)
    args = parser.parse_args()
    if args.cmd == "clients":
        subs = args.subs
        if subs.startswith("@"):
            path = Path(subs[1:])
            subs = path.read_text()
            path.unlink()
        run_swarm(args.port, args.n, json.loads(subs), args.subs_per_conn)
    else:
        serve_broadcast(args.rate)


if __name__ == "__main__":
    main()
