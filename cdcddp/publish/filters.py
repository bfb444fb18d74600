"""The publication filter language: one small tree, compiled to SQL and to a Python predicate.

A filter is built from column comparisons and combined with ``&``, ``|`` and ``~``::

    from cdcddp.publish.filters import C, Param, UserId

    mine = (C("owner_id") == UserId()) & ~C("archived_at").is_not_null()
    in_list = (C("list_id") == Param("listId")) & C("status").in_(["open", "blocked"])

Operands on the right of a comparison are literals, subscription parameters (``Param(name)``)
or the subscribing user's id (``UserId()``). ``filter.bind(params, user_id)`` resolves them into
a :class:`BoundFilter`, which compiles

* to a parametrised ``WHERE`` clause (:meth:`BoundFilter.where`) for the snapshot query, and
* to a predicate ``row -> bool`` (:attr:`BoundFilter.predicate`) for stream changes,

with identical results, SQL three-valued logic included: a row passes only when the condition is
TRUE, so ``NOT (x = 1)`` excludes a row whose ``x`` is NULL, and ``x IN (1, NULL)`` is NULL
(excluded) unless ``x = 1``.

How the two sides are kept identical:

* Values are classified into kinds (number, text, bool, uuid, timestamptz, timestamp, date,
  time, timetz, interval, bytes). Each SQL parameter gets an explicit cast of its kind, so
  PostgreSQL never coerces an untyped string into a column's type behind our back. A column
  compared with a value of another kind is an error on both sides: PostgreSQL rejects the
  query ("operator does not exist"), the predicate raises :class:`FilterTypeError` when it meets
  such a value. Unsupported Python values are rejected when the filter is built or bound.
* Numbers follow PostgreSQL: int and Decimal compare exactly; as soon as a float is involved
  both sides compare as float8 (PostgreSQL casts numeric and integers to float8); NaN equals
  NaN and sorts above every other number (float8 and numeric alike).
* Text ordering uses ``COLLATE "C"`` in SQL, which is code-point order, as in Python; equality
  is byte equality under any deterministic collation. Two kinds of column compare with text
  otherwise in SQL, and are told apart by the caller, which reads the catalog
  (``text_columns`` of :meth:`BoundFilter.where`): one with a nondeterministic collation
  (:data:`COLLATED`: case-blind, say, where SQL's ``=`` matches what Python's does not) is
  compared ``COLLATE "C"``; an enum (:data:`ENUM`: PostgreSQL has no enum = text, and
  orders labels by declaration) is compared by its label, ``::text``, as the stream's
  values are. ``char(n)`` (blank-padded) columns are not supported in filters.
* ``IN`` with an empty list is FALSE (even for NULL), as ``= ANY('{}')`` is.

The predicate needs every column the filter references (:attr:`BoundFilter.columns`) to be
present in the row: a stream row that lacks an unchanged TOASTed column must be completed from
the published copy before it is evaluated. A missing column raises ``KeyError`` rather than
being guessed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from functools import cached_property, lru_cache
from typing import Any, Final, TypeAlias
from uuid import UUID

from psycopg import sql

Row: TypeAlias = Mapping[str, Any]
Truth: TypeAlias = bool | None  # SQL three-valued logic: None is UNKNOWN
TriPredicate: TypeAlias = Callable[[Row], Truth]


class FilterError(ValueError):
    """A filter cannot be built or bound (unknown parameter, unsupported value, …)."""


class FilterTypeError(FilterError, TypeError):
    """Two values of different kinds were compared; PostgreSQL would reject the query too."""


# --------------------------------------------------------------------------- kinds of values


class Kind(Enum):
    NUMBER = "number"
    TEXT = "text"
    BOOL = "bool"
    UUID = "uuid"
    TIMESTAMPTZ = "timestamptz"
    TIMESTAMP = "timestamp"
    DATE = "date"
    TIME = "time"
    TIMETZ = "timetz"
    INTERVAL = "interval"
    BYTES = "bytes"


_KIND_BY_TYPE: Final[dict[type, Kind]] = {
    bool: Kind.BOOL,
    int: Kind.NUMBER,
    float: Kind.NUMBER,
    Decimal: Kind.NUMBER,
    str: Kind.TEXT,
    UUID: Kind.UUID,
    date: Kind.DATE,
    timedelta: Kind.INTERVAL,
    bytes: Kind.BYTES,
}

_INT8_MIN: Final = -(2**63)
_INT8_MAX: Final = 2**63 - 1


def kind_of(value: Any) -> Kind:
    """The kind of a non-NULL value; :class:`FilterTypeError` for values filters cannot hold."""
    kind = _KIND_BY_TYPE.get(type(value))
    if kind is not None:
        return kind
    if isinstance(value, datetime):
        return Kind.TIMESTAMPTZ if value.tzinfo is not None else Kind.TIMESTAMP
    if isinstance(value, time):
        return Kind.TIMETZ if value.tzinfo is not None else Kind.TIME
    if isinstance(value, bool):
        return Kind.BOOL
    for base, base_kind in _KIND_BY_TYPE.items():
        if isinstance(value, base):
            return base_kind
    if isinstance(value, bytearray | memoryview):
        return Kind.BYTES
    raise FilterTypeError(f"filters cannot compare values of type {type(value).__name__}")


def _normalize(value: Any) -> Any:
    """A plain-typed copy of a bound value (enums, subclasses, buffers → base types)."""
    if value is None:
        return None
    kind = kind_of(value)
    if kind is Kind.TEXT:
        text = str.__str__(value)  # a StrEnum's value, not its name (psycopg dumps enum names)
        if "\x00" in text:
            raise FilterError("text values cannot contain NUL characters")
        return text
    if kind is Kind.NUMBER:
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return float(value)
        return value
    if kind is Kind.BYTES:
        return bytes(value)
    return value


def _sql_type(value: Any) -> str:
    """The SQL type a non-NULL normalized value is cast to."""
    if type(value) is int:
        return "bigint" if _INT8_MIN <= value <= _INT8_MAX else "numeric"
    if type(value) is float:
        return "double precision"
    if type(value) is Decimal:
        return "numeric"
    return _SQL_TYPE_BY_KIND[kind_of(value)]


_SQL_TYPE_BY_KIND: Final[dict[Kind, str]] = {
    Kind.TEXT: "text",
    Kind.BOOL: "boolean",
    Kind.UUID: "uuid",
    Kind.TIMESTAMPTZ: "timestamptz",
    Kind.TIMESTAMP: "timestamp",
    Kind.DATE: "date",
    Kind.TIME: "time",
    Kind.TIMETZ: "timetz",
    Kind.INTERVAL: "interval",
    Kind.BYTES: "bytea",
}


# --------------------------------------------------------------------------- operators


class Op(Enum):
    EQ = "="
    NE = "<>"
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="

    @property
    def python(self) -> Callable[[Any, Any], bool]:
        return _PY_OPS[self]


_PY_OPS: Final = {
    Op.EQ: operator.eq,
    Op.NE: operator.ne,
    Op.LT: operator.lt,
    Op.LE: operator.le,
    Op.GT: operator.gt,
    Op.GE: operator.ge,
}
_ORDERING: Final = frozenset({Op.LT, Op.LE, Op.GT, Op.GE})


def _is_nan(value: Any) -> bool:
    return (type(value) is float and value != value) or (
        type(value) is Decimal and value.is_nan())


def sql_compare(op: Op, left: Any, right: Any) -> bool:
    """``left <op> right`` for two non-NULL values, as PostgreSQL evaluates it."""
    left_kind, right_kind = kind_of(left), kind_of(right)
    if left_kind is not right_kind:
        raise FilterTypeError(
            f"cannot compare a {left_kind.value} value with a {right_kind.value} value "
            f"({left!r} {op.value} {right!r})")
    python_op = _PY_OPS[op]
    if left_kind is Kind.NUMBER:
        if type(left) is float or type(right) is float:
            left, right = float(left), float(right)  # PostgreSQL resolves to float8 = float8
        left_nan, right_nan = _is_nan(left), _is_nan(right)
        if left_nan or right_nan:
            # PostgreSQL: NaN = NaN, and NaN sorts above every non-NaN (Infinity included).
            return python_op(int(left_nan) - int(right_nan), 0)
    return python_op(left, right)


# --------------------------------------------------------------------------- building filters


@dataclass(frozen=True, slots=True)
class Param:
    """The subscription parameter ``name`` (validated by the publication's params model)."""

    name: str


@dataclass(frozen=True, slots=True)
class UserId:
    """The subscribing user's id; NULL for anonymous subscribers (so nothing matches)."""


@dataclass(frozen=True, slots=True)
class Literal:
    value: Any

    def __post_init__(self) -> None:
        _normalize(self.value)  # reject unsupported values when the filter is written


Operand: TypeAlias = Literal | Param | UserId


def _operand(value: Any) -> Operand:
    if isinstance(value, Literal | Param | UserId):
        return value
    if isinstance(value, Column):
        raise FilterError("comparisons between two columns are not supported")
    return Literal(value)


class Column:
    """A column of the published table: ``C("owner_id") == UserId()``."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name:
            raise FilterError(f"a column name must be a non-empty string, not {name!r}")
        self.name = name

    def __repr__(self) -> str:
        return f"C({self.name!r})"

    def __hash__(self) -> int:
        return hash((Column, self.name))

    def _compare(self, op: Op, other: Any) -> Compare:
        return Compare(self.name, op, _operand(other))

    # The comparison operators build conditions (as in SQLAlchemy), hence the type: ignores.
    def __eq__(self, other: Any) -> Compare:  # type: ignore[override]
        return self._compare(Op.EQ, other)

    def __ne__(self, other: Any) -> Compare:  # type: ignore[override]
        return self._compare(Op.NE, other)

    def __lt__(self, other: Any) -> Compare:
        return self._compare(Op.LT, other)

    def __le__(self, other: Any) -> Compare:
        return self._compare(Op.LE, other)

    def __gt__(self, other: Any) -> Compare:
        return self._compare(Op.GT, other)

    def __ge__(self, other: Any) -> Compare:
        return self._compare(Op.GE, other)

    def in_(self, values: Iterable[Any] | Param) -> In:
        """``column IN (...)``: a list of operands, or one parameter holding a list."""
        if isinstance(values, Param):
            return In(self.name, values)
        if isinstance(values, str | bytes):
            raise FilterError("in_() takes a list of values, not a single string")
        return In(self.name, tuple(_operand(v) for v in values))

    def is_null(self) -> IsNull:
        return IsNull(self.name, negated=False)

    def is_not_null(self) -> IsNull:
        return IsNull(self.name, negated=True)


C = Column


class Condition:
    """A filter node. Combine with ``&`` (AND), ``|`` (OR) and ``~`` (NOT)."""

    __slots__ = ()

    def __and__(self, other: Condition) -> And:
        return And((*_flatten(self, And), *_flatten(_condition(other), And)))

    def __or__(self, other: Condition) -> Or:
        return Or((*_flatten(self, Or), *_flatten(_condition(other), Or)))

    def __invert__(self) -> Not:
        return Not(self)

    def __bool__(self) -> bool:
        raise TypeError("a filter has no truth value: combine filters with &, | and ~, "
                        "not with and/or/not")

    def children(self) -> tuple[Condition, ...]:
        return ()

    def walk(self) -> Iterator[Condition]:
        yield self
        for child in self.children():
            yield from child.walk()

    def operands(self) -> Iterator[Operand | Param]:
        return iter(())

    @property
    def param_names(self) -> frozenset[str]:
        """Names of the subscription parameters this filter uses."""
        return frozenset(o.name for node in self.walk() for o in node.operands()
                         if isinstance(o, Param))

    @property
    def column_names(self) -> frozenset[str]:
        return frozenset(node.column for node in self.walk()
                         if isinstance(node, Compare | In | IsNull))

    def bind(self, params: Mapping[str, Any] | None = None, user_id: Any = None) -> BoundFilter:
        """Resolve parameters and the user id into concrete, validated values."""
        return BoundFilter(_bind(self, params or {}, user_id))


def _condition(value: Any) -> Condition:
    if not isinstance(value, Condition):
        raise FilterError(f"expected a filter condition, got {value!r}")
    return value


def _flatten(condition: Condition, kind: type[And | Or]) -> tuple[Condition, ...]:
    return condition.items if isinstance(condition, kind) else (condition,)


class Compare(Condition):
    __slots__ = ("column", "op", "operand")

    def __init__(self, column: str, op: Op, operand: Operand) -> None:
        self.column, self.op, self.operand = column, op, operand

    def operands(self) -> Iterator[Operand]:
        yield self.operand

    def __repr__(self) -> str:
        return f"(C({self.column!r}) {self.op.value} {self.operand!r})"


class In(Condition):
    __slots__ = ("column", "values")

    def __init__(self, column: str, values: tuple[Operand, ...] | Param) -> None:
        self.column, self.values = column, values

    def operands(self) -> Iterator[Operand | Param]:
        if isinstance(self.values, Param):
            yield self.values
        else:
            yield from self.values

    def __repr__(self) -> str:
        return f"C({self.column!r}).in_({self.values!r})"


class IsNull(Condition):
    __slots__ = ("column", "negated")

    def __init__(self, column: str, negated: bool = False) -> None:
        self.column, self.negated = column, negated

    def __repr__(self) -> str:
        return f"C({self.column!r}).{'is_not_null' if self.negated else 'is_null'}()"


class _Junction(Condition):
    """AND / OR over ``items``."""

    __slots__ = ("items",)
    _spelling = ""

    def __init__(self, items: Sequence[Condition] = ()) -> None:
        self.items = tuple(_condition(i) for i in items)

    def children(self) -> tuple[Condition, ...]:
        return self.items

    def __repr__(self) -> str:
        return f"{self._spelling}{self.items!r}"


class And(_Junction):
    """All of ``items``; the empty AND is TRUE (a filter that lets every row through)."""

    __slots__ = ()
    _spelling = "and_"


class Or(_Junction):
    """Any of ``items``; the empty OR is FALSE."""

    __slots__ = ()
    _spelling = "or_"


class Not(Condition):
    __slots__ = ("item",)

    def __init__(self, item: Condition) -> None:
        self.item = _condition(item)

    def children(self) -> tuple[Condition, ...]:
        return (self.item,)

    def __repr__(self) -> str:
        return f"~{self.item!r}"


# Function spellings, for those who prefer them to operators.
def _col(column: str | Column) -> Column:
    return column if isinstance(column, Column) else Column(column)


def eq(column: str | Column, value: Any) -> Compare:
    return _col(column) == value


def ne(column: str | Column, value: Any) -> Compare:
    return _col(column) != value


def lt(column: str | Column, value: Any) -> Compare:
    return _col(column) < value


def le(column: str | Column, value: Any) -> Compare:
    return _col(column) <= value


def gt(column: str | Column, value: Any) -> Compare:
    return _col(column) > value


def ge(column: str | Column, value: Any) -> Compare:
    return _col(column) >= value


def in_(column: str | Column, values: Iterable[Any] | Param) -> In:
    return _col(column).in_(values)


def is_null(column: str | Column) -> IsNull:
    return _col(column).is_null()


def is_not_null(column: str | Column) -> IsNull:
    return _col(column).is_not_null()


def and_(*items: Condition) -> And:
    return And(items)


def or_(*items: Condition) -> Or:
    return Or(items)


def not_(item: Condition) -> Not:
    return Not(item)


TRUE: Final = And(())
FALSE: Final = Or(())


# --------------------------------------------------------------------------- bound filters
# Bound nodes hold concrete values; they are hashable, so equal filters share an observer.


@dataclass(frozen=True, slots=True)
class BoundCompare:
    column: str
    op: Op
    value: Any  # normalized; None = NULL


@dataclass(frozen=True, slots=True)
class BoundIn:
    column: str
    values: tuple[Any, ...]  # non-NULL, normalized to one Python type
    has_null: bool


@dataclass(frozen=True, slots=True)
class BoundIsNull:
    column: str
    negated: bool


@dataclass(frozen=True, slots=True)
class BoundAnd:
    items: tuple[BoundNode, ...]


@dataclass(frozen=True, slots=True)
class BoundOr:
    items: tuple[BoundNode, ...]


@dataclass(frozen=True, slots=True)
class BoundNot:
    item: BoundNode


BoundNode: TypeAlias = BoundCompare | BoundIn | BoundIsNull | BoundAnd | BoundOr | BoundNot


def _resolve(operand: Operand, params: Mapping[str, Any], user_id: Any) -> Any:
    if isinstance(operand, Literal):
        return operand.value
    if isinstance(operand, UserId):
        return user_id
    try:
        return params[operand.name]
    except KeyError:
        raise FilterError(f"the filter needs parameter {operand.name!r}") from None


def _bind(node: Condition, params: Mapping[str, Any], user_id: Any) -> BoundNode:
    if isinstance(node, Compare):
        return BoundCompare(node.column, node.op,
                            _normalize(_resolve(node.operand, params, user_id)))
    if isinstance(node, In):
        if isinstance(node.values, Param):
            raw = _resolve(node.values, params, user_id)
            if raw is None or isinstance(raw, str | bytes) or not isinstance(raw, Iterable):
                raise FilterError(f"parameter {node.values.name!r} must be a list for IN")
            values = list(raw)
        else:
            values = [_resolve(v, params, user_id) for v in node.values]
        return _bind_in(node.column, values)
    if isinstance(node, IsNull):
        return BoundIsNull(node.column, node.negated)
    if isinstance(node, And):
        return BoundAnd(tuple(_bind(i, params, user_id) for i in node.items))
    if isinstance(node, Or):
        return BoundOr(tuple(_bind(i, params, user_id) for i in node.items))
    if isinstance(node, Not):
        return BoundNot(_bind(node.item, params, user_id))
    raise FilterError(f"not a filter node: {node!r}")


def _bind_in(column: str, raw_values: list[Any]) -> BoundIn:
    values = [_normalize(v) for v in raw_values if v is not None]
    has_null = len(values) < len(raw_values)
    kinds = {kind_of(v) for v in values}
    if len(kinds) > 1:
        raise FilterTypeError(f"IN list for {column!r} mixes kinds: "
                              f"{sorted(k.value for k in kinds)}")
    if kinds == {Kind.NUMBER}:
        # One SQL array type for the list: PostgreSQL compares every element in that type.
        if any(type(v) is float for v in values):
            values = [float(v) for v in values]
        elif any(type(v) is Decimal for v in values) or any(
                not _INT8_MIN <= v <= _INT8_MAX for v in values):
            values = [Decimal(v) for v in values]
    # Duplicates change nothing (x IN (1, 1) is x IN (1)); first-seen order keeps SQL stable.
    return BoundIn(column, tuple(dict.fromkeys(values)), has_null)


# Python types whose == and hash agree with PostgreSQL equality (no NaN, no awareness issue).
_EXACT_TYPES: Final = frozenset({int, str, bool, UUID, bytes, date, timedelta})


def _compile_compare(node: BoundCompare) -> TriPredicate:
    column, op, value = node.column, node.op, node.value
    if value is None:
        return lambda row: None
    python_op = _PY_OPS[op]
    value_type = type(value)

    if value_type is int or (value_type is Decimal and not value.is_nan()):
        # int and numeric columns compare exactly, as in PostgreSQL (NaN and floats excepted).
        def compare_number(row: Row) -> Truth:
            v = row[column]
            if v is None:
                return None
            row_type = type(v)
            if row_type is int or (row_type is Decimal and not v.is_nan()):
                return python_op(v, value)
            return sql_compare(op, v, value)
        return compare_number

    if value_type in _EXACT_TYPES:
        def compare_exact(row: Row) -> Truth:
            v = row[column]
            if v is None:
                return None
            if type(v) is value_type:
                return python_op(v, value)
            return sql_compare(op, v, value)
        return compare_exact

    if value_type is datetime:
        aware = value.tzinfo is not None

        def compare_datetime(row: Row) -> Truth:
            v = row[column]
            if v is None:
                return None
            if type(v) is datetime and (v.tzinfo is not None) is aware:
                return python_op(v, value)
            return sql_compare(op, v, value)
        return compare_datetime

    def compare_general(row: Row) -> Truth:
        v = row[column]
        if v is None:
            return None
        return sql_compare(op, v, value)
    return compare_general


def _compile_in(node: BoundIn) -> TriPredicate:
    column, values, has_null = node.column, node.values, node.has_null
    if not values:
        # x IN () is FALSE even for NULL x; x IN (NULL) is NULL for every x.
        return (lambda row: None) if has_null else (lambda row: False)
    miss: Truth = None if has_null else False
    element_type = type(values[0])
    value_set = frozenset(values) if element_type in _EXACT_TYPES else None

    def member(row: Row) -> Truth:
        v = row[column]
        if v is None:
            return None
        if value_set is not None and type(v) is element_type:
            return True if v in value_set else miss
        for candidate in values:
            if sql_compare(Op.EQ, v, candidate):
                return True
        return miss
    return member


def _compile(node: BoundNode) -> TriPredicate:
    if isinstance(node, BoundCompare):
        return _compile_compare(node)
    if isinstance(node, BoundIn):
        return _compile_in(node)
    if isinstance(node, BoundIsNull):
        column = node.column
        if node.negated:
            return lambda row: row[column] is not None
        return lambda row: row[column] is None
    if isinstance(node, BoundNot):
        inner = _compile(node.item)

        def negate(row: Row) -> Truth:
            result = inner(row)
            return None if result is None else not result
        return negate
    if isinstance(node, BoundAnd | BoundOr):
        parts = tuple(_compile(i) for i in node.items)
        if len(parts) == 1:
            return parts[0]
        # AND: FALSE wins, then UNKNOWN; OR: TRUE wins, then UNKNOWN.
        decisive = isinstance(node, BoundOr)

        def combine(row: Row) -> Truth:
            unknown = False
            for part in parts:
                result = part(row)
                if result is decisive:
                    return decisive
                if result is None:
                    unknown = True
            return None if unknown else not decisive
        return combine
    raise FilterError(f"not a bound filter node: {node!r}")


@lru_cache(maxsize=4096)
def quoted(name: str) -> sql.SQL:
    """An identifier as query text, quoted once per name, with ``%`` doubled: the queries it
    goes into always have parameters, and psycopg reads a ``%`` in them as a placeholder (a
    table or column named with one made the query fail; ``sql.Identifier`` leaves it)."""
    return sql.SQL(sql.Identifier(name).as_string(None).replace("%", "%%"))


# How a column compares with text in SQL, when not as its own type (see the module's notes).
COLLATED: Final = "collated"  # a nondeterministic collation: compared COLLATE "C"
ENUM: Final = "enum"  # an enum: compared by its label


def _text_operand(column: str, text_columns: Mapping[str, str]) -> sql.Composable:
    """The column as the left side of a comparison with text."""
    how = text_columns.get(column)
    if how == COLLATED:
        return sql.SQL('{} COLLATE "C"').format(quoted(column))
    if how == ENUM:
        return sql.SQL("{}::text").format(quoted(column))
    return quoted(column)


def _sql(node: BoundNode, params: list[Any], text_columns: Mapping[str, str]
         ) -> sql.Composable:
    if isinstance(node, BoundCompare):
        if node.value is None:
            return sql.SQL("NULL::boolean")  # x <op> NULL is NULL whatever x is
        params.append(node.value)
        type_name = _sql_type(node.value)
        if type_name != "text":
            return sql.SQL("({} {} {}::{})").format(
                quoted(node.column), sql.SQL(node.op.value), sql.Placeholder(),
                sql.SQL(type_name))
        collate = ' COLLATE "C"' if node.op in _ORDERING else ""
        return sql.SQL("({} {} {}::text{})").format(
            _text_operand(node.column, text_columns), sql.SQL(node.op.value),
            sql.Placeholder(), sql.SQL(collate))
    if isinstance(node, BoundIn):
        if not node.values:
            return sql.SQL("NULL::boolean" if node.has_null else "FALSE")
        params.append([*node.values, None] if node.has_null else list(node.values))
        type_name = _sql_type(node.values[0])
        column = (_text_operand(node.column, text_columns) if type_name == "text"
                  else quoted(node.column))
        return sql.SQL("({} = ANY({}::{}[]))").format(
            column, sql.Placeholder(), sql.SQL(type_name))
    if isinstance(node, BoundIsNull):
        return sql.SQL("({} IS NOT NULL)" if node.negated else "({} IS NULL)").format(
            quoted(node.column))
    if isinstance(node, BoundNot):
        return sql.SQL("(NOT {})").format(_sql(node.item, params, text_columns))
    if isinstance(node, BoundAnd | BoundOr):
        if not node.items:
            return sql.SQL("TRUE" if isinstance(node, BoundAnd) else "FALSE")
        joiner = sql.SQL(" AND " if isinstance(node, BoundAnd) else " OR ")
        return sql.SQL("({})").format(joiner.join(_sql(i, params, text_columns)
                                                       for i in node.items))
    raise FilterError(f"not a bound filter node: {node!r}")


# Numbers whose dict lookup agrees with PostgreSQL equality whatever the column's numeric type.
def _indexable(value: Any) -> bool:
    if type(value) is float:
        return False  # NaN = NaN in SQL, and int8 → float8 rounding: leave floats unindexed
    if type(value) is int:
        return float(value) == value
    if type(value) is Decimal:
        return value.is_finite() and Decimal(float(value)) == value
    if type(value) is datetime:
        return value.tzinfo is not None
    return type(value) in _EXACT_TYPES


def _equalities(node: BoundNode) -> Iterator[tuple[str, frozenset[Any]]]:
    if isinstance(node, BoundAnd):
        for item in node.items:
            yield from _equalities(item)
    elif isinstance(node, BoundCompare) and node.op is Op.EQ and node.value is not None:
        if _indexable(node.value):
            yield node.column, frozenset((node.value,))
    elif isinstance(node, BoundIn) and all(_indexable(v) for v in node.values):
        yield node.column, frozenset(node.values)


class BoundFilter:
    """A filter with concrete values: SQL for the snapshot, a predicate for the stream."""

    __slots__ = ("__dict__", "node")

    def __init__(self, node: BoundNode) -> None:
        self.node = node

    def __repr__(self) -> str:
        return f"BoundFilter({self.node!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BoundFilter) and other.node == self.node

    def __hash__(self) -> int:
        return hash(self.node)

    @cached_property
    def columns(self) -> frozenset[str]:
        """Columns the predicate reads: all must be in the row it is given."""
        found: set[str] = set()
        stack: list[BoundNode] = [self.node]
        while stack:
            node = stack.pop()
            if isinstance(node, BoundAnd | BoundOr):
                stack.extend(node.items)
            elif isinstance(node, BoundNot):
                stack.append(node.item)
            else:
                found.add(node.column)
        return frozenset(found)

    def where(self, text_columns: Mapping[str, str] | None = None
              ) -> tuple[sql.Composed, list[Any]]:
        """The WHERE condition (without the keyword) and its parameters, in order.
        ``text_columns``: columns that compare with text otherwise than as their own type
        (:data:`COLLATED`, :data:`ENUM`)."""
        params: list[Any] = []
        clause = _sql(self.node, params, text_columns or {})
        return sql.Composed([clause]), params

    @cached_property
    def evaluate(self) -> TriPredicate:
        """Three-valued result: True, False or None (SQL NULL)."""
        return _compile(self.node)

    @cached_property
    def predicate(self) -> Callable[[Row], bool]:
        """``row -> bool``: True exactly when the SQL WHERE clause would be TRUE."""
        tri = self.evaluate

        def passes(row: Row) -> bool:
            return tri(row) is True
        return passes

    def equality_constraints(self) -> dict[str, frozenset[Any]]:
        """Column → the values every matching row must hold there (for the observer index).

        Drawn from ``column = value`` and ``column IN (...)`` reachable through top-level ANDs.
        A row that passes the filter has, for each entry, ``row[column]`` equal (as a Python
        dict key) to one of the values; an empty set means nothing can match. It is a
        necessary condition only: candidates still go through :attr:`predicate`. Values whose
        Python hashing could disagree with SQL equality (floats, inexact numbers, naive
        timestamps) are left out, which only makes the index less selective.
        """
        constraints: dict[str, frozenset[Any]] = {}
        for column, values in _equalities(self.node):
            previous = constraints.get(column)
            constraints[column] = values if previous is None else previous & values
        return constraints
