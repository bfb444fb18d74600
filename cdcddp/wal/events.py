"""Typed change events decoded from wal2json format-version 2.

One event per wal2json document. LSNs are ints (format/parse in ``cdcddp.wal.lsn``).
Row values are dicts of column name -> Python value; a column wal2json left out (an unchanged
TOASTed value) is simply not a key of the dict — never ``None``, which means SQL NULL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal


class _Absent:
    """Marker for a column whose value the stream did not carry (unchanged TOAST)."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ABSENT"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()
"""``row.get(column, ABSENT)`` tells an omitted column from SQL NULL (``None``)."""

Row = dict[str, Any]

# Events are not frozen dataclasses: a frozen __init__ costs ~0.5 µs more per row on the hot
# path. Treat them as immutable all the same.


@dataclass(slots=True)
class Begin:
    xid: int
    lsn: int  # start of the commit record (final_lsn)
    end_lsn: int  # end of the commit record (wal2json "nextlsn"): what to acknowledge
    timestamp: datetime | None  # commit timestamp (UTC)


@dataclass(slots=True)
class Commit:
    xid: int
    lsn: int
    end_lsn: int  # acknowledge this once the transaction is applied
    timestamp: datetime | None


@dataclass(slots=True)
class Insert:
    xid: int
    lsn: int
    schema: str
    table: str
    new: Row
    pk: tuple[str, ...]  # primary-key column names (empty when the table has none)
    action: Literal["I"] = "I"


@dataclass(slots=True)
class Update:
    xid: int
    lsn: int
    schema: str
    table: str
    new: Row  # may lack unchanged TOASTed columns
    identity: Row  # replica identity columns: old key values (whole old row under FULL)
    pk: tuple[str, ...]
    action: Literal["U"] = "U"


@dataclass(slots=True)
class Delete:
    xid: int
    lsn: int
    schema: str
    table: str
    identity: Row
    pk: tuple[str, ...]
    action: Literal["D"] = "D"


@dataclass(slots=True)
class Truncate:
    xid: int
    lsn: int
    schema: str
    table: str
    action: Literal["T"] = "T"
    # Set when the table's rows did not all go (cdcddp.publish.partitions): a partition's
    # TRUNCATE given as its table's, or a table's own rows only (its partitions' stay):
    # (schema, table) of the one whose rows alone went.
    partition: tuple[str, str] | None = None


@dataclass(slots=True)
class Message:
    """``pg_logical_emit_message``; non-transactional ones have ``xid=None``."""

    xid: int | None
    lsn: int
    transactional: bool
    prefix: str
    content: str
    action: Literal["M"] = "M"


RowChange = Insert | Update | Delete
Event = Begin | Commit | Insert | Update | Delete | Truncate | Message


# -- stream control events (appended by the replication client, cdcddp.wal.stream) ------------


@dataclass(slots=True)
class TransactionRestart:
    """The connection dropped after part of transaction ``xid`` was delivered.

    Discard every event of ``xid`` received since its ``Begin``: after the reconnect the whole
    transaction is delivered again, from its ``Begin``. Never sent for a transaction whose
    ``Commit`` was delivered — those are never delivered twice.
    """

    xid: int
    action: Literal["R"] = "R"


@dataclass(slots=True)
class StreamGap:
    """Changes may have been missed: the slot was (re)created after the stream had started.

    Consumers must resync (re-run their queries) — DESIGN invariant 5. ``lsn`` is the new
    slot's consistent point: the stream continues with transactions committed after it.
    ``forked``: the server's history parted from the one streamed before commits already
    delivered; they never happened there, and their xids may be given to other transactions.
    """

    slot: str
    lsn: int
    reason: str
    forked: bool = False
    action: Literal["G"] = "G"


@dataclass(slots=True)
class TimelineSwitch:
    """The server's history left timeline ``previous`` for ``timeline`` (a failover) after
    every commit the stream delivered: nothing delivered is gone (else a forked ``StreamGap``
    says so), but commits made on the old timeline after the switch, which the stream had
    not yet delivered, are; their xids may be given to other transactions."""

    slot: str
    timeline: int
    previous: int
    action: Literal["L"] = "L"


@dataclass(slots=True)
class Relation:
    """The shape of a table's rows as the stream now carries them (wal2json streams no DDL).

    Emitted just before a row change of a table the decoder has not seen yet, and before one
    whose columns (names or type oids) differ from the table's last known shape: a schema
    change (ADD/DROP/RENAME COLUMN, ALTER COLUMN ... TYPE) happened before it. An UPDATE may
    omit unchanged TOASTed columns; a shape learnt from one is ``complete=False`` and keeps the
    columns it lacks from the previous shape (they are presumed unchanged, not dropped). The
    first UPDATE lacking a given set of columns is reported too (``absent``): a dropped
    variable-length column looks the same as a TOASTed one left out.
    """

    xid: int  # the transaction of the change that showed it
    schema: str
    table: str
    columns: tuple[tuple[str, int], ...]  # (name, type oid)
    complete: bool  # taken from an INSERT: every column of the table is present
    previous: tuple[tuple[str, int], ...] | None  # the shape it replaces; None: first seen
    # Columns of ``columns`` the UPDATE that showed it lacked (presumed unchanged TOASTed
    # values; a consumer that must know can ask the catalog whether they still exist).
    absent: tuple[str, ...] = ()
    action: Literal["S"] = "S"


StreamEvent = Event | TransactionRestart | StreamGap | TimelineSwitch | Relation
"""What ``cdcddp.wal.stream`` yields: change events, the two control events, and shapes."""
