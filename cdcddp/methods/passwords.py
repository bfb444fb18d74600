"""Password and login-token cryptography (pure: no I/O, no clock).

Meteor's wire protocol sends a password either as ``{digest: sha256-hex, algorithm: "sha-256"}``
(what the Meteor client always sends) or as the plain string, which the server hashes with
SHA-256 first. Either way the *digest* is the secret the server works with. It is stored only
as an argon2id hash of the digest (never the digest itself, which is a password equivalent).

Resume ("login") tokens are 43 random characters like Meteor's ``Random.secret()``; the database
holds only ``base64(sha256(token))``, Meteor's ``hashedToken``, so a leaked table cannot be
replayed.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cdcddp.ddp.meteor_random import BASE64_CHARS, UNMISTAKABLE_CHARS

__all__ = [
    "DEFAULT_HASHING",
    "MAX_PLAIN_PASSWORD_LENGTH",
    "PasswordHashing",
    "digest_of_plain",
    "hash_login_token",
    "is_sha256_hex",
    "new_login_token",
    "new_user_id",
]

# Meteor: `passwordMaxLength` defaults to 256 characters for plain-text passwords.
MAX_PLAIN_PASSWORD_LENGTH: Final = 256
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


def digest_of_plain(password: str) -> str:
    """Meteor's ``SHA256(password)``: lowercase hex of the UTF-8 bytes."""
    return hashlib.sha256(password.encode("utf-8")).hexdigest()


def is_sha256_hex(text: str) -> bool:
    return _SHA256_HEX.fullmatch(text) is not None


def new_login_token() -> str:
    """A resume token: 43 characters of Meteor's base64 alphabet (~258 bits), like
    ``Random.secret()``, from the OS CSPRNG."""
    return "".join(secrets.choice(BASE64_CHARS) for _ in range(43))


def hash_login_token(token: str) -> str:
    """Meteor's ``Accounts._hashLoginToken``: base64 of the SHA-256 of the token."""
    return base64.b64encode(hashlib.sha256(token.encode("utf-8")).digest()).decode("ascii")


def new_user_id() -> str:
    """A Meteor-style 17-character document id from the OS CSPRNG.

    Not drawn from the method's random stream: the client never simulates user creation,
    and a user id must not be predictable from a seed the client chose.
    """
    return "".join(secrets.choice(UNMISTAKABLE_CHARS) for _ in range(17))


@dataclass(frozen=True)
class PasswordHashing:
    """argon2id parameters. The default is RFC 9106's second recommended option
    (t=3, m=64 MiB, p=4), above OWASP's minimum (m=19 MiB, t=2, p=1).

    Tests may pass cheaper parameters; stored hashes carry their own parameters, so hashes
    made with other settings still verify (and are flagged for rehashing on the next login).
    """

    time_cost: int = 3
    memory_cost_kib: int = 65536
    parallelism: int = 4
    hash_len: int = 32
    salt_len: int = 16

    @cached_property
    def _hasher(self) -> argon2.PasswordHasher:
        return argon2.PasswordHasher(
            time_cost=self.time_cost, memory_cost=self.memory_cost_kib,
            parallelism=self.parallelism, hash_len=self.hash_len, salt_len=self.salt_len,
            type=argon2.Type.ID)

    @cached_property
    def _dummy_hash(self) -> str:
        # Verified against when the user is unknown or has no password, so that every failed
        # login costs one argon2 verification and timing does not reveal whether a user exists.
        return self._hasher.hash(secrets.token_hex(32))

    def hash(self, digest: str) -> str:
        """``$argon2id$...`` of a SHA-256 hex digest (CPU-heavy: call from a worker thread)."""
        return self._hasher.hash(_normalise_digest(digest))

    def verify(self, stored_hash: str | None, digest: str) -> bool:
        """Does ``digest`` match ``stored_hash``? Always does the argon2 work, even when there
        is no stored hash (then against a dummy hash, and the answer is False)."""
        candidate = _normalise_digest(digest)
        target = stored_hash if stored_hash else self._dummy_hash
        try:
            matched = self._hasher.verify(target, candidate)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            matched = False
        return matched and bool(stored_hash)  # the dummy never counts as a match

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, ValueError):
            return True

    def warm_up(self) -> None:
        """Compute the dummy hash now (otherwise the first failed login pays for it)."""
        _ = self._dummy_hash


def _normalise_digest(digest: str) -> str:
    # The same password must hash the same whatever the case of the client's hex digits.
    if not is_sha256_hex(digest):
        raise ValueError("not a SHA-256 hex digest")
    return digest.lower()


DEFAULT_HASHING: Final = PasswordHashing()
