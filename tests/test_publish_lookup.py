"""Publication functions that read rows (reactive look-ups), against a real database."""

import psycopg
import pytest
from pydantic import BaseModel

from cdcddp.publish.definition import Cursor, PublicationError, Publications
from cdcddp.publish.filters import C
from cdcddp.publish.lookup import RecentRowChanges, SqlRowLookup, read_differs
from cdcddp.publish.visibility import Snapshot


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
        with pytest.raises(PublicationError, match="has no primary key"):
            lookup.row("notes", "x", key_columns=["body"])


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
    assert not log.unseen([("public", "lists", ("a",))], sees_500)
    assert log.unseen([("public", "lists", ("b",))], sees_500)
    assert not log.unseen([("public", "lists", ("c",))], sees_500)  # never changed
    assert not log.unseen([("public", "lists", ("b",))], Snapshot.parse("503:503:"))


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
