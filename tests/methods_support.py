"""Shared helpers for the methods, accounts and Todos tests (no tests of its own)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cdcddp.db import Database
from cdcddp.ddp.messages import MeteorError
from cdcddp.methods import ConnectionInfo, InvocationOutcome, LoginState, Methods, invoke
from cdcddp.methods.passwords import PasswordHashing
from cdcddp.methods.schema import apply_schema

# Cheap argon2id for tests only (the default is RFC 9106's t=3, m=64 MiB, p=4).
FAST_HASHING = PasswordHashing(time_cost=1, memory_cost_kib=8, parallelism=1)

_method_ids = itertools.count(1)


@pytest.fixture
async def database(db_dsn: str) -> AsyncIterator[Database]:
    db = Database(db_dsn, size=4)
    try:
        yield db
    finally:
        db.close()


@pytest.fixture
async def app_database(database: Database) -> Database:
    """A database with the accounts and Todos schemas."""
    await apply_schema(database, "accounts", "todos")
    return database


class Client:
    """A stand-in for one DDP connection: keeps its login state as the server would."""

    def __init__(self, methods: Methods, database: Database, connection_id: str = "conn1",
                 secure_transport: bool = False) -> None:
        self.methods = methods
        self.database = database
        self.connection_id = connection_id
        self.secure_transport = secure_transport
        self.login = LoginState()

    @property
    def info(self) -> ConnectionInfo:
        return ConnectionInfo(self.connection_id, self.login,
                              "127.0.0.1" if self.secure_transport else "203.0.113.9",
                              self.secure_transport)

    async def call(self, name: str, *params: Any, random_seed: str | None = None
                   ) -> InvocationOutcome:
        outcome = await invoke(self.methods, name, list(params), self.info,
                               method_id=str(next(_method_ids)), random_seed=random_seed,
                               database=self.database)
        if outcome.login is not None:  # what the server does when a call changed the login
            self.login = outcome.login
        return outcome

    async def ok(self, name: str, *params: Any, random_seed: str | None = None) -> Any:
        outcome = await self.call(name, *params, random_seed=random_seed)
        assert outcome.error is None, outcome.error
        return outcome.result

    async def fails(self, name: str, *params: Any) -> MeteorError:
        outcome = await self.call(name, *params)
        assert outcome.error is not None, f"{name} unexpectedly succeeded: {outcome.result!r}"
        return outcome.error


async def fetchall(database: Database, query: str, params: Any = None) -> list[tuple[Any, ...]]:
    return await database.fetchall(query, params)
