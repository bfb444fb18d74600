"""Ordinary (non-replication) database access from trio.

psycopg's async API is asyncio-only, so queries run on plain psycopg connections in worker
threads: ``await db.run(fn, *args)`` calls ``fn(conn, *args)`` in a thread with a connection
from a small pool, inside a transaction that commits when ``fn`` returns and rolls back when it
raises. The replication stream does not use this (it drives libpq directly, see
``cdcddp.wal.stream``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg
import trio

T = TypeVar("T")

# Same value text everywhere, whatever the server's defaults (as on the replication session,
# except IntervalStyle: psycopg parses only the default one).
SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO"


class Database:
    """A bounded pool of psycopg connections used from worker threads."""

    def __init__(self, dsn: str, size: int = 8, application_name: str = "cdcddp") -> None:
        self.dsn = dsn
        self.size = size
        self.application_name = application_name
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(size)
        # Bounds connections held across awaits (a method call's transaction), separately
        # from the short calls of run().
        self.holders = trio.CapacityLimiter(size)
        self._closed = False

    def _connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn, application_name=self.application_name,
                               options=SESSION_OPTIONS)

    def checkout(self) -> psycopg.Connection[Any]:
        """A pooled connection for exclusive use (blocking: call from a worker thread);
        hand it back with :meth:`checkin`."""
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed and not conn.broken:
                    return conn
        return self._connect()

    def checkin(self, conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken or self._closed:
            conn.close()
            return
        with self._lock:
            self._idle.append(conn)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = self.checkout()
        try:
            with conn.transaction():
                return fn(conn, *args)
        except BaseException:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.close()  # unknown state: don't reuse
            raise
        finally:
            self.checkin(conn)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in one transaction on a pooled connection."""
        if self._closed:
            raise RuntimeError("database pool is closed")
        return await trio.to_thread.run_sync(self._call, fn, args, limiter=self._limiter)

    async def fetchall(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        def go(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(query, params).fetchall()
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
