"""A sliding-window rate limiter (pure: the caller passes the time).

Each key (a connection id, a user name...) may have at most ``limit`` events in any window of
``window`` seconds. ``hit`` records an event and says whether it was allowed; ``check`` asks
without recording (used to refuse before doing expensive work, recording only failures).
Memory is bounded by the events inside one window per key; keys whose events all expired are
dropped by ``sweep``, which ``hit`` runs now and then.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from cdcddp.ddp.messages import MeteorError

__all__ = ["RateDecision", "SlidingWindowLimiter", "too_many_requests"]


@dataclass(frozen=True, slots=True)
class RateDecision:
    allowed: bool
    time_to_reset: float  # seconds until one more event would be allowed (0 when allowed)


class SlidingWindowLimiter:
    def __init__(self, limit: int, window: float, sweep_every: int = 1024) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.limit = limit
        self.window = window
        self._events: dict[Hashable, deque[float]] = {}
        self._sweep_every = sweep_every
        self._hits_since_sweep = 0

    def _live(self, key: Hashable, now: float) -> deque[float] | None:
        events = self._events.get(key)
        if events is None:
            return None
        horizon = now - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
            return None
        return events

    def check(self, key: Hashable, now: float) -> RateDecision:
        events = self._live(key, now)
        if events is None or len(events) < self.limit:
            return RateDecision(True, 0.0)
        # The oldest event that must leave the window before one more fits.
        blocking = events[len(events) - self.limit]
        return RateDecision(False, max(0.0, blocking + self.window - now))

    def hit(self, key: Hashable, now: float) -> RateDecision:
        """Record an event if it is allowed; a refused event is not recorded (so a client that
        keeps hammering is not locked out forever, only for the rest of the window)."""
        self._hits_since_sweep += 1
        if self._hits_since_sweep >= self._sweep_every:
            self.sweep(now)
        decision = self.check(key, now)
        if decision.allowed:
            self._events.setdefault(key, deque()).append(now)
        return decision

    def record(self, key: Hashable, now: float) -> None:
        """Record an event unconditionally (e.g. a failed login, counted after the fact)."""
        self._live(key, now)
        self._events.setdefault(key, deque()).append(now)
        if len(self._events[key]) > self.limit:
            self._events[key].popleft()  # only the newest `limit` events can matter

    def forget(self, key: Hashable) -> None:
        self._events.pop(key, None)

    def sweep(self, now: float) -> None:
        self._hits_since_sweep = 0
        for key in list(self._events):
            self._live(key, now)

    def __len__(self) -> int:
        return len(self._events)


def too_many_requests(decision: RateDecision) -> MeteorError:
    """Meteor's DDPRateLimiter error: code ``too-many-requests``, ``timeToReset`` in ms."""
    ms: Any = math.ceil(decision.time_to_reset * 1000)
    seconds = math.ceil(decision.time_to_reset)
    return MeteorError(
        "too-many-requests",
        "Error, too many requests. Please slow down. You must wait "
        f"{seconds} seconds before trying again.",
        {"timeToReset": ms})
