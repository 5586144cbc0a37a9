"""Who is connected: each user's connections across nodes, and the user's last known tier.

The ``ConnectionRegistry`` Protocol, its error and ``MemoryConnectionRegistry``; the Redis
implementation is ``RedisConnectionRegistry`` (redis_presence.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from realtime.backend import BackendUnavailable

__all__ = [
    "DEFAULT_TTL",
    "TIER_TTL",
    "ConnectionRegistry",
    "MemoryConnectionRegistry",
    "PresenceUnavailable",
]

#: Seconds a connection entry lives without a heartbeat (a dead node's entries expire).
DEFAULT_TTL = 20.0
#: Seconds a user's last tier is remembered (push rules while the app is closed).
TIER_TTL = 30 * 86_400.0


class PresenceUnavailable(BackendUnavailable):
    """The connection registry cannot answer now."""


class ConnectionRegistry(Protocol):
    """The connections of each user, counted across every node sharing the registry.

    Contract (tests/test_presence.py, against every implementation):

    - ``add(user, conn_id)`` registers a connection and returns the user's count of
      live connections now, this one included (atomic: two concurrent adds of one
      user on two nodes never both see the same count).
    - ``remove(user, conn_id)`` forgets it; unknown ones are ignored.
    - ``refresh(entries)`` is a node's heartbeat for its live ``(user, conn_id)``
      pairs (re-adding any that expired); an entry not added or refreshed for ``ttl``
      seconds (a dead node's) no longer counts.
    - ``set_tier`` / ``tier_of``: the user's last known tier name (kept ``TIER_TTL``), or None.
    - Raises ``PresenceUnavailable`` when the backend cannot answer; ``close()`` releases it.
    """

    async def add(self, user: str, conn_id: str) -> int: ...

    async def remove(self, user: str, conn_id: str) -> None: ...

    async def refresh(self, entries: list[tuple[str, str]]) -> None: ...

    async def set_tier(self, user: str, tier: str) -> None: ...

    async def tier_of(self, user: str) -> str | None: ...

    async def close(self) -> None: ...


class MemoryConnectionRegistry:
    """One node's registry.

    Bounded: expired entries are dropped on ``add`` (that user) and ``refresh`` (all);
    tiers are kept for at most ``max_tiers`` users (the least recently set is dropped).
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        max_tiers: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_tiers = max_tiers
        self._clock = clock
        self._conns: dict[str, dict[str, float]] = {}  # user -> conn_id -> expiry
        self._tiers: OrderedDict[str, tuple[str, float]] = OrderedDict()  # user -> tier, expiry

    async def add(self, user: str, conn_id: str) -> int:
        now = self._clock()
        conns = self._conns.setdefault(user, {})
        for expired in [cid for cid, expiry in conns.items() if expiry <= now]:
            del conns[expired]
        conns[conn_id] = now + self.ttl
        return len(conns)

    async def remove(self, user: str, conn_id: str) -> None:
        conns = self._conns.get(user)
        if conns is not None:
            conns.pop(conn_id, None)
            if not conns:
                del self._conns[user]

    async def refresh(self, entries: list[tuple[str, str]]) -> None:
        now = self._clock()
        for user in list(self._conns):
            conns = self._conns[user]
            for expired in [cid for cid, expiry in conns.items() if expiry <= now]:
                del conns[expired]
            if not conns:
                del self._conns[user]
        for user, conn_id in entries:
            self._conns.setdefault(user, {})[conn_id] = now + self.ttl

    async def set_tier(self, user: str, tier: str) -> None:
        self._tiers[user] = (tier, self._clock() + TIER_TTL)
        self._tiers.move_to_end(user)
        while len(self._tiers) > self.max_tiers:
            self._tiers.popitem(last=False)

    async def tier_of(self, user: str) -> str | None:
        entry = self._tiers.get(user)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._tiers[user]
            return None
        return entry[0]

    async def close(self) -> None:
        self._conns.clear()
        self._tiers.clear()
