"""The Redis client of the stores: client factory, error mapping, backoff, Lua scripts.

``make_client`` is the redis-py command client of the presence registry and the
rate limiter (redis_presence.py, redis_ratelimit.py); ``redis_errors`` turns a
Redis or socket error into the caller's ``BackendUnavailable`` subclass;
``backoff_delay`` paces reconnects (``RedisBroker``'s); ``lua_script`` reads a
script of realtime/lua/ (package data).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Final

import redis.asyncio as aredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from realtime.backend import BackendUnavailable

__all__ = ["backoff_delay", "lua_script", "make_client", "redis_errors"]

_BACKOFF_BASE: Final = 0.05


def make_client(url: str, *, timeout: float = 5.0, max_connections: int = 32) -> aredis.Redis:
    """A command client for ``url``: bytes replies, no retries, bounded pool.

    No command is retried (a retried PUBLISH / SET NX / rate-limit hit could
    apply twice). At most ``max_connections`` commands are in flight; a caller
    beyond that waits up to ``timeout`` s for a connection, then gets a
    ``ConnectionError`` (mapped to the store's error by ``redis_errors``).
    """
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        protocol=2,
    )
    return aredis.Redis.from_pool(pool)


@contextmanager
def redis_errors(what: str, error_class: type[BackendUnavailable]) -> Iterator[None]:
    """Re-raise a Redis or socket error in the block as ``error_class``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise error_class(f"redis {what} failed: {exc}") from exc


def backoff_delay(attempt: int, *, cap: float, base: float = _BACKOFF_BASE,
                  rand: Callable[[], float] = random.random) -> float:  # fmt: skip
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, jittered.

    ``d = min(cap, base * 2**attempt)``; the delay is uniform in ``[d/2, d]``, so
    nodes that lost Redis together do not reconnect in lock-step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + rand() * ceiling / 2


def lua_script(name: str) -> str:
    """The text of the Lua script ``realtime/lua/<name>`` (shipped as package data)."""
    return (resources.files("realtime") / "lua" / name).read_text(encoding="utf-8")
