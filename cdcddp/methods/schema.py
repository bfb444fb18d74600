"""The SQL schema files shipped in ``schema/`` (accounts, the Todos example).

Every file is idempotent (``CREATE ... IF NOT EXISTS``), so applying it at each start is safe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from cdcddp.db import Database

__all__ = ["SCHEMA_DIR", "apply_schema", "apply_schema_sync", "schema_sql"]

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schema"


def schema_sql(name: str) -> str:
    """The text of ``schema/<name>.sql`` (``name`` like ``"accounts"``)."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"bad schema name {name!r}")
    return (SCHEMA_DIR / f"{name}.sql").read_text(encoding="utf-8")


def apply_schema_sync(conn: psycopg.Connection[Any], *names: str) -> None:
    for name in names:
        conn.execute(schema_sql(name))  # no params: psycopg sends it as one simple query


async def apply_schema(database: Database, *names: str) -> None:
    """Run the named schema files, in order, in one transaction."""
    await database.run(apply_schema_sync, *names)
