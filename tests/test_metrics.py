"""cdcddp.metrics: each metric moves with its event, the exposition parses, the endpoint and
the slot poller work against real sockets and a real slot."""

from __future__ import annotations

import datetime as dt
import math

import psycopg
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from cdcddp.db import Database
from cdcddp.metrics import (
    OTHER_LABEL,
    WAL_STATUSES,
    Metrics,
    handle_request,
    poll_slot,
    poll_slot_once,
    record_changes,
    serve_metrics,
)


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a fresh exposition, parsed by prometheus-client's own parser."""
    text = metrics.exposition().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics).get((name, frozenset(labels.items())), 0.0)


def test_registry_is_private_and_names_follow_conventions() -> None:
    a, b = Metrics(), Metrics()
    a.session_opened()
    assert value(a, "cdcddp_clients_connected") == 1
    assert value(b, "cdcddp_clients_connected") == 0  # no shared global state
    for name in a.names():
        assert name.startswith("cdcddp_")
    families = {f.name: f for f in a.registry.collect()}
    for name, family in families.items():
        if family.type == "counter":
            assert f"{name}_total" in a.names()
        if family.type == "histogram":
            assert name.endswith("_seconds")
    # No per-client label anywhere: every label is from a small, declared set.
    labels = {label for f in families.values() for s in f.samples for label in s.labels}
    assert labels <= {"status", "version", "le", "outcome"}


def test_replication_metrics_move() -> None:
    m = Metrics()
    assert value(m, "cdcddp_replication_stream_connected") == 0
    m.set_stream_connected(True)
    m.set_positions(0x16B3748, 0x16B3700)
    m.stream_reconnected()
    m.decode_error()
    m.dropped_change_warning()
    assert value(m, "cdcddp_replication_stream_connected") == 1
    assert value(m, "cdcddp_replication_received_lsn") == 0x16B3748
    assert value(m, "cdcddp_replication_acknowledged_lsn") == 0x16B3700
    assert value(m, "cdcddp_replication_reconnects_total") == 1
    assert value(m, "cdcddp_replication_decode_errors_total") == 1
    assert value(m, "cdcddp_replication_dropped_change_warnings_total") == 1


class FakeStream:
    def __init__(self) -> None:
        self.connected = True
        self.reconnects = 0
        self.decode_errors = 0
        self.dropped_change_warnings = 0
        self.received_lsn = 100
        self.acknowledged_lsn = 90


def test_sync_stream_adds_increases_only() -> None:
    m, stream = Metrics(), FakeStream()
    m.on_collect(lambda: m.sync_stream(stream))
    stream.reconnects, stream.decode_errors = 2, 1
    assert value(m, "cdcddp_replication_reconnects_total") == 2
    assert value(m, "cdcddp_replication_stream_connected") == 1
    stream.reconnects, stream.dropped_change_warnings, stream.connected = 3, 4, False
    stream.received_lsn = 200
    got = samples(m)
    assert got[("cdcddp_replication_reconnects_total", frozenset())] == 3  # not 2 + 3
    assert got[("cdcddp_replication_decode_errors_total", frozenset())] == 1
    assert got[("cdcddp_replication_dropped_change_warnings_total", frozenset())] == 4
    assert got[("cdcddp_replication_stream_connected", frozenset())] == 0
    assert got[("cdcddp_replication_received_lsn", frozenset())] == 200


def test_slot_status_is_one_hot_and_missing_slot_reads_as_such() -> None:
    m = Metrics()
    m.set_slot_status(wal_status="reserved", active=True, lag_bytes=10, retained_wal_bytes=20,
                      safe_wal_bytes=None, confirmed_flush_lsn=5)
    got = samples(m)
    statuses = {s: got[("cdcddp_replication_slot_wal_status", frozenset({("status", s)}))]
                for s in WAL_STATUSES}
    assert statuses == {"reserved": 1, "extended": 0, "unreserved": 0, "lost": 0, "missing": 0}
    assert got[("cdcddp_replication_slot_lag_bytes", frozenset())] == 10
    assert got[("cdcddp_replication_slot_retained_wal_bytes", frozenset())] == 20
    assert math.isnan(got[("cdcddp_replication_slot_safe_wal_bytes", frozenset())])
    assert got[("cdcddp_replication_slot_active", frozenset())] == 1
    m.set_slot_status(wal_status=None)
    assert value(m, "cdcddp_replication_slot_wal_status", status="missing") == 1
    assert value(m, "cdcddp_replication_slot_wal_status", status="reserved") == 0
    assert value(m, "cdcddp_replication_slot_active") == 0


def test_apply_metrics_move() -> None:
    m = Metrics()
    record_changes(m, [("public.todos", "I"), ("public.todos", "I"), ("public.lists", "U")])
    m.change_applied("public.todos", "delete")
    commit = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    m.transaction_applied(commit, now=commit + dt.timedelta(milliseconds=250))
    m.resync("truncate")
    m.set_observers(3, 1200)
    m.subscription_started("lists.public")
    m.subscription_started("lists.public")
    m.subscription_started("todos.inList")
    m.subscription_stopped("lists.public")
    m.snapshot_finished(0.02, 40)
    m.snapshot_finished(0.03, 2)
    assert value(m, "cdcddp_changes_applied_total", table="public.todos", action="insert") == 2
    assert value(m, "cdcddp_changes_applied_total", table="public.lists", action="update") == 1
    assert value(m, "cdcddp_changes_applied_total", table="public.todos", action="delete") == 1
    assert value(m, "cdcddp_transactions_applied_total") == 1
    assert value(m, "cdcddp_replication_lag_seconds") == pytest.approx(0.25)
    assert value(m, "cdcddp_resyncs_total", reason="truncate") == 1
    assert value(m, "cdcddp_observers") == 3
    assert value(m, "cdcddp_observer_documents") == 1200
    assert value(m, "cdcddp_subscriptions", publication="lists.public") == 1
    assert value(m, "cdcddp_subscriptions", publication="todos.inList") == 1
    assert value(m, "cdcddp_snapshot_duration_seconds_count") == 2
    assert value(m, "cdcddp_snapshot_duration_seconds_sum") == pytest.approx(0.05)
    assert value(m, "cdcddp_snapshot_rows_total") == 42


def test_client_metrics_move() -> None:
    m = Metrics()
    for _ in range(3):
        m.session_opened()
    m.session_closed("client")
    m.session_closed("slow_client")
    m.message_sent("added", 5)
    m.message_counter("ready").inc()
    m.sent_bytes(1234)
    m.mergebox_documents_changed(7)
    m.mergebox_documents_changed(-2)
    m.commit_sent(0.004)
    m.commit_sent(0.2)
    assert value(m, "cdcddp_sessions_opened_total") == 3
    assert value(m, "cdcddp_clients_connected") == 1
    assert value(m, "cdcddp_sessions_closed_total", reason="slow_client") == 1
    assert value(m, "cdcddp_sessions_closed_total", reason="client") == 1
    assert value(m, "cdcddp_ddp_messages_sent_total", type="added") == 5
    assert value(m, "cdcddp_ddp_messages_sent_total", type="ready") == 1
    assert value(m, "cdcddp_sent_bytes_total") == 1234
    assert value(m, "cdcddp_mergebox_documents") == 5
    assert value(m, "cdcddp_commit_to_send_seconds_count") == 2
    assert value(m, "cdcddp_commit_to_send_seconds_bucket", le="0.005") == 1
    assert value(m, "cdcddp_commit_to_send_seconds_bucket", le="+Inf") == 2


def test_send_counts_are_copied_at_scrape_time_by_message_type() -> None:
    from cdcddp.ddp import messages

    m = Metrics()
    sent = [messages.added("items", "a", {"x": 1}), messages.changed("items", "a", {"x": 2}, []),
            messages.removed("items", "a"), messages.ready(["s"]), messages.nosub("s"),
            messages.result("1", 5), messages.updated(["1"]), messages.ping(),
            messages.pong(), messages.connected("abc"), messages.failed("1"),
            messages.error("Bad request"), '{"server_id":"0"}', '{"weird":1}']
    m.send_counts.count_messages(sent)
    m.send_counts.count_messages(sent[:1])
    m.send_counts.bytes += 100
    assert value(m, "cdcddp_ddp_messages_sent_total", type="added") == 2
    for msg_type in ("changed", "removed", "ready", "nosub", "result", "updated", "ping", "pong",
                     "connected", "failed", "error", "server_id", OTHER_LABEL):
        assert value(m, "cdcddp_ddp_messages_sent_total", type=msg_type) == 1, msg_type
    assert value(m, "cdcddp_sent_bytes_total") == 100
    # Scraping again adds nothing; later increases are added once.
    assert value(m, "cdcddp_ddp_messages_sent_total", type="added") == 2
    m.send_counts.bytes += 5
    assert value(m, "cdcddp_sent_bytes_total") == 105
    assert value(m, "cdcddp_sent_bytes_total") == 105


def test_fast_histogram_matches_prometheus_client_text() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from cdcddp.metrics import LATENCY_BUCKETS, FastHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast = FastHistogram("x_seconds", "help", LATENCY_BUCKETS, registry=ours)
    slow = Histogram("x_seconds", "help", buckets=LATENCY_BUCKETS, registry=theirs)
    for seconds in (0.0, 0.0005, 0.003, 0.01, 0.7, 9.99, 10.0, 42.0):
        fast.observe(seconds)
        slow.observe(seconds)
    from prometheus_client.exposition import generate_latest
    assert generate_latest(ours) == generate_latest(theirs)


def test_method_and_login_metrics_move() -> None:
    m = Metrics()
    m.method_finished("todos.insert", "ok", 0.003)
    m.method_finished("todos.insert", "error", 0.5)
    m.method_finished("no.such.method", "not_found", 0.0001)
    m.login(True)
    m.login(False)
    m.login(False)
    assert value(m, "cdcddp_methods_total", method="todos.insert", outcome="ok") == 1
    assert value(m, "cdcddp_methods_total", method="todos.insert", outcome="error") == 1
    # Unknown names from clients never become label values.
    assert value(m, "cdcddp_methods_total", method=OTHER_LABEL, outcome="not_found") == 1
    assert value(m, "cdcddp_method_duration_seconds_count", method="todos.insert") == 2
    assert value(m, "cdcddp_logins_total", outcome="success") == 1
    assert value(m, "cdcddp_logins_total", outcome="failure") == 2


def test_label_values_are_capped() -> None:
    m = Metrics(max_label_values=3)
    for i in range(10):
        m.subscription_started(f"pub{i}")
    got = samples(m)
    pubs = {dict(labels)["publication"]: v for (name, labels), v in got.items()
            if name == "cdcddp_subscriptions"}
    assert pubs == {"pub0": 1, "pub1": 1, "pub2": 1, OTHER_LABEL: 7}


def test_exposition_parses_with_every_family() -> None:
    m = Metrics()
    m.method_finished("a", "ok", 0.01)
    families = {f.name for f in text_string_to_metric_families(m.exposition().decode())}
    assert {"cdcddp_replication_slot_lag_bytes", "cdcddp_commit_to_send_seconds",
            "cdcddp_method_duration_seconds", "cdcddp_methods", "cdcddp_build_info"} <= families
    assert "_created" not in m.exposition().decode()  # halves the series count


def test_a_failing_collect_hook_does_not_break_the_scrape() -> None:
    m = Metrics()

    def broken() -> None:
        raise RuntimeError("boom")

    m.on_collect(broken)
    assert b"cdcddp_clients_connected" in m.exposition()


def test_handle_request_routes() -> None:
    m = Metrics()
    ok = handle_request(m, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK\r\n") and b"cdcddp_clients_connected" in ok
    head = handle_request(m, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert handle_request(m, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert handle_request(m, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert handle_request(m, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400")


async def _http_get(port: int, path: str) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


async def test_serve_metrics_over_a_real_socket() -> None:
    m = Metrics()
    m.session_opened()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_metrics, m, "127.0.0.1", 0)
        with trio.fail_after(5):
            response = await _http_get(port, "/metrics")
            head, _, body = response.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            assert b"text/plain; version=0.0.4" in head
            assert f"Content-Length: {len(body)}".encode() in head
            parsed = {s.name: s.value for f in text_string_to_metric_families(body.decode())
                      for s in f.samples if not s.labels}
            assert parsed["cdcddp_clients_connected"] == 1
            # A client that never finishes its request does not block others.
            idle = await trio.open_tcp_stream("127.0.0.1", port)
            assert (await _http_get(port, "/missing")).startswith(b"HTTP/1.1 404")
            await idle.aclose()
        nursery.cancel_scope.cancel()


# -- slot poller against a real slot -----------------------------------------------------------


async def test_poll_slot_reports_lag_and_retained_wal_then_advance(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('metrics_slot', 'wal2json')")
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 2000) g")
    m = Metrics()
    db = Database(db_dsn, size=1)
    try:
        await poll_slot_once(m, db, "metrics_slot")
        lag = value(m, "cdcddp_replication_slot_lag_bytes")
        retained = value(m, "cdcddp_replication_slot_retained_wal_bytes")
        assert lag > 100_000  # the rows written since the slot was created
        assert retained >= lag
        assert value(m, "cdcddp_replication_slot_wal_status", status="reserved") == 1
        assert value(m, "cdcddp_replication_slot_active") == 0
        assert math.isnan(value(m, "cdcddp_replication_slot_safe_wal_bytes"))  # unlimited
        confirmed_before = value(m, "cdcddp_replication_slot_confirmed_flush_lsn")
        assert confirmed_before > 0

        with psycopg.connect(db_dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_replication_slot_advance('metrics_slot', pg_current_wal_lsn())")
        await poll_slot_once(m, db, "metrics_slot")
        assert value(m, "cdcddp_replication_slot_lag_bytes") < lag
        assert value(m, "cdcddp_replication_slot_confirmed_flush_lsn") > confirmed_before
        assert value(m, "cdcddp_replication_slot_polls_total") == 2

        await poll_slot_once(m, db, "no_such_slot")
        assert value(m, "cdcddp_replication_slot_wal_status", status="missing") == 1
        assert math.isnan(value(m, "cdcddp_replication_slot_lag_bytes"))
    finally:
        db.close()


async def test_poll_slot_loop_with_a_dsn_and_counts_failures(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot('loop_slot', 'wal2json')")
    m = Metrics()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poll_slot, m, db_dsn, "loop_slot", 0.05)
            while value(m, "cdcddp_replication_slot_polls_total") < 2:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert value(m, "cdcddp_replication_slot_wal_status", status="reserved") == 1

    broken = Metrics()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            # Nothing listens on port 1: every poll fails, the poller keeps going.
            nursery.start_soon(poll_slot, broken,
                               "host=127.0.0.1 port=1 dbname=x connect_timeout=1", "s", 0.01)
            while value(broken, "cdcddp_replication_slot_poll_errors_total") < 2:
                await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
