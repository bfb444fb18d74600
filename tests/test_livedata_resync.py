"""Resync instead of guessing (DESIGN invariant 5): schema changes on published tables and a
consumer that falls too far behind. Real PostgreSQL, the server with its slot, real clients."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import trio

from cdcddp.app import App
from cdcddp.client import DDPClient, connect
from cdcddp.methods import MethodContext, Methods
from cdcddp.metrics import Metrics
from cdcddp.publish import livedata
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.livedata import LiveData
from cdcddp.publish.observer import Observer
from cdcddp.wal.decode import Decoder
from cdcddp.wal.events import Relation
from cdcddp.wal.lsn import parse_lsn
from cdcddp.wal.stream import open_stream
from tests.livedata_support import (
    FIELDS,
    LiveServer,
    asql,
    build_live_app,
    check_message_log,
    data_messages,
    expected_view,
    live_server,
    scraped,
    store,
    wait_store,
)
from tests.pg_support import (
    held_commit,
    release_commit_wait,
    standby_that_never_answers,
)

ALL = [("items.all", [])]


def sql_view(dsn: str, table: str, columns: list[str], where: str = "TRUE"
             ) -> dict[str, dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(f"SELECT id, {', '.join(columns)} FROM {table} WHERE {where}")
        return {str(r[0]): dict(zip(columns, r[1:], strict=True)) for r in rows}


def resync_app() -> App:
    app = build_live_app()
    app.add_publication(Publication("other.all", Cursor("other", fields=["note"])))
    methods = Methods()

    @methods.method("items.add")
    async def add(ctx: MethodContext, title: str) -> None:
        await ctx.execute("INSERT INTO items (category, title) VALUES ('a', %s)", (title,))

    app.include_methods(methods)
    return app


async def wait_nosub(client: DDPClient, sub_id: str, timeout: float = 10.0) -> Any:
    await client.wait_for(lambda: sub_id in client.stopped_subs, timeout)
    return client.stopped_subs[sub_id]


def fail_next_change(observer: Observer) -> None:
    """The observer raises on the next change it is given (once): the engine resyncs it."""
    apply = observer.apply

    def fail_once(change: Any) -> Any:
        observer.apply = apply  # type: ignore[method-assign]
        raise RuntimeError("injected observer failure")

    observer.apply = fail_once  # type: ignore[method-assign]


@asynccontextmanager
async def one_failing_observer(db_dsn: str) -> AsyncIterator[tuple[LiveData, DDPClient]]:
    """A server (``catch_up_timeout`` 0.3 s) with one row ('x') and a client subscribed to
    items.all, whose observer raises on the next change (the one observer failure the test
    expects)."""
    async with live_server(db_dsn, catch_up_timeout=0.3, observer_errors=1) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as client:
            await client.subscribe("items.all")
            observer = live.observers()[0].observer
            assert observer is not None
            fail_next_change(observer)
            yield live, client


# ---- the decoder's shapes (no database) ------------------------------------------------------


def _doc(action: str, columns: list[tuple[str, int, Any]], xid: int = 7) -> bytes:
    import json
    cols = [{"name": n, "typeoid": o, "value": v} for n, o, v in columns]
    doc: dict[str, Any] = {"action": action, "xid": xid, "lsn": "0/1", "schema": "public",
                           "table": "t", "columns": cols}
    if action == "U":
        doc["identity"] = cols[:1]
    return json.dumps(doc).encode()


def test_decoder_reports_shapes_first_seen_and_changed_but_not_toast_omissions() -> None:
    decoder = Decoder()
    decoder.track_shapes = True
    full = [("id", 23, 1), ("v", 23, 2), ("big", 25, "x")]
    decoder.decode(_doc("I", full))
    (first,) = decoder.relations
    assert first == Relation(7, "public", "t", (("id", 23), ("v", 23), ("big", 25)), True, None)
    decoder.relations.clear()
    decoder.decode(_doc("I", full))
    assert decoder.relations == []
    decoder.decode(_doc("U", full[:2]))  # an unchanged TOASTed value left out: same shape,
    decoder.decode(_doc("U", full[:2]))  # reported once with what it lacked
    (variant,) = decoder.relations
    assert variant.columns == first.columns and variant.absent == ("big",)
    decoder.relations.clear()
    decoder.decode(_doc("U", [("id", 23, 1), ("v", 25, "2")]))  # v is text now
    (retyped,) = decoder.relations
    assert retyped.columns == (("id", 23), ("v", 25), ("big", 25)) and not retyped.complete
    assert retyped.previous == first.columns
    decoder.relations.clear()
    decoder.decode(_doc("I", [("id", 23, 1), ("v", 25, "2")]))  # big dropped
    (dropped,) = decoder.relations
    assert dropped.columns == (("id", 23), ("v", 25)) and dropped.complete
    decoder.relations.clear()
    plain = Decoder()  # shapes are opt-in (the stream turns them on for the engine)
    plain.decode(_doc("I", full))
    assert plain.relations == []


# ---- schema changes -------------------------------------------------------------------------


async def test_columns_no_observer_reads_come_change_and_go_without_a_resync(db_dsn: str
                                                                             ) -> None:
    async with live_server(db_dsn, resync_app()) as server:
        await asql(db_dsn, "ALTER TABLE items ADD COLUMN junk text DEFAULT 'j'",
                   "INSERT INTO items (owner, category, title) VALUES ('ann', 'a', 'one'), "
                   "('bob', 'b', 'two')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            await wait_store(client, expected_view(db_dsn, ALL))
            mark = len(client.messages or [])
            live = server.live

            queries = live.snapshot_queries

            # ADD COLUMN with a default (no table rewrite, no change streamed for old rows).
            await asql(db_dsn, "ALTER TABLE items ADD COLUMN extra int NOT NULL DEFAULT 7")
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'three')")
            await live.sync()
            await wait_store(client, expected_view(db_dsn, ALL))
            # A column no observer reads: nothing to resync (a migration adding one to a
            # table many subscriptions watch re-ran all their queries at once before).
            assert live.schema_changes == 0 and live.snapshot_queries == queries
            assert [(m["msg"], m["id"]) for m in data_messages(client, mark)] == [("added", "3")]

            # DROP COLUMN and a new type of columns nobody publishes.
            mark = len(client.messages or [])
            await asql(db_dsn, "ALTER TABLE items DROP COLUMN junk",
                       "ALTER TABLE items ALTER COLUMN extra TYPE bigint")
            # (An UPDATE lacking a text column may just leave out an unchanged TOASTed value;
            # the INSERT shows the column is gone.)
            await asql(db_dsn, "UPDATE items SET title = 'ONE', version = 1 WHERE id = 1")
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('b', 'four')")
            await live.sync()
            await wait_store(client, expected_view(db_dsn, ALL))
            assert live.schema_changes == 0 and live.snapshot_queries == queries
            assert [(m["msg"], m["id"], m.get("fields", {}).get("title"))
                    for m in data_messages(client, mark)] == [
                ("changed", "1", "ONE"), ("added", "4", "four")]
            assert "1" not in client.stopped_subs

            # Later writes still flow.
            await asql(db_dsn, "DELETE FROM items WHERE id = 2",
                       "INSERT INTO items (category, title, extra) VALUES ('b', 'five', 1)")
            await wait_store(client, expected_view(db_dsn, ALL))
            check_message_log(client)


async def test_a_migration_resyncs_the_observers_that_read_what_it_changed(db_dsn: str
                                                                          ) -> None:
    """Published, key and filter columns count; other columns of the table do not."""
    async with live_server(db_dsn, resync_app(), resyncs={"schema_change"}) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) VALUES "
                           "('ann', 'a', 'one'), ('bob', 'c', 'two')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")  # every column
            await client.subscribe("items.titles")  # title, version; category in its filter
            live = server.live
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN owner TYPE varchar(40)",
                       "INSERT INTO items (owner, category, title) VALUES ('cy', 'b', 'three')")
            await live.sync()
            assert live.resync_reasons["schema_change"] == 1  # items.all's observer only
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN category TYPE varchar(40)",
                       "INSERT INTO items (owner, category, title) VALUES ('di', 'a', 'four')")
            await live.sync()
            assert live.resync_reasons["schema_change"] == 3  # both: items.titles filters on it
            await wait_store(client, expected_view(db_dsn, ALL))
            check_message_log(client)


async def test_a_resynced_observer_is_not_resynced_again_for_the_migrations_it_has_seen(
        db_dsn: str) -> None:
    """The stream behind a run of migrations: the first new shape it shows resyncs the
    observer, from a snapshot that sees the later migrations too; the shapes the stream
    shows on its way to them are older than that snapshot, and its rows there are skipped:
    no more resyncs (one per migration before, for every observer of the table, and new
    subscriptions waited behind them)."""
    async with live_server(db_dsn, resync_app(), resyncs={"schema_change"}) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            live = server.live
            live.hold = trio.Event()  # the consumer stops at the next commit
            await asql(db_dsn, "UPDATE items SET version = 1")
            for column in ("title TYPE varchar(200)", "rank TYPE bigint",
                           "version TYPE bigint"):
                await asql(db_dsn, f"ALTER TABLE items ALTER COLUMN {column}",
                           "UPDATE items SET version = version + 1")
            live.hold.set()
            live.hold = None
            await live.sync()
            assert live.resync_reasons["schema_change"] == 1
            await wait_store(client, expected_view(db_dsn, ALL))
            assert store(client)["1"]["version"] == 4
            check_message_log(client)
            # A subscription whose snapshot saw a migration the stream shows no change after
            # yet: not resynced when it registers, nor when the stream catches up with it.
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN title TYPE text")
            await client.subscribe("items.titles")
            await asql(db_dsn, "UPDATE items SET version = version + 1")
            await live.sync()
            assert live.resync_reasons["schema_change"] == 2  # items.all's only
            await wait_store(client, expected_view(db_dsn, ALL))
            check_message_log(client)


async def test_type_change_of_a_published_column_sends_changed(db_dsn: str) -> None:
    metrics = Metrics()
    async with live_server(db_dsn, resync_app(), metrics=metrics, resyncs=True) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, rank) VALUES "
                           "('a', 'one', 1), ('b', 'two', 2)")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            assert store(client)["1"]["rank"] == 1
            mark = len(client.messages or [])

            # A table rewrite: no change is streamed for the existing rows.
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN rank DROP DEFAULT",
                       "ALTER TABLE items ALTER COLUMN rank TYPE text USING rank::text")
            await asql(db_dsn, "INSERT INTO items (category, title, rank) "
                               "VALUES ('a', 'three', 'high')")
            await server.live.sync()
            expected = sql_view(db_dsn, "items", FIELDS)
            assert expected["1"]["rank"] == "1"
            await wait_store(client, expected)
            got = {(m["msg"], m["id"]): m.get("fields") for m in data_messages(client, mark)}
            # The values' EJSON type changed: every existing document got `changed`.
            assert got[("changed", "1")] == {"rank": "1"}
            assert got[("changed", "2")] == {"rank": "2"}
            assert got[("added", "3")]["rank"] == "high"

            await asql(db_dsn, "UPDATE items SET rank = 'low', version = 1 WHERE id = 2")
            await wait_store(client, sql_view(db_dsn, "items", FIELDS))
            check_message_log(client)
            assert scraped(metrics, "cdcddp_schema_changes_total") == 1
            assert scraped(metrics, "cdcddp_resyncs_total", reason="schema_change") == 1


async def test_a_column_changed_while_nobody_writes_reaches_clients(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """The stream shows a retyped column only with the table's next change, and a new type
    modifier (values rounded by the rewrite) never: the catalog, read every
    ``catalog_check_interval``, shows both at once. A table dropped stops its
    subscriptions."""
    caplog.set_level(logging.WARNING, "cdcddp.publish.livedata")
    app = build_live_app()
    app.add_publication(Publication("prices.all", Cursor("prices", fields=["price"])))
    await asql(db_dsn, "CREATE TABLE prices (id int PRIMARY KEY, price numeric(10,2))",
               "INSERT INTO prices VALUES (1, 1.25), (2, 2.50)")
    async with live_server(db_dsn, app, resyncs={"schema_change"},
                           catalog_check_interval=0.1) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("prices.all", sub_id="prices")
            before = sql_view(db_dsn, "prices", ["price"])
            await wait_store(client, {k: {"price": float(v["price"])} for k, v in before.items()},
                             "prices")

            await asql(db_dsn, "ALTER TABLE prices ALTER COLUMN price TYPE numeric(10,0)")
            await wait_store(client, {"1": {"price": 1}, "2": {"price": 3}}, "prices")
            assert [r.getMessage() for r in caplog.records] == [
                "table public.prices changed in the catalog (price type modifier 655366 -> "
                "655364): resyncing its 1 observer(s)"]
            await asql(db_dsn, "ALTER TABLE prices ALTER COLUMN price TYPE text "
                               "USING price || ' EUR'")
            await wait_store(client, {"1": {"price": "1 EUR"}, "2": {"price": "3 EUR"}},
                             "prices")
            live = server.live
            assert live.resync_reasons["schema_change"] == 2 and live.schema_changes == 2
            check_message_log(client, "prices")

            await asql(db_dsn, "DROP TABLE prices")
            error = await wait_nosub(client, "prices")
            assert error.error == "schema-changed" and "prices" in error.reason
            await wait_store(client, {}, "prices")


async def test_rename_or_drop_of_a_published_column_stops_its_subscriptions(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "cdcddp.publish.livedata")
    async with live_server(db_dsn, resync_app(), resyncs=True) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one'), ('b', 'x')",
                   "INSERT INTO other (note) VALUES ('n1')")
        async with connect(server.ws_url, log_messages=True) as client, \
                connect(server.ws_url) as bystander:
            await client.subscribe("items.all", sub_id="all")
            await client.subscribe("items.byCategory", {"category": "a"}, sub_id="cat")
            await client.subscribe("other.all", sub_id="other")
            await bystander.subscribe("items.all", sub_id="b-all")
            assert len(store(client)) == 2

            await asql(db_dsn, "ALTER TABLE items RENAME COLUMN title TO headline")
            await asql(db_dsn, "INSERT INTO items (category, headline) VALUES ('a', 'two')")
            for c, sub in ((client, "all"), (client, "cat"), (bystander, "b-all")):
                error = await wait_nosub(c, sub)
                assert error is not None and error.error == "schema-changed"
                assert "public.items" in error.reason and '"title"' in error.reason
            # Their documents are gone; the connection and other subscriptions live on.
            await wait_store(client, {})
            await wait_store(bystander, {})
            warnings = [r.getMessage() for r in caplog.records
                        if "can no longer run" in r.getMessage()]
            assert warnings and all("title" in w for w in warnings)
            await asql(db_dsn, "INSERT INTO other (note) VALUES ('n2')")
            await wait_store(client, sql_view(db_dsn, "other", ["note"]), "other")
            assert server.live.observer_count == 1  # other.all only

            # Renamed back, the publication works again; then a dropped published column
            # stops it the same way.
            await asql(db_dsn, "ALTER TABLE items RENAME COLUMN headline TO title")
            await client.subscribe("items.all", sub_id="all2")
            await wait_store(client, expected_view(db_dsn, ALL))
            await asql(db_dsn, "ALTER TABLE items DROP COLUMN body")
            await asql(db_dsn, "UPDATE items SET version = 5 WHERE id = 1")
            error = await wait_nosub(client, "all2")
            assert error.error == "schema-changed" and '"body"' in error.reason
            await wait_store(client, {})
            await asql(db_dsn, "UPDATE other SET note = 'n3' WHERE id = 1")
            await wait_store(client, sql_view(db_dsn, "other", ["note"]), "other")


async def test_dropped_published_column_seen_first_in_an_update(db_dsn: str) -> None:
    # The UPDATE lacks `body` (text): an unchanged TOASTed value or a dropped column? The
    # catalog says dropped: the subscription stops; the one not publishing body carries on.
    app = resync_app()
    app.add_publication(Publication("items.slim", Cursor("items", fields=["title"])))
    async with live_server(db_dsn, app, resyncs=True) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, body) VALUES ('a', 'one', 'b')")
        async with connect(server.ws_url) as client:
            await client.subscribe("items.all", sub_id="all")
            await client.subscribe("items.slim", sub_id="slim")
            await asql(db_dsn, "UPDATE items SET version = 1 WHERE id = 1")  # shape seen
            await wait_store(client, expected_view(db_dsn, ALL))
            await asql(db_dsn, "ALTER TABLE items DROP COLUMN body")
            await asql(db_dsn, "UPDATE items SET title = 'ONE' WHERE id = 1")
            error = await wait_nosub(client, "all")
            assert error.error == "schema-changed" and '"body"' in error.reason
            await wait_store(client, {"1": {"title": "ONE"}})
            await asql(db_dsn, "UPDATE items SET title = 'One' WHERE id = 1")
            await wait_store(client, {"1": {"title": "One"}})
            assert "slim" not in client.stopped_subs


async def test_subscribing_between_a_schema_change_and_its_first_change(db_dsn: str) -> None:
    # The engine has seen the table's old shape; the new observer's snapshot sees the new one:
    # no spurious failure, and the old observer (created before) still gets resynced.
    async with live_server(db_dsn, resync_app(), resyncs=True) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, rank) VALUES ('a', 'one', 1)")
        async with connect(server.ws_url) as early, connect(server.ws_url) as late:
            await early.subscribe("items.all")
            await asql(db_dsn, "UPDATE items SET version = 1 WHERE id = 1")  # shape seen
            await wait_store(early, expected_view(db_dsn, ALL))
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN rank TYPE bigint")
            await asql(db_dsn, "ALTER TABLE items ALTER COLUMN version TYPE text")
            await late.subscribe("items.byCategory", {"category": "a"})
            await asql(db_dsn, "INSERT INTO items (category, title, version) "
                               "VALUES ('a', 'two', 'v2')")
            await server.live.sync()
            expected = sql_view(db_dsn, "items", FIELDS)
            assert expected["1"]["version"] == "1"
            await wait_store(early, expected)
            await wait_store(late, expected)
            assert not early.stopped_subs and not late.stopped_subs


# ---- falling too far behind -----------------------------------------------------------------


async def test_stream_skip_backlog_advances_the_slot_and_says_so(db_dsn: str) -> None:
    # The stream alone: a consumer that stops reading, skip_backlog(), then what it gets.
    from tests.test_wal_stream import FAST, Collector, new_slot

    await asql(db_dsn, "CREATE TABLE t (n int PRIMARY KEY, pad text)")
    slot = new_slot()
    async with open_stream(db_dsn, slot, temporary=False, buffer_batches=1, **FAST) as stream:
        collector = Collector(stream)
        await asql(db_dsn, "INSERT INTO t VALUES (0, 'first')")
        with trio.fail_after(10):
            await collector.run(until=lambda c: len(c.transactions) == 1)
        # A backlog the consumer does not read (one row per transaction).
        await asql(db_dsn, "DO $$ BEGIN FOR i IN 1..3000 LOOP "
                           "INSERT INTO t VALUES (i, repeat('x', 100)); COMMIT; END LOOP; END $$")
        stream.skip_backlog()
        with trio.fail_after(20):
            while stream.backlog_skips == 0:
                await trio.sleep(0.05)
        await asql(db_dsn, "INSERT INTO t VALUES (100000, 'after')")
        with trio.fail_after(20):
            await collector.run(until=lambda c: 100000 in c.rows())
        with psycopg.connect(db_dsn, autocommit=True) as conn:
            confirmed = conn.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                                     "WHERE slot_name = %s", (slot,)).fetchone()
    assert len(collector.gaps) == 1 and "skipped" in collector.gaps[0].reason
    gap_at = collector.events.index(collector.gaps[0])
    rows = collector.rows()
    assert len(rows) == len(set(rows))  # nothing twice
    assert rows[-1] == 100000 and len(rows) < 3000  # most of the backlog never came
    # Every transaction after the gap committed after the skip position.
    after = [c for c, _ in collector.transactions if collector.events.index(c) > gap_at]
    assert after and all(c.end_lsn > collector.gaps[0].lsn for c in after)
    assert confirmed is not None and parse_lsn(confirmed[0]) >= collector.gaps[0].lsn
    assert stream.skipped_bytes > 100_000


async def test_a_subscription_whose_catch_up_mark_a_stream_gap_took_gets_ready(
        db_dsn: str) -> None:
    """A new subscription waits until the stream has delivered everything its snapshot saw:
    until a mark committed after the snapshot comes through. A stream gap (here a temporary
    slot made anew) skips WAL, that mark's with it; as long as other commits kept the
    consumer moving, such a subscription waited for its mark for ever."""
    async with live_server(db_dsn, temporary_slot=True, resyncs=True) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one')")
        stop: list[bool] = []

        def keep_committing() -> None:
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                while not stop:
                    conn.execute("INSERT INTO other (note) VALUES ('tick')")
                    time.sleep(0.01)

        async with connect(server.ws_url, log_messages=True) as client, \
                trio.open_nursery() as nursery:
            await client.subscribe("items.byCategory", {"category": "b"})  # items watched
            nursery.start_soon(trio.to_thread.run_sync, keep_committing)
            ((walsender,),) = await asql(db_dsn, "SELECT active_pid FROM pg_replication_slots "
                                                 "WHERE slot_name = %s", params=(live.config.slot,))
            os.kill(walsender, signal.SIGSTOP)  # nothing committed from now on is sent

            async def end_the_stream(entry: Any) -> None:
                # The snapshot is taken and its mark committed: the walsender is ended
                # before it sends them, and its temporary slot with it.
                live.after_snapshot = None
                await trio.sleep(0.3)
                await asql(db_dsn, "SELECT pg_terminate_backend(%s)", params=(walsender,))
                os.kill(walsender, signal.SIGCONT)

            live.after_snapshot = end_the_stream
            reconnects = live.stream.reconnects if live.stream else 0
            try:
                with trio.fail_after(live.config.catch_up_limit):
                    await client.subscribe("items.all")
            finally:
                stop.append(True)
            assert live.stream is not None and live.stream.reconnects > reconnects
            await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            check_message_log(client)


@pytest.mark.parametrize("temporary", [True, False], ids=["temporary-slot", "persistent-slot"])
async def test_too_far_behind_skips_the_backlog_and_resyncs(db_dsn: str, temporary: bool
                                                            ) -> None:
    options: dict[str, Any] = {"temporary_slot": temporary, "behind_check_interval": 0.1}
    metrics = Metrics()
    async with live_server(db_dsn, resync_app(), metrics=metrics, resyncs=True,
                           **options) as server:
        live = server.live
        stream = live.stream
        assert stream is not None
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'one'), "
                           "('b', 'two')")
        async with connect(server.ws_url, log_messages=True) as client, \
                connect(server.ws_url) as writer:
            await client.subscribe("items.all")
            await client.subscribe("items.byCategory", {"category": "a"})
            await wait_store(client, expected_view(db_dsn, ALL))

            live.hold = trio.Event()  # the consumer stops before applying the next commit
            await asql(db_dsn, *[f"INSERT INTO items (category, title, body) SELECT 'a', "
                                 f"'bulk{n}', repeat('x', 200) FROM generate_series(1, 2000)"
                                 for n in range(10)])
            # A method whose commit falls in the skipped range (behind what the stream has
            # read while the consumer is held): its fence must still pass.
            call = await writer.apply("items.add", ["by method"])
            await writer.wait_for(call.result_received.is_set, 10)
            assert call.error is None
            await asql(db_dsn, "UPDATE items SET title = 'ONE', version = 1 WHERE id = 1",
                       "DELETE FROM items WHERE id = 2",
                       "UPDATE items SET category = 'b' WHERE id BETWEEN 10 AND 20")
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                slot_before = conn.execute(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (live.config.slot,)).fetchone()
            assert not call.updated_received.is_set()

            # And a commit in the skipped range that is written but not visible yet (held by
            # a synchronous standby that never answers, released 2 s after it starts to wait,
            # whatever happens meanwhile): the resync must see it. (The gap's snapshot waits
            # for it; a temporary slot's creation, for every running transaction.)
            with standby_that_never_answers(db_dsn), \
                    psycopg.connect(db_dsn, autocommit=True) as held, \
                    psycopg.connect(db_dsn, autocommit=True) as admin:
                held.execute("BEGIN")
                held.execute("UPDATE items SET title = 'HELD' WHERE id = 5")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, held.execute, "COMMIT")
                    nursery.start_soon(trio.to_thread.run_sync, release_commit_wait, admin,
                                       held.info.backend_pid, 2.0)
                    live.config.resync_behind_bytes = 64 * 1024  # far less than the backlog
                    with trio.fail_after(20):
                        while stream.backlog_skips == 0:
                            await trio.sleep(0.05)
                    live.config.resync_behind_bytes = None
                    assert live.behind_skips == 1
                    resyncs = live.resyncs
                    hold, live.hold = live.hold, None
                    hold.set()

            await writer.wait_for(lambda: call.updated_received.is_set(), 20)
            assert live.fences_settled_by_gap == 1  # never streamed: the gap's resync passed it
            await live.sync(timeout=60)
            assert live.resyncs - resyncs == live.observer_count >= 2  # every observer
            expected = expected_view(db_dsn, ALL)
            assert len(expected) == 2 + 1 + 20000 - 1
            await wait_store(client, expected, timeout=60)
            # Far fewer changes applied than written: the backlog was skipped, not ground
            # through.
            assert live.changes_applied < 20000
            assert stream.skipped_bytes > 64 * 1024
            with psycopg.connect(db_dsn, autocommit=True) as conn:
                slot_after = conn.execute(
                    "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (live.config.slot,)).fetchone()
            assert slot_after is not None and slot_before is not None
            assert parse_lsn(slot_after[0]) > parse_lsn(slot_before[0])  # the WAL is released

            # Later writes flow as before; the merge box saw no contradiction.
            await asql(db_dsn, "UPDATE items SET version = 2 WHERE id = 1",
                       "INSERT INTO items (category, title) VALUES ('a', 'after')")
            await wait_store(client, expected_view(db_dsn, ALL), timeout=30)
            await writer.call("items.add", "after skip", wait_updated=True)
            check_message_log(client)
            assert scraped(metrics, "cdcddp_replication_backlog_skips_total") == 1
            assert scraped(metrics, "cdcddp_resyncs_total", reason="stream_gap") >= 1



class StepHold:
    """``LiveData.hold`` that lets the consumer past one commit per :meth:`step`."""

    def __init__(self) -> None:
        self.arrived = 0
        self._steps = trio.Semaphore(0)

    async def wait(self) -> None:
        self.arrived += 1
        await self._steps.acquire()

    def step(self) -> None:
        self._steps.release()


async def test_a_resync_snapshot_ahead_of_the_stream_never_sends_a_value_back(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A resync's snapshot may see commits the stream has not delivered yet. Clients are
    flushed again only once the stream has delivered them: else a client holding a document
    through a resynced observer and an older one could fall back to the older copy (here by
    unsubscribing from the resynced one) and see its version go back."""
    async with live_server(db_dsn, observer_errors=1) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url, log_messages=True) as client:
            ahead = await client.subscribe("items.byCategory", {"category": "a"})  # its fields win
            await client.subscribe("items.all")
            entry = next(e for e in live.observers() if "category" in e.bound.filter.columns)
            observer = entry.observer
            assert observer is not None
            fail_next_change(observer)
            hold = live.hold = StepHold()  # type: ignore[assignment]
            # X makes the observer fail (a resync); C commits before that resync's snapshot.
            await asql(db_dsn, "UPDATE items SET title = 'boom' WHERE id = 1",
                       "UPDATE items SET title = 'c', version = 1 WHERE id = 1")
            with trio.fail_after(10), caplog.at_level(logging.CRITICAL):
                while hold.arrived < 1:
                    await trio.sleep(0.01)
                hold.step()  # X: resync from a snapshot that has C
                while hold.arrived < 2:  # at C's commit: X applied, C not yet
                    await trio.sleep(0.01)
            assert live.resync_reasons["observer_error"] == 1
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.unsubscribe, ahead)
                await trio.sleep(0.2)  # the unsubscription's changes are in the box
                live.hold = None
                hold.step()  # C
            await wait_store(client, {"1": {"owner": None, "category": "a", "title": "c",
                                            "body": None, "rank": 0, "version": 1}})
            check_message_log(client)


async def test_a_resync_hold_ends_at_once_without_a_mark(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Where no catch-up mark can be written (a database that refuses), clients do not wait
    for a resync's hold: it is given up on at once (there is nothing to wait for)."""
    async with one_failing_observer(db_dsn) as (live, client):
        async def cannot_write(token: str) -> int:
            raise psycopg.errors.ReadOnlySqlTransaction("read-only")

        live._write_mark = cannot_write  # type: ignore[method-assign]
        with caplog.at_level(logging.CRITICAL):
            await asql(db_dsn, "UPDATE items SET title = 'y', version = 1 WHERE id = 1")
            await wait_store(client, {"1": {"owner": None, "category": "a", "title": "y",
                                            "body": None, "rank": 0, "version": 1}})
        assert live.resync_reasons["observer_error"] == 1
        assert live.hold_timeouts == 1  # given up on
        assert not live.gate.held


async def test_an_observer_resynced_mid_transaction_sees_that_transaction(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """An observer that fails on a change is resynced from a snapshot that sees the
    transaction it failed in, even while that transaction's commit, already decoded, is not
    yet visible to new snapshots (otherwise nothing would apply it again: a lost change).

    The window is held open the way a synchronous standby that never answers holds it: the
    commit record is written and decoded, and the committing session waits for the standby
    before it leaves the running transactions."""
    async with one_failing_observer(db_dsn) as (live, client):
        retries = live.invisible_delivered_retries
        with standby_that_never_answers(db_dsn), \
                psycopg.connect(db_dsn, autocommit=True) as held:
            pid = held.info.backend_pid
            with caplog.at_level(logging.CRITICAL):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, lambda: held.execute(
                        "UPDATE items SET title = 'y', version = 1 WHERE id = 1"))
                    # The stream delivers the commit; the resync must wait for it.
                    with trio.move_on_after(3):
                        while live.invisible_delivered_retries - retries < 3:
                            await trio.sleep(0.01)
                    assert store(client) == {"1": {
                        "owner": None, "category": "a", "title": "x", "body": None,
                        "rank": 0, "version": 0}}  # nothing of it flushed meanwhile
                    # Give up waiting for the standby: the commit becomes visible.
                    await asql(db_dsn, f"SELECT pg_cancel_backend({int(pid)})")
        await wait_store(client, {"1": {"owner": None, "category": "a", "title": "y",
                                        "body": None, "rank": 0, "version": 1}})
        assert live.resync_reasons["observer_error"] == 1
        assert live.invisible_delivered_retries - retries >= 3  # it waited


async def test_catch_up_marks_do_not_wait_for_a_synchronous_standby(db_dsn: str) -> None:
    """A new observer's catch-up mark is a commit the stream decodes once it is written
    locally: it does not wait for a synchronous standby to confirm it (with none answering,
    every subscription would wait ``catch_up_timeout`` for ready)."""
    async with live_server(db_dsn, catch_up_timeout=3.0) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        with standby_that_never_answers(db_dsn):
            async with connect(server.ws_url) as client:
                started = trio.current_time()
                await client.subscribe("items.all")
                assert trio.current_time() - started < 2.0
                assert live.catch_up_timeouts == 0
                assert len(store(client)) == 1


async def test_a_subscription_waits_for_a_delivered_commit_to_become_visible(
        db_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A commit the stream delivered (and existing observers applied) but that is not visible
    yet: a new subscription's snapshot lacks it and nothing would replay it, so the read is
    retaken until it is visible, and says so when that takes long (a synchronous standby not
    answering). Then the subscriber gets the row as the others have it."""
    monkeypatch.setattr(livedata, "_INVISIBLE_WARN_AFTER", 0.3)
    metrics = Metrics()
    # Nothing kept beyond the pins (as when the commit is older than what the ring keeps).
    async with live_server(db_dsn, metrics=metrics, ring_retain_changes=0) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as first:
            await first.subscribe("items.all")
            with standby_that_never_answers(db_dsn), \
                    psycopg.connect(db_dsn, autocommit=True) as held, \
                    psycopg.connect(db_dsn, autocommit=True) as admin:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.to_thread.run_sync, held.execute,
                                       "UPDATE items SET title = 'y' WHERE id = 1")
                    nursery.start_soon(trio.to_thread.run_sync, release_commit_wait, admin,
                                       held.info.backend_pid, 1.5)
                    # The observer applied it at once: invisible is not unseen.
                    await wait_store(first, {"1": {"owner": None, "category": "a",
                                                   "title": "y", "body": None, "rank": 0,
                                                   "version": 0}})
                    async with connect(server.ws_url) as second:
                        with caplog.at_level(logging.WARNING, "cdcddp.publish.livedata"):
                            await second.subscribe("items.byCategory", {"category": "a"},
                                                   timeout=20)
                        assert store(second) == store(first)
            assert "have waited 0 s for a transaction the stream delivered" in caplog.text
            assert live.invisible_delivered_retries > 0
            assert scraped(metrics, "cdcddp_snapshot_retakes_total") == (
                live.invisible_delivered_retries)


async def test_a_subscription_replays_a_delivered_commit_not_yet_visible(
        db_dsn: str) -> None:
    """The same held commit, with the ring keeping recent transactions (the default): the
    new subscription's snapshot lacks it, and it is replayed from the ring instead of waited
    for. Ready at once, holding the row as the first client has it, while the commit still
    waits for the standby."""
    async with live_server(db_dsn) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as first, \
                connect(server.ws_url, log_messages=True) as second:
            await first.subscribe("items.all")
            async with held_commit(db_dsn, "UPDATE items SET title = 'y' WHERE id = 1") as held:
                await wait_store(first, {"1": {"owner": None, "category": "a", "title": "y",
                                               "body": None, "rank": 0, "version": 0}})
                replays = live.ring_replays
                with trio.fail_after(1):
                    await second.subscribe("items.byCategory", {"category": "a"})
                assert store(second) == store(first)
                assert live.ring_replays == replays + 1
                assert live.invisible_delivered_retries == 0
                assert held.still_waits()  # replayed, not waited for
            await live.sync()
            assert store(second) == store(first)
            check_message_log(second)


async def _move_in_held(db_dsn: str, statements: list[tuple[str, tuple[Any, ...]]],
                        expected: dict[str, Any], **live_options: Any) -> LiveServer:
    """Run ``statements`` in one transaction whose commit waits for a standby that never
    answers; the client subscribed to category 'b' must get ``expected`` (row 1) while it
    still waits. The commit is released (and stands) at the end."""
    async with live_server(db_dsn, **live_options) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, body) VALUES ('a', 'x', %s), "
                           "('a', 'y', 'short')", params=(OLD_BODY,))
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "b"})
            async with held_commit(db_dsn, *statements) as held:
                await wait_store(client, {"1": expected}, collection="items")
                assert held.still_waits()
            check_message_log(client)
            if expected["body"] != OLD_BODY:
                assert OLD_BODY not in str(client.messages)
        return server


OLD_BODY, NEW_BODY = secrets.token_urlsafe(6000), secrets.token_urlsafe(6000)  # TOASTed


async def test_a_row_moving_in_is_completed_from_the_version_before_its_commit(
        db_dsn: str) -> None:
    """An UPDATE moves a row into a subscription without its unchanged TOASTed value, and
    its commit waits for a standby that does not answer. A snapshot without that commit has
    the row as it was just before it: the value the change left out is that version's. The
    whole row arrives while the commit still waits."""
    server = await _move_in_held(
        db_dsn, [("UPDATE items SET category = 'b' WHERE id = 1", ())],
        {"owner": None, "category": "b", "title": "x", "body": OLD_BODY, "rank": 0,
         "version": 0})
    assert server.live is not None and server.live.rows_fetched == 1


async def test_a_row_moving_in_takes_left_out_values_from_its_earlier_changes(
        db_dsn: str) -> None:
    """The same, but the transaction set the TOASTed value before the UPDATE that moves the
    row in (which then leaves it out): that earlier change has it. No fetch, no wait, and the
    old value is never sent."""
    server = await _move_in_held(
        db_dsn, [("UPDATE items SET body = %s WHERE id = 1", (NEW_BODY,)),
                 ("UPDATE items SET category = 'b' WHERE id = 1", ())],
        {"owner": None, "category": "b", "title": "x", "body": NEW_BODY, "rank": 0,
         "version": 0})
    assert server.live is not None and server.live.rows_fetched == 0


async def test_a_row_moving_in_after_other_changes_is_completed_from_before_its_commit(
        db_dsn: str) -> None:
    """The transaction changed another row of the table, and other columns of this row, and
    none of those changes has the TOASTed value: it is the version's before the transaction,
    read at once while the commit waits."""
    server = await _move_in_held(
        db_dsn, [("UPDATE items SET title = 'y2' WHERE id = 2", ()),
                 ("UPDATE items SET title = 'x2' WHERE id = 1", ()),
                 ("UPDATE items SET category = 'b', version = 1 WHERE id = 1", ())],
        {"owner": None, "category": "b", "title": "x2", "body": OLD_BODY, "rank": 0,
         "version": 1})
    assert server.live is not None and server.live.rows_fetched == 1


async def test_a_row_moving_in_waits_for_its_commit_when_its_transaction_was_chunked(
        db_dsn: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A transaction applied in chunks is not held whole, so the earlier changes of the row
    are not all known: applying waits for the commit to become visible (saying so when that
    takes long), and then delivers the new value, never the old one."""
    monkeypatch.setattr(livedata, "_INVISIBLE_WARN_AFTER", 0.3)
    async with live_server(db_dsn, max_transaction_buffer=5) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, body) VALUES ('a', 'x', %s)",
                   params=(OLD_BODY,))
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "b"})
            with standby_that_never_answers(db_dsn), \
                    psycopg.connect(db_dsn, autocommit=True) as held, \
                    psycopg.connect(db_dsn, autocommit=True) as admin:
                held.execute("BEGIN")
                held.execute("UPDATE items SET body = %s WHERE id = 1", (NEW_BODY,))
                held.execute("INSERT INTO items (category, title) "
                             "SELECT 'c', 'filler' FROM generate_series(1, 20)")
                held.execute("UPDATE items SET category = 'b' WHERE id = 1")
                with caplog.at_level(logging.WARNING, "cdcddp.publish.livedata"):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(trio.to_thread.run_sync, held.execute, "COMMIT")
                        nursery.start_soon(trio.to_thread.run_sync, release_commit_wait,
                                           admin, held.info.backend_pid, 1.0)
            await wait_store(client, {"1": {"owner": None, "category": "b", "title": "x",
                                            "body": NEW_BODY, "rank": 0, "version": 0}},
                             collection="items")
            assert "moved into a subscription without its unchanged TOASTed values" in (
                caplog.text)
            assert OLD_BODY not in str(client.messages)
            assert server.live.rows_fetched == 1


async def test_a_chunked_transaction_cut_by_a_walsender_drop_reaches_clients_once_whole(
        db_dsn: str) -> None:
    """A transaction too big to buffer is applied to observers in chunks while it streams
    (clients see none of it before its commit). When the replication connection drops in the
    middle of it, the stream reconnects and delivers it again from its start: the observers
    it touched are resynced from a snapshot that sees it whole, and every client gets it
    once and whole, never a state from inside it."""
    async with live_server(db_dsn, temporary_slot=False, max_transaction_buffer=50,
                           resyncs=True) as server:
        live = server.live
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('c', 'z')")
        async with connect(server.ws_url, log_messages=True) as client, \
                connect(server.ws_url, log_messages=True) as untouched:
            await client.subscribe("items.byCategory", {"category": "a"})
            await untouched.subscribe("items.byCategory", {"category": "c"})
            mark = len(client.messages or [])
            await live.sync()
            live.hold = trio.Event()  # the consumer stops at the next commit
            await asql(db_dsn, "INSERT INTO other (note) VALUES ('before')")
            # Far bigger than the stream's buffers, the socket's and libpq's together: while
            # the consumer is held, the walsender stops in the middle of it.
            await asql(db_dsn, "BEGIN", "UPDATE items SET title = 'inside' WHERE id = 1",
                       "INSERT INTO items (category, title) "
                       "SELECT 'b', 'bulk ' || i FROM generate_series(1, 60000) i",
                       "UPDATE items SET title = 'y', version = 1 WHERE id = 1", "COMMIT")
            await trio.sleep(1.0)  # the walsender fills the buffers, then waits
            killed = await asql(db_dsn, "SELECT pg_terminate_backend(active_pid) "
                                        "FROM pg_replication_slots WHERE slot_name = %s "
                                        "AND active_pid IS NOT NULL",
                                params=(live.config.slot,))
            assert killed == [(True,)]
            live.hold.set()
            live.hold = None
            await wait_store(client, {"1": {"owner": None, "category": "a", "title": "y",
                                            "body": None, "rank": 0, "version": 1}},
                             timeout=30)
            await live.sync(timeout=30)
            assert live.resync_reasons["transaction_restart"] == 1
            # Once, whole: one `changed` with the final values, nothing from inside.
            changed = [m for m in data_messages(client, mark) if m["msg"] != "ready"]
            assert changed == [{"msg": "changed", "collection": "items", "id": "1",
                                "fields": {"title": "y", "version": 1}}]
            check_message_log(client)
            assert store(untouched) == {"2": {"owner": None, "category": "c", "title": "z",
                                              "body": None, "rank": 0, "version": 0}}
            assert not data_messages(untouched, len(untouched.messages or []))
