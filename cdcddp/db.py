"""Ordinary (non-replication) database access from trio.

psycopg's async API is asyncio-only, so queries run on plain psycopg connections in worker
threads: ``await db.run(fn, *args)`` calls ``fn(conn, *args)`` in a thread with a connection
from a small pool, inside a transaction that commits when ``fn`` returns and rolls back when it
raises. The replication stream does not use this (it drives libpq directly, see
``cdcddp.wal.stream``).

Values read here must equal what the stream decodes for the same stored value (an observer's
snapshot is compared with later changes). So the pool's connections use the stream's session
settings and, for every type where psycopg's own text loader gives something else (infinity
and BC dates, ``24:00:00``, out-of-range intervals, network types, ranges, arrays of user
types...), a loader that calls the decoder's converter (``cdcddp.wal.pgtypes``). Types where
psycopg already agrees keep its fast C loaders. User types come from a ``SharedCatalog``,
shared with the stream and reloaded when a query meets a type it does not know.
"""

from __future__ import annotations

import functools
import logging
import re
import select
import threading
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, Final, Self, TypeVar

import psycopg
import trio
from psycopg.abc import Buffer, Query
from psycopg.adapt import AdaptersMap, Loader
from psycopg.pq import Format
from psycopg.rows import TupleRow

from cdcddp.wal.decode import SESSION_SETTINGS, libpq_options
from cdcddp.wal.pgtypes import (
    FIRST_USER_OID,
    TYPE_CATALOG_SQL,
    SharedCatalog,
    TextConverter,
    TypeCatalog,
    text_converter,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# The decoding session's settings: the same value text on both sides, whatever the server's
# defaults (IntervalStyle too: intervals are parsed by pgtypes here, not by psycopg).
SESSION_OPTIONS: Final = libpq_options(SESSION_SETTINGS)

# Built-in types whose psycopg text loader does not give the decoder's value (checked value
# by value in tests/test_sql_values.py), scalars then arrays:
# - date/time types: psycopg raises on infinity, BC, years > 9999, 24:00:00 (a whole
#   snapshot fails), intervals beyond timedelta (raises, or overflows silently);
# - inet/cidr (psycopg: ipaddress objects), ranges and multiranges (psycopg: Range objects):
#   the decoder keeps their text;
# - int2vector/oidvector/xid/cid/xid8: psycopg keeps the text, the decoder makes ints.
SQL_LOADERS_DIFFER: Final = frozenset({
    1082, 1083, 1114, 1184, 1186, 1266,  # date, time, timestamp, timestamptz, interval, timetz
    650, 869,  # cidr, inet
    3904, 3906, 3908, 3910, 3912, 3926,  # int4/num/ts/tstz/date/int8 ranges
    4451, 4532, 4533, 4534, 4535, 4536,  # their multiranges
    22, 28, 29, 30, 5069,  # int2vector, xid, cid, oidvector, xid8
    1182, 1183, 1115, 1185, 1187, 1270,  # arrays of the date/time types
    651, 1041,  # cidr[], inet[]
    3905, 3907, 3909, 3911, 3913, 3927,  # range arrays
    6150, 6151, 6152, 6153, 6155, 6157,  # multirange arrays
    1006, 1011, 1012, 1013, 271,  # int2vector[], xid[], cid[], oidvector[], xid8[]
})

# Types psycopg has a text loader for; any other array the catalog resolves (arrays of user
# types, and built-in ones psycopg does not know) is loaded as the decoder does.
_PSYCOPG_TEXT_LOADED: Final = frozenset(
    oid for oid in range(FIRST_USER_OID)
    if psycopg.adapters.get_loader(oid, Format.TEXT) is not None)


class ConvertingLoader(Loader):
    """Loads a value's text with a ``pgtypes`` text converter (None: keep the text)."""

    converter: ClassVar[tuple[TextConverter | None]] = (None,)  # a tuple: not a method

    def __init__(self, oid: int, context: Any = None) -> None:
        super().__init__(oid, context)
        self._convert = self.converter[0]
        conn = self.connection
        self._encoding = conn.info.encoding if conn is not None else "utf-8"

    def load(self, data: Buffer) -> Any:
        text = str(data, self._encoding)
        return text if self._convert is None else self._convert(text)


_loader_classes: dict[TextConverter | None, type[ConvertingLoader]] = {}


def _loader_class(convert: TextConverter | None) -> type[ConvertingLoader]:
    cls = _loader_classes.get(convert)
    if cls is None:
        name = getattr(convert, "__name__", "text")
        cls = type(f"ConvertingLoader_{name}", (ConvertingLoader,), {"converter": (convert,)})
        if len(_loader_classes) < 256:  # module functions recur; array closures do not
            _loader_classes[convert] = cls
    return cls


# The loaders of the last catalog registered: every pooled connection registers the same.
_last_loaders: tuple[TypeCatalog, list[tuple[int, type[ConvertingLoader]]]] | None = None


def _loaders(catalog: TypeCatalog) -> list[tuple[int, type[ConvertingLoader]]]:
    global _last_loaders
    last = _last_loaders
    if last is not None and last[0] is catalog:
        return last[1]
    oids = set(SQL_LOADERS_DIFFER)
    oids.update(t.oid for t in catalog if t.element and t.oid not in _PSYCOPG_TEXT_LOADED)
    loaders = [(oid, _loader_class(text_converter(oid, catalog))) for oid in sorted(oids)]
    _last_loaders = (catalog, loaders)  # a race computes it twice, harmlessly
    return loaders


def register_loaders(adapters: AdaptersMap, catalog: TypeCatalog) -> None:
    """Make ``adapters`` load, in text format, every type psycopg would load otherwise than
    the decoder (with ``catalog``) does."""
    for oid, loader in _loaders(catalog):
        adapters.register_loader(oid, loader)


# psycopg prepares a statement on a connection once it ran there five times. A prepared
# statement that returns rows then fails, once per connection, when a migration retypes
# their columns (or adds one under a `SELECT *`): "cached plan must not change result type".
# A statement that returns none is planned again without failing, and keeps the speed (the
# methods benchmark: about a tenth more calls per second than with nothing prepared). Every
# pooled connection's cursor applies this rule (:class:`Cursor`), engine reads and method
# statements alike.
_RETURNS_NO_ROWS: Final = re.compile(r"\s*(?:INSERT|UPDATE|DELETE|MERGE)\b(?!.*\bRETURNING\b)",
                                     re.IGNORECASE | re.DOTALL)


def preparable(query: Query) -> bool | None:
    """psycopg's ``prepare`` argument for ``query``: None (its default: prepared from the
    sixth run) for a plain INSERT, UPDATE, DELETE or MERGE without RETURNING, which returns no
    rows; False (never prepared) for anything else."""
    if isinstance(query, bytes):
        query = query.decode("utf-8", "replace")
    return _preparable_text(query) if isinstance(query, str) else False


@functools.lru_cache(maxsize=1024)  # a method runs the same few texts again and again
def _preparable_text(query: str) -> bool | None:
    return None if _RETURNS_NO_ROWS.match(query) else False


# Template for every pooled connection: built-in loaders set once (catalog ones per
# connection, as the catalog changes).
_ADAPTERS: Final = AdaptersMap(psycopg.adapters)
register_loaders(_ADAPTERS, TypeCatalog())


class Cursor(psycopg.Cursor[TupleRow]):
    """A pooled connection's cursor: unless told otherwise, prepares only what
    :func:`preparable` allows."""

    def execute(self, query: Query, params: Any = None, *, prepare: bool | None = None,
                binary: bool | None = None) -> Self:  # type: ignore[override]
        if prepare is None:
            prepare = preparable(query)
        return super().execute(query, params, prepare=prepare, binary=binary)


class Connection(psycopg.Connection[TupleRow]):
    """A pooled connection: loads values as the replication stream decodes them."""

    types: SharedCatalog | None = None
    # The catalog its loaders were made for, and its ``SharedCatalog.version``: what decides
    # how a result is loaded (the shared one may be newer, loaded by another reader).
    types_catalog: TypeCatalog | None = None
    types_version = -1


def connect(dsn: str, types: SharedCatalog, application_name: str = "cdcddp") -> Connection:
    """A connection as ``Database`` makes them (blocking)."""
    conn = Connection.connect(dsn, application_name=application_name, options=SESSION_OPTIONS,
                              context=_ADAPTERS, cursor_factory=Cursor)
    conn.types = types
    try:
        if types.version == 0:  # the first connection to the database: nothing loaded yet
            with conn.transaction():
                load_types(conn)
        sync_loaders(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def sync_loaders(conn: psycopg.Connection[Any]) -> None:
    """Register the loaders of the shared catalog's types, if it changed since the last time."""
    types = getattr(conn, "types", None)
    if types is None:
        return
    version, catalog = types.current
    if conn.types_version != version:  # type: ignore[attr-defined]
        register_loaders(conn.adapters, catalog)
        conn.types_catalog = catalog  # type: ignore[attr-defined]
        conn.types_version = version  # type: ignore[attr-defined]


def load_types(conn: psycopg.Connection[Any]) -> None:
    """Reload the type catalog on ``conn`` (in its transaction), share it, use it."""
    types = getattr(conn, "types", None)
    if types is None:
        return
    rows = conn.execute(TYPE_CATALOG_SQL).fetchall()
    types.merge(TypeCatalog.from_rows(rows))
    sync_loaders(conn)


def ensure_types(conn: psycopg.Connection[Any], oids: Iterable[int]) -> None:
    """Before reading values of these type oids: make ``conn``'s loaders cover them, with the
    shared catalog if another reader loaded them already, else by reloading it (a type
    created since it was loaded). A no-op on connections not made by :func:`connect`."""
    if getattr(conn, "types", None) is None:
        return
    oids = list(oids)
    sync_loaders(conn)
    if not conn.types_catalog.resolves(oids):  # type: ignore[attr-defined]
        load_types(conn)


def execute_as_decoded(conn: psycopg.Connection[Any], query: Query, params: Any = None
                       ) -> psycopg.Cursor[Any]:
    """``conn.execute(query, params)``; run again when the result had a column of a type the
    connection's catalog did not know (its values were not loaded as the decoder does)."""
    sync_loaders(conn)
    used: TypeCatalog | None = getattr(conn, "types_catalog", None)
    cursor = conn.execute(query, params)
    description = cursor.description
    if used is not None and description:
        oids = [column.type_code for column in description]
        if not used.resolves(oids):
            ensure_types(conn, oids)
            cursor = conn.execute(query, params)
    return cursor


# A snapshot run (read-only) that PostgreSQL aborted over concurrency is run again, this many
# times at most: waiting for a lock, a read can be the one a deadlock among writers cancels.
_TRANSIENT_RETRIES = 3


def is_transient(exc: BaseException) -> bool:
    """Did PostgreSQL abort the transaction over concurrency (a deadlock victim, a
    serialization failure, a standby's recovery conflict), so that the same read-only work
    may well succeed in a new one?"""
    return isinstance(exc, (psycopg.errors.DeadlockDetected,
                            psycopg.errors.SerializationFailure))


class DatabaseSetupError(Exception):
    """The database is not set up as the server needs; the message says what to change. It
    is logged in one line and never shown to a client (who gets a 500)."""


def first_line(exc: BaseException) -> str:
    """An error's first line (PostgreSQL's message without its DETAIL and HINT lines), for
    one-line logs and answers."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def is_unavailable(exc: BaseException) -> bool:
    """Is this the database being out of reach (down, restarting, failing over, the
    session ended by an operator), rather than a query's own failure?"""
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate  # None: the connection failed or was lost
    # (57014, query_canceled, is a statement timeout or a cancel: the query's own failure)
    return state is None or (state[:2] in ("08", "57") and state != "57014")


def _usable(conn: psycopg.Connection[Any]) -> bool:
    """Is an idle pooled connection still open? The server says something to an idle
    session only when it ends it (restarted, failed over, the backend terminated: a FATAL
    message, then the socket closes), so a readable socket means it is gone; without this
    check its next user (a method call: a 500) would find out."""
    if conn.closed or conn.broken:
        return False
    poller = select.poll()  # (select() fails on descriptors past 1023: a busy server's are)
    try:
        poller.register(conn.fileno(), select.POLLIN)
        return not poller.poll(0)
    except (OSError, psycopg.Error):
        return False


class Database:
    """A bounded pool of psycopg connections used from worker threads.

    ``types`` is the type catalog shared with the replication stream (a fresh one if not
    given: loaded by the first connection)."""

    def __init__(self, dsn: str, size: int = 8, application_name: str = "cdcddp",
                 types: SharedCatalog | None = None) -> None:
        self.dsn = dsn
        self.size = size
        self.application_name = application_name
        self.types = types if types is not None else SharedCatalog()
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(size)
        # Bounds connections held across awaits (a method call's transaction), separately
        # from the short calls of run().
        self.holders = trio.CapacityLimiter(size)
        self._closed = False
        self.transient_retries = 0  # snapshot runs PostgreSQL aborted, run again (tests)

    def _connect(self) -> psycopg.Connection[Any]:
        return connect(self.dsn, self.types, self.application_name)

    def checkout(self) -> psycopg.Connection[Any]:
        """A pooled connection for exclusive use (blocking: call from a worker thread);
        hand it back with :meth:`checkin`."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if _usable(conn):
                    break
                conn.close()
            else:
                conn = None
        if conn is None:
            return self._connect()
        sync_loaders(conn)  # the catalog may have changed while it was idle
        return conn

    def checkin(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken or self._closed:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], snapshot: bool = False) -> T:
        conn = self.checkout()
        if snapshot:  # psycopg then begins with "BEGIN ISOLATION LEVEL ...": one round trip
            conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            conn.read_only = True
        try:
            with conn.transaction():
                return fn(conn, *args)
        except BaseException:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.close()  # unknown state: don't reuse
            raise
        finally:
            if snapshot and not conn.closed:
                conn.isolation_level = conn.read_only = None
            self.checkin(conn)

    async def run(self, fn: Callable[..., T], *args: Any, snapshot: bool = False) -> T:
        """Run ``fn(conn, *args)`` in one transaction on a pooled connection; with
        ``snapshot``, a REPEATABLE READ, READ ONLY one (all its reads see one snapshot),
        run again in a new one if PostgreSQL aborts it over concurrency (:func:`is_transient`:
        ``fn`` must let such an error through, and may then run more than once)."""
        if self._closed:
            raise RuntimeError("database pool is closed")
        retries = _TRANSIENT_RETRIES if snapshot else 0
        while True:
            try:
                return await trio.to_thread.run_sync(self._call, fn, args, snapshot,
                                                     limiter=self._limiter)
            except psycopg.Error as exc:
                if not retries or not is_transient(exc):
                    raise
                retries -= 1
                self.transient_retries += 1
                log.info("a read was aborted over concurrency (%s); reading again",
                         first_line(exc))

    async def fetchall(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        def go(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return execute_as_decoded(conn, query, params).fetchall()
        return await self.run(go)

    async def execute(self, query: Any, params: Any = None) -> None:
        def go(conn: psycopg.Connection[Any]) -> None:
            conn.execute(query, params)
        await self.run(go)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def transaction_statuses(conn: psycopg.Connection[Any], xid8s: list[int]) -> list[str | None]:
    """Each transaction's status here: committed, aborted, in progress, or None (too old to
    tell). An id this server never gave out (after a failover to a server that lacks it)
    did not commit here: aborted (pg_xact_status raises for it, hence a savepoint each)."""
    statuses: list[str | None] = []
    for xid8 in xid8s:
        try:
            with conn.transaction():
                row = conn.execute("SELECT pg_xact_status(%s::text::xid8)",
                                   (str(xid8),)).fetchone()
        except psycopg.errors.InvalidParameterValue:  # "transaction ID ... is in the future"
            statuses.append("aborted")
            continue
        statuses.append(None if row is None else row[0])
    return statuses
