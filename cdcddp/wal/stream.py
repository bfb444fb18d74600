"""The replication stream: a wal2json logical slot read over ``psycopg.pq``, driven by trio.

    async with open_stream(dsn, slot="cdcddp") as stream:
        async for event in stream:
            apply(event)
            if isinstance(event, Commit):
                stream.acknowledge(event.end_lsn)

Events arrive in commit order, one transaction at a time, never held whole (a bounded channel
of small batches sits between the reader and the consumer). The flush position confirmed to
the server only covers acknowledged commits and idle keepalives (``protocol.AckTracker``).

Delivery contract across reconnects (the connection is re-established with backoff):

* a transaction whose ``Commit`` was delivered is never delivered again, acknowledged or not;
* a transaction cut by the drop after its ``Begin`` was delivered is announced by
  ``TransactionRestart(xid)``: discard what was received of it, it comes again whole;
* if the slot had to be (re)created after streaming started — a temporary slot after a
  reconnect, a dropped slot, or ``start_lsn`` behind the slot — ``StreamGap`` says changes
  may be missing: resync. So does a slot found past what was delivered (advanced by someone
  else), and a server whose history forked from the one the stream read (a failover to a
  standby that lacked commits already delivered: they are gone); the stream then restarts
  where the histories part, so no commit of the new history is skipped.
  :meth:`ReplicationStream.skip_backlog` skips on purpose (the slot
  is advanced to the server's current WAL position) and says so with a ``StreamGap`` too;
* a server whose history switched timeline after everything delivered (a failover with
  nothing delivered lost) is announced by ``TimelineSwitch``: commits of the old timeline the
  stream had not delivered yet may be gone;
* with ``report_relations``, a ``Relation`` precedes the first change of each table after
  (re)connecting and any change whose columns differ from the table's last known shape (a
  schema change).

Fatal problems (slot invalidated, wrong plugin, bad option, authentication) end the iteration
with ``StreamError``; connection problems after the first connect are retried for ever.
Non-transactional ``Message`` events are at-most-once: they are not part of a commit and are not
acknowledged.
"""

from __future__ import annotations

import logging
import random
import select
import struct
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdcddp.wal import slot as slots
from cdcddp.wal.decode import SESSION_SETTINGS, WAL2JSON_OPTIONS, DecodeError, Decoder
from cdcddp.wal.events import (
    Begin,
    Commit,
    Message,
    StreamEvent,
    StreamGap,
    TimelineSwitch,
    TransactionRestart,
)
from cdcddp.wal.lsn import SERVER_LSN_SQL, format_lsn, parse_lsn
from cdcddp.wal.pgtypes import TYPE_CATALOG_SQL, SharedCatalog, TypeCatalog
from cdcddp.wal.protocol import (
    XLOGDATA_PAYLOAD_OFFSET,
    AckTracker,
    Keepalive,
    ProtocolError,
    build_status_update,
    parse_copy_data,
)

log = logging.getLogger("cdcddp.wal.stream")

_DATA_START = struct.Struct("!Q")
_BATCH_MAX = 512  # events per channel item: amortises channel overhead, bounds memory
_DROPPED_CHANGE_MARK = "no tuple identifier"  # wal2json WARNING for UPDATE/DELETE without key

# SQLSTATEs that mean "try again shortly" when met during (re)connection.
_TRANSIENT_SQLSTATES = {
    "55006",  # object_in_use: the slot is still held by the walsender we just lost
    "57P01", "57P02", "57P03",  # admin shutdown / crash shutdown / cannot connect now
    "08000", "08003", "08006", "08001", "08004",  # connection exceptions
    "53300",  # too many connections
}


class StreamError(Exception):
    """The stream cannot continue; the message says what to fix."""


class ServerError(StreamError):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ConnectionLost(Exception):
    """The replication connection ended; the stream reconnects."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ConnectionLost | psycopg.OperationalError | OSError | trio.TooSlowError
                  | slots.SlotBusy):  # busy: the walsender we just lost has not noticed yet
        return True
    return isinstance(exc, ServerError) and exc.sqlstate in _TRANSIENT_SQLSTATES


class Backoff:
    """Exponential backoff with jitter (half to full of the current step)."""

    def __init__(self, initial: float = 0.1, maximum: float = 10.0, factor: float = 2.0) -> None:
        self.initial, self.maximum, self.factor = initial, maximum, factor
        self._step = initial

    def next_delay(self) -> float:
        delay = random.uniform(self._step / 2, self._step)
        self._step = min(self._step * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._step = self.initial


def _options_value(settings: Mapping[str, str]) -> str:
    # libpq's "options" splits on spaces; a backslash escapes one inside a value.
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace(" ", "\\ ")

    return " ".join(f"-c {esc(k)}={esc(v)}" for k, v in settings.items())


def replication_conninfo(dsn: str, application_name: str,
                         session_settings: Mapping[str, str]) -> str:
    """The user's DSN turned into a logical replication connection with pinned GUCs."""
    params = conninfo_to_dict(dsn)
    options = _options_value(session_settings)
    if params.get("options"):
        options = f"{params['options']} {options}"  # ours last: they must win
    params.update(replication="database", options=options)
    params.setdefault("application_name", application_name)
    params.setdefault("connect_timeout", "10")
    params.setdefault("keepalives_idle", "30")
    return make_conninfo("", **params)


def _repl_literal(value: str) -> str:
    # The replication command grammar knows only '...' strings (no E'...'), which is what
    # escape_literal produces unless the value holds a backslash.
    return "'" + value.replace("'", "''") + "'"


def start_replication_command(ident: str, start_lsn: int, options: Mapping[str, str]) -> str:
    opts = ", ".join(f'"{k}" {_repl_literal(v)}' for k, v in options.items())
    return f"START_REPLICATION SLOT {ident} LOGICAL {format_lsn(start_lsn)}" + (
        f" ({opts})" if opts else "")


def _bytea_text(value: str) -> str:
    """A bytea column's text form (hex, ``\\x...``) as the text it holds."""
    if value.startswith("\\x"):
        return bytes.fromhex(value[2:]).decode(errors="replace")
    return value


def tables_option(tables: list[str]) -> str:
    """wal2json ``add-tables`` value for ``schema.table`` names (``table`` means public)."""
    def esc(part: str) -> str:
        for ch in "\\ ',.*":
            part = part.replace(ch, "\\" + ch)
        return part

    out = []
    for name in tables:
        schema, dot, table = name.partition(".")
        if not dot:
            schema, table = "public", name
        out.append(f"{esc(schema)}.{esc(table)}")
    return ",".join(out)


class ReplicationStream:
    """One logical slot streamed to one consumer. Build it with ``open_stream``."""

    def __init__(self, dsn: str, slot: str, *, create_slot: bool = True,
                 temporary: bool = False, start_lsn: int | None = None,
                 wal2json_options: Mapping[str, str] | None = None,
                 session_settings: Mapping[str, str] | None = None,
                 application_name: str = "cdcddp", status_interval: float = 10.0,
                 buffer_batches: int = 16, connect_timeout: float = 15.0,
                 busy_grace: float = 5.0, recreate_invalidated: bool = False,
                 decoder_factory: Callable[[], Decoder] = Decoder,
                 report_relations: bool = False,
                 type_catalog: SharedCatalog | None = None,
                 log_standby_snapshot: Callable[[], Awaitable[object]] | None = None,
                 failover: bool = False, receive_timeout: float = 60.0) -> None:
        self.slot = slot
        self.create_slot = create_slot
        self.temporary = temporary
        self.failover = failover  # a failover slot (PostgreSQL 17+): standbys keep a copy
        self.start_lsn = start_lsn
        self.wal2json_options = {**WAL2JSON_OPTIONS, **(wal2json_options or {})}
        self.status_interval = status_interval
        # A server silent this long, even when asked to answer, is taken for gone (as
        # PostgreSQL's wal_receiver_timeout does): a primary lost without closing its
        # connections (its machine, a partition) is otherwise noticed only by TCP keepalives,
        # minutes later. 0: never.
        self.receive_timeout = receive_timeout
        self.connect_timeout = connect_timeout
        self.busy_grace = busy_grace
        self.recreate_invalidated = recreate_invalidated
        self._conninfo = replication_conninfo(
            dsn, application_name, {**SESSION_SETTINGS, **(session_settings or {})})
        self._decoder_factory = decoder_factory
        # Creating a slot on a standby waits for the primary to log its running transactions
        # (by itself every 15 s, when it is not idle): this asks the primary to log them now.
        self.log_standby_snapshot = log_standby_snapshot
        self.in_recovery = False  # the server is a standby (as of the last connect)
        # Domains and arrays of user types decode only with the catalog: loaded at each
        # connect, reloaded when a change names a type it lacks; shared with SQL readers.
        self.types = type_catalog if type_catalog is not None else SharedCatalog()
        params = conninfo_to_dict(self._conninfo)
        params.pop("replication", None)  # reloads run on a plain connection, mid-stream
        self._sql_conninfo = make_conninfo("", **params)
        self._unresolvable: set[int] = set()  # type oids no reload found (dropped since)
        self.type_reloads = 0
        self.report_relations = report_relations  # yield Relation events (table shapes)

        # Counters and positions, read by metrics and tests.
        self.reconnects = 0
        self.decode_errors = 0
        self.dropped_change_warnings = 0  # wal2json "no tuple identifier" WARNINGs
        self.last_dropped_change_warning: str | None = None
        self.status_updates_sent = 0
        self.events_delivered = 0
        self.connected = False
        self.systemid: str | None = None
        self.timeline: int | None = None
        # The server's timeline and role when the last session started streaming: what the
        # stream read is of that history (a reconnect attempt that fails does not change it).
        self._streamed_timeline: int | None = None
        self._streamed_on_standby = False
        self.backend_pid: int | None = None
        self.wal_sender_timeout: float | None = None  # seconds; 0 = disabled
        self.last_error: str | None = None

        self._tracker = AckTracker()
        self._send, self._receive = trio.open_memory_channel[list[StreamEvent]](buffer_batches)
        self._pending: deque[StreamEvent] = deque()
        self._reader_full = False  # see has_buffered
        # The replication socket while the reader runs, registered for has_buffered's check
        # (poll, not select: a server with thousands of clients has descriptors past 1024).
        self._reader_poll: select.poll | None = None
        self._failure: BaseException | None = None
        self._closing = False
        self._session_scope: trio.CancelScope | None = None
        self._pause_scope: trio.CancelScope | None = None
        self._run_scope: trio.CancelScope | None = None
        self._stopped = trio.Event()
        self._status_wakeup = trio.Event()
        self._ever_streamed = False
        self._open_xid: int | None = None  # delivered Begin without its Commit
        self._skip_xid: int | None = None  # replayed transaction already delivered: skip it
        self._last_message_lsn = 0  # dedupe non-transactional messages after a reconnect
        self._skip_requested = False  # skip_backlog(): reconnect past what is not received
        self._skip_old_pid: int | None = None  # the walsender to stop first
        # The open transaction as of the last batch the consumer got (a batch being sent
        # when skip_backlog() cancels the session is dropped).
        self._sent_open_xid: int | None = None
        self._control: list[StreamEvent] = []  # restart/gap events for the next session
        # The stream restarted before commits already sent to the consumer (another history,
        # or a new slot): acknowledgements are ignored until the consumer has taken what was
        # sent before, i.e. until it receives the next session's control batch.
        self._ack_barrier = False
        self._barrier_batch: list[StreamEvent] | None = None
        # Each session opens with one batch (its control events, maybe none); see
        # history_known. The opening batch sent and not yet received; received and not yet
        # all handled.
        self._opening_batch: list[StreamEvent] | None = None
        self._opening_pending = False
        self._history_event = trio.Event()  # set while history_known
        self._heard_at = 0.0  # trio time the session last had bytes from the server
        self.backlog_skips = 0
        self.skipped_bytes = 0

    # -- consumer API ----------------------------------------------------------------------
    @property
    def received_lsn(self) -> int:
        """Write position: highest LSN received from the server."""
        return self._tracker.received_lsn

    @property
    def acknowledged_lsn(self) -> int:
        """Flush position confirmed (or to be confirmed) to the server."""
        return self._tracker.acknowledged_lsn

    @property
    def pending(self) -> bool:
        """Whether a transaction was received (or is arriving) that the consumer has not
        acknowledged yet (readiness: the consumer is behind what it was sent)."""
        return self._tracker.pending

    def acknowledge(self, end_lsn: int) -> None:
        """The consumer is done with the transaction whose ``Commit.end_lsn`` this is."""
        if not self._ack_barrier:  # (else a commit from before the stream restarted earlier)
            self._tracker.acknowledge(end_lsn)

    def skip_backlog(self) -> None:
        """Stop reading the backlog: reconnect with the slot advanced to the server's current
        WAL position (``pg_replication_slot_advance``, which releases the WAL). Events already
        received are still delivered, then a ``StreamGap`` says the transactions committed
        in between were skipped: the consumer must resync."""
        if self._closing or self._skip_requested:
            return
        self._skip_requested = True
        for scope in (self._session_scope, self._pause_scope):
            if scope is not None:
                scope.cancel()

    def request_status(self) -> None:
        """Send a status update now instead of at the next interval."""
        self._status_wakeup.set()

    def __aiter__(self) -> ReplicationStream:
        return self

    @property
    def history_known(self) -> bool:
        """Connected, and the consumer has handled the events that open the session (among
        them a ``StreamGap`` telling that the server's history forked from the one streamed
        before): what it was delivered can be trusted to be of the server's history. Until
        then a server reached after a failover may give out again the xids of commits it
        never had."""
        return self.connected and self._history_event.is_set()

    async def wait_history_known(self) -> None:
        while not self.history_known:
            await self._history_event.wait()

    def _history_unknown(self) -> None:
        if self._history_event.is_set():
            self._history_event = trio.Event()

    @property
    def has_buffered(self) -> bool:
        """Events already received that the consumer has not taken yet, or more waiting to
        be read (the reader's last batch was cut by size, not by an empty socket, or the
        socket holds bytes the reader has not read yet): the consumer is behind."""
        if (self._reader_full or self._pending
                or self._receive.statistics().current_buffer_used > 0):
            return True
        # The reader shares the consumer's thread: between two of its batches the channel is
        # empty although the server has sent more. A zero-timeout poll tells.
        return self._socket_readable()

    def _socket_readable(self) -> bool:
        """The reader's socket holds bytes it has not read yet."""
        poller = self._reader_poll
        if poller is None:
            return False
        try:
            return any(events & select.POLLIN for _, events in poller.poll(0))
        except OSError:  # closed under us: the reader reconnects
            return False

    async def __anext__(self) -> StreamEvent:
        while not self._pending:
            if self._opening_pending:  # the consumer is back from the session's opening
                self._opening_pending = False
                self._history_event.set()
            try:
                batch = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                if self._failure is not None:
                    raise self._failure from None
                raise StopAsyncIteration from None
            if batch is self._barrier_batch:
                self._ack_barrier, self._barrier_batch = False, None
            if batch is self._opening_batch:
                self._opening_batch = None
                self._opening_pending = True
            self._pending.extend(batch)
        return self._pending.popleft()

    # -- connection ------------------------------------------------------------------------
    async def _connect(self, conninfo: str | None = None) -> pq.PGconn:
        conn = pq.PGconn.connect_start((conninfo or self._conninfo).encode())
        try:
            with trio.fail_after(self.connect_timeout):
                poll = pq.PollingStatus.WRITING
                while poll != pq.PollingStatus.OK:
                    if conn.status == pq.ConnStatus.BAD or poll == pq.PollingStatus.FAILED:
                        raise psycopg.OperationalError(
                            conn.get_error_message().strip() or "connection failed")
                    sock = conn.socket  # may change between attempts/hosts
                    if poll == pq.PollingStatus.READING:
                        await trio.lowlevel.wait_readable(sock)
                    else:
                        await trio.lowlevel.wait_writable(sock)
                    poll = conn.connect_poll()
        except BaseException:
            conn.finish()
            raise
        conn.nonblocking = 1
        conn.notice_handler = self._on_notice
        return conn

    def _on_notice(self, res: pq.PGresult) -> None:
        text = (res.error_message or b"").decode(errors="replace").strip()
        if _DROPPED_CHANGE_MARK in text:
            self.dropped_change_warnings += 1
            self.last_dropped_change_warning = text
            log.warning("change dropped by wal2json (table without primary key or replica "
                        "identity; fix with ALTER TABLE ... REPLICA IDENTITY): %s", text)
        else:
            log.info("server notice: %s", text)

    async def _flush(self, conn: pq.PGconn) -> None:
        while conn.flush() == 1:
            await trio.lowlevel.wait_writable(conn.socket)

    async def _execute(self, conn: pq.PGconn, sql: str) -> list[tuple[str | None, ...]]:
        """Run a simple-protocol command; rows as text. Returns [] for COPY_BOTH."""
        conn.send_query(sql.encode())
        await self._flush(conn)
        rows: list[tuple[str | None, ...]] = []
        error: pq.PGresult | None = None
        while True:
            while conn.is_busy():
                await trio.lowlevel.wait_readable(conn.socket)
                conn.consume_input()
            res = conn.get_result()
            if res is None:
                break
            if res.status == pq.ExecStatus.COPY_BOTH:
                return rows
            if res.status == pq.ExecStatus.TUPLES_OK:
                for r in range(res.ntuples):
                    values = (res.get_value(r, c) for c in range(res.nfields))
                    rows.append(tuple(None if v is None else bytes(v).decode() for v in values))
            elif res.status != pq.ExecStatus.COMMAND_OK and error is None:
                error = res
        if error is not None:
            sqlstate = error.error_field(pq.DiagnosticField.SQLSTATE)
            message = (error.error_message or b"").decode(errors="replace").strip()
            if slots.PLUGIN_REFUSED_MARK in message:  # a configuration to fix: say how
                raise StreamError(slots.plugin_refused_advice())
            raise ServerError(message, sqlstate.decode() if sqlstate else None)
        return rows

    async def _prepare(self, conn: pq.PGconn) -> None:
        """IDENTIFY_SYSTEM, check or create the slot, START_REPLICATION. A gap found on the way
        is put with the events the next session delivers first (``_add_gap``)."""
        systemid, timeline, _xlogpos, dbname = (await self._execute(conn, "IDENTIFY_SYSTEM"))[0]
        if self.systemid is not None and systemid != self.systemid:
            raise StreamError(f"the server is now a different cluster (system id {systemid}, "
                              f"was {self.systemid}): resync from a fresh slot.")
        if dbname is None:
            raise StreamError("the replication connection has no database: put dbname in --dsn.")
        read_timeline, read_on_standby = self._streamed_timeline, self._streamed_on_standby
        self.systemid, self.timeline = systemid, int(timeline or 0)
        pid, sender_timeout, in_recovery, version = (await self._execute(
            conn, "SELECT pg_backend_pid()::text, setting, pg_is_in_recovery()::text, "
                  "current_setting('server_version_num') "
                  "FROM pg_settings WHERE name = 'wal_sender_timeout'"))[0]
        self.backend_pid = int(pid or 0)
        self.in_recovery = in_recovery == "true"
        self.wal_sender_timeout = int(sender_timeout or 0) / 1000
        if self.failover:
            why = slots.failover_unsupported(int(version or 0))
            if why is not None:
                raise StreamError(f"{why}: turn failover_slot off.")
        # A primary's history is the only one a stream on it can have read; a standby's may
        # switch timeline under a running stream (its promotion), so no fork is told there.
        forked_at: int | None = None  # the history this server has parts from the one read
        fork_reason = ""
        if (self._ever_streamed and read_timeline not in (None, self.timeline)
                and not read_on_standby):
            assert read_timeline is not None
            forked_at, fork_reason = await self._history_fork(conn, read_timeline)
            if not fork_reason:  # (a fork's gap tells the consumer more)
                self._control[:] = [e for e in self._control if type(e) is not TimelineSwitch]
                self._control.append(TimelineSwitch(self.slot, self.timeline, read_timeline))

        escaping = pq.Escaping(conn)
        literal = escaping.escape_literal(self.slot.encode()).decode()
        ident = escaping.escape_identifier(self.slot.encode()).decode()
        skipping = self._skip_requested and self._ever_streamed
        if skipping and self._skip_old_pid:
            await self._stop_old_walsender(conn, literal, self._skip_old_pid)
        rows = await self._execute(conn, slots.status_sql(literal))
        status = slots.parse_status_row(rows[0]) if rows else None
        behind_from = max(self._tracker.acknowledged_lsn, self._tracker.last_commit_lsn)
        if status is not None and status.invalidated and self.recreate_invalidated:
            log.warning("slot %s is invalidated: dropping and recreating it", self.slot)
            await self._execute(conn, f"DROP_REPLICATION_SLOT {ident} WAIT")
            status = None
        if status is None:
            if not self.create_slot:
                raise slots.SlotMissing(
                    f"replication slot {self.slot!r} does not exist: create it "
                    f"(cdcddp slot create --slot {self.slot}) or allow --create.")
            (_name, point, _snap, _plugin), = await self._create_slot(
                conn, slots.create_command(ident, self.temporary, self.failover))
            consistent = parse_lsn(point or "0/0")
            log.info("created %s%s slot %s at %s",
                     "temporary" if self.temporary else "persistent",
                     " failover" if self.failover else "", self.slot, point)
            if self._ever_streamed or self.start_lsn is not None:
                reason = "replication slot was created anew"
                if skipping:  # a temporary slot went with the walsender we stopped
                    reason = (f"skipped {max(consistent - behind_from, 0)} bytes of WAL the "
                              "consumer was behind (temporary slot created anew)")
                    self._skipped(consistent - behind_from)
                self._add_gap(consistent, fork_reason or reason, forked=bool(fork_reason))
                # Nothing before it can come; a greater start would skip commits of another
                # history (after a failover) the snapshots of the resync may not have seen.
                self._restart_at(consistent)
            confirmed = consistent
        else:
            slots.verify(status, dbname, own_pid=self.backend_pid, on_standby=self.in_recovery)
            confirmed = status.confirmed_flush_lsn or 0
            if self.failover and not status.failover:
                await self._execute(conn, slots.make_failover_command(ident))
                log.info("slot %s is now a failover slot", self.slot)
            if forked_at is not None:
                # From where the histories part (the slot cannot go back further).
                self._restart_at(max(forked_at, confirmed))
                if fork_reason:
                    self._add_gap(max(forked_at, confirmed), fork_reason, forked=True)
            if skipping:
                (end,), = await self._execute(
                    conn, f"SELECT end_lsn::text FROM pg_replication_slot_advance("
                          f"{literal}, {SERVER_LSN_SQL})")
                target = parse_lsn(end or "0/0")
                if target > behind_from:
                    # Nothing before `target` may come again: start there.
                    self._restart_at(target)
                    confirmed = target
                skipped = max(target - behind_from, 0)
                self._skipped(skipped)
                self._add_gap(target, f"skipped {skipped} bytes of WAL the consumer was "
                                      "behind")
        self._skip_requested = False
        self._skip_old_pid = None

        if not self._ever_streamed:
            start = self.start_lsn or 0
            if self.start_lsn is not None and self.start_lsn < confirmed:
                self._add_gap(confirmed, "slot is already past the requested start position")
            self._tracker = AckTracker(max(start, confirmed))
        elif confirmed > max(self._tracker.acknowledged_lsn, self._tracker.last_commit_lsn):
            # The server would start there: what lies between was never delivered.
            self._add_gap(confirmed, "slot is past what the stream delivered (advanced by "
                                     "another consumer)")
            self._restart_at(confirmed)
        # Plain SQL is fine on the replication session before START_REPLICATION.
        self.types.merge(TypeCatalog.from_rows(await self._execute(conn, TYPE_CATALOG_SQL)))
        # Transactions up to the last delivered commit must not come again (acknowledged or not).
        start_at = max(self._tracker.acknowledged_lsn, self._tracker.last_commit_lsn)
        conn.notice_handler = self._on_notice  # wal2json WARNINGs only arrive as notices
        await self._execute(conn, start_replication_command(
            ident, start_at, self.wal2json_options))

    def _add_gap(self, lsn: int, reason: str, forked: bool = False) -> None:
        """Deliver a ``StreamGap`` first in the next session: kept until then, so a connection
        attempt that fails after finding it does not lose it; one gap at a time (a later one
        moves it on; a fork stays a fork)."""
        for i, event in enumerate(self._control):
            if isinstance(event, StreamGap):
                told = event.reason if event.forked and not forked else reason  # a fork's
                self._control[i] = StreamGap(self.slot, lsn, told, forked=event.forked or forked)
                return
        self._control.append(StreamGap(self.slot, lsn, reason, forked=forked))

    async def _history_fork(self, conn: pq.PGconn, read_timeline: int) -> tuple[int | None, str]:
        """After a timeline change: (where this server's history left ``read_timeline``, the
        one the stream read: None if the stream need not restart earlier, 0 if unknown (from
        the slot's position); a gap's reason when commits were delivered that this history
        lacks, else "")."""
        switch: int | None = None
        if self.timeline > read_timeline:  # timeline 1 has no history file
            try:
                (_name, content), = await self._execute(
                    conn, f"TIMELINE_HISTORY {int(self.timeline)}")
            except ServerError as exc:  # (the file is kept in pg_wal; this is not expected)
                return 0, (f"the server is on timeline {self.timeline} now, and its history "
                           f"could not be read ({exc}): what the stream read on timeline "
                           f"{read_timeline} may be gone")
            switch = slots.parse_timeline_history(_bytea_text(content or "")).get(read_timeline)
        tracker = self._tracker
        if switch is None:
            return 0, (f"the server's history (timeline {self.timeline}) does not continue "
                       f"timeline {read_timeline}, which the stream read")
        if max(tracker.acknowledged_lsn, tracker.last_commit_lsn) <= switch:
            return None, ""
        if tracker.last_commit_lsn <= switch:
            return switch, ""  # only positions past the switch were seen, not commits
        return switch, (f"the server's history (timeline {self.timeline}) left timeline "
                        f"{read_timeline} at {format_lsn(switch)}, before commits the stream "
                        f"delivered (up to {format_lsn(tracker.last_commit_lsn)}): they are "
                        "gone")

    def _restart_at(self, lsn: int) -> None:
        """Stream from ``lsn`` on: acknowledge nothing past it, skip no commit after it."""
        tracker = self._tracker
        if lsn == max(tracker.acknowledged_lsn, tracker.last_commit_lsn):
            return
        if lsn < tracker.last_commit_lsn:
            self._ack_barrier = True  # acknowledgements to come are of the other history
        self._tracker = AckTracker(lsn)
        self._last_message_lsn = min(self._last_message_lsn, lsn)

    async def _create_slot(self, conn: pq.PGconn, command: str) -> list[tuple[str | None, ...]]:
        nudge = self.log_standby_snapshot
        if not self.in_recovery or nudge is None:
            return await self._execute(conn, command)
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._nudge_primary, nudge)
            try:
                rows = await self._execute(conn, command)
            except BaseException as exc:  # raised unwrapped below: callers tell transient
                failure = exc             # errors (a killed walsender) by their type
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return rows

    async def _nudge_primary(self, nudge: Callable[[], Awaitable[object]]) -> None:
        # Again and again: a record logged before the slot began waiting does not count.
        while True:
            try:
                await nudge()
            except Exception as exc:
                log.warning("slot %s: the primary did not log its running transactions (%s); "
                            "creating the slot on the standby waits until it does by itself "
                            "(every 15 s)", self.slot, str(exc).strip())
                return
            await trio.sleep(0.2)

    def _drop_connection(self, conn: pq.PGconn, open_xid: int | None) -> None:
        """Forget a replication connection; a transaction the consumer got part of
        (``open_xid``) is announced as restarted at the start of the next session."""
        self.connected = False
        self._history_unknown()
        self._close_conn(conn)
        self._tracker.on_reconnect()
        if open_xid is not None:
            self._control.append(TransactionRestart(open_xid))
        self._open_xid = self._sent_open_xid = None
        self._skip_xid = None

    def _skipped(self, nbytes: int) -> None:
        self.backlog_skips += 1
        self.skipped_bytes += max(nbytes, 0)
        log.info("skipped %d bytes of WAL the consumer was behind; the consumer resyncs",
                 nbytes)

    async def _stop_old_walsender(self, conn: pq.PGconn, literal: str, pid: int) -> None:
        """Stop our previous walsender (it may still be decoding the backlog) and wait until
        it let go of the slot (a temporary slot goes with it)."""
        sql = (f"SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
               f"WHERE slot_name = {literal} AND active_pid = {int(pid)}")
        await self._execute(conn, sql)
        with trio.move_on_after(self.busy_grace):
            while True:
                rows = await self._execute(conn, slots.status_sql(literal))
                status = slots.parse_status_row(rows[0]) if rows else None
                if status is None or status.active_pid != pid:
                    return
                await trio.sleep(0.02)

    # -- streaming -------------------------------------------------------------------------
    async def _read(self, conn: pq.PGconn) -> None:
        tracker = self._tracker
        decoder = self._decoder_factory()
        decoder.track_shapes = self.report_relations
        decoder.set_catalog(self.types.catalog)
        decode = decoder.decode
        unresolved = decoder.unresolved_oids  # cleared in place, never replaced
        relations = decoder.relations  # shapes to deliver before the change that showed them
        send = self._send.send
        unpack_start = _DATA_START.unpack_from
        sock = conn.socket
        batch: list[StreamEvent] = []
        polled = False  # the socket was read since the last complete message
        ended = False  # the batch holds a commit
        self._reader_full = False
        self._reader_poll = select.poll()
        self._reader_poll.register(sock, select.POLLIN)
        # The session's opening: the reconnect's control events (maybe none), delivered first
        # while status updates go on.
        control = self._opening_batch = list(self._control)
        if self._ack_barrier:
            self._barrier_batch = control
        await send(control)
        del self._control[:len(control)]
        try:
            while True:
                n, buf = conn.get_copy_data(1)
                if n > 0:
                    polled = False
                    if buf[0] == 0x77:  # 'w': the hot path, parsed inline
                        data_start = unpack_start(buf, 1)[0]
                        tracker.on_data(data_start)
                        try:
                            # bytes, not a view: the decoder searches the text for numerics
                            payload = bytes(buf[XLOGDATA_PAYLOAD_OFFSET:])
                            event = decode(payload, data_start)
                            if unresolved:  # a type the catalog lacks: created since loaded
                                event = await self._decode_with_new_types(decoder, payload,
                                                                          event)
                        except DecodeError as exc:
                            # Skipping would lose a change; the same LSN fails again after a
                            # restart, so stop with a clear message.
                            self.decode_errors += 1
                            raise StreamError(f"cannot decode the change at LSN "
                                              f"{format_lsn(data_start)}: {exc}") from exc
                        if relations:
                            batch.extend(relations)
                            relations.clear()
                        kind = type(event)
                        if (kind is not Begin and kind is not Commit and kind is not Message
                                and self._skip_xid is None):
                            batch.append(event)  # a row change: the hot path needs no checks
                            self.events_delivered += 1
                        elif self._accept(event):
                            batch.append(event)
                            if kind is Commit:
                                ended = True
                            if len(batch) >= _BATCH_MAX:
                                open_xid = self._open_xid
                                self._reader_full = True
                                await send(batch)
                                self._sent_open_xid = open_xid
                                batch, ended = [], False
                    else:
                        try:
                            msg = parse_copy_data(buf)
                        except ProtocolError as exc:
                            raise StreamError(f"replication protocol error: {exc}") from exc
                        if not isinstance(msg, Keepalive):
                            raise StreamError(f"unexpected message {type(msg).__name__}")
                        tracker.on_keepalive(msg.wal_end)
                        if msg.reply_requested:
                            self._status_wakeup.set()
                elif n == 0:
                    if ended and not polled and len(batch) < _BATCH_MAX:
                        # A backlog of transactions: read what already waits in the socket
                        # now, without a task switch, so it reaches the consumer in full
                        # batches (libpq reads one buffer, a few dozen changes, at a time).
                        # One big transaction still goes out piece by piece.
                        polled = True
                        conn.consume_input()
                        continue
                    polled = ended = self._reader_full = False
                    if batch:
                        open_xid = self._open_xid
                        await send(batch)
                        self._sent_open_xid = open_xid
                        batch = []
                    # Wake up now and then so a dead peer without RST is still noticed by
                    # the status task's writes.
                    with trio.move_on_after(self.status_interval) as idle:
                        await trio.lowlevel.wait_readable(sock)
                    if not idle.cancelled_caught:
                        self._heard_at = trio.current_time()
                    conn.consume_input()
                else:
                    raise ConnectionLost(self._copy_end_reason(conn))
        except (psycopg.OperationalError, ConnectionLost):
            if batch:  # what was received is valid: deliver it before reconnecting
                await send(batch)
                self._sent_open_xid = self._open_xid
            raise
        finally:
            self._reader_poll = None

    async def _decode_with_new_types(self, decoder: Decoder, payload: bytes,
                                     event: StreamEvent) -> StreamEvent:
        """The payload decoded with a type catalog that resolves its type oids: the shared
        catalog if another reader reloaded it already, else a fresh load. A type no reload
        finds (dropped since the change) keeps decoding as text: it never stops the stream."""
        missing = decoder.unresolved_oids - self._unresolvable
        if not missing:  # known to be unresolvable: text it is
            decoder.unresolved_oids.clear()
            return event
        if not self.types.resolves(missing):
            try:
                rows = await self._load_types()
            except (psycopg.OperationalError, OSError, trio.TooSlowError, ServerError) as exc:
                # Delivering the text would be a wrong value: reconnect instead (the new
                # session loads the catalog, and this change comes again).
                raise ConnectionLost(f"cannot reload the type catalog: {exc}") from exc
            self.types.merge(TypeCatalog.from_rows(rows))
            self.type_reloads += 1
        decoder.set_catalog(self.types.catalog)
        event = decoder.decode(payload)  # again: the shape it queued, if any, stays queued
        if decoder.unresolved_oids:
            self._unresolvable |= decoder.unresolved_oids
            log.warning("type oids %s are not in the catalog (dropped since?): their values "
                        "decode as text", sorted(decoder.unresolved_oids))
            decoder.unresolved_oids.clear()
        return event

    async def _load_types(self) -> list[tuple[str | None, ...]]:
        """``TYPE_CATALOG_SQL`` rows, read on a short-lived plain connection (the replication
        one is streaming)."""
        conn = await self._connect(self._sql_conninfo)
        try:
            with trio.fail_after(self.connect_timeout):
                return await self._execute(conn, TYPE_CATALOG_SQL)
        finally:
            self._close_conn(conn)

    def _accept(self, event: StreamEvent) -> bool:
        """Track transaction boundaries; drop what was already delivered before a reconnect."""
        kind = type(event)
        if kind is Begin:
            assert isinstance(event, Begin)
            self._tracker.on_begin()
            if event.end_lsn <= self._tracker.last_commit_lsn:
                self._skip_xid = event.xid
                return False
            self._open_xid = event.xid
        elif kind is Commit:
            assert isinstance(event, Commit)
            self._tracker.on_commit(event.end_lsn)
            if self._skip_xid is not None:
                self._skip_xid = None
                return False
            self._open_xid = None
        elif self._skip_xid is not None and getattr(event, "xid", None) == self._skip_xid:
            return False
        elif kind is Message and getattr(event, "xid", 0) is None:
            lsn = event.lsn
            if lsn <= self._last_message_lsn:
                return False
            self._last_message_lsn = lsn
        self.events_delivered += 1
        return True

    def _copy_end_reason(self, conn: pq.PGconn) -> str:
        reasons = []
        while (res := conn.get_result()) is not None:
            if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.COPY_OUT,
                                  pq.ExecStatus.COPY_BOTH):
                reasons.append((res.error_message or b"").decode(errors="replace").strip())
            if conn.is_busy():
                break
        return "; ".join(r for r in reasons if r) or "the server ended the replication stream"

    async def _send_status(self, conn: pq.PGconn, reply_requested: bool = False) -> None:
        t = self._tracker
        msg = build_status_update(t.received_lsn, t.acknowledged_lsn, t.acknowledged_lsn,
                                  reply_requested=reply_requested)
        while conn.put_copy_data(msg) == 0:
            await trio.lowlevel.wait_writable(conn.socket)
        await self._flush(conn)
        self.status_updates_sent += 1

    def _status_period(self) -> float:
        period = self.status_interval
        if self.wal_sender_timeout:
            period = min(period, self.wal_sender_timeout / 3)
        return max(period, 0.05)

    async def _status_loop(self, conn: pq.PGconn) -> None:
        # Independent of the reader: it runs while the reader is blocked on a slow consumer,
        # so wal_sender_timeout never fires because of back-pressure.
        self._heard_at = trio.current_time()
        while True:
            await self._send_status(conn, reply_requested=self._silent_for() > 0.5)
            period = self._status_period()
            if self.receive_timeout:
                period = min(period, self.receive_timeout / 4)
            with trio.move_on_after(period):
                await self._status_wakeup.wait()
            self._status_wakeup = trio.Event()
            if self._silent_for() >= 1:
                raise ConnectionLost(f"the server sent nothing for {self.receive_timeout:g} s, "
                                     "even when asked to answer (receive_timeout)")

    def _silent_for(self) -> float:
        """How long the server has been silent, as a fraction of ``receive_timeout`` (0 when
        disabled). Bytes waiting unread (the reader held up by a slow consumer) count as
        heard."""
        if not self.receive_timeout:
            return 0.0
        if self._socket_readable():
            self._heard_at = trio.current_time()
        return (trio.current_time() - self._heard_at) / self.receive_timeout

    async def _session(self, conn: pq.PGconn) -> None:
        """Reader + status sender until the connection fails or the stream closes."""
        failure: list[BaseException] = []

        async def guarded(fn: Callable[[pq.PGconn], Any]) -> None:
            try:
                await fn(conn)
            except Exception as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()

        with trio.CancelScope() as self._session_scope:
            if self._closing:
                self._session_scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(guarded, self._read)
                nursery.start_soon(guarded, self._status_loop)
        self._session_scope = None
        if failure:
            raise failure[0]

    async def _stop_copy(self, conn: pq.PGconn) -> None:
        """Clean stop: final status with the acknowledged LSN, CopyDone, drain."""
        with trio.move_on_after(3) as scope:
            scope.shield = True
            try:
                await self._send_status(conn)
                while conn.put_copy_end() == 0:
                    await trio.lowlevel.wait_writable(conn.socket)
                await self._flush(conn)
                while True:
                    n, _ = conn.get_copy_data(1)
                    if n == -1:
                        break
                    if n == 0:
                        await trio.lowlevel.wait_readable(conn.socket)
                        conn.consume_input()
                while conn.get_result() is not None:
                    if conn.is_busy():
                        await trio.lowlevel.wait_readable(conn.socket)
                        conn.consume_input()
            except (psycopg.OperationalError, OSError) as exc:
                log.debug("error during clean stop: %s", exc)

    def _close_conn(self, conn: pq.PGconn) -> None:
        try:
            trio.lowlevel.notify_closing(conn.socket)
        except (psycopg.OperationalError, OSError):
            pass
        conn.finish()

    async def _first_connect(self) -> pq.PGconn:
        """Connect once; errors go straight to the caller, except a busy slot for a while."""
        backoff = Backoff()
        deadline = trio.current_time() + self.busy_grace
        while True:
            conn = await self._connect()
            try:
                await self._prepare(conn)
            except BaseException as exc:
                self._close_conn(conn)
                busy = isinstance(exc, slots.SlotBusy) or (
                    isinstance(exc, ServerError) and exc.sqlstate == "55006")
                if busy and trio.current_time() < deadline:
                    await trio.sleep(backoff.next_delay())
                    continue
                raise
            self._mark_streaming()
            return conn

    def _mark_streaming(self) -> None:
        self._history_unknown()  # until the consumer has handled the session's opening
        self._streamed_timeline, self._streamed_on_standby = self.timeline, self.in_recovery
        self.connected = True
        self._ever_streamed = True

    async def _pause(self, seconds: float) -> None:
        with trio.CancelScope() as self._pause_scope:
            if self._closing:
                self._pause_scope.cancel()
            await trio.sleep(seconds)
        self._pause_scope = None

    async def _run(self, conn: pq.PGconn | None) -> None:
        """Supervisor: stream, reconnect on failure, stop cleanly on close.

        Shielded: when the consumer is cancelled, ``aclose`` still gets to send the final status
        update and CopyDone; ``aclose`` cancels ``_run_scope`` only if that takes too long.
        """
        backoff = Backoff()
        with trio.CancelScope(shield=True) as self._run_scope:
            try:
                while not self._closing:
                    if conn is None:
                        try:
                            conn = await self._connect()
                            await self._prepare(conn)
                        except Exception as exc:
                            if conn is not None:
                                self._close_conn(conn)
                                conn = None
                            if not _is_transient(exc):
                                raise
                            self.last_error = str(exc).strip()
                            log.info("reconnect failed (%s); retrying", self.last_error)
                            await self._pause(backoff.next_delay())
                            continue
                        self.reconnects += 1
                        self._mark_streaming()
                        backoff.reset()
                    try:
                        await self._session(conn)
                        if self._skip_requested and not self._closing:
                            # skip_backlog(): drop this connection (and what it still had to
                            # send, and a batch the consumer did not take: all before the
                            # skip position); _prepare stops the old walsender and advances
                            # the slot. Nothing here waits for the consumer.
                            log.info("skipping the backlog: reconnecting past it")
                            self._skip_old_pid = self.backend_pid
                            self._drop_connection(conn, self._sent_open_xid)
                            conn = None
                            continue
                    except Exception as exc:
                        if not _is_transient(exc):
                            raise
                        self.last_error = str(exc).strip()
                        log.warning("replication connection lost (%s); reconnecting",
                                    self.last_error)
                        self._drop_connection(conn, self._open_xid)
                        conn = None
                        await self._pause(backoff.next_delay())
                if conn is not None:
                    await self._stop_copy(conn)
            except Exception as exc:
                self._failure = exc
            finally:
                self.connected = False
                self._history_unknown()
                if conn is not None:
                    self._close_conn(conn)
                self._send.close()
                self._stopped.set()

    async def aclose(self) -> None:
        """Stop streaming: final status update with the acknowledged LSN, CopyDone."""
        self._closing = True
        for scope in (self._session_scope, self._pause_scope):
            if scope is not None:
                scope.cancel()
        with trio.move_on_after(5) as waiting:
            waiting.shield = True
            await self._stopped.wait()
        if self._run_scope is not None:
            self._run_scope.cancel()


@asynccontextmanager
async def open_stream(dsn: str, slot: str, **kwargs: Any) -> AsyncIterator[ReplicationStream]:
    """Connect, check/create the slot, start streaming; see ``ReplicationStream`` for options.

    Raises ``StreamError``/``SlotError``/``psycopg.OperationalError`` if the first connection
    fails; later connection failures are retried in the background.
    """
    stream = ReplicationStream(dsn, slot, **kwargs)
    conn = await stream._first_connect()
    body_error: BaseException | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream._run, conn)
        try:
            yield stream
        except BaseException as exc:  # re-raised below, unwrapped by the nursery
            body_error = exc
        finally:
            await stream.aclose()
    if body_error is not None:
        raise body_error
