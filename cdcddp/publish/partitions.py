"""Partitioned tables, and tables with inheritance children: rows of theirs are streamed
under other tables' names.

A row of a partitioned table is stored in one of its leaf partitions, and wal2json names
that partition in each change (it has no equivalent of pgoutput's
``publish_via_partition_root``); a query of a table reads its inheritance children's rows
too (TimescaleDB's chunks are such children), whose changes are streamed under their names.
A publication names the table, so the engine gives each change to a partition (here: a leaf
partition or an inheritance child, at any level) of a table it follows a second time,
renamed to that table (:func:`as_change_of`); :class:`PartitionMap` says which tables those
are.

Pure: the catalog is read by :func:`cdcddp.publish.snapshots.read_partitions`. The stream
shows no DDL, so the engine polls the trees it follows: ATTACH, DETACH, CREATE ... PARTITION
OF, INHERIT, NO INHERIT and DROP of a partition change a table's rows with no row change in
the stream, and its observers are read again then.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from cdcddp.publish.definition import TableName
from cdcddp.wal.events import Delete, Insert, Relation, Truncate, Update

Leaf = tuple[str, str, int]  # a leaf partition: schema, name, oid
Leaves = frozenset[Leaf]


class PartitionMap:
    """The partitions of each table followed (none for most), and the reverse.

    ``ancestors`` is read by the stream consumer for every change (a dict: one lookup, no
    lock). Trees are set from the consumer (polled changes) and from lookups' threads (a
    table's first tree): writers take a lock; each dict update a reader sees is whole.
    """

    def __init__(self) -> None:
        self._trees: dict[TableName, Leaves] = {}
        # partition -> the followed tables it is part of (an intermediate partitioned table
        # and its root may both be followed)
        self.ancestors: dict[TableName, tuple[TableName, ...]] = {}
        self._lock = threading.Lock()

    def __contains__(self, table: object) -> bool:
        return table in self._trees

    def roots(self) -> list[TableName]:
        """The tables followed."""
        return list(self._trees)

    def leaves(self, table: TableName) -> Leaves:
        return self._trees.get(table, frozenset())

    def set_leaves(self, table: TableName, leaves: Iterable[Leaf]) -> bool:
        """Follow ``table`` with these partitions; whether that changed its tree (a table
        followed for the first time changed it). Trees are told apart by the partitions'
        oids: a partition dropped and made again under its name is another."""
        new = frozenset(leaves)
        with self._lock:
            old = self._trees.get(table)
            if old == new:
                return False
            self._trees[table] = new
            old_names = {leaf[:2] for leaf in old or ()}
            new_names = {leaf[:2] for leaf in new}
            ancestors = self.ancestors
            for name in old_names - new_names:
                rest = tuple(t for t in ancestors.get(name, ()) if t != table)
                if rest:
                    ancestors[name] = rest
                else:
                    ancestors.pop(name, None)
            for name in new_names - old_names:
                ancestors[name] = (*ancestors.get(name, ()), table)
            return True


class StreamedTables:
    """The tables found streamed, each checked once (``snapshots.check_streamed``), shared by
    the engine and its lookups (in worker threads); ``partitions`` follows their
    partitions."""

    def __init__(self) -> None:
        self._tables: set[TableName] = set()
        self.partitions = PartitionMap()
        # Tables with partitions followed so far, and when (that count then): a lookup whose
        # snapshot is older than a table's following may lack changes to its partitions
        # that nothing gave to the table.
        self.follows = 0
        self._followed_at: dict[TableName, int] = {}
        self._lock = threading.Lock()

    def __contains__(self, table: object) -> bool:
        return table in self._tables

    def add(self, table: TableName, leaves: Iterable[Leaf] | None) -> None:
        """``table`` is streamed, and ``leaves`` are its partitions, whose changes are given
        to it from now on (None: it does not exist; the query says so)."""
        if leaves is not None and table not in self.partitions:
            with self._lock:
                if self.partitions.set_leaves(table, leaves) and self.partitions.leaves(table):
                    self.follows += 1
                    self._followed_at[table] = self.follows
        self._tables.add(table)

    def followed_since(self, tables: Iterable[TableName], follows: int) -> bool:
        """Was one of ``tables`` followed after ``follows`` tables had been?"""
        if self.follows <= follows:
            return False
        followed_at = self._followed_at
        return any(followed_at.get(table, 0) > follows for table in tables)

    def discard(self, table: TableName) -> None:
        """Check ``table`` again next time (its changes are no longer all streamed)."""
        self._tables.discard(table)


def as_change_of(change: Insert | Update | Delete | Truncate, table: TableName
                 ) -> Insert | Update | Delete | Truncate:
    """``change`` to a partition, as a change to ``table`` that holds it. A TRUNCATE emptied
    the partition only: it says which (:attr:`Truncate.partition`)."""
    kind = type(change)
    schema, name = table
    if kind is Insert:
        return Insert(change.xid, change.lsn, schema, name, change.new,  # type: ignore[union-attr]
                      change.pk)  # type: ignore[union-attr]
    if kind is Update:
        return Update(change.xid, change.lsn, schema, name, change.new,  # type: ignore[union-attr]
                      change.identity, change.pk)  # type: ignore[union-attr]
    if kind is Delete:
        return Delete(change.xid, change.lsn, schema, name,
                      change.identity, change.pk)  # type: ignore[union-attr]
    return Truncate(change.xid, change.lsn, schema, name,
                    partition=(change.schema, change.table))


def as_relation_of(relation: Relation, table: TableName) -> Relation:
    """A partition's shape, as ``table``'s (a partition has its table's columns, with the
    same types; an inheritance child may have more, which no observer of ``table`` reads)."""
    return Relation(relation.xid, table[0], table[1], relation.columns, relation.complete,
                    relation.previous, relation.absent)
