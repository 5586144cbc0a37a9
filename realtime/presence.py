"""Who is connected: each user's connections across nodes, and the user's last known tier."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from realtime.redis_broker import make_client, redis_errors

__all__ = [
    "DEFAULT_TTL",
    "TIER_TTL",
    "ConnectionRegistry",
    "MemoryConnectionRegistry",
    "RedisConnectionRegistry",
]

#: Seconds a connection entry lives without a heartbeat (a dead node's entries expire).
DEFAULT_TTL = 90.0
#: Seconds a user's last tier is remembered (push rules while the app is closed).
TIER_TTL = 30 * 86_400.0
CONNS_PREFIX = "rt:presence:"
TIER_PREFIX = "rt:tier:"
_REFRESH_CHUNK = 500  # entries per script call


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
    - Raises ``BrokerUnavailable`` when the backend cannot answer; ``close()`` releases it.
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


# KEYS[1]: the user's ZSET (member conn_id, score expiry in ms on Redis's clock).
# ARGV: conn_id, ttl ms. Drops expired entries, adds, counts: atomically.
_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return redis.call('ZCARD', KEYS[1])
"""
# KEYS: users' ZSETs; ARGV[1]: ttl ms, ARGV[i + 1]: the conn_id for KEYS[i].
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
end
return #KEYS
"""


class RedisConnectionRegistry:
    """The registry shared by every node.

    ``rt:presence:<user>``: a ZSET of conn ids scored by expiry (Redis's clock, so
    node clocks do not matter), expiring with its newest entry; ``add`` is one Lua
    script (drop expired, add, count). ``rt:tier:<user>``: the tier, ``TIER_TTL``.
    """

    def __init__(self, url: str, *, ttl: float = DEFAULT_TTL, timeout: float = 5.0) -> None:
        self.ttl = ttl
        self._ttl_ms = max(1, round(ttl * 1000))
        self._client = make_client(url, timeout=timeout)
        self._add = self._client.register_script(_ADD)
        self._refresh = self._client.register_script(_REFRESH)

    async def add(self, user: str, conn_id: str) -> int:
        with redis_errors("presence add"):
            count = await self._add(keys=[CONNS_PREFIX + user], args=[conn_id, self._ttl_ms])
        return int(count)

    async def remove(self, user: str, conn_id: str) -> None:
        with redis_errors("presence remove"):
            await self._client.zrem(CONNS_PREFIX + user, conn_id)

    async def refresh(self, entries: list[tuple[str, str]]) -> None:
        for start in range(0, len(entries), _REFRESH_CHUNK):
            chunk = entries[start : start + _REFRESH_CHUNK]
            args: list[str | int] = [self._ttl_ms, *(conn_id for _, conn_id in chunk)]
            with redis_errors("presence refresh"):
                await self._refresh(keys=[CONNS_PREFIX + user for user, _ in chunk], args=args)

    async def set_tier(self, user: str, tier: str) -> None:
        with redis_errors("presence set_tier"):
            await self._client.set(TIER_PREFIX + user, tier, px=round(TIER_TTL * 1000))

    async def tier_of(self, user: str) -> str | None:
        with redis_errors("presence tier_of"):
            value = await self._client.get(TIER_PREFIX + user)
        return value.decode() if isinstance(value, bytes) else None

    async def close(self) -> None:
        await self._client.aclose()
