"""The pure cores of accounts: the rate limiter and password/token cryptography."""

from __future__ import annotations

import base64
import hashlib

from cdcddp.methods.context import is_loopback_address
from cdcddp.methods.passwords import (
    DEFAULT_HASHING,
    digest_of_plain,
    hash_login_token,
    new_login_token,
    new_user_id,
)
from cdcddp.methods.ratelimit import SlidingWindowLimiter, too_many_requests
from tests.methods_support import FAST_HASHING


def test_sliding_window() -> None:
    limiter = SlidingWindowLimiter(limit=2, window=10)
    assert limiter.hit("k", 0).allowed and limiter.hit("k", 1).allowed
    refused = limiter.hit("k", 2)
    assert not refused.allowed and refused.time_to_reset == 8  # the event at 0 leaves at 10
    assert limiter.hit("other", 2).allowed  # keys are independent
    assert limiter.hit("k", 10.5).allowed  # the first event left the window
    assert not limiter.check("k", 10.6).allowed
    limiter.sweep(100)
    assert len(limiter) == 0  # expired keys are dropped
    limiter.record("f", 0)
    limiter.record("f", 0)
    limiter.record("f", 0)
    assert not limiter.check("f", 5).allowed and limiter.check("f", 10).allowed
    error = too_many_requests(refused)
    assert (error.error, error.details) == ("too-many-requests", {"timeToReset": 8000})
    assert error.reason == ("Error, too many requests. Please slow down. "
                            "You must wait 8 seconds before trying again.")


def test_default_argon2_is_owasp_level() -> None:
    # OWASP: argon2id with at least m=19 MiB, t=2, p=1 (or m=46 MiB, t=1).
    assert DEFAULT_HASHING.memory_cost_kib >= 19 * 1024 and DEFAULT_HASHING.time_cost >= 2
    assert DEFAULT_HASHING.memory_cost_kib * DEFAULT_HASHING.time_cost >= 19 * 1024 * 2


def test_password_hash_and_verify() -> None:
    digest = digest_of_plain("correct horse")
    assert digest == hashlib.sha256(b"correct horse").hexdigest()
    stored = FAST_HASHING.hash(digest)
    assert stored.startswith("$argon2id$") and digest not in stored
    assert FAST_HASHING.verify(stored, digest)
    assert FAST_HASHING.verify(stored, digest.upper())  # hex case does not matter
    assert not FAST_HASHING.verify(stored, digest_of_plain("wrong"))
    assert not FAST_HASHING.verify(None, digest)  # no password: never a match
    assert not FAST_HASHING.verify("garbage", digest)
    assert FAST_HASHING.hash(digest) != stored  # salted


def test_tokens_and_ids() -> None:
    token = new_login_token()
    assert len(token) == 43 and token != new_login_token()
    expected = base64.b64encode(hashlib.sha256(token.encode()).digest()).decode()
    assert hash_login_token(token) == expected  # Meteor's Accounts._hashLoginToken
    assert len(new_user_id()) == 17


def test_loopback_detection() -> None:
    assert is_loopback_address("127.0.0.1") and is_loopback_address("::1")
    assert is_loopback_address("::ffff:127.0.0.1")
    assert not is_loopback_address("10.0.0.1") and not is_loopback_address(None)
    assert not is_loopback_address("localhost")  # names are not trusted, addresses only
