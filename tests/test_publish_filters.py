"""The filter language: SQL and Python agree on real PostgreSQL, NULL logic included."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.rows import dict_row

from cdcddp.publish.filters import (
    COLLATED,
    ENUM,
    FALSE,
    TRUE,
    And,
    BoundFilter,
    C,
    Compare,
    Condition,
    FilterError,
    FilterTypeError,
    In,
    IsNull,
    Literal,
    Not,
    Op,
    Or,
    Param,
    UserId,
    and_,
    eq,
    in_,
    is_null,
    not_,
    or_,
)
from cdcddp.publish.snapshots import table_shapes, text_columns

# --------------------------------------------------------------------------- helpers

MOODS = ["sad", "ok", "Happy", "é"]  # declared out of code-point order
TABLE_DDL = f"""
CREATE COLLATION IF NOT EXISTS case_blind
    (provider = icu, locale = 'und-u-ks-level2', deterministic = false);
CREATE TYPE mood AS ENUM ({", ".join(f"'{m}'" for m in MOODS)});
CREATE DOMAIN known_mood AS mood;
CREATE TABLE t (
    id int PRIMARY KEY,
    i int4, big int8, n numeric, f float8,
    s text COLLATE "und-x-icu",  -- a linguistic collation: 'a' < 'B' here, not in Python
    ci text COLLATE case_blind,  -- nondeterministic: 'a' = 'A' here, not in Python
    e mood,  -- no mood = text in SQL; labels ordered as declared
    de known_mood,  -- a domain over it: the same
    b boolean, ts timestamptz
)"""
COLUMNS = ("i", "big", "n", "f", "s", "ci", "e", "de", "b", "ts")


@pytest.fixture
def conn(db_dsn: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(db_dsn, autocommit=True) as connection:
        connection.execute(TABLE_DDL)
        yield connection


def load(conn: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the table's rows; return them as psycopg types them (as the decoder would)."""
    conn.execute("DELETE FROM t")
    with conn.cursor() as cur:
        cur.executemany(
            f"INSERT INTO t (id, {', '.join(COLUMNS)}) VALUES (%s{', %s' * len(COLUMNS)})",
            [(n, *(r.get(c) for c in COLUMNS)) for n, r in enumerate(rows)])
    with conn.cursor(row_factory=dict_row) as cur:
        return cur.execute("SELECT * FROM t ORDER BY id").fetchall()


@functools.cache
def compared_as_text(conn: psycopg.Connection[Any]) -> dict[str, str]:
    """How the server's queries compare the table's columns with text (read as it does)."""
    found = text_columns(table_shapes(conn, [("public", "t")])[("public", "t")])
    assert found == {"ci": COLLATED, "e": ENUM, "de": ENUM}
    return found


def sql_ids(conn: psycopg.Connection[Any], bound: BoundFilter) -> set[int]:
    where, params = bound.where(compared_as_text(conn))
    query = sql.SQL("SELECT id FROM t WHERE {}").format(where)
    return {r[0] for r in conn.execute(query, params)}


def sql_truth(conn: psycopg.Connection[Any], bound: BoundFilter) -> bool | None:
    """The SQL value of the condition on the table's single row."""
    where, params = bound.where(compared_as_text(conn))
    (row,) = conn.execute(sql.SQL("SELECT {} FROM t").format(where), params).fetchall()
    return row[0]


# --------------------------------------------------------------------------- property test

small_ints = st.integers(-3, 3)
ints = st.one_of(small_ints, st.integers(-(2**31), 2**31 - 1))
bigs = st.one_of(small_ints, st.sampled_from([2**53, 2**53 + 1, -(2**63), 2**63 - 1]))
numerics = st.one_of(
    st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal("0.1"),
                     Decimal("-0"), Decimal("1.50"), Decimal(2**53 + 1)]),
    small_ints.map(Decimal),
    st.decimals(min_value=-1000, max_value=1000, places=2, allow_nan=False,
                allow_infinity=False))
floats = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 0.1, 1.5, float(2**53)]),
    small_ints.map(float),
    st.floats(-1e6, 1e6))
texts = st.one_of(
    st.sampled_from(["", "a", "B", "b", "é", "Z", "a b", "ab", "-x", "日本"]),
    st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3))
bools = st.booleans()
instants = st.one_of(
    st.sampled_from([datetime(2020, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, 5, tzinfo=UTC)]),
    st.datetimes(datetime(1990, 1, 1), datetime(2030, 1, 1), timezones=st.just(UTC)))
# Values compared with a column: any number against numeric columns (int, numeric, float8),
# biased towards values equal across Python types, where SQL and Python rules differ most.
TRICKY_NUMBERS = [
    0, 1, 0.1, Decimal("0.1"), 1.5, Decimal("1.50"), 2**53, 2**53 + 1, float(2**53),
    Decimal(2**53 + 1), 10**20, math.nan, Decimal("NaN"), math.inf, Decimal("Infinity"),
    -math.inf, -0.0]
tricky_numbers = st.sampled_from(TRICKY_NUMBERS)
numbers = st.one_of(tricky_numbers, tricky_numbers, small_ints, bigs, numerics, floats)
offset_instants = st.builds(lambda d, h: d.astimezone(timezone(timedelta(hours=h))),
                            instants, st.integers(-12, 12))

moods = st.sampled_from(MOODS)
COLUMN_VALUES = {"i": ints, "big": bigs, "n": numerics, "f": floats, "s": texts, "ci": texts,
                 "e": moods, "de": moods, "b": bools, "ts": instants}
OPERAND_VALUES = {"i": numbers, "big": numbers, "n": numbers, "f": numbers, "s": texts,
                  "ci": texts, "e": st.one_of(moods, texts), "de": st.one_of(moods, texts),
                  "b": bools,
                  "ts": st.one_of(instants, offset_instants)}


def nullable(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy, strategy, strategy)


table_rows = st.lists(
    st.fixed_dictionaries({c: nullable(s) for c, s in COLUMN_VALUES.items()}), max_size=12)


@st.composite
def filter_cases(draw: st.DrawFn) -> tuple[Condition, dict[str, Any], Any]:
    """A random filter tree, the params it uses and a user id (maybe anonymous)."""
    params: dict[str, Any] = {}
    user_id = draw(st.one_of(st.none(), texts))

    def value_or_param(value: Any) -> Any:
        if draw(st.booleans()):
            name = f"p{len(params)}"
            params[name] = value
            return Param(name)
        return value

    def leaf() -> Condition:
        column = draw(st.sampled_from(COLUMNS))
        values = OPERAND_VALUES[column]
        shape = draw(st.sampled_from(["cmp", "cmp", "cmp", "in", "null"]))
        if shape == "null":
            return C(column).is_not_null() if draw(st.booleans()) else C(column).is_null()
        if shape == "in":
            items = draw(st.lists(st.one_of(st.none(), values, values), max_size=4))
            if draw(st.booleans()):
                return C(column).in_(value_or_param(items) if items else items)
            return C(column).in_([value_or_param(v) for v in items])
        op = draw(st.sampled_from(list(Op)))
        if column in ("s", "ci", "e", "de") and draw(st.integers(0, 4)) == 0:
            return Compare(column, op, UserId())
        value = None if draw(st.integers(0, 9)) == 0 else draw(values)
        return Compare(column, op, _wrap(value_or_param(value)))

    def node(depth: int) -> Condition:
        if depth >= 3 or draw(st.integers(0, 2)) == 0:
            return leaf()
        shape = draw(st.sampled_from(["and", "or", "not"]))
        if shape == "not":
            return ~node(depth + 1)
        items = [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        return And(items) if shape == "and" else Or(items)

    return node(0), params, user_id


def _wrap(value: Any) -> Any:
    return value if isinstance(value, Param) else Literal(value)


def check_sql_python_agree(conn: psycopg.Connection[Any], max_examples: int) -> None:
    @settings(max_examples=max_examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(rows=table_rows, cases=st.lists(filter_cases(), min_size=1, max_size=12))
    def agree(rows: list[dict[str, Any]], cases: list[tuple[Condition, dict[str, Any], Any]],
              ) -> None:
        typed_rows = load(conn, rows)
        for condition, params, user_id in cases:
            bound = condition.bind(params, user_id)
            expected = sql_ids(conn, bound)
            matched = {row["id"] for row in typed_rows if bound.predicate(row)}
            assert matched == expected, (condition, params, user_id, typed_rows)
            # The index hint is a necessary condition: every match satisfies it.
            for column, values in bound.equality_constraints().items():
                assert all(row[column] in values for row in typed_rows if row["id"] in matched)

    agree()


def test_sql_and_python_agree_on_random_filters(conn: psycopg.Connection[Any]) -> None:
    check_sql_python_agree(conn, max_examples=150)


@pytest.mark.slow
def test_sql_and_python_agree_on_random_filters_long(conn: psycopg.Connection[Any]) -> None:
    check_sql_python_agree(conn, max_examples=3000)


def test_numbers_of_every_type_against_every_numeric_column(
        conn: psycopg.Connection[Any]) -> None:
    """Exhaustive over the tricky pool: int, numeric and float8 columns x every operand."""
    pool = TRICKY_NUMBERS
    rows = [{"big": v if type(v) is int and -(2**63) <= v < 2**63 else None,
             "n": Decimal(v),  # Decimal(0.1) is the float's exact binary value
             "f": float(v)} for v in pool]
    typed_rows = load(conn, rows)
    for column in ("big", "n", "f"):
        for value in pool:
            for op in Op:
                bound = Compare(column, op, Literal(value)).bind()
                matched = {row["id"] for row in typed_rows if bound.predicate(row)}
                assert matched == sql_ids(conn, bound), (column, op, value)


# --------------------------------------------------------------------------- NULL logic

ROW = {"i": None, "big": 1, "n": Decimal("NaN"), "f": math.nan, "s": "B", "ci": "B",
       "e": "Happy", "b": None, "ts": datetime(2020, 1, 1, tzinfo=UTC)}

NULL_LOGIC_CASES: list[tuple[str, Condition, dict[str, Any], bool | None]] = [
    ("NULL = 1 is NULL", C("i") == 1, {}, None),
    ("NOT (NULL = 1) is NULL, so excluded", ~(C("i") == 1), {}, None),
    ("NULL <> 1 is NULL", C("i") != 1, {}, None),
    ("1 = NULL parameter is NULL", C("big") == Param("x"), {"x": None}, None),
    ("NULL IS NULL", C("i").is_null(), {}, True),
    ("NOT (NULL IS NULL)", ~C("i").is_null(), {}, False),
    ("IS NOT NULL", C("big").is_not_null(), {}, True),
    ("1 IN (1, NULL) is TRUE", C("big").in_([1, None]), {}, True),
    ("1 IN (2, NULL) is NULL", C("big").in_([2, None]), {}, None),
    ("1 NOT IN (2, NULL) is NULL", ~C("big").in_([2, None]), {}, None),
    ("1 NOT IN (2) is TRUE", ~C("big").in_([2]), {}, True),
    ("NULL IN (1) is NULL", C("i").in_([1]), {}, None),
    ("NULL IN () is FALSE", C("i").in_([]), {}, False),
    ("NOT (NULL IN ()) is TRUE", ~C("i").in_([]), {}, True),
    ("1 IN (NULL) is NULL", C("big").in_([None]), {}, None),
    ("IN a parameter list", C("big").in_(Param("ids")), {"ids": [3, 1]}, True),
    ("NULL AND FALSE is FALSE", (C("i") == 1) & (C("big") == 2), {}, False),
    ("NULL AND TRUE is NULL", (C("i") == 1) & (C("big") == 1), {}, None),
    ("NULL OR TRUE is TRUE", (C("i") == 1) | (C("big") == 1), {}, True),
    ("NULL OR FALSE is NULL", (C("i") == 1) | (C("big") == 2), {}, None),
    ("NOT (NULL OR FALSE) is NULL", ~((C("i") == 1) | (C("big") == 2)), {}, None),
    ("empty AND is TRUE", TRUE, {}, True),
    ("empty OR is FALSE", FALSE, {}, False),
    ("text order is code-point order ('B' < 'a')", C("s") < "a", {}, True),
    ("text equality is exact under a nondeterministic collation", C("ci") == "b", {}, False),
    ("and so is IN", C("ci").in_(["b", "c"]), {}, False),
    ("and !=", C("ci") != "b", {}, True),
    ("an enum equals its label", C("e") == "Happy", {}, True),
    ("an enum is IN its label", C("e").in_(["x", "Happy"]), {}, True),
    ("an enum orders by its label's code points", C("e") < "ok", {}, True),
    ("an enum is not a label it does not have", C("e") == "nope", {}, False),
    ("float NaN = NaN", C("f") == math.nan, {}, True),
    ("float NaN > Infinity", C("f") > math.inf, {}, True),
    ("numeric NaN > every number", C("n") > 10**30, {}, True),
    ("numeric NaN = float NaN", C("n") == math.nan, {}, True),
    ("int8 vs float compares as float8", C("big") == 1.0, {}, True),
    ("an anonymous user id is NULL", C("s") == UserId(), {}, None),
    ("timestamptz compares instants", C("ts") == datetime(2020, 1, 1, 1, tzinfo=timezone(
        timedelta(hours=1))), {}, True),
]


def test_null_logic_cases_in_sql_and_python(conn: psycopg.Connection[Any]) -> None:
    (typed_row,) = load(conn, [ROW])
    for label, condition, params, expected in NULL_LOGIC_CASES:
        bound = condition.bind(params)
        assert bound.evaluate(typed_row) is expected, label
        assert sql_truth(conn, bound) is expected, label
        assert bound.predicate(typed_row) is (expected is True), label


def test_float_rules_that_python_alone_gets_wrong(conn: psycopg.Connection[Any]) -> None:
    # Plain Python says False for each of these; PostgreSQL (and the predicate) say True.
    (typed_row,) = load(conn, [{"n": Decimal("0.1"), "big": 2**53 + 1, "f": math.nan}])
    for condition in (C("n") == 0.1, C("big") == float(2**53), C("f").in_([math.nan])):
        bound = condition.bind()
        assert sql_truth(conn, bound) is True
        assert bound.predicate(typed_row) is True


# --------------------------------------------------------------------------- types and binding


def test_comparing_different_kinds_fails_in_sql_and_in_python(
        conn: psycopg.Connection[Any]) -> None:
    (typed_row,) = load(conn, [{"i": 5, "s": "5", "b": True}])
    for condition in (C("i") == "5", C("s") == 5, C("b") == 1, C("i").in_(["5"])):
        bound = condition.bind()
        with pytest.raises(psycopg.errors.UndefinedFunction):
            sql_ids(conn, bound)
        with pytest.raises(FilterTypeError):
            bound.predicate(typed_row)


def test_unsupported_values_are_rejected_when_built_or_bound() -> None:
    with pytest.raises(FilterTypeError):
        C("x") == {"$gt": 1}  # noqa: B015 - building the condition is what raises
    with pytest.raises(FilterTypeError):
        C("x").in_([1, "a"]).bind()
    with pytest.raises(FilterTypeError):
        (C("x") == Param("p")).bind({"p": [1, 2]})
    with pytest.raises(FilterError, match="needs parameter 'p'"):
        (C("x") == Param("p")).bind({})
    with pytest.raises(FilterError, match="must be a list"):
        C("x").in_(Param("p")).bind({"p": "abc"})
    with pytest.raises(FilterError, match="NUL"):
        (C("x") == "a\x00b").bind()
    with pytest.raises(FilterError, match="two columns"):
        C("x") == C("y")  # noqa: B015
    with pytest.raises(TypeError, match="combine filters with"):
        (C("x") == 1) and (C("y") == 2)


def test_builders_produce_the_same_tree() -> None:
    by_operators = ((C("a") == 1) & ~C("b").is_null()) | C("c").in_([1, 2])
    by_functions = or_(and_(eq("a", 1), not_(is_null("b"))), in_("c", [1, 2]))
    assert by_operators.bind() == by_functions.bind()
    assert hash(by_operators.bind()) == hash(by_functions.bind())
    # & and | flatten: one AND of three items, not nested pairs.
    assert isinstance(flat := (C("a") == 1) & (C("b") == 2) & (C("c") == 3), And)
    assert len(flat.items) == 3
    assert isinstance((C("a") == 1) | (C("b") == 2), Or)
    assert isinstance(~(C("a") == 1), Not)
    assert isinstance(C("a").in_([1]), In) and isinstance(C("a").is_null(), IsNull)
    # A literal on the left is the same comparison flipped.
    assert (3 < C("a")).bind() == (C("a") > 3).bind()
    assert (UserId() == C("owner")).bind(user_id="u") == (C("owner") == "u").bind()
    assert ((C("a") == Param("x")) & (C("b") == Param("y"))).param_names == {"x", "y"}
    assert ((C("a") == 1) | C("b").is_null()).column_names == {"a", "b"}


def test_predicate_needs_every_referenced_column() -> None:
    bound = ((C("a") == 1) & (C("b") == 2)).bind()
    assert bound.columns == {"a", "b"}
    with pytest.raises(KeyError):
        bound.predicate({"a": 1})  # an ABSENT (unchanged TOAST) column is never guessed


def test_params_are_values_and_identifiers_are_quoted(db_dsn: str) -> None:
    evil = "x'); DROP TABLE \"Mixed \"\"Case\"; --"
    column = 'Robert"); DROP TABLE x; --'
    with psycopg.connect(db_dsn, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, {} text, {} int)").format(
            sql.Identifier('Mixed "Case'), sql.Identifier(column), sql.Identifier("MixedCol")))
        connection.execute(sql.SQL("INSERT INTO {} VALUES (1, %s, 7), (2, 'other', 8)").format(
            sql.Identifier('Mixed "Case')), [evil])
        for condition, params, expected in [
            (C(column) == Param("p"), {"p": evil}, {1}),
            (C(column) == evil, {}, {1}),
            (C(column).in_(Param("p")), {"p": [evil, "' OR 1=1 --"]}, {1}),
            ((C(column) == "' OR '1'='1") | (C("MixedCol") == 8), {}, {2}),
        ]:
            bound = condition.bind(params)
            where, args = bound.where()
            query = sql.SQL("SELECT id FROM {} WHERE {}").format(
                sql.Identifier('Mixed "Case'), where)
            assert {r[0] for r in connection.execute(query, args)} == expected
            assert evil not in query.as_string(connection)  # values travel as parameters only
            rows = connection.cursor(row_factory=dict_row).execute(
                sql.SQL("SELECT * FROM {}").format(sql.Identifier('Mixed "Case'))).fetchall()
            assert rows[0][column] == evil
            assert {r["id"] for r in rows if bound.predicate(r)} == expected
        count = connection.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier('Mixed "Case'))).fetchone()
        assert count == (2,)


def test_where_clause_shape() -> None:
    bound = ((C("owner_id") == UserId()) & (C("title") >= "m") & C("n").in_([1, None])).bind(
        user_id="u1")
    where, params = bound.where()
    text = where.as_string(None)
    assert text == ('(("owner_id" = %s::text) AND ("title" >= %s::text COLLATE "C") '
                    'AND ("n" = ANY(%s::bigint[])))')
    assert params == ["u1", "m", [1, None]]


# --------------------------------------------------------------------------- equality constraints


def test_equality_constraints_for_the_observer_index() -> None:
    bound = ((C("list_id") == Param("l")) & (C("owner") == UserId())
             & ((C("a") == 1) | (C("a") == 2)) & C("status").in_(["open", "done", None])
             & (C("n") > 3) & ~(C("z") == 1) & (C("f") == 0.5)).bind({"l": 7}, "u")
    assert bound.equality_constraints() == {
        "list_id": frozenset({7}), "owner": frozenset({"u"}),
        "status": frozenset({"open", "done"})}
    # Two equalities on one column intersect (here: nothing can match).
    assert ((C("a") == 1) & (C("a") == 2)).bind().equality_constraints() == {"a": frozenset()}
    assert (C("a") == None).bind().equality_constraints() == {}  # noqa: E711 - NULL compare
    assert TRUE.bind().equality_constraints() == {}


# --------------------------------------------------------------------------- speed


def test_predicate_is_compiled_once_and_fast() -> None:
    import time

    bound = ((C("owner") == "u1") & (C("n") > 10) & ~C("gone").is_not_null()).bind()
    assert bound.predicate is bound.predicate  # compiled once per bound filter
    rows = [{"owner": "u1" if k % 2 else "u2", "n": k, "gone": None} for k in range(50_000)]
    predicate = bound.predicate
    start = time.perf_counter()
    matched = sum(1 for row in rows if predicate(row))
    elapsed = time.perf_counter() - start
    assert matched == sum(1 for k in range(11, 50_000) if k % 2)
    assert elapsed < 1.0  # ~0.05 s on the dev machine: well under a microsecond budget each
