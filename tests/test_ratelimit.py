"""Rate limiting: the sans-I/O sliding-window log, then the RateLimiter contract
against the memory and the Redis implementation (two nodes share one limit), the latter
on a redis-py client of its own and on a broker's command connection (``broker-*``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.ratelimit import (
    Decision,
    MemoryRateLimiter,
    RateLimiter,
    RateLimitUnavailable,
    SlidingWindowLog,
)
from realtime.redis_broker import RedisBroker
from realtime.redis_client import RedisTarget
from realtime.redis_cluster_broker import RedisClusterBroker
from realtime.redis_ratelimit import RedisRateLimiter
from tests.redis_sentinel import redis_where
from tests.redis_server import RedisServer

# --------------------------------------------------------------------------- sans-I/O core


def test_log_allows_limit_then_refuses_with_truthful_retry_after() -> None:
    log = SlidingWindowLog(3, window=60.0)
    assert [log.hit(t).allowed for t in (0.0, 10.0, 20.0)] == [True, True, True]
    assert log.hit(30.0) == Decision(False, 30.0)  # the hit at 0 leaves at 60
    assert log.hit(59.9).allowed is False
    assert log.hit(60.0) == Decision(True, 0.0)
    assert log.hit(61.0) == Decision(False, 9.0)  # now the hit at 10 keeps it out
    assert len(log) == 3


def test_a_burst_at_the_window_edge_is_not_doubled() -> None:
    # GCRA with a burst of `limit` would let ~2x through between t=0 and t=60.
    log = SlidingWindowLog(60, window=60.0)
    allowed = sum(log.hit(0.0).allowed for _ in range(60))
    allowed += sum(log.hit(59.9).allowed for _ in range(60))
    assert allowed == 60


def test_changing_the_limit_applies_at_once() -> None:
    log = SlidingWindowLog(5, window=60.0)
    for t in range(5):
        assert log.hit(float(t)).allowed
    assert not log.hit(5.0).allowed
    log.limit = 10  # upgrade
    assert log.hit(6.0).allowed
    log.limit = 3  # downgrade: hits at 0, 1, 2, 3, 4, 6; the 3rd newest (at 3) leaves at 63
    assert log.hit(7.0) == Decision(False, 56.0)
    assert len(log) == 3
    log.limit = 0
    assert not log.hit(8.0).allowed


def _allowed_in(times: list[float], start: float, end: float) -> int:
    """Allowed hits in the window (start, end]."""
    return sum(1 for t in times if start < t <= end)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 8),
    gaps=st.lists(st.integers(0, 4000), max_size=80),
)
def test_log_is_exact_and_retry_after_is_truthful(limit: int, gaps: list[int]) -> None:
    window = 10_000.0  # integral times (ms) keep the reference arithmetic exact
    log = SlidingWindowLog(limit, window)
    allowed: list[float] = []
    now = 0.0
    for gap in gaps:
        now += gap
        decision = log.hit(now)
        in_window = _allowed_in(allowed, now - window, now)
        assert decision.allowed == (in_window < limit)
        if decision.allowed:
            assert decision.retry_after == 0.0
            allowed.append(now)
        else:
            later = now + decision.retry_after
            assert _allowed_in(allowed, later - window, later) < limit  # allowed then
            sooner = later - 0.5
            assert _allowed_in(allowed, sooner - window, sooner) == limit  # not before
        assert len(log) <= limit
    for t in allowed:  # never more than `limit` in any window
        assert _allowed_in(allowed, t - window, t) <= limit


def test_memory_limiter_drops_idle_keys_and_bounds_logs() -> None:
    limiter = MemoryRateLimiter()
    for i in range(100):
        limiter.hit_at(f"user{i}", 5, 60.0, now=float(i) / 10)
    assert len(limiter) == 100
    for _ in range(20):
        limiter.hit_at("busy", 5, 60.0, now=100.0)
    assert len(limiter) == 1  # every other key has been idle for its window
    assert len(limiter._logs["busy"]) == 5


# --------------------------------------------------------------------------- contract

MakeLimiter = Callable[[], RateLimiter]


async def started_broker(url: str | RedisTarget) -> RedisBroker | RedisClusterBroker:
    broker: RedisBroker | RedisClusterBroker
    if isinstance(url, RedisTarget) and url.is_cluster:
        broker = RedisClusterBroker(url, max_backoff=0.5)
    else:
        broker = RedisBroker(url, max_backoff=0.5)
    await broker.start(lambda channel, payload: None)
    return broker


KINDS = [
    "memory",
    "redis",
    "sentinel",
    "cluster",
    "broker-redis",
    "broker-sentinel",
    "broker-cluster",
]


@pytest.fixture(params=KINDS)
async def make_limiter(request: pytest.FixtureRequest) -> AsyncIterator[MakeLimiter]:
    """Limiters of one kind; Redis ones share one Redis (several nodes, a broker each)."""
    limiters: list[RateLimiter] = []
    kind = str(request.param).removeprefix("broker-")
    url = "" if kind == "memory" else redis_where(kind, request)
    brokers = []
    if request.param.startswith("broker-"):
        brokers = [await started_broker(url) for _ in range(2)]
    spare = list(brokers)

    def make() -> RateLimiter:
        limiter: RateLimiter
        if spare:
            limiter = RedisRateLimiter(url, broker=spare.pop())
        else:
            limiter = RedisRateLimiter(url) if url else MemoryRateLimiter()
        limiters.append(limiter)
        return limiter

    yield make
    for limiter in limiters:
        await limiter.close()
    for broker in brokers:
        await broker.close()


@pytest.mark.timeout(20)
async def test_limit_then_refusal_then_allowed_after_retry_after(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    started = time.monotonic()
    for _ in range(5):
        assert (await limiter.hit("k", 5, 1.0)).allowed
    refused = await limiter.hit("k", 5, 1.0)
    elapsed = time.monotonic() - started
    assert not refused.allowed
    assert 1.0 - elapsed - 0.05 <= refused.retry_after <= 1.0
    assert not (await limiter.hit("k", 5, 1.0)).allowed  # refusals are not counted ...
    await asyncio.sleep(refused.retry_after + 0.05)
    assert (await limiter.hit("k", 5, 1.0)).allowed  # ... so this one fits
    assert (await limiter.hit("other", 5, 1.0)).allowed  # keys are independent


@pytest.mark.timeout(20)
async def test_retry_after_counts_from_the_oldest_counted_hit(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    first = time.monotonic()
    assert (await limiter.hit("spaced", 2, 2.0)).allowed
    await asyncio.sleep(0.7)
    assert (await limiter.hit("spaced", 2, 2.0)).allowed
    refused = await limiter.hit("spaced", 2, 2.0)
    since_first = time.monotonic() - first
    assert not refused.allowed
    assert abs(refused.retry_after - (2.0 - since_first)) < 0.25  # not 2.0 from the newest


async def test_limit_change_applies_at_once(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter()
    assert [(await limiter.hit("t", 2)).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.hit("t", 4)).allowed  # tier upgrade
    assert (await limiter.hit("t", 4)).allowed
    assert not (await limiter.hit("t", 4)).allowed
    downgraded = await limiter.hit("t", 1)
    assert not downgraded.allowed
    assert 59.0 < downgraded.retry_after <= 60.0


async def test_concurrent_hits_allow_exactly_the_limit(make_limiter: MakeLimiter) -> None:
    nodes = [make_limiter(), make_limiter()]
    decisions = await asyncio.gather(*(nodes[i % 2].hit("shared", 10) for i in range(30)))
    allowed = sum(d.allowed for d in decisions)
    if isinstance(nodes[0], RedisRateLimiter):
        assert allowed == 10  # two nodes, one limit
    else:
        assert allowed == 20  # two independent single-node limiters


async def test_two_redis_nodes_share_one_limit(redis_url: str) -> None:
    node_a, node_b = RedisRateLimiter(redis_url), RedisRateLimiter(redis_url)
    client = aredis.Redis.from_url(redis_url)
    try:
        results = []
        for i in range(12):
            results.append((await (node_a if i % 2 else node_b).hit("cmd:u", 8)).allowed)
        assert results == [True] * 8 + [False] * 4
        assert await client.zcard("rt:rl:cmd:u") == 8  # bounded by the limit
        assert 59_000 < await client.pttl("rt:rl:cmd:u") <= 60_000
    finally:
        await client.aclose()
        await node_a.close()
        await node_b.close()


@pytest.mark.parametrize("via_broker", [False, True])
async def test_redis_down_raises_unavailable(
    redis_url: str, redis_server: RedisServer, via_broker: bool
) -> None:
    broker = await started_broker(redis_url) if via_broker else None
    limiter = RedisRateLimiter(redis_url, timeout=2.0, broker=broker)
    try:
        assert (await limiter.hit("k", 3)).allowed
        redis_server.kill()
        with pytest.raises(RateLimitUnavailable):
            await limiter.hit("k", 3)
        redis_server.restart()  # scripts are gone from the new server: reloaded on demand
        assert (await limiter.hit("k", 3)).allowed
    finally:
        await limiter.close()
        if broker is not None:
            await broker.close()
