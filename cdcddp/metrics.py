"""Every Prometheus metric cdcddp exports, defined in one place, and the ways to serve them.

A :class:`Metrics` object owns a dedicated ``CollectorRegistry`` (tests and embedded servers
get their own; nothing goes to prometheus-client's global registry) and exposes one small
method per event, so callers never touch metric objects or label names::

    metrics = Metrics()
    metrics.session_opened()
    metrics.method_finished("todos.insert", "ok", 0.004)
    body = metrics.exposition()                   # bytes for GET /metrics on any port
    port = await nursery.start(serve_metrics, metrics, "127.0.0.1", 9108)
    nursery.start_soon(poll_slot, metrics, db, "cdcddp", 10.0)

A server feeds it when given one: ``Server(app, config, dsn=..., metrics=metrics)``. Per-message
events (messages and bytes sent, row changes, transactions) are plain integers the engine and
the connections keep (:class:`SendCounts`, ``LiveData`` figures); ``on_collect`` hooks copy
them into the Prometheus objects at scrape time (:meth:`Metrics.sync_live`,
:meth:`Metrics.sync_stream`), so the hot paths never take a lock or look up a label.

Label sets never grow with the number of clients: labels are a table, an action, a
publication, a method, a DDP message type or a close reason — all bounded by the app's
declarations — and each label is additionally capped (:data:`MAX_LABEL_VALUES`; later values
count under ``"other"``) so a client sending made-up method names cannot blow up a scrape.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from bisect import bisect_left
from collections import _count_elements  # type: ignore[attr-defined]  # C-speed tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from operator import itemgetter
from typing import Any, Protocol

import trio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cdcddp import __version__
from cdcddp.db import Database, first_line
from cdcddp.wal.lsn import SERVER_LSN_SQL

log = logging.getLogger(__name__)

# `_created` samples would double the series of every counter and histogram for a value
# nobody here graphs (process-wide in prometheus-client, so set once on import).
disable_created_metrics()

DEFAULT_METRICS_HOST = "127.0.0.1"
DEFAULT_METRICS_PORT = 9108

# wal_status values of pg_replication_slots, plus "missing" when the slot does not exist.
WAL_STATUSES = ("reserved", "extended", "unreserved", "lost", "missing")

MAX_LABEL_VALUES = 500
OTHER_LABEL = "other"

# Latency buckets (seconds): fan-out is expected in milliseconds, methods in tens of ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)
# The text format generate_latest() writes; stated here because newer prometheus-client
# releases advertise 1.0.0 as "latest", which older Prometheus servers do not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

SNAPSHOT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StreamCounters(Protocol):
    """What :meth:`Metrics.sync_stream` reads (``cdcddp.wal.stream.ReplicationStream`` has it)."""

    connected: bool
    reconnects: int
    decode_errors: int
    dropped_change_warnings: int

    @property
    def received_lsn(self) -> int: ...

    @property
    def acknowledged_lsn(self) -> int: ...


class LookupFigures(Protocol):
    """What :meth:`Metrics.sync_live` reads of ``cdcddp.publish.lookup.BatchedLookups``."""

    batches: int
    outcomes: Mapping[tuple[str, str], int]  # (publication, outcome) -> runs


class LiveFigures(Protocol):
    """What :meth:`Metrics.sync_live` reads (``cdcddp.publish.livedata.LiveData`` has it)."""

    stream: StreamCounters | None
    lookups: LookupFigures
    transactions_applied: int
    schema_changes: int
    behind_skips: int
    catch_up_timeouts: int
    invisible_delivered_retries: int
    read_retries: int
    row_watches_fired: Mapping[str, int]  # publication -> lookups told to run again
    resync_reasons: Mapping[str, int]
    change_counts: Mapping[tuple[str, str, type], int] | None

    @property
    def observer_count(self) -> int: ...

    @property
    def observer_documents(self) -> int: ...

    def apply_lag(self) -> float: ...


class SendCounts:
    """Plain counters every connection bumps on its hot path (no locks, no label lookups);
    copied into ``cdcddp_ddp_messages_sent_total`` / ``cdcddp_sent_bytes_total`` at scrape
    time.

    ``by_prefix`` is keyed by characters 8..11 of each encoded DDP message: every server
    message starts ``{"msg":"<type>"``, and those three letters tell the types apart
    (``count_messages`` costs one C-level pass per batch).
    """

    __slots__ = ("by_prefix", "bytes")

    def __init__(self) -> None:
        self.by_prefix: dict[str | bytes, int] = {}
        self.bytes = 0

    def count_messages(self, messages: Iterable[str | bytes]) -> None:
        # Counter.update's own checks cost as much as the count for a batch of a few.
        _count_elements(self.by_prefix, map(_MSG_PREFIX, messages))


_MSG_PREFIX = itemgetter(slice(8, 11))
# Three letters of a message (see SendCounts) -> its DDP type.
MSG_TYPES_BY_PREFIX: dict[str | bytes, str] = {t[:3]: t for t in (
    "added", "changed", "removed", "ready", "nosub", "result", "updated", "ping", "pong",
    "error", "connected", "failed")}
MSG_TYPES_BY_PREFIX["_id"] = "server_id"  # {"server_id":"0"}
# Messages sent as UTF-8 bytes (messages.Encoded) tally under bytes prefixes.
MSG_TYPES_BY_PREFIX.update({prefix.encode(): t for prefix, t in MSG_TYPES_BY_PREFIX.items()})


class FastHistogram(Collector):
    """A label-less histogram for hot paths: ``observe`` is a bisect and two additions (no
    lock); the exposition is built at scrape time. Same text as prometheus-client's."""

    def __init__(self, name: str, documentation: str, buckets: Iterable[float],
                 registry: CollectorRegistry | None = None) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        if registry is not None:
            registry.register(self)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def describe(self) -> Iterator[HistogramMetricFamily]:
        yield HistogramMetricFamily(self.name, self.documentation)

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, total = [], 0
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            cumulative.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(self.name, self.documentation, buckets=cumulative,
                                    sum_value=self.sum)


class _CappedLabel:
    """Passes the first ``limit`` distinct values of a label through, then ``"other"``."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) >= self.limit:
            return OTHER_LABEL
        self._seen.add(value)
        return value


class Metrics:
    """cdcddp's metrics in their own registry, with one method per event."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 max_label_values: int = MAX_LABEL_VALUES) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self._collect_hooks: list[Callable[[], None]] = []
        self._stream_seen: dict[str, int] = {}
        self._totals_seen: dict[Any, float] = {}
        self.send_counts = SendCounts()
        # The slot's lag in bytes at the last successful poll (None: unknown or no slot);
        # /readyz compares it with readiness_max_lag_bytes.
        self.last_slot_lag_bytes: int | None = None
        self._table = _CappedLabel(max_label_values)
        self._publication = _CappedLabel(max_label_values)
        self._method = _CappedLabel(max_label_values)
        self._reason = _CappedLabel(max_label_values)
        self._msg_type = _CappedLabel(max_label_values)

        self.build_info = Info("cdcddp_build", "cdcddp version.", registry=r)
        self.build_info.info({"version": __version__})

        # -- replication stream ---------------------------------------------------------------
        self.received_lsn = Gauge(
            "cdcddp_replication_received_lsn",
            "Highest WAL position received from the slot (LSN as a number).", registry=r)
        self.acknowledged_lsn = Gauge(
            "cdcddp_replication_acknowledged_lsn",
            "WAL position confirmed to the server as applied (LSN as a number).", registry=r)
        self.stream_connected = Gauge(
            "cdcddp_replication_stream_connected",
            "1 while the replication connection is streaming, else 0.", registry=r)
        self.reconnects = Counter(
            "cdcddp_replication_reconnects_total",
            "Replication connections re-established after a drop.", registry=r)
        self.decode_errors = Counter(
            "cdcddp_replication_decode_errors_total",
            "wal2json records that could not be decoded.", registry=r)
        self.dropped_change_warnings = Counter(
            "cdcddp_replication_dropped_change_warnings_total",
            "wal2json warnings about changes it could not decode (table without a replica "
            "identity: 'no tuple identifier').", registry=r)
        self.lag_seconds = Gauge(
            "cdcddp_replication_lag_seconds",
            "Commit time to applied, for the last applied transaction.", registry=r)
        # -- the slot, polled from pg_replication_slots ----------------------------------------
        self.slot_lag_bytes = Gauge(
            "cdcddp_replication_slot_lag_bytes",
            "pg_current_wal_lsn() - confirmed_flush_lsn of the slot.", registry=r)
        self.slot_retained_wal_bytes = Gauge(
            "cdcddp_replication_slot_retained_wal_bytes",
            "WAL the slot keeps on the server: pg_current_wal_lsn() - restart_lsn.", registry=r)
        self.slot_safe_wal_bytes = Gauge(
            "cdcddp_replication_slot_safe_wal_bytes",
            "WAL that may still be written before the slot is invalidated (safe_wal_size); "
            "NaN when unlimited (max_slot_wal_keep_size = -1).", registry=r)
        self.slot_confirmed_flush_lsn = Gauge(
            "cdcddp_replication_slot_confirmed_flush_lsn",
            "confirmed_flush_lsn of the slot as the server sees it (LSN as a number).",
            registry=r)
        self.slot_active = Gauge(
            "cdcddp_replication_slot_active",
            "1 when a process streams from the slot, else 0.", registry=r)
        self.slot_wal_status = Gauge(
            "cdcddp_replication_slot_wal_status",
            "wal_status of the slot, one-hot (status=\"missing\": the slot does not exist).",
            ["status"], registry=r)
        self.slot_polls = Counter(
            "cdcddp_replication_slot_polls_total", "Slot status queries run.", registry=r)
        self.slot_poll_errors = Counter(
            "cdcddp_replication_slot_poll_errors_total",
            "Slot status queries that failed.", registry=r)
        # -- applying changes ------------------------------------------------------------------
        self.changes_applied = Counter(
            "cdcddp_changes_applied_total",
            "Row changes of observed tables applied, by table and action.",
            ["table", "action"], registry=r)
        self.transactions_applied = Counter(
            "cdcddp_transactions_applied_total",
            "Transactions that changed an observed table, applied.", registry=r)
        self.resyncs = Counter(
            "cdcddp_resyncs_total", "Observer resyncs (query re-run after a gap), by reason.",
            ["reason"], registry=r)
        self.schema_changes = Counter(
            "cdcddp_schema_changes_total",
            "Streamed table shapes that contradicted an observer's snapshot (a schema change "
            "on a published table: its observers resynced).", registry=r)
        self.backlog_skips = Counter(
            "cdcddp_replication_backlog_skips_total",
            "Backlogs skipped for being more than resync_behind_bytes behind (every observer "
            "resynced).", registry=r)
        self.catch_up_timeouts = Counter(
            "cdcddp_observer_catch_up_timeouts_total",
            "New observers that registered before the stream delivered everything their "
            "snapshot saw (the consumer was held, or too far behind to wait for).",
            registry=r)
        self.snapshot_retakes = Counter(
            "cdcddp_snapshot_retakes_total",
            "Snapshot reads retaken for lacking a transaction the stream already delivered "
            "(not yet visible: normally for milliseconds; a steady rise means a commit waits "
            "for a synchronous standby that does not answer).", registry=r)
        self.read_retries = Counter(
            "cdcddp_read_retries_total",
            "Read-only runs (snapshot reads, row fetches, lookup batches) PostgreSQL aborted "
            "over concurrency, such as a deadlock among writers broken by cancelling the read, "
            "and run again.", registry=r)
        self.lookup_runs = Counter(
            "cdcddp_lookup_runs_total",
            "Runs of publication functions that read rows (lookups), by publication and "
            "outcome: ok, error (it raised), shared (took the result of an identical run in "
            "its batch, or a recent one), too_early (its snapshot lacked the commit it must "
            "see: queued again).", ["publication", "outcome"], registry=r)
        self.lookup_batches = Counter(
            "cdcddp_lookup_batches_total",
            "Transactions the lookups ran in (the functions waiting at once share one).",
            registry=r)
        self.lookup_row_changes = Counter(
            "cdcddp_lookup_row_changes_total",
            "Times a committed change to a row a lookup read told its subscription to run "
            "its function again, by publication.", ["publication"], registry=r)
        self.observers = Gauge(
            "cdcddp_observers", "Live observers (distinct publication queries).", registry=r)
        self.observer_documents = Gauge(
            "cdcddp_observer_documents",
            "Documents held by the live observers (each once, however many subscribe).",
            registry=r)
        self.subscriptions = Gauge(
            "cdcddp_subscriptions", "Live subscriptions, by publication.", ["publication"],
            registry=r)
        self.snapshot_duration = Histogram(
            "cdcddp_snapshot_duration_seconds",
            "Snapshot query time of an observer (initial data, and resyncs).",
            buckets=SNAPSHOT_BUCKETS, registry=r)
        self.snapshot_rows = Counter(
            "cdcddp_snapshot_rows_total", "Rows read by initial-data queries.", registry=r)
        # -- clients ---------------------------------------------------------------------------
        self.clients_connected = Gauge(
            "cdcddp_clients_connected", "Open DDP sessions.", registry=r)
        self.sessions_opened = Counter(
            "cdcddp_sessions_opened_total", "DDP sessions opened.", registry=r)
        self.sessions_closed = Counter(
            "cdcddp_sessions_closed_total",
            "DDP sessions closed, by reason (client, heartbeat_timeout, slow_client, shutdown, "
            "protocol_error, ...).", ["reason"], registry=r)
        self.ddp_messages_sent = Counter(
            "cdcddp_ddp_messages_sent_total", "DDP messages sent, by msg type.", ["type"],
            registry=r)
        self.bytes_sent = Counter(
            "cdcddp_sent_bytes_total", "Bytes written to client sockets.", registry=r)
        self.mergebox_documents = Gauge(
            "cdcddp_mergebox_documents", "Documents held in all clients' merge boxes.",
            registry=r)
        self.commit_to_send = FastHistogram(
            "cdcddp_commit_to_send_seconds",
            "Commit time of a transaction to its messages written to a client socket "
            "(one observation per client write that carried them).",
            buckets=LATENCY_BUCKETS, registry=r)
        # -- methods and accounts --------------------------------------------------------------
        self.methods = Counter(
            "cdcddp_methods_total", "Method calls finished, by method and outcome "
            "(ok, error, internal_error, unavailable, not_found).", ["method", "outcome"],
            registry=r)
        self.method_duration = Histogram(
            "cdcddp_method_duration_seconds", "Method call time, received to result.",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.logins = Counter(
            "cdcddp_logins_total", "Login attempts, by outcome (success, failure).",
            ["outcome"], registry=r)

        # Series that should read 0 rather than be absent before their first event.
        self.stream_connected.set(0)
        for status in WAL_STATUSES:
            self.slot_wal_status.labels(status=status).set(0)
        for outcome in ("success", "failure"):
            self.logins.labels(outcome=outcome)
        self.on_collect(self._sync_send_counts)

    # -- exposition --------------------------------------------------------------------------
    content_type = CONTENT_TYPE

    def on_collect(self, hook: Callable[[], None]) -> None:
        """Run ``hook()`` before each exposition (e.g. copy live counts into gauges)."""
        self._collect_hooks.append(hook)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry (for ``GET /metrics``)."""
        for hook in self._collect_hooks:
            try:
                hook()
            except Exception:  # a broken hook must not break scrapes
                log.exception("metrics collect hook failed")
        return generate_latest(self.registry)

    def add_total(self, key: Any, counter: Any, total: float) -> None:
        """Bring ``counter`` (a Counter or labelled child) up to a running ``total`` kept
        elsewhere (adds the increase since the last call with this ``key``)."""
        before = self._totals_seen.get(key, 0)
        if total > before:
            counter.inc(total - before)
        self._totals_seen[key] = total

    def _sync_send_counts(self) -> None:
        counts = self.send_counts
        for prefix, total in list(counts.by_prefix.items()):
            msg_type = MSG_TYPES_BY_PREFIX.get(prefix, OTHER_LABEL)
            self.add_total(("sent", prefix), self.message_counter(msg_type), total)
        self.add_total("sent_bytes", self.bytes_sent, counts.bytes)

    def names(self) -> set[str]:
        """Every sample name this registry can expose (``_total``, ``_bucket``, ... included),
        also for labelled metrics that have no series yet."""
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                    "info": ("_info",), "gauge": ("",)}
        found: set[str] = set()
        for family in self.registry.collect():
            found.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        return found

    # -- replication -------------------------------------------------------------------------
    def set_stream_connected(self, connected: bool) -> None:
        self.stream_connected.set(1 if connected else 0)

    def set_positions(self, received_lsn: int, acknowledged_lsn: int) -> None:
        self.received_lsn.set(received_lsn)
        self.acknowledged_lsn.set(acknowledged_lsn)

    def stream_reconnected(self) -> None:
        self.reconnects.inc()

    def decode_error(self) -> None:
        self.decode_errors.inc()

    def dropped_change_warning(self) -> None:
        self.dropped_change_warnings.inc()

    def sync_stream(self, stream: StreamCounters) -> None:
        """Copy a replication stream's own counters and positions (the stream keeps them, so
        this adds the increase since the last call). Cheap: call it from an ``on_collect``
        hook or a periodic task."""
        self.set_stream_connected(stream.connected)
        self.set_positions(stream.received_lsn, stream.acknowledged_lsn)
        for name, counter in (("reconnects", self.reconnects),
                              ("decode_errors", self.decode_errors),
                              ("dropped_change_warnings", self.dropped_change_warnings)):
            now = int(getattr(stream, name))
            before = self._stream_seen.get(name, 0)
            if now > before:
                counter.inc(now - before)
            self._stream_seen[name] = now

    def set_slot_status(self, *, wal_status: str | None, active: bool = False,
                        lag_bytes: int | None = None, retained_wal_bytes: int | None = None,
                        safe_wal_bytes: int | None = None,
                        confirmed_flush_lsn: int | None = None) -> None:
        """Gauges of one slot status poll; ``wal_status=None`` means the slot is missing."""
        current = wal_status if wal_status in WAL_STATUSES else "missing"
        for status in WAL_STATUSES:
            self.slot_wal_status.labels(status=status).set(1 if status == current else 0)
        self.slot_active.set(1 if active else 0)
        # A missing slot retains nothing; lag is unknown (NaN keeps alerts on it quiet and
        # the wal_status alert says why).
        self.slot_lag_bytes.set(math.nan if lag_bytes is None else lag_bytes)
        self.slot_retained_wal_bytes.set(retained_wal_bytes or 0)
        self.slot_safe_wal_bytes.set(math.nan if safe_wal_bytes is None else safe_wal_bytes)
        if confirmed_flush_lsn is not None:
            self.slot_confirmed_flush_lsn.set(confirmed_flush_lsn)

    # -- applying changes --------------------------------------------------------------------
    def sync_live(self, live: LiveFigures) -> None:
        """Copy the live-data engine's own counters (and its stream's): call it from an
        ``on_collect`` hook, as :class:`cdcddp.server.server.Server` does."""
        if live.stream is not None:
            self.sync_stream(live.stream)
        else:
            self.set_stream_connected(False)
        self.add_total("transactions", self.transactions_applied, live.transactions_applied)
        self.add_total("schema_changes", self.schema_changes, live.schema_changes)
        self.add_total("backlog_skips", self.backlog_skips, live.behind_skips)
        self.add_total("catch_up_timeouts", self.catch_up_timeouts, live.catch_up_timeouts)
        self.add_total("snapshot_retakes", self.snapshot_retakes,
                       live.invisible_delivered_retries)
        self.add_total("read_retries", self.read_retries, live.read_retries)
        lookups = live.lookups
        for (publication, outcome), total in list(lookups.outcomes.items()):
            self.add_total(("lookup_runs", publication, outcome), self.lookup_runs.labels(
                publication=self._publication(publication), outcome=outcome), total)
        self.add_total("lookup_batches", self.lookup_batches, lookups.batches)
        for publication, total in list(live.row_watches_fired.items()):
            self.add_total(("lookup_row_changes", publication), self.lookup_row_changes.labels(
                publication=self._publication(publication)), total)
        for reason, total in list(live.resync_reasons.items()):
            self.add_total(("resync", reason), self.resyncs.labels(reason=self._reason(reason)),
                           total)
        if live.change_counts is not None:
            for (schema, table, kind), total in list(live.change_counts.items()):
                name = table if schema == "public" else f"{schema}.{table}"
                child = self.changes_applied.labels(
                    table=self._table(name), action=kind.__name__.lower())
                self.add_total(("changes", schema, table, kind), child, total)
        self.set_observers(live.observer_count, live.observer_documents)
        self.lag_seconds.set(live.apply_lag())

    def change_applied(self, table: str, action: str, count: int = 1) -> None:
        """``action``: insert / update / delete / truncate (wal2json's I/U/D/T are spelled out)."""
        action = _ACTION_NAMES.get(action, action)
        self.changes_applied.labels(table=self._table(table), action=action).inc(count)

    def transaction_applied(self, commit_time: dt.datetime | None = None,
                            now: dt.datetime | None = None) -> None:
        """One transaction applied; its commit timestamp (aware) sets the lag in seconds."""
        self.transactions_applied.inc()
        if commit_time is not None:
            now = now or dt.datetime.now(dt.UTC)
            self.lag_seconds.set(max(0.0, (now - commit_time).total_seconds()))

    def resync(self, reason: str) -> None:
        self.resyncs.labels(reason=self._reason(reason)).inc()

    def set_observers(self, count: int, documents: int) -> None:
        self.observers.set(count)
        self.observer_documents.set(documents)

    def subscription_started(self, publication: str) -> None:
        self.subscriptions.labels(publication=self._publication(publication)).inc()

    def subscription_stopped(self, publication: str) -> None:
        self.subscriptions.labels(publication=self._publication(publication)).dec()

    def snapshot_finished(self, seconds: float, rows: int) -> None:
        self.snapshot_duration.observe(seconds)
        self.snapshot_rows.inc(rows)

    # -- clients -----------------------------------------------------------------------------
    def session_opened(self) -> None:
        self.sessions_opened.inc()
        self.clients_connected.inc()

    def session_closed(self, reason: str) -> None:
        """``reason``: client, heartbeat_timeout, slow_client, shutdown, protocol_error, ..."""
        self.sessions_closed.labels(reason=self._reason(reason)).inc()
        self.clients_connected.dec()

    def message_sent(self, msg_type: str, count: int = 1) -> None:
        """``count`` DDP messages of ``msg_type`` (added, changed, ready, result, ...) sent."""
        self.message_counter(msg_type).inc(count)

    def message_counter(self, msg_type: str) -> Any:
        """The labelled child for one message type (a hot path may keep it and ``inc``)."""
        return self.ddp_messages_sent.labels(type=self._msg_type(msg_type))

    def sent_bytes(self, count: int) -> None:
        self.bytes_sent.inc(count)

    def mergebox_documents_changed(self, delta: int) -> None:
        self.mergebox_documents.inc(delta)

    def set_mergebox_documents(self, count: int) -> None:
        self.mergebox_documents.set(count)

    def commit_sent(self, seconds: float) -> None:
        """A transaction's messages reached a client socket ``seconds`` after its commit."""
        self.commit_to_send.observe(max(0.0, seconds))

    # -- methods and accounts ----------------------------------------------------------------
    def method_finished(self, method: str, outcome: str, seconds: float) -> None:
        """``outcome``: ok, error (a MeteorError), internal_error, unavailable (503: the
        database out of reach), not_found. Pass unknown
        method names as they came: the label cap keeps them bounded."""
        name = self._method(method) if outcome != "not_found" else OTHER_LABEL
        self.methods.labels(method=name, outcome=outcome).inc()
        self.method_duration.labels(method=name).observe(seconds)

    def login(self, success: bool) -> None:
        self.logins.labels(outcome="success" if success else "failure").inc()


_ACTION_NAMES = {"I": "insert", "U": "update", "D": "delete", "T": "truncate"}


# -- HTTP endpoint -------------------------------------------------------------------------------

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


def _response(status: str, body: bytes, content_type: str, head_only: bool) -> bytes:
    head = (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head if head_only else head + body


def handle_request(metrics: Metrics, head: bytes) -> bytes:
    """The whole response to one request head (sans-IO, so it is testable without sockets)."""
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return _response("400 Bad Request", b"bad request\n", "text/plain", False)
    method, target = parts[0], parts[1]
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return _response("405 Method Not Allowed", b"GET only\n", "text/plain", False)
    head_only = method == "HEAD"
    if path == "/metrics":
        return _response("200 OK", metrics.exposition(), metrics.content_type, head_only)
    if path == "/":
        page = b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
        return _response("200 OK", page, "text/html; charset=utf-8", head_only)
    return _response("404 Not Found", b"not found\n", "text/plain", head_only)


async def _serve_one(metrics: Metrics, stream: trio.SocketStream) -> None:
    async with stream:
        head = b""
        with trio.move_on_after(REQUEST_TIMEOUT):
            while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                head += chunk
        if b"\r\n\r\n" not in head:
            return  # too slow or too big: just close
        try:
            await stream.send_all(handle_request(metrics, head))
        except trio.BrokenResourceError:
            pass


async def serve_metrics(metrics: Metrics, host: str = DEFAULT_METRICS_HOST,
                        port: int = DEFAULT_METRICS_PORT, *,
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``/metrics`` over plain HTTP on its own port until cancelled.

    ``task_status.started`` reports the bound port (use port 0 for any free port).
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    async with trio.open_nursery() as nursery:
        task_status.started(bound)
        await trio.serve_listeners(lambda s: _serve_one(metrics, s), listeners,
                                   handler_nursery=nursery)


# -- slot poller ---------------------------------------------------------------------------------

# On a standby the replayed position is "now" for its slots (SERVER_LSN_SQL).
SLOT_STATUS_SQL = f"""
SELECT s.wal_status::text, s.active,
       pg_wal_lsn_diff(c.lsn, s.confirmed_flush_lsn)::bigint,
       pg_wal_lsn_diff(c.lsn, s.restart_lsn)::bigint,
       s.safe_wal_size,
       pg_wal_lsn_diff(s.confirmed_flush_lsn, '0/0')::bigint
FROM (SELECT {SERVER_LSN_SQL} AS lsn) AS c
LEFT JOIN pg_replication_slots AS s ON s.slot_name = %s
"""


class _Queryable(Protocol):
    async def fetchall(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]: ...


async def poll_slot_once(metrics: Metrics, db: _Queryable, slot: str) -> None:
    """Query the slot's status once and set the slot gauges."""
    rows = await db.fetchall(SLOT_STATUS_SQL, (slot,))
    metrics.slot_polls.inc()
    wal_status, active, lag, retained, safe, confirmed = rows[0]
    metrics.last_slot_lag_bytes = lag
    metrics.set_slot_status(wal_status=wal_status, active=bool(active), lag_bytes=lag,
                            retained_wal_bytes=retained, safe_wal_bytes=safe,
                            confirmed_flush_lsn=confirmed)


async def poll_slot(metrics: Metrics, db_or_dsn: _Queryable | str, slot: str,
                    interval: float = 10.0) -> None:
    """Poll ``pg_replication_slots`` every ``interval`` seconds until cancelled.

    ``db_or_dsn``: a :class:`cdcddp.db.Database` (shared pool) or a DSN (a one-connection
    pool of its own, closed on exit). Failures are counted and logged once per outage; the
    poller keeps going, because losing sight of the slot must not stop the server.
    """
    own = Database(db_or_dsn, size=1, application_name="cdcddp-metrics") \
        if isinstance(db_or_dsn, str) else None
    db: _Queryable = own if own is not None else db_or_dsn  # type: ignore[assignment]
    failing = False
    try:
        while True:
            started = time.monotonic()
            try:
                await poll_slot_once(metrics, db, slot)
                if failing:
                    log.info("slot status poll works again")
                failing = False
            except Exception as exc:
                metrics.slot_poll_errors.inc()
                metrics.last_slot_lag_bytes = None
                if not failing:
                    log.warning("slot status poll failed: %s", first_line(exc))
                failing = True
            await trio.sleep(max(0.0, interval - (time.monotonic() - started)))
    finally:
        if own is not None:
            own.close()


def record_changes(metrics: Metrics, changes: Iterable[tuple[str, str]]) -> None:
    """Count many ``(table, action)`` changes at once (a transaction's worth)."""
    counts: dict[tuple[str, str], int] = {}
    for key in changes:
        counts[key] = counts.get(key, 0) + 1
    for (table, action), count in counts.items():
        metrics.change_applied(table, action, count)
