"""``RedisRateLimiter``: the RateLimiter (ratelimit.py) shared by every node."""

from __future__ import annotations

import hashlib
import os
from itertools import count
from typing import Protocol

from realtime.broker import BrokerUnavailable
from realtime.ratelimit import Decision, RateLimitUnavailable
from realtime.redis_client import RedisTarget, lua_script, make_client, redis_errors
from realtime.resp import RedisReplyError

__all__ = ["RedisRateLimiter"]

KEY_PREFIX = "rt:rl:"
# realtime/lua/ratelimit_hit.lua says its KEYS, ARGV and reply.
_HIT = lua_script("ratelimit_hit.lua")
_HIT_SOURCE = _HIT.encode()
_HIT_SHA = hashlib.sha1(_HIT_SOURCE).hexdigest().encode()


class Commands(Protocol):
    """A broker's pipelined command connection (``RedisBroker.command``)."""

    async def command(self, *args: bytes, timeout: float | None = None) -> object: ...


class RedisRateLimiter:
    """The limiter shared by every node: one Lua script per hit (atomic, on Redis's clock).

    A ZSET per key (``rt:rl:<key>``) of at most ``limit`` hits, ``PEXPIRE`` = window.
    Members are unique per limiter instance and hit, so two nodes never collide.

    With a ``broker``, the script runs on the broker's pipelined command connection
    (EVALSHA, EVAL after NOSCRIPT; on a cluster, on the master of the key's slot): a hit
    shares a write and a wake-up with the history read of a resume. Without one, on a
    redis-py client of its own.
    """

    def __init__(
        self, url: str | RedisTarget, *, timeout: float = 5.0, broker: Commands | None = None
    ) -> None:
        self._broker = broker
        self._timeout = timeout
        self._client = make_client(url, timeout=timeout) if broker is None else None
        self._script = self._client.register_script(_HIT) if self._client is not None else None
        self._node = os.urandom(6).hex()
        self._seq = count()

    async def hit(self, key: str, limit: int, window: float = 60.0) -> Decision:
        member = f"{self._node}:{next(self._seq)}"
        args: list[int | str] = [limit, max(1, round(window * 1_000_000)), member]
        if self._script is None:
            allowed, retry_us = await self._run(KEY_PREFIX + key, args)
        else:
            with redis_errors("rate limit", RateLimitUnavailable):
                allowed, retry_us = await self._script(keys=[KEY_PREFIX + key], args=args)
        if allowed:
            return Decision(True, 0.0)
        return Decision(False, max(0.0, int(retry_us) / 1_000_000))

    async def _run(self, key: str, args: list[int | str]) -> tuple[int, int]:
        """The script on the broker's connection; raises RateLimitUnavailable."""
        assert self._broker is not None
        head = (b"1", key.encode(), *(str(arg).encode() for arg in args))
        try:
            try:
                reply = await self._broker.command(
                    b"EVALSHA", _HIT_SHA, *head, timeout=self._timeout
                )
            except RedisReplyError as exc:
                if not str(exc).startswith("NOSCRIPT"):
                    raise
                reply = await self._broker.command(
                    b"EVAL", _HIT_SOURCE, *head, timeout=self._timeout
                )
        except (BrokerUnavailable, RedisReplyError) as exc:
            raise RateLimitUnavailable(f"redis rate limit failed: {exc}") from exc
        match reply:
            case [int(allowed), int(retry_us)]:
                return allowed, retry_us
        raise RateLimitUnavailable(f"unexpected rate limit reply {reply!r:.100}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
