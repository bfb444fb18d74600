"""Preflight of declared publications against a real database (``cdcddp check``).

For each cursor of a publication with fixed cursors: the table exists and streams its UPDATEs
and DELETEs (primary key or replica identity), the key, published, filtered and sort columns
exist, and a limited cursor's sort columns have a type it can sort by. Publication functions
produce their cursors per subscription, so only their presence is reported; their cursors are
checked when they are resolved.
"""

from __future__ import annotations

from collections.abc import Iterable

import psycopg

from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.ordering import SORTABLE_TYPE_OIDS, SORTABLE_TYPES
from cdcddp.wal.preflight import Finding, check_table


def _columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, tuple[int, str]]:
    """The table's columns: name -> (type oid, type name)."""
    rows = conn.execute(
        "SELECT attname, atttypid::int, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = (quote_ident(%s) || '.' || quote_ident(%s))::regclass AND attnum > 0 "
        "AND NOT attisdropped", (schema, table)).fetchall()
    return {name: (oid, type_name) for name, oid, type_name in rows}


def check_cursor(conn: psycopg.Connection, publication: str, cursor: Cursor) -> list[Finding]:
    qualified = conn.execute("SELECT quote_ident(%s) || '.' || quote_ident(%s)",
                             (cursor.schema_name, cursor.table_name)).fetchone()[0]  # type: ignore[index]
    table = check_table(conn, qualified)
    if table.severity != "ok":
        return [table]
    existing = _columns(conn, cursor.schema_name, cursor.table_name)
    wanted = {
        "primary key": list(cursor.key_columns),
        "published": [column for column, _ in cursor.field_map],
        "filter": sorted(cursor.condition.column_names),
        "sort": [column for column, _ in cursor.order],
    }
    findings = []
    for role, columns in wanted.items():
        missing = [c for c in columns if c not in existing]
        if missing:
            findings.append(Finding(
                "error", "column_missing",
                f"publication {publication!r}: {role} column(s) {', '.join(missing)} do not exist "
                f"in {qualified}: fix the cursor or add the column(s)."))
    if cursor.limit is not None:
        unsortable = [f"{c} ({existing[c][1]})" for c in (*wanted["sort"], *cursor.key_columns)
                      if c in existing and existing[c][0] not in SORTABLE_TYPE_OIDS]
        if unsortable:
            findings.append(Finding(
                "error", "sort_type",
                f"publication {publication!r}: cannot sort by {', '.join(unsortable)}: sort "
                f"by {SORTABLE_TYPES} columns."))
    if not findings:
        findings.append(Finding("ok", "publication",
                                f"publication {publication!r}: {qualified} is publishable."))
    return findings


def check_publications(conn: psycopg.Connection,
                       publications: Iterable[Publication]) -> list[Finding]:
    findings: list[Finding] = []
    for publication in dict.fromkeys(publications):
        label = publication.name or "(universal)"
        if callable(publication.source):
            findings.append(Finding(
                "ok", "publication_function",
                f"publication {label!r} is a function: its cursors are checked per subscription."))
            continue
        for cursor in publication._static_cursors():
            findings.extend(check_cursor(conn, label, cursor))
    return findings
