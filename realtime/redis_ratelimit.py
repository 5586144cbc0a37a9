"""``RedisRateLimiter``: the RateLimiter (ratelimit.py) shared by every node."""

from __future__ import annotations

import os
from itertools import count

from realtime.ratelimit import Decision, RateLimitUnavailable
from realtime.redis_client import RedisTarget, lua_script, make_client, redis_errors

__all__ = ["RedisRateLimiter"]

KEY_PREFIX = "rt:rl:"
# realtime/lua/ratelimit_hit.lua says its KEYS, ARGV and reply.
_HIT = lua_script("ratelimit_hit.lua")


class RedisRateLimiter:
    """The limiter shared by every node: one Lua script per hit (atomic, on Redis's clock).

    A ZSET per key (``rt:rl:<key>``) of at most ``limit`` hits, ``PEXPIRE`` = window.
    Members are unique per limiter instance and hit, so two nodes never collide.
    """

    def __init__(self, url: str | RedisTarget, *, timeout: float = 5.0) -> None:
        self._client = make_client(url, timeout=timeout)
        self._script = self._client.register_script(_HIT)
        self._node = os.urandom(6).hex()
        self._seq = count()

    async def hit(self, key: str, limit: int, window: float = 60.0) -> Decision:
        member = f"{self._node}:{next(self._seq)}"
        args: list[int | str] = [limit, max(1, round(window * 1_000_000)), member]
        with redis_errors("rate limit", RateLimitUnavailable):
            allowed, retry_us = await self._script(keys=[KEY_PREFIX + key], args=args)
        if allowed:
            return Decision(True, 0.0)
        return Decision(False, max(0.0, int(retry_us) / 1_000_000))

    async def close(self) -> None:
        await self._client.aclose()
