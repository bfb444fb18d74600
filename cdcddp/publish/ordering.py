"""Sorted, limited cursors: the order PostgreSQL's ``ORDER BY`` gives, in Python.

A cursor with a ``limit`` publishes the first ``limit`` rows of its filter's result in its
``sort`` order (Meteor's ``find(selector, {sort, limit})``: "the 20 latest messages"). The
snapshot asks PostgreSQL for them (``ORDER BY ... LIMIT``); the stream's changes are ranked in
Python, so both must order alike, ties included:

- every sort column, then the primary key (ascending), decides: the order is total;
- ``NULL`` sorts after every value ascending and before every value descending (PostgreSQL's
  default ``NULLS LAST`` / ``NULLS FIRST``);
- ``NaN`` (float, numeric) sorts after every other number, as in PostgreSQL;
- text sorts by code point (``COLLATE "C"`` in the query, whatever the database's collation).

Only types whose PostgreSQL order Python's comparison reproduces can be sorted on
(:data:`SORTABLE_TYPE_OIDS`); a cursor sorting by another type fails to start with an error that
names the column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from psycopg import sql

Rank = tuple[Any, ...]

# bool, bytea, int8, int2, int4, text, float4, float8, varchar, date, time, timestamp,
# timestamptz, numeric, uuid: their Python values compare as PostgreSQL orders them.
SORTABLE_TYPE_OIDS: Final = frozenset({16, 17, 20, 21, 23, 25, 700, 701, 1043, 1082, 1083, 1114,
                                       1184, 1700, 2950})
_COLLATED_TYPE_OIDS: Final = frozenset({25, 1043})  # text, varchar: ordered by code point
SORTABLE_TYPES: Final = ("numbers, text, varchar, bool, bytea, date, time, timestamp, "
                         "timestamptz or uuid")  # (for messages)


class SortError(ValueError):
    """A cursor sorts by a column whose type cannot be ordered alike in Python."""


class _Descending:
    """A sort component in reverse order."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __lt__(self, other: _Descending) -> bool:
        return other.value < self.value  # type: ignore[no-any-return]

    def __gt__(self, other: _Descending) -> bool:
        return self.value < other.value  # type: ignore[no-any-return]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and self.value == other.value

    def __hash__(self) -> int:
        return hash(self.value)

    def __repr__(self) -> str:
        return f"_Descending({self.value!r})"


def _ascending(value: Any) -> tuple[int, Any]:
    """Ascending with NULL last and NaN after the numbers (``v != v`` only for NaN)."""
    if value is None:
        return (2, 0)
    if value != value:
        return (1, 0)
    return (0, value)


def rank_getter(order: Sequence[tuple[str, bool]], key_columns: Sequence[str],
                columns: Sequence[str]) -> Callable[[Sequence[Any]], Rank]:
    """``values -> rank`` for a values tuple in ``columns`` order: ranks compare as
    ``ORDER BY <order>, <key columns>`` orders the rows. The rank ends with the row's key."""
    index = {column: i for i, column in enumerate(columns)}
    parts = tuple((index[column], descending) for column, descending in order)
    key_positions = tuple(index[c] for c in key_columns)

    def rank(values: Sequence[Any]) -> Rank:
        components: list[Any] = []
        for position, descending in parts:
            component = _ascending(values[position])
            components.append(_Descending(component) if descending else component)
        components.extend(values[p] for p in key_positions)
        return tuple(components)
    return rank


def read_limit(limit: int) -> int:
    """The rows a limited cursor's query asks for: its ``limit``, and as many again, which
    its observer holds unpublished to replace rows that leave (Meteor's oplog driver keeps
    such a buffer too)."""
    return 2 * limit


def order_by(order: Sequence[tuple[str, bool]], key_columns: Sequence[str],
             shape: Mapping[str, tuple[Any, ...]] | None) -> sql.Composed:
    """``ORDER BY`` for ``order`` then the key (ascending), for a table whose columns have
    the type oids ``shape`` gives; :class:`SortError` for a column that cannot be sorted."""
    terms = []
    seen = set()
    for column, descending in [*order, *((c, False) for c in key_columns)]:
        if column in seen:
            continue
        seen.add(column)
        oid = (shape or {}).get(column, (None,))[0]
        if oid is None:
            raise SortError(f"cannot sort by column {column!r}: the table has no such column")
        if oid not in SORTABLE_TYPE_OIDS:
            raise SortError(f"cannot sort by column {column!r}: its type (oid {oid}) is not "
                            f"one whose order is known ({SORTABLE_TYPES})")
        term = sql.Identifier(column)
        if oid in _COLLATED_TYPE_OIDS:
            term = sql.SQL('{} COLLATE "C"').format(term)
        terms.append(sql.SQL("{} DESC NULLS FIRST" if descending else "{} ASC NULLS LAST")
                     .format(term))
    return sql.SQL("ORDER BY {}").format(sql.SQL(", ").join(terms))
