"""Replication slot management: status, create, drop, verify.

The SQL text and the row → ``SlotStatus`` parsing are shared by the two callers: the stream
(replication connection, simple protocol only, so it quotes with ``pq.Escaping``) and the CLI /
preflight (an ordinary psycopg connection with bound parameters).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import psycopg

from cdcddp.wal.lsn import SERVER_LSN_SQL, format_lsn, parse_lsn

PLUGIN = "wal2json"

# PostgreSQL 15.19, 17.11 and later minor releases let only the output plugins listed in
# ``output_plugin_libraries`` decode (default: pgoutput and test_decoding). Without wal2json
# there, creating a slot and streaming from an existing one both fail with this error.
PLUGIN_REFUSED_MARK = "may not be used as an output plugin"


def plugin_refused_advice(allowed: str | None = None, plugin: str = PLUGIN) -> str:
    """What to do when the server refuses the output plugin; ``allowed``: the server's
    ``output_plugin_libraries`` when known."""
    names = [n.strip() for n in (allowed or "pgoutput, test_decoding").split(",") if n.strip()]
    wanted = ", ".join([*names, plugin])
    return (f"PostgreSQL does not allow {plugin} as a logical decoding output plugin: add it "
            f"to output_plugin_libraries (ALTER SYSTEM SET output_plugin_libraries = "
            f"'{wanted}'; then SELECT pg_reload_conf()).")


class SlotError(Exception):
    """The slot cannot be used as asked; the message says what to do."""


class SlotMissing(SlotError):
    pass


class SlotInvalidated(SlotError):
    pass


class SlotBusy(SlotError):
    """Another process streams from the slot."""

    def __init__(self, message: str, active_pid: int | None) -> None:
        super().__init__(message)
        self.active_pid = active_pid


@dataclass(slots=True, frozen=True)
class SlotStatus:
    name: str
    plugin: str | None
    slot_type: str
    database: str | None
    temporary: bool
    active: bool
    active_pid: int | None
    confirmed_flush_lsn: int | None
    restart_lsn: int | None
    wal_status: str | None  # reserved / extended / unreserved / lost
    safe_wal_size: int | None  # bytes before invalidation; None when unlimited
    retained_wal_bytes: int | None  # the server's position (SERVER_LSN_SQL) - restart_lsn
    # Why it was invalidated: PostgreSQL 17's invalidation_reason (wal_removed, rows_removed,
    # wal_level_insufficient, ...); on 16, "wal_removed" on a primary and "conflict" (a conflict
    # with recovery or WAL removal: 16 does not say) on a standby; None: it was not.
    invalidation: str | None = None
    failover: bool = False  # PostgreSQL 17+: synchronized to standbys (sync_replication_slots)
    synced: bool = False  # PostgreSQL 17+: a standby's copy of its primary's failover slot

    @property
    def invalidated(self) -> bool:
        return self.wal_status == "lost" or self.invalidation is not None

    def as_dict(self) -> dict[str, object]:
        def lsn(value: int | None) -> str | None:
            return None if value is None else format_lsn(value)

        return {
            "slot_name": self.name, "plugin": self.plugin, "slot_type": self.slot_type,
            "database": self.database, "temporary": self.temporary, "active": self.active,
            "active_pid": self.active_pid,
            "confirmed_flush_lsn": lsn(self.confirmed_flush_lsn),
            "restart_lsn": lsn(self.restart_lsn), "wal_status": self.wal_status,
            "safe_wal_size": self.safe_wal_size, "retained_wal_bytes": self.retained_wal_bytes,
            "invalidation": self.invalidation, "failover": self.failover, "synced": self.synced,
        }


# Every column as text, so rows read the same through pq (bytes) and psycopg (str). The
# invalidation and failover columns differ by version (none before 16 and 17), hence read
# through to_jsonb. PostgreSQL 16 has no reason, and shows every invalidated logical slot as
# ``conflicting``: on a primary that can only be WAL removal (conflicts with recovery happen
# in recovery); on a standby it may be either ("conflict").
_STATUS_SELECT = (
    "SELECT slot_name::text, plugin::text, slot_type::text, database::text, temporary::text, "
    "active::text, active_pid::text, confirmed_flush_lsn::text, restart_lsn::text, "
    "wal_status::text, safe_wal_size::text, "
    f"pg_wal_lsn_diff({SERVER_LSN_SQL}, restart_lsn)::bigint::text, "
    "COALESCE(to_jsonb(s) ->> 'invalidation_reason', "
    "CASE WHEN to_jsonb(s) ->> 'conflicting' = 'true' THEN "
    "CASE WHEN pg_is_in_recovery() THEN 'conflict' ELSE 'wal_removed' END END), "
    "to_jsonb(s) ->> 'failover', to_jsonb(s) ->> 'synced' "
    "FROM pg_replication_slots AS s WHERE slot_name = "
)


def status_sql(quoted_name: str) -> str:
    """The status query for a slot name already quoted as an SQL literal."""
    return _STATUS_SELECT + quoted_name


def parse_status_row(row: Sequence[str | bytes | None]) -> SlotStatus:
    text = [v.decode() if isinstance(v, bytes) else v for v in row]

    def opt_int(v: str | None) -> int | None:
        return None if v is None else int(v)

    def opt_lsn(v: str | None) -> int | None:
        return None if v is None else parse_lsn(v)

    return SlotStatus(
        name=text[0] or "", plugin=text[1], slot_type=text[2] or "", database=text[3],
        temporary=text[4] == "true", active=text[5] == "true", active_pid=opt_int(text[6]),
        confirmed_flush_lsn=opt_lsn(text[7]), restart_lsn=opt_lsn(text[8]),
        wal_status=text[9], safe_wal_size=opt_int(text[10]), retained_wal_bytes=opt_int(text[11]),
        invalidation=text[12], failover=text[13] == "true", synced=text[14] == "true",
    )


def verify(status: SlotStatus, dbname: str, own_pid: int | None = None,
           on_standby: bool = False) -> None:
    """Raise ``SlotError`` unless this client can stream from the slot (on a standby, if
    ``on_standby``)."""
    if status.slot_type != "logical" or status.plugin != PLUGIN:
        raise SlotError(
            f"replication slot {status.name!r} uses {status.plugin or status.slot_type!r}, not "
            f"{PLUGIN}: drop it (cdcddp slot drop --slot {status.name}) or choose another --slot.")
    if status.database != dbname:
        raise SlotError(
            f"replication slot {status.name!r} belongs to database {status.database!r}, not "
            f"{dbname!r}: connect to {status.database!r} or choose another --slot.")
    if status.invalidated:
        raise SlotInvalidated(_invalidated_advice(status))
    if on_standby and status.synced:  # (after a promotion it is the node's own again)
        raise SlotError(
            f"replication slot {status.name!r} on this standby is a copy of its primary's "
            "failover slot, which cannot be decoded before the standby is promoted: choose "
            "another --slot for a node on this standby.")
    if status.active and status.active_pid is not None and status.active_pid != own_pid:
        raise SlotBusy(
            f"replication slot {status.name!r} is in use by process {status.active_pid}: stop "
            "that consumer or choose another --slot.", status.active_pid)


_INVALIDATION_CAUSES = {
    # (what happened, what prevents it next time)
    "rows_removed": ("by a conflict with recovery on this standby (the primary removed rows it "
                     "still needed)", "; hot_standby_feedback = on on the standby prevents it"),
    "conflict": ("on this standby, by a conflict with recovery (the primary removed rows it "
                 "still needed, or its wal_level went below logical) or for want of WAL "
                 "(max_slot_wal_keep_size); PostgreSQL 16 does not say which",
                 "; hot_standby_feedback = on on the standby prevents the first"),
    "wal_level_insufficient": ("because wal_level on the primary went below logical",
                               "; set wal_level = logical there first"),
}


def _invalidated_advice(status: SlotStatus) -> str:
    reason = status.invalidation
    if reason is None or reason == "wal_removed":
        return (f"replication slot {status.name!r} is invalidated (wal_status = lost: the WAL "
                f"it needed was removed): drop it (cdcddp slot drop --slot {status.name}) and "
                "create a new one, then resync.")
    cause, prevention = _INVALIDATION_CAUSES.get(reason, (f"({reason})", ""))
    return (f"replication slot {status.name!r} was invalidated {cause}: drop it (cdcddp slot "
            f"drop --slot {status.name}) and create a new one, then resync{prevention}.")


def log_running_xacts(conn: psycopg.Connection) -> None:
    """On a primary: log its running transactions now, which a slot being created on its
    standby waits for (the primary logs them by itself every 15 s)."""
    conn.execute("SELECT pg_log_standby_snapshot()")


@contextlib.contextmanager
def running_xacts_logged(primary_dsn: str | None) -> Iterator[None]:
    """While inside, the primary logs its running transactions again and again: a slot
    created on its standby waits for the next such record (logged by itself every 15 s)."""
    if primary_dsn is None:
        yield
        return
    stop = threading.Event()

    def nudge() -> None:
        with contextlib.suppress(psycopg.Error), psycopg.connect(
                primary_dsn, autocommit=True, connect_timeout=10) as conn:
            while not stop.is_set():
                log_running_xacts(conn)
                stop.wait(0.2)

    thread = threading.Thread(target=nudge, name="cdcddp-standby-snapshot", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def create_command(quoted_ident: str, temporary: bool, failover: bool = False) -> str:
    """Replication command creating a wal2json slot (no snapshot: the stream starts now);
    ``failover``: a failover slot (PostgreSQL 17+)."""
    temp = " TEMPORARY" if temporary else ""
    options = "SNAPSHOT 'nothing', FAILOVER" if failover else "SNAPSHOT 'nothing'"
    return f"CREATE_REPLICATION_SLOT {quoted_ident}{temp} LOGICAL {PLUGIN} ({options})"


def make_failover_command(quoted_ident: str) -> str:
    """Replication command making an existing slot a failover slot (PostgreSQL 17+)."""
    return f"ALTER_REPLICATION_SLOT {quoted_ident} (FAILOVER)"


FAILOVER_SINCE = 170000  # server_version_num of the first release with failover slots


def failover_unsupported(version_num: int) -> str | None:
    """Why a server of this version cannot have a failover slot (None: it can); the caller
    adds what to do."""
    if version_num >= FAILOVER_SINCE:
        return None
    return (f"failover slots need PostgreSQL 17 or later (this server is "
            f"{version_num // 10000}.{version_num % 10000})")


def parse_timeline_history(content: str) -> dict[int, int]:
    """A timeline history file (``TIMELINE_HISTORY``'s content) as {timeline: the LSN it
    ended at}: its ancestors, each with the position where the next one branched off."""
    ended: dict[int, int] = {}
    for line in content.splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip().isdigit():
            continue  # blank lines and comments
        ended[int(fields[0])] = parse_lsn(fields[1].strip())
    return ended


# -- ordinary connection (CLI, preflight) ------------------------------------------------------


def get_status(conn: psycopg.Connection, slot: str) -> SlotStatus | None:
    row = conn.execute(_STATUS_SELECT + "%s", (slot,)).fetchone()
    return None if row is None else parse_status_row(row)


def create(conn: psycopg.Connection, slot: str, failover: bool = False) -> SlotStatus:
    """Create a persistent wal2json slot in the connection's database; ``failover``: a
    failover slot (PostgreSQL 17+), synchronized to standbys."""
    if get_status(conn, slot) is not None:
        raise SlotError(f"replication slot {slot!r} already exists: use it, or drop it first "
                        f"(cdcddp slot drop --slot {slot}).")
    if failover:
        why = failover_unsupported(conn.info.server_version)
        if why is not None:
            raise SlotError(f"{why}: leave out --failover.")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s, false, false, true)",
                     (slot, PLUGIN))
    else:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s)", (slot, PLUGIN))
    status = get_status(conn, slot)
    assert status is not None
    return status


def drop(conn: psycopg.Connection, slot: str) -> None:
    status = get_status(conn, slot)
    if status is None:
        raise SlotMissing(f"replication slot {slot!r} does not exist: nothing to drop.")
    if status.active:
        raise SlotBusy(f"replication slot {slot!r} is in use by process {status.active_pid}: "
                       "stop that consumer first.", status.active_pid)
    conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
