"""Exact per-key rate limits: at most ``limit`` hits in ANY sliding window (a log, not GCRA).

GCRA or a token bucket with a burst of ``limit`` lets nearly twice the limit
through within one minute; "60 commands per minute" is exact here: the times of
the counted hits are kept (only the newest ``limit`` of them matter).

The ``RateLimiter`` Protocol, its error, ``Decision``, ``SlidingWindowLog`` and
``MemoryRateLimiter``; the Redis implementation is ``RedisRateLimiter`` (redis_ratelimit.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from realtime.backend import BackendUnavailable

__all__ = [
    "Decision",
    "MemoryRateLimiter",
    "RateLimitUnavailable",
    "RateLimiter",
    "SlidingWindowLog",
]


class RateLimitUnavailable(BackendUnavailable):
    """The rate limiter cannot answer now (callers fail open)."""


@dataclass(frozen=True, slots=True)
class Decision:
    """``allowed``, else ``retry_after`` seconds until one more hit fits (0.0 when allowed)."""

    allowed: bool
    retry_after: float


class SlidingWindowLog:
    """Sans-I/O sliding-window log of one key: ``hit(now)`` decides and records.

    A hit at ``now`` is allowed when fewer than ``limit`` counted hits lie in
    ``(now - window, now]``; refused hits are not counted. ``retry_after`` of a
    refusal is when the hit that keeps it out (the ``limit``-th newest) leaves the
    window. ``limit`` / ``window`` may be changed between hits and apply at once.
    Memory: at most ``limit`` timestamps (older ones can never decide again).
    """

    __slots__ = ("_hits", "limit", "window")

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        # A list, not a deque: a deque's first block is ~600 bytes, and there is a log per
        # user; dropping from the front moves at most ``limit`` pointers.
        self._hits: list[float] = []

    def __len__(self) -> int:
        return len(self._hits)

    def hit(self, now: float) -> Decision:
        hits = self._hits
        horizon = now - self.window
        expired = 0
        for at in hits:
            if at > horizon:
                break
            expired += 1
        if expired:
            del hits[:expired]
        limit = self.limit
        if len(hits) > limit:  # a lowered limit: only the newest `limit` hits matter
            del hits[: len(hits) - max(limit, 0)]
        if len(hits) < limit:
            hits.append(now)
            return Decision(True, 0.0)
        if limit <= 0:
            return Decision(False, self.window)
        return Decision(False, max(0.0, hits[0] + self.window - now))

    def idle_at(self) -> float:
        """The time from which this log no longer counts any hit (it may be dropped)."""
        return self._hits[-1] + self.window if self._hits else float("-inf")


class RateLimiter(Protocol):
    """Per-key limits shared by every node using the limiter.

    Contract (tests/test_ratelimit.py, against every implementation): ``hit(key,
    limit, window)`` allows at most ``limit`` hits of ``key`` in any ``window``
    seconds; a refused hit is not counted and its ``retry_after`` (seconds) is
    truthful: a hit that long later is allowed (if nothing else hit the key). A
    changed ``limit`` (tier change) applies to the next hit. Raises
    ``RateLimitUnavailable`` when the backend cannot answer. ``close()`` releases it.
    """

    async def hit(self, key: str, limit: int, window: float = 60.0) -> Decision: ...

    async def close(self) -> None: ...


class MemoryRateLimiter:
    """One node's limiter: a ``SlidingWindowLog`` per key.

    Bounded: a log holds at most ``limit`` entries and a key idle for its window
    is dropped (keys are kept in last-hit order; idle ones are dropped on each hit).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._logs: OrderedDict[str, SlidingWindowLog] = OrderedDict()

    def __len__(self) -> int:
        return len(self._logs)

    async def hit(self, key: str, limit: int, window: float = 60.0) -> Decision:
        return self.hit_at(key, limit, window, self._clock())

    def hit_at(self, key: str, limit: int, window: float, now: float) -> Decision:
        """``hit`` at time ``now`` (sans-I/O)."""
        logs = self._logs
        log = logs.get(key)
        if log is None:
            log = logs[key] = SlidingWindowLog(limit, window)
        else:
            log.limit = limit
            log.window = window
            logs.move_to_end(key)
        decision = log.hit(now)
        while logs:
            oldest_key, oldest = next(iter(logs.items()))
            if oldest_key == key or oldest.idle_at() > now:
                break
            del logs[oldest_key]
        return decision

    async def close(self) -> None:
        self._logs.clear()
