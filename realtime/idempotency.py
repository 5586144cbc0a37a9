"""Idempotency keys: a caller-given id is delivered once within a window, across nodes.

The ``IdempotencyStore`` Protocol, its error and ``MemoryIdempotencyStore``; the Redis
implementation is ``RedisIdempotencyStore`` (redis_idempotency.py).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable
from typing import Protocol

from realtime.backend import BackendUnavailable

__all__ = ["IdempotencyStore", "IdempotencyUnavailable", "MemoryIdempotencyStore"]


class IdempotencyUnavailable(BackendUnavailable):
    """The idempotency store cannot answer now: nothing is known to be claimed (503)."""


class IdempotencyStore(Protocol):
    """Claims on idempotency keys (checked by tests/test_idempotency.py for every implementation).

    - ``claim_many(keys, ttl)`` returns one bool per key, in order: True when this is
      the first claim of the key within ``ttl`` seconds (the caller may deliver), False
      for a key already claimed (a duplicate; also a key repeated within ``keys``).
    - ``release_many(keys)`` undoes claims (the publish they guarded failed), so a
      retry with the same keys is delivered. Unknown keys are ignored.
    - Both raise ``IdempotencyUnavailable`` when the store cannot answer; then nothing is
      known to be claimed and the caller must not deliver.
    - ``close()`` releases connections; the store is not used afterwards.
    """

    async def claim_many(self, keys: list[str], ttl: float) -> list[bool]: ...

    async def release_many(self, keys: list[str]) -> None: ...

    async def close(self) -> None: ...


class MemoryIdempotencyStore:
    """One node's claims, bounded by ``max_entries``.

    At the bound, the claims that expire soonest are evicted first (a duplicate of an
    evicted key within its window is delivered again). Memory is O(live claims).
    """

    def __init__(
        self, max_entries: int = 100_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []  # (expiry, key); stale items skipped lazily

    def __len__(self) -> int:
        return len(self._expiry)

    async def claim_many(self, keys: list[str], ttl: float) -> list[bool]:
        return self.claim_now(keys, ttl, self._clock())

    def claim_now(self, keys: list[str], ttl: float, now: float) -> list[bool]:
        """``claim_many`` at time ``now`` (sans-I/O)."""
        self._expire(now)
        results: list[bool] = []
        for key in keys:
            if key in self._expiry:
                results.append(False)
                continue
            while len(self._expiry) >= self._max:
                self._evict_one()
            expiry = now + ttl
            self._expiry[key] = expiry
            heapq.heappush(self._heap, (expiry, key))
            results.append(True)
        self._compact()
        return results

    async def release_many(self, keys: list[str]) -> None:
        for key in keys:
            self._expiry.pop(key, None)
        self._compact()

    async def close(self) -> None:
        self._expiry.clear()
        self._heap.clear()

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            expiry, key = heapq.heappop(heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]

    def _evict_one(self) -> None:
        while self._heap:
            expiry, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expiry:
                del self._expiry[key]
                return

    def _compact(self) -> None:
        # Released keys leave stale heap items: rebuild when they are the majority.
        if len(self._heap) > 2 * len(self._expiry) + 64:
            self._heap = [(expiry, key) for key, expiry in self._expiry.items()]
            heapq.heapify(self._heap)
