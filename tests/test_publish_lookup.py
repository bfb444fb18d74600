"""Publication functions that read rows (reactive look-ups), against a real database."""

import functools
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trio
import trio.testing
from pydantic import BaseModel

from cdcddp.db import Database
from cdcddp.publish import lookup as lookup_module
from cdcddp.publish.definition import Cursor, PublicationError, Publications
from cdcddp.publish.filters import C
from cdcddp.publish.lookup import BatchedLookups, RecentRowChanges, SqlRowLookup, read_differs
from cdcddp.publish.snapshots import TableNotStreamed
from cdcddp.publish.visibility import Snapshot
from tests.livedata_support import count_row_reads
from tests.pg_support import held_commit, sql


class InList(BaseModel):
    listId: str


publications = Publications()


@publications.publication("todos.inList", params=InList)
def todos_in_list(params: InList, user_id: str | None, lookup: SqlRowLookup):
    lst = lookup.row("lists", params.listId, columns=["user_id"])
    if lst is None or lst["user_id"] not in (None, user_id):
        return None
    return Cursor("todos", fields=["text"], filter=C("list_id") == params.listId)


def test_lookup_decides_and_records_dependencies(db_dsn: str) -> None:
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE lists (id text primary key, user_id text)")
        conn.execute("INSERT INTO lists VALUES ('pub', NULL), ('mine', 'u1')")
        pub = publications.get("todos.inList")
        assert pub is not None and pub.wants_lookup

        lookup = SqlRowLookup(conn)
        assert len(pub.resolve([{"listId": "pub"}], None, lookup)) == 1
        assert pub.resolve([{"listId": "mine"}], None, lookup) == ()
        assert len(pub.resolve([{"listId": "mine"}], "u1", lookup)) == 1
        assert pub.resolve([{"listId": "gone"}], "u1", lookup) == ()
        # Each row read, with what was read of it (None: no such row).
        assert lookup.dependencies == {
            ("public", "lists", ("pub",)): {"id": "pub", "user_id": None},
            ("public", "lists", ("mine",)): {"id": "mine", "user_id": "u1"},
            ("public", "lists", ("gone",)): None}
        with pytest.raises(PublicationError):
            pub.resolve([{"listId": "pub"}], None)  # needs a lookup
        # Hostile keys are parameters, not SQL.
        assert SqlRowLookup(conn).row("lists", "x' OR '1'='1") is None


def test_lookup_names_tables_as_cursors_do(db_dsn: str) -> None:
    """One reading of a table name: ``"schema.table"``, ``"table"`` (public) or a pair; an
    empty part is the developer's mistake, named as such (not a PostgreSQL syntax error)."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA app")
        conn.execute("CREATE TABLE app.lists (id text primary key, name text)")
        conn.execute("INSERT INTO app.lists VALUES ('a', 'groceries')")
        lookup = SqlRowLookup(conn)
        row = {"id": "a", "name": "groceries"}
        assert lookup.row("app.lists", "a", columns=["name"]) == row
        assert lookup.row(("app", "lists"), "a", columns=["name"]) == row
        for bad in ("app.", ".lists", ""):
            with pytest.raises(PublicationError, match="bad table name"):
                lookup.row(bad, "a")
        assert lookup.dependencies == {("app", "lists", ("a",)): row}


def test_lookup_keys_are_primary_keys(db_dsn: str) -> None:
    """Changed rows reach the engine by primary key: a lookup by other columns could never be
    re-run, so it is refused with a message saying so; a composite key given in another
    order is recorded in the key's order."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE pages (site int, slug text, title text, "
                     "PRIMARY KEY (site, slug), UNIQUE (title))")
        conn.execute("CREATE TABLE notes (body text)")
        conn.execute("INSERT INTO pages VALUES (1, 'home', 'Home')")
        lookup = SqlRowLookup(conn)
        found = lookup.row("pages", ("home", 1), columns=["title"], key_columns=["slug", "site"])
        assert found == {"slug": "home", "site": 1, "title": "Home"}
        assert lookup.dependencies == {("public", "pages", (1, "home")): found}
        # The same row read again, other columns: what the function saw of it, together.
        lookup.row("pages", (1, "home"), columns=["slug"], key_columns=["site", "slug"])
        assert lookup.dependencies == {("public", "pages", (1, "home")): found}
        with pytest.raises(PublicationError, match=r"\['title'\] are not the table's primary "
                                                   r"key \['site', 'slug'\]"):
            lookup.row("pages", "Home", key_columns=["title"])
        # (Its UPDATEs and DELETEs are not even streamed: refused for that first.)
        with pytest.raises(TableNotStreamed, match="has no primary key, so its UPDATEs"):
            lookup.row("notes", "x", key_columns=["body"])
        conn.execute("ALTER TABLE notes REPLICA IDENTITY FULL")  # streamed, but no key
        with pytest.raises(PublicationError, match="has no primary key"):
            SqlRowLookup(conn).row("notes", "x", key_columns=["body"])


def test_a_text_key_is_read_exactly_under_a_nondeterministic_collation(db_dsn: str) -> None:
    """The stream names a row by its exact key: a lookup of 'ann' finds no row 'ANN' that a
    case-blind key's = would match (it would never be re-run for that row's changes)."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE COLLATION case_blind "
                     "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)")
        conn.execute("CREATE TABLE users (name text COLLATE case_blind PRIMARY KEY, n int)")
        conn.execute("INSERT INTO users VALUES ('ANN', 1)")
        lookup = SqlRowLookup(conn)
        assert lookup.row("users", "ann", key_columns=["name"]) is None
        assert lookup.row("users", "ANN", key_columns=["name"]) == {"name": "ANN", "n": 1}
        assert lookup.dependencies == {("public", "users", ("ann",)): None,
                                       ("public", "users", ("ANN",)): {"name": "ANN", "n": 1}}


def test_a_change_concerns_a_lookup_only_where_it_read() -> None:
    read = {"id": "l1", "user_id": None}
    assert not read_differs(read, {"id": "l1", "user_id": None, "incomplete_count": 3})
    assert read_differs(read, {"id": "l1", "user_id": "u1", "incomplete_count": 3})
    assert not read_differs(read, {"id": "l1"})  # user_id left out: an unchanged TOAST value
    assert read_differs(read, None)  # deleted
    assert read_differs(None, {"id": "l1", "user_id": None})  # appeared
    assert not read_differs(None, None)


# ---- the row log behind the lookup guard (pure) ---------------------------------------------

LISTS = ("public", "lists")


def test_row_changes_tell_a_lookup_which_rows_its_snapshot_lacks() -> None:
    log = RecentRowChanges()
    log.follow(LISTS, 10)
    log.record([("public", "lists", ("a",)), ("public", "lists", ("b",))], 11, 500)
    log.record([("public", "lists", ("b",))], 12, 502)  # b's last change
    sees_500 = Snapshot.parse("501:503:502")  # sees 500, not 502
    assert log.covers([LISTS], 10)
    assert log.unseen([("public", "lists", ("a",))], sees_500) is None
    assert log.unseen([("public", "lists", ("b",))], sees_500) == 502  # its xid: to wait for
    assert log.unseen([("public", "lists", ("c",))], sees_500) is None  # never changed
    assert log.unseen([("public", "lists", ("b",))], Snapshot.parse("503:503:")) is None


def test_row_changes_cover_only_what_they_logged() -> None:
    log = RecentRowChanges(max_rows=2)
    assert not log.covers([LISTS], 5)  # not followed
    log.follow(LISTS, 5)
    log.follow(LISTS, 9)  # already followed: from 5 on still
    assert log.covers([LISTS], 5) and not log.covers([LISTS], 4)
    assert not log.covers([LISTS, ("public", "users")], 5)
    for number, key in enumerate("abc", start=6):
        log.record([("public", "lists", (key,))], number, 600 + number)
    # a (delivered as 6) was dropped for room: changes after 6 are all there
    assert log.covers([LISTS], 6) and not log.covers([LISTS], 5)
    log.restart(LISTS, 20)  # truncated
    assert not log.covers([LISTS], 19) and log.covers([LISTS], 20)


def test_row_changes_forget_a_history_the_server_left() -> None:
    log = RecentRowChanges()
    log.follow(LISTS, 10)
    log.record([("public", "lists", ("b",))], 12, 502)
    log.forget(12)  # a failover to a server that never had transaction 502
    # No snapshot there is asked to see 502 (another transaction may get that xid) ...
    assert log.unseen([("public", "lists", ("b",))], Snapshot.parse("501:503:502")) is None
    # ... and a lookup from before the fork is not vouched for by the log.
    assert not log.covers([LISTS], 11) and log.covers([LISTS], 12)


# ---- batches: functions waiting at once run under one snapshot ---------------------------


async def _create_lists(db_dsn: str) -> None:
    """Table ``lists`` with one row: list ``l`` of user ``u1``."""
    await trio.to_thread.run_sync(sql, db_dsn, "CREATE TABLE lists (id text primary key, "
                                  "user_id text)", "INSERT INTO lists VALUES ('l', 'u1')")


def _reads_list(ran: list[str], name: str) -> Callable[[SqlRowLookup], Any]:
    """A function that notes ``name`` in ``ran`` when it runs and returns list ``l``'s row."""
    def run(lookup: SqlRowLookup) -> Any:
        ran.append(name)
        return lookup.row("lists", "l", columns=["user_id"])
    return run


async def _run_batch_of(database: Database, resolvers: list[Any], *, delivered: int = 0,
                        cancel: frozenset[int] = frozenset(),
                        same_as: list[Any] | None = None
                        ) -> tuple[BatchedLookups, list[Any]]:
    """Queue every resolver (with its ``same_as`` key, if given) before the batch runner
    starts (so they form one batch); the outcome of each: its LookupResult, or the exception
    it raised (None: cancelled)."""
    lookups = BatchedLookups(database, lambda: delivered)
    outcomes: list[Any] = [None] * len(resolvers)
    keys = same_as or [None] * len(resolvers)

    async def one(index: int, resolve: Any, task_status: Any = trio.TASK_STATUS_IGNORED
                  ) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                outcomes[index] = await lookups.run(resolve, same_as=keys[index],
                                                    publication=f"p{keys[index]}")
            except Exception as exc:
                outcomes[index] = exc

    async with trio.open_nursery() as waiters:
        scopes = [await waiters.start(one, i, r) for i, r in enumerate(resolvers)]
        await trio.testing.wait_all_tasks_blocked()
        for index in cancel:
            scopes[index].cancel()
        async with trio.open_nursery() as runner:
            runner.start_soon(lookups.serve)
            await trio.testing.wait_all_tasks_blocked()
            while any(o is None for i, o in enumerate(outcomes) if i not in cancel):
                await trio.sleep(0.01)
            runner.cancel_scope.cancel()
    return lookups, outcomes


async def test_functions_waiting_at_once_share_one_snapshot_and_each_row_read(
        db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fifty subscriptions' functions reading the same list: one transaction, one read of
    the row; each function still gets its own copy and records its own dependencies."""
    await _create_lists(db_dsn)
    reads = count_row_reads(monkeypatch)

    def resolve(user_id: str) -> Any:
        def run(lookup: SqlRowLookup) -> Any:
            row = lookup.row("lists", "l", columns=["user_id"])
            assert row is not None
            mine = row["user_id"] == user_id
            row["user_id"] = "scribbled"  # the function's own copy
            return mine
        return run

    database = Database(db_dsn, size=2)
    try:
        lookups, outcomes = await _run_batch_of(
            database, [resolve("u1" if i % 2 else "u2") for i in range(50)], delivered=7)
    finally:
        database.close()
    assert lookups.batches == 1 and reads[0] == 1
    assert [o.value for o in outcomes] == [bool(i % 2) for i in range(50)]
    for outcome in outcomes:
        assert outcome.dependencies == {("public", "lists", ("l",)): {"id": "l",
                                                                      "user_id": "u1"}}
        assert outcome.guard[0] == 7 and outcome.guard[1] is outcomes[0].guard[1]


async def test_a_failing_function_fails_alone(db_dsn: str) -> None:
    """A function that raises gets its own error; one whose SQL fails also ends the
    transaction, so the functions after it run in a new one; a cancelled waiter's function
    does not run at all."""
    await _create_lists(db_dsn)
    ran: list[str] = []
    reads = functools.partial(_reads_list, ran)

    def raises(lookup: SqlRowLookup) -> Any:
        ran.append("raises")
        raise ValueError("a bug in a publication")

    def bad_sql(lookup: SqlRowLookup) -> Any:
        ran.append("bad_sql")
        return lookup.row("lists", "l", columns=["no_such_column"])

    database = Database(db_dsn, size=2)
    try:
        lookups, outcomes = await _run_batch_of(
            database, [reads("first"), raises, reads("second"), bad_sql, reads("third"),
                       reads("cancelled")], cancel=frozenset({5}))
    finally:
        database.close()
    assert ran == ["first", "raises", "second", "bad_sql", "third"]
    assert lookups.batches == 2  # the third ran in a transaction of its own
    row = {"id": "l", "user_id": "u1"}
    assert outcomes[0].value == row and outcomes[2].value == row and outcomes[4].value == row
    assert isinstance(outcomes[1], ValueError)
    assert isinstance(outcomes[3], psycopg.errors.UndefinedColumn)
    assert outcomes[5] is None
    assert outcomes[4].guard[1] is not outcomes[0].guard[1]  # another snapshot


async def test_runs_of_the_same_inputs_in_a_batch_share_one_result(db_dsn: str) -> None:
    """Runs with equal ``same_as`` keys (the same publication, parameters and user) run the
    function once per batch and share its result; other keys, and runs without a key, run
    their own; a run that failed shares nothing (the next one with its key runs itself)."""
    await _create_lists(db_dsn)
    ran: list[str] = []
    reads = functools.partial(_reads_list, ran)

    def fails(name: str) -> Any:
        def run(lookup: SqlRowLookup) -> Any:
            ran.append(name)
            raise ValueError(name)
        return run

    database = Database(db_dsn, size=2)
    try:
        lookups, outcomes = await _run_batch_of(
            database,
            [reads("a1"), reads("b1"), reads("a2"), reads("none1"), reads("none2"),
             fails("c1"), fails("c2"), reads("a3")],
            same_as=["a", "b", "a", None, None, "c", "c", "a"])
    finally:
        database.close()
    assert ran == ["a1", "b1", "none1", "none2", "c1", "c2"]
    assert lookups.outcomes == {("pa", "ok"): 1, ("pa", "shared"): 2, ("pb", "ok"): 1,
                                ("pNone", "ok"): 2, ("pc", "error"): 2}
    assert [lookups.count(o) for o in ("ok", "shared", "error", "too_early")] == [4, 2, 2, 0]
    assert outcomes[2] is outcomes[0] and outcomes[7] is outcomes[0]
    assert outcomes[1] is not outcomes[0] and outcomes[4] is not outcomes[3]
    assert outcomes[0].dependencies == {("public", "lists", ("l",)): {"id": "l",
                                                                      "user_id": "u1"}}
    assert [str(o) for o in outcomes[5:7]] == ["c1", "c2"]


async def test_a_result_is_reused_by_later_batches_until_a_table_it_read_changes(
        db_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A later run with the same inputs takes a recent result (its guard included) instead of
    running; not once a table it read changed after its snapshot began, not past
    _REUSE_SECONDS, not when its snapshot lacks the run's transaction, never without a key,
    and never an error."""
    await _create_lists(db_dsn)
    ran: list[str] = []
    reads = functools.partial(_reads_list, ran)
    changed: dict[str, int] = {}  # table name -> delivery number of its last change
    delivered = 0

    def changed_since(tables: Any, number: int) -> bool:
        return any(changed.get(table, 0) > number for _, table in tables)

    def fails(lookup: SqlRowLookup) -> Any:
        ran.append("fails")
        raise ValueError("no")

    database = Database(db_dsn, size=2)
    lookups = BatchedLookups(database, lambda: delivered, changed_since)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookups.serve)
            first = await lookups.run(reads("first"), same_as="a", publication="p")
            again = await lookups.run(reads("again"), same_as="a", publication="p")
            assert again is first and ran == ["first"]
            assert lookups.outcomes == {("p", "ok"): 1, ("p", "shared"): 1}
            await lookups.run(reads("other key"), same_as="b")
            await lookups.run(reads("no key"))
            await lookups.run(reads("no key again"))
            assert ran == ["first", "other key", "no key", "no key again"]

            # A change to another table leaves it reusable; one to lists does not.
            delivered = 3
            changed["users"] = 3
            assert await lookups.run(reads("x"), same_as="a") is first
            changed["lists"] = 3
            fresh = await lookups.run(reads("after a change"), same_as="a")
            assert fresh is not first and ran[-1] == "after a change"
            assert fresh.guard[0] == 3
            assert await lookups.run(reads("x"), same_as="a") is fresh

            # A run that must see a transaction its snapshot lacks runs itself.
            (xid,), = await trio.to_thread.run_sync(lambda: sql(
                db_dsn, "SELECT txid_current() % (2^32)::bigint"))
            seen = await lookups.run(reads("must see"), after_xid=xid, same_as="a")
            assert seen is not fresh and ran[-1] == "must see"

            monkeypatch.setattr(lookup_module, "_REUSE_SECONDS", 0.05)
            await trio.sleep(0.1)
            assert await lookups.run(reads("too old"), same_as="a") is not seen
            assert ran[-1] == "too old"

            for _ in range(2):
                with pytest.raises(ValueError):
                    await lookups.run(fails, same_as="f")
            assert ran[-2:] == ["fails", "fails"]
            nursery.cancel_scope.cancel()
    finally:
        database.close()


async def test_a_batch_chosen_as_a_deadlock_victim_runs_again(db_dsn: str) -> None:
    """A function waiting for a lock can end up in a deadlock with a writer, and PostgreSQL
    may cancel its read to break it: the batch runs again in a new transaction instead of
    failing the subscription."""
    await _create_lists(db_dsn)
    await trio.to_thread.run_sync(sql, db_dsn, "CREATE TABLE owners (id text primary key)",
                                  "INSERT INTO owners VALUES ('u1')")
    ran: list[str] = []

    def owner_of_list(lookup: SqlRowLookup) -> Any:
        ran.append("run")
        row = lookup.row("lists", "l", columns=["user_id"])  # holds lists ...
        assert row is not None
        return lookup.row("owners", row["user_id"])  # ... while it waits for owners

    database = Database(db_dsn, size=2)
    lookups = BatchedLookups(database, lambda: 0)
    locker = await trio.to_thread.run_sync(lambda: psycopg.connect(db_dsn, autocommit=True))
    try:
        locker.execute("BEGIN")
        locker.execute("SET LOCAL deadlock_timeout = '60s'")  # (the read's is 1 s)
        locker.execute("LOCK TABLE owners IN ACCESS EXCLUSIVE MODE")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookups.serve)
            result: list[Any] = []

            async def run() -> None:
                result.append(await lookups.run(owner_of_list, publication="p"))
            nursery.start_soon(run)
            with trio.fail_after(10):
                while not await trio.to_thread.run_sync(lambda: sql(
                        db_dsn, "SELECT 1 FROM pg_locks WHERE NOT granted "
                                "AND relation = 'owners'::regclass")):
                    await trio.sleep(0.01)
            await trio.to_thread.run_sync(locker.execute,
                                          "LOCK TABLE lists IN ACCESS EXCLUSIVE MODE")
            locker.execute("COMMIT")
            with trio.fail_after(10):
                while not result:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(locker.close)
        database.close()
    assert result[0].value == {"id": "u1"}
    assert ran == ["run", "run"] and database.transient_retries == 1
    assert lookups.outcomes == {("p", "ok"): 1}


def test_inputs_keys_tell_parameters_apart_by_value_and_type() -> None:
    from cdcddp.publish.definition import Cursor, Publication

    def source(params: Any, user_id: Any, lookup: Any) -> Cursor:
        return Cursor("lists")

    publication, other = Publication("p", source), Publication("q", source)
    key = publication.inputs_key
    assert key([{"a": 1, "b": [1, 2]}], "u") == key([{"b": [1, 2], "a": 1}], "u")
    assert key([{"a": 1}], "u") != key([{"a": 1}], "v")
    assert key([{"a": 1}], None) != other.inputs_key([{"a": 1}], None)
    assert len({key([1]), key([1.0]), key([True]), key(["1"]), key([[1]]), key([])}) == 6
    assert key([{"a": {1, 2}}]) is None  # (not an EJSON value) cannot be hashed: no key


async def test_a_function_waiting_for_a_commit_holds_up_no_other(db_dsn: str) -> None:
    """A re-run must see the transaction that changed its row. While that commit waits for a
    synchronous standby (decoded, not yet visible), the function waits, queued again a
    moment later (until its timeout); functions batched with it meanwhile run at once."""
    await _create_lists(db_dsn)

    def owner(lookup: SqlRowLookup) -> Any:
        row = lookup.row("lists", "l", columns=["user_id"])
        return row and row["user_id"]

    database = Database(db_dsn, size=2)
    lookups = BatchedLookups(database, lambda: 0)
    outcomes: dict[str, Any] = {}

    async def run(name: str, after_xid: int, timeout: float = 10.0) -> None:
        outcomes[name] = (await lookups.run(owner, after_xid, timeout)).value

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lookups.serve)
            async with held_commit(db_dsn, "UPDATE lists SET user_id = 'u2'") as held:
                while not held.waits():
                    await trio.sleep(0.01)
                (xid,), = await trio.to_thread.run_sync(lambda: sql(
                    db_dsn, "SELECT backend_xid::text::bigint FROM pg_stat_activity "
                            "WHERE pid = %s", params=(held.pid,)))
                nursery.start_soon(run, "after the commit", xid)
                while lookups.batches < 3:  # tried, and queued again
                    await trio.sleep(0.01)
                assert lookups.count("too_early") >= 2
                with trio.fail_after(5):
                    await run("any snapshot", 0)
                    # Past its timeout, a function waits no more: any snapshot will do.
                    await run("gave up waiting", xid, timeout=0.05)
                assert outcomes == {"any snapshot": "u1", "gave up waiting": "u1"}
            with trio.fail_after(5):
                while "after the commit" not in outcomes:
                    await trio.sleep(0.01)
            assert outcomes["after the commit"] == "u2"
            nursery.cancel_scope.cancel()
    finally:
        database.close()
