"""A live-data test app (declarative publications over one ``items`` table), a running server
with the engine on a test database, and SQL helpers for expected results."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import AsyncIterator, Collection, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import trio
from pydantic import BaseModel

from cdcddp.app import App, PublicationContext
from cdcddp.client import DDPClient, MeteorError
from cdcddp.db import Database
from cdcddp.methods import MethodContext, Methods
from cdcddp.metrics import Metrics
from cdcddp.publish.definition import Cursor, Publication, Publications
from cdcddp.publish.filters import C, Param, UserId
from cdcddp.publish.ids import pk_to_wire_id
from cdcddp.publish.livedata import LiveData, LiveDataConfig
from cdcddp.publish.lookup import RowLookup
from cdcddp.server.config import ServerConfig
from cdcddp.server.connection import Connection
from cdcddp.server.server import Server
from tests.pg_support import sql, wait_replayed
from tests.server_support import fast_config

SCHEMA = """
CREATE TABLE items (
    id serial PRIMARY KEY,
    owner text,
    category text NOT NULL,
    title text,
    body text,
    rank int NOT NULL DEFAULT 0,
    version int NOT NULL DEFAULT 0
);
CREATE TABLE other (id serial PRIMARY KEY, note text);
"""

# The same items, partitioned (see cdcddp.publish.partitions), at two levels, by a hash of
# the id: a row whose id changes moves to another partition.
PARTITIONED_SCHEMA = SCHEMA.replace("""    version int NOT NULL DEFAULT 0
);""", """    version int NOT NULL DEFAULT 0
) PARTITION BY HASH (id);
CREATE TABLE items_h0 PARTITION OF items FOR VALUES WITH (MODULUS 2, REMAINDER 0)
    PARTITION BY HASH (id);
CREATE TABLE items_h0_0 PARTITION OF items_h0 FOR VALUES WITH (MODULUS 4, REMAINDER 0);
CREATE TABLE items_h0_2 PARTITION OF items_h0 FOR VALUES WITH (MODULUS 4, REMAINDER 2);
CREATE TABLE items_h1 PARTITION OF items FOR VALUES WITH (MODULUS 2, REMAINDER 1);""")
assert PARTITIONED_SCHEMA != SCHEMA

FIELDS = ["owner", "category", "title", "body", "rank", "version"]
TOP_LIMIT = 3  # items.top's limit
COLUMNS = ", ".join(["id", *FIELDS])


class CategoryParams(BaseModel):
    category: str


class RankParams(BaseModel):
    min_rank: int


class GateParams(BaseModel):
    gate: int


gated_publications = Publications()


@gated_publications.publication("items.gated", params=GateParams)
def gated_items(params: GateParams, user_id: str | None, lookup: RowLookup) -> Cursor | None:
    """The items of the category row ``gate`` of ``other`` names in its note (a reactive
    lookup: the subscription follows the note)."""
    found = lookup.row("other", params.gate, columns=["note"])
    if found is None or found["note"] is None:
        return None
    return Cursor("items", fields=FIELDS, filter=C("category") == found["note"])


@gated_publications.publication("gates.withItems", params=GateParams)
def gate_with_items(params: GateParams, user_id: str | None, lookup: RowLookup
                    ) -> list[Cursor]:
    """The gate's row itself (collection ``gates``) and, while its note names one, that
    category's items: a function of several cursors, as many as the row it reads allows."""
    found = lookup.row("other", params.gate, columns=["note"])
    if found is None:
        return []
    gate = Cursor("other", collection="gates", fields=["note"], filter=C("id") == params.gate)
    if found["note"] is None:
        return [gate]
    return [gate, Cursor("items", fields=FIELDS, filter=C("category") == found["note"])]


session_methods = Methods()


@session_methods.method("test.logInAs")
async def log_in_as(ctx: MethodContext, user: str | None) -> None:
    """Logs the connection in as ``user`` (None: out), as a login method would: its
    subscriptions follow the new user before the result is sent."""
    ctx.set_user_id(user)


def build_live_app() -> App:
    app = App("live-test")
    app.include_methods(session_methods)
    app.add_publication(Publication("items.all", Cursor("items", fields=FIELDS)))
    app.add_publication(Publication(
        "items.byCategory",
        Cursor("items", fields=FIELDS, filter=C("category") == Param("category")),
        params=CategoryParams))
    app.add_publication(Publication(
        "items.ranked", Cursor("items", fields=FIELDS, filter=C("rank") >= Param("min_rank")),
        params=RankParams, positional_params=True))
    app.add_publication(Publication(
        "items.mine", Cursor("items", fields=FIELDS, filter=C("owner") == UserId()),
        requires_user=True))
    # The same in a collection of its own: no other subscription hides what it publishes.
    app.add_publication(Publication(
        "mine.items", Cursor("items", collection="mine", fields=FIELDS,
                             filter=C("owner") == UserId()),
        requires_user=True))
    # The first rows by rank, then title (a limited cursor: see cdcddp.publish.ordering).
    app.add_publication(Publication(
        "items.top", Cursor("items", fields=FIELDS, filter=C("category") == Param("category"),
                            sort=[("rank", "desc"), "title"], limit=TOP_LIMIT),
        params=CategoryParams))
    # The titles only (another field set on the same collection: the merge box unites them).
    app.add_publication(Publication(
        "items.titles", Cursor("items", fields=["title", "version"],
                               filter=C("category").in_(["a", "b"]))))

    app.include_publications(gated_publications)

    @app.publish("handler.note")
    async def handler_note(ctx: PublicationContext, doc_id: str) -> None:
        ctx.added("items", doc_id, {"note": "from a handler"})
        ctx.ready()

    return app


# ---- expected results ----------------------------------------------------------------------

PUBLICATION_FILTERS: dict[str, tuple[str, Any]] = {
    "items.all": ("TRUE", lambda p: ()),
    "items.byCategory": ("category = %s", lambda p: (p[0]["category"],)),
    "items.ranked": ("rank >= %s", lambda p: (p[0],)),
    "items.gated": ("category = (SELECT note FROM other WHERE id = %s)",
                    lambda p: (p[0]["gate"],)),
    "gates.withItems": ("category = (SELECT note FROM other WHERE id = %s)",
                        lambda p: (p[0]["gate"],)),
    "items.top": (f'category = %s ORDER BY rank DESC, title COLLATE "C", id LIMIT {TOP_LIMIT}',
                  lambda p: (p[0]["category"],)),
}




async def asql(dsn: str, *statements: str, params: Any = None) -> Any:
    return await trio.to_thread.run_sync(lambda: sql(dsn, *statements, params=params))


USER_PUBLICATIONS = {"items.mine": "items", "mine.items": "mine"}  # owner = the user


def expected_view(dsn: str, subscriptions: list[tuple[str, list[Any]]],
                  user: str | None = None, collection: str = "items"
                  ) -> dict[str, dict[str, Any]]:
    """What a client logged in as ``user`` (None: anonymous) and subscribed to
    ``subscriptions`` must hold in ``collection``: the union of their rows."""
    view: dict[str, dict[str, Any]] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        if collection == "gates":  # gates.withItems publishes its gate's row there
            for name, params in subscriptions:
                if name == "gates.withItems":
                    for gate, note in conn.execute("SELECT id, note FROM other WHERE id = %s",
                                                   (params[0]["gate"],)):
                        view[pk_to_wire_id((gate,))] = {"note": note}
            return view
        for name, params in subscriptions:
            if USER_PUBLICATIONS.get(name, "items") != collection:
                continue
            if name in USER_PUBLICATIONS:  # an anonymous subscriber gets nothing
                if user is None:
                    continue
                where, args = "owner = %s", (user,)
            else:
                where, make_args = PUBLICATION_FILTERS[name]
                args = make_args(params)
            for row in conn.execute(f"SELECT {COLUMNS} FROM items WHERE {where}", args):
                view[pk_to_wire_id(row[:1])] = dict(zip(FIELDS, row[1:], strict=True))
    return view


# ---- a server with the engine ---------------------------------------------------------------

_slots = itertools.count(1)


@dataclass
class LiveServer:
    server: Server
    port: int
    dsn: str

    @property
    def live(self) -> LiveData:
        assert self.server.live is not None
        return self.server.live

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/websocket"

    def connection_of(self, client: DDPClient) -> Connection:
        for connection in self.server.connections:
            if connection.connection_id == client.session:
                return connection
        raise LookupError("no such connection")


@asynccontextmanager
async def live_server(dsn: str, app: App | None = None, *, schema: str = SCHEMA,
                      server_config: ServerConfig | None = None,
                      metrics: Metrics | None = None, observer_errors: int = 0,
                      resyncs: bool | Collection[str] = False,
                      primary_dsn: str | None = None,
                      **live_options: Any) -> AsyncIterator[LiveServer]:
    """A server with the engine. A test that ends normally must have seen exactly
    ``observer_errors`` observer failures (tests that inject one say so), and no resync at
    all unless it says it may cause some (``resyncs``: True, or the reasons it may cause,
    such as ``{"schema_change"}``): a resync repairs the clients' state, so that state alone
    would hide a bug.
    ``primary_dsn``: ``dsn`` is its standby, which the server streams from while every query
    goes to the primary (as ``cdcddp serve --primary-dsn`` does); the schema is replayed on
    the standby before the server starts."""
    if schema:
        await asql(primary_dsn or dsn, schema)
    if primary_dsn is not None:
        await trio.to_thread.run_sync(wait_replayed, primary_dsn, dsn)
    options: dict[str, Any] = {"temporary_slot": True,
                               "stream_options": {"status_interval": 0.2}, **live_options}
    config = LiveDataConfig(slot=f"live_{os.getpid()}_{next(_slots)}", **options)
    primary = None if primary_dsn is None else Database(primary_dsn)
    server = Server(app or build_live_app(), server_config or fast_config(), dsn=dsn,
                    live_config=config, metrics=metrics, database=primary)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(server.serve, "127.0.0.1", 0)
        try:
            yield LiveServer(server, port, dsn)
            assert server.live is not None
            failures = server.live.resync_reasons["observer_error"]
            assert failures == observer_errors, (
                f"{failures} observer failure(s) resynced during the test (see the log)")
            # (A limited cursor's rows read again are not a repair: they are how it works.)
            allowed = {"limit_requery", *(() if isinstance(resyncs, bool) else resyncs)}
            unexpected = {reason: n for reason, n in server.live.resync_reasons.items()
                          if n and reason not in allowed}
            assert resyncs is True or observer_errors or not unexpected, (
                f"unexpected resyncs: {unexpected}")
        finally:
            nursery.cancel_scope.cancel()
            if server.database is not None:
                server.database.close()


async def refused_in_one_line(client: DDPClient, caplog: pytest.LogCaptureFixture, name: str,
                              *params: Any) -> str:
    """Subscribe to ``name``: it must be refused with a 500, and the log must say why in one
    error line (no traceback), which is returned."""
    caplog.clear()
    with pytest.raises(MeteorError) as refused:
        await client.subscribe(name, *params)
    assert refused.value.error == 500
    (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert record.exc_info is None
    return record.getMessage()


async def stopped_by(client: DDPClient, caplog: pytest.LogCaptureFixture, dsn: str,
                     subs: Iterable[str], *statements: str) -> list[str]:
    """Run ``statements``: each of the subscriptions ``subs`` must stop with a 500; returns
    the error lines logged meanwhile."""
    caplog.clear()
    await asql(dsn, *statements)
    await client.wait_for(lambda: set(subs) <= set(client.stopped_subs))
    for sub in subs:
        stopped = client.stopped_subs[sub]
        assert stopped is not None and stopped.error == 500
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def store(client: DDPClient, collection: str = "items") -> dict[str, dict[str, Any]]:
    return client.collections.get(collection, {})


async def wait_store(client: DDPClient, expected: dict[str, dict[str, Any]],
                     collection: str = "items", timeout: float = 10.0) -> None:
    try:
        await client.wait_for(lambda: store(client, collection) == expected, timeout)
    except trio.TooSlowError:
        got = store(client, collection)
        missing = {k: v for k, v in expected.items() if got.get(k) != v}
        extra = {k: v for k, v in got.items() if k not in expected}
        raise AssertionError(f"store differs: missing/different {missing}, extra {extra}"
                             ) from None


def data_messages(client: DDPClient, since: int = 0) -> list[dict[str, Any]]:
    assert client.messages is not None
    return [m for m in client.messages[since:] if m.get("msg") in ("added", "changed", "removed")]


def check_message_log(client: DDPClient, collection: str = "items") -> None:
    """Merge-box promises over a whole log: no duplicate ``added``, no ``changed``/``removed``
    for a document the client does not hold, no ``version`` going backwards."""
    held: set[str] = set()
    versions: dict[str, int] = {}
    for message in data_messages(client):
        if message.get("collection") != collection:
            continue
        doc_id, kind = message["id"], message["msg"]
        if kind == "added":
            assert doc_id not in held, f"duplicate added: {message}"
            held.add(doc_id)
        elif kind == "changed":
            assert doc_id in held, f"changed for a document not held: {message}"
        else:
            assert doc_id in held, f"removed for a document not held: {message}"
            held.discard(doc_id)
            continue
        version = (message.get("fields") or {}).get("version")
        if version is not None:
            seen = versions.get(doc_id, -1)
            if not (version > seen or (kind == "added" and version == seen)):
                history = [m for m in data_messages(client)
                           if m.get("collection") == collection and m["id"] == doc_id]
                raise AssertionError(f"version went back ({seen} seen before): {message}; "
                                     f"this document's messages: {history}")
            versions[doc_id] = version


def count_row_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts (in [0]) the rows lookups read from the database from now on (a row several
    functions read under one snapshot is read once)."""
    from cdcddp.publish.lookup import SqlRowLookup

    reads = [0]
    read = SqlRowLookup._read

    def counted(self: SqlRowLookup, *args: Any) -> Any:
        reads[0] += 1
        return read(self, *args)

    monkeypatch.setattr(SqlRowLookup, "_read", counted)
    return reads


def task_stacks() -> str:
    """Where every trio task is waiting (for a test that timed out: what is stuck)."""
    lines: list[str] = []

    def walk(task: trio.lowlevel.Task, depth: int) -> None:
        frames = [f"{f.f_code.co_name}:{lineno}" for f, lineno in task.iter_await_frames()]
        lines.append("  " * depth + f"{task.name}: {' > '.join(frames[-6:])}")
        for nursery in task.child_nurseries:
            for child in nursery.child_tasks:
                walk(child, depth + 1)

    walk(trio.lowlevel.current_root_task(), 0)
    return "\n".join(lines)


def scraped(metrics: Metrics, name: str, **labels: str) -> float:
    """One sample of the registry's exposition (as Prometheus would read it)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics.exposition().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"{name} {labels} not exposed")
