"""The ConnectionRegistry contract, against the memory and the Redis implementation."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as aredis

from realtime.presence import (
    TIER_TTL,
    ConnectionRegistry,
    MemoryConnectionRegistry,
    PresenceUnavailable,
)
from realtime.redis_client import RedisTarget
from realtime.redis_presence import CLUSTER_BUCKETS, CONNS_PREFIX, RedisConnectionRegistry, user_key
from tests.redis_cluster import ClusterSet
from tests.redis_sentinel import redis_where
from tests.redis_server import RedisServer

MakeRegistry = Callable[..., ConnectionRegistry]


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def make_registry(request: pytest.FixtureRequest) -> AsyncIterator[MakeRegistry]:
    """Registries of one kind; Redis ones share one Redis (several nodes)."""
    registries: list[ConnectionRegistry] = []
    url = "" if request.param == "memory" else redis_where(request.param, request)

    def make(**options: Any) -> ConnectionRegistry:
        registry: ConnectionRegistry = (
            RedisConnectionRegistry(url, **options) if url else MemoryConnectionRegistry(**options)
        )
        registries.append(registry)
        return registry

    yield make
    for registry in registries:
        await registry.close()


async def test_add_counts_the_users_connections(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    assert [await registry.add("u1", f"c{i}") for i in range(3)] == [1, 2, 3]
    assert await registry.add("u2", "c0") == 1  # per user
    assert await registry.add("u1", "c1") == 3  # the same connection again: still 3


async def test_remove_forgets_a_connection(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    await registry.add("u", "a")
    await registry.add("u", "b")
    await registry.remove("u", "a")
    await registry.remove("u", "unknown")
    await registry.remove("nobody", "x")
    assert await registry.add("u", "c") == 2


@pytest.mark.timeout(20)
async def test_unrefreshed_entries_expire_refreshed_ones_stay(make_registry: MakeRegistry) -> None:
    registry = make_registry(ttl=0.6)
    await registry.add("u", "live")
    await registry.add("u", "dead")
    for _ in range(3):  # 3 x 0.3 s > ttl: only the refreshed entry survives
        await asyncio.sleep(0.3)
        await registry.refresh([("u", "live")])
    assert await registry.add("u", "new") == 2  # live + new


@pytest.mark.timeout(20)
async def test_refresh_restores_an_expired_entry(make_registry: MakeRegistry) -> None:
    registry = make_registry(ttl=0.3)
    await registry.add("u", "a")
    await asyncio.sleep(0.6)
    await registry.refresh([("u", "a"), ("v", "b")])
    assert await registry.add("u", "c") == 2
    assert await registry.add("v", "d") == 2
    await registry.refresh([])


async def test_tier_is_remembered(make_registry: MakeRegistry) -> None:
    registry = make_registry()
    assert await registry.tier_of("u") is None
    await registry.set_tier("u", "free")
    await registry.set_tier("u", "paid")
    await registry.set_tier("w", "free")
    assert await registry.tier_of("u") == "paid"
    assert await registry.tier_of("w") == "free"


@pytest.mark.timeout(20)
async def test_redis_nodes_count_together_and_a_dead_nodes_entries_expire(redis_url: str) -> None:
    node_a = RedisConnectionRegistry(redis_url, ttl=0.8)
    node_b = RedisConnectionRegistry(redis_url, ttl=0.8)
    try:
        assert await node_a.add("u", "a1") == 1
        assert await node_b.add("u", "b1") == 2
        assert await node_a.add("u", "a2") == 3
        await node_b.set_tier("u", "paid")
        assert await node_a.tier_of("u") == "paid"
        await node_b.close()  # node B dies: only A beats
        for _ in range(4):
            await asyncio.sleep(0.35)
            await node_a.refresh([("u", "a1"), ("u", "a2")])
        assert await node_a.add("u", "a3") == 3
    finally:
        await node_a.close()
        await node_b.close()


async def test_concurrent_adds_see_distinct_counts(make_registry: MakeRegistry) -> None:
    nodes = [make_registry(), make_registry()]
    counts = await asyncio.gather(*(nodes[i % 2].add("busy", f"c{i}") for i in range(20)))
    if isinstance(nodes[0], RedisConnectionRegistry):
        assert sorted(counts) == list(range(1, 21))  # atomic across nodes
    else:
        assert sorted(counts) == sorted([*range(1, 11), *range(1, 11)])


@pytest.mark.timeout(30)
async def test_cluster_batches_span_every_master_and_survive_a_lost_script_cache(
    redis_cluster: ClusterSet, cluster_target: RedisTarget
) -> None:
    """One batch holds users of every master: split by slot (one call per hash tag), each
    user's count is its own; masters that lost the scripts (as a promoted replica has none)
    get them again."""
    registry = RedisConnectionRegistry(cluster_target)
    users = [f"u{i}" for i in range(300)]
    keys = [user_key(CONNS_PREFIX, u, cluster=True) for u in users]
    assert {redis_cluster.master_of(key) for key in keys} == set(redis_cluster.masters())
    try:
        for round_ in range(1, 3):
            counts = await asyncio.gather(
                *(registry.add(u, f"c{round_}") for u in users),
                *(registry.set_tier(u, f"t{round_}") for u in users),
            )
            assert counts[: len(users)] == [round_] * len(users)
            for port in redis_cluster.masters():  # as after a failover: no script cached
                admin = redis_cluster.client(port)
                admin.script_flush()
                admin.close()
        _cluster_stats(redis_cluster, reset=True)
        await registry.refresh([(u, "c3") for u in users])  # 300 users: one call per tag
        assert 0 < _cluster_stats(redis_cluster) <= 2 * CLUSTER_BUCKETS  # (each again: NOSCRIPT)
        await asyncio.gather(*(registry.remove(u, "c1") for u in users))
        assert await asyncio.gather(*(registry.add(u, "c4") for u in users)) == [3] * len(users)
        assert {await registry.tier_of(u) for u in users} == {"t2"}
    finally:
        await registry.close()


def _cluster_stats(cset: ClusterSet, *, reset: bool = False) -> int:
    """EVALSHA calls on the cluster's masters since the last reset."""
    calls = 0
    for port in cset.masters():
        admin = cset.client(port)
        try:
            if reset:
                admin.config_resetstat()
            stat = admin.info("commandstats").get("cmdstat_evalsha", {})
            calls += int(stat.get("calls", 0)) if isinstance(stat, dict) else 0
        finally:
            admin.close()
    return calls


async def test_redis_keys_expire_with_their_entries(redis_url: str) -> None:
    registry = RedisConnectionRegistry(redis_url, ttl=90)
    client = aredis.Redis.from_url(redis_url)
    try:
        await registry.add("u", "c")
        await registry.set_tier("u", "paid")
        assert 85_000 < await client.pttl("rt:presence:u") <= 90_000  # the ttl given here
        tier_ttl = await client.pttl("rt:tier:u")
        assert TIER_TTL * 1000 - 10_000 < tier_ttl <= TIER_TTL * 1000
        await registry.remove("u", "c")
        assert await client.zcard("rt:presence:u") == 0
    finally:
        await client.aclose()
        await registry.close()


async def test_redis_down_raises_unavailable(redis_url: str, redis_server: RedisServer) -> None:
    registry = RedisConnectionRegistry(redis_url, timeout=2.0)
    try:
        await registry.add("u", "a")
        redis_server.kill()
        for call in (
            registry.add("u", "b"),
            registry.remove("u", "a"),
            registry.refresh([("u", "a")]),
            registry.set_tier("u", "paid"),
            registry.tier_of("u"),
        ):
            with pytest.raises(PresenceUnavailable):
                await call
        redis_server.restart()
        assert await registry.add("u", "b") == 1  # Redis lost its data; the store recovers
    finally:
        await registry.close()


# --------------------------------------------------------------------------- memory, fake clock


async def test_memory_bounds_tiers_and_sweeps_expired_users() -> None:
    now = [0.0]
    registry = MemoryConnectionRegistry(ttl=10, max_tiers=2, clock=lambda: now[0])
    for user in ("a", "b", "c"):
        await registry.set_tier(user, "paid")
    assert [await registry.tier_of(u) for u in ("a", "b", "c")] == [None, "paid", "paid"]
    now[0] = TIER_TTL + 1
    assert await registry.tier_of("b") is None  # tiers expire too
    for i in range(100):
        await registry.add(f"user{i}", "c")
    now[0] += 11
    await registry.refresh([("user0", "c")])
    assert list(registry._conns) == ["user0"]


# --------------------------------------------------------------------------- redis, coalescing


@pytest.mark.timeout(30)
async def test_redis_concurrent_adds_share_few_round_trips(redis_url: str) -> None:
    name = f"presence-{secrets.token_hex(4)}"  # names this registry's connections
    registry = RedisConnectionRegistry(f"{redis_url}?client_name={name}")
    admin = aredis.Redis.from_url(redis_url)
    try:
        await registry.add("warm", "up")  # loads the script on the registry's one connection
        await admin.config_resetstat()
        users, per_user = 100, 20
        calls = [(f"u{i % users}", f"c{i}") for i in range(users * per_user)]
        counts = await asyncio.gather(*(registry.add(user, conn) for user, conn in calls))
        by_user: dict[str, list[int]] = {}
        for (user, _), count in zip(calls, counts, strict=True):
            by_user.setdefault(user, []).append(count)
        assert all(sorted(c) == list(range(1, per_user + 1)) for c in by_user.values())
        stats = await admin.info("commandstats")
        assert stats["cmdstat_evalsha"]["calls"] == len(calls) // 500  # 500 keys per call
        mine = [c for c in await admin.client_list() if c["name"] == name]
        assert len(mine) == 1  # one connection for all 2,000 calls
    finally:
        await admin.aclose()
        await registry.close()


async def test_redis_calls_beyond_the_bound_are_refused_at_once(redis_url: str) -> None:
    registry = RedisConnectionRegistry(redis_url, max_pending=10)
    try:
        results = await asyncio.gather(
            *(registry.add("u", f"c{i}") for i in range(30)), return_exceptions=True
        )
        assert sorted(r for r in results if isinstance(r, int)) == list(range(1, 11))
        refused = [r for r in results if not isinstance(r, int)]
        assert len(refused) == 20
        assert all(isinstance(r, PresenceUnavailable) and "waiting" in str(r) for r in refused)
        assert await registry.add("u", "later") == 11
    finally:
        await registry.close()


@pytest.mark.timeout(20)
async def test_redis_a_stalled_redis_fails_each_caller_within_the_timeout(
    redis_url: str, redis_server: RedisServer
) -> None:
    registry = RedisConnectionRegistry(redis_url, timeout=0.5)
    try:
        await registry.add("u", "a")
        redis_server.pause()
        try:
            async with asyncio.timeout(3):
                results = await asyncio.gather(
                    *(registry.add("u", f"c{i}") for i in range(5)),
                    registry.set_tier("u", "paid"),
                    registry.remove("u", "a"),
                    return_exceptions=True,
                )
        finally:
            redis_server.resume()
        assert all(isinstance(r, PresenceUnavailable) for r in results), results
        assert await registry.add("u", "b") >= 2
    finally:
        await registry.close()


@pytest.mark.timeout(20)
async def test_redis_callers_that_gave_up_do_not_count_against_the_bound(
    redis_url: str, redis_server: RedisServer
) -> None:
    registry = RedisConnectionRegistry(redis_url, max_pending=10, timeout=1.0)
    try:
        await registry.add("u", "a")
        redis_server.pause()
        try:
            stuck = asyncio.ensure_future(registry.add("u", "sent"))  # its round trip hangs
            await asyncio.sleep(0.1)
            for _ in range(5):
                gone = [asyncio.ensure_future(registry.add("u", f"g{i}")) for i in range(9)]
                await asyncio.sleep(0)  # queued behind the hung round trip
                for call in gone:
                    call.cancel()  # their clients went away
                await asyncio.gather(*gone, return_exceptions=True)
            assert len(registry._adds._pending) <= 20  # their keys are dropped at 2 x 10
            async with asyncio.timeout(5):
                results = await asyncio.gather(
                    *(registry.add("u", f"c{i}") for i in range(10)), stuck, return_exceptions=True
                )
        finally:
            redis_server.resume()
        assert all(isinstance(r, PresenceUnavailable) for r in results), results
        refused = [r for r in results if "already waiting" in str(r)]
        assert [str(r) for r in refused] == [  # "sent" and 9 others waited; the 10th did not
            "redis presence add failed: 10 calls already waiting for Redis"
        ]
        assert await registry.add("u", "b") >= 2
    finally:
        await registry.close()


@pytest.mark.timeout(20)
async def test_redis_close_answers_every_waiting_caller(redis_url: str) -> None:
    registry = RedisConnectionRegistry(redis_url)
    calls = [asyncio.ensure_future(registry.add(f"u{i}", "c")) for i in range(1000)]
    await asyncio.sleep(0)  # the calls are queued
    async with asyncio.timeout(1):  # answered by close, not after the 5 s call timeout
        await registry.close()
        results = await asyncio.gather(*calls, return_exceptions=True)
    closed = [r for r in results if isinstance(r, PresenceUnavailable) and "closed" in str(r)]
    assert closed and all(r == 1 or r in closed for r in results), results[:5]
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("presence-")]
    with pytest.raises(PresenceUnavailable, match="closed"):
        await registry.add("u", "late")
