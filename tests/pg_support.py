"""Small synchronous SQL helper shared by tests."""

from __future__ import annotations

from typing import Any

import psycopg


def sql(dsn: str, *statements: str, params: Any = None) -> Any:
    """Run statements in autocommit; the rows of the last one that returns rows (else None)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        result = None
        for statement in statements:
            cur = conn.execute(statement, params)
            result = cur.fetchall() if cur.description else None
        return result
