"""Checks that a database can feed cdcddp, each failure one actionable sentence.

``run_preflight`` returns findings instead of raising, so ``cdcddp check`` can print them all.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import psycopg

from cdcddp.db import first_line
from cdcddp.wal import slot as slots

Severity = Literal["error", "warning", "ok"]


@dataclass(slots=True, frozen=True)
class Finding:
    severity: Severity
    code: str  # stable identifier, e.g. "wal_level"
    message: str


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def check_wal_level(conn: psycopg.Connection) -> Finding:
    (level,) = conn.execute("SHOW wal_level").fetchone() or ("?",)
    if level != "logical":
        return Finding("error", "wal_level",
                       f"wal_level is {level!r}, not 'logical': run ALTER SYSTEM SET wal_level = "
                       "logical and restart PostgreSQL.")
    return Finding("ok", "wal_level", "wal_level is logical.")


def check_replication_privilege(conn: psycopg.Connection) -> Finding:
    row = conn.execute("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles "
                       "WHERE rolname = current_user").fetchone()
    user, allowed = row if row else ("?", False)
    if not allowed:
        return Finding("error", "replication_privilege",
                       f"role {user!r} lacks the REPLICATION privilege: run "
                       f'ALTER ROLE "{user}" REPLICATION as a superuser.')
    return Finding("ok", "replication_privilege", f"role {user!r} may use replication.")


def check_plugin(conn: psycopg.Connection, plugin: str = slots.PLUGIN) -> Finding:
    """Create and drop a temporary slot with the plugin: the only sure way to know it loads."""
    probe = f"cdcddp_preflight_{os.getpid()}"
    try:
        # Slot creation waits for running transactions: do not hang behind a long one.
        conn.execute("SET statement_timeout = '10s'")
        conn.execute("SELECT pg_create_logical_replication_slot(%s, %s, true)", (probe, plugin))
        conn.execute("SELECT pg_drop_replication_slot(%s)", (probe,))
    except psycopg.errors.QueryCanceled:
        return Finding("warning", "plugin",
                       f"could not verify that {plugin} is installed (a long transaction kept "
                       "slot creation waiting): run the check again when it has finished.")
    except psycopg.Error as exc:
        text = first_line(exc)
        if "could not access file" in text or "No such file" in text:
            return Finding("error", "plugin_missing",
                           f"the {plugin} output plugin is not installed on the server: install "
                           "it there (Debian/Ubuntu: apt-get install postgresql-15-wal2json).")
        if slots.PLUGIN_REFUSED_MARK in text:
            (allowed,) = conn.execute(
                "SELECT current_setting('output_plugin_libraries', true)").fetchone() or (None,)
            return Finding("error", "plugin_refused",
                           slots.plugin_refused_advice(allowed, plugin))
        if "all replication slots are in use" in text:
            return Finding("error", "slots_exhausted",
                           "all replication slots are in use: raise max_replication_slots (and "
                           "restart) or drop an unused slot.")
        return Finding("error", "plugin", f"cannot create a {plugin} replication slot ({text}).")
    finally:
        conn.execute("RESET statement_timeout")
    return Finding("ok", "plugin", f"{plugin} is installed.")


def check_slot(conn: psycopg.Connection, slot: str) -> Finding:
    status = slots.get_status(conn, slot)
    if status is None:
        return Finding("ok", "slot", f"replication slot {slot!r} does not exist yet; cdcddp "
                       "creates it on start.")
    (dbname,) = conn.execute("SELECT current_database()::text").fetchone() or ("?",)
    try:
        slots.verify(status, dbname, on_standby=server_role(conn)[0])
    except slots.SlotInvalidated as exc:
        return Finding("error", "slot_lost", str(exc))
    except slots.SlotBusy as exc:
        return Finding("warning", "slot_busy", str(exc))
    except slots.SlotError as exc:
        return Finding("error", "slot_unusable", str(exc))
    return Finding("ok", "slot", f"replication slot {slot!r} is usable "
                   f"(wal_status {status.wal_status}, retains {status.retained_wal_bytes} bytes).")


def check_failover_slot(conn: psycopg.Connection, slot: str) -> Finding | None:
    """A failover slot on a primary whose logical walsenders do not wait for the standbys:
    cdcddp can then deliver commits a standby never gets if it is promoted."""
    status = slots.get_status(conn, slot)
    if status is None or not status.failover or server_role(conn)[0]:
        return None  # (on a standby: a copy, or not used for failover)
    (synchronized,), = conn.execute("SHOW synchronized_standby_slots").fetchall()
    if synchronized:
        return Finding("ok", "failover_slot", f"replication slot {slot!r} is a failover slot, "
                       f"and the standbys of synchronized_standby_slots ({synchronized}) get "
                       "every commit before cdcddp does.")
    return Finding(
        "warning", "failover_unsynchronized",
        f"replication slot {slot!r} is a failover slot but synchronized_standby_slots is "
        "empty, so cdcddp can deliver commits a standby has not received; after a failover "
        "to that standby it takes them back and resyncs every subscription: list the "
        "standbys' physical slots in synchronized_standby_slots.")


def unstreamed_reason(name: str, relkind: str, persistence: str,
                      part_of: str | None = None) -> str | None:
    """Why no change to relation ``name`` (``pg_class.relkind``, ``relpersistence``) is
    ever streamed, with what to do; None for a logged table, whose changes are, or a
    partitioned table (its partitions' are). ``part_of``: what ``name`` is to the table
    published ("a partition of public.events")."""
    what = name if part_of is None else f"{name} ({part_of})"
    if relkind in ("v", "m"):
        kind = "view" if relkind == "v" else "materialized view"
        return (f"{name} is a {kind}: only tables' changes are streamed: publish the "
                "table(s) it reads")
    if relkind == "f":
        return (f"{what} is a foreign table: its changes are not in this database's WAL: "
                "publish a table of the database that holds them, from a server on it")
    if persistence == "u":
        return (f"{what} is UNLOGGED: its changes are not written to the WAL, so never "
                f"streamed: run ALTER TABLE {name} SET LOGGED")
    return None


# Whether pg_class ``c`` has the index its replica identity uses: its primary key under
# DEFAULT, the one chosen under USING INDEX (dropped, it leaves relreplident 'i' behind, and
# PostgreSQL then logs as for NOTHING).
IDENTITY_INDEX_SQL = (
    "EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND CASE c.relreplident "
    "WHEN 'd' THEN i.indisprimary WHEN 'i' THEN i.indisreplident ELSE false END)")


@dataclass(slots=True, frozen=True)
class Partition:
    """A table whose rows a query of another also reads: a partition of it (at any level
    below it), or an inheritance child. The stream gives its rows' changes its own name."""

    schema: str
    table: str
    oid: int
    is_partition: bool  # (not an inheritance child)
    relkind: str
    persistence: str
    identity: str  # pg_class.relreplident
    has_identity_index: bool  # (see IDENTITY_INDEX_SQL)

    @property
    def name(self) -> str:
        return f"{self.schema}.{self.table}"

    def part_of(self, table: str) -> str:
        return f"{'a partition' if self.is_partition else 'a child table'} of {table}"


# The tables below each of the tables named, through pg_inherits (partitions and inheritance
# children alike), save partitioned ones: those have no rows of their own. A partition being
# detached CONCURRENTLY is left out from its first transaction's commit on: queries of the
# table omit it from then (while the second waits for older transactions, or for ever if it
# was interrupted: until DETACH ... FINALIZE).
_PARTITIONS_SQL = (
    "WITH RECURSIVE named AS ("
    " SELECT r.nspname, r.relname, c.oid FROM unnest(%s::text[], %s::text[]) "
    " AS r(nspname, relname) JOIN pg_namespace n ON n.nspname = r.nspname "
    " JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = r.relname), "
    "below AS ("
    " SELECT t.nspname, t.relname, i.inhrelid FROM named t "
    " JOIN pg_inherits i ON i.inhparent = t.oid AND NOT i.inhdetachpending "
    " UNION "
    " SELECT b.nspname, b.relname, i.inhrelid FROM below b "
    " JOIN pg_inherits i ON i.inhparent = b.inhrelid AND NOT i.inhdetachpending) "
    "SELECT b.nspname, b.relname, n.nspname, c.relname, c.oid::int8, c.relispartition, "
    f"c.relkind::text, c.relpersistence::text, c.relreplident::text, {IDENTITY_INDEX_SQL} "
    "FROM below b JOIN pg_class c ON c.oid = b.inhrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind <> 'p'")


def partitions_of(conn: psycopg.Connection, tables: Iterable[tuple[str, str]]
                  ) -> dict[tuple[str, str], list[Partition]]:
    """The tables whose rows a query of each of ``tables`` ((schema, name) pairs) also
    reads: its partitions at every level (the leaves: those with rows), or its inheritance
    children and theirs. None for a table without (or that no longer exists)."""
    tables = list(tables)
    found: dict[tuple[str, str], list[Partition]] = {table: [] for table in tables}
    rows = conn.execute(_PARTITIONS_SQL, ([t[0] for t in tables], [t[1] for t in tables]))
    for schema, name, *leaf in rows:
        found[(schema, name)].append(Partition(*leaf))
    return found


def _first(reasons: Iterable[str | None]) -> str | None:
    return next((reason for reason in reasons if reason is not None), None)


def unstreamed_partition(table: str, partitions: Iterable[Partition]) -> str | None:
    """Why the changes to a partition of ``table`` are never streamed, if one's are not
    (see :func:`unstreamed_reason`)."""
    return _first(unstreamed_reason(leaf.name, leaf.relkind, leaf.persistence,
                                    leaf.part_of(table)) for leaf in partitions)


def unidentified_reason(name: str, identity: str, has_identity_index: bool,
                        part_of: str | None = None) -> str | None:
    """Why the UPDATEs and DELETEs of table ``name`` (``pg_class.relreplident``, whether it
    has the index that uses: see :data:`IDENTITY_INDEX_SQL`) are not streamed (wal2json drops
    them: no identity), with what to do; None when they are."""
    what = name if part_of is None else f"{name} ({part_of})"
    if identity == "n":
        return (f"table {what} has REPLICA IDENTITY NOTHING, so its UPDATEs and DELETEs are "
                f"not streamed: run ALTER TABLE {name} REPLICA IDENTITY DEFAULT")
    if identity == "d" and not has_identity_index:
        return (f"table {what} has no primary key, so its UPDATEs and DELETEs are not "
                f"streamed: add one (ALTER TABLE {name} ADD PRIMARY KEY (...)) or set "
                "REPLICA IDENTITY USING INDEX or FULL")
    if identity == "i" and not has_identity_index:
        return (f"table {what} has REPLICA IDENTITY USING INDEX, but that index was dropped, "
                "so its UPDATEs and DELETEs are not streamed: run ALTER TABLE "
                f"{name} REPLICA IDENTITY USING INDEX (another unique index), DEFAULT (with "
                "a primary key) or FULL")
    return None


def unidentified_partition(table: str, partitions: Iterable[Partition]) -> str | None:
    """Why the UPDATEs and DELETEs of a partition of ``table`` are not streamed, if one's
    are not (see :func:`unidentified_reason`)."""
    return _first(unidentified_reason(leaf.name, leaf.identity, leaf.has_identity_index,
                                      leaf.part_of(table)) for leaf in partitions)


def _identity_finding(name: str, identity: str, has_identity_index: bool,
                      part_of: str | None = None) -> Finding | None:
    reason = unidentified_reason(name, identity, has_identity_index, part_of)
    if reason is None:
        return None
    code = "table_identity_nothing" if identity == "n" else "table_no_identity"
    return Finding("error", code, f"{reason}.")


def check_table(conn: psycopg.Connection, table: str) -> Finding:
    row = conn.execute(
        f"SELECT c.oid::regclass::text, c.relreplident::text, {IDENTITY_INDEX_SQL}, "
        "has_table_privilege(c.oid, 'SELECT'), "
        "row_security_active(c.oid), current_user, c.relkind::text, c.relpersistence::text, "
        "n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = to_regclass(%s)", (table,)).fetchone()
    if row is None:
        return Finding("error", "table_missing",
                       f"table {table} does not exist: create it or fix the table name.")
    (name, identity, has_identity_index, readable, row_security, role, relkind, persistence,
     schema, relname) = row
    unstreamed = unstreamed_reason(name, relkind, persistence)
    if unstreamed is not None:
        return Finding("error", "table_not_streamed", f"{unstreamed}.")
    # Its partitions' rows (or inheritance children's) are its rows too, streamed under
    # their names: each is checked, with its own replica identity (a partitioned table has
    # no rows of its own).
    partitions = partitions_of(conn, [(schema, relname)])[(schema, relname)]
    unstreamed = unstreamed_partition(name, partitions)
    if unstreamed is not None:
        return Finding("error", "table_not_streamed", f"{unstreamed}.")
    findings = [_identity_finding(leaf.name, leaf.identity, leaf.has_identity_index,
                                  leaf.part_of(name))
                for leaf in partitions]
    if relkind != "p":
        findings.insert(0, _identity_finding(name, identity, has_identity_index))
    finding = next((f for f in findings if f is not None), None)
    if finding is not None:
        return finding
    if not readable:
        return Finding("error", "table_unreadable",
                       f"role {role!r} cannot read table {name}: run GRANT SELECT ON {name} "
                       f'TO "{role}".')
    if row_security:
        return Finding("error", "table_row_security",
                       f"row-level security on table {name} applies to role {role!r}, so its "
                       "snapshots would lack rows the stream shows: run ALTER ROLE "
                       f'"{role}" BYPASSRLS as a superuser, or make the role the table\'s '
                       "owner (without FORCE ROW LEVEL SECURITY).")
    return Finding("ok", "table", f"table {name} has a replica identity and is readable.")


def check_wal_keep_size(conn: psycopg.Connection) -> Finding:
    (value,) = conn.execute("SHOW max_slot_wal_keep_size").fetchone() or ("-1",)
    if value in ("-1", "-1kB"):
        return Finding("warning", "wal_keep_unbounded",
                       "max_slot_wal_keep_size is unlimited: a slot nobody consumes keeps WAL "
                       "until the disk fills; set it (e.g. ALTER SYSTEM SET "
                       "max_slot_wal_keep_size = '10GB') and reload.")
    return Finding("ok", "wal_keep", f"max_slot_wal_keep_size is {value}.")


def check_sync_standby_waits(conn: psycopg.Connection) -> Finding:
    """With synchronous standbys, a commit is streamed before it becomes visible (until a
    standby confirms it); a stream gap's resync waits for such commits, which it sees only
    in sessions it may inspect (its own role's, or all for superuser / pg_read_all_stats)."""
    row = conn.execute(
        "SELECT current_setting('synchronous_standby_names'), current_user, "
        "(SELECT rolsuper FROM pg_roles WHERE rolname = current_user) "
        "OR pg_has_role(current_user, 'pg_read_all_stats', 'MEMBER')").fetchone()
    assert row is not None
    names, user, sees_all = row
    if not names.strip():
        return Finding("ok", "sync_standby", "no synchronous standbys are configured.")
    if not sees_all:
        return Finding("warning", "sync_standby_waits_unseen",
                       f"synchronous_standby_names is set and role {user!r} cannot see other "
                       "roles' sessions waiting for a standby: after a stream gap, a commit a "
                       "standby has not confirmed yet can reach clients only with its rows' "
                       f'next change; run GRANT pg_read_all_stats TO "{user}".')
    return Finding("ok", "sync_standby",
                   f"role {user!r} sees commits waiting for a synchronous standby.")


STANDBY_NEEDS_PRIMARY = (
    "give its primary as primary_dsn (--primary-dsn): the standby decodes, and every query, "
    "read or write, goes to the primary.")


def server_role(conn: psycopg.Connection) -> tuple[bool, int]:
    """(the server is a standby, its server_version_num)."""
    standby, version = conn.execute(
        "SELECT pg_is_in_recovery(), current_setting('server_version_num')::int").fetchone() \
        or (False, 0)
    return bool(standby), int(version)


def check_standby(conn: psycopg.Connection, primary_dsn: str | None) -> list[Finding]:
    """A standby can feed cdcddp from PostgreSQL 16 on, with its primary for every query and
    ``hot_standby_feedback`` keeping the rows its slots need on the primary."""
    standby, version = server_role(conn)
    if not standby:
        return [Finding("ok", "primary", "the server is a primary.")]
    if version < 160000:
        return [Finding("error", "standby_too_old",
                        f"the server is a standby of PostgreSQL {version // 10000}, which "
                        "cannot decode (16 or later can): point --dsn at the primary.")]
    findings = [Finding("ok", "standby", "the server is a standby that can decode.")]
    if primary_dsn is None:
        findings.append(Finding("error", "standby_without_primary",
                                f"the server is a standby: {STANDBY_NEEDS_PRIMARY}"))
    if conn.execute("SHOW hot_standby_feedback").fetchone() != ("on",):
        findings.append(Finding(
            "warning", "hot_standby_feedback",
            "hot_standby_feedback is off on this standby: VACUUM on the primary can invalidate "
            "its logical slots; set hot_standby_feedback = on (with a primary_slot_name) and "
            "reload."))
    return findings


def run_preflight(dsn: str, *, slot: str | None = None, tables: Iterable[str] = (),
                  plugin: str = slots.PLUGIN, primary_dsn: str | None = None) -> list[Finding]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        return [Finding("error", "connect",
                        f"cannot connect to PostgreSQL ({first_line(exc)}): check --dsn.")]
    with conn:
        findings = [check_wal_level(conn), check_replication_privilege(conn),
                    check_wal_keep_size(conn), check_sync_standby_waits(conn)]
        roles = check_standby(conn, primary_dsn)
        findings.extend(roles)
        if not errors(findings):
            standby = roles[0].code == "standby"
            with slots.running_xacts_logged(primary_dsn if standby else None):
                findings.append(check_plugin(conn, plugin))
        if slot:
            findings.append(check_slot(conn, slot))
            failover = check_failover_slot(conn, slot)
            if failover is not None:
                findings.append(failover)
        findings.extend(check_table(conn, t) for t in tables)
    return findings
