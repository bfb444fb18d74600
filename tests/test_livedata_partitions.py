"""Partitioned tables end to end: their rows' changes stream under their leaf partitions'
names, and their partitions come and go by DDL the stream does not show (real PostgreSQL,
the server with its slot, real WebSocket clients)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import psycopg
import pytest
import trio
from pydantic import BaseModel

from cdcddp.app import App
from cdcddp.client import DDPClient, connect
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.filters import C, Param
from cdcddp.publish.ids import pk_to_wire_id
from cdcddp.publish.livedata import LiveData
from cdcddp.publish.lookup import RowLookup
from cdcddp.publish.snapshots import quiet_partitions
from tests.livedata_support import (
    asql,
    build_live_app,
    check_message_log,
    live_server,
    refused_in_one_line,
    stopped_by,
    store,
    wait_store,
)
from tests.pg_support import sql

# Two levels: a list of regions, the eu region's rows by ranges of ids, and a default
# partition; a row moves between partitions when its region changes.
SCHEMA = """
CREATE TABLE events (
    region text NOT NULL,
    id int NOT NULL,
    title text,
    body text,
    version int NOT NULL DEFAULT 0,
    PRIMARY KEY (region, id)
) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu') PARTITION BY RANGE (id);
CREATE TABLE events_eu_1 PARTITION OF events_eu FOR VALUES FROM (0) TO (1000);
CREATE TABLE events_eu_2 PARTITION OF events_eu FOR VALUES FROM (1000) TO (2000);
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE events_other PARTITION OF events DEFAULT;
"""

FIELDS = ["title", "body", "version"]
KEY = ("region", "id")
# A value stored out of line (TOASTed): an UPDATE that leaves it unchanged does not carry it.
BIG = "(SELECT string_agg(md5(g::text), '') FROM generate_series(1, 2000) g)"


class TitleParams(BaseModel):
    title: str


# publication -> (collection, table, SQL filter)
VIEWS: dict[str, tuple[str, str, str]] = {
    "events.all": ("events", "events", "TRUE"),
    "events.titled": ("titled", "events", "title = %(title)s"),
    "events.eu": ("eu", "events_eu", "TRUE"),  # an intermediate partitioned table
    "events.us": ("us", "events_us", "TRUE"),  # a leaf partition, published as a table
}


def build_app() -> App:
    app = build_live_app()
    for name, (collection, table, _) in VIEWS.items():
        app.add_publication(Publication(
            name, Cursor(table, collection=collection, fields=FIELDS, primary_key=KEY,
                         filter=C("title") == Param("title") if name == "events.titled"
                         else None),
            params=TitleParams if name == "events.titled" else None))
    return app


def expected(dsn: str, collection: str, params: dict[str, Any] | None = None
             ) -> dict[str, dict[str, Any]]:
    ((table, where),) = [(t, w) for c, t, w in VIEWS.values() if c == collection]
    rows = sql(dsn, f"SELECT region, id, {', '.join(FIELDS)} FROM {table} WHERE {where}",
               params=params or {})
    return {pk_to_wire_id(r[:2]): dict(zip(FIELDS, r[2:], strict=True)) for r in rows}


async def subscribe_all(client: DDPClient) -> None:
    for name in VIEWS:
        await client.subscribe(name, *([{"title": "hot"}] if name == "events.titled" else []))


async def all_as_expected(client: DDPClient, dsn: str) -> None:
    for collection in ("events", "titled", "eu", "us"):
        await wait_store(client, expected(dsn, collection, {"title": "hot"}), collection)
        check_message_log(client, collection)


@contextlib.asynccontextmanager
async def subscribed(db_dsn: str, resyncs: set[str]
                     ) -> AsyncIterator[tuple[LiveData, DDPClient]]:
    """The server (``resyncs``: the reasons it may resync for) with a client subscribed to
    every publication, holding what SQL says."""
    async with live_server(db_dsn, build_app(), resyncs=resyncs,
                           catalog_check_interval=0.1) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            await subscribe_all(client)
            await all_as_expected(client, db_dsn)
            yield server.live, client


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """(For what no message to a client tells of.)"""
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.02)


async def test_a_partitioned_table_is_published_and_followed_through_its_partitions(
        db_dsn: str) -> None:
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title, body) VALUES "
                               "('eu', 1, 'one', 'short'), ('us', 1, 'us one', NULL), "
                               "('zz', 1, 'elsewhere', NULL)",
               f"INSERT INTO events VALUES ('eu', 1500, 'long', {BIG})")
    async with subscribed(db_dsn, resyncs={"partition_truncate"}) as (live, client):
        assert set(store(client, "events")) == {
            pk_to_wire_id(k) for k in (("eu", 1), ("eu", 1500), ("us", 1), ("zz", 1))}

        # One transaction over three partitions at two levels. The TOASTed body moves
        # into events.titled without its value: fetched by key, from the table.
        await asql(db_dsn, "BEGIN; INSERT INTO events VALUES ('eu', 2, 'hot', 'new'); "
                           "UPDATE events SET title = 'hot', version = 1 "
                           "WHERE region = 'eu' AND id = 1500; "
                           "DELETE FROM events WHERE region = 'us'; "
                           "UPDATE events SET version = 2 WHERE region = 'zz'; COMMIT")
        await all_as_expected(client, db_dsn)
        assert len(store(client, "titled")[pk_to_wire_id(("eu", 1500))]["body"]) == 64000

        # A row that moves to another partition (its region, so its key, changes).
        await asql(db_dsn, "UPDATE events SET region = 'us' WHERE region = 'eu' AND id = 2",
                   "INSERT INTO events VALUES ('us', 7, 'hot', NULL)")
        await all_as_expected(client, db_dsn)
        assert pk_to_wire_id(("us", 2)) in store(client, "us")

        # A partition's TRUNCATE empties it alone; the table's, every partition.
        await asql(db_dsn, "TRUNCATE events_us")
        await all_as_expected(client, db_dsn)
        assert store(client, "us") == {} and len(store(client, "events")) == 3
        assert live.resync_reasons["partition_truncate"] == 2  # events.all, titled
        await asql(db_dsn, "INSERT INTO events VALUES ('us', 3, 'three', NULL)",
                   "TRUNCATE events")
        await all_as_expected(client, db_dsn)
        assert all(store(client, c) == {} for c in ("events", "titled", "eu", "us"))
        assert live.streamed_checks == 3  # the first subscription to each table


async def test_partitions_attached_created_detached_and_dropped_show_in_subscriptions(
        db_dsn: str) -> None:
    """The stream carries no DDL: the partitions of the tables followed are read every
    ``catalog_check_interval``, and their observers are read again when they changed."""
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title) VALUES "
                               "('eu', 1, 'hot'), ('eu', 1001, 'eu two'), ('us', 1, 'hot')",
               "CREATE TABLE events_ca (LIKE events INCLUDING ALL)",
               "INSERT INTO events_ca (region, id, title) VALUES ('ca', 1, 'hot'), "
               "('ca', 2, 'cold')")
    async with subscribed(db_dsn, resyncs={"partitions_changed"}) as (live, client):

        # A partition created and filled in one transaction; then another, filled after.
        await asql(db_dsn, "BEGIN; CREATE TABLE events_eu_3 PARTITION OF events_eu "
                           "FOR VALUES FROM (2000) TO (3000); "
                           "INSERT INTO events VALUES ('eu', 2500, 'hot', NULL); COMMIT")
        await all_as_expected(client, db_dsn)
        await asql(db_dsn, "CREATE TABLE events_eu_4 PARTITION OF events_eu "
                           "FOR VALUES FROM (3000) TO (4000)")
        await eventually(lambda: live.partition_changes == 4)  # events and events_eu
        await asql(db_dsn, "INSERT INTO events VALUES ('eu', 3500, 'hot', NULL)")
        await all_as_expected(client, db_dsn)

        # A table with rows attached; a partition detached, then one dropped.
        await asql(db_dsn, "ALTER TABLE events ATTACH PARTITION events_ca "
                           "FOR VALUES IN ('ca')")
        await all_as_expected(client, db_dsn)
        assert pk_to_wire_id(("ca", 1)) in store(client, "titled")
        await asql(db_dsn, "UPDATE events SET version = 5 WHERE region = 'ca'")
        await all_as_expected(client, db_dsn)
        await asql(db_dsn, "ALTER TABLE events DETACH PARTITION events_us")
        await all_as_expected(client, db_dsn)
        # (published by itself, it is a table like any other: still followed)
        assert store(client, "us") == {pk_to_wire_id(("us", 1)): {
            "title": "hot", "body": None, "version": 0}}
        await asql(db_dsn, "UPDATE events_us SET version = 1")
        await all_as_expected(client, db_dsn)
        await asql(db_dsn, "DROP TABLE events_eu_2")
        await all_as_expected(client, db_dsn)

        # Dropped and made again under the same name: another partition (told by oid).
        await asql(db_dsn, "BEGIN; DROP TABLE events_eu_3; CREATE TABLE events_eu_3 "
                           "PARTITION OF events_eu FOR VALUES FROM (2000) TO (3000); COMMIT")
        await all_as_expected(client, db_dsn)
        assert pk_to_wire_id(("eu", 2500)) not in store(client, "events")
        # Renamed: its changes stream under the new name.
        await asql(db_dsn, "ALTER TABLE events_eu_4 RENAME TO events_eu_later")
        renamed_from = live.partition_changes
        await eventually(lambda: live.partition_changes == renamed_from + 2)
        await asql(db_dsn, "UPDATE events SET version = 9 WHERE id = 3500")
        await all_as_expected(client, db_dsn)
        assert live.resync_reasons["partitions_changed"] > 0


async def test_a_partition_made_ahead_costs_no_resync(db_dsn: str) -> None:
    """A partition that never held a row (a monthly one made ahead, created or attached) is
    followed with no resync of its table's observers; one whose rows the stream showed under
    its name (emptied since) or that held rows still costs one."""
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title) VALUES "
                               "('eu', 1, 'hot'), ('us', 1, 'hot')",
               "CREATE TABLE events_ca (LIKE events INCLUDING ALL)",
               "CREATE TABLE events_mx (LIKE events INCLUDING ALL)")
    async with subscribed(db_dsn, resyncs={"partitions_changed"}) as (live, client):
        await asql(db_dsn, "CREATE TABLE events_eu_3 PARTITION OF events_eu "
                           "FOR VALUES FROM (2000) TO (3000)")
        await eventually(lambda: live.partitions_added_quietly == 2)  # events, events_eu
        await asql(db_dsn, "ALTER TABLE events ATTACH PARTITION events_ca "
                           "FOR VALUES IN ('ca')")
        await eventually(lambda: live.partitions_added_quietly == 3)
        assert live.resync_reasons["partitions_changed"] == 0
        await asql(db_dsn, "INSERT INTO events VALUES ('eu', 2500, 'hot'), ('ca', 1, 'hot')",
                   "UPDATE events SET version = 2 WHERE id = 2500")
        await all_as_expected(client, db_dsn)
        assert live.resync_reasons["partitions_changed"] == 0

        # Empty again, but a row of it was streamed (it has no page: the stream is what
        # tells): a snapshot may have seen that row, so its observers are read again.
        await asql(db_dsn, "INSERT INTO events_mx VALUES ('mx', 1, 'hot')",
                   "TRUNCATE events_mx",
                   "ALTER TABLE events ATTACH PARTITION events_mx FOR VALUES IN ('mx')")
        await eventually(lambda: live.resync_reasons["partitions_changed"] == 2)  # all, titled
        assert live.partitions_added_quietly == 3
        await asql(db_dsn, "INSERT INTO events VALUES ('mx', 2, 'hot')")
        await all_as_expected(client, db_dsn)
        # One with rows left: resynced (events, eu and titled).
        await asql(db_dsn, "ALTER TABLE events_eu DETACH PARTITION events_eu_3")
        await all_as_expected(client, db_dsn)
        assert live.resync_reasons["partitions_changed"] == 5


async def test_a_partition_detached_concurrently_leaves_at_its_first_commit(
        db_dsn: str) -> None:
    """DETACH ... CONCURRENTLY commits twice: from the first commit on, queries of the table
    omit the partition (still in pg_inherits, "detach pending"), while the second waits for
    transactions using the table, or for ever if interrupted. The partition's rows leave
    the subscriptions at the first, and its changes are not the table's from then."""
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title) VALUES "
                               "('eu', 1, 'hot'), ('eu', 1001, 'hot'), ('eu', 1002, 'cold')")
    async with subscribed(db_dsn, resyncs={"partitions_changed"}) as (live, client):
        assert pk_to_wire_id(("eu", 1001)) in store(client, "events")
        # An open transaction that read the table: the second commit waits for it.
        blocker = await trio.to_thread.run_sync(psycopg.connect, db_dsn)
        await trio.to_thread.run_sync(blocker.execute, "SELECT count(*) FROM events")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(asql, db_dsn, "ALTER TABLE events_eu DETACH PARTITION "
                                             "events_eu_2 CONCURRENTLY")  # (no default)
            try:
                await eventually(lambda: sql(db_dsn, "SELECT count(*) FROM pg_inherits WHERE "
                                                     "inhdetachpending") == [(1,)])
                await all_as_expected(client, db_dsn)
                assert pk_to_wire_id(("eu", 1001)) not in store(client, "events")
                await asql(db_dsn, "UPDATE events_eu_2 SET version = 1 WHERE id = 1001",
                           "INSERT INTO events_eu_2 VALUES ('eu', 1003, 'hot', NULL)")
                await live.sync()
                await all_as_expected(client, db_dsn)
            finally:  # (the DETACH's thread ends only then)
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(blocker.close)
        await live.sync()
        await all_as_expected(client, db_dsn)


def test_quiet_partitions_are_those_that_never_held_a_row_nor_were_renamed(
        db_dsn: str) -> None:
    """The catalog half of the quiet test: no page, and the name its pg_inherits row saw."""
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute(SCHEMA)
        conn.execute("CREATE TABLE events_eu_3 PARTITION OF events_eu "
                     "FOR VALUES FROM (2000) TO (3000)")  # quiet
        conn.execute("CREATE TABLE events_ca (LIKE events INCLUDING ALL)")
        conn.execute("ALTER TABLE events_ca RENAME TO events_canada")  # before: kept since
        conn.execute("ALTER TABLE events ATTACH PARTITION events_canada FOR VALUES IN ('ca')")
        conn.execute("CREATE TABLE events_mx (LIKE events INCLUDING ALL)")
        conn.execute("ALTER TABLE events ATTACH PARTITION events_mx FOR VALUES IN ('mx')")
        conn.execute("ALTER TABLE events_mx RENAME TO events_mexico")  # after: not quiet
        conn.execute("CREATE SCHEMA north")
        conn.execute("CREATE TABLE north.events_fr (LIKE events INCLUDING ALL)")
        conn.execute("ALTER TABLE events ATTACH PARTITION north.events_fr "
                     "FOR VALUES IN ('fr')")
        conn.execute("ALTER SCHEMA north RENAME TO nord")  # its name changed: not quiet
        conn.execute("INSERT INTO events VALUES ('us', 1, 'a')")  # held a row: not quiet
        conn.execute("CREATE TABLE events_de (LIKE events INCLUDING ALL)")
        conn.execute("INSERT INTO events_de VALUES ('de', 1, 'a')")
        conn.execute("DELETE FROM events_de")  # a page left: not quiet
        conn.execute("ALTER TABLE events ATTACH PARTITION events_de FOR VALUES IN ('de')")
        names = ["events_eu_1", "events_eu_3", "events_canada", "events_mexico", "nord.events_fr",
                 "events_us", "events_de"]
        oids = {name: conn.execute("SELECT %s::regclass::oid::int8", (name,)).fetchone()[0]
                for name in names}  # type: ignore[index]
        with conn.transaction():
            quiet = quiet_partitions(conn, oids.values())
        assert {name for name, oid in oids.items() if oid in quiet} == {
            "events_eu_1", "events_eu_3", "events_canada"}
        # Locked by someone's DDL: not quiet, at once.
        with psycopg.connect(db_dsn) as ddl:
            ddl.execute("LOCK TABLE events_eu_3 IN ACCESS EXCLUSIVE MODE")
            with conn.transaction():
                assert quiet_partitions(conn, [oids["events_eu_3"]]) == frozenset()


async def test_a_partition_whose_changes_are_never_streamed_stops_its_table(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """An UNLOGGED partition: its rows would never change. Refused at subscribe; and when
    one is attached, the subscriptions to the table stop, saying why in the log."""
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title) VALUES ('eu', 1, 'hot')",
               "CREATE UNLOGGED TABLE events_ca PARTITION OF events FOR VALUES IN ('ca')")
    async with live_server(db_dsn, build_app(), catalog_check_interval=0.1) as server:
        async with connect(server.ws_url) as client:
            assert await refused_in_one_line(client, caplog, "events.all") == (
                "observer for public.events failed to start: public.events_ca (a partition of "
                "public.events) is UNLOGGED: its changes are not written to the WAL, so never "
                "streamed: run ALTER TABLE public.events_ca SET LOGGED")

            await asql(db_dsn, "ALTER TABLE events_ca SET LOGGED")
            await client.subscribe("events.all", sub_id="all")
            await client.subscribe("events.eu", sub_id="eu")
            assert await stopped_by(client, caplog, db_dsn, ["all", "eu"],
                                    "CREATE UNLOGGED TABLE events_eu_3 PARTITION OF events_eu "
                                    "FOR VALUES FROM (2000) TO (3000)") == [
                f"public.events_eu_3 (a partition of public.{table}) is UNLOGGED: its changes "
                "are not written to the WAL, so never streamed: run ALTER TABLE "
                f"public.events_eu_3 SET LOGGED: 1 observer(s) of public.{table} stop"
                for table in ("events", "events_eu")]

            # A published table made UNLOGGED itself (its rows, rewritten, stay): the same.
            await client.subscribe("events.us", sub_id="us")
            assert await stopped_by(client, caplog, db_dsn, ["us"],
                                    "ALTER TABLE events_us SET UNLOGGED") == [
                "public.events_us is UNLOGGED: its changes are not written to the WAL, so never "
                "streamed: run ALTER TABLE public.events_us SET LOGGED: 1 observer(s) of "
                "public.events_us stop"]
            await asql(db_dsn, "ALTER TABLE events_us SET LOGGED")  # subscribable again
            await client.subscribe("events.us")


async def test_a_table_with_inheritance_children_is_followed_with_their_rows(
        db_dsn: str) -> None:
    """A query of a table reads its inheritance children's rows too (TimescaleDB's chunks
    are such children), whose changes stream under their own names; a child may come (made
    or INHERIT) and go (NO INHERIT, dropped) by DDL the stream does not show."""
    app = build_live_app()
    app.add_publication(Publication("cities.all", Cursor("cities",
                                                         fields=["name", "population"])))
    await asql(db_dsn, "CREATE TABLE cities (id int PRIMARY KEY, name text, population int)",
               "CREATE TABLE capitals (state text, PRIMARY KEY (id)) INHERITS (cities)",
               "INSERT INTO cities VALUES (1, 'Springfield', 30)",
               "INSERT INTO capitals VALUES (2, 'Paris', 2100, 'IDF')")

    def cities() -> dict[str, dict[str, Any]]:
        rows = sql(db_dsn, "SELECT id, name, population FROM cities")
        return {str(i): {"name": n, "population": p} for i, n, p in rows}

    async with live_server(db_dsn, app, resyncs={"partitions_changed", "partition_truncate"},
                           catalog_check_interval=0.1) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("cities.all")
            assert store(client, "cities") == cities() and len(cities()) == 2
            for statement in (
                    "UPDATE cities SET population = population + 1",  # both tables' rows
                    "INSERT INTO capitals VALUES (3, 'Rome', 2800, 'LAZ')",
                    "DELETE FROM cities WHERE id = 2",
                    "TRUNCATE ONLY cities",  # its own rows: its children's stay
                    "BEGIN; CREATE TABLE towns (PRIMARY KEY (id)) INHERITS (cities); "
                    "INSERT INTO towns VALUES (4, 'Shelbyville', 20); COMMIT",
                    "UPDATE cities SET population = 21 WHERE id = 4",
                    "ALTER TABLE towns NO INHERIT cities",
                    "ALTER TABLE towns INHERIT cities",
                    "DROP TABLE capitals"):
                await asql(db_dsn, statement)
                await wait_store(client, cities(), "cities")
            assert store(client, "cities") == {"4": {"name": "Shelbyville", "population": 21}}
            check_message_log(client, "cities")
            live = server.live
            assert live.resync_reasons["partition_truncate"] == 1
            assert live.resync_reasons["partitions_changed"] == 4


class RegionParams(BaseModel):
    region: str
    id: int


async def test_a_publication_function_follows_the_row_it_read_of_a_partitioned_table(
        db_dsn: str) -> None:
    app = build_app()

    def by_event_title(params: RegionParams, user_id: str | None, lookup: RowLookup
                       ) -> Cursor | None:
        found = lookup.row("events", (params.region, params.id), columns=["title"],
                           key_columns=KEY)
        if found is None:
            return None
        return Cursor("items", fields=["title"], filter=C("category") == found["title"])

    app.add_publication(Publication("items.byEventTitle", by_event_title, params=RegionParams))
    await asql(db_dsn, SCHEMA, "INSERT INTO events (region, id, title) VALUES ('eu', 1, 'a')")
    async with live_server(db_dsn, app, catalog_check_interval=0.1) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'in a'), "
                           "('b', 'in b')")
        async with connect(server.ws_url) as client:
            await client.subscribe("items.byEventTitle", {"region": "eu", "id": 1})
            assert store(client) == {"1": {"title": "in a"}}
            await asql(db_dsn, "UPDATE events SET title = 'b' WHERE id = 1")
            await wait_store(client, {"2": {"title": "in b"}})
            # Its partition detached: the row is no longer the table's.
            await asql(db_dsn, "ALTER TABLE events_eu DETACH PARTITION events_eu_1")
            await wait_store(client, {})
            await asql(db_dsn, "ALTER TABLE events_eu ATTACH PARTITION events_eu_1 "
                               "FOR VALUES FROM (0) TO (1000)")
            await wait_store(client, {"2": {"title": "in b"}})


async def test_subscriptions_racing_partition_changes_end_as_sql_says(db_dsn: str) -> None:
    """Writers into every partition while a partition is attached and detached and clients
    subscribe and unsubscribe: at quiescence every client holds what SQL says."""
    await asql(db_dsn, SCHEMA, "CREATE TABLE events_ca (LIKE events INCLUDING ALL)",
               "INSERT INTO events (region, id, title) SELECT r, g, 'hot' FROM "
               "unnest(ARRAY['eu', 'us', 'zz']) r, generate_series(1, 20) g")
    async with live_server(db_dsn, build_app(), resyncs={"partitions_changed"},
                           catalog_check_interval=0.05) as server:
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(connect(server.ws_url,
                                                               log_messages=True))
                       for _ in range(4)]
            await subscribe_all(clients[0])
            stop = trio.Event()

            async def write(region: str) -> None:
                for n in range(100, 1000):
                    if stop.is_set():
                        return
                    await asql(db_dsn, f"INSERT INTO events VALUES ('{region}', {n}, "
                                       f"'{'hot' if n % 2 else 'cold'}', NULL)",
                               "UPDATE events SET version = version + 1, title = CASE title "
                               "WHEN 'hot' THEN 'cold' ELSE 'hot' END "
                               f"WHERE region = '{region}' AND id = {n % 20 + 1}")

            async def repartition() -> None:
                for n in range(1, 9):  # (while detached, ('ca', n) goes to events_ca itself)
                    insert = f"VALUES ('ca', {n}, 'hot', NULL, 0)"
                    if n % 2:
                        await asql(db_dsn, f"INSERT INTO events_ca {insert}",
                                   "ALTER TABLE events ATTACH PARTITION events_ca "
                                   "FOR VALUES IN ('ca')")
                    else:
                        await asql(db_dsn, f"INSERT INTO events {insert}",
                                   "ALTER TABLE events DETACH PARTITION events_ca")
                    # A partition made ahead, written to a moment later: before the poll
                    # sees it, after, or after the engine follows it.
                    low = (n + 1) * 1000
                    await asql(db_dsn, f"CREATE TABLE events_eu_{n + 2} PARTITION OF "
                                       f"events_eu FOR VALUES FROM ({low}) TO ({low + 1000})")
                    await trio.sleep(0.02 * n)
                    await asql(db_dsn, f"INSERT INTO events VALUES ('eu', {low + 1}, 'hot', "
                                       f"NULL), ('eu', {low + 2}, 'cold', NULL)",
                               f"UPDATE events SET title = 'cold' WHERE id = {low + 1}")
                    await trio.sleep(0.15)
                stop.set()

            async def churn(client: DDPClient) -> None:
                while not stop.is_set():
                    await subscribe_all(client)
                    await trio.sleep(0.05)
                    for sub in list(client.ready_subs):
                        await client.unsubscribe(sub)
                await subscribe_all(client)

            async with trio.open_nursery() as nursery:
                for region in ("eu", "us", "zz"):
                    nursery.start_soon(write, region)
                nursery.start_soon(repartition)
                for client in clients[1:]:
                    nursery.start_soon(churn, client)
            for client in clients:
                await all_as_expected(client, db_dsn)
            live = server.live
            print(f"{live.partitions_added_quietly} of {live.partition_changes} partition "
                  "changes needed no resync")
