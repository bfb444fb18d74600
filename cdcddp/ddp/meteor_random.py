"""Meteor-compatible seeded random values: the Alea PRNG and DDP random streams.

A Meteor client that calls a method which inserts a document generates the document's id
locally (latency compensation) from the method's ``randomSeed``; the server must derive the
*same* id from the same seed, or the client sees its optimistic document replaced by another.
Meteor's ``random`` package draws seeded values from Johannes Baagøe's Alea generator, and
``DDPCommon.RandomStream`` keys independent sequences by scope name:
``Random.createWithSeeds(randomSeed, "/collection/" + name)``. This module reproduces both
bit for bit; the test suite checks it against Meteor's own package run under node.

Everything here is pure float arithmetic on IEEE doubles, which Python and JavaScript share,
so the only care needed is mirroring JavaScript's integer conversions (``>>> 0``, ``| 0``)
and ``String.prototype.charCodeAt`` (UTF-16 code units).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "BASE64_CHARS",
    "HEX_CHARS",
    "UNMISTAKABLE_CHARS",
    "Alea",
    "RandomGenerator",
    "RandomStream",
    "SeedValue",
    "create_with_seeds",
    "random_id",
]

UNMISTAKABLE_CHARS = "23456789ABCDEFGHJKLMNPQRSTWXYZabcdefghijkmnopqrstuvwxyz"
BASE64_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"
HEX_CHARS = "0123456789abcdef"


def random_id(length: int = 17) -> str:
    """A Meteor ``Random.id()`` from the OS's secure source: ``length`` characters of the
    unmistakable alphabet, uniform. One draw for the whole id (a draw per character cost a
    system call each: half a millisecond per new connection here)."""
    n = secrets.randbelow(len(UNMISTAKABLE_CHARS) ** length)
    chars = []
    for _ in range(length):
        n, digit = divmod(n, len(UNMISTAKABLE_CHARS))
        chars.append(UNMISTAKABLE_CHARS[digit])
    return "".join(chars)


_TWO_POW_32 = 4294967296.0
_TWO_POW_MINUS_32 = 2.3283064365386963e-10
_MASH_SEED = float(0xEFC8249D)

# A seed value is stringified the way JavaScript's toString would; these are the types whose
# JavaScript string form this module reproduces exactly.
SeedValue = str | int | bool

T = TypeVar("T")


def _js_string(value: SeedValue) -> str:
    """The string JavaScript's ``value.toString()`` produces, for the supported types."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        # Beyond 1e21 JavaScript switches to exponent notation; never needed for DDP seeds.
        if abs(value) >= 10**21:
            raise ValueError(f"integer seed too large to stringify like JavaScript: {value}")
        return str(value)
    if isinstance(value, str):
        return value
    raise TypeError(f"unsupported seed type {type(value).__name__} (use str, int or bool)")


def _utf16_code_units(text: str) -> list[int]:
    """The values ``charCodeAt(i)`` returns for each i: astral characters count twice."""
    raw = text.encode("utf-16-le", "surrogatepass")
    return [raw[i] | (raw[i + 1] << 8) for i in range(0, len(raw), 2)]


def _to_uint32(x: float) -> int:
    """JavaScript ``x >>> 0`` for finite x."""
    return math.trunc(x) % 0x100000000


class _Mash:
    """Baagøe's Mash hash. Its state persists across calls, so one instance hashes all seeds."""

    __slots__ = ("_n",)

    def __init__(self) -> None:
        self._n = _MASH_SEED

    def __call__(self, value: SeedValue) -> float:
        n = self._n
        for code_unit in _utf16_code_units(_js_string(value)):
            n += code_unit
            h = 0.02519603282416938 * n
            n = float(_to_uint32(h))
            h -= n
            h *= n
            n = float(_to_uint32(h))
            h -= n
            n += h * _TWO_POW_32
        self._n = n
        return _to_uint32(n) * _TWO_POW_MINUS_32


class Alea:
    """Alea 0.9: three fractional states and an integer carry; each call returns a fraction."""

    __slots__ = ("_c", "_s0", "_s1", "_s2")

    def __init__(self, seeds: Sequence[SeedValue]) -> None:
        if not seeds:
            # Meteor would seed from the clock; a silent unseeded stream defeats the purpose.
            raise ValueError("Alea needs at least one seed")
        mash = _Mash()
        s0 = mash(" ")
        s1 = mash(" ")
        s2 = mash(" ")
        for seed in seeds:
            s0 -= mash(seed)
            if s0 < 0:
                s0 += 1
            s1 -= mash(seed)
            if s1 < 0:
                s1 += 1
            s2 -= mash(seed)
            if s2 < 0:
                s2 += 1
        self._s0, self._s1, self._s2 = s0, s1, s2
        self._c = 1

    def __call__(self) -> float:
        t = 2091639 * self._s0 + self._c * _TWO_POW_MINUS_32
        self._s0 = self._s1
        self._s1 = self._s2
        # JavaScript's `t | 0`; t is positive and below 2**31, so truncation is exact.
        self._c = math.trunc(t)
        self._s2 = t - self._c
        return self._s2


class RandomGenerator:
    """Meteor's ``RandomGenerator`` API over a seeded Alea (``Random.createWithSeeds``)."""

    __slots__ = ("_alea",)

    def __init__(self, *seeds: SeedValue) -> None:
        self._alea = Alea(seeds)

    def fraction(self) -> float:
        """A number in [0, 1), like ``Math.random``."""
        return self._alea()

    def choice(self, items: Sequence[T]) -> T:
        """One element of a non-empty sequence (or one character of a string)."""
        return items[math.floor(self.fraction() * len(items))]

    def _random_string(self, length: int, alphabet: str) -> str:
        return "".join(self.choice(alphabet) for _ in range(length))

    def id(self, length: int = 17) -> str:
        """A Meteor document id: 17 characters ≈ 96 bits, Alea's whole state."""
        return self._random_string(length, UNMISTAKABLE_CHARS)

    def secret(self, length: int = 43) -> str:
        return self._random_string(length, BASE64_CHARS)

    def hex_string(self, digits: int) -> str:
        return self._random_string(digits, HEX_CHARS)


def create_with_seeds(*seeds: SeedValue) -> RandomGenerator:
    """Meteor's ``Random.createWithSeeds(...seeds)``."""
    return RandomGenerator(*seeds)


class RandomStream:
    """``DDPCommon.RandomStream``: independent named sequences derived from one method seed.

    The sequence for scope ``name`` is ``createWithSeeds(*seed, name)`` and is created once,
    so successive draws in one method call (several inserts into one collection) continue the
    same sequence, exactly as on the client that simulated the call.
    """

    __slots__ = ("_sequences", "seed")

    def __init__(self, seed: SeedValue | Sequence[SeedValue] | None = None) -> None:
        if seed is None or seed == "":
            # Meteor's randomToken(): unpredictable, so ids are simply not reproducible.
            seed = secrets.token_hex(10)
        # JavaScript's `[].concat(seed)`: a list is used as-is, a single value is wrapped.
        self.seed: tuple[SeedValue, ...] = (seed,) if isinstance(seed, str | int) else tuple(seed)
        self._sequences: dict[str, RandomGenerator] = {}

    def generator(self, scope: str) -> RandomGenerator:
        """The persistent sequence for ``scope`` (Meteor: ``_sequence(name)``)."""
        sequence = self._sequences.get(scope)
        if sequence is None:
            sequence = RandomGenerator(*self.seed, scope)
            self._sequences[scope] = sequence
        return sequence

    def id_for_collection(self, collection: str) -> str:
        """The next id Meteor's ``collection.insert`` draws inside this method call."""
        return self.generator("/collection/" + collection).id()

    def object_id_hex_for_collection(self, collection: str) -> str:
        """The next id for a collection with ``idGeneration: 'MONGO'`` (ObjectID hex)."""
        return self.generator("/collection/" + collection).hex_string(24)

    def rpc_seed(self, method_name: str) -> str:
        """Meteor's ``makeRpcSeed``: the randomSeed of a method called from inside this one."""
        return self.generator("/rpc/" + method_name).hex_string(20)
