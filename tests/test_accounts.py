"""Accounts: Meteor's password login methods over real PostgreSQL."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from cdcddp.db import Database
from cdcddp.methods import Methods
from cdcddp.methods.accounts import (
    AMBIGUOUS_CREDENTIALS,
    LOGGED_OUT_BY_SERVER,
    SESSION_EXPIRED,
    Accounts,
    AccountsConfig,
    current_user_publication,
    purge_expired_tokens,
)
from cdcddp.methods.passwords import PasswordHashing, hash_login_token
from cdcddp.methods.schema import apply_schema
from tests.methods_support import (  # noqa: F401  (fixtures)
    FAST_HASHING,
    Client,
    app_database,
    database,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def digest(password: str) -> dict[str, str]:
    return {"digest": hashlib.sha256(password.encode()).hexdigest(), "algorithm": "sha-256"}


def make_accounts(clock: FakeClock | None = None, **overrides: Any) -> Accounts:
    config = AccountsConfig(password_hashing=FAST_HASHING, clock=clock or FakeClock(),
                            **overrides)
    return Accounts(config)


def client_for(accounts: Accounts, db: Database, connection_id: str = "c1",
               secure: bool = False) -> Client:
    methods = Methods()
    methods.include(accounts.methods)
    return Client(methods, db, connection_id, secure_transport=secure)


async def sign_up(client: Client, username: str = "Alice", password: str = "s3cret pass",
                  email: str | None = "alice@example.com") -> dict[str, Any]:
    options: dict[str, Any] = {"username": username, "password": digest(password)}
    if email:
        options["email"] = email
    return await client.ok("createUser", options)


async def test_schema_files_run_twice(database: Database) -> None:  # noqa: F811
    await apply_schema(database, "accounts", "todos")
    await apply_schema(database, "accounts", "todos")
    tables = {r[0] for r in await database.fetchall(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    assert tables == {"users", "user_emails", "login_tokens", "lists", "todos"}


async def test_create_user_logs_in_and_stores_only_hashes(app_database: Database) -> None:  # noqa: F811
    client = client_for(make_accounts(), app_database)
    result = await sign_up(client)
    assert list(result) == ["id", "token", "tokenExpires", "type"]
    assert result["type"] == "password" and len(result["id"]) == 17
    expires = result["tokenExpires"]
    assert isinstance(expires, datetime)
    assert abs(expires - (datetime.now(UTC) + timedelta(days=90))) < timedelta(minutes=5)
    assert client.login.user_id == result["id"]
    assert client.login.login_token_hash == hash_login_token(result["token"])

    (row,) = await app_database.fetchall(
        "SELECT username, emails, profile, password_hash FROM users")
    username, emails, profile, password_hash = row
    assert (username, emails, profile) == ("Alice",
                                           [{"address": "alice@example.com", "verified": False}],
                                           None)
    sent_digest = digest("s3cret pass")["digest"]
    assert password_hash.startswith("$argon2id$")
    assert sent_digest not in password_hash and password_hash != sent_digest
    tokens = await app_database.fetchall("SELECT hashed_token, user_id FROM login_tokens")
    assert tokens == [(hash_login_token(result["token"]), result["id"])]
    assert result["token"] not in tokens[0][0]


async def test_create_user_refusals(app_database: Database) -> None:  # noqa: F811
    client = client_for(make_accounts(attempts_per_connection=100), app_database)
    await sign_up(client)
    # Case-insensitive duplicates (ambiguous by default, as Meteor 3).
    error = await client.fails("createUser", {"username": "ALICE", "password": digest("x")})
    assert (error.error, error.reason) == (403, AMBIGUOUS_CREDENTIALS)
    error = await client.fails("createUser", {"username": "bob", "email": "Alice@Example.com",
                                              "password": digest("x")})
    assert error.error == 403
    error = await client.fails("createUser", {"password": digest("x")})
    assert (error.error, error.reason) == (400, "Need to set a username or email")
    assert (await client.fails("createUser", {"username": "carol"})).error == 400
    assert (await client.fails("createUser", "carol")).error == 400
    bad = {"username": "dave", "password": {"digest": "abc", "algorithm": "sha-256"}}
    assert (await client.fails("createUser", bad)).error == 400
    bad = {"username": "dave", "password": {"digest": "a" * 64, "algorithm": "md5"}}
    assert (await client.fails("createUser", bad)).error == 400
    assert len(await app_database.fetchall("SELECT 1 FROM users")) == 1
    specific = client_for(make_accounts(ambiguous_error_messages=False), app_database, "c2")
    error = await specific.fails("createUser", {"username": "alice", "password": digest("x")})
    assert error.reason == "Username already exists."


async def test_login_with_digest_by_username_email_and_id(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts(attempts_per_connection=100)
    user_id = (await sign_up(client_for(accounts, app_database, "signup")))["id"]
    client = client_for(accounts, app_database)
    for query in ({"username": "alice"}, {"email": "ALICE@example.com"}, {"id": user_id}):
        result = await client.ok("login", {"user": query, "password": digest("s3cret pass")})
        assert result["id"] == user_id and result["type"] == "password"
        assert client.login.user_id == user_id
    # Three logins, three tokens (plus the signup's).
    assert len(await app_database.fetchall("SELECT 1 FROM login_tokens")) == 4


async def test_plain_password_only_on_loopback_or_tls(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts()
    user_id = (await sign_up(client_for(accounts, app_database, "signup")))["id"]
    plain = {"user": {"username": "alice"}, "password": "s3cret pass"}
    insecure = client_for(accounts, app_database, "remote", secure=False)
    error = await insecure.fails("login", plain)
    assert error.error == 400 and "TLS" in (error.reason or "")
    assert insecure.login.user_id is None
    secure = client_for(accounts, app_database, "local", secure=True)
    assert (await secure.ok("login", plain))["id"] == user_id
    # A plain-text signup on a secure connection stores the same kind of hash of the digest.
    result = await secure.ok("createUser", {"email": "p@example.com", "password": "plain pw"})
    again = await insecure.ok("login", {"user": {"email": "p@example.com"},
                                        "password": digest("plain pw")})
    assert again["id"] == result["id"]


async def test_unknown_user_and_wrong_password_give_the_same_error(
        app_database: Database) -> None:  # noqa: F811
    client = client_for(make_accounts(attempts_per_connection=100), app_database)
    await sign_up(client)
    wrong_password = await client.fails(
        "login", {"user": {"username": "alice"}, "password": digest("nope")})
    unknown_user = await client.fails(
        "login", {"user": {"username": "mallory"}, "password": digest("nope")})
    assert wrong_password.to_ddp() == unknown_user.to_ddp()
    assert (wrong_password.error, wrong_password.reason) == (403, AMBIGUOUS_CREDENTIALS)
    error = await client.fails("login", {"user": {"username": "a", "email": "b"},
                                         "password": digest("x")})
    assert error.error == 400  # exactly one user key
    error = await client.fails("login", {"foo": 1})
    assert (error.error, error.reason) == (400, "Unrecognized options for login request")


async def test_resume_logout_and_expiry(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts(attempts_per_connection=100)
    token = (await sign_up(client_for(accounts, app_database, "signup")))["token"]
    client = client_for(accounts, app_database)
    result = await client.ok("login", {"resume": token})
    assert (result["token"], result["type"]) == (token, "resume")
    assert client.login.login_token_hash == hash_login_token(token)

    outcome = await client.call("logout")
    assert outcome.error is None and outcome.revoked_token_hashes == (hash_login_token(token),)
    assert client.login.user_id is None
    error = await client.fails("login", {"resume": token})
    assert (error.error, error.reason) == (403, LOGGED_OUT_BY_SERVER)

    token = (await client.ok("login", {"user": {"username": "alice"},
                                       "password": digest("s3cret pass")}))["token"]
    await app_database.execute(
        "UPDATE login_tokens SET expires_at = now() - interval '1 second'")
    other = client_for(accounts, app_database, "c2")
    error = await other.fails("login", {"resume": token})
    assert (error.error, error.reason) == (403, SESSION_EXPIRED)
    assert await purge_expired_tokens(app_database) == 1
    assert (await other.fails("login", {"resume": token})).reason == LOGGED_OUT_BY_SERVER


async def test_change_password_revokes_other_tokens(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts(attempts_per_connection=100)
    here = client_for(accounts, app_database, "here")
    there = client_for(accounts, app_database, "there")
    assert (await here.fails("changePassword", digest("a"), digest("b"))).error == 401
    await sign_up(here)
    there_token = (await there.ok("login", {"user": {"username": "alice"},
                                            "password": digest("s3cret pass")}))["token"]
    error = await here.fails("changePassword", digest("wrong"), digest("new pass"))
    assert (error.error, error.reason) == (403, AMBIGUOUS_CREDENTIALS)
    outcome = await here.call("changePassword", digest("s3cret pass"), digest("new pass"))
    assert outcome.result == {"passwordChanged": True}
    assert outcome.revoked_token_hashes == (hash_login_token(there_token),)
    # The other connection's token is gone; this connection's survives.
    assert (await there.fails("login", {"resume": there_token})).reason == LOGGED_OUT_BY_SERVER
    (count,) = (await app_database.fetchall("SELECT count(*) FROM login_tokens"))[0]
    assert count == 1
    login = {"user": {"username": "alice"}, "password": digest("s3cret pass")}
    assert (await there.fails("login", login)).error == 403
    login["password"] = digest("new pass")
    assert (await there.ok("login", login))["type"] == "password"


async def test_get_new_token_and_remove_other_tokens(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts(attempts_per_connection=100)
    first = client_for(accounts, app_database, "first")
    second = client_for(accounts, app_database, "second")
    assert (await first.fails("getNewToken")).error == "You are not logged in."
    assert (await first.fails("removeOtherTokens")).error == "You are not logged in."
    old = await sign_up(first)
    second_token = (await second.ok("login", {"user": {"username": "alice"},
                                              "password": digest("s3cret pass")}))["token"]
    new = await first.ok("getNewToken")
    assert new["id"] == old["id"] and new["token"] != old["token"]
    assert new["tokenExpires"] == old["tokenExpires"]  # no extension of a token's life
    assert first.login.login_token_hash == hash_login_token(new["token"])
    outcome = await first.call("removeOtherTokens")
    assert outcome.error is None
    assert set(outcome.revoked_token_hashes) == {hash_login_token(old["token"]),
                                                 hash_login_token(second_token)}
    assert (await second.fails("login", {"resume": second_token})).error == 403
    assert (await second.fails("login", {"resume": old["token"]})).error == 403
    assert (await second.ok("login", {"resume": new["token"]}))["id"] == old["id"]


async def test_login_rate_limit_per_connection(app_database: Database) -> None:  # noqa: F811
    clock = FakeClock()
    accounts = make_accounts(clock)
    client = client_for(accounts, app_database)
    for _ in range(5):  # Meteor's default rule: 5 per 10 s (these fail: unknown token)
        assert (await client.fails("login", {"resume": "nope"})).error == 403
    error = await client.fails("login", {"resume": "nope"})
    assert error.error == "too-many-requests"
    assert error.details == {"timeToReset": 10000}
    assert "10 seconds" in (error.reason or "")
    # Another connection is not affected; the first is allowed again after the window.
    assert (await client_for(accounts, app_database, "c2").fails(
        "login", {"resume": "nope"})).error == 403
    clock.now += 10.5
    assert (await client.fails("login", {"resume": "nope"})).error == 403


async def test_failed_passwords_rate_limited_per_account(app_database: Database) -> None:  # noqa: F811
    clock = FakeClock()
    accounts = make_accounts(clock, failures_per_account=3, failures_window_seconds=60)
    await sign_up(client_for(accounts, app_database, "signup"))
    wrong = {"user": {"username": "alice"}, "password": digest("guess")}
    for attempt in range(3):  # from different connections
        error = await client_for(accounts, app_database, f"attacker{attempt}").fails(
            "login", wrong)
        assert error.error == 403
    right = {"user": {"username": "ALICE"}, "password": digest("s3cret pass")}
    error = await client_for(accounts, app_database, "victim").fails("login", right)
    assert error.error == "too-many-requests" and error.details == {"timeToReset": 60000}
    # Another way to name the same account is limited too (the user id key).
    error = await client_for(accounts, app_database, "v2").fails(
        "login", {"user": {"email": "alice@example.com"}, "password": digest("s3cret pass")})
    assert error.error == "too-many-requests"
    clock.now += 61
    assert (await client_for(accounts, app_database, "v3").ok("login", right))["type"]


async def test_weaker_hashes_are_upgraded_on_login(app_database: Database) -> None:  # noqa: F811
    await sign_up(client_for(make_accounts(), app_database, "signup"))
    stronger = PasswordHashing(time_cost=2, memory_cost_kib=16, parallelism=1)
    accounts = Accounts(AccountsConfig(password_hashing=stronger, clock=FakeClock()))
    client = client_for(accounts, app_database)
    await client.ok("login", {"user": {"username": "alice"}, "password": digest("s3cret pass")})
    (stored,) = (await app_database.fetchall("SELECT password_hash FROM users"))[0]
    assert "m=16,t=2,p=1" in stored and not stronger.needs_rehash(stored)


async def test_current_user_publication(app_database: Database) -> None:  # noqa: F811
    accounts = make_accounts(attempts_per_connection=100)
    alice = (await sign_up(client_for(accounts, app_database, "a")))["id"]
    await sign_up(client_for(accounts, app_database, "b"), "bob", email="bob@example.com")
    publication = current_user_publication()
    assert publication.universal
    (cursor,) = publication.resolve([], alice)
    query, params = cursor.snapshot_query()

    def run(conn: Any) -> list[Any]:
        cur = conn.execute(query, params)
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    rows = await app_database.run(run)
    assert [cursor.render(row) for row in rows] == [
        (alice, {"username": "Alice", "emails": [{"address": "alice@example.com",
                                                  "verified": False}], "profile": None})]
    (anonymous,) = publication.resolve([], None)
    query, params = anonymous.snapshot_query()
    assert await app_database.run(run) == []
