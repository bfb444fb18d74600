"""The live-data engine: one replication stream feeding shared observers and client merge boxes.

    slot ──▶ LiveData (one consumer task, commit order) ──▶ observers (one per BoundCursor.key)
                                                               │ DocOps
                                                               ▼
                              each subscribed client's MergeBox ──flush at commit──▶ session

* **Routing.** Per table, observers are indexed by one equality constraint of their filter
  (column → value → observers), the rest are "unconstrained" (candidates for every change),
  and a reverse index maps a row key to the indexed observers holding that row (UPDATE moves
  out and DELETEs carry only the key under DEFAULT replica identity). A row change costs the
  observers that may match it, not all.
* **Transactions.** Row changes of tables somebody observes are buffered per transaction and
  applied at ``Commit``; clients are flushed between transactions, so no half-applied
  transaction is ever visible: after each commit, or — when commits arrive faster than they
  are written out — once for all the commits received together (each client's merge box
  coalesces them; each change is diffed and encoded once per round). A transaction larger
  than ``max_transaction_buffer`` changes is applied in chunks (memory stays bounded); client
  flushes still wait for its commit. If the stream restarts such a transaction
  (``TransactionRestart``), the observers it touched resync.
  ``Commit.end_lsn`` is acknowledged once the transaction is applied (invariant 7).
* **Handoff** (invariant 2). A new observer pins the ring of recent transactions, runs its query
  in a REPEATABLE READ transaction that also reads ``pg_current_snapshot()`` and the WAL insert
  position, then — between two stream transactions — replays the pinned transactions its
  snapshot did not see and registers. Later stream transactions its snapshot saw are skipped
  (``Observer.wants_transaction``) until the stream passes that WAL position. Two PostgreSQL
  facts make this subtle: a commit is decoded (delivered) *before* it becomes visible to new
  snapshots, so a snapshot lacking an already delivered transaction is retaken; and commit
  order is not visibility order, so visibility is checked per transaction, not assumed to
  flip once.
* **Resync** (invariant 5). ``StreamGap`` resyncs every observer; TRUNCATE empties the observers
  of the table at that point of commit order (the table is empty there: TRUNCATE holds an
  ACCESS EXCLUSIVE lock), so later inserts apply on top. Only differences reach clients, and
  only once the stream has delivered what the resync snapshots saw (they may be ahead of it:
  ``FlushGate.held``).
  A schema change shows as a stream ``Relation`` (columns and type oids) that contradicts the
  shape an observer's snapshot read from ``pg_attribute`` (same statement as the snapshot):
  those observers resync before the next commit is applied; a query that no longer runs
  stops its subscriptions (``nosub``, error ``schema-changed``). Falling more than
  ``resync_behind_bytes`` behind makes the stream skip its backlog (slot advanced) and yield a
  ``StreamGap``; the gap's first snapshot (every skipped commit visible in it) settles the
  write fences of transactions the stream will never deliver.
* **TOAST** (invariant 4). Columns wal2json leaves out come from the observer's copy, or from
  the row's earlier changes in the same transaction; a row moving *in* without them is
  fetched by key in a REPEATABLE READ transaction whose snapshot then shields that row from
  the changes it already reflects.
* **Limited cursors** (``LimitedObserver``). An observer of the first N rows holds N more in
  reserve; when fewer than N are left it is read again from a snapshot that sees the
  transaction (like a failed observer), and skips the rest of that transaction.

The engine never awaits a client: a client whose socket is busy keeps its changes as merge-box
dirty state (bounded by its view) and its connection flushes when the socket frees up.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import secrets
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Any, Final, Protocol

import psycopg
import trio

from cdcddp.db import (
    Database,
    DatabaseSetupError,
    first_line,
    is_unavailable,
    transaction_statuses,
)
from cdcddp.ddp import messages
from cdcddp.ddp.mergebox import MergeBoxError
from cdcddp.gcpause import LARGE_RESULT_ROWS, gc_paused, promote_young_objects, storm_promotion
from cdcddp.publish.clients import EncodeCache, FlushGate, LiveClient, SubKey
from cdcddp.publish.definition import BoundCursor, TableName
from cdcddp.publish.handoff import (
    CommittedTransaction,
    DeliveredXids,
    Pin,
    RecentTransactions,
)
from cdcddp.publish.lookup import (
    BatchedLookups,
    Dependency,
    ReadRows,
    RecentRowChanges,
    read_differs,
)
from cdcddp.publish.observer import DocOp, NeedsRow, Observer, Row, Values, make_observer
from cdcddp.publish.partitions import Leaves, StreamedTables, as_change_of, as_relation_of
from cdcddp.publish.routes import ObserverEntry, TableRoutes
from cdcddp.publish.snapshots import (
    ReadsInterrupted,
    SnapshotRead,
    catalog_change,
    check_streamed,
    current_wal_lsn,
    describe_shape_change,
    failed_read_advice,
    fetch_row,
    horizon_snapshot,
    next_batch,
    quiet_partitions,
    read_partitions,
    row_list,
    row_query,
    shape_differs,
    snapshot_reads,
    table_columns,
    table_shapes,
)
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import (
    Begin,
    Commit,
    Delete,
    Insert,
    Message,
    Relation,
    RowChange,
    StreamGap,
    TimelineSwitch,
    TransactionRestart,
    Truncate,
    Update,
)
from cdcddp.wal.lsn import parse_lsn
from cdcddp.wal.slot import log_running_xacts
from cdcddp.wal.stream import ReplicationStream, open_stream

if TYPE_CHECKING:
    from cdcddp.metrics import Metrics

__all__ = ["LiveData", "LiveDataConfig"]

log = logging.getLogger(__name__)

SYNC_PREFIX: Final = "cdcddp.sync"
"""``pg_logical_emit_message`` prefix of :meth:`LiveData.sync` markers."""

RowWatcher = Callable[[int], None]  # called with the xid of a change to a watched row

_DELIVERED_KEPT: Final = 65_536  # recent xids remembered (far beyond the visibility lag)
# A snapshot read retaken this long (seconds) for a delivered, still invisible transaction
# says so: commits the stream has are normally visible within milliseconds.
_INVISIBLE_WARN_AFTER = 5.0
_TABLE_AND_KIND: Final = attrgetter("schema", "table", "__class__")  # change_counts keys
# Below this many merge-box operations a delivery runs without pausing the collector: so few
# allocations rarely start a collection, and pausing costs about 0.3 µs per change.
_GC_PAUSE_ENTRIES: Final = 64
# While behind, a flush round waits at least this many times as long as the last round of
# client writes took (see LiveData._flusher): writing then takes at most 1/(1 + this) of the
# time. 4 rather than 2 caught up a backlog spread over 1,000 clients 13 % faster (a write
# costs a syscall whatever it carries), with fan-out latency unchanged.
_WAIT_PER_WRITE_TIME: Final = 4
# Snapshot reads done in one transaction at most (new observers': those queued meanwhile).
_SNAPSHOT_BATCH_MAX: Final = 32


@dataclass
class LiveDataConfig:
    slot: str = "cdcddp"
    temporary_slot: bool = False  # tests: the slot goes with the connection
    failover_slot: bool = False  # PostgreSQL 17+: standbys keep a copy to resume from
    # Changes buffered per transaction before it is applied in chunks (bounds memory).
    max_transaction_buffer: int = 10_000
    # Changes kept for subscriptions being snapshotted; past it they retake their snapshot.
    ring_max_changes: int = 100_000
    # Changes kept anyway (the latest transactions'), so a snapshot that lacks a commit the
    # stream already delivered replays it instead of waiting for it to become visible.
    ring_retain_changes: int = 2_000
    stream_options: dict[str, Any] = field(default_factory=dict)
    # More WAL than this (bytes) between the server's current position and the applied one:
    # skip the backlog and resync every observer (as for a stream gap). None: never.
    resync_behind_bytes: int | None = None
    behind_check_interval: float = 1.0  # seconds between checks of the distance
    # Seconds between reads of the catalog (the stream carries no DDL): the partitions of
    # the partitioned tables followed (a partition attached, detached, created or dropped),
    # and the columns of the tables observed (a column retyped while nobody writes, or its
    # type modifier changed) show in their subscriptions this late at most.
    catalog_check_interval: float = 1.0
    # A new observer waits until the stream has delivered everything its snapshot saw, so it
    # is never ahead of the stream (see LiveData._catch_up): this long at least; longer while
    # the consumer moves and is on course to get there within catch_up_limit (seconds).
    catch_up_timeout: float = 2.0
    catch_up_limit: float = 10.0
    # While the consumer is behind (more of the stream already received), client flushes wait
    # up to this long (seconds) for it to apply that first: one write per client for many
    # commits instead of one per commit. Bounds the extra commit->sent latency under load.
    flush_coalesce_delay: float = 0.05
    # ... and at least four times as long as the last round of client writes took, up to this
    # (seconds): with many clients each getting a little, writing then takes at most a fifth
    # of the time and every write carries more (while behind only).
    flush_coalesce_delay_max: float = 0.5


def _row_key(row: Row, pk: tuple[str, ...]) -> tuple[Any, ...] | None:
    """The row's primary-key values (None: the row lacks one of them)."""
    try:
        return tuple([row[c] for c in pk])
    except KeyError:
        return None


def _left_out_earlier(change: Update, changes: Sequence[RowChange | Truncate],
                      missing: Iterable[str]) -> tuple[dict[str, Any], bool] | None:
    """The values ``change`` left out (``missing``: its unchanged TOASTed columns) as the
    earlier changes of its transaction (``changes``, all of it) set them, and whether some are
    left for the row as it was before the transaction. Walks back over that row's earlier
    changes, by primary key; None when it cannot tell (no key, its key changed, a TRUNCATE):
    then only a snapshot that sees the transaction has them."""
    pk = change.pk
    if not pk:
        return None
    new_key = _row_key(change.new, pk)
    key = _row_key(change.identity, pk) or new_key
    if key is None or new_key != key:
        return None
    position = next((i for i, c in enumerate(changes) if c is change), None)
    if position is None:
        return None
    table = (change.schema, change.table)
    wanted = set(missing)
    found: dict[str, Any] = {}
    for i in range(position - 1, -1, -1):
        earlier = changes[i]
        if (earlier.schema, earlier.table) != table:
            continue
        kind = type(earlier)
        if kind is Truncate:
            return None
        if kind is Delete:
            if _row_key(earlier.identity, pk) == key:  # type: ignore[union-attr]
                return None  # deleted, then updated: not a history this walk follows
            continue
        if _row_key(earlier.new, pk) != key:  # type: ignore[union-attr]
            if kind is Update and _row_key(earlier.identity, pk) == key:  # type: ignore[union-attr]
                return None  # the row moved to another key
            continue
        new = earlier.new  # type: ignore[union-attr]
        for column in [c for c in wanted if c in new]:
            found[column] = new[column]
            wanted.discard(column)
        if not wanted:
            return found, False
        if kind is Insert:
            return None  # an INSERT has every column: not a row this walk understands
        if _row_key(earlier.identity, pk) not in (key, None):  # type: ignore[union-attr]
            return None  # its key changed in this transaction
    return found, True


def _contradicts(entry: ObserverEntry, relation: Relation, shown_by: tuple[int, int] | None
                 ) -> bool:
    """Does the stream's shape of a table, shown by transaction ``shown_by`` (xid, end LSN),
    contradict what ``entry``'s snapshot saw of the columns it reads? Not when that snapshot
    already shows the transaction: the snapshot is then the newer of the two (it saw a
    migration the stream has not reached yet), and skips those rows anyway. (Resyncing
    then took a snapshot newer still: under a run of migrations every observer of the
    table resynced at every change, and new subscriptions waited behind them.)"""
    if not shape_differs(entry.shape, relation, entry.bound.columns):
        return False
    observer = entry.observer
    return shown_by is None or observer is None or not observer.sees(*shown_by)


def _log_read_failure(what: str, exc: BaseException) -> None:
    """One sentence when PostgreSQL refused the server's role or the table is never streamed
    (naming the fix), or the database is out of reach; else the traceback."""
    advice = failed_read_advice(exc)
    if advice is not None:
        log.error("%s: %s: %s", what, first_line(exc), advice)
    elif isinstance(exc, DatabaseSetupError):
        log.error("%s: %s", what, exc)
    elif is_unavailable(exc):
        log.warning("%s: the database is unavailable (%s)", what, first_line(exc))
    else:
        log.error("%s", what, exc_info=exc)


def _epoch(timestamp: dt.datetime) -> float:
    if timestamp.tzinfo is None:  # wal2json timestamps are UTC
        timestamp = timestamp.replace(tzinfo=dt.UTC)
    return timestamp.timestamp()


def _stamp_commit(clients: Iterable[LiveClient], commit_time: float) -> None:
    """Metrics: these clients got changes of a transaction committed at ``commit_time``."""
    for client in clients:
        if not client.commit_time:
            client.commit_time = commit_time


@dataclass
class _OpenTransaction:
    xid: int
    end_lsn: int  # where its commit record ends (known from Begin)
    pins_before_begin: int
    changes: list[RowChange | Truncate] = field(default_factory=list)
    chunked: bool = False
    interest_grew: bool = False  # a table became of interest after its Begin
    touched: set[ObserverEntry] = field(default_factory=set)
    marks: list[str] = field(default_factory=list)

    @property
    def partial(self) -> bool:
        """Its changes at hand may lack earlier ones: applied in chunks, or not kept (a
        table became of interest while it arrived)."""
        return self.chunked or self.interest_grew


@dataclass(eq=False)
class _CatchUpMark:
    """A logical message committed after some snapshots were taken: once the consumer reaches
    it, the stream has delivered every commit they saw (see ``LiveData._catch_up``)."""

    reached: trio.Event = field(default_factory=trio.Event)
    settled: trio.Event = field(default_factory=trio.Event)  # reached, or given up on
    written: trio.Event = field(default_factory=trio.Event)  # committed, or failed to
    lsn: int | None = None  # where it was written (None: it could not be)


class _Hold(Protocol):
    """What the consumer awaits before applying each commit (a test hook)."""

    async def wait(self) -> None: ...


class _RetrySnapshot(Exception):
    """The handoff cannot be completed from the ring: take the snapshot again, one that sees
    the first ``must_see`` delivered transactions (the one that could not be replayed: a
    snapshot without it would fail the same way, over and over while its commit waits)."""

    def __init__(self, must_see: int = 0) -> None:
        super().__init__()
        self.must_see = must_see


# ---------------------------------------------------------------------------- the engine


class _InvisibleWait:
    """The pause before reading again what lacked a transaction the stream delivered (visible
    moments later, normally): doubling from 1 ms to 100 ms, and one warning once the wait
    passes ``_INVISIBLE_WARN_AFTER``."""

    __slots__ = ("_delay", "_warn_at")

    def __init__(self) -> None:
        self._delay = 0.001
        self._warn_at = time.monotonic() + _INVISIBLE_WARN_AFTER

    async def pause(self, warning: str, *args: object) -> None:
        if time.monotonic() > self._warn_at:
            self._warn_at = float("inf")  # once
            log.warning(warning, *args)
        await trio.sleep(self._delay)
        self._delay = min(self._delay * 2, 0.1)


class LiveData:
    """Consumes one replication slot and keeps every observer and client current.

    Run it in a nursery (``await nursery.start(live.run)``); subscriptions then use
    :meth:`acquire` / :meth:`add_subscriber` / :meth:`remove_subscriber` / :meth:`release`.
    """

    def __init__(self, database: Database, dsn: str,
                 config: LiveDataConfig | None = None, *, metrics: Metrics | None = None
                 ) -> None:
        # Every query, read or write, goes to ``database``; only the stream to ``dsn``. With
        # ``dsn`` a standby, ``database`` is its primary: decoding moves off the primary while
        # snapshots keep its exact visibility (a snapshot taken on a standby lists no running
        # transactions, see cdcddp.publish.snapshots), and the stream carries the same WAL.
        self.database = database
        self.metrics = metrics  # None: no per-table counts, no snapshot timings, no stamps
        self.dsn = dsn
        self.config = config or LiveDataConfig()
        self.ring = RecentTransactions(self.config.ring_max_changes,
                                       self.config.ring_retain_changes)
        self.gate = FlushGate()
        self.stream: ReplicationStream | None = None
        self._observers: dict[Any, ObserverEntry] = {}
        self._routes: dict[TableName, TableRoutes] = {}
        # Tables whose changes are kept: observed, or being snapshotted (pinned).
        self._interest: Counter[TableName] = Counter()
        # For each of them, the first transaction the ring keeps whole for it (its number
        # among those kept): a pin can reach back that far.
        self._kept_whole_from: dict[TableName, int] = {}
        self._started = trio.Event()
        self._txn_done = trio.Event()
        self._marks: dict[str, trio.Event] = {}
        # The catch-up mark new observers wait for (one per round; see _catch_up).
        self._next_mark = _CatchUpMark()
        self._catch_up_wake = trio.Event()
        self.catch_up_rounds = 0
        self.flush_rounds = 0  # rounds of client writes (one per commit while keeping up)
        self.catch_up_timeouts = 0
        self.hold_timeouts = 0  # resyncs' holds released before the stream caught up
        self._open_txn: _OpenTransaction | None = None
        # Delivered xids until a snapshot sees them (a snapshot that lacks one must be
        # retaken, a lookup that read under it may be stale).
        self._commits_seen = 0
        self._delivered = DeliveredXids(_DELIVERED_KEPT)
        # Recent xids, for wait_applied. An OrderedDict: dropping the oldest is O(1) (a dict's
        # first live entry is found by scanning past every deleted one: once full, that cost
        # grew per commit).
        self._applied: OrderedDict[int, int] = OrderedDict()
        # Delivery number each snapshot query under way started at -> how many: a count per
        # number, not an entry per query (10,000 subscribing at once made a list's min()
        # quadratic); the numbers in flight at once are few.
        self._snapshots_in_flight: Counter[int] = Counter()
        # New observers' snapshots waiting to be read (see _snapshot_batches), by half the
        # pool's threads at most, so a reconnect storm leaves threads for method calls.
        self._snapshot_queue, self._snapshot_batched = \
            trio.open_memory_channel[SnapshotRead](math.inf)
        self._snapshot_readers = max(1, database.size // 2)
        self._xid_waiters: dict[int, trio.Event] = {}
        # The epoch-extended xids of the commits write fences wait for, when the caller gave
        # them: a failover asks the new primary about them (_release_vanished_fences).
        self._fence_xid8s: dict[int, int] = {}
        self._held_clients: set[LiveClient] = set()  # changed while the gate was closed
        # Clients applied commits changed, flushed by _flusher once the consumer waits.
        self._flush_due: set[LiveClient] = set()
        self._flush_wake = trio.Event()
        self._flusher_running = False
        # Rows publication functions read through a lookup (reactive dependencies): each
        # watched row's callbacks run with the xid of a committed transaction that changed it.
        # Watched row -> callback -> what that watch's lookup read of it.
        self._row_watchers: dict[Dependency, dict[RowWatcher, dict[str, Any] | None]] = {}
        self._row_watch_publications: dict[RowWatcher, str] = {}  # (metrics)
        # The last change to each row of the tables lookups read (lookup guard, watchers).
        self._row_changes = RecentRowChanges()
        # Publication functions that read rows, run in batches by a quarter of the pool's
        # threads at most (see BatchedLookups).
        # Published or looked-up tables found streamed, and the checks under way (one per
        # table: a thousand subscriptions at once to a new table ask once).
        self._streamed = StreamedTables()
        self._streamed_checks: dict[TableName, trio.Event] = {}
        self.streamed_checks = 0  # catalog reads of that (tests)
        # Partitioned tables' new leaf partitions, polled (_watch_catalog) and followed
        # from the next commit the consumer applies (with a resync of their observers).
        # (leaves, why one's changes are never streamed if so, the new ones found quiet)
        self._partitions_due: dict[TableName, tuple[Leaves, str | None, frozenset[int]]] = {}
        self.partition_changes = 0  # trees found changed (tests)
        self.partitions_added_quietly = 0  # of those, changes needing no resync (tests)
        self.lookups = BatchedLookups(database, lambda: self._commits_seen,
                                      self._tables_changed_since, self._streamed)
        self._lookup_runners = max(1, database.size // 4)
        self._last_gap = 0  # delivery number a stream gap took (lookup guard)
        # Delivery number of the last transaction that changed each table (lookup guard).
        self._table_changed_at: dict[TableName, int] = {}
        self._nursery: trio.Nursery | None = None
        self._resync_mark: _CatchUpMark | None = None  # the catch-up a held gate waits for
        # Test hooks: hold the consumer before applying a commit; run after a snapshot query.
        self.hold: _Hold | None = None
        self.after_snapshot: Callable[[ObserverEntry], Awaitable[None]] | None = None
        # Figures (metrics, tests).
        self.transactions_applied = 0
        self.changes_applied = 0
        self.snapshot_queries = 0
        self.snapshot_transactions = 0  # each reads one or more snapshot queries
        self.snapshot_retries = 0
        self.ring_replays = 0
        self.rows_fetched = 0
        self.resyncs = 0
        self.skipped_by_snapshot = 0
        self.last_commit_end_lsn = 0
        self.invisible_delivered_retries = 0
        # Lookups told a row they read changed (each runs again), by publication.
        self.row_watches_fired: Counter[str] = Counter()
        self.commits_out_of_order = 0  # the stream broke its contract (should stay 0)
        # Schema changes: the last shape the stream showed per table, with the transaction
        # (xid, end LSN) that showed it; observers whose snapshot saw another one (and not
        # that transaction), resynced at the next commit.
        self._stream_shapes: dict[TableName, tuple[Relation, tuple[int, int] | None]] = {}
        # Observers to read again before the next commit, each with why (a resync reason):
        # their rows changed in a way the stream shows no row change for.
        self._resync_due: dict[ObserverEntry, str] = {}
        self._absent_checks: list[Relation] = []  # catalog checks due at the next commit
        self.schema_changes = 0  # Relations that contradicted an observer's snapshot
        # Falling behind (resync_behind_bytes): the last measured distance, the skips asked
        # for, and the snapshot of the last gap's resync (it settles write fences of the
        # transactions the stream will never deliver).
        self.behind_bytes = 0
        self.behind_skips = 0
        self._skip_pending = False
        self._gap_horizon: Snapshot | None = None
        # write fences passed by a gap's resync, or ended by a failover that took their commit
        self.fences_settled_by_gap = 0
        self.resync_reasons: Counter[str] = Counter()  # observers resynced, by reason
        # (schema, table, change class) -> changes applied; counted per transaction, and only
        # with metrics (copied into Prometheus at scrape time).
        self.change_counts: Counter[tuple[str, str, type]] | None = \
            Counter() if metrics is not None else None
        # Readiness and lag: commit timestamp of the last applied transaction and when it was
        # applied (time.time()); the commit timestamp of the transaction being received.
        self.last_commit_time: dt.datetime | None = None
        self.last_applied_at = 0.0
        self._open_commit_time: dt.datetime | None = None

    # ---- lifetime ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Open the slot and consume it until cancelled; reports started once streaming."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            async with open_stream(self.dsn, self.config.slot,
                                   temporary=self.config.temporary_slot,
                                   failover=self.config.failover_slot,
                                   report_relations=True,
                                   # one catalog: snapshots load values as the stream decodes
                                   type_catalog=self.database.types,
                                   log_standby_snapshot=self._log_standby_snapshot,
                                   **self.config.stream_options) as stream:
                self.stream = stream
                nursery.start_soon(self._flusher)
                nursery.start_soon(self._catch_up_rounds)
                for _ in range(self._snapshot_readers):
                    nursery.start_soon(self._snapshot_batches, self._snapshot_batched)
                for _ in range(self._lookup_runners):
                    nursery.start_soon(self.lookups.serve)
                self._started.set()
                task_status.started()
                nursery.start_soon(self._watch_behind, stream)
                nursery.start_soon(self._watch_catalog)
                await self._consume(stream)
            nursery.cancel_scope.cancel()

    async def _log_standby_snapshot(self) -> None:
        await self.database.run(log_running_xacts)

    @property
    def stream_connected(self) -> bool:
        return self.stream is not None and self.stream.connected

    def replication_lag(self, now: float | None = None) -> float:
        """How far (seconds) the applied position is behind the commits it was sent.

        * while a transaction is being received or applied: its age (now - its commit time);
        * else, while received transactions wait to be applied: the commit->applied delay of
          the last applied one (a backlog being worked through);
        * else (everything received is applied): 0.

        Commit times are PostgreSQL's clock, ``now`` is ours (``time.time()``): a skew
        between the two shows up here, as in ``cdcddp_replication_lag_seconds``.
        """
        now = time.time() if now is None else now
        opened = self._open_commit_time
        if opened is not None:
            return max(0.0, now - _epoch(opened))
        stream = self.stream
        if stream is not None and stream.pending:
            return self.apply_lag()
        return 0.0

    def apply_lag(self) -> float:
        """Commit -> applied delay of the last applied transaction (0 before the first)."""
        committed = self.last_commit_time
        if committed is None:
            return 0.0
        return max(0.0, self.last_applied_at - _epoch(committed))

    @property
    def observer_count(self) -> int:
        return sum(1 for e in self._observers.values() if e.live)

    @property
    def observer_documents(self) -> int:
        """Documents the live observers hold (each once, however many subscribe to it)."""
        return sum(len(e.observer) for e in self._observers.values()
                   if e.live and e.observer is not None)

    def observers(self) -> list[ObserverEntry]:
        return [e for e in self._observers.values() if e.live]

    # ---- subscriptions -------------------------------------------------------------------

    async def acquire(self, bound: BoundCursor) -> ObserverEntry:
        """A live observer for ``bound`` (shared, or created with the handoff); one lease.

        Raises the creation error (a bad query, say) to every subscription waiting for it.
        """
        await self._started.wait()
        key = bound.key
        entry = self._observers.get(key)
        if entry is None:
            entry = ObserverEntry(bound)
            self._observers[key] = entry
            assert self._nursery is not None
            self._nursery.start_soon(self._create, entry)
        entry.leases += 1
        try:
            await entry.ready.wait()
        except BaseException:
            self.release(entry)
            raise
        if entry.error is not None:
            entry.leases -= 1
            raise entry.error
        return entry

    def release(self, entry: ObserverEntry) -> None:
        entry.leases -= 1
        if entry.leases <= 0 and entry.ready.is_set():
            self._drop(entry)

    def add_subscriber(self, entry: ObserverEntry, client: LiveClient, sub: SubKey) -> None:
        """``client`` gets the observer's documents under ``sub`` (into its box, unflushed)."""
        observer = entry.observer
        assert observer is not None
        entry.subscribers[(id(client), sub)] = (client, sub)
        with gc_paused():
            # (Cursors cannot publish a field named _id.)
            client.box.add_many(sub, observer.collection, observer.docs, no_id_field=True)
            if len(observer.docs) >= LARGE_RESULT_ROWS:
                promote_young_objects()  # they live as long as the subscription

    def remove_subscriber(self, entry: ObserverEntry, client: LiveClient, sub: SubKey,
                          *, remove_documents: bool = True) -> None:
        if entry.subscribers.pop((id(client), sub), None) is None or not remove_documents:
            return
        observer = entry.observer
        assert observer is not None
        box, collection = client.box, observer.collection
        for doc_id in observer.docs:
            if box.published_fields(sub, collection, doc_id) is not None:
                box.remove(sub, collection, doc_id)

    async def sync(self, timeout: float = 30.0) -> None:
        """Return once the engine applied everything committed before the call (tests)."""
        token = secrets.token_hex(8)
        event = self._marks[token] = trio.Event()
        try:
            await self._write_mark(token)
            with trio.fail_after(timeout):
                await event.wait()
        finally:
            self._marks.pop(token, None)

    async def _write_mark(self, token: str) -> int:
        """Commit a logical message the consumer recognises (``_reach_mark``); its LSN."""
        def emit(conn: psycopg.Connection[Any]) -> int:
            # Decoded once written locally: no waiting for a synchronous standby to confirm
            # it (a round trip per mark, and forever while none answers).
            conn.execute("SET LOCAL synchronous_commit = local")
            row = conn.execute("SELECT pg_logical_emit_message(true, %s, %s)::text",
                               (SYNC_PREFIX, token)).fetchone()
            assert row is not None
            return parse_lsn(row[0])
        return await self.database.run(emit)

    # ---- creating observers: the handoff -------------------------------------------------

    async def _create(self, entry: ObserverEntry) -> None:
        table = entry.table
        interested = False
        try:
            # First: a partitioned table's partitions' changes are given to it before the
            # ring keeps its changes.
            await self._check_streamed(table)
            if table not in self._interest:
                self._keep_whole_from_next(table)
            self._interest[table] += 1  # from the pin on, the ring keeps this table's changes
            interested = True
            must_see = 0
            while True:
                try:
                    await self._snapshot_and_register(entry, must_see)
                    break
                except _RetrySnapshot as retry:
                    self.snapshot_retries += 1
                    must_see = max(must_see, retry.must_see)
        except Exception as exc:
            _log_read_failure(f"observer for {table[0]}.{table[1]} failed to start", exc)
            # Logged once here: the subscriptions waiting for it get an error that is not
            # logged again per subscription (a 500 unless client-safe, or the database's 503).
            entry.error = (exc if isinstance(exc, messages.MeteorError) or is_unavailable(exc)
                           else messages.MeteorError.internal())
            if self._observers.get(entry.bound.key) is entry:
                del self._observers[entry.bound.key]
        finally:
            if interested:
                self._lose_interest(table)
            entry.ready.set()
        if entry.error is None and entry.leases <= 0:
            self._drop(entry)

    def _keep_whole_from_next(self, table: TableName) -> None:
        """The ring keeps ``table``'s changes whole from the next transaction on; or the one
        after, if one is being received: its earlier changes to ``table`` were not kept."""
        receiving = self._open_txn
        if receiving is not None:
            receiving.interest_grew = True
        self._kept_whole_from[table] = self.ring.kept_count + (1 if receiving is None else 2)

    async def _check_streamed(self, table: TableName) -> None:
        """Raise ``TableNotStreamed`` if no change to ``table`` is ever streamed; asked of
        the catalog until it is (an UNLOGGED table may be SET LOGGED meanwhile)."""
        while table not in self._streamed:
            under_way = self._streamed_checks.get(table)
            if under_way is not None:
                await under_way.wait()
                continue
            under_way = self._streamed_checks[table] = trio.Event()
            try:
                self.streamed_checks += 1
                self._streamed.add(table, await self.database.run(check_streamed, table))
            finally:
                del self._streamed_checks[table]
                under_way.set()

    async def _snapshot_and_register(self, entry: ObserverEntry, at_least: int = 0) -> None:
        bound = entry.bound
        pin = self.ring.pin(self._kept_whole_from.get(entry.table))
        first = self.ring.first_since(pin)
        must_see = max(at_least, self._commits_seen if first is None else first.delivery - 1)
        try:
            # Transactions delivered before the pin's reach must be in the snapshot (they are
            # not in the ring); those after it are in the ring, replayed if it lacks them.
            caught_up: list[_CatchUpMark] = []  # for the last snapshot taken
            token = trio.lowlevel.current_trio_token()

            def request_catch_up() -> None:
                caught_up.append(self._request_catch_up())

            def build(rows: Iterable[Values], snapshot: Snapshot, lsn: int) -> Observer:
                # (In the database thread, right after the snapshot is taken.) Ask for the
                # catch-up mark now, so it travels while the rows load. Queued ahead of the
                # thread's result, it has run when the read is finished; a retaken snapshot
                # asks again, and the last request counts.
                token.run_sync_soon(request_catch_up)
                observer = make_observer(bound, snapshot, lsn)
                observer.fill(rows)
                return observer

            read = self._queue_snapshot(bound, build, must_see)
            await read.finished.wait()
            if read.error is not None:
                raise read.error
            observer = read.result
            entry.shape = read.shape
            entry.snapshot_queries += 1
            if self.after_snapshot is not None:
                await self.after_snapshot(entry)
            await self._catch_up(caught_up[-1])
            replayed = 0  # the ring's number of the last transaction replayed or skipped
            while True:
                await self._between_transactions()
                try:
                    pending = self.ring.since(pin, replayed, observer.snapshot)
                except LookupError:
                    raise _RetrySnapshot from None
                if not pending:
                    break  # caught up, between two transactions: register now, no await
                for _, txn in pending:
                    await self._replay(observer, txn, pin)
                replayed = pending[-1][0]
            entry.observer = observer
            self._register(entry)
        finally:
            self.ring.release(pin)

    def _request_catch_up(self) -> _CatchUpMark:
        """The next catch-up mark (see :meth:`_catch_up`); ask right after taking the
        snapshot."""
        self._catch_up_wake.set()
        return self._next_mark

    async def _catch_up(self, mark: _CatchUpMark) -> None:
        """Return once the stream has delivered every transaction a snapshot just taken sees.

        Its commits were written before the snapshot, so before a logical message committed
        after it: when the consumer reaches that mark, they are all delivered (in the ring
        since the pin, or before it and in the snapshot) and the new observer registers
        exactly at the stream's position. Without this an observer whose snapshot is ahead of
        the stream could hand a client newer rows than an older observer it moves to next
        (the oracle's "version went back"). Waiters share one mark per round. When the mark
        is given up on (:meth:`_follow_mark`: a held or far-behind consumer) it goes on as
        before: the skip-by-snapshot logic keeps the observer itself exact.
        """
        await mark.settled.wait()
        if not mark.reached.is_set():
            self.catch_up_timeouts += 1

    async def _catch_up_rounds(self) -> None:
        assert self._nursery is not None
        while True:
            await self._catch_up_wake.wait()
            self._catch_up_wake = trio.Event()
            # Everyone waiting now took their snapshot before this mark is written.
            mark, self._next_mark = self._next_mark, _CatchUpMark()
            self.catch_up_rounds += 1
            token = secrets.token_hex(8)
            self._marks[token] = mark.reached
            self._nursery.start_soon(self._write_round_mark, mark, token)
            self._nursery.start_soon(self._follow_mark, mark, token)
            # The next round is for those who ask meanwhile (one mark for many), unless the
            # write hangs.
            with trio.move_on_after(self.config.catch_up_timeout):
                await mark.written.wait()

    async def _write_round_mark(self, mark: _CatchUpMark, token: str) -> None:
        try:
            mark.lsn = await self._write_mark(token)
        except Exception as exc:  # cannot write (a standby, the database away)
            log.debug("catch-up mark not written: %r", exc)
        mark.written.set()

    async def _follow_mark(self, mark: _CatchUpMark, token: str) -> None:
        """Settle ``mark`` when the consumer reaches it, or give it up: not written within
        ``catch_up_timeout``, or not reached then and, at a check every ``catch_up_timeout``,
        the consumer stalled since the last check or not on course to reach it within
        ``catch_up_limit``."""
        window = self.config.catch_up_timeout
        started, started_at = trio.current_time(), self.last_commit_end_lsn
        checked_at = started_at
        try:
            with trio.move_on_after(window):
                await mark.written.wait()
            lsn = mark.lsn
            if lsn is None:
                return
            while True:
                with trio.move_on_after(window):
                    await mark.reached.wait()
                    return
                elapsed = trio.current_time() - started
                applied = self.last_commit_end_lsn
                if applied <= checked_at:
                    return  # held, or stalled in a transaction too big to buffer
                # Past the mark a whole check ago, and no mark: lost (a stream gap releases
                # its marks; this is for a loss no gap told of).
                if checked_at > lsn:
                    return
                rate = (applied - started_at) / elapsed  # WAL bytes per second
                if elapsed + (lsn - applied) / rate > self.config.catch_up_limit:
                    return
                checked_at = applied
        finally:
            self._marks.pop(token, None)
            mark.settled.set()

    async def _replay(self, observer: Observer, txn: CommittedTransaction, pin: Pin) -> None:
        table = (observer.schema, observer.table)
        incomplete_from = txn.incomplete_for_pins_from
        if incomplete_from is not None and pin.number >= incomplete_from:
            # Begun before our pin, when our table was not yet of interest: its changes to
            # it were not (all) kept, maybe none, so it cannot be replayed; only skipped.
            if observer.wants_transaction(txn.xid, txn.end_lsn):
                raise _RetrySnapshot(txn.delivery)
            return
        if not any((c.schema, c.table) == table for c in txn.changes):
            return
        if not observer.wants_transaction(txn.xid, txn.end_lsn):
            return
        self.ring_replays += 1
        observer.begin_transaction(txn.xid, txn.end_lsn)
        for change in txn.changes:
            if (change.schema, change.table) != table:
                continue
            if type(change) is Truncate:
                if change.partition is not None:  # type: ignore[union-attr]
                    raise _RetrySnapshot(txn.delivery)  # the other partitions' rows stay
                observer.clear()
                continue
            result = observer.apply(change)  # type: ignore[arg-type]
            if isinstance(result, NeedsRow):
                await self._fetch_into(observer, change, result, txn.xid,  # type: ignore[arg-type]
                                       txn.changes)
            if observer.needs_requery:
                raise _RetrySnapshot(txn.delivery)  # a limited cursor's rows: read with it

    async def _between_transactions(self) -> None:
        """Wait until no transaction is being applied, nor being received while a table
        became of interest (it would reach a new observer without the changes received
        before: it goes through the ring, which knows it is incomplete)."""
        while self.gate.closed or (self._open_txn is not None and self._open_txn.interest_grew):
            await self._txn_done.wait()

    def _transaction_over(self) -> None:
        self._txn_done.set()
        self._txn_done = trio.Event()

    def _register(self, entry: ObserverEntry) -> None:
        self._interest[entry.table] += 1
        self._routes.setdefault(entry.table, TableRoutes()).add(entry)
        entry.live = True
        shown = self._stream_shapes.get(entry.table)
        if shown is not None and _contradicts(entry, *shown):
            # The stream already showed another shape than its snapshot saw (a schema change
            # around the snapshot): resync it at the next commit.
            self._resync_due[entry] = "schema_change"

    def _drop(self, entry: ObserverEntry) -> None:
        if self._observers.get(entry.bound.key) is entry:
            del self._observers[entry.bound.key]
        if entry.live:
            entry.live = False
            routes = self._routes[entry.table]
            if len(routes.entries) == 1:  # the table's last observer: its index goes whole
                del self._routes[entry.table]
            else:
                routes.remove(entry)
            self._lose_interest(entry.table)
        entry.subscribers.clear()

    def _lose_interest(self, table: TableName) -> None:
        self._interest[table] -= 1
        if self._interest[table] <= 0:
            del self._interest[table]
            self._kept_whole_from.pop(table, None)

    # ---- the stream consumer -------------------------------------------------------------

    async def _consume(self, stream: ReplicationStream) -> None:
        txn: _OpenTransaction | None = None
        interest = self._interest
        chunk = self.config.max_transaction_buffer
        logged = self._row_changes.logs()
        changed_rows: dict[Dependency, Row | None] = {}  # row -> its last image (None: gone)
        truncated: set[TableName] = set()
        touched: set[TableName] = set()
        # partition -> the tables followed that it is part of
        partitions = self._streamed.partitions
        partitioned_as = partitions.ancestors
        async for event in stream:
            kind = type(event)
            if kind is Insert or kind is Update or kind is Delete or kind is Truncate:
                table = (event.schema, event.table)  # type: ignore[union-attr]
                # A partition's change is its tables' too: given again to each.
                also = partitioned_as.get(table)
                if kind is Truncate and partitions.leaves(table):
                    # (TRUNCATE ONLY of a table with inheritance children: theirs stay)
                    event = Truncate(event.xid, event.lsn, *table,  # type: ignore[union-attr]
                                     partition=table)
                leaf = event
                while True:
                    touched.add(table)
                    if logged and table in logged:
                        if kind is Truncate:
                            truncated.add(table)
                        else:
                            self._rows_changed(event, changed_rows)
                    if txn is not None and table in interest:
                        txn.changes.append(event)  # type: ignore[arg-type]
                        if len(txn.changes) >= chunk:
                            await self._apply_chunk(txn)
                    if not also:
                        break
                    table, also = also[0], also[1:]
                    event = as_change_of(leaf, table)  # type: ignore[arg-type]
            elif kind is Begin:
                changed_rows.clear()
                truncated.clear()
                touched.clear()
                txn = self._open_txn = _OpenTransaction(
                    event.xid, event.end_lsn, self.ring.pins_taken)  # type: ignore[union-attr]
                self._open_commit_time = event.timestamp  # type: ignore[union-attr]
            elif kind is Commit:
                if event.end_lsn <= self.last_commit_end_lsn:  # type: ignore[union-attr]
                    self.commits_out_of_order += 1
                    log.error("commit %s delivered again or out of order", event)
                self.last_commit_end_lsn = event.end_lsn  # type: ignore[union-attr]
                if self.hold is not None:
                    await self.hold.wait()
                if self._absent_checks:
                    await self._check_absent_columns()
                if self._partitions_due:
                    self._follow_partitions_due(touched)
                if self._resync_due and (txn is None or not txn.chunked):
                    await self._resync_due_observers()  # before this transaction: it may see it
                if txn is not None:
                    await self._commit(txn, event)  # type: ignore[arg-type]
                txn = self._open_txn = None
                # Its delivery number and what it changed, in one step (lookup guards).
                self._note_delivered(event.xid, touched)  # type: ignore[union-attr]
                for table in touched:
                    self._table_changed_at[table] = self._commits_seen
                touched.clear()
                due = None
                if changed_rows or truncated:
                    due = self._log_row_changes(changed_rows, truncated,
                                                event.xid)  # type: ignore[union-attr]
                if self._resync_due:
                    await self._resync_due_observers()  # after a chunked one: it sees it whole
                stream.acknowledge(event.end_lsn)  # type: ignore[union-attr]
                self._open_commit_time = None
                self.last_commit_time = event.timestamp  # type: ignore[union-attr]
                self.last_applied_at = time.time()
                if due:
                    self._run_row_watchers(due, event.xid)  # type: ignore[union-attr]
            elif kind is Message:
                if event.prefix == SYNC_PREFIX:  # type: ignore[union-attr]
                    if txn is not None and event.transactional:  # type: ignore[union-attr]
                        txn.marks.append(event.content)  # type: ignore[union-attr]
                    else:
                        self._reach_mark(event.content)  # type: ignore[union-attr]
            elif kind is TransactionRestart:
                changed_rows.clear()
                truncated.clear()
                touched.clear()
                if txn is not None and txn.chunked:
                    # Part of it reached observers (not clients): put them back on solid ground.
                    await self._with_gate_closed(self._resync(txn.touched,
                                                              "transaction_restart"))
                txn = self._open_txn = None
                self._open_commit_time = None
                self._transaction_over()
            elif kind is Relation:
                self._on_relation(event)  # type: ignore[arg-type]
                for table in partitioned_as.get(
                        (event.schema, event.table), ()):  # type: ignore[union-attr]
                    self._on_relation(as_relation_of(event, table))  # type: ignore[arg-type]
            elif kind is TimelineSwitch:
                log.warning("the server's history switched from timeline %d to %d (a "
                            "failover) after every commit delivered: nothing to resync",
                            event.previous, event.timeline)  # type: ignore[union-attr]
                await self._release_vanished_fences()
            elif kind is StreamGap:
                log.warning("replication stream gap (%s): resyncing every observer",
                            event.reason)  # type: ignore[union-attr]
                self._skip_pending = False
                self.ring.break_pins()
                # Catch-up marks not reached yet may be in the WAL the gap skipped: their
                # waiters go on now (their pins are broken: they take new snapshots).
                for reached in self._marks.values():
                    reached.set()
                forked: bool = event.forked  # type: ignore[union-attr]
                # (after a fork: the write fences waiting now are of commits that may be gone)
                lost = (self._forget_history(event.lsn)  # type: ignore[union-attr]
                        if forked else frozenset[int]())
                self._commits_seen += 1  # a number of its own: lookups running now are stale
                self._last_gap = self._commits_seen
                # Taken first, so every resync snapshot sees what it sees: the transactions
                # the stream skipped (committed before the gap's position) included.
                horizon = await self._gap_snapshot()
                self._resync_due.clear()  # every observer is resynced now
                reason = "history_fork" if forked else "stream_gap"
                await self._with_gate_closed(self._resync(set(self.observers()), reason))
                self._settle_fences(horizon, gone=lost)
                # Their rows may have changed in what was skipped.
                self._run_row_watchers(self._watchers_of(self._row_watchers), 0)

    # ---- schema changes and falling behind (invariant 5) ----------------------------------

    def _on_relation(self, relation: Relation) -> None:
        """The stream shows a table's shape (first change seen, or a schema change): the
        observers whose snapshot saw another shape are resynced before the next commit.

        No await here: the consumer is in the middle of a transaction."""
        table = (relation.schema, relation.table)
        txn = self._open_txn
        shown_by = None if txn is None else (txn.xid, txn.end_lsn)
        self._stream_shapes[table] = (relation, shown_by)
        routes = self._routes.get(table)
        if routes is None:
            return
        stale = {e for e in routes.entries if e.live and e not in self._resync_due
                 and _contradicts(e, relation, shown_by)}
        if relation.absent and any(e.live and e not in stale and e.shape
                                   and any(c in e.bound.columns for c in relation.absent)
                                   for e in routes.entries):
            # An UPDATE lacked columns observers know: unchanged TOASTed values, or dropped
            # columns? Rare (once per such set of columns): the catalog says, at the commit.
            self._absent_checks.append(relation)
        if stale:
            self._mark_reshaped(table, stale, f"shape ({describe_shape_change(relation)})")

    def _mark_reshaped(self, table: TableName, stale: Iterable[ObserverEntry], how: str
                       ) -> None:
        """Resync ``stale`` observers of ``table`` at the next commit: it changed ``how``
        (seen in the stream, or in the catalog)."""
        stale = set(stale)
        if stale:
            self.schema_changes += 1
            self._resync_due.update(dict.fromkeys(stale, "schema_change"))
            log.warning("table %s.%s changed %s: resyncing its %d observer(s)", *table, how,
                        len(stale))

    async def _check_absent_columns(self) -> None:
        """Columns an UPDATE lacked (see ``_on_relation``) that the catalog no longer has:
        dropped, so the observers publishing them resync (before the commit's changes)."""
        checks, self._absent_checks = self._absent_checks, []
        for relation in checks:
            table = (relation.schema, relation.table)
            try:
                existing = await self.database.run(table_columns, table)
            except Exception as exc:
                log.debug("cannot read the columns of %s.%s: %s", *table, exc)
                continue
            gone = {c for c in relation.absent if c not in existing}
            routes = self._routes.get(table)
            if gone and routes is not None:
                self._mark_reshaped(table, (
                    e for e in routes.entries if e.live and e not in self._resync_due
                    and any(c in e.bound.columns for c in gone)),
                    f"shape ({describe_shape_change(relation)})")

    async def _resync_due_observers(self) -> None:
        """Re-run the queries of observers whose rows changed unseen by the stream (their
        table changed shape, or partitions), from a fresh snapshot taken between two stream
        transactions (as any resync: later transactions it already sees are skipped, the
        others applied). A query that no longer runs stops its subscriptions with a ``nosub``
        error."""
        due, self._resync_due = self._resync_due, {}
        self.ring.break_pins()  # a snapshot being handed off may predate the change
        by_reason: dict[str, set[ObserverEntry]] = {}
        for entry, reason in due.items():
            by_reason.setdefault(reason, set()).add(entry)
        for reason, entries in by_reason.items():
            await self._with_gate_closed(self._resync(entries, reason))
        self._run_row_watchers(self._watchers_of_tables({e.table for e in due}), 0)

    async def _gap_snapshot(self) -> Snapshot | None:
        try:
            return await self.database.run(horizon_snapshot)
        except Exception as exc:
            log.error("could not take the stream gap's snapshot; write fences of skipped "
                      "transactions wait", exc_info=exc)
            return None

    def _forget_history(self, fork_lsn: int) -> set[int]:
        """After a fork of the server's history at ``fork_lsn``: the xids and positions
        delivered were of the history left behind, and new transactions may be given them
        again. Returns the xids write fences wait for now: committed before the fork was
        seen, so either in the gap's snapshot or gone."""
        self.last_commit_end_lsn = min(self.last_commit_end_lsn, fork_lsn)
        self._applied.clear()
        self._delivered = DeliveredXids(_DELIVERED_KEPT)
        self._row_changes.forget(self._commits_seen)
        self.ring.forget_xids()
        return set(self._xid_waiters)

    def _settle_fences(self, horizon: Snapshot | None, gone: AbstractSet[int] = frozenset()
                       ) -> None:
        """After a gap's resync (clients flushed): transactions ``horizon`` sees are in the
        observers now, delivered by the stream or not — their write fences may pass; so may
        those of ``gone``, commits a fork of the history took away (their clients were
        resynced to the history without them, or never had them)."""
        if horizon is not None:
            self._gap_horizon = horizon
        for xid in [x for x in self._xid_waiters
                    if x in gone or (horizon is not None and horizon.is_visible(x))]:
            self._xid_waiters.pop(xid).set()
            self.fences_settled_by_gap += 1

    async def _watch_catalog(self) -> None:
        """Read the catalog every ``catalog_check_interval``: the stream shows no DDL, yet
        a partition attached, created, detached or dropped changes a table's rows, and so
        may a column retyped (or given another type modifier) while nobody writes the table.
        What changed is followed from the next commit the consumer applies (a logical
        message makes one)."""
        while True:
            await trio.sleep(self.config.catalog_check_interval)
            try:
                changed = await self._poll_partitions()
                changed = await self._poll_shapes() or changed
            except Exception as exc:
                log.debug("cannot read the catalog: %s", exc)
                continue
            if changed:
                with contextlib.suppress(Exception):  # (else at the next commit)
                    await self._write_mark(secrets.token_hex(8))

    async def _poll_partitions(self) -> bool:
        """Whether the partitions of a partitioned table followed changed (since the last
        poll: they are followed at the next commit, :meth:`_follow_partitions_due`)."""
        partitions = self._streamed.partitions
        tables = partitions.roots()
        if not tables:
            return False
        trees, unstreamed = await self.database.run(read_partitions, tables)
        due = {table: (leaves, unstreamed.get(table)) for table, leaves in trees.items()
               if leaves != partitions.leaves(table)
               or (table in unstreamed and table in self._streamed)}
        for table in set(tables) - due.keys():
            # Changed back before it was followed (or gone: its observers stop for that).
            self._partitions_due.pop(table, None)
        new = {table: d for table, d in due.items()
               if self._partitions_due.get(table, (None, None))[:2] != d}
        if not new:
            return False
        added = [oid for table, (leaves, _) in new.items()
                 for _, _, oid in leaves - partitions.leaves(table)]
        # (read after the trees: under a snapshot that sees them)
        quiet = await self.database.run(quiet_partitions, added) if added else frozenset()
        self._partitions_due.update({table: (leaves, why, quiet)
                                     for table, (leaves, why) in new.items()})
        return True

    async def _poll_shapes(self) -> bool:
        """Whether observers' snapshots saw other columns than the catalog shows now: they
        are resynced at the next commit (the stream shows a retyped column only with the
        table's next change, and a type modifier never)."""
        tables = list(self._routes)
        if not tables:
            return False
        shapes = await self.database.run(table_shapes, tables)
        found = False
        for table in tables:
            routes = self._routes.get(table)
            if routes is None:
                continue
            current = shapes.get(table, {})
            verdicts: dict[tuple[int, tuple[str, ...]], str | None] = {}  # (shared shapes)
            stale: dict[ObserverEntry, str] = {}
            for entry in routes.entries:
                if not entry.live or entry in self._resync_due or entry.shape == current:
                    continue
                key = (id(entry.shape), entry.bound.columns)
                if key not in verdicts:
                    verdicts[key] = catalog_change(entry.shape, current, entry.bound.columns)
                if verdicts[key] is not None:
                    stale[entry] = verdicts[key]  # type: ignore[assignment]
            if stale:
                found = True
                self._mark_reshaped(table, stale, "in the catalog "
                                    f"({'; '.join(sorted(set(stale.values())))})")
        return found

    def _follow_partitions_due(self, touched: set[TableName]) -> None:
        """(At a commit, before it is applied; ``touched``: the tables it changed.) Follow
        the partitions polled: the observers of their tables are read again (or stop, if a
        partition's changes are never streamed), rows of theirs that lookups read are deemed
        changed, and snapshots being handed off are taken again (the ring kept changes under
        the old partitions) — unless partitions were only added, each quiet
        (:meth:`_quietly_added`): a monthly partition made ahead costs no resync."""
        due, self._partitions_due = self._partitions_due, {}
        partitions = self._streamed.partitions
        changed: dict[TableName, str | None] = {}
        for table, (leaves, unstreamed, quiet) in due.items():
            before = partitions.leaves(table)
            if not partitions.set_leaves(table, leaves) and unstreamed is None:
                continue  # changed back meanwhile
            if unstreamed is None and self._quietly_added(before, leaves, quiet, touched):
                self.partition_changes += 1
                self.partitions_added_quietly += 1
                log.info("partitions of %s.%s added, none with rows: followed", *table)
                continue
            changed[table] = unstreamed
        if not changed:
            return
        self._commits_seen += 1  # a number of its own: lookups running now are stale
        number = self._commits_seen
        unresynced: set[TableName] = set()  # (the others' lookups run at their resync)
        for table, unstreamed in changed.items():
            self.partition_changes += 1
            routes = self._routes.get(table)
            entries = [e for e in routes.entries if e.live] if routes is not None else []
            if unstreamed is not None:
                self._streamed.discard(table)  # new subscriptions are refused
                log.error("%s: %d observer(s) of %s.%s stop", unstreamed, len(entries), *table)
                for entry in entries:
                    self._fail(entry, messages.MeteorError.internal())
            else:
                log.info("the partitions of %s.%s changed: resyncing its %d observer(s)",
                         *table, len(entries))
                self._resync_due.update(dict.fromkeys(entries, "partitions_changed"))
            if unstreamed is not None or not entries:
                unresynced.add(table)
            if table in self._interest:
                self._keep_whole_from_next(table)
            self._table_changed_at[table] = number
            self._row_changes.restart(table, number)
        self._run_row_watchers(self._watchers_of_tables(unresynced), 0)
        self.ring.break_pins()

    def _quietly_added(self, before: Leaves, after: Leaves, quiet: frozenset[int],
                       touched: set[TableName]) -> bool:
        """Were partitions only added, each quiet: no row in it ever (when polled, after
        it became one), its name kept since it became one, and no change to it streamed
        under that name before now (this server's stream; ``touched``: the transaction
        being applied)? Then no snapshot read before now saw a row of it that a change no
        one gave to its table altered since, and every change to it from now on is given
        to its table: its observers hold what they should, as do the lookups."""
        if not before <= after:
            return False  # one left (or was renamed): its rows went with it
        changed_at = self._table_changed_at
        return all(oid in quiet and (schema, name) not in changed_at
                   and (schema, name) not in touched for schema, name, oid in after - before)

    async def _watch_behind(self, stream: ReplicationStream) -> None:
        """Skip the backlog when the applied position falls more than
        ``resync_behind_bytes`` behind the server's WAL (Meteor's oplog driver re-polls
        then too): the stream advances the slot and yields a ``StreamGap``."""
        while True:
            await trio.sleep(self.config.behind_check_interval)
            limit = self.config.resync_behind_bytes
            if not limit or self._skip_pending:
                continue
            try:
                current = await self.database.run(current_wal_lsn)
            except Exception as exc:
                log.debug("cannot read the WAL position: %s", exc)
                continue
            self.behind_bytes = max(current - stream.acknowledged_lsn, 0)
            if self.behind_bytes > limit:
                self.behind_skips += 1
                self._skip_pending = True
                log.warning("the change stream is %d bytes behind the database (limit "
                            "resync_behind_bytes = %d): skipping the backlog and resyncing "
                            "every observer", self.behind_bytes, limit)
                stream.skip_backlog()

    def watch_rows(self, dependencies: ReadRows, callback: RowWatcher, publication: str = ""
                   ) -> Callable[[], None]:
        """Call ``callback(xid)`` after each committed transaction (applied, clients flushed)
        that changed one of ``dependencies`` (``(schema, table, key)``, key: primary-key
        values) so that what was read of it (the values, or None: no such row) no longer
        holds, or truncated its table. Returns the function that stops watching.
        ``publication`` labels its calls in :attr:`row_watches_fired`."""
        deps = dict(dependencies)
        self._row_watch_publications[callback] = publication
        for dep, read in deps.items():
            self._row_watchers.setdefault(dep, {})[callback] = read
            self._row_changes.follow((dep[0], dep[1]), self._commits_seen)

        def unwatch() -> None:
            for dep in deps:
                watchers = self._row_watchers.get(dep)
                if watchers is not None:
                    watchers.pop(callback, None)
                    if not watchers:
                        del self._row_watchers[dep]
            deps.clear()
            self._row_watch_publications.pop(callback, None)
        return unwatch

    @property
    def read_retries(self) -> int:
        """Read-only runs PostgreSQL aborted over concurrency, run again (metrics)."""
        return self.database.transient_retries

    @property
    def commits_seen(self) -> int:
        """How many transactions the stream has delivered so far, plus one per stream gap
        (a position for guards)."""
        return self._commits_seen

    def lookup_stale(self, dependencies: Iterable[Dependency], delivered_before: int,
                     snapshot: Snapshot) -> int | None:
        """Could rows a lookup read (under ``snapshot``, started when ``delivered_before``
        transactions had been delivered) have changed without its watch seeing it? Yes when
        one of them was changed by a transaction the snapshot lacks: delivered since (the
        watch was not yet registered), or before it and not yet visible. The caller re-runs
        the lookup under a snapshot that sees the returned xid (0: any snapshot); None: no.

        (Not 0 for a transaction delivered before it and not yet visible, a commit waiting
        for a synchronous standby: a run under any snapshot would lack it again, and again.)

        Known row by row for tables whose changes are logged (:class:`RecentRowChanges`);
        otherwise (a table's first lookup, a log overrun) by table: any change to one of the
        tables since, or any delivered transaction the snapshot lacks."""
        if self._last_gap > delivered_before:
            return 0  # the stream skipped transactions meanwhile
        deps = set(dependencies)
        tables = {(schema, table) for schema, table, _ in deps}
        missed = self._delivered.first_missed(snapshot, delivered_before, prune=False,
                                              tables=tables)
        after = delivered_before if missed is None else missed[0] - 1
        log = self._row_changes
        if log.covers(tables, after):
            return log.unseen(deps, snapshot)
        for table in tables:  # from now on, row by row
            log.follow(table, self._commits_seen)
        if missed is not None:
            return missed[1]
        if self._tables_changed_since(tables, delivered_before):
            return 0
        return None

    def _tables_changed_since(self, tables: Iterable[TableName], delivered: int) -> bool:
        """Could a transaction delivered after the first ``delivered`` have changed one of
        ``tables``? (A stream gap since: yes, whatever it skipped is unknown.)"""
        if self._last_gap > delivered:
            return True
        changed_at = self._table_changed_at
        return any(changed_at.get(table, 0) > delivered for table in tables)

    def _rows_changed(self, event: Any, rows: dict[Dependency, Row | None]) -> None:
        """Note in ``rows`` each row a change touches, with its image after it (None: the
        row is gone from that key)."""
        pk = event.pk
        if not pk:
            return
        kind = type(event)
        schema, table = event.schema, event.table
        if kind is not Insert:  # the old key: gone, unless the new image has the same key
            old_key = _row_key(event.identity, pk)
            if old_key is not None:
                rows[(schema, table, old_key)] = None
        if kind is not Delete:
            new = event.new
            new_key = _row_key(new, pk)
            if new_key is not None:
                rows[(schema, table, new_key)] = new

    def _log_row_changes(self, rows: dict[Dependency, Row | None], truncated: set[TableName],
                         xid: int) -> set[RowWatcher]:
        """Log what the transaction just delivered changed in logged tables; returns the
        watchers it concerns (what their lookup read changed; every watcher of a truncated
        table's rows), and empties both collections."""
        watchers = self._row_watchers
        delivered = self._commits_seen
        self._row_changes.record(rows, delivered, xid)
        due: set[RowWatcher] = set()
        for row, image in rows.items():
            watching = watchers.get(row)
            if watching:
                due.update(callback for callback, read in watching.items()
                           if read_differs(read, image))
        for table in truncated:
            self._row_changes.restart(table, delivered)
        if truncated:
            due |= self._watchers_of_tables(truncated)
        rows.clear()
        truncated.clear()
        return due

    def _watchers_of_tables(self, tables: AbstractSet[TableName]) -> set[RowWatcher]:
        """The watchers of any row of ``tables``."""
        return self._watchers_of(d for d in self._row_watchers if (d[0], d[1]) in tables)

    def _watchers_of(self, rows: Iterable[Dependency]) -> set[RowWatcher]:
        due: set[RowWatcher] = set()
        for row in rows:
            due.update(self._row_watchers.get(row, ()))
        return due

    def _run_row_watchers(self, callbacks: set[RowWatcher], xid: int) -> None:
        fired, publications = self.row_watches_fired, self._row_watch_publications
        for callback in callbacks:
            fired[publications.get(callback, "")] += 1
            try:
                callback(xid)
            except Exception:
                log.exception("row watcher failed")

    async def wait_applied(self, xid: int, xid8: int | None = None) -> None:
        """Return once the transaction ``xid`` (32-bit, as ``txid_current() % 2^32``) has been
        applied and the clients it changed were flushed (or, busy, will flush before any
        ``after_flush`` action queued from now on) — the write fence's first half.

        The transaction must have committed (with changes: a read-only one has no xid).
        ``xid8``, its epoch-extended id: with it, a commit a failover took away before the
        stream delivered it is told apart (it will never come) and the wait ends.
        """
        xid &= 0xFFFFFFFF
        stream = self.stream
        if stream is not None and not stream.history_known:
            # What was delivered may be of a history the server has left (a failover to a
            # server that lacks commits delivered, and gives out their xids again): wait
            # until the stream is back and has told whether it forked.
            await stream.wait_history_known()
        if xid in self._applied:
            return
        horizon = self._gap_horizon
        if horizon is not None and horizon.is_visible(xid):
            return  # in the observers since the last gap's resync (maybe never streamed)
        event = self._xid_waiters.get(xid)
        if event is None:
            event = self._xid_waiters[xid] = trio.Event()
        if xid8 is not None:
            self._fence_xid8s[xid] = xid8
        try:
            await event.wait()
        finally:
            self._fence_xid8s.pop(xid, None)

    async def _release_vanished_fences(self) -> None:
        """After a ``TimelineSwitch``: write fences waiting for commits the new primary does
        not have (made on the old timeline after the switch, never delivered) end; those it
        has committed will come through the stream."""
        waiting = {xid: xid8 for xid, xid8 in self._fence_xid8s.items()
                   if xid in self._xid_waiters}
        if not waiting:
            return
        try:
            statuses = await self.database.run(transaction_statuses, list(waiting.values()))
        except Exception as exc:
            log.error("after a failover, could not ask the new primary about the commits "
                      "%d write fence(s) wait for; they wait on", len(waiting), exc_info=exc)
            return
        self._settle_fences(None, gone={xid for xid, status in zip(waiting, statuses, strict=True)
                                        if status == "aborted"})

    def _note_delivered(self, xid: int, tables: AbstractSet[TableName] = frozenset()
                        ) -> None:
        """Transaction ``xid``, which changed ``tables``, was delivered (and applied)."""
        waiter = self._xid_waiters.pop(xid, None)
        if waiter is not None:
            waiter.set()
        self._commits_seen += 1
        self._delivered.note(xid, self._commits_seen, tables)
        applied = self._applied
        if xid in applied:  # delivered again (after a reconnect): keep delivery order
            applied.move_to_end(xid)
        applied[xid] = self._commits_seen
        if len(applied) > _DELIVERED_KEPT:
            applied.popitem(last=False)  # the oldest

    def _queue_snapshot(self, bound: BoundCursor,
                        take: Callable[[Iterable[Values], Snapshot, int], Any],
                        must_see: int) -> SnapshotRead:
        """A read of ``bound``'s rows, queued: done (read with the others queued meanwhile,
        see :meth:`_snapshot_batches`, under a snapshot that sees the first ``must_see``
        transactions delivered) once its ``finished`` is set."""
        read = SnapshotRead(bound, take, must_see)
        self._snapshot_queue.send_nowait(read)
        return read

    async def _snapshot_batches(self, queue: trio.MemoryReceiveChannel[SnapshotRead]
                                ) -> None:
        """Reads queued snapshots, all those waiting (up to a batch) in one transaction."""
        with contextlib.suppress(trio.EndOfChannel):
            while True:
                # No local here keeps a batch between reads: its results are their waiters'
                # once read (held until the next batch, a dropped observer's rows stayed in
                # memory, to be freed on that batch's critical path).
                await self._read_batch(await next_batch(queue, _SNAPSHOT_BATCH_MAX))

    async def _read_batch(self, batch: list[SnapshotRead]) -> None:
        try:
            await self._read_snapshots(batch)
        finally:
            for read in batch:
                read.finished.set()
        storm_promotion.built(len(batch))

    async def _read_now(self, reads: list[SnapshotRead], seeing: int = 0) -> None:
        """Read these in batches, as many at once as the queue's readers, without queueing
        (the consumer waits for them: a stream gap resyncs every observer while clients wait,
        and must not wait behind a reconnect storm's queue too). ``seeing``: see
        :meth:`_read_snapshots`."""
        limiter = trio.CapacityLimiter(self._snapshot_readers)

        async def read_batch(batch: list[SnapshotRead]) -> None:
            async with limiter:
                await self._read_snapshots(batch, seeing)
        async with trio.open_nursery() as nursery:
            for start in range(0, len(reads), _SNAPSHOT_BATCH_MAX):
                nursery.start_soon(read_batch, reads[start:start + _SNAPSHOT_BATCH_MAX])

    async def _read_snapshots(self, reads: list[SnapshotRead], seeing: int = 0) -> None:
        """Each read's rows under one snapshot that sees the delivered transactions each read
        must see (``SnapshotRead.must_see``) and ``seeing`` (0: none; the transaction being
        applied, delivered whole but not yet noted) — retaken, after a moment, while one is
        decoded but not yet visible; a read that fails gets its error.

        What a retake must see stays where it was: with commits streaming in that each wait
        a moment to become visible (a synchronous standby's round trip), "everything
        delivered so far" would never be seen by any snapshot while the writers go on."""
        wait = _InvisibleWait()
        together = True  # reads of the same columns of a table in one statement
        while True:
            pending = [read for read in reads if read.error is None]
            if not pending:
                return
            delivered_before = self._commits_seen
            in_flight = self._snapshots_in_flight
            in_flight[delivered_before] += 1
            started = time.monotonic()
            self.snapshot_transactions += 1
            try:
                snapshot, lsn = await self.database.run(snapshot_reads, pending, together,
                                                        snapshot=True)
            except ReadsInterrupted as interrupted:
                # The failed read has its error; the others in a new transaction. (If the
                # failure was in a combined statement, no read has it yet: one by one.)
                together = together and not interrupted.together
                continue
            except Exception as exc:  # the connection, say: no read is done
                for read in pending:
                    read.error = exc
                return
            finally:
                in_flight[delivered_before] -= 1
                if not in_flight[delivered_before]:
                    del in_flight[delivered_before]
            if snapshot is None:
                continue  # every read failed: nothing is left to read
            self.snapshot_queries += len(pending)
            if self.metrics is not None:
                elapsed = time.monotonic() - started
                for read in pending:
                    if read.error is None:
                        self.metrics.snapshot_finished(elapsed, len(read.result))
            must_see = max(delivered_before if read.must_see is None else read.must_see
                           for read in pending)
            oldest = min(in_flight, default=delivered_before)
            if self._delivered.first_missed(snapshot, must_see, oldest >= delivered_before,
                                            {read.bound.table for read in pending}) is None and (
                    not seeing or snapshot.is_visible(seeing)):
                for read in pending:
                    read.snapshot, read.lsn = snapshot, lsn
                return
            self.invisible_delivered_retries += 1
            await wait.pause(
                "%d snapshot read(s) have waited %.0f s for a transaction the stream "
                "delivered to become visible (its commit waits for a synchronous standby?): "
                "the subscriptions and resyncs they are for wait with them",
                len(pending), _INVISIBLE_WARN_AFTER)

    def _reach_mark(self, token: str) -> None:
        event = self._marks.get(token)
        if event is not None:
            event.set()

    async def _with_gate_closed(self, work: Awaitable[set[LiveClient]]) -> None:
        self.gate.closed = True
        touched: set[LiveClient] = set()
        try:
            touched = await work
        finally:
            self._open_gate(touched)

    def _open_gate(self, touched: set[LiveClient]) -> None:
        gate = self.gate
        gate.closed = False
        if gate.held:  # after a resync: they wait until _release_hold (not per commit)
            gate.deferred |= touched
            gate.deferred |= self._held_clients
        else:
            self._flush_due |= touched
            self._flush_due |= gate.deferred
            self._flush_due |= self._held_clients
            gate.deferred = set()
            if self._flusher_running:
                self._flush_wake.set()
            else:
                self._flush_clients()
        self._held_clients = set()
        self._transaction_over()

    def _flush_clients(self) -> None:
        clients, self._flush_due = self._flush_due, set()
        self.flush_rounds += 1
        cache = EncodeCache()  # one diff and encoding per change, whatever the client count
        with gc_paused():  # a round allocates per client; nothing in it outlives the round
            for client in clients:
                client.request_flush(cache)

    async def _flusher(self) -> None:
        """Flush the clients applied commits changed, once the consumer waits for the stream.

        At a low rate that is right after each commit; when transactions arrive faster than
        they are written out, the consumer applies every commit already received first (for
        at most ``flush_coalesce_delay``, or four times as long as the last round of writes took,
        up to ``flush_coalesce_delay_max``: the stream hands it over in batches), and
        each client gets one write for all of them (coalesced by its merge box) instead of one
        per commit: a server that falls behind catches up instead of drowning in writes.
        (Flushing between transactions only: a commit the consumer is still applying keeps
        the gate closed, and clients then wait for it.)
        """
        self._flusher_running = True
        last_round = 0.0  # seconds the last round of client writes took
        try:
            while True:
                await self._flush_wake.wait()
                self._flush_wake = trio.Event()
                stream = self.stream
                if stream is not None and stream.has_buffered:
                    # Behind: let the consumer apply what it already received first (bounded).
                    config = self.config
                    wait = min(max(config.flush_coalesce_delay, _WAIT_PER_WRITE_TIME * last_round),
                               config.flush_coalesce_delay_max)
                    deadline = trio.current_time() + wait
                    while stream.has_buffered and trio.current_time() < deadline:
                        await trio.sleep(0.001)
                started = time.perf_counter()
                self._flush_clients()
                last_round = time.perf_counter() - started
        finally:
            self._flusher_running = False  # _open_gate flushes by itself from now on

    async def _apply_chunk(self, txn: _OpenTransaction) -> None:
        # Too big to hold: apply now, keep the gate closed (clients see it at the commit).
        if self._resync_due and not txn.chunked:
            await self._resync_due_observers()  # before any of it is applied
        self.gate.closed = True
        changes, txn.changes = txn.changes, []
        partial = txn.partial  # (read before this chunk marks it chunked)
        txn.chunked = True
        self._held_clients |= await self._apply(txn.xid, txn.end_lsn, changes, txn.touched,
                                                partial)

    async def _commit(self, txn: _OpenTransaction, commit: Commit) -> None:
        if not txn.changes and not txn.chunked and not txn.interest_grew:
            for token in txn.marks:
                self._reach_mark(token)
            return
        self.gate.closed = True
        touched: set[LiveClient] = set()
        try:
            touched = await self._apply(txn.xid, txn.end_lsn, txn.changes, txn.touched,
                                        txn.partial)
            if self.metrics is not None and commit.timestamp is not None:
                _stamp_commit(touched, _epoch(commit.timestamp))
            if txn.chunked:
                self.ring.break_pins()  # the ring never held it whole
            else:
                self.ring.delivered(CommittedTransaction(
                    txn.xid, commit.end_lsn, tuple(txn.changes),
                    txn.pins_before_begin if txn.interest_grew else None,
                    self._commits_seen + 1))  # (noted as delivered right after this)
            self.transactions_applied += 1
        finally:
            self._open_gate(touched)
        for token in txn.marks:
            self._reach_mark(token)

    async def _apply(self, xid: int, end_lsn: int, changes: Sequence[RowChange | Truncate],
                     touched_entries: set[ObserverEntry], partial: bool = False
                     ) -> set[LiveClient]:
        """Apply changes of transaction ``xid`` to the observers they concern; returns the
        clients whose boxes changed. ``partial``: see :attr:`_OpenTransaction.partial`."""
        clients: set[LiveClient] = set()
        wanted: dict[ObserverEntry, bool] = {}
        failed: set[ObserverEntry] = set()  # and those read again below (skipped alike)
        requery: set[ObserverEntry] = set()  # limited ones
        partly_truncated: set[ObserverEntry] = set()  # a partition of their table
        if self.change_counts is not None:  # metrics: one C-speed count per transaction
            self.change_counts.update(map(_TABLE_AND_KIND, changes))
        routes_by_table = self._routes

        def wants(entry: ObserverEntry) -> bool:
            decision = wanted.get(entry)
            if decision is None:
                observer = entry.observer
                assert observer is not None
                decision = wanted[entry] = observer.wants_transaction(xid, end_lsn)
                if decision:
                    observer.begin_transaction(xid, end_lsn)
                else:
                    self.skipped_by_snapshot += 1
            return decision

        for change in changes:
            routes = routes_by_table.get((change.schema, change.table))
            if routes is None:
                continue  # a table only pinned, not (yet) observed
            if type(change) is Truncate:
                for entry in list(routes.entries):
                    if not entry.live or entry in failed or not wants(entry):
                        continue
                    touched_entries.add(entry)
                    if change.partition is not None:  # type: ignore[union-attr]
                        partly_truncated.add(entry)  # read again: the rest stays
                        failed.add(entry)
                        continue
                    # Empty at this point of commit order; the snapshot still decides
                    # about later transactions.
                    observer = entry.observer
                    assert observer is not None
                    self._deliver(entry, self._reload(
                        entry, routes, (), observer.snapshot, observer.snapshot_lsn),
                        clients)
                continue
            self.changes_applied += 1
            for entry in routes.candidates(change):  # type: ignore[arg-type]
                if not entry.live or entry in failed or not wants(entry):
                    continue
                touched_entries.add(entry)
                observer = entry.observer
                assert observer is not None
                try:
                    result = observer.apply(change)  # type: ignore[arg-type]
                    if isinstance(result, NeedsRow):
                        result = await self._fetch_into(  # type: ignore[arg-type]
                            observer, change, result, xid, None if partial else changes)
                        if not entry.live:
                            continue  # dropped while fetching
                except Exception as exc:
                    log.error("observer of %s.%s failed on a change; resyncing it",
                              change.schema, change.table, exc_info=exc)
                    failed.add(entry)
                    continue
                routes.follow_keys(entry, observer.keys)
                if observer.limited:
                    for key in observer.evicted:
                        routes.follow_keys(entry, (key, None))
                    if observer.needs_requery:
                        requery.add(entry)
                        failed.add(entry)
                if result:
                    self._deliver(entry, result, clients)
        if failed:
            # From a snapshot that sees this transaction: it is not applied to them again.
            failed -= requery | partly_truncated
            if failed:
                clients |= await self._resync(failed, seeing=xid)
            if requery:
                clients |= await self._resync(requery, "limit_requery", seeing=xid)
            if partly_truncated:
                clients |= await self._resync(partly_truncated, "partition_truncate",
                                              seeing=xid)
        return clients

    async def _fetch_into(self, observer: Observer, change: Update, needs: NeedsRow,
                          xid: int, changes: Sequence[RowChange | Truncate] | None
                          ) -> list[DocOp]:
        """Complete a row moving in without its unchanged TOASTed columns: fetch it by key
        under a snapshot that has seen ``xid``; that snapshot then shields the row.

        Values an earlier change of the transaction set (``changes``, all of it; None: not
        all known) need no fetch. Its commit may be delivered before it is visible (it waits
        for a synchronous standby). A snapshot without it then has the row as it was just
        before it, so the values left out since are that version's: no wait, provided the
        row's earlier changes in the transaction can be followed (:func:`_left_out_earlier`).
        Otherwise it waits for the transaction to become visible."""
        replaced = needs.replaces if needs.replaces is not None else needs.key
        earlier = None
        if changes is not None and set(change.pk) == set(observer.key_columns):
            earlier = _left_out_earlier(change, changes, needs.missing)
        if earlier is not None and not earlier[1]:
            # Every value it left out was set by an earlier change of its transaction.
            return observer.apply_fetched(replaced, {**earlier[0], **change.new})
        query = row_query(observer.bound)
        wait = _InvisibleWait()
        while True:
            row, snapshot, lsn = await self.database.run(
                fetch_row, query, needs.key, observer.columns, snapshot=True)
            if snapshot.is_visible(xid):
                break
            if earlier is not None and row is not None:
                self.rows_fetched += 1
                return observer.apply_fetched(replaced, {**row, **earlier[0], **change.new})
            # The commit is decoded but not yet visible to new snapshots: a moment's wait.
            await wait.pause(
                "applying the stream waits: a row of %s.%s moved into a subscription without "
                "its unchanged TOASTed values, and the transaction that moved it is still not "
                "visible after %.0f s (its commit waits for a synchronous standby?)",
                observer.schema, observer.table, _INVISIBLE_WARN_AFTER)
        self.rows_fetched += 1
        ops = observer.apply_fetched(replaced, row)
        observer.note_fetched(needs.key, snapshot, lsn)
        return ops

    def _reload(self, entry: ObserverEntry, routes: TableRoutes, rows: Iterable[Row | Values],
                snapshot: Snapshot | None = None, lsn: int | None = None) -> list[DocOp]:
        observer = entry.observer
        assert observer is not None
        routes.release_keys(entry)
        ops = observer.load(rows)
        routes.hold_keys(entry)
        observer.snapshot, observer.snapshot_lsn = snapshot, lsn
        return ops

    async def _resync(self, entries: set[ObserverEntry], reason: str = "observer_error",
                      seeing: int = 0) -> set[LiveClient]:
        """Re-run the queries; only the difference reaches clients (the gate is closed).

        ``reason`` (a short fixed word: stream_gap, transaction_restart, observer_error, ...)
        labels ``cdcddp_resyncs_total``. ``seeing``: a transaction the snapshot must see
        (the one being applied, when observers failed on it)."""
        clients: set[LiveClient] = set()
        reloaded = False
        reads = {entry: SnapshotRead(entry.bound, row_list) for entry in entries
                 if entry.live}
        await self._read_now(list(reads.values()), seeing)
        for entry, read in reads.items():
            self.resyncs += 1
            self.resync_reasons[reason] += 1
            if read.error is not None:
                exc = read.error
                error: BaseException = exc
                if reason == "schema_change" and isinstance(exc, psycopg.Error):
                    # Its query can no longer run on the table's new shape (a published or
                    # filtered column dropped, renamed or retyped): one clear warning, and
                    # the subscriptions stop with an error saying why.
                    primary = exc.diag.message_primary or str(exc).splitlines()[0]
                    text = (f"table {entry.table[0]}.{entry.table[1]} changed (schema "
                            f"change) and the publication's query can no longer run: "
                            f"{primary}")
                    log.warning("%s; stopping its %d subscription(s)", text,
                                len(entry.subscribers))
                    error = messages.MeteorError("schema-changed", text)
                else:
                    _log_read_failure(f"resync of {entry.table[0]}.{entry.table[1]} failed; "
                                      "its subscriptions stop", exc)
                self._fail(entry, error)
                continue
            if not entry.live:
                continue
            assert read.snapshot is not None
            entry.shape = read.shape
            ops = self._reload(entry, self._routes[entry.table], read.result, read.snapshot,
                               read.lsn)
            self._deliver(entry, ops, clients)
            reloaded = True
        if reloaded:
            self._hold_until_caught_up()
        return clients

    def _hold_until_caught_up(self) -> None:
        """Flush no client until the stream has delivered every commit a resync snapshot just
        taken sees (a catch-up mark written after it, as for a new observer; see
        :meth:`_catch_up`), or for ``catch_up_timeout`` at most. The resync runs inside the
        consumer, so it cannot wait for that itself: until then the resynced observers are
        ahead of the others, and a client that moves from one to another (an unsubscription,
        a row moving between filters) would see a value go back."""
        if self._nursery is None:
            return
        mark = self._resync_mark = self._request_catch_up()
        self.gate.held = True
        self._nursery.start_soon(self._release_hold, mark)

    async def _release_hold(self, mark: _CatchUpMark) -> None:
        await mark.settled.wait()
        if not mark.reached.is_set():
            self.hold_timeouts += 1
        if self._resync_mark is not mark:
            return  # a later resync holds on, until its own mark
        self._resync_mark = None
        self.gate.held = False
        if not self.gate.closed:  # else the transaction being applied opens it at its commit
            self._open_gate(set())

    def _fail(self, entry: ObserverEntry, error: BaseException) -> None:
        """Stop the observer and every subscription using it (their connections send
        ``nosub`` with ``error``, client-safe when it is a ``MeteorError``)."""
        subscribers = list(entry.subscribers.values())
        for client, sub in subscribers:
            self.remove_subscriber(entry, client, sub)
        self._drop(entry)
        for client, sub in subscribers:
            notify = client.on_subscription_failed
            if notify is not None:
                try:
                    notify(sub, error)
                except Exception:
                    log.exception("stopping a subscription failed")
            client.request_flush()

    def _deliver(self, entry: ObserverEntry, ops: Sequence[DocOp],
                 clients: set[LiveClient]) -> None:
        if not ops:
            return
        if len(ops) * len(entry.subscribers) < _GC_PAUSE_ENTRIES:  # one row's change, mostly
            self._deliver_to_boxes(entry, ops, clients)
            return
        with gc_paused():  # per-client dirty entries, by the thousand (see cdcddp.gcpause)
            self._deliver_to_boxes(entry, ops, clients)

    def _deliver_to_boxes(self, entry: ObserverEntry, ops: Sequence[DocOp],
                          clients: set[LiveClient]) -> None:
        for client, sub in entry.subscribers.values():
            box = client.box
            try:
                for op in ops:
                    kind = op.kind
                    if kind == "added":
                        box.add(sub, op.collection, op.doc_id, op.fields)  # type: ignore[arg-type]
                    elif kind == "changed":
                        box.change(sub, op.collection, op.doc_id, op.fields,  # type: ignore[arg-type]
                                   op.cleared, fields_after=op.after)
                    else:
                        box.remove(sub, op.collection, op.doc_id)
            except MergeBoxError:
                # Observer and box disagree: a bug. The client reconnects and resyncs.
                log.exception("merge box rejected an observer's change")
                client.fail("merge box out of sync")
            clients.add(client)
