"""Metrics and /readyz wired into a real server against a real cluster: DDP clients subscribe,
rows change, methods run, users log in, a stuck client is dropped, the walsender is killed —
and every metric, scraped over HTTP from ``serve_metrics``, moves with its event."""

from __future__ import annotations

import hashlib
import math
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio_websocket
from prometheus_client.parser import text_string_to_metric_families

from cdcddp.app import App, MethodContext
from cdcddp.client import connect
from cdcddp.ddp.messages import MeteorError
from cdcddp.ddp.session import SessionConfig
from cdcddp.methods.accounts import Accounts, AccountsConfig
from cdcddp.methods.schema import apply_schema
from cdcddp.metrics import Metrics, poll_slot, serve_metrics
from tests.livedata_support import (
    LiveServer,
    asql,
    build_live_app,
    expected_view,
    live_server,
    wait_store,
)
from tests.methods_support import FAST_HASHING
from tests.server_support import fast_config, get, open_stuck_websocket, raw_ddp, running_server

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Metrics no event of this test can move, and where they are covered instead.
NOT_MOVED_HERE = {
    "cdcddp_build_info": "a constant",
    # A record wal2json sent but cdcddp cannot decode stops the stream (by design): the
    # counter is copied from ReplicationStream.decode_errors (tests/test_metrics.py).
    "cdcddp_replication_decode_errors_total": "stops the stream",
    "cdcddp_replication_slot_poll_errors_total": "the poller's failures: tests/test_metrics.py",
    "cdcddp_schema_changes_total": "tests/test_livedata_resync.py (a type change)",
    "cdcddp_replication_backlog_skips_total": "tests/test_livedata_resync.py (behind)",
    "cdcddp_observer_catch_up_timeouts_total": "tests/test_livedata_handoff.py (held engine)",
    "cdcddp_snapshot_retakes_total": "tests/test_livedata_resync.py (a commit held invisible)",
    "cdcddp_read_retries_total": "tests/test_livedata_batches.py (a read a deadlock cancels)",
}


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def scrape(port: int) -> Samples:
    status, headers, body = await get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return parse(body.decode())


def at(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def digest(password: str) -> dict[str, str]:
    return {"digest": hashlib.sha256(password.encode()).hexdigest(), "algorithm": "sha-256"}


def build_app() -> App:
    app = build_live_app()
    app.include_methods(Accounts(AccountsConfig(password_hashing=FAST_HASHING)).methods)

    @app.method("echo")
    async def echo(ctx: MethodContext, *args: Any) -> list[Any]:
        return list(args)

    @app.method("boom_meteor")
    async def boom_meteor(ctx: MethodContext) -> None:
        raise MeteorError("not-allowed", "Nope")

    @app.method("boom_internal")
    async def boom_internal(ctx: MethodContext) -> None:
        raise RuntimeError("internals")

    return app


async def readyz(server: LiveServer) -> tuple[int, str]:
    status, _, body = await get(server.port, "/readyz")
    return status, body.decode().strip()


async def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not await predicate():
            await trio.sleep(interval)


async def kill_walsender_and_see_not_ready(server: LiveServer, metrics_port: int
                                           ) -> tuple[str, Samples]:
    """Terminate the walsender; return the 503 reason and a scrape taken while disconnected.
    The stream reconnects by itself within its backoff (100 ms first), so try a few times."""
    stream = server.live.stream
    assert stream is not None
    for _ in range(5):
        await asql(server.dsn, "SELECT pg_terminate_backend(pid) FROM pg_stat_replication "
                               "WHERE pid = %s", params=(stream.backend_pid,))
        with trio.move_on_after(3):
            while True:
                status, reason = await readyz(server)
                if status == 503:
                    samples = await scrape(metrics_port)
                    if at(samples, "cdcddp_replication_stream_connected") == 0:
                        return reason, samples
                await trio.sleep(0.002)
        await wait_until(lambda: _ready(server))
    raise AssertionError("never saw the stream disconnected")


async def _ready(server: LiveServer) -> bool:
    return (await readyz(server))[0] == 200


async def test_every_metric_moves_with_its_event(db_dsn: str) -> None:
    metrics = Metrics()
    config = fast_config(send_timeout=0.5,
                         session=SessionConfig(heartbeat_interval=1.5, heartbeat_timeout=1.0))
    history: list[Samples] = []
    async with trio.open_nursery() as nursery:
        metrics_port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 0)
        history.append(await scrape(metrics_port))
        async with live_server(db_dsn, build_app(), server_config=config,
                               metrics=metrics, resyncs=True) as server:  # a stream gap
            assert server.server.database is not None
            nursery.start_soon(poll_slot, metrics, db_dsn, server.live.config.slot, 0.1)
            await apply_schema(server.server.database, "accounts")
            await asql(db_dsn, "CREATE TABLE nopk (x int)",  # no replica identity
                       "INSERT INTO items (category, title, body) SELECT 'a', 't' || i, "
                       "repeat('x', 2000) FROM generate_series(1, 100) i")
            assert await readyz(server) == (200, "ok")
            # The polled slot lag is seen above zero once (it reads 0 whenever the stream
            # confirmed everything before the poll: write until a poll falls in between).
            with trio.fail_after(10):
                while True:
                    await asql(db_dsn, "CREATE TEMP TABLE lag_probe AS SELECT 1",
                               "DROP TABLE lag_probe")
                    await trio.sleep(0.05)
                    samples = await scrape(metrics_port)
                    if at(samples, "cdcddp_replication_slot_lag_bytes") > 0:
                        history.append(samples)
                        break

            async with connect(server.ws_url) as client:
                await client.subscribe("items.all")
                await client.subscribe("items.byCategory", {"category": "a"})
                note = await client.subscribe("handler.note", "n1")
                samples = await scrape(metrics_port)
                history.append(samples)
                assert at(samples, "cdcddp_clients_connected") == 1
                assert at(samples, "cdcddp_subscriptions", publication="items.all") == 1
                assert at(samples, "cdcddp_subscriptions", publication="handler.note") == 1
                assert at(samples, "cdcddp_observers") == 2
                assert at(samples, "cdcddp_mergebox_documents") == 101  # 100 rows + the note
                # Two observers of the same 100 rows (all in category a): each holds them.
                assert at(samples, "cdcddp_observer_documents") == 200
                assert at(samples, "cdcddp_snapshot_rows_total") >= 200
                assert at(samples, "cdcddp_snapshot_duration_seconds_count") >= 2
                await client.unsubscribe(note)

                # Row changes: one transaction each, each delivered before the next (commits
                # that arrive together go out in one write: one commit->send observation).
                for statement in ("INSERT INTO items (category, title) VALUES ('a', 'new')",
                                  "UPDATE items SET rank = 5 WHERE id = 1",
                                  "DELETE FROM items WHERE id = 2"):
                    await asql(db_dsn, statement)
                    await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
                await asql(db_dsn, "INSERT INTO nopk VALUES (1)", "UPDATE nopk SET x = 2")
                # A publication function that reads a row (a lookup), and a change to that row:
                # it runs again.
                await asql(db_dsn, "INSERT INTO other (id, note) VALUES (1, 'a')")
                await client.subscribe("items.gated", {"gate": 1})
                await asql(db_dsn, "UPDATE other SET note = 'b' WHERE id = 1")
                await client.wait_for(lambda: server.live.lookups.count("ok") >= 2, 10)

                # Methods: handler-style ok / MeteorError / internal, unknown, typed.
                assert await client.call("echo", 1) == [1]
                with pytest.raises(MeteorError):
                    await client.call("boom_meteor")
                with pytest.raises(MeteorError):
                    await client.call("boom_internal")
                with pytest.raises(MeteorError):
                    await client.call("no.such.method")
                await client.call("createUser", {"username": "alice",
                                                 "password": digest("right")})
                async with connect(server.ws_url) as other:
                    with pytest.raises(MeteorError):
                        await other.call("login", {"user": {"username": "alice"},
                                                   "password": digest("wrong")})
                    await other.call("login", {"user": {"username": "alice"},
                                               "password": digest("right")})
                await client.ping()
                samples = await scrape(metrics_port)
                history.append(samples)
                assert at(samples, "cdcddp_clients_connected") == 1
                assert at(samples, "cdcddp_subscriptions", publication="handler.note") == 0
                for action in ("insert", "update", "delete"):
                    assert at(samples, "cdcddp_changes_applied_total",
                              table="items", action=action) >= 1, action
                assert at(samples, "cdcddp_transactions_applied_total") >= 3
                assert at(samples, "cdcddp_lookup_runs_total", publication="items.gated",
                          outcome="ok") >= 2
                assert at(samples, "cdcddp_lookup_batches_total") >= 2
                assert at(samples, "cdcddp_lookup_row_changes_total",
                          publication="items.gated") >= 1
                assert at(samples, "cdcddp_replication_dropped_change_warnings_total") >= 1
                for method, outcome in (("echo", "ok"), ("boom_meteor", "error"),
                                        ("boom_internal", "internal_error"),
                                        ("other", "not_found"), ("createUser", "ok"),
                                        ("login", "ok"), ("login", "error")):
                    assert at(samples, "cdcddp_methods_total", method=method,
                              outcome=outcome) == 1, (method, outcome)
                assert at(samples, "cdcddp_method_duration_seconds_count", method="echo") == 1
                assert at(samples, "cdcddp_logins_total", outcome="success") == 1
                assert at(samples, "cdcddp_logins_total", outcome="failure") == 1
                assert at(samples, "cdcddp_commit_to_send_seconds_count") >= 3
                assert at(samples, "cdcddp_sessions_closed_total", reason="client") == 1
                for msg_type in ("connected", "added", "changed", "removed", "ready", "nosub",
                                 "result", "updated", "pong"):
                    assert at(samples, "cdcddp_ddp_messages_sent_total", type=msg_type) >= 1, \
                        msg_type
                assert at(samples, "cdcddp_sent_bytes_total") > 200 * 1000  # 100 x 2 kB rows

                # A client that stops reading is dropped as slow_client.
                stuck = await open_stuck_websocket(
                    server.port, ['{"msg":"sub","id":"s","name":"items.all","params":[]}'])
                async with stuck:
                    await wait_until(lambda: _closed(metrics_port, "slow_client"))
                # One that never answers pings: heartbeat_timeout. A DDP version nobody
                # speaks: protocol_error.
                async with raw_ddp(server.ws_url) as silent:
                    with trio.fail_after(10), pytest.raises(trio_websocket.ConnectionClosed):
                        while True:
                            await silent.ws.get_message()
                async with raw_ddp(server.ws_url, handshake=False) as wrong:
                    await wrong.send({"msg": "connect", "version": "zz", "support": ["zz"]})
                    assert (await wrong.recv())["msg"] == "failed"
                await wait_until(lambda: _closed(metrics_port, "heartbeat_timeout"))
                await wait_until(lambda: _closed(metrics_port, "protocol_error"))

                # The walsender dies: /readyz says why, the stream comes back by itself.
                reason, samples = await kill_walsender_and_see_not_ready(server, metrics_port)
                history.append(samples)
                assert reason == "replication stream disconnected"
                await wait_until(lambda: _ready(server))
                await asql(db_dsn, "UPDATE items SET title = 'after' WHERE id = 3")
                await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
                samples = await scrape(metrics_port)
                history.append(samples)
                assert at(samples, "cdcddp_replication_stream_connected") == 1
                assert at(samples, "cdcddp_replication_reconnects_total") >= 1
                # The temporary slot went with its walsender: a new one means a gap.
                assert sum(v for (n, _), v in samples.items()
                           if n == "cdcddp_resyncs_total") >= 1

                # Shutdown with a client connected: reason shutdown, nothing left open.
                await server.server.shutdown()
        samples = await scrape(metrics_port)
        history.append(samples)
        assert at(samples, "cdcddp_sessions_closed_total", reason="shutdown") == 1
        assert at(samples, "cdcddp_clients_connected") == 0
        assert at(samples, "cdcddp_subscriptions", publication="items.all") == 0
        assert at(samples, "cdcddp_observer_documents") == 0
        assert at(samples, "cdcddp_sessions_opened_total") == sum(
            v for (n, _), v in samples.items() if n == "cdcddp_sessions_closed_total")
        nursery.cancel_scope.cancel()

    # Every metric moved at some point (a sample differs from the first scrape).
    first = history[0]
    moved: set[str] = set()
    for later in history[1:]:
        moved |= {name for (name, labels), value in later.items()
                  if _differs(first.get((name, labels), 0.0), value)}
    for family in metrics.registry.collect():
        names = {family.name + suffix for suffix in ("", "_total", "_info", "_count", "_sum",
                                                     "_bucket")}
        if names & set(NOT_MOVED_HERE):
            continue
        assert names & moved, f"{family.name} never moved"


def _differs(a: float, b: float) -> bool:
    return not (a == b or (math.isnan(a) and math.isnan(b)))


async def _closed(metrics_port: int, reason: str) -> bool:
    return at(await scrape(metrics_port), "cdcddp_sessions_closed_total", reason=reason) >= 1


async def test_readyz_follows_the_applied_lag(db_dsn: str) -> None:
    config = fast_config(readiness_max_lag_seconds=0.3)
    async with live_server(db_dsn, server_config=config) as server:
        assert await readyz(server) == (200, "ok")
        server.live.hold = hold = trio.Event()  # the engine stops before applying a commit
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'held')")
        await wait_until(lambda: _not_ready(server))
        status, reason = await readyz(server)
        assert status == 503 and reason.startswith("replication lag ") \
            and reason.endswith("exceeds 0.3s"), reason
        server.live.hold = None
        hold.set()
        await wait_until(lambda: _ready(server))
        assert server.live.replication_lag() == 0.0
        assert 0 < server.live.apply_lag() < 60


async def test_readyz_follows_the_polled_slot_lag_in_bytes(db_dsn: str) -> None:
    metrics = Metrics()
    config = fast_config(readiness_max_lag_seconds=3600.0, readiness_max_lag_bytes=100_000)
    async with live_server(db_dsn, server_config=config, metrics=metrics) as server, \
            trio.open_nursery() as nursery:
        nursery.start_soon(poll_slot, metrics, db_dsn, server.live.config.slot, 0.05)
        await wait_until(lambda: _ready(server))
        server.live.hold = hold = trio.Event()  # nothing is applied, nothing confirmed
        await asql(db_dsn, "INSERT INTO items (category, body) "
                           "SELECT 'a', repeat('x', 1000) FROM generate_series(1, 500)")
        await wait_until(lambda: _not_ready(server))
        status, reason = await readyz(server)
        assert status == 503 and reason.startswith("replication slot lag ") \
            and reason.endswith("bytes exceeds 100000"), reason
        server.live.hold = None
        hold.set()
        await wait_until(lambda: _ready(server))
        nursery.cancel_scope.cancel()


async def _not_ready(server: LiveServer) -> bool:
    return (await readyz(server))[0] == 503


async def test_readyz_without_live_data_is_ready_while_serving() -> None:
    async with running_server() as running:
        status, headers, body = await get(running.port, "/readyz")
        assert (status, body) == (200, b"ok\n")
        assert "no-store" in headers.get("cache-control", "")
        await running.server.shutdown()
        assert running.server.readiness() == (False, "shutting down")


async def test_scrape_size_does_not_grow_with_clients(db_dsn: str) -> None:
    metrics = Metrics()
    async with live_server(db_dsn, metrics=metrics) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) "
                           "SELECT 'a', 't' || i FROM generate_series(1, 20) i")
        async with AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(server.ws_url))]
            await clients[0].subscribe("items.all")
            await asql(db_dsn, "UPDATE items SET rank = 1")
            await wait_store(clients[0], expected_view(db_dsn, [("items.all", [])]))
            one = metrics.exposition()
            for _ in range(49):
                client = await stack.enter_async_context(connect(server.ws_url))
                await client.subscribe("items.all")
                clients.append(client)
            await asql(db_dsn, "UPDATE items SET rank = 2")
            for client in clients:
                await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            fifty = metrics.exposition()
            one_samples, fifty_samples = parse(one.decode()), parse(fifty.decode())
            assert at(fifty_samples, "cdcddp_clients_connected") == 50
            assert at(fifty_samples, "cdcddp_mergebox_documents") == 50 * 20
            # The same series, whatever the number of clients; only numbers got longer.
            assert set(fifty_samples) == set(one_samples)
            assert len(fifty) <= len(one) + 400, (len(one), len(fifty))
