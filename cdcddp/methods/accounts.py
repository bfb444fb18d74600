"""Password accounts with Meteor's method names and wire shapes (accounts-base/-password).

Methods: ``createUser``, ``login`` (password by ``{user, password}``, or ``{resume: token}``),
``logout``, ``changePassword``, ``getNewToken``, ``removeOtherTokens``. Tables: see
``schema/accounts.sql``. Security model:

* The password a client sends is SHA-256'd (Meteor's client already sends ``{digest,
  algorithm: "sha-256"}``); the server stores argon2id(digest), never the digest. A plain-text
  ``password`` string is accepted only on a loopback or TLS connection.
* A failed login costs the same argon2 work and gives the same error whether or not the user
  exists (Meteor 3's ``ambiguousErrorMessages``, on by default).
* Resume tokens are 258-bit random strings stored as base64(sha256(token)) with an expiry
  (default 90 days); ``logout`` deletes the connection's token; ``changePassword`` and
  ``removeOtherTokens`` delete the user's other tokens.
* ``login`` and ``createUser`` are rate-limited per connection (Meteor's default rule: 5 calls
  per 10 s) and failed password checks per account (10 per 5 minutes), answering Meteor's
  ``too-many-requests`` error with ``timeToReset``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Annotated, Any, Final

import psycopg
import pydantic
import trio
from psycopg.types.json import Jsonb
from pydantic import BaseModel, ConfigDict, StringConstraints

from cdcddp.db import Database
from cdcddp.ddp.messages import MeteorError
from cdcddp.methods.context import MethodContext
from cdcddp.methods.passwords import (
    DEFAULT_HASHING,
    MAX_PLAIN_PASSWORD_LENGTH,
    PasswordHashing,
    digest_of_plain,
    hash_login_token,
    is_sha256_hex,
    new_login_token,
    new_user_id,
)
from cdcddp.methods.ratelimit import RateDecision, SlidingWindowLimiter, too_many_requests
from cdcddp.methods.registry import Methods
from cdcddp.publish.definition import Cursor, Publication
from cdcddp.publish.filters import C, UserId

__all__ = [
    "AMBIGUOUS_CREDENTIALS",
    "Accounts",
    "AccountsConfig",
    "current_user_publication",
    "purge_expired_tokens",
]

# Meteor 3's Accounts._handleError text when ambiguousErrorMessages is on (the default).
AMBIGUOUS_CREDENTIALS: Final = "Something went wrong. Please check your credentials."
LOGGED_OUT_BY_SERVER: Final = "You've been logged out by the server. Please log in again."
SESSION_EXPIRED: Final = "Your session has expired. Please log in again."
PLAIN_PASSWORD_REFUSED: Final = (
    "Plain-text passwords are accepted only over TLS or from loopback; "
    "send {digest: <sha-256 hex>, algorithm: \"sha-256\"}")
# Meteor's LOGIN_UNEXPIRING_TOKEN_DAYS, used when loginExpirationInDays is null.
UNEXPIRING: Final = timedelta(days=365 * 100)

NonEmptyStr = Annotated[str, StringConstraints(min_length=1, max_length=320)]
PlainPassword = Annotated[str, StringConstraints(max_length=MAX_PLAIN_PASSWORD_LENGTH)]


class DigestPassword(BaseModel):
    model_config = ConfigDict(extra="forbid")
    digest: str
    algorithm: str


PasswordInput = PlainPassword | DigestPassword


class UserQuery(BaseModel):
    """``{username}`` | ``{email}`` | ``{id}``: exactly one key (Meteor's userQueryValidator)."""

    model_config = ConfigDict(extra="forbid")
    id: NonEmptyStr | None = None
    username: NonEmptyStr | None = None
    email: NonEmptyStr | None = None

    @pydantic.model_validator(mode="after")
    def _exactly_one(self) -> UserQuery:
        if len(self.model_fields_set) != 1 or None in (getattr(self, k)
                                                        for k in self.model_fields_set):
            raise ValueError("User property must have exactly one field")
        return self

    @property
    def kind_and_value(self) -> tuple[str, str]:
        (kind,) = self.model_fields_set
        return kind, getattr(self, kind)


class PasswordLogin(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: UserQuery
    password: PasswordInput
    code: str | None = None  # accounts-2fa; not supported, ignored like a server without 2FA


class ResumeLogin(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Meteor checks only `resume`
    resume: str


class CreateUserOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")  # Meteor: Match.ObjectIncluding
    username: NonEmptyStr | None = None
    email: NonEmptyStr | None = None
    password: PasswordInput | None = None
    profile: dict[str, Any] | None = None


def _validate(model: type[BaseModel], data: Any, where: int = 0) -> Any:
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as exc:
        details = [{"loc": [where, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                   for e in exc.errors(include_url=False, include_context=False,
                                       include_input=False)]
        first = details[0]
        raise MeteorError(400, f"Match failed: params[{']['.join(map(str, first['loc']))}]: "
                               f"{first['msg']}", details) from None


@dataclass(frozen=True)
class AccountsConfig:
    password_hashing: PasswordHashing = DEFAULT_HASHING
    login_expiration: timedelta | None = timedelta(days=90)  # None: tokens do not expire
    ambiguous_error_messages: bool = True  # same error for unknown user and wrong password
    forbid_client_account_creation: bool = False
    # Meteor's default DDPRateLimiter rule for login/createUser: 5 calls per 10 s per connection.
    attempts_per_connection: int = 5
    attempts_window_seconds: float = 10.0
    # Failed password checks per account, from any connection.
    failures_per_account: int = 10
    failures_window_seconds: float = 300.0
    # argon2 at 64 MiB each: bound concurrent hashing (memory, CPU).
    max_concurrent_hashes: int = 2
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)


class Accounts:
    """The accounts methods and their in-memory rate limiters (one instance per server)."""

    def __init__(self, config: AccountsConfig | None = None) -> None:
        self.config = config or AccountsConfig()
        self._attempts = SlidingWindowLimiter(self.config.attempts_per_connection,
                                              self.config.attempts_window_seconds)
        self._failures = SlidingWindowLimiter(self.config.failures_per_account,
                                              self.config.failures_window_seconds)
        self._hash_limiter = trio.CapacityLimiter(self.config.max_concurrent_hashes)
        self.methods = Methods()
        self._declare_methods()

    # -- helpers ----------------------------------------------------------------------------

    def _credentials_error(self, specific: str) -> MeteorError:
        return MeteorError(403, AMBIGUOUS_CREDENTIALS if self.config.ambiguous_error_messages
                           else specific)

    def _count_attempt(self, ctx: MethodContext) -> None:
        decision = self._attempts.hit(("connection", ctx.connection_id), self.config.clock())
        if not decision.allowed:
            raise too_many_requests(decision)

    def _check_failures(self, *keys: Hashable) -> None:
        now = self.config.clock()
        refused = [d for d in (self._failures.check(k, now) for k in keys) if not d.allowed]
        if refused:
            raise too_many_requests(RateDecision(False, max(d.time_to_reset for d in refused)))

    def _record_failure(self, *keys: Hashable) -> None:
        now = self.config.clock()
        for key in dict.fromkeys(keys):  # the same key twice must count once
            self._failures.record(key, now)

    def _digest(self, ctx: MethodContext, password: str | DigestPassword) -> str:
        if isinstance(password, str):
            if not ctx.connection.secure_transport:
                raise MeteorError(400, PLAIN_PASSWORD_REFUSED)
            return digest_of_plain(password)
        if password.algorithm != "sha-256":
            raise MeteorError(400, "Invalid password hash algorithm. Only 'sha-256' is allowed.")
        if not is_sha256_hex(password.digest):
            raise MeteorError(400, "Match failed: password.digest must be a SHA-256 hex digest")
        return password.digest.lower()

    async def _hash(self, digest: str) -> str:
        return await trio.to_thread.run_sync(self.config.password_hashing.hash, digest,
                                             limiter=self._hash_limiter)

    async def _verify(self, stored_hash: str | None, digest: str) -> bool:
        return await trio.to_thread.run_sync(self.config.password_hashing.verify, stored_hash,
                                             digest, limiter=self._hash_limiter)

    def _expiration(self) -> timedelta:
        return self.config.login_expiration or UNEXPIRING

    async def _log_in(self, ctx: MethodContext, user_id: str, login_type: str | None,
                      created_at: datetime | None = None,
                      expires_at: datetime | None = None) -> dict[str, Any]:
        """Store a new resume token, log the connection in, answer Meteor's login result."""
        token = new_login_token()
        hashed = hash_login_token(token)
        if created_at is None or expires_at is None:
            row = await ctx.fetchone(
                "INSERT INTO login_tokens (hashed_token, user_id, created_at, expires_at) "
                "VALUES (%s, %s, now(), now() + %s) RETURNING expires_at",
                (hashed, user_id, self._expiration()))
        else:
            row = await ctx.fetchone(
                "INSERT INTO login_tokens (hashed_token, user_id, created_at, expires_at) "
                "VALUES (%s, %s, %s, %s) RETURNING expires_at",
                (hashed, user_id, created_at, expires_at))
        assert row is not None
        ctx.set_user_id(user_id, hashed)
        result: dict[str, Any] = {"id": user_id, "token": token, "tokenExpires": row[0]}
        if login_type is not None:
            result["type"] = login_type
        return result

    async def _find_user(self, ctx: MethodContext, query: UserQuery
                         ) -> tuple[str, str | None] | None:
        kind, value = query.kind_and_value
        if kind == "id":
            sql = "SELECT id, password_hash FROM users WHERE id = %s"
        elif kind == "username":
            sql = "SELECT id, password_hash FROM users WHERE lower(username) = lower(%s)"
        else:
            sql = ("SELECT u.id, u.password_hash FROM user_emails e JOIN users u "
                   "ON u.id = e.user_id WHERE lower(e.address) = lower(%s)")
        row = await ctx.fetchone(sql, (value,))
        return None if row is None else (row[0], row[1])

    async def _maybe_rehash(self, ctx: MethodContext, user_id: str, stored: str,
                            digest: str) -> None:
        # Hashes made with older (or test) parameters are upgraded on a successful login.
        if self.config.password_hashing.needs_rehash(stored):
            await ctx.execute("UPDATE users SET password_hash = %s WHERE id = %s",
                              (await self._hash(digest), user_id))

    # -- login handlers ---------------------------------------------------------------------

    async def _login_with_password(self, ctx: MethodContext, options: PasswordLogin
                                   ) -> dict[str, Any]:
        digest = self._digest(ctx, options.password)
        kind, value = options.user.kind_and_value
        query_key = ("account", kind, value.casefold())
        self._check_failures(query_key)
        found = await self._find_user(ctx, options.user)
        user_key = ("user", found[0]) if found else query_key
        if found:
            self._check_failures(user_key)
        stored = found[1] if found else None
        # Always one argon2 verification, found or not (timing must not reveal the user).
        matched = await self._verify(stored, digest)
        if not (found and matched):
            self._record_failure(query_key, user_key)
            if not found:
                raise self._credentials_error("User not found")
            raise self._credentials_error("Incorrect password" if stored
                                          else "User has no password set")
        assert found is not None and stored is not None
        await self._maybe_rehash(ctx, found[0], stored, digest)
        return await self._log_in(ctx, found[0], "password")

    async def _login_with_resume(self, ctx: MethodContext, options: ResumeLogin
                                 ) -> dict[str, Any]:
        hashed = hash_login_token(options.resume)
        row = await ctx.fetchone(
            "SELECT user_id, expires_at, expires_at <= now() FROM login_tokens "
            "WHERE hashed_token = %s", (hashed,))
        if row is None:
            raise MeteorError(403, LOGGED_OUT_BY_SERVER)
        user_id, expires_at, expired = row
        if expired:
            raise MeteorError(403, SESSION_EXPIRED)
        ctx.set_user_id(user_id, hashed)
        return {"id": user_id, "token": options.resume, "tokenExpires": expires_at,
                "type": "resume"}

    # -- the methods ------------------------------------------------------------------------

    def _declare_methods(self) -> None:
        methods = self.methods

        @methods.method("login")
        async def login(ctx: MethodContext, options: dict[str, Any]) -> dict[str, Any]:
            self._count_attempt(ctx)
            # Meteor runs the resume handler first, then password; each claims truthy keys.
            if options.get("resume"):
                return await self._login_with_resume(ctx, _validate(ResumeLogin, options))
            if options.get("password"):
                return await self._login_with_password(ctx, _validate(PasswordLogin, options))
            raise MeteorError(400, "Unrecognized options for login request")

        @methods.method("logout")
        async def logout(ctx: MethodContext) -> None:
            if ctx.user_id is not None and ctx.login_token_hash is not None:
                rows = await ctx.fetchall(
                    "DELETE FROM login_tokens WHERE hashed_token = %s AND user_id = %s "
                    "RETURNING hashed_token", (ctx.login_token_hash, ctx.user_id))
                ctx.revoked_tokens([r[0] for r in rows])
            ctx.set_user_id(None)

        @methods.method("createUser")
        async def create_user(ctx: MethodContext, options: dict[str, Any]) -> dict[str, Any]:
            self._count_attempt(ctx)
            if self.config.forbid_client_account_creation:
                raise MeteorError(403, "Signups forbidden")
            parsed: CreateUserOptions = _validate(CreateUserOptions, options)
            if not parsed.username and not parsed.email:
                raise MeteorError(400, "Need to set a username or email")
            if parsed.password is None:
                # Meteor's client refuses this too; a password-less signup would be a login
                # without credentials.
                raise MeteorError(400, "Must set options.password")
            digest = self._digest(ctx, parsed.password)
            user_id = await self._insert_user(ctx, parsed, await self._hash(digest))
            return await self._log_in(ctx, user_id, "password")

        @methods.method("changePassword", positional=True)
        async def change_password(ctx: MethodContext, oldPassword: PasswordInput,
                                  newPassword: PasswordInput) -> dict[str, Any]:
            user_id = ctx.user_id
            if user_id is None:
                raise MeteorError(401, "Must be logged in")
            old_digest = self._digest(ctx, oldPassword)
            new_digest = self._digest(ctx, newPassword)
            user_key = ("user", user_id)
            self._check_failures(user_key)
            stored = await ctx.fetchval(
                "SELECT password_hash FROM users WHERE id = %s FOR UPDATE", (user_id,))
            if not await self._verify(stored, old_digest):
                self._record_failure(user_key)
                raise self._credentials_error("Incorrect password")
            await ctx.execute("UPDATE users SET password_hash = %s WHERE id = %s",
                              (await self._hash(new_digest), user_id))
            # As Meteor: every other token of the user goes; this connection stays logged in.
            rows = await ctx.fetchall(
                "DELETE FROM login_tokens WHERE user_id = %s "
                "AND hashed_token IS DISTINCT FROM %s RETURNING hashed_token",
                (user_id, ctx.login_token_hash))
            ctx.revoked_tokens([r[0] for r in rows])
            return {"passwordChanged": True}

        @methods.method("getNewToken")
        async def get_new_token(ctx: MethodContext) -> dict[str, Any]:
            if ctx.user_id is None:
                raise MeteorError("You are not logged in.")
            row = await ctx.fetchone(
                "SELECT created_at, expires_at FROM login_tokens "
                "WHERE hashed_token = %s AND user_id = %s", (ctx.login_token_hash, ctx.user_id))
            if row is None:
                raise MeteorError("Invalid login token")
            # Same lifetime as the current token: a stolen token cannot extend itself.
            return await self._log_in(ctx, ctx.user_id, None, row[0], row[1])

        @methods.method("removeOtherTokens")
        async def remove_other_tokens(ctx: MethodContext) -> None:
            if ctx.user_id is None:
                raise MeteorError("You are not logged in.")
            rows = await ctx.fetchall(
                "DELETE FROM login_tokens WHERE user_id = %s "
                "AND hashed_token IS DISTINCT FROM %s RETURNING hashed_token",
                (ctx.user_id, ctx.login_token_hash))
            ctx.revoked_tokens([r[0] for r in rows])

    async def _insert_user(self, ctx: MethodContext, options: CreateUserOptions,
                           password_hash: str) -> str:
        if options.username and await ctx.fetchval(
                "SELECT 1 FROM users WHERE lower(username) = lower(%s)", (options.username,)):
            raise self._credentials_error("Username already exists.")
        if options.email and await ctx.fetchval(
                "SELECT 1 FROM user_emails WHERE lower(address) = lower(%s)", (options.email,)):
            raise self._credentials_error("Email already exists.")
        user_id = new_user_id()
        emails = [{"address": options.email, "verified": False}] if options.email else []
        try:
            await ctx.execute(
                "INSERT INTO users (id, username, emails, profile, password_hash) "
                "VALUES (%s, %s, %s, %s, %s)",
                (user_id, options.username, Jsonb(emails),
                 None if options.profile is None else Jsonb(options.profile), password_hash))
            if options.email:
                await ctx.execute("INSERT INTO user_emails (user_id, address) VALUES (%s, %s)",
                                  (user_id, options.email))
        except psycopg.errors.UniqueViolation as exc:
            # A concurrent signup took the name between the check and the insert.
            constraint = exc.diag.constraint_name or ""
            what = "Email" if "email" in constraint else "Username"
            raise self._credentials_error(f"{what} already exists.") from None
        return user_id


def current_user_publication() -> Publication:
    """The universal publication of the logged-in user's ``username``, ``emails``, ``profile``
    (collection ``users``), as Meteor's accounts-base publishes it; nothing for anonymous
    connections."""
    return Publication(
        "",
        Cursor("users", collection="users", fields=["username", "emails", "profile"],
               filter=C("id") == UserId()),
        universal=True)


async def purge_expired_tokens(database: Database) -> int:
    """Delete expired resume tokens (run periodically, as Meteor's expireTokens does)."""
    def go(conn: psycopg.Connection[Any]) -> int:
        return conn.execute("DELETE FROM login_tokens WHERE expires_at <= now()").rowcount
    return await database.run(go)
