"""PostgreSQL LSNs: ``'16/B374D848'`` text <-> int."""

from __future__ import annotations

# SQL for the newest WAL position the server can decode up to: the WAL written so far on a
# primary; what it has replayed on a standby (PostgreSQL 16+ decodes there), where
# pg_current_wal_lsn() fails.
SERVER_LSN_SQL = ("(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                  "ELSE pg_current_wal_lsn() END)")


def parse_lsn(text: str) -> int:
    hi, _, lo = text.partition("/")
    if not lo:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"
