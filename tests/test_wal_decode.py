"""wal2json v2 decoding against real wal2json output (SQL API on a real slot).

One module-scoped capture: a database is set up, every scenario below is written, and the
slot's changes are read once with ``WAL2JSON_OPTIONS`` under ``SESSION_SETTINGS``. The tests
then decode those payloads and check what came out.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import psycopg
import pytest

from cdcddp.db import SESSION_OPTIONS
from cdcddp.devcluster import LocalCluster
from cdcddp.wal import pgtypes
from cdcddp.wal.decode import (
    SESSION_SETTINGS,
    WAL2JSON_OPTIONS,
    DecodeError,
    Decoder,
    decode,
    libpq_options,
)
from cdcddp.wal.events import ABSENT, Begin, Commit, Delete, Insert, Message, Truncate, Update
from cdcddp.wal.lsn import parse_lsn
from cdcddp.wal.pgtypes import (
    BINARY_LOADS_AS_DECODED,
    TYPE_CATALOG_SQL,
    TypeCatalog,
    parse_array,
)

SCHEMA = """
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE DOMAIN smallpos AS posint;
CREATE DOMAIN price AS numeric(10,2);
CREATE DOMAIN tags AS text[];
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE "Odd Mood" AS ENUM ('A b', 'c"d');
CREATE TYPE pair AS (a int, b text);
CREATE DOMAIN stamp AS timestamptz;
CREATE DOMAIN moods AS mood[];
CREATE TABLE ident (id int PRIMARY KEY, v text);
CREATE TABLE full_t (id int PRIMARY KEY, note text, maybe int, big text);
ALTER TABLE full_t REPLICA IDENTITY FULL;
CREATE TABLE toasty (id int PRIMARY KEY, note text, big text);
CREATE TABLE num_pk (id numeric PRIMARY KEY, v numeric);
CREATE TABLE trunc_a (id int PRIMARY KEY);
CREATE TABLE trunc_b (id int PRIMARY KEY);
"""

UTC_PLUS_0530 = timezone(timedelta(hours=5, minutes=30))
BIG_NUMERIC = "9" * 400  # beyond any double: orjson refuses it, the decoder must not

# (SQL type, SQL literal, expected Python value). Compared by repr: type, scale, tz all count.
CASES: list[tuple[str, str, Any]] = [
    ("int2", "32767", 32767),
    ("int2", "-32768", -32768),
    ("int4", "0", 0),
    ("int4", "-2147483648", -2147483648),
    ("int8", "9223372036854775807", 9223372036854775807),
    ("int8", "-9223372036854775808", -9223372036854775808),
    ("oid", "4294967295", 4294967295),
    ("numeric", "12345678901234567890.123456789012345",
     Decimal("12345678901234567890.123456789012345")),
    ("numeric", "123456789012345678901234567890", Decimal("123456789012345678901234567890")),
    ("numeric", "-0.001", Decimal("-0.001")),
    ("numeric", "0", Decimal("0")),
    ("numeric", "1.10", Decimal("1.10")),
    ("numeric", "-123.450", Decimal("-123.450")),
    ("numeric", "0.1e-19", Decimal("0.00000000000000000001")),
    ("numeric", BIG_NUMERIC, Decimal(BIG_NUMERIC)),
    ("numeric", "'NaN'", None),  # wal2json 2.5 prints NaN/Infinity as JSON null
    ("numeric(10,2)", "5", Decimal("5.00")),
    ("float8", "1.5", 1.5),
    ("float8", "0.1", 0.1),
    ("float8", "1e308", 1e308),
    ("float8", "-2", -2.0),
    ("float8", "'NaN'", None),
    ("float4", "3.4028235e+38", 3.4028235e38),
    ("float4", "0.1", 0.1),
    ("bool", "true", True),
    ("bool", "false", False),
    ("text", "E'a \"quoted\" back\\\\slash,\\n unicode \u00e9 \U0001f600'",
     'a "quoted" back\\slash,\n unicode \u00e9 \U0001f600'),
    ("varchar(5)", "'abc'", "abc"),
    ("char(5)", "'ab'", "ab   "),
    ("name", "'nm'", "nm"),
    ("uuid", "'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
     UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")),
    ("json", """'{"a": [1, 2.5, null, "x"], "b": {"c": true}}'""",
     {"a": [1, 2.5, None, "x"], "b": {"c": True}}),
    ("jsonb", """'{"big": 123456789012345678901234567890}'""",
     {"big": 123456789012345678901234567890}),
    ("jsonb", """'"s"'""", "s"),
    ("timestamptz", "'2024-02-29 12:34:56.789012+02'",
     datetime(2024, 2, 29, 10, 34, 56, 789012, tzinfo=UTC)),
    ("timestamptz", "'0001-01-01 00:00:00+00'", datetime(1, 1, 1, tzinfo=UTC)),
    ("timestamptz", "'infinity'", datetime.max.replace(tzinfo=UTC)),
    ("timestamptz", "'-infinity'", datetime.min.replace(tzinfo=UTC)),
    ("timestamptz", "'0044-03-15 12:00:00+00 BC'", "0044-03-15 12:00:00+00 BC"),
    ("timestamptz", "'10000-01-01 00:00:00+00'", "10000-01-01 00:00:00+00"),
    ("timestamp", "'2024-01-02 03:04:05'", datetime(2024, 1, 2, 3, 4, 5)),
    ("timestamp", "'infinity'", datetime.max),
    ("date", "'2024-01-02'", date(2024, 1, 2)),
    ("date", "'infinity'", date.max),
    ("date", "'-infinity'", date.min),
    ("time", "'12:34:56.5'", time(12, 34, 56, 500000)),
    ("time", "'24:00:00'", "24:00:00"),
    ("timetz", "'12:34:56+05:30'", time(12, 34, 56, tzinfo=UTC_PLUS_0530)),
    ("interval", "'1 year 2 mons 3 days 04:05:06.789'",
     timedelta(days=365 + 60 + 3, hours=4, minutes=5, seconds=6, microseconds=789000)),
    ("interval", "'-1 year -2 mons -3 days -04:05:06.5'",
     -timedelta(days=365 + 60 + 3, hours=4, minutes=5, seconds=6, microseconds=500000)),
    ("interval", "'13 mons -1 days'", timedelta(days=365 + 30 - 1)),
    ("interval", "'0'", timedelta(0)),
    ("interval", "'-0.5 seconds'", timedelta(microseconds=-500000)),
    ("bytea", "'\\x00ff10'", b"\x00\xff\x10"),
    ("bytea", "''", b""),
    ("int4[]", "'{1,NULL,3}'", [1, None, 3]),
    ("int4[]", "'{}'", []),
    ("int4[]", "'{{1,2},{3,4}}'", [[1, 2], [3, 4]]),
    ("int4[]", "'[0:1]={7,8}'", [7, 8]),
    ("text[]", """ARRAY['a,b', 'NULL', NULL, 'say "hi"', 'back\\slash', '', ' sp ', '{x}']""",
     ["a,b", "NULL", None, 'say "hi"', "back\\slash", "", " sp ", "{x}"]),
    ("text[]", """'{{"a}",b},{NULL,"d\\\\e"}}'""", [["a}", "b"], [None, "d\\e"]]),
    ("numeric[]", "'{1.10,NaN,-2,Infinity}'",
     [Decimal("1.10"), Decimal("NaN"), Decimal("-2"), Decimal("Infinity")]),
    ("float8[]", "'{1.5,NaN,Infinity,-Infinity}'", [1.5, math.nan, math.inf, -math.inf]),
    ("bool[]", "'{t,f,NULL}'", [True, False, None]),
    ("bytea[]", "ARRAY['\\x0102'::bytea, NULL]", [b"\x01\x02", None]),
    ("timestamptz[]", "'{\"2024-01-01 00:00:00+00\",infinity}'",
     [datetime(2024, 1, 1, tzinfo=UTC), datetime.max.replace(tzinfo=UTC)]),
    ("uuid[]", "'{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}'",
     [UUID("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")]),
    ("jsonb[]", """ARRAY['{"a": 1}'::jsonb]""", [{"a": 1}]),
    ("date[]", "'{2024-01-01,infinity}'", [date(2024, 1, 1), date.max]),
    ("interval[]", "'{\"1 day\",NULL}'", [timedelta(days=1), None]),
    ("mood", "'happy'", "happy"),
    ("mood[]", "'{sad,happy,NULL}'", ["sad", "happy", None]),
    ('"Odd Mood"', """'c"d'""", 'c"d'),
    ("posint", "5", 5),
    ("smallpos", "7", 7),
    ("posint[]", "'{1,2}'", [1, 2]),
    ("price", "12.5", Decimal("12.50")),
    ("tags", "'{a,\"b c\"}'", ["a", "b c"]),
    ("box", "'((3,4),(1,2))'", "(3,4),(1,2)"),
    ("box[]", "'{((3,4),(1,2));((5,6),(0,0))}'", ["(3,4),(1,2)", "(5,6),(0,0)"]),
    ("inet", "'10.0.0.1/8'", "10.0.0.1/8"),
    ("pair", "ROW(1, 'x y')", '(1,"x y")'),
    # Where psycopg's own loaders differ from the decoder (see cdcddp.db.SQL_LOADERS_DIFFER).
    ("date", "'0044-03-15 BC'", "0044-03-15 BC"),
    ("date", "'10000-01-01'", "10000-01-01"),
    ("timestamp", "'-infinity'", datetime.min),
    ("timestamp", "'0044-03-15 12:00:00 BC'", "0044-03-15 12:00:00 BC"),
    ("timetz", "'24:00:00+00'", "24:00:00+00"),
    ("time[]", "'{12:00:00,24:00:00}'", [time(12), "24:00:00"]),
    ("timestamp[]", "'{infinity,\"2024-01-02 03:04:05\"}'",
     [datetime.max, datetime(2024, 1, 2, 3, 4, 5)]),
    ("timetz[]", "'{12:00:00+00}'", [time(12, tzinfo=UTC)]),
    ("interval", "'1000000000 days'", "P1000000000D"),
    ("interval", "'178000000 years'", "P178000000Y"),
    ("cidr", "'10.0.0.0/8'", "10.0.0.0/8"),
    ("inet[]", "'{10.0.0.1/8,::1}'", ["10.0.0.1/8", "::1"]),
    ("cidr[]", "'{10.0.0.0/8}'", ["10.0.0.0/8"]),
    ("int4range", "'[1,3)'", "[1,3)"),
    ("tstzrange", "'[2024-01-01 00:00:00+00,infinity)'", '["2024-01-01 00:00:00+00",infinity)'),
    ("daterange", "'empty'", "empty"),
    ("int4multirange", "'{[1,3),[5,7)}'", "{[1,3),[5,7)}"),
    ("int4range[]", "'{\"[1,3)\",empty}'", ["[1,3)", "empty"]),
    ("xid8", "'5'", 5),
    ("xid8[]", "'{5,6}'", [5, 6]),
    ("int2vector", "'1 2'", [1, 2]),
    ("stamp", "'infinity'", datetime.max.replace(tzinfo=UTC)),
    ("stamp", "'2024-01-01 00:00:00+00'", datetime(2024, 1, 1, tzinfo=UTC)),
    ("moods", "'{ok,NULL}'", ["ok", None]),
    ('"Odd Mood"[]', """'{"A b","c\\"d"}'""", ["A b", 'c"d']),
    ("int4", "NULL", None),
    ("text", "NULL", None),
]

TYPE_TABLES = {sql_type: f"typed_{index}"
               for index, sql_type in enumerate(dict.fromkeys(t for t, _, _ in CASES))}


@dataclass
class Capture:
    """What the slot produced: rows of pg_logical_slot_get_changes, plus facts to check."""

    changes: list[tuple[str, int, str]]  # (lsn, xid, data)
    catalog: TypeCatalog
    column_oids: dict[str, int]  # typed table -> oid of its column v
    markers: dict[str, Any]

    @property
    def payloads(self) -> list[bytes]:
        return [data.encode() for _, _, data in self.changes]


def _session(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(dsn, autocommit=True)
    for name, value in SESSION_SETTINGS.items():
        conn.execute("SELECT set_config(%s, %s, false)", (name, value))
    return conn


def _write_scenario(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    markers: dict[str, Any] = {}
    for index, (sql_type, literal, _) in enumerate(CASES):
        conn.execute(f"INSERT INTO {TYPE_TABLES[sql_type]} VALUES ({index}, {literal})")

    # Incompressible ~22 kB text: stored out of line, so an UPDATE not touching it omits it.
    big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 700))"
    conn.execute(f"INSERT INTO toasty VALUES (1, 'n', {big})")
    conn.execute("UPDATE toasty SET note = 'toast unchanged' WHERE id = 1")
    conn.execute("UPDATE toasty SET note = 'toast null', big = NULL WHERE id = 1")

    conn.execute("INSERT INTO ident VALUES (1, 'a'), (2, 'b')")
    conn.execute("UPDATE ident SET id = 10, v = 'key moved' WHERE id = 1")
    conn.execute("UPDATE ident SET v = 'key kept' WHERE id = 2")
    conn.execute("DELETE FROM ident WHERE id = 10")

    conn.execute("INSERT INTO num_pk VALUES (1.50, 2.25)")
    conn.execute("UPDATE num_pk SET id = 3.75, v = 12345678901234567890.5")
    conn.execute("DELETE FROM num_pk")

    conn.execute(f"INSERT INTO full_t VALUES (1, 'old', NULL, {big})")
    markers["full_big"] = conn.execute("SELECT big FROM full_t").fetchone()[0]  # type: ignore[index]
    conn.execute("UPDATE full_t SET note = 'new' WHERE id = 1")
    conn.execute("DELETE FROM full_t WHERE id = 1")

    conn.execute("INSERT INTO trunc_a VALUES (1); INSERT INTO trunc_b VALUES (1)")
    conn.execute("TRUNCATE trunc_a, trunc_b")

    with conn.transaction():
        markers["message_xid"] = int(conn.execute("SELECT txid_current()").fetchone()[0])  # type: ignore[index]
        conn.execute("SELECT pg_logical_emit_message(true, 'pfx', 'in tx')")
        conn.execute("SELECT pg_logical_emit_message(false, 'pfx', 'not in tx')")
    markers["commit_lsn_after"] = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()[0]  # type: ignore[index]

    conn.execute("BEGIN")
    conn.execute("INSERT INTO ident VALUES (999, 'rolled back')")
    conn.execute("ROLLBACK")
    return markers


@pytest.fixture(scope="module")
def capture(pg_cluster: LocalCluster) -> Iterator[Capture]:
    dbname = "a1_wal_decode"
    with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        with _session(pg_cluster.dsn(dbname)) as conn:
            conn.execute(SCHEMA)
            for sql_type, table in TYPE_TABLES.items():
                conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v {sql_type})")
            column_oids = {
                table: oid for table, oid in conn.execute(
                    "SELECT attrelid::regclass::text, atttypid::int FROM pg_attribute "
                    "WHERE attname = 'v' AND attrelid::regclass::text LIKE 'typed\\_%'")
            }
            catalog = TypeCatalog.from_rows(conn.execute(TYPE_CATALOG_SQL).fetchall())
            conn.execute("SELECT pg_create_logical_replication_slot('a1', 'wal2json')")
            markers = _write_scenario(conn)
            options = [part for item in WAL2JSON_OPTIONS.items() for part in item]
            marks = ", ".join(["%s"] * len(options))
            changes = conn.execute(
                "SELECT lsn::text, xid::text::bigint, data FROM "
                f"pg_logical_slot_get_changes('a1', NULL, NULL, {marks})", options).fetchall()
            conn.execute("SELECT pg_drop_replication_slot('a1')")
        yield Capture(changes, catalog, column_oids, markers)
    finally:
        with psycopg.connect(pg_cluster.dsn(), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture(scope="module")
def events(capture: Capture) -> list[Any]:
    decoder = Decoder(capture.catalog)
    decoded = [decoder.decode(payload) for payload in capture.payloads]
    assert not decoder.unresolved_oids
    return decoded


def _rows(events: list[Any], kind: type, table: str) -> list[Any]:
    return [e for e in events if isinstance(e, kind) and e.table == table]


# -- values ------------------------------------------------------------------------------------


def test_every_type_case_decodes_to_its_python_value(events: list[Any]) -> None:
    by_table_id = {(e.table, e.new["id"]): e.new["v"] for e in events
                   if isinstance(e, Insert) and e.table.startswith("typed_")}
    mismatches = []
    for index, (sql_type, literal, expected) in enumerate(CASES):
        actual = by_table_id[(TYPE_TABLES[sql_type], index)]
        if repr(actual) != repr(expected):
            mismatches.append((sql_type, literal[:40], actual, expected))
    assert mismatches == []


def test_text_converters_agree_with_stream_values(capture: Capture, pg_cluster: LocalCluster,
                                                  events: list[Any]) -> None:
    """A value read as text (e.g. by a snapshot query) converts to the same Python value."""
    stream = {(e.table, e.new["id"]): e.new["v"] for e in events
              if isinstance(e, Insert) and e.table.startswith("typed_")}
    mismatches = []
    with _session(pg_cluster.dsn("a1_wal_decode")) as conn:
        for table, oid in capture.column_oids.items():
            convert = pgtypes.text_converter(oid, capture.catalog)
            # format() prints with the type's output function (v::text differs for bool)
            for row_id, text in conn.execute(
                    f"SELECT id, CASE WHEN v IS NOT NULL THEN format('%s', v) END FROM {table}"):
                value = None if text is None else text if convert is None else convert(text)
                if repr(value) != repr(stream[(table, row_id)]):
                    mismatches.append((CASES[row_id][0], text[:40], repr(value)))
    # The one known difference: wal2json 2.5 prints NaN numeric/float as JSON null.
    assert mismatches == [("numeric", "NaN", "Decimal('NaN')"), ("float8", "NaN", "nan")]


def test_binary_loads_give_the_decoded_values(capture: Capture, pg_cluster: LocalCluster,
                                             events: list[Any]) -> None:
    """Every type a snapshot may read in binary (BINARY_LOADS_AS_DECODED) gives the value the
    stream decodes, for every case of that type."""
    stream = {(e.table, e.new["id"]): e.new["v"] for e in events
              if isinstance(e, Insert) and e.table.startswith("typed_")}
    by_type = {table: sql_type for sql_type, table in TYPE_TABLES.items()}
    mismatches, binary = [], set()
    with psycopg.connect(pg_cluster.dsn("a1_wal_decode"), options=SESSION_OPTIONS) as conn:
        for table, oid in capture.column_oids.items():
            if oid not in BINARY_LOADS_AS_DECODED:
                continue
            binary.add(by_type[table])
            rows = conn.cursor(binary=True).execute(f"SELECT id, v FROM {table}").fetchall()
            for row_id, value in rows:
                if repr(value) != repr(stream[(table, row_id)]):
                    mismatches.append((CASES[row_id][0], repr(value)[:40]))
    # wal2json 2.5 prints NaN numerics as JSON null (the known difference).
    assert mismatches == [("numeric", "Decimal('NaN')"), ("float8", "nan")]
    assert {"int4", "int8", "text", "float8", "numeric", "bool", "jsonb", "json", "uuid",
            "bytea", "text[]", "int4[]", "numeric[]", "varchar(5)", "char(5)"} <= binary


def test_without_catalog_user_types_fall_back_to_text(capture: Capture) -> None:
    decoder = Decoder()
    values = {}
    for payload in capture.payloads:
        event = decoder.decode(payload)
        if isinstance(event, Insert) and event.table.startswith("typed_"):
            values[CASES[event.new["id"]][0]] = event.new["v"]
    assert values["posint"] == "5"
    assert values["mood[]"] == "{sad,happy,NULL}"
    assert values["int4[]"] == [7, 8]  # built-in types need no catalog
    posint_oid = capture.column_oids[TYPE_TABLES["posint"]]
    assert posint_oid in decoder.unresolved_oids
    decoder.set_catalog(capture.catalog)
    assert not decoder.unresolved_oids
    assert decoder.catalog is capture.catalog


# -- TOAST, NULL, identity ---------------------------------------------------------------------


def test_unchanged_toast_is_absent_and_null_is_none(events: list[Any]) -> None:
    insert, = _rows(events, Insert, "toasty")
    unchanged, set_null = _rows(events, Update, "toasty")
    assert len(insert.new["big"]) == 22400
    assert unchanged.new == {"id": 1, "note": "toast unchanged"}
    assert unchanged.new.get("big", ABSENT) is ABSENT
    assert set_null.new == {"id": 1, "note": "toast null", "big": None}


def test_replica_identity_default_gives_old_key(events: list[Any]) -> None:
    moved, kept = _rows(events, Update, "ident")
    assert (moved.new, moved.identity, moved.pk) == ({"id": 10, "v": "key moved"}, {"id": 1},
                                                     ("id",))
    assert (kept.new, kept.identity) == ({"id": 2, "v": "key kept"}, {"id": 2})
    delete, = _rows(events, Delete, "ident")
    assert (delete.identity, delete.pk) == ({"id": 10}, ("id",))


def test_exact_numerics_in_new_row_and_identity(events: list[Any]) -> None:
    update, = _rows(events, Update, "num_pk")
    assert repr(update.new) == repr({"id": Decimal("3.75"),
                                     "v": Decimal("12345678901234567890.5")})
    assert repr(update.identity) == repr({"id": Decimal("1.50")})
    delete, = _rows(events, Delete, "num_pk")
    assert repr(delete.identity) == repr({"id": Decimal("3.75")})


def test_replica_identity_full_gives_whole_old_row(capture: Capture, events: list[Any]) -> None:
    update, = _rows(events, Update, "full_t")
    old = {"id": 1, "note": "old", "maybe": None, "big": capture.markers["full_big"]}
    assert update.identity == old
    assert update.new == {"id": 1, "note": "new", "maybe": None}  # big: unchanged TOAST
    delete, = _rows(events, Delete, "full_t")
    assert delete.identity == {**old, "note": "new"}


# -- transactions, truncate, messages ----------------------------------------------------------


def test_rolled_back_transaction_yields_nothing(events: list[Any]) -> None:
    assert all(getattr(e, "new", {}).get("id") != 999 for e in events)
    assert not any(isinstance(e, Insert) and e.new.get("v") == "rolled back" for e in events)


def test_truncate_emits_one_event_per_table(events: list[Any]) -> None:
    truncates = [e for e in events if isinstance(e, Truncate)]
    assert sorted(t.table for t in truncates) == ["trunc_a", "trunc_b"]
    assert {t.schema for t in truncates} == {"public"}
    assert truncates[0].xid == truncates[1].xid


def test_messages(capture: Capture, events: list[Any]) -> None:
    messages = [e for e in events if isinstance(e, Message)]
    by_content = {m.content: m for m in messages}
    assert set(by_content) == {"in tx", "not in tx"}
    in_tx, not_in_tx = by_content["in tx"], by_content["not in tx"]
    assert (in_tx.transactional, in_tx.prefix, in_tx.xid) == (
        True, "pfx", capture.markers["message_xid"])
    assert (not_in_tx.transactional, not_in_tx.prefix, not_in_tx.xid) == (False, "pfx", None)
    # Non-transactional messages come out at once: before the enclosing transaction's Begin.
    begin_index = next(i for i, e in enumerate(events)
                       if isinstance(e, Begin) and e.xid == in_tx.xid)
    assert events.index(not_in_tx) < begin_index < events.index(in_tx)


def test_begin_commit_bracket_changes_with_xid_lsn_and_time(capture: Capture,
                                                            events: list[Any]) -> None:
    open_xid = None
    begins = 0
    for (_, slot_xid, _), event in zip(capture.changes, events, strict=True):
        if isinstance(event, Begin):
            assert open_xid is None
            open_xid, begin = event.xid, event
            begins += 1
            assert event.lsn < event.end_lsn
            assert event.timestamp is not None and event.timestamp.tzinfo is not None
            assert abs(datetime.now(UTC) - event.timestamp) < timedelta(minutes=5)
        elif isinstance(event, Commit):
            assert event.xid == open_xid == slot_xid
            assert (event.lsn, event.end_lsn, event.timestamp) == (
                begin.lsn, begin.end_lsn, begin.timestamp)
            open_xid = None
        elif isinstance(event, Message) and not event.transactional:
            continue
        else:
            assert event.xid == open_xid == slot_xid
            assert event.lsn < begin.end_lsn
    assert open_xid is None and begins > len(CASES)
    commits = [e for e in events if isinstance(e, Commit)]
    assert [c.end_lsn for c in commits] == sorted(c.end_lsn for c in commits)


def test_record_lsn_of_a_row_change_is_its_document_lsn(capture: Capture) -> None:
    # The stream passes the XLogData header's start LSN so the decoder need not parse the
    # text. The SQL interface's lsn column is that same value (both are the position the
    # output plugin was told to write at): for row changes it must equal the document's.
    rows = 0
    for lsn_text, _, payload in capture.changes:
        record_lsn = parse_lsn(lsn_text)
        plain, hinted = Decoder(capture.catalog), Decoder(capture.catalog)
        event = plain.decode(payload.encode())
        assert repr(hinted.decode(payload.encode(), record_lsn)) == repr(event)  # NaN != NaN
        if isinstance(event, Insert | Update | Delete):
            assert event.lsn == record_lsn
            rows += 1
    assert rows > len(CASES)


# -- API surface -------------------------------------------------------------------------------


def test_memoryview_and_module_level_decode(capture: Capture) -> None:
    payload = next(p for p in capture.payloads if b'"action":"I"' in p and b"ident" in p)
    assert decode(memoryview(payload)) == decode(payload) == Decoder().decode(payload)


@pytest.mark.parametrize("payload", [
    b"", b"not json", b"[1]", b'"I"', b"{}", b'{"action":"X"}', b'{"action":"I"}',
    b'{"action":"B","xid":1,"lsn":"zz","nextlsn":"0/1"}',
    b'{"action":"B","xid":1,"lsn":"0/1"}',
    b'{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t","columns":[{"name":"a"}]}',
    b'{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t",'
    b'"columns":[{"name":"a","typeoid":1184,"value":"yesterday"}]}',
    b'{"action":"M","xid":null,"lsn":"0/1","transactional":"no","prefix":"p","content":"c"}',
    b'{"action":"I","xid":1,"lsn":"0/1","schema":"s","table":"t","columns":[',
])
def test_malformed_payloads_raise_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        Decoder().decode(payload)


def test_options_and_settings_are_what_the_stream_needs() -> None:
    assert WAL2JSON_OPTIONS["format-version"] == "2"
    for option in ("include-xids", "include-lsn", "include-timestamp", "include-pk",
                   "include-type-oids"):
        assert WAL2JSON_OPTIONS[option] == "1"
    assert libpq_options({"DateStyle": "ISO, YMD", "TimeZone": "UTC"}) == (
        "-c DateStyle=ISO,\\ YMD -c TimeZone=UTC")


def test_builtin_array_table_matches_the_server(capture: Capture) -> None:
    for array_oid, element_oid in pgtypes.BUILTIN_ARRAYS.items():
        entry = capture.catalog.get(array_oid)
        assert entry is not None and entry.element == element_oid, array_oid


def test_array_parser_edge_cases() -> None:
    assert parse_array('{"",NULL,"NULL"}', None) == ["", None, "NULL"]
    assert parse_array("{{},{}}", None) == [[], []]
    assert parse_array('{"a\\"b","c\\\\"}', None) == ['a"b', "c\\"]
    for bad in ("", "{", "{1,2", "1,2}", '{"a}', "{1}}", "{{1}"):
        with pytest.raises(ValueError):
            parse_array(bad, int)
