"""The IdempotencyStore contract, against the memory and the Redis implementation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aredis

from realtime.idempotency import IdempotencyStore, IdempotencyUnavailable, MemoryIdempotencyStore
from realtime.redis_idempotency import RedisIdempotencyStore
from tests.redis_server import RedisServer

MakeStore = Callable[[], IdempotencyStore]


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """Stores of one kind; Redis ones share one Redis (several nodes)."""
    stores: list[IdempotencyStore] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else ""

    def make() -> IdempotencyStore:
        store: IdempotencyStore = (
            RedisIdempotencyStore(url) if url else MemoryIdempotencyStore(max_entries=1000)
        )
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


async def test_first_claim_wins_then_duplicates(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.claim_many(["a", "b"], 60) == [True, True]
    assert await store.claim_many(["a", "c", "b"], 60) == [False, True, False]
    assert await store.claim_many([], 60) == []


async def test_a_key_repeated_in_one_call_is_claimed_once(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.claim_many(["x", "x", "y", "x"], 60) == [True, False, True, False]


async def test_release_makes_keys_claimable_again(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.claim_many(["p1", "p2", "p3"], 60) == [True, True, True]
    await store.release_many(["p1", "p3", "never-claimed"])
    await store.release_many([])
    assert await store.claim_many(["p1", "p2", "p3"], 60) == [True, False, True]


@pytest.mark.timeout(20)
async def test_claims_expire_after_ttl(make_store: MakeStore) -> None:
    store = make_store()
    assert await store.claim_many(["short", "long"], 0.3) == [True, True]
    assert await store.claim_many(["long2"], 30) == [True]
    await asyncio.sleep(0.8)
    assert await store.claim_many(["short", "long2"], 30) == [True, False]


async def test_concurrent_claims_of_one_key_have_one_winner(make_store: MakeStore) -> None:
    stores = [make_store(), make_store()]
    results = await asyncio.gather(*(stores[i % 2].claim_many(["race"], 60) for i in range(20)))
    winners = [r for r in results if r == [True]]
    if isinstance(stores[0], RedisIdempotencyStore):
        assert len(winners) == 1  # two nodes, one claim
    else:
        assert len(winners) == 2  # two independent single-node stores


async def test_redis_claims_are_shared_by_nodes_and_expire_in_redis(redis_url: str) -> None:
    node_a, node_b = RedisIdempotencyStore(redis_url), RedisIdempotencyStore(redis_url)
    client = aredis.Redis.from_url(redis_url)
    try:
        assert await node_a.claim_many(["evt-1"], 600) == [True]
        assert await node_b.claim_many(["evt-1", "evt-2"], 600) == [False, True]
        ttl_ms = await client.pttl("rt:idem:evt-1")
        assert 590_000 < ttl_ms <= 600_000
        await node_b.release_many(["evt-1"])
        assert await node_a.claim_many(["evt-1"], 600) == [True]
    finally:
        await client.aclose()
        await node_a.close()
        await node_b.close()


async def test_redis_down_raises_unavailable(redis_url: str, redis_server: RedisServer) -> None:
    store = RedisIdempotencyStore(redis_url, timeout=2.0)
    try:
        assert await store.claim_many(["k"], 60) == [True]
        redis_server.kill()
        with pytest.raises(IdempotencyUnavailable):
            await store.claim_many(["k2"], 60)
        with pytest.raises(IdempotencyUnavailable):
            await store.release_many(["k"])
        redis_server.restart()
        assert await store.claim_many(["k2"], 60) == [True]  # recovers without a restart
    finally:
        await store.close()


# --------------------------------------------------------------------------- memory bound


def test_memory_bound_evicts_the_claims_that_expire_soonest() -> None:
    store = MemoryIdempotencyStore(max_entries=3)
    assert store.claim_now(["long"], 100, now=0.0) == [True]
    assert store.claim_now(["short"], 10, now=0.0) == [True]
    assert store.claim_now(["mid"], 50, now=0.0) == [True]
    assert store.claim_now(["new"], 60, now=1.0) == [True]  # evicts "short" (expires first)
    assert len(store) == 3
    assert store.claim_now(["long", "mid", "new"], 60, now=2.0) == [False, False, False]
    assert store.claim_now(["short"], 60, now=2.0) == [True]  # it was evicted: claimable
    assert len(store) == 3


async def test_memory_expired_and_released_entries_do_not_accumulate() -> None:
    now = [0.0]
    store = MemoryIdempotencyStore(max_entries=10_000, clock=lambda: now[0])
    for i in range(5000):
        now[0] = float(i)
        assert await store.claim_many([f"k{i}"], 10) == [True]
        await store.release_many([f"k{i}"] if i % 2 else [])
    assert len(store) <= 10
    assert len(store._heap) <= 2 * len(store) + 64
