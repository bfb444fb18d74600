"""The live-data engine end to end: real PostgreSQL, the server with its replication slot,
real WebSocket clients (cdcddp.client)."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import secrets
import weakref
from collections import Counter

import psycopg
import pytest
import trio

from cdcddp.client import MeteorError, connect
from cdcddp.ddp.mergebox import MergeBox
from cdcddp.ddp.session import ServerSession
from cdcddp.publish.clients import LiveClient
from cdcddp.publish.observer import DocOp, Observer
from cdcddp.publish.routes import ObserverEntry
from cdcddp.publish.snapshots import SnapshotRead
from cdcddp.server.connection import Connection
from tests.livedata_support import (
    FIELDS,
    SCHEMA,
    asql,
    check_message_log,
    data_messages,
    expected_view,
    live_server,
    refused_in_one_line,
    stopped_by,
    store,
    wait_store,
)
from tests.server_support import fast_config, open_stuck_websocket


def row(owner: str | None, category: str, title: str, body: str | None = None, rank: int = 0,
        version: int = 0) -> dict[str, object]:
    return {"owner": owner, "category": category, "title": title, "body": body, "rank": rank,
            "version": version}


async def test_initial_documents_then_live_changes_field_by_field(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) VALUES "
                           "('ann', 'a', 'one'), ('bob', 'b', 'two')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "a"})
            assert store(client) == {"1": row("ann", "a", "one")}

            mark = len(client.messages or [])
            subscribed = [("items.byCategory", [{"category": "a"}])]
            await asql(db_dsn, "INSERT INTO items (owner, category, title) "
                               "VALUES ('cy', 'a', 'three')")
            await wait_store(client, expected_view(db_dsn, subscribed))

            await asql(db_dsn, "UPDATE items SET title = 'ONE', version = 1 WHERE id = 1")
            await wait_store(client, expected_view(db_dsn, subscribed))
            await asql(db_dsn, "UPDATE items SET owner = NULL WHERE id = 3")  # a cleared value
            await wait_store(client, expected_view(db_dsn, subscribed))
            await asql(db_dsn, "DELETE FROM items WHERE id = 3")
            await asql(db_dsn, "UPDATE items SET title = 'TWO' WHERE id = 2")  # not published
            await server.live.sync()
            await wait_store(client, {"1": row("ann", "a", "ONE", version=1)})

            got = data_messages(client, mark)
            assert got == [
                {"msg": "added", "collection": "items", "id": "3",
                 "fields": {"owner": "cy", "category": "a", "title": "three", "body": None,
                            "rank": 0, "version": 0}},
                {"msg": "changed", "collection": "items", "id": "1",
                 "fields": {"title": "ONE", "version": 1}},  # only what changed
                {"msg": "changed", "collection": "items", "id": "3", "fields": {"owner": None}},
                {"msg": "removed", "collection": "items", "id": "3"},
            ]


async def test_move_in_and_move_out_through_updates(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('b', 'y')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "a"})
            assert set(store(client)) == {"1"}
            await asql(db_dsn, "UPDATE items SET category = 'b', version = 1 WHERE id = 1")
            await asql(db_dsn, "UPDATE items SET category = 'a', version = 1 WHERE id = 2")
            await wait_store(client, {"2": row(None, "a", "y", version=1)})
            await asql(db_dsn, "UPDATE items SET category = 'a', version = 2 WHERE id = 1")
            await wait_store(client, {"1": row(None, "a", "x", version=2),
                                      "2": row(None, "a", "y", version=1)})
            kinds = [(m["msg"], m["id"]) for m in data_messages(client)]
            assert kinds == [("added", "1"), ("removed", "1"), ("added", "2"), ("added", "1")]
            check_message_log(client)


async def test_a_case_blind_column_is_filtered_by_exact_value_in_snapshots_and_changes(
        db_dsn: str) -> None:
    """Under a nondeterministic collation SQL's = says 'a' = 'A'; the stream's filters (in
    Python) do not: the snapshot query compares such a column as "C", so a subscription
    holds the same rows from its snapshot as from the changes."""
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "CREATE COLLATION case_blind "
                           "(provider = icu, locale = 'und-u-ks-level2', deterministic = false)",
                   "ALTER TABLE items ALTER COLUMN category TYPE text COLLATE case_blind",
                   "INSERT INTO items (category, title, rank) VALUES ('a', 'x', 1), ('A', 'y', 2)")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "a"})
            await client.subscribe("items.top", {"category": "a"})  # sorted, limited
            assert set(store(client)) == {"1"}
            await asql(db_dsn, "UPDATE items SET version = 1 WHERE id = 2",
                       "INSERT INTO items (category, title) VALUES ('A', 'z'), ('a', 'w')")
            await asql(db_dsn, "UPDATE items SET category = 'a' WHERE id = 2")
            await wait_store(client, {"1": row(None, "a", "x", rank=1),
                                      "2": row(None, "a", "y", rank=2, version=1),
                                      "4": row(None, "a", "w")})
            check_message_log(client)


async def test_an_enum_column_is_filtered_by_its_labels(db_dsn: str) -> None:
    """PostgreSQL has no enum = text: the snapshot query compares an enum column by its
    label, as the stream's values are (a filter on a status enum is common)."""
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "CREATE TYPE category AS ENUM ('b', 'a')",
                   "ALTER TABLE items ALTER COLUMN category TYPE category "
                   "USING category::category",
                   "INSERT INTO items (category, title, rank) VALUES ('a', 'x', 1), ('b', 'y', 2)")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "a"})
            await client.subscribe("items.top", {"category": "a"})  # sorted, limited
            await client.subscribe("items.byCategory", {"category": "nope"})  # no such label
            assert set(store(client)) == {"1"}
            await asql(db_dsn, "UPDATE items SET category = 'a', version = 1 WHERE id = 2",
                       "INSERT INTO items (category, title) VALUES ('b', 'z')")
            await wait_store(client, {"1": row(None, "a", "x", rank=1),
                                      "2": row(None, "a", "y", rank=2, version=1)})
            check_message_log(client)


async def test_overlapping_subscriptions_on_one_connection(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, rank) VALUES "
                           "('a', 'x', 1), ('b', 'y', 5), ('a', 'z', 9)")
        async with connect(server.ws_url, log_messages=True) as client:
            by_a = await client.subscribe("items.byCategory", {"category": "a"})
            ranked = await client.subscribe("items.ranked", 5)
            subs = [("items.byCategory", [{"category": "a"}]), ("items.ranked", [5])]
            assert store(client) == expected_view(db_dsn, subs)
            # row 3 is in both: one `added` only
            assert [m["id"] for m in data_messages(client) if m["msg"] == "added"] == \
                ["1", "3", "2"]

            await asql(db_dsn, "UPDATE items SET title = 'Z', version = 1 WHERE id = 3")
            await asql(db_dsn, "UPDATE items SET rank = 0, version = 1 WHERE id = 2")  # out
            await asql(db_dsn, "UPDATE items SET rank = 7, version = 1 WHERE id = 1")  # in both
            await server.live.sync()
            await wait_store(client, expected_view(db_dsn, subs))

            mark = len(client.messages or [])
            await client.unsubscribe(by_a)  # 1 and 3 are still ranked >= 5: nothing removed
            assert data_messages(client, mark) == []
            await client.unsubscribe(ranked)
            assert sorted(m["id"] for m in data_messages(client, mark)) == ["1", "3"]
            assert store(client) == {}
            check_message_log(client)
        assert server.live.observer_count == 0  # the last subscription took its observer


async def test_two_clients_share_one_observer(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url) as one, connect(server.ws_url) as two:
            await one.subscribe("items.byCategory", {"category": "a"})
            queries = server.live.snapshot_queries
            await two.subscribe("items.byCategory", {"category": "a"})
            assert server.live.snapshot_queries == queries  # joined the live observer
            assert server.live.observer_count == 1
            assert store(two) == store(one) == {"1": row(None, "a", "x")}
            await asql(db_dsn, "UPDATE items SET title = 'shared', version = 1 WHERE id = 1")
            expected = {"1": row(None, "a", "shared", version=1)}
            await wait_store(one, expected)
            await wait_store(two, expected)


async def test_toasted_column_is_kept_and_fetched_when_moving_in(db_dsn: str) -> None:
    body = secrets.token_urlsafe(15_000)  # ~20 kB, incompressible: stored out of line
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, body) VALUES "
                           "('a', 'x', %(b)s), ('b', 'y', %(b)s)", params={"b": body})
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.byCategory", {"category": "a"})
            mark = len(client.messages or [])
            await asql(db_dsn, "UPDATE items SET title = 'x2', version = 1 WHERE id = 1")
            await wait_store(client, {"1": row(None, "a", "x2", body, version=1)})
            assert data_messages(client, mark) == [
                {"msg": "changed", "collection": "items", "id": "1",
                 "fields": {"title": "x2", "version": 1}}]  # body not sent, not nulled

            # Row 2 moves in; wal2json leaves its unchanged body out: fetched by key.
            fetched = server.live.rows_fetched
            await asql(db_dsn, "UPDATE items SET category = 'a', version = 1 WHERE id = 2")
            await wait_store(client, expected_view(db_dsn, [("items.byCategory",
                                                            [{"category": "a"}])]))
            assert store(client)["2"]["body"] == body
            assert server.live.rows_fetched == fetched + 1
            check_message_log(client)


async def test_truncate_removes_documents_and_later_inserts_arrive(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('a', 'y')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            assert len(store(client)) == 2
            await asql(db_dsn, "TRUNCATE items")
            await wait_store(client, {})
            await asql(db_dsn, "BEGIN; TRUNCATE items; INSERT INTO items (category, title) "
                               "VALUES ('b', 'after'); COMMIT")
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('c', 'later')")
            await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            assert len(store(client)) == 2
            check_message_log(client)


async def test_rolled_back_transaction_sends_nothing(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            with psycopg.connect(db_dsn) as conn:
                conn.execute("INSERT INTO items (category, title) VALUES ('a', 'ghost')")
                conn.rollback()
            await asql(db_dsn, "INSERT INTO other (note) VALUES ('unpublished table')")
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'real')")
            await server.live.sync()
            await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            assert [m["fields"]["title"] for m in data_messages(client)] == ["real"]


async def test_requires_user_params_errors_and_unsub(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) VALUES "
                           "('alice', 'a', 'hers'), ('bob', 'a', 'his')")
        async with connect(server.ws_url, log_messages=True) as client:
            mine = await client.subscribe("items.mine")  # anonymous: ready, nothing
            assert store(client) == {}

            for bad in ([{"category": 3}], [{"nope": "a"}], ["a", "b"]):
                try:
                    await client.subscribe("items.byCategory", *bad)
                except MeteorError as exc:
                    assert exc.error == 400
                else:
                    raise AssertionError(f"params {bad} accepted")

            # Logging in re-runs user-bound subscriptions: only the difference is sent.
            connection = server.connection_of(client)
            await connection.set_user("alice")
            await wait_store(client, {"1": row("alice", "a", "hers")})
            await asql(db_dsn, "UPDATE items SET owner = 'alice', version = 1 WHERE id = 2")
            await wait_store(client, {"1": row("alice", "a", "hers"),
                                      "2": row("alice", "a", "his", version=1)})
            await connection.set_user("bob")
            await wait_store(client, {})
            await connection.set_user("alice")

            mark = len(client.messages or [])
            await client.unsubscribe(mine)
            got = (client.messages or [])[mark:]
            assert sorted(m["id"] for m in got if m["msg"] == "removed") == ["1", "2"]
            assert got[-1] == {"msg": "nosub", "id": mine}  # after the removals
            assert store(client) == {}
            check_message_log(client)


async def test_a_publication_that_fails_for_the_new_user_stops_with_its_error(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """Logging in re-runs the connection's subscriptions; one whose function now fails
    stops: its documents are removed, ``nosub`` carries the error (a MeteorError as raised,
    anything else a bare 500), and the other subscriptions follow the new user."""
    from cdcddp.ddp.messages import MeteorError as ServerMeteorError
    from cdcddp.publish.definition import Cursor, Publication
    from tests.livedata_support import build_live_app

    def for_user(params: None, user_id: str | None) -> Cursor:
        if user_id == "mallory":
            raise ServerMeteorError(403, "not for you")
        if user_id == "bug":
            raise ZeroDivisionError("internal detail")
        return Cursor("items", fields=FIELDS)

    app = build_live_app()
    app.add_publication(Publication("items.picky", for_user))
    async with live_server(db_dsn, app) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) VALUES "
                           "('mallory', 'a', 'hers'), ('bug', 'b', 'his')")
        for user, error, message in (("mallory", 403, "not for you"),
                                     ("bug", 500, "Internal server error")):
            async with connect(server.ws_url, log_messages=True) as client:
                picky = await client.subscribe("items.picky")
                mine = await client.subscribe("items.mine")
                assert len(store(client)) == 2
                with caplog.at_level(logging.CRITICAL):
                    await server.connection_of(client).set_user(user)
                await client.wait_for(lambda: picky in client.stopped_subs, 5)  # noqa: B023
                stopped = client.stopped_subs[picky]
                assert stopped is not None
                assert (stopped.error, stopped.reason) == (error, message)
                assert "internal detail" not in str(client.messages)
                owned = "1" if user == "mallory" else "2"
                # Only what items.mine still publishes is left.
                await client.wait_for(lambda: list(store(client)) == [owned], 5)  # noqa: B023
                await asql(db_dsn, "UPDATE items SET version = version + 1")
                await server.live.sync()
                await client.wait_for(
                    lambda: store(client)[owned]["version"] >= 1, 5)  # noqa: B023
                assert mine in client.ready_subs
                check_message_log(client)
            await asql(db_dsn, "UPDATE items SET version = 0")


async def test_handler_and_declarative_publications_share_the_merge_box(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            note = await client.subscribe("handler.note", "1")
            assert store(client)["1"] == {**row(None, "a", "x"), "note": "from a handler"}
            await client.unsubscribe(note)
            assert store(client)["1"] == row(None, "a", "x")
            check_message_log(client)


async def test_universal_publication_is_sent_without_a_sub(db_dsn: str) -> None:
    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C, UserId
    from tests.livedata_support import build_live_app

    app = build_live_app()
    app.add_publication(Publication(
        "", Cursor("items", collection="me", fields=["title"], filter=C("owner") == UserId()),
        universal=True))
    async with live_server(db_dsn, app) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) VALUES ('u1', 'a', 'me!')")
        async with connect(server.ws_url) as client:
            await client.ping()
            await server.live.sync()
            assert store(client, "me") == {}
            await server.connection_of(client).set_user("u1")
            await wait_store(client, {"1": {"title": "me!"}}, "me")
            await asql(db_dsn, "UPDATE items SET title = 'still me' WHERE id = 1")
            await wait_store(client, {"1": {"title": "still me"}}, "me")


async def test_two_publications_unite_fields_of_one_document(db_dsn: str) -> None:
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, rank) VALUES ('a', 'x', 1)")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.titles")
            assert store(client) == {"1": {"title": "x", "version": 0}}
            await client.subscribe("items.ranked", 1)
            assert store(client) == {"1": row(None, "a", "x", rank=1)}
            await asql(db_dsn, "UPDATE items SET rank = 0, title = 'y', version = 1")
            await wait_store(client, {"1": {"title": "y", "version": 1}})
            check_message_log(client)
            assert set(FIELDS) >= set(store(client)["1"])


async def _stuck_subscriber(port: int, publication: str) -> trio.SocketStream:
    """A raw WebSocket client that subscribes, then never reads (tiny receive buffer)."""
    return await open_stuck_websocket(
        port, [f'{{"msg":"sub","id":"s","name":"{publication}","params":[]}}'])


async def test_a_stuck_client_costs_its_view_delays_nobody_and_is_dropped(db_dsn: str) -> None:
    from tests.server_support import fast_config

    # The stuck client's clock starts at its subscription; the samples below must come before
    # it is dropped, also on a loaded machine (a cold full run once took longer than 2 s).
    async with live_server(db_dsn, server_config=fast_config(send_timeout=5.0)) as server:
        await asql(db_dsn, "INSERT INTO items (category, title, body) "
                           "SELECT 'a', 't' || i, repeat('x', 2000) FROM generate_series(1, 100) i")
        stuck = await _stuck_subscriber(server.port, "items.all")
        async with stuck, connect(server.ws_url) as reader:
            await reader.subscribe("items.all")
            with trio.fail_after(5):
                while len(server.server.connections) < 2:
                    await trio.sleep(0.01)
            slow = next(c for c in server.server.connections
                        if c.connection_id != reader.session)
            most_pending = 0
            for version in range(1, 31):
                await asql(db_dsn, "UPDATE items SET version = %s, title = 't' || id || '.' || %s",
                           params=(version, version))
                most_pending = max(most_pending, slow.client.box.pending_count)
            # The reader is current right away, whatever the stuck one does.
            with trio.fail_after(5):
                await wait_store(reader, expected_view(db_dsn, [("items.all", [])]))
            assert 0 < most_pending <= 100  # dirty documents, coalesced: no queue of changes
            with trio.fail_after(15):
                while not slow.aborted:
                    await trio.sleep(0.05)
            await reader.ping()


async def test_a_publication_whose_query_fails_stops_with_500_and_no_internals(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    from cdcddp.publish.definition import Cursor, Publication
    from tests.livedata_support import build_live_app

    app = build_live_app()
    app.add_publication(Publication("broken", Cursor("no_such_table", fields=["secret_col"])))
    async with live_server(db_dsn, app) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            try:
                await client.subscribe("broken")
            except MeteorError as exc:
                assert exc.error == 500 and exc.reason == "Internal server error"
            else:
                raise AssertionError("subscribed to a publication whose query fails")
            assert "no_such_table" not in str(client.messages)
            # The log says it in one line (no traceback), with what to do.
            (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert record.exc_info is None and record.getMessage() == (
                'observer for public.no_such_table failed to start: relation '
                '"public.no_such_table" does not exist: the publication\'s cursor names what '
                "the database lacks: fix the cursor or the schema (cdcddp check lists such "
                "problems)")
            await client.subscribe("items.all")  # the connection and the engine carry on
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'fine')")
            await wait_store(client, expected_view(db_dsn, [("items.all", [])]))


async def test_a_filter_comparing_a_column_with_another_type_is_refused_with_the_fix_named(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """A str parameter against a uuid column: PostgreSQL has no such operator. One log line
    says so and what to change; the client gets a 500."""
    from pydantic import BaseModel

    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C, Param
    from tests.livedata_support import build_live_app

    class ByToken(BaseModel):
        token: str  # (the column is a uuid)

    app = build_live_app()
    app.add_publication(Publication("tokens", Cursor("tokens", fields=["note"],
                                                     filter=C("token") == Param("token")),
                                    params=ByToken))
    async with live_server(db_dsn, app) as server:
        await asql(db_dsn, "CREATE TABLE tokens (id int PRIMARY KEY, token uuid, note text)")
        async with connect(server.ws_url) as client:
            line = await refused_in_one_line(
                client, caplog, "tokens", {"token": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"})
            assert line.startswith("observer for public.tokens failed to start: operator "
                                   "does not exist: uuid = text")
            assert line.endswith("give the parameter that type in the publication's params "
                                 "model (UUID for a uuid column, datetime for a timestamp, "
                                 "int for an integer) or compare with a literal of it")


async def test_a_table_the_server_may_not_read_whole_is_refused_with_the_fix_named(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """No SELECT privilege; then row-level security. The stream shows every row whatever the
    policies; a snapshot under a policy would show the server's role fewer, and the stream
    would then bring the others in one by one as they change. So such a snapshot fails, and
    the log says, in one line, what to change."""
    role = f"cdcddp_rls_{os.getpid()}"
    await asql(db_dsn, f'CREATE ROLE "{role}" LOGIN REPLICATION', SCHEMA,
               f'GRANT SELECT ON other TO "{role}"',
               "INSERT INTO items (owner, category, title) VALUES ('ann', 'a', 'hers'), "
               "('bob', 'b', 'his')")
    try:
        async with live_server(db_dsn.replace("user=postgres", f"user={role}"),
                               schema="") as server:
            async with connect(server.ws_url) as client:
                async def refused() -> str:
                    return await refused_in_one_line(client, caplog, "items.all")

                assert await refused() == (
                    "observer for public.items failed to start: permission denied for table "
                    "items: grant the server's database role what the message names (SELECT "
                    "on the table, USAGE on its schema)")
                await asql(db_dsn, f'GRANT SELECT ON items TO "{role}"',
                           "ALTER TABLE items ENABLE ROW LEVEL SECURITY",
                           "CREATE POLICY only_ann ON items USING (owner = 'ann')")
                assert await refused() == (
                    'observer for public.items failed to start: query would be affected by '
                    'row-level security policy for table "items": the server\'s database '
                    "role is subject to the table's row-level security, so a snapshot would "
                    "lack rows the stream shows: give it BYPASSRLS (ALTER ROLE ... BYPASSRLS) "
                    "or make it the table's owner without FORCE ROW LEVEL SECURITY")

                await asql(db_dsn, f'ALTER ROLE "{role}" BYPASSRLS')
                await client.subscribe("items.all")
                await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
                assert len(store(client)) == 2
    finally:
        await asql(db_dsn, f'DROP OWNED BY "{role}"', f'DROP ROLE "{role}"')


async def test_a_relation_whose_changes_are_never_streamed_is_refused_with_the_fix_named(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """An UNLOGGED table (not in the WAL), a view: a subscription would get rows that never
    change. (Partitioned tables: tests/test_livedata_partitions.py.)"""
    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C
    from cdcddp.publish.lookup import RowLookup
    from tests.livedata_support import build_live_app

    app = build_live_app()
    for name in ("scratch", "titles"):
        app.add_publication(Publication(name, Cursor(name, fields=["title"])))

    def looked_up(params: None, user_id: str | None, lookup: RowLookup) -> Cursor:
        found = lookup.row("scratch", 1, columns=["title"])
        return Cursor("items", fields=["title"], filter=C("title") == found["title"])

    app.add_publication(Publication("scratch.lookedUp", looked_up))
    await asql(db_dsn, "CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY, title text)",
               "INSERT INTO scratch VALUES (1, 'one')")
    async with live_server(db_dsn, app) as server:
        await asql(db_dsn, "CREATE VIEW titles AS SELECT id, title FROM items")
        async with connect(server.ws_url) as client:
            for name, reason in (
                    ("scratch", "public.scratch is UNLOGGED: its changes are not written to "
                                "the WAL, so never streamed: run ALTER TABLE public.scratch "
                                "SET LOGGED"),
                    ("titles", "public.titles is a view: only tables' changes are streamed: "
                               "publish the table(s) it reads")):
                assert await refused_in_one_line(client, caplog, name) == (
                    f"observer for public.{name} failed to start: {reason}")
            # A function that looks up a row of it: it would never run again.
            assert await refused_in_one_line(client, caplog, "scratch.lookedUp") == (
                "publication 'scratch.lookedUp' failed: public.scratch is UNLOGGED: its changes "
                "are not written to the WAL, so never streamed: run ALTER TABLE public.scratch "
                "SET LOGGED")
            # Once it is streamed, it is published, and followed.
            await asql(db_dsn, "ALTER TABLE scratch SET LOGGED")
            checks = server.live.streamed_checks
            async with contextlib.AsyncExitStack() as stack:
                others = [await stack.enter_async_context(connect(server.ws_url))
                          for _ in range(8)]
                async with trio.open_nursery() as nursery:  # at once: one catalog read
                    for other, category in zip(others, "abcdefgh", strict=True):
                        nursery.start_soon(other.subscribe, "items.byCategory",
                                           {"category": category})
            assert server.live.streamed_checks == checks + 1
            await client.subscribe("scratch")
            assert store(client, "scratch") == {"1": {"title": "one"}}
            await asql(db_dsn, "UPDATE scratch SET title = 'ONE'")
            await client.wait_for(lambda: store(client, "scratch")["1"]["title"] == "ONE", 10)


async def test_a_table_whose_updates_and_deletes_are_never_streamed_is_refused(
        db_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """No primary key (or REPLICA IDENTITY NOTHING): wal2json drops the table's UPDATEs and
    DELETEs, so a subscription would keep rows that changed or went. Refused with the fix;
    and when a subscribed table loses its identity, its subscriptions stop."""
    from cdcddp.publish.definition import Cursor, Publication
    from tests.livedata_support import build_live_app

    app = build_live_app()
    app.add_publication(Publication("notes", Cursor("notes", fields=["title"])))
    await asql(db_dsn, "CREATE TABLE notes (id int NOT NULL, title text)",
               "INSERT INTO notes VALUES (1, 'one')")
    async with live_server(db_dsn, app, catalog_check_interval=0.1) as server:
        async with connect(server.ws_url) as client:
            assert await refused_in_one_line(client, caplog, "notes") == (
                "observer for public.notes failed to start: table public.notes has no primary "
                "key, so its UPDATEs and DELETEs are not streamed: add one (ALTER TABLE "
                "public.notes ADD PRIMARY KEY (...)) or set REPLICA IDENTITY USING INDEX or "
                "FULL")
            await asql(db_dsn, "ALTER TABLE notes ADD PRIMARY KEY (id)")
            await client.subscribe("notes", sub_id="notes")
            await asql(db_dsn, "UPDATE notes SET title = 'ONE'")
            await client.wait_for(lambda: store(client, "notes")["1"]["title"] == "ONE", 10)
            assert await stopped_by(client, caplog, db_dsn, ["notes"],
                                    "ALTER TABLE notes REPLICA IDENTITY NOTHING") == [
                "table public.notes has REPLICA IDENTITY NOTHING, so its UPDATEs and DELETEs "
                "are not streamed: run ALTER TABLE public.notes REPLICA IDENTITY DEFAULT: 1 "
                "observer(s) of public.notes stop"]
            # USING INDEX, and that index dropped: PostgreSQL then logs as for NOTHING.
            await asql(db_dsn, "CREATE UNIQUE INDEX notes_id ON notes (id)",
                       "ALTER TABLE notes REPLICA IDENTITY USING INDEX notes_id")
            await client.subscribe("notes", sub_id="again")
            assert await stopped_by(client, caplog, db_dsn, ["again"],
                                    "DROP INDEX notes_id") == [
                "table public.notes has REPLICA IDENTITY USING INDEX, but that index was "
                "dropped, so its UPDATEs and DELETEs are not streamed: run ALTER TABLE "
                "public.notes REPLICA IDENTITY USING INDEX (another unique index), DEFAULT "
                "(with a primary key) or FULL: 1 observer(s) of public.notes stop"]


async def test_initial_result_larger_than_the_send_buffer_goes_out_in_pieces(
        db_dsn: str) -> None:
    # 10,000 documents of ~130 bytes each: about 1.3 MB of `added`, against a 512 kB bound on
    # unsent bytes. The bound is for clients that stop reading, not for big subscriptions.
    config = fast_config(max_send_buffer_bytes=512 * 1024)
    async with live_server(db_dsn, server_config=config) as server:
        await asql(db_dsn, "INSERT INTO items (owner, category, title) SELECT 'o', 'a', "
                           "'title ' || g FROM generate_series(1, 10000) g")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            assert len(store(client)) == 10000  # all of them before `ready`
            messages = client.messages or []
            ready_at = next(i for i, m in enumerate(messages) if m.get("msg") == "ready")
            assert sum(m.get("msg") == "added" for m in messages[:ready_at]) == 10000
            await asql(db_dsn, "UPDATE items SET title = 'last' WHERE id = 10000")
            await wait_store(client, {**store(client), "10000": {**store(client)["10000"],
                                                                "title": "last"}})
        check_message_log(client)


async def test_a_backlog_is_written_to_clients_in_few_rounds(db_dsn: str) -> None:
    """Catching up (more already sent by the server than applied), the engine applies what
    is waiting before it writes to clients: a backlog of single-row transactions reaches a
    client in a few writes, not one per commit, and whole."""
    transactions = 3000
    # One batch in flight between the stream's reader and the engine: they take turns, and
    # between two batches nothing is buffered but the socket.
    async with live_server(db_dsn, stream_options={"status_interval": 0.2,
                                                   "buffer_batches": 1}) as server:
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("items.all")
            live = server.live
            live.hold = trio.Event()  # the engine stops at the next commit
            await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'first')")
            await asql(db_dsn, f"""
                CREATE PROCEDURE backlog() LANGUAGE plpgsql AS $$
                BEGIN
                    FOR i IN 1..{transactions} LOOP
                        INSERT INTO items (category, title) VALUES ('a', 't' || i);
                        COMMIT;
                    END LOOP;
                END $$""", "CALL backlog()")
            rounds_before = live.flush_rounds
            live.hold.set()
            live.hold = None
            with trio.fail_after(30):
                await wait_store(client, expected_view(db_dsn, [("items.all", [])]))
            rounds = live.flush_rounds - rounds_before
            assert rounds <= transactions // 30, rounds
            check_message_log(client)
            assert len(data_messages(client)) == transactions + 1  # one `added` each


KEYED_SCHEMA = """
CREATE TABLE labels (region int, code text, label text, grp int NOT NULL,
                     PRIMARY KEY (region, code));
CREATE TABLE tags (id uuid PRIMARY KEY, label text);
CREATE TABLE names (name text PRIMARY KEY, label text);
"""


async def test_documents_of_every_key_form_live_through_changes_and_deletes(db_dsn: str) -> None:
    # Composite, uuid and text keys, including texts Meteor would misparse (escaped on the
    # wire): the observer keeps documents by wire id and derives it from the key of a
    # delete or a row moving out, so each form must come out the same both ways.
    from pydantic import BaseModel

    from cdcddp.app import App
    from cdcddp.publish.definition import Cursor, Publication
    from cdcddp.publish.filters import C, Param

    class GroupParams(BaseModel):
        grp: int

    app = App("keys")
    app.add_publication(Publication(
        "labels.byGroup", Cursor("labels", fields=["label"], primary_key=["region", "code"],
                                 filter=C("grp") == Param("grp")), params=GroupParams))
    app.add_publication(Publication("tags", Cursor("tags", fields=["label"])))
    app.add_publication(Publication("names", Cursor("names", fields=["label"],
                                                    primary_key=["name"])))
    hex24 = "0123456789abcdef01234567"
    tag = "6f1c8a52-3d2e-4b7a-9c1d-2e3f4a5b6c7d"
    async with live_server(db_dsn, app, schema=KEYED_SCHEMA) as server:
        await asql(db_dsn, "INSERT INTO labels VALUES (7, 'en', 'seven', 1), (-1, 'x,y', 'm', 1)",
                   f"INSERT INTO tags VALUES ('{tag}', 'one')",
                   f"INSERT INTO names VALUES ('-x', 'dash'), ('{hex24}', 'hex'), ('~t', 'tilde')")
        async with connect(server.ws_url, log_messages=True) as client:
            await client.subscribe("labels.byGroup", {"grp": 1})
            await client.subscribe("tags")
            await client.subscribe("names")
            assert store(client, "labels") == {'[7,"en"]': {"label": "seven"},
                                               '[-1,"x,y"]': {"label": "m"}}
            assert store(client, "tags") == {tag: {"label": "one"}}
            assert store(client, "names") == {"--x": {"label": "dash"},
                                              "-" + hex24: {"label": "hex"},
                                              "-~t": {"label": "tilde"}}
            await asql(db_dsn,
                       "UPDATE labels SET label = 'SEVEN' WHERE region = 7",
                       "UPDATE labels SET code = 'fr' WHERE region = 7",  # the key changes
                       "UPDATE labels SET grp = 2 WHERE region = -1",  # moves out
                       "INSERT INTO labels VALUES (3, '', 'empty code', 1)",
                       f"UPDATE tags SET label = 'ONE' WHERE id = '{tag}'",
                       "DELETE FROM names WHERE name IN ('-x', '~t')",
                       f"UPDATE names SET label = 'HEX' WHERE name = '{hex24}'")
            await wait_store(client, {'[7,"fr"]': {"label": "SEVEN"},
                                      '[3,""]': {"label": "empty code"}}, "labels")
            await wait_store(client, {tag: {"label": "ONE"}}, "tags")
            await wait_store(client, {"-" + hex24: {"label": "HEX"}}, "names")
            await asql(db_dsn, "DELETE FROM labels", "DELETE FROM tags", "DELETE FROM names")
            for collection in ("labels", "tags", "names"):
                await wait_store(client, {}, collection)
            check_message_log(client)
            assert server.live.resyncs == 0  # (a wrong id would fail the observer: a resync)


async def test_a_closed_connection_is_freed_without_the_cycle_collector(db_dsn: str) -> None:
    """A connection's objects form no reference cycle once it is closed: with thousands of
    clients coming and going, each left for a full collection (which walks every observer
    and merge box) cost memory until one ran, and a long pause when it did."""
    async with live_server(db_dsn) as server:
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('b', 'y')")
        async with connect(server.ws_url) as warm:
            await warm.subscribe("items.all")
        gc.collect()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for category in ("a", "b", "c"):
                async with connect(server.ws_url) as client:
                    await client.subscribe("items.all")
                    await client.subscribe("items.byCategory", {"category": category})
            with trio.fail_after(5):
                while server.server.connections:
                    await trio.sleep(0.01)
            gc.collect()
            server_side = (Connection, LiveClient, MergeBox, ServerSession)
            left = [type(o).__name__ for o in gc.garbage if isinstance(o, server_side)]
            assert left == []
        finally:
            gc.set_debug(0)
            gc.garbage.clear()


async def test_an_observer_is_freed_when_its_last_subscription_ends(db_dsn: str) -> None:
    """Nothing keeps a dropped observer's rows alive (the snapshot reader once held its last
    read batch, and so the result, until the next batch: memory held for nothing, freed on
    the next subscriber's path — 15-20 ms for 100,000 rows)."""
    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) VALUES ('a', 'x'), ('b', 'y')")
        async with connect(server.ws_url) as client:
            sub = await client.subscribe("items.byCategory", {"category": "a"})
            (entry,) = live.observers()
            observer = weakref.ref(entry.observer)
            del entry
            await client.unsubscribe(sub)
            with trio.fail_after(5):
                while live.observer_count:
                    await trio.sleep(0.01)
            gc.collect()
            assert observer() is None


async def test_unsubscribing_while_the_snapshot_runs_leaves_nothing(db_dsn: str) -> None:
    """An ``unsub`` that arrives before its subscription's snapshot ran, or while it runs,
    gets its ``nosub``; no document of it reaches the client and its observer is dropped.
    A later subscription to the same data is served whole."""
    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) "
                           "SELECT 'a', 't' || g FROM generate_series(1, 200) g")
        acquire = live.acquire
        entered, go_on = trio.Event(), trio.Event()

        async def acquire_after_go(bound):  # type: ignore[no-untyped-def]
            entered.set()
            await go_on.wait()
            return await acquire(bound)

        async with connect(server.ws_url, log_messages=True) as client:
            # Before its snapshot started: the unsub right behind the sub.
            await client.send({"msg": "sub", "id": "early", "name": "items.byCategory",
                               "params": [{"category": "a"}]})
            await client.unsubscribe("early")
            # While its snapshot runs (held at the start of the observer's acquisition).
            live.acquire = acquire_after_go  # type: ignore[method-assign]
            await client.send({"msg": "sub", "id": "during", "name": "items.byCategory",
                               "params": [{"category": "a"}]})
            with trio.fail_after(5):
                await entered.wait()
            await client.send({"msg": "unsub", "id": "during"})
            live.acquire = acquire  # type: ignore[method-assign]
            go_on.set()
            await client.wait_for(lambda: "during" in client.stopped_subs, 5)
            with trio.fail_after(5):
                while live.observer_count:
                    await trio.sleep(0.01)
            await client.ping()
            assert store(client) == {}
            assert "early" not in client.ready_subs and "during" not in client.ready_subs
            assert client.stopped_subs["early"] is None and client.stopped_subs["during"] is None
            assert not data_messages(client)
            await client.subscribe("items.byCategory", {"category": "a"})
            assert len(store(client)) == 200


async def test_subscription_churn_leaves_nothing_behind(db_dsn: str) -> None:
    """Clients that connect, subscribe, see changes, unsubscribe and leave, one after
    another, leave no server object behind: memory stays bounded however long it runs."""
    kinds = (Connection, LiveClient, MergeBox, ServerSession, Observer, ObserverEntry,
             SnapshotRead, DocOp)

    def census() -> dict[str, int]:
        gc.collect()
        found = Counter(type(o).__name__ for o in gc.get_objects() if isinstance(o, kinds))
        return {kind.__name__: found[kind.__name__] for kind in kinds}

    async with live_server(db_dsn) as server:
        live = server.live
        assert live is not None
        await asql(db_dsn, "INSERT INTO items (category, title) "
                           "SELECT 'c' || (g % 5), 't' || g FROM generate_series(1, 20) g")

        async def visit(i: int) -> None:
            async with connect(server.ws_url) as client:
                category = f"c{i % 5}"
                by_category = await client.subscribe("items.byCategory", {"category": category})
                everything = await client.subscribe("items.all")
                await asql(db_dsn, "INSERT INTO items (category, title) VALUES (%s, %s)",
                           params=(category, f"n{i}"))
                await asql(db_dsn, "UPDATE items SET version = version + 1 "
                                   "WHERE category = %s", params=(category,))
                await asql(db_dsn, "DELETE FROM items WHERE id = (SELECT min(id) FROM items)")
                await live.sync()
                await client.wait_for(lambda: len(store(client)) == 20, 5)
                await client.unsubscribe(by_category)
                await client.unsubscribe(everything)

        async def settled() -> dict[str, int]:
            with trio.fail_after(5):
                while server.server.connections or live.observer_count:
                    await trio.sleep(0.01)
            return census()

        for i in range(10):
            await visit(i)
        before = await settled()
        for i in range(10, 110):
            await visit(i)
        assert await settled() == before
