"""``RedisIdempotencyStore``: the IdempotencyStore (idempotency.py) shared by every node."""

from __future__ import annotations

from realtime.idempotency import IdempotencyUnavailable
from realtime.redis_client import make_client, redis_errors

__all__ = ["RedisIdempotencyStore"]

KEY_PREFIX = b"rt:idem:"


class RedisIdempotencyStore:
    """Claims shared by every node: ``SET rt:idem:<key> 1 NX PX <ttl>``, one pipeline per call.

    ``release_many`` is one ``DEL``; it assumes the claim is still the caller's (a
    release comes seconds after the claim, far inside the window).
    """

    def __init__(self, url: str, *, timeout: float = 5.0) -> None:
        self._client = make_client(url, timeout=timeout)

    async def claim_many(self, keys: list[str], ttl: float) -> list[bool]:
        if not keys:
            return []
        ttl_ms = max(1, round(ttl * 1000))
        with redis_errors("idempotency claim", IdempotencyUnavailable):
            async with self._client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(KEY_PREFIX + key.encode(), b"1", nx=True, px=ttl_ms)
                replies = await pipe.execute()
        return [bool(reply) for reply in replies]

    async def release_many(self, keys: list[str]) -> None:
        if not keys:
            return
        with redis_errors("idempotency release", IdempotencyUnavailable):
            await self._client.delete(*(KEY_PREFIX + key.encode() for key in keys))

    async def close(self) -> None:
        await self._client.aclose()
