"""Publication definitions: rendering rows, snapshot SQL, params validation, user rules."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from pydantic import BaseModel, ConfigDict, Field

from cdcddp.publish.definition import (
    Cursor,
    Publication,
    PublicationError,
    PublicationParamsError,
    Publications,
    camel_case,
)
from cdcddp.publish.filters import C, Param, UserId


class ListParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    listId: int = Field(ge=1)
    status: str = "open"


def todos_cursor(**overrides: Any) -> Cursor:
    spec: dict[str, Any] = {
        "table": "public.todos", "collection": "todos", "camel_case": True,
        "fields": ["title", "list_id", "created_at", "_private_note", ("done", "isDone")],
        "filter": (C("list_id") == Param("listId")) & (C("owner_id") == UserId())
        & (C("status") == Param("status")),
    }
    spec.update(overrides)
    return Cursor(**spec)


def test_camel_case() -> None:
    assert camel_case("created_at") == "createdAt"
    assert camel_case("list_id") == "listId"
    assert camel_case("title") == "title"
    assert camel_case("_private_note") == "_privateNote"
    assert camel_case("html_URL") == "htmlURL"
    assert camel_case("a__b") == "aB"


def test_render_renames_fields_and_builds_the_id() -> None:
    cursor = todos_cursor()
    created = datetime(2024, 1, 2, tzinfo=UTC)
    row = {"id": 12, "title": "milk", "list_id": 3, "created_at": created, "_private_note": None,
           "done": False, "owner_id": "u1", "status": "open"}
    assert cursor.render(row) == ("12", {"title": "milk", "listId": 3, "createdAt": created,
                                         "_privateNote": None, "isDone": False})
    assert cursor.collection_name == "todos"
    assert (cursor.schema_name, cursor.table_name) == ("public", "todos")
    with pytest.raises(KeyError):  # an absent (unchanged TOAST) column is never sent as null
        cursor.render({"id": 12, "title": "milk"})


def test_explicit_mapping_and_composite_key() -> None:
    cursor = Cursor(("app", "translations"), fields={"lang": "lang", "body_text": "text"},
                    primary_key=("msg_id", "lang"))
    assert cursor.collection_name == "translations"
    assert cursor.render({"msg_id": 7, "lang": "en", "body_text": "hi"}) == (
        '[7,"en"]', {"lang": "en", "text": "hi"})  # lang listed, so it is repeated in fields


def test_pk_is_not_repeated_unless_listed() -> None:
    plain = Cursor("items", fields=["name"])
    listed = Cursor("items", fields=["id", "name"])
    row = {"id": "abc", "name": "n"}
    assert plain.render(row) == ("abc", {"name": "n"})
    assert listed.render(row) == ("abc", {"id": "abc", "name": "n"})


@pytest.mark.parametrize("spec", [
    {"table": "t", "fields": "title"},
    {"table": "t", "fields": {"id": "_id"}},
    {"table": "t", "fields": {"a": "x.y"}},
    {"table": "t", "fields": {"a": "$set"}},
    {"table": "t", "fields": ["created_at", ("createdAt", "createdAt")], "camel_case": True},
    {"table": "t", "fields": ["a"], "primary_key": ()},
    {"table": "t", "fields": ["a"], "primary_key": "id"},
    {"table": "", "fields": ["a"]},
    {"table": "t", "fields": ["a"], "filter": "id = 1"},
])
def test_bad_cursor_declarations_are_refused(spec: dict[str, Any]) -> None:
    with pytest.raises(PublicationError):
        Cursor(**spec)


def test_snapshot_query_runs_and_matches_the_predicate(db_dsn: str) -> None:
    publication = Publication("todos.inList", todos_cursor(), params=ListParams,
                              requires_user=True)
    (bound,) = publication.resolve([{"listId": 3}], "u1")
    query, params = bound.snapshot_query()
    text = query.as_string(None)
    assert text.startswith('SELECT "id", "title", "list_id", "created_at", "_private_note", '
                           '"done", "owner_id", "status" FROM "public"."todos" WHERE ')
    assert params == [3, "u1", "open"]
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("""CREATE TABLE todos (id serial PRIMARY KEY, title text, list_id int,
            created_at timestamptz DEFAULT now(), _private_note text, done bool DEFAULT false,
            owner_id text, status text DEFAULT 'open')""")
        conn.execute("""INSERT INTO todos (title, list_id, owner_id, status) VALUES
            ('a', 3, 'u1', 'open'), ('b', 3, 'u2', 'open'), ('c', 4, 'u1', 'open'),
            ('d', 3, 'u1', 'done'), ('e', 3, NULL, 'open')""")
        snapshot = conn.cursor(row_factory=dict_row).execute(query, params).fetchall()
        everything = conn.cursor(row_factory=dict_row).execute("SELECT * FROM todos").fetchall()
    assert [bound.render(r)[1]["title"] for r in snapshot] == ["a"]
    assert [r["title"] for r in everything if bound.predicate(r)] == ["a"]
    assert set(snapshot[0]) == set(bound.columns)  # every column the observer needs


def test_params_validation_errors_are_clear() -> None:
    publication = Publication("todos.inList", todos_cursor(), params=ListParams)
    cases: list[tuple[Any, str]] = [
        ([{"listId": "x"}], "listId"),
        ([{"listId": 0}], "greater than or equal to 1"),
        ([{}], "listId: Field required"),
        ([{"listId": 1, "extra": 1}], "extra"),
        ([1, 2], "one object"),
        ("listId", "must be a list"),
    ]
    for raw, fragment in cases:
        with pytest.raises(PublicationParamsError) as info:
            publication.resolve(raw, "u1")
        assert fragment in str(info.value), raw
        assert info.value.error_code == 400
        assert info.value.publication == "todos.inList"
    with pytest.raises(PublicationParamsError) as info:
        publication.resolve([{"listId": "x"}], "u1")
    assert info.value.details == [{"loc": ["listId"], "type": "int_parsing",
                                   "msg": info.value.details[0]["msg"]}]


def test_positional_params_and_no_params() -> None:
    positional = Publication("p", todos_cursor(), params=ListParams, positional_params=True)
    (bound,) = positional.resolve([5, "done"], "u")
    assert bound.snapshot_query()[1] == [5, "u", "done"]
    with pytest.raises(PublicationParamsError, match="at most 2"):
        positional.resolve([5, "done", 1], "u")
    bare = Publication("bare", Cursor("items", fields=["name"]))
    assert len(bare.resolve([], None)) == 1
    assert len(bare.resolve(None, None)) == 1
    with pytest.raises(PublicationParamsError, match="takes no parameters"):
        bare.resolve([{"a": 1}], None)


def test_requires_user_gives_anonymous_subscribers_nothing() -> None:
    publication = Publication("todos.inList", todos_cursor(), params=ListParams,
                              requires_user=True)
    assert publication.resolve([{"listId": 3}], None) == ()
    with pytest.raises(PublicationParamsError):  # params are still checked first
        publication.resolve([{"listId": "x"}], None)
    # Without requires_user, UserId() is NULL for anonymous subscribers: nothing matches.
    open_pub = Publication("open", todos_cursor(), params=ListParams)
    (bound,) = open_pub.resolve([{"listId": 3}], None)
    assert not bound.predicate({"list_id": 3, "owner_id": None, "status": "open"})


def test_function_publications() -> None:
    publications = Publications()
    seen: list[Any] = []

    @publications.publication("dashboard", params=ListParams, requires_user=True)
    def dashboard(params: ListParams, user_id: str) -> list[Cursor]:
        seen.append((params.listId, user_id))
        return [Cursor("lists", fields=["name"], filter=C("id") == params.listId),
                todos_cursor()]

    publication = publications.get("dashboard")
    assert publication is not None and "dashboard" in publications
    lists, todos = publication.resolve([{"listId": 9, "status": "done"}], "u7")
    assert seen == [(9, "u7")]
    assert lists.snapshot_query()[1] == [9]
    assert todos.snapshot_query()[1] == [9, "u7", "done"]  # Param()s bound from the model
    assert publication.resolve([{"listId": 9}], None) == ()  # function not even called
    assert len(seen) == 1

    @publications.publication("dup")
    def duplicate(params: None, user_id: Any) -> list[Cursor]:
        return [Cursor("a", fields=["x"], collection="c"), Cursor("b", fields=["y"],
                                                                  collection="c")]

    with pytest.raises(PublicationError, match="several cursors"):
        publications.get("dup").resolve([], None)  # type: ignore[union-attr]

    @publications.publication("nothing")
    def nothing(params: None, user_id: Any) -> None:
        return None

    assert publications.get("nothing").resolve([], None) == ()  # type: ignore[union-attr]


def test_declaration_checks() -> None:
    publications = Publications()
    publications.add(Publication("a", Cursor("t", fields=["x"])))
    with pytest.raises(PublicationError, match="already defined"):
        publications.add(Publication("a", Cursor("t", fields=["x"])))
    with pytest.raises(PublicationError, match="undeclared params"):
        Publication("b", Cursor("t", fields=["x"], filter=C("x") == Param("nope")))
    with pytest.raises(PublicationError, match="universal"):
        Publication("c", Cursor("t", fields=["x"]), params=ListParams, universal=True)
    with pytest.raises(PublicationError, match="several cursors"):
        Publication("d", [Cursor("t", fields=["x"]), Cursor("t", fields=["y"])])
    users = publications.add(Publication(
        "", Cursor("users", fields=["username", "profile"], filter=C("id") == UserId()),
        universal=True))
    assert publications.universal == (users,)
    assert publications.get("") is None  # an unnamed universal publication cannot be subscribed
    (bound,) = users.resolve([], "u1")
    assert bound.filter.equality_constraints() == {"id": frozenset({"u1"})}


def test_equal_subscriptions_share_a_key() -> None:
    publication = Publication("todos.inList", todos_cursor(), params=ListParams)
    (a,) = publication.resolve([{"listId": 3}], "u1")
    (b,) = publication.resolve([{"listId": 3, "status": "open"}], "u1")
    (c,) = publication.resolve([{"listId": 3}], "u2")
    assert a.key == b.key and hash(a.key) == hash(b.key)
    assert a.key != c.key
