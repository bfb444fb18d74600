"""What a method call knows and uses: its connection, its user, its random stream and one
database transaction.

The transaction is opened lazily (a method that never touches the database holds no
connection) on ONE psycopg connection kept for the whole call. psycopg's async API is
asyncio-only, so every statement runs in a worker thread (``trio.to_thread``); the connection is
only ever used by one thread at a time because the method awaits each statement.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import trio

from cdcddp.db import Database, first_line, is_unavailable, transaction_statuses
from cdcddp.ddp.messages import MeteorError
from cdcddp.ddp.meteor_random import RandomStream

__all__ = [
    "CommitInfo",
    "ConnectionInfo",
    "LoginState",
    "MethodContext",
    "MethodTransaction",
    "is_loopback_address",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Query = str | bytes | Any  # str or a psycopg.sql.Composable
Params = Sequence[Any] | dict[str, Any] | None

# How long the outcome of a commit whose connection was lost is asked after (the server may be
# restarting, or a synchronous standby may still have to confirm it).
COMMIT_DOUBT_SECONDS = 10.0


def is_loopback_address(address: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for anything unparsable."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return bool(ip.is_loopback or (mapped is not None and mapped.is_loopback))


@dataclass(frozen=True)
class LoginState:
    """Who a connection is logged in as, and with which resume token (its hash)."""

    user_id: str | None = None
    login_token_hash: str | None = None


@dataclass(frozen=True)
class ConnectionInfo:
    """What the server tells a method about the calling connection.

    ``secure_transport`` is True when the peer is on loopback or the connection is TLS (a
    TLS-terminating proxy counts only if the server is configured to trust it): plain-text
    passwords are accepted only then.
    """

    connection_id: str
    login: LoginState = LoginState()
    client_address: str | None = None
    secure_transport: bool = False

    @property
    def user_id(self) -> str | None:
        return self.login.user_id


@dataclass(frozen=True)
class CommitInfo:
    """What the write fence needs from a committed method transaction.

    ``xid`` is the 32-bit transaction id, as wal2json reports it on ``B``/``C`` records;
    ``xid8`` the epoch-extended one. Both None when the call wrote nothing.
    """

    xid: int | None = None
    xid8: int | None = None


def _transaction_status(conn: psycopg.Connection[Any], xid8: int) -> str:
    """``pg_xact_status``: committed, aborted or in progress. An id this server never gave
    out (a failover to a standby that lacked it) did not commit here: aborted."""
    status = transaction_statuses(conn, [xid8])[0]
    return "unknown" if status is None else status


class MethodTransaction:
    """One database transaction on one pooled connection, held for a whole method call."""

    def __init__(self, database: Database | None,
                 connection_limiter: trio.CapacityLimiter | None = None) -> None:
        self._database = database
        self._limiter = connection_limiter
        self._conn: psycopg.Connection[Any] | None = None
        self._finished = False
        # One statement at a time (a method may run them from tasks at once): one connection
        # does one thing at a time, and the first takes it from the pool.
        self._turn = trio.StrictFIFOLock()

    @property
    def opened(self) -> bool:
        return self._conn is not None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a worker thread on this call's connection (taken from
        the pool by the first call, in the same thread hop); calls made at once take turns."""
        async with self._turn:
            return await self._run(fn, *args)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._finished:
            raise RuntimeError("the method's transaction is already finished")
        conn = self._conn
        if conn is not None:
            return await trio.to_thread.run_sync(fn, conn, *args)
        database = self._database
        if database is None:
            raise RuntimeError("no database configured for methods")
        if self._limiter is not None:
            await self._limiter.acquire_on_behalf_of(self)

        def first(*args: Any) -> T:
            conn = self._conn = database.checkout()
            return fn(conn, *args)
        try:
            return await trio.to_thread.run_sync(first, *args)
        finally:
            if self._conn is None and self._limiter is not None:  # no connection to hold
                self._limiter.release_on_behalf_of(self)

    async def execute(self, query: Query, params: Params = None) -> int:
        """Run a statement; returns its row count."""
        def go(conn: psycopg.Connection[Any]) -> int:
            return conn.execute(query, params).rowcount
        return await self.run(go)

    async def fetchone(self, query: Query, params: Params = None) -> tuple[Any, ...] | None:
        def go(conn: psycopg.Connection[Any]) -> tuple[Any, ...] | None:
            return conn.execute(query, params).fetchone()
        return await self.run(go)

    async def fetchall(self, query: Query, params: Params = None) -> list[tuple[Any, ...]]:
        def go(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(query, params).fetchall()
        return await self.run(go)

    async def fetchval(self, query: Query, params: Params = None) -> Any:
        """The first column of the first row, or None when there is no row."""
        row = await self.fetchone(query, params)
        return None if row is None else row[0]

    async def commit(self) -> CommitInfo:
        """Commit and report the transaction id of the writes (None if nothing was written).

        If the connection is lost during the COMMIT, whether it took effect is asked of the
        server (``pg_xact_status``): committed is success; rolled back raises
        ``MeteorError.unavailable()`` (nothing happened: a client may retry); a transaction
        that wrote nothing needs no asking. Still unknown after ``COMMIT_DOUBT_SECONDS``:
        ``MeteorError.internal()`` (a retry might apply it twice)."""
        if self._conn is None:
            self._finished = True
            return CommitInfo()
        conn = self._conn
        xid8: int | None = None

        def go() -> CommitInfo:
            nonlocal xid8
            # Assigned only once the transaction wrote; read before the commit ends it.
            row = conn.execute("SELECT pg_current_xact_id_if_assigned()::text",
                               prepare=True).fetchone()  # (its one text column never changes)
            xid8 = None if row is None or row[0] is None else int(row[0])
            conn.commit()
            if xid8 is None:
                return CommitInfo()
            return CommitInfo(xid=xid8 & 0xFFFFFFFF, xid8=xid8)

        try:
            with trio.CancelScope(shield=True):  # never leave a commit half-observed
                return await trio.to_thread.run_sync(go)
        except psycopg.OperationalError as exc:
            if not is_unavailable(exc) or self._database is None:
                raise
            if xid8 is None:  # nothing written, or the COMMIT was never sent
                raise MeteorError.unavailable() from exc
            self._release()  # (its pool slot is not needed to ask)
            with trio.CancelScope(shield=True):  # the client gets its answer either way
                return await self._commit_outcome(xid8, exc)
        finally:
            self._release()

    async def _commit_outcome(self, xid8: int, lost: psycopg.OperationalError) -> CommitInfo:
        """The outcome of transaction ``xid8``, whose connection was lost during its COMMIT
        (``lost``), asked of the server until it is known."""
        assert self._database is not None
        what = (f"a method's connection was lost during its COMMIT ({first_line(lost)}); "
                f"transaction {xid8}")
        deadline = trio.current_time() + COMMIT_DOUBT_SECONDS
        while True:
            try:
                status = await self._database.run(_transaction_status, xid8)
            except psycopg.Error as exc:
                if not is_unavailable(exc):
                    raise
                status = "unreachable"
            if status == "committed":
                log.warning("%s committed", what)
                return CommitInfo(xid=xid8 & 0xFFFFFFFF, xid8=xid8)
            if status == "aborted":
                log.warning("%s was rolled back: 503", what)
                raise MeteorError.unavailable() from lost
            # Still being committed (a synchronous standby's confirmation), or the server is
            # out of reach (restarting), or too old to tell (not expected): ask again.
            if trio.current_time() > deadline:
                log.error("%s: whether it committed is still unknown after %.0f s", what,
                          COMMIT_DOUBT_SECONDS)
                raise MeteorError.internal() from lost
            await trio.sleep(0.2)

    async def rollback(self) -> None:
        if self._conn is None:
            self._finished = True
            return
        conn = self._conn

        def go() -> None:
            try:
                conn.rollback()
            except psycopg.Error:
                conn.close()  # unknown state: the pool drops closed connections

        try:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(go)
        finally:
            self._release()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        self._finished = True
        if conn is None:
            return
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.close()
        assert self._database is not None
        self._database.checkin(conn)
        if self._limiter is not None:
            self._limiter.release_on_behalf_of(self)


class MethodContext:
    """The first argument of every method handler."""

    def __init__(self, *, connection: ConnectionInfo, method_id: str, method_name: str,
                 random: RandomStream, transaction: MethodTransaction) -> None:
        self.connection = connection
        self.method_id = method_id
        self.method_name = method_name
        self.random = random
        self.transaction = transaction
        self._login: LoginState = connection.login
        self._login_changed = False
        self._revoked_tokens: list[str] = []

    # -- who is calling ---------------------------------------------------------------------

    @property
    def connection_id(self) -> str:
        return self.connection.connection_id

    @property
    def user_id(self) -> str | None:
        """The logged-in user (None: anonymous); reflects ``set_user_id`` within this call."""
        return self._login.user_id

    @property
    def login_token_hash(self) -> str | None:
        return self._login.login_token_hash

    def set_user_id(self, user_id: str | None, login_token_hash: str | None = None) -> None:
        """Log the connection in as ``user_id`` (None: out). Takes effect for the connection only
        if the call succeeds (its transaction commits); the server then reruns subscriptions."""
        self._login = LoginState(user_id, login_token_hash if user_id is not None else None)
        self._login_changed = True

    @property
    def login_change(self) -> LoginState | None:
        return self._login if self._login_changed else None

    def revoked_tokens(self, hashed_tokens: Sequence[str]) -> None:
        """Report resume tokens this call deleted, so the server can log out connections that
        use them (Meteor closes such connections)."""
        self._revoked_tokens.extend(hashed_tokens)

    @property
    def revoked_token_hashes(self) -> tuple[str, ...]:
        return tuple(self._revoked_tokens)

    # -- ids --------------------------------------------------------------------------------

    def new_id(self, collection: str) -> str:
        """The id a Meteor client simulating this call generated for its insert into
        ``collection`` (the call's randomSeed, scope ``/collection/<collection>``)."""
        return self.random.id_for_collection(collection)

    # -- database ---------------------------------------------------------------------------

    async def execute(self, query: Query, params: Params = None) -> int:
        return await self.transaction.execute(query, params)

    async def fetchone(self, query: Query, params: Params = None) -> tuple[Any, ...] | None:
        return await self.transaction.fetchone(query, params)

    async def fetchall(self, query: Query, params: Params = None) -> list[tuple[Any, ...]]:
        return await self.transaction.fetchall(query, params)

    async def fetchval(self, query: Query, params: Params = None) -> Any:
        return await self.transaction.fetchval(query, params)

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, *args)`` in a worker thread on the call's connection (for psycopg
        features the helpers above do not cover: ``copy``, ``executemany``, row factories).
        Its cursors prepare no statement that returns rows (see :func:`cdcddp.db.preparable`)."""
        return await self.transaction.run(fn, *args)
