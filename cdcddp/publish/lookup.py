"""Reactive row look-ups for publication functions.

A publication function may need another table's row to decide what to publish — the Todos
app's ``todos.inList`` publishes a list's todos only while the list is public or owned by the
subscriber. Declared with a third parameter, the function receives a :class:`RowLookup`::

    @publications.publication("todos.inList", params=InListParams)
    def todos_in_list(params, user_id, lookup):
        lst = lookup.row("lists", params.listId, columns=["user_id"])
        if lst is None or lst["user_id"] not in (None, user_id):
            return None
        return Cursor("todos", fields=[...], filter=C("list_id") == params.listId)

Every row read is recorded as a dependency ``(schema, table, key)``; the live-data engine
re-runs the function when the stream changes one of those rows, and the subscription's
documents follow the new cursors (only the difference reaches the client). The stream names
changed rows by primary key, so ``key_columns`` must be the table's primary key.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Protocol, TypeVar

import psycopg
import trio
from psycopg import sql

from cdcddp.db import Database, execute_as_decoded, is_transient
from cdcddp.publish.definition import PublicationError, TableName, split_table
from cdcddp.publish.filters import quoted
from cdcddp.publish.partitions import StreamedTables
from cdcddp.publish.snapshots import begin_snapshot, check_streamed, next_batch
from cdcddp.publish.visibility import Snapshot
from cdcddp.wal.events import Row

Dependency = tuple[str, str, tuple[Any, ...]]  # (schema, table, primary-key values)
# What a lookup read of each row: its columns' values, or None (no such row).
ReadRows = dict[Dependency, dict[str, Any] | None]


_MISSING: Any = object()


def read_differs(read: dict[str, Any] | None, now: Row | None) -> bool:
    """Could a function that read ``read`` of a row decide otherwise now that the row is
    ``now`` (None: gone)? Only if a column it read changed: a column missing from ``now``
    is an unchanged TOASTed value, so unchanged."""
    if read is None or now is None:
        return read is not now
    for column, value in read.items():
        current = now.get(column, _MISSING)
        if current is not _MISSING and current != value:
            return True
    return False


class RowLookup(Protocol):
    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None: ...


_WHY_PRIMARY_KEY = ("a lookup is re-run when its row changes, and changed rows are known by "
                    "primary key")
_TEXT_TYPE_OIDS: Final = frozenset({25, 1043})  # text, varchar: keys compared exactly
_PRIMARY_KEY_SQL = (
    "SELECT a.attname::text FROM pg_index i "
    "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.n")


# A row read, by what was asked: (schema, table, key columns, key, columns or None).
_ReadKey = tuple[str, str, tuple[str, ...], tuple[Any, ...], tuple[str, ...] | None]


class SqlRowLookup:
    """Reads rows on a psycopg connection (in a worker thread) and records what it read.

    ``reads`` and ``primary_keys``: shared by the lookups that run under one snapshot
    (:class:`BatchedLookups`), so that a row many functions read is read once; ``streamed``:
    the tables found streamed so far (shared by all batches)."""

    def __init__(self, conn: psycopg.Connection[Any],
                 reads: dict[_ReadKey, dict[str, Any] | None] | None = None,
                 primary_keys: dict[TableName, tuple[str, ...]] | None = None,
                 streamed: StreamedTables | None = None) -> None:
        self._conn = conn
        self.dependencies: ReadRows = {}
        self._reads = {} if reads is None else reads
        self._primary_keys = {} if primary_keys is None else primary_keys
        self._streamed = StreamedTables() if streamed is None else streamed

    def row(self, table: str | tuple[str, str], key: Any,
            columns: Sequence[str] | None = None,
            key_columns: Sequence[str] = ("id",)) -> dict[str, Any] | None:
        schema, name = split_table(table)
        key_values = tuple(key) if isinstance(key, tuple) else (key,)
        if len(key_values) != len(key_columns):
            raise ValueError(f"key {key!r} does not match key columns {list(key_columns)}")
        # The stream names a changed row by its primary key, in the key's column order.
        pk = self._primary_key(schema, name)
        if not pk:
            raise PublicationError(f"lookup.row({schema}.{name}): the table has no primary "
                                   f"key; {_WHY_PRIMARY_KEY}")
        if sorted(pk) != sorted(key_columns):
            raise PublicationError(
                f"lookup.row({schema}.{name}): key_columns {list(key_columns)} are not the "
                f"table's primary key {list(pk)}; {_WHY_PRIMARY_KEY}")
        by_column = dict(zip(key_columns, key_values, strict=True))
        dependency = (schema, name, tuple(by_column[c] for c in pk))
        read_key = (schema, name, tuple(key_columns), key_values,
                    None if columns is None else tuple(columns))
        try:
            row = self._reads[read_key]
        except KeyError:
            row = self._reads[read_key] = self._read(schema, name, key_columns, key_values,
                                                     columns)
        except TypeError:  # a key value that cannot be a dict key: read it, unshared
            row = self._read(schema, name, key_columns, key_values, columns)
        if row is None:
            self.dependencies.setdefault(dependency, None)
            return None
        self.dependencies[dependency] = {**(self.dependencies.get(dependency) or {}), **row}
        return dict(row)  # the function's own copy

    def _read(self, schema: str, name: str, key_columns: Sequence[str],
              key_values: tuple[Any, ...], columns: Sequence[str] | None
              ) -> dict[str, Any] | None:
        selected = sql.SQL("*") if columns is None else sql.SQL(", ").join(
            map(quoted, dict.fromkeys([*key_columns, *columns])))
        where = sql.SQL(" AND ").join(
            sql.SQL("{} = %s").format(quoted(c)) for c in key_columns)
        query = sql.SQL("SELECT {} FROM {}.{} WHERE {}").format(
            selected, quoted(schema), quoted(name), where)
        # Values as the stream decodes them (the function may compare them with published ones).
        cursor = execute_as_decoded(self._conn, query, key_values)
        found = cursor.fetchone()
        if found is None:
            return None
        description = cursor.description or ()
        row = dict(zip([d.name for d in description], found, strict=True))
        # A text key with a nondeterministic collation matches other spellings ('A' for
        # 'a'); the stream names rows by their exact key, and filters compare exactly.
        text_columns = {d.name for d in description if d.type_code in _TEXT_TYPE_OIDS}
        if any(row[c] != v for c, v in zip(key_columns, key_values, strict=True)
               if c in text_columns):
            return None
        return row

    def _primary_key(self, schema: str, name: str) -> tuple[str, ...]:
        pk = self._primary_keys.get((schema, name))
        if pk is None:
            relation = sql.SQL("{}.{}").format(quoted(schema), quoted(name)).as_string(
                self._conn)
            if (schema, name) not in self._streamed:
                # A row whose changes are never streamed would never run the function again.
                self._streamed.add((schema, name), check_streamed(self._conn, (schema, name)))
            pk = self._primary_keys[(schema, name)] = tuple(
                r[0] for r in self._conn.execute(_PRIMARY_KEY_SQL, (relation,)))
        return pk


class RecentRowChanges:
    """The last delivered transaction that changed each row of the tables lookups read.

    A lookup reads rows under its own snapshot; the watch on them is registered afterwards.
    Was a row it read changed by a transaction its snapshot lacks (delivered while it ran, or
    decoded before it and not yet visible)? Then the function must run again. Asking that of
    the *table* re-ran it for as long as any other row of the table kept changing.

    A row's last change is enough: a transaction that changes a row waits for the one that
    changed it before to be visible (row locks outlive the synchronous-standby wait), so a
    snapshot that sees the last change sees the earlier ones. Rows are logged for tables
    lookups have read (:meth:`follow`), the ``max_rows`` most recently changed.
    """

    def __init__(self, max_rows: int = 16_384) -> None:
        self.max_rows = max_rows
        # row -> (delivery number, xid) of its last change, oldest first
        self._last: OrderedDict[Dependency, tuple[int, int]] = OrderedDict()
        # Logged tables -> the delivery number from which on their changes are all here.
        self._tables: dict[TableName, int] = {}
        self._trimmed = 0  # changes delivered up to this number may have been dropped

    def logs(self) -> dict[TableName, int]:
        """The logged tables (a dict: ``table in`` is the consumer's per-change test)."""
        return self._tables

    def follow(self, table: TableName, delivered: int) -> None:
        """Log ``table``'s changes delivered after number ``delivered`` (if not yet)."""
        self._tables.setdefault(table, delivered)

    def restart(self, table: TableName, delivered: int) -> None:
        """Every row of ``table`` changed at once (TRUNCATE): no row log covers what came
        before delivery ``delivered``."""
        self._tables[table] = delivered

    def record(self, rows: Iterable[Dependency], delivered: int, xid: int) -> None:
        last = self._last
        for row in rows:
            if row in last:
                last.move_to_end(row)
            last[row] = (delivered, xid)
        while len(last) > self.max_rows:
            _, (number, _) = last.popitem(last=False)
            self._trimmed = number

    def forget(self, delivered: int) -> None:
        """The changes logged so far are of a history the server left (a failover): their
        xids may be given to other transactions. Nothing is known of the rows' changes
        delivered up to number ``delivered``."""
        self._last.clear()
        self._trimmed = max(self._trimmed, delivered)

    def covers(self, tables: Iterable[TableName], after: int) -> bool:
        """Is every change to ``tables`` delivered after number ``after`` logged?"""
        if self._trimmed > after:
            return False
        logged = self._tables
        return all(table in logged and logged[table] <= after for table in tables)

    def unseen(self, rows: Iterable[Dependency], snapshot: Snapshot) -> int | None:
        """The xid of one of ``rows``' last changes that ``snapshot`` lacks, or None."""
        last = self._last
        for row in rows:
            change = last.get(row)
            if change is not None and not snapshot.is_visible(change[1]):
                return change[1]
        return None


T = TypeVar("T")

_LOOKUP_BATCH_MAX = 128  # functions run under one snapshot at most
# A result is reused by later runs of the same function with the same inputs for this long
# (while no table it read changed): a burst of subscriptions (1,000 clients reconnecting)
# then runs it once instead of once per batch; a function that looks at the clock is at
# most this stale for a new subscriber.
_REUSE_SECONDS = 1.0
_REUSE_MAX = 4096  # results kept for reuse at most


@dataclass(frozen=True, slots=True)
class LookupResult(Generic[T]):
    value: T  # what the function returned
    dependencies: ReadRows  # the rows it read
    # (transactions delivered before its snapshot was taken, that snapshot): for
    # ``LiveData.lookup_stale`` once the watch on those rows exists
    guard: tuple[int, Snapshot]


@dataclass(eq=False, slots=True)
class _LookupRun:
    resolve: Callable[[SqlRowLookup], Any]
    after_xid: int  # its snapshot must see this transaction (0: any) ...
    insist: bool  # ... or, once the caller gave up waiting for that, any snapshot
    same_as: Hashable | None  # runs of one batch with equal keys share a result (None: never)
    publication: str  # whose function it is (metrics)
    done: trio.Event = field(default_factory=trio.Event)
    abandoned: bool = False  # its caller stopped waiting (cancelled)
    too_early: bool = False  # not run: the batch's snapshot lacked after_xid
    shared: bool = False  # not run: took the result of an earlier run with its same_as
    result: LookupResult[Any] | None = None
    error: BaseException | None = None


class _Interrupted(Exception):
    """A function left the transaction failed (an SQL error): the runs after it need a new
    one."""

    def __init__(self, rest: list[_LookupRun]) -> None:
        super().__init__()
        self.rest = rest


class BatchedLookups:
    """Runs publication functions that read rows: those waiting at once in one REPEATABLE
    READ transaction, each row read once for all of them.

    A change to a row many subscriptions read (the list a thousand clients view becomes
    private) re-runs each of their functions; one transaction and one round trip per
    function queued them all behind the database pool (1,000 clients of one looked-up row
    took 1.1 s to follow it, against 0.07 s for a plain filter change of the same size:
    ``tests/bench/lookups.py``).
    Under one snapshot the same read gives the same row, so it is read once; and the same
    function with the same inputs (``same_as``: the publication, its parameters and the user)
    gives the same result, so it runs once: the others take its result (its value and the
    rows it read). The guard against changes its snapshot missed is the same as for a
    function run alone.

    A successful result is also reused by later runs with its ``same_as`` for
    ``_REUSE_SECONDS``, as long as ``changed_since`` says that no table it read was changed
    by a transaction delivered after its snapshot began (and its snapshot sees the run's
    ``after_xid``). It carries its original guard, so a change that snapshot lacked still
    makes the receiver run again.
    """

    def __init__(self, database: Database, delivered: Callable[[], int],
                 changed_since: Callable[[Iterable[TableName], int], bool] | None = None,
                 streamed: StreamedTables | None = None) -> None:
        self._database = database
        self._delivered = delivered  # transactions the stream has delivered so far
        # (tables, delivery number) -> did a transaction delivered after it change one?
        # None: results are not reused across batches.
        self._changed_since = changed_since
        # same_as -> (when it was computed, its result), oldest first.
        self._recent: OrderedDict[Hashable, tuple[float, LookupResult[Any]]] = OrderedDict()
        # Tables found streamed (the engine's set: its observers' tables too).
        self._streamed = StreamedTables() if streamed is None else streamed
        self._send, self._receive = trio.open_memory_channel[_LookupRun](math.inf)
        self.batches = 0  # transactions run (figures, tests)
        # Runs by publication and by what became of them (metrics): "ok" and "error" (the
        # function ran and returned or raised), "shared" (took an identical run's result),
        # "too_early" (the snapshot lacked the commit it must see: queued again). Counted on
        # the trio thread.
        self.outcomes: Counter[tuple[str, str]] = Counter()

    def count(self, outcome: str) -> int:
        """Runs with ``outcome``, over every publication."""
        return sum(n for (_, o), n in list(self.outcomes.items()) if o == outcome)

    async def run(self, resolve: Callable[[SqlRowLookup], T], after_xid: int = 0,
                  timeout: float = 10.0, same_as: Hashable | None = None,
                  publication: str = "") -> LookupResult[T]:
        """``resolve(lookup)`` in a worker thread, under a snapshot that sees ``after_xid``
        (32-bit; 0: any), with the rows it read; raises what it raised. ``same_as``: a key
        saying which runs compute the same thing (their result is shared within a batch; a
        shared result must not be changed by its receivers). ``publication`` labels its
        outcome in :attr:`outcomes`.

        A commit is decoded a moment before it is visible (longer while it waits for a
        synchronous standby): while a batch's snapshot lacks ``after_xid``, it is queued
        again a moment later (by this caller, not holding up the batch), and after
        ``timeout`` seconds any snapshot will do."""
        if same_as is not None and (reused := self._reusable(same_as, after_xid)) is not None:
            self.outcomes[publication, "shared"] += 1
            return reused
        deadline = trio.current_time() + timeout
        delay = 0.001
        while True:
            run = _LookupRun(resolve, after_xid, insist=trio.current_time() < deadline,
                             same_as=same_as, publication=publication)
            self._send.send_nowait(run)
            try:
                await run.done.wait()
            finally:
                run.abandoned = not run.done.is_set()
            if not run.too_early:
                break
            await trio.sleep(delay)
            delay = min(delay * 2, 0.05)
        if run.error is not None:
            raise run.error
        assert run.result is not None
        return run.result

    def _reusable(self, same_as: Hashable, after_xid: int) -> LookupResult[Any] | None:
        entry = self._recent.get(same_as)
        if entry is None or self._changed_since is None:
            return None
        computed_at, result = entry
        delivered_before, snapshot = result.guard
        if trio.current_time() - computed_at > _REUSE_SECONDS or self._changed_since(
                {(schema, table) for schema, table, _ in result.dependencies},
                delivered_before):
            del self._recent[same_as]
            return None
        if after_xid and not snapshot.is_visible(after_xid):
            return None
        return result

    def _keep(self, same_as: Hashable, result: LookupResult[Any]) -> None:
        recent = self._recent
        recent.pop(same_as, None)
        recent[same_as] = (trio.current_time(), result)
        while len(recent) > _REUSE_MAX:
            recent.popitem(last=False)

    async def serve(self) -> None:
        """Run queued functions, all those waiting (up to a batch) in one transaction; the
        owner starts as many of these as lookups may use database connections at once."""
        while True:
            batch = await next_batch(self._receive, _LOOKUP_BATCH_MAX)
            pending = [run for run in batch if not run.abandoned]
            try:
                while pending:
                    self.batches += 1
                    try:
                        await self._database.run(_run_batch, pending, self._delivered(),
                                                 self._streamed,
                                                 snapshot=True)
                        pending = []
                    except _Interrupted as interrupted:
                        pending = interrupted.rest
                    except Exception as exc:  # the connection, say: those left did not run
                        for run in pending:
                            if run.result is None and run.error is None and not run.too_early:
                                run.error = exc
                        pending = []
            finally:
                outcomes = self.outcomes
                for run in batch:
                    run.done.set()
                    if run.too_early:
                        outcomes[run.publication, "too_early"] += 1
                    elif run.error is not None:
                        outcomes[run.publication, "error"] += 1
                    elif run.result is not None:
                        outcomes[run.publication, "shared" if run.shared else "ok"] += 1
                        if not run.shared and run.same_as is not None:
                            self._keep(run.same_as, run.result)


def _run_batch(conn: psycopg.Connection[Any], runs: list[_LookupRun],
               delivered_before: int, streamed: StreamedTables) -> None:
    """(In a worker thread.) Each run's function under one snapshot; results and errors
    go to the runs (``too_early`` to those whose transaction the snapshot lacks)."""
    follows = streamed.follows  # (read first: the snapshot is newer)
    snapshot = begin_snapshot(conn)
    reads: dict[_ReadKey, dict[str, Any] | None] = {}
    primary_keys: dict[TableName, tuple[str, ...]] = {}
    results: dict[Hashable, LookupResult[Any]] = {}  # by same_as (successful runs only)
    guard = (delivered_before, snapshot)
    for index, run in enumerate(runs):
        # (Run again after a transient error: see Database.run.)
        run.too_early = run.shared = False
        run.result = run.error = None
        if run.insist and run.after_xid and not snapshot.is_visible(run.after_xid):
            run.too_early = True
            continue
        same_as = run.same_as
        if same_as is not None and (result := results.get(same_as)) is not None:
            run.result = result
            run.shared = True
            continue
        lookup = SqlRowLookup(conn, reads, primary_keys, streamed)
        try:
            run.result = LookupResult(run.resolve(lookup), lookup.dependencies, guard)
        except Exception as exc:
            if is_transient(exc):
                raise  # (Database.run runs the batch again)
            run.error = exc
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR:
            raise _Interrupted(runs[index + 1:])
        if streamed.followed_since(((d[0], d[1]) for d in lookup.dependencies), follows):
            # It read a partitioned table first followed after its snapshot was taken: the
            # guards know nothing of the changes to its partitions before. Queued again.
            run.result = run.error = None
            run.too_early = True
            continue
        if same_as is not None and run.result is not None:
            results[same_as] = run.result
