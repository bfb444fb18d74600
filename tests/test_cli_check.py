"""``cdcddp check APP``: preflight of the database and the app's publications."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
APP = "cdcddp.examples.todos:app"


def check(dsn: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdcddp.cli", "check", APP, "--dsn", dsn,
                           *extra], capture_output=True, text=True, timeout=60, cwd=ROOT)


def apply_schema(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in ("accounts", "todos"):
            conn.execute((ROOT / "schema" / f"{name}.sql").read_text())


def test_a_ready_database_passes_with_a_wal_keep_warning(db_dsn: str) -> None:
    apply_schema(db_dsn)
    done = check(db_dsn)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "warning: max_slot_wal_keep_size is unlimited" in done.stdout
    assert done.stdout.strip().endswith("0 error(s), 1 warning(s)")


def test_missing_tables_and_columns_are_named(db_dsn: str) -> None:
    apply_schema(db_dsn)
    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("ALTER TABLE users DROP COLUMN profile")
        conn.execute("DROP TABLE todos")
        conn.execute("ALTER TABLE lists DROP CONSTRAINT lists_pkey CASCADE")
    done = check(db_dsn, "--slot", "nope")
    assert done.returncode == 1
    out = done.stdout
    assert ("error: publication '(universal)': published column(s) profile do not exist in "
            "public.users: fix the cursor or add the column(s).") in out
    assert out.count("error: table lists has no primary key, so its UPDATEs and DELETEs are "
                     "not streamed") == 1
    assert out.strip().endswith("2 error(s), 1 warning(s)")  # a missing slot will be created
    assert "Traceback" not in done.stderr


def test_unreachable_database_and_bad_app_get_one_line(db_dsn: str) -> None:
    bad = check("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2")
    assert bad.returncode == 1
    assert "cannot connect to PostgreSQL" in bad.stdout
    wrong_app = subprocess.run([sys.executable, "-m", "cdcddp.cli", "check", "no.such:app",
                                "--dsn", db_dsn], capture_output=True, text=True, timeout=60)
    assert wrong_app.returncode == 1
    assert wrong_app.stderr.startswith("cdcddp: cannot import 'no.such'")
    assert "Traceback" not in wrong_app.stderr


def test_a_limited_cursors_sort_columns_are_checked(db_dsn: str) -> None:
    from cdcddp.publish.check import check_cursor
    from cdcddp.publish.definition import Cursor

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE posts (id int PRIMARY KEY, title text, doc jsonb, "
                     "at timestamptz)")
        good = check_cursor(conn, "p", Cursor("posts", fields=["title"],
                                              sort=[("at", "desc"), "title"], limit=5))
        assert [f.severity for f in good] == ["ok"]
        bad = check_cursor(conn, "p", Cursor("posts", fields=["title"],
                                             sort=["doc", "nope"], limit=5))
        assert [f.message for f in bad if f.severity == "error"] == [
            "publication 'p': sort column(s) nope do not exist in public.posts: fix the cursor "
            "or add the column(s).",
            "publication 'p': cannot sort by doc (jsonb): sort by numbers, text, varchar, bool, "
            "bytea, date, time, timestamp, timestamptz or uuid columns."]


def test_a_filter_is_run_with_values_of_its_parameters_declared_types(db_dsn: str) -> None:
    """A str parameter compared with a uuid column has no operator in PostgreSQL: named at
    check time, with the fix. Declared types that fit (an enum compared with str, Optional,
    lists for IN) pass; a parameter of a type with no sample value is not probed."""
    import uuid

    from pydantic import BaseModel

    from cdcddp.publish.check import check_cursor
    from cdcddp.publish.definition import Cursor
    from cdcddp.publish.filters import C, Param

    class AsText(BaseModel):
        token: str
        tokens: list[str]

    class Typed(BaseModel):
        token: uuid.UUID | None
        tokens: list[uuid.UUID]
        status: str
        odd: dict[str, int]

    with psycopg.connect(db_dsn, autocommit=True) as conn:
        conn.execute("CREATE TYPE status AS ENUM ('open', 'done')")
        conn.execute("CREATE TABLE grants (id int PRIMARY KEY, token uuid, status status)")

        def errors(cursor: Cursor, params: type[BaseModel]) -> list[str]:
            return [f.message for f in check_cursor(conn, "p", cursor, params)
                    if f.severity == "error"]

        def cursor(condition: object) -> Cursor:
            return Cursor("grants", fields=["status"], filter=condition)  # type: ignore[arg-type]

        fix = ("give the parameter the column's type in the publication's params model (UUID "
               "for a uuid column, datetime for a timestamp, int for an integer), or compare "
               "with a literal of it.")
        assert errors(cursor(C("token") == Param("token")), AsText) == [
            "publication 'p': its filter fails: operator does not exist: uuid = text: " + fix]
        assert errors(cursor(C("token").in_(Param("tokens"))), AsText) == [
            "publication 'p': its filter fails: operator does not exist: uuid = text: " + fix]
        limited = Cursor("grants", fields=["status"], filter=C("token") == Param("token"),
                         sort=["id"], limit=3)  # (its query as the server runs it)
        assert len(errors(limited, AsText)) == 1 and errors(limited, Typed) == []
        for condition in (C("token") == Param("token"), C("token").in_(Param("tokens")),
                          (C("status") == Param("status")) & (C("status") != "done"),
                          C("token") == Param("odd")):  # (not probed)
            assert errors(cursor(condition), Typed) == [], condition
