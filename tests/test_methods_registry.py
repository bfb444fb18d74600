"""Typed methods: parameter validation, errors, the per-call transaction, xid, random ids."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
import trio
from pydantic import BaseModel, Field

from cdcddp.db import Database
from cdcddp.ddp.messages import UNDEFINED, MeteorError
from cdcddp.ddp.meteor_random import RandomStream
from cdcddp.methods import ConnectionInfo, MethodContext, Methods, invoke
from tests.methods_support import Client, database  # noqa: F401  (fixture)

methods = Methods()


class InsertArgs(BaseModel):
    listId: str
    text: str = Field(min_length=1)


class Point(BaseModel):
    x: int
    y: int


@methods.method("things.insert")
async def things_insert(ctx: MethodContext, args: InsertArgs) -> str:
    thing_id = ctx.new_id("todos")
    await ctx.execute("INSERT INTO things (id, list_id, text) VALUES (%s, %s, %s)",
                      (thing_id, args.listId, args.text))
    return thing_id


@methods.method("add")
async def add(ctx: MethodContext, a: int, b: int = 10) -> int:
    return a + b


@methods.method("echo")
async def echo(ctx: MethodContext, *values: object) -> list[object]:
    return list(values)


@methods.method("points.mirror", positional=True)
async def mirror(ctx: MethodContext, point: Point) -> Point:
    return Point(x=point.y, y=point.x)


@methods.method("refuse")
async def refuse(ctx: MethodContext) -> None:
    await ctx.execute("INSERT INTO things (id, list_id, text) VALUES ('r', 'l', 'refused')")
    ctx.set_user_id("someone", "hash")
    raise MeteorError("not-authorized", "No, thanks", {"why": "test"})


@methods.method("crash")
async def crash(ctx: MethodContext) -> None:
    await ctx.execute("INSERT INTO things (id, list_id, text) VALUES ('c', 'l', 'crashed')")
    raise RuntimeError("secret internals: password=hunter2")


@methods.method("count")
async def count(ctx: MethodContext) -> int:
    return await ctx.fetchval("SELECT count(*) FROM things")


@methods.method("unsendable")
async def unsendable(ctx: MethodContext) -> object:
    await ctx.execute("INSERT INTO things (id, list_id, text) VALUES ('u', 'l', 'unsendable')")
    return object()


@methods.method("slow.insert")
async def slow_insert(ctx: MethodContext) -> None:
    await ctx.execute("INSERT INTO things (id, list_id, text) VALUES ('s', 'l', 'slow')")
    await trio.sleep_forever()


@methods.method("things.insertTogether")
async def insert_together(ctx: MethodContext, texts: list[str]) -> list[int]:
    """Its statements from tasks running at once: still one transaction."""
    xids: list[int] = []

    async def insert(text: str) -> None:
        await ctx.execute("INSERT INTO things (id, list_id, text) VALUES (%s, 'l', %s)",
                          (ctx.new_id("todos"), text))
        xids.append(int(await ctx.fetchval("SELECT pg_current_xact_id()::text")))

    async with trio.open_nursery() as nursery:
        for text in texts:
            nursery.start_soon(insert, text)
    return xids


@methods.method("things.texts")
async def things_texts(ctx: MethodContext, thing_id: str) -> list[object]:
    """The same thing read each way a method can: every one a statement run many times."""
    def read(conn: Any) -> object:
        return conn.execute("SELECT text FROM things WHERE id = %s", (thing_id,)).fetchone()[0]

    await ctx.execute("UPDATE things SET list_id = list_id WHERE id = %s", (thing_id,))
    return [await ctx.fetchval("SELECT text FROM things WHERE id = %s", (thing_id,)),
            (await ctx.fetchall("SELECT * FROM things WHERE id = %s", (thing_id,)))[0][2],
            await ctx.run_sync(read)]


@methods.method("noop")
async def noop(ctx: MethodContext) -> None:
    return None


@methods.method("when")
async def when(ctx: MethodContext) -> dict[str, object]:
    return {"at": datetime(2024, 1, 2, tzinfo=UTC), "user": ctx.user_id,
            "connection": ctx.connection_id, "method": ctx.method_id}


@pytest.fixture
async def client(database: Database) -> Client:  # noqa: F811
    await database.execute(
        "CREATE TABLE things (id text PRIMARY KEY, list_id text NOT NULL, text text NOT NULL)")
    return Client(methods, database)


async def things(db: Database) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in await db.fetchall(
        "SELECT id, text FROM things ORDER BY id")]


# ---- parameters ------------------------------------------------------------------------------

async def test_object_style_params_are_validated(client: Client) -> None:
    error = await client.fails("things.insert", {"text": ""})
    assert error.error == 400
    assert error.reason is not None and error.reason.startswith("Match failed")
    locations = {tuple(d["loc"]) for d in error.details}
    assert locations == {(0, "listId"), (0, "text")}
    assert all({"loc", "msg", "type"} == set(d) for d in error.details)  # never the input
    assert "listId" in error.reason
    # Not an object, or two arguments: refused too.
    assert (await client.fails("things.insert", "x")).error == 400
    assert (await client.fails("things.insert", {"listId": "l", "text": "t"}, 2)).error == 400
    assert await things(client.database) == []


async def test_positional_params_are_validated(client: Client) -> None:
    assert await client.ok("add", 1, 2) == 3
    assert await client.ok("add", 5) == 15  # default
    error = await client.fails("add", "not a number", 2)
    assert error.error == 400 and [d["loc"] for d in error.details] == [[0]]
    error = await client.fails("add")
    assert error.details[0]["loc"] == [0] and "'a'" in error.details[0]["msg"]
    error = await client.fails("add", 1, 2, 3)
    assert error.error == 400 and "at most 2" in (error.reason or "")
    assert await client.ok("echo", 1, "two", [3]) == [1, "two", [3]]
    # A model as a positional parameter, and a model returned: dumped to a plain object.
    assert await client.ok("points.mirror", {"x": 1, "y": 2}) == {"x": 2, "y": 1}
    error = await client.fails("points.mirror", {"x": 1})
    assert error.details[0]["loc"] == [0, "y"]


async def test_unknown_method_is_404(client: Client) -> None:
    error = await client.fails("nope")
    assert (error.error, error.reason) == (404, "Method 'nope' not found")


async def test_bad_declarations_are_refused() -> None:
    registry = Methods()

    def sync_method(ctx: MethodContext) -> None:
        return None

    async def keyword_only(ctx: MethodContext, *, flag: bool) -> None:
        return None

    async def not_a_model(ctx: MethodContext, a: int) -> None:
        return None

    with pytest.raises(TypeError):
        registry.method("sync")(sync_method)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        registry.method("kw")(keyword_only)
    with pytest.raises(TypeError):
        registry.method("obj", positional=False)(not_a_model)
    registry.method("ok")(not_a_model)
    with pytest.raises(ValueError):
        registry.method("ok")(not_a_model)


# ---- errors ----------------------------------------------------------------------------------

async def test_meteor_error_passes_through_and_rolls_back(client: Client) -> None:
    outcome = await client.call("refuse")
    assert outcome.error == MeteorError("not-authorized", "No, thanks", {"why": "test"})
    assert outcome.login is None  # set_user_id of a failed call does not take effect
    assert outcome.xid is None
    assert await things(client.database) == []


async def test_other_exceptions_are_500_without_internals(
        client: Client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        error = await client.fails("crash")
    assert (error.error, error.reason, error.details) == (500, "Internal server error", None)
    assert "hunter2" not in repr(error.to_ddp())
    assert any(r.exc_info and "crash" in r.getMessage() for r in caplog.records)  # logged
    assert await things(client.database) == []


async def test_unsendable_result_is_500_and_rolls_back(client: Client) -> None:
    assert (await client.fails("unsendable")).error == 500
    assert await things(client.database) == []


# ---- the transaction -------------------------------------------------------------------------

async def test_commit_on_return_reports_the_xid(client: Client) -> None:
    outcome = await client.call("things.insert", {"listId": "l1", "text": "milk"})
    assert outcome.error is None
    assert await things(client.database) == [(outcome.result, "milk")]
    # The reported xid is the writer's: the row's xmin (32-bit, as wal2json reports it).
    (xmin,) = (await client.database.fetchall("SELECT xmin::text::bigint FROM things"))[0]
    assert outcome.xid == xmin
    assert outcome.commit.xid8 is not None and outcome.commit.xid8 & 0xFFFFFFFF == xmin


async def test_read_only_and_database_free_calls_have_no_xid(client: Client) -> None:
    outcome = await client.call("count")
    assert (outcome.result, outcome.xid, outcome.commit.xid8) == (0, None, None)
    outcome = await client.call("add", 1, 1)
    assert (outcome.result, outcome.xid) == (2, None)


async def test_each_call_is_its_own_transaction(client: Client) -> None:
    first = await client.call("things.insert", {"listId": "l", "text": "a"})
    second = await client.call("things.insert", {"listId": "l", "text": "b"})
    assert first.xid is not None and second.xid is not None and first.xid != second.xid
    assert await client.ok("count") == 2


async def test_a_migration_between_calls_fails_none_of_their_statements(
        client: Client, database: Database) -> None:  # noqa: F811
    """psycopg prepares a statement run often enough; prepared, a read whose columns a
    migration retyped would fail once on each pooled connection."""
    await client.ok("things.insert", {"listId": "l", "text": "a"}, random_seed="seed")
    (thing_id,), = await database.fetchall("SELECT id FROM things")
    for _ in range(8):
        assert await client.ok("things.texts", thing_id) == ["a", "a", "a"]
    with psycopg.connect(database.dsn, autocommit=True) as other:
        other.execute("ALTER TABLE things ALTER COLUMN text TYPE varchar(100)")
        other.execute("ALTER TABLE things ALTER COLUMN list_id TYPE varchar(100)")
    for _ in range(3):
        assert await client.ok("things.texts", thing_id) == ["a", "a", "a"]


async def test_statements_run_at_once_by_one_call_share_its_transaction(
        client: Client) -> None:
    outcome = await client.call("things.insertTogether", ["a", "b", "c"])
    assert outcome.error is None
    assert len(set(outcome.result)) == 1 and outcome.commit.xid8 == outcome.result[0]
    assert sorted(text for _, text in await things(client.database)) == ["a", "b", "c"]
    # Each call held one pooled connection, and gave it back.
    for _ in range(2 * client.database.size):
        assert (await client.call("things.insertTogether", ["x"])).error is None


async def test_cancelled_call_rolls_back(client: Client) -> None:
    with trio.move_on_after(0.3) as scope:
        await client.call("slow.insert")
    assert scope.cancelled_caught
    assert await things(client.database) == []
    assert await client.ok("count") == 0  # the pool still works


async def test_none_result_is_undefined_and_values_are_ejson(client: Client) -> None:
    outcome = await invoke(methods, "when", None, ConnectionInfo("c9"), method_id="m7")
    assert outcome.result == {"at": datetime(2024, 1, 2, tzinfo=UTC), "user": None,
                              "connection": "c9", "method": "m7"}
    outcome = await invoke(methods, "echo", [], ConnectionInfo("c9"), method_id="m8")
    assert outcome.result == []
    outcome = await client.call("noop")
    assert outcome.error is None and outcome.result is UNDEFINED  # `result` without a value


# ---- random ids ------------------------------------------------------------------------------

async def test_random_seed_gives_the_clients_id(client: Client) -> None:
    seed = "b2c4e6a8f0d1c3e5a7b9"
    inserted = await client.ok("things.insert", {"listId": "l", "text": "t"}, random_seed=seed)
    # Meteor's own output for this seed and scope /collection/todos (tests/js/random_vectors.js)
    assert inserted == "EQxrD4ZJ49N6MwnDK"
    assert inserted == RandomStream(seed).id_for_collection("todos")
    # Without a seed: a fresh random id of Meteor's shape.
    other = await client.ok("things.insert", {"listId": "l", "text": "u"})
    assert len(other) == 17 and other != inserted
    assert {r[0] for r in await things(client.database)} == {inserted, other}
