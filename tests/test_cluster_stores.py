"""The stores on a Redis Cluster (tests/redis_cluster.py: three masters, one replica each):
the notification store in one slot with WAIT on that slot's master, the persistence check
asking every master, and every store following a failover without being re-created."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from notifications.models import Device, Notification, Platform, Priority
from notifications.redis_store import CLUSTER_PREFIX, RedisNotificationStore
from realtime.channel_presence import Counts, Member
from realtime.redis_channel_presence import RedisChannelPresence
from realtime.redis_client import RedisTarget, redis_client
from realtime.redis_cluster_broker import RedisClusterBroker
from realtime.redis_persistence import PersistenceCheck
from realtime.redis_presence import CONNS_PREFIX, RedisConnectionRegistry, user_key
from realtime.redis_ratelimit import KEY_PREFIX, RedisRateLimiter
from tests.redis_cluster import ClusterSet, eventually, running_cluster
from tests.server import running_server

pytestmark = pytest.mark.timeout(90)

#: A key of the notification store: every one of its keys is in this key's slot.
STORE_KEY = f"{CLUSTER_PREFIX}q:normal"


def _store(target: RedisTarget, **options: Any) -> RedisNotificationStore:
    client = redis_client(target, blocking=False, **RedisNotificationStore.client_options())
    return RedisNotificationStore(client, owns_client=True, **options)


def _note(id: str) -> Notification:
    return Notification(id=id, priority=Priority.NORMAL, user="u1", title="t", body="b")


def _keys_by_master(cset: ClusterSet) -> dict[int, list[bytes]]:
    found = {}
    for port in cset.masters():
        client = cset.client(port)
        try:
            found[port] = [key for key in client.keys("*") if isinstance(key, bytes)]
        finally:
            client.close()
    return found


async def test_the_notification_store_is_one_slot_of_one_master(
    redis_cluster: ClusterSet, cluster_target: RedisTarget
) -> None:
    store = _store(cluster_target)
    try:
        await store.enqueue(_note("n1"), idempotency_window=60.0)
        await store.enqueue(_note("n2"))
        await store.add_device(Device(user="u1", platform=Platform.IOS, token="a"))
        await store.add_device(Device(user="u2", platform=Platform.IOS, token="a"))  # moved
        lease = await store.claim("c1", time.time())
        assert lease is not None
        await store.settle(lease, state=lease.state, retry_at=time.time() + 60)
        keys = [key for keys in _keys_by_master(redis_cluster).values() for key in keys]
        assert len(keys) > 5 and {key_slot(key) for key in keys} == {key_slot(STORE_KEY.encode())}
        assert await store.devices("u1") == []
        assert await store.depth() == {p: int(p is Priority.NORMAL) * 2 for p in Priority}
    finally:
        await store.close()
    client = redis_client(cluster_target, blocking=False)
    try:  # a prefix without a hash tag would spread the store's keys over the slots
        with pytest.raises(ValueError, match="hash tag"):
            RedisNotificationStore(client, prefix="rt:notif:")
    finally:
        await client.aclose()


async def test_wait_counts_the_replica_of_the_stores_master(
    redis_cluster: ClusterSet, cluster_target: RedisTarget
) -> None:
    """WAIT runs on the connection of the write, on the slot's master: with that master's
    replica paused no replica confirms (a WAIT elsewhere would count a live one)."""
    store = _store(cluster_target, wait_replicas=1, wait_timeout=0.3)
    replica = redis_cluster.node(redis_cluster.replica_of(redis_cluster.master_of(STORE_KEY)))
    try:
        assert (await store.enqueue(_note("w0"))).created
        replica.pause()  # well under the cluster's node timeout: no failover
        try:
            with pytest.raises(Exception, match="0 of 1 replicas"):
                await store.enqueue(_note("w1"), idempotency_window=60.0)
            with pytest.raises(Exception, match="0 of 1 replicas"):
                await store.add_device(Device(user="u1", platform=Platform.IOS, token="t"))
        finally:
            replica.resume()
        # Retried with the same id: stored once, confirmed now.
        retried = await eventually(lambda: store.enqueue(_note("w1"), idempotency_window=60.0), 5)
        assert not retried.created
        assert sum((await store.depth()).values()) == 2
    finally:
        await store.close()


async def test_persistence_is_asked_of_every_master(redis_cluster: ClusterSet) -> None:
    masters = sorted(redis_cluster.masters())
    check = PersistenceCheck(redis_cluster.target)
    try:
        found = await check.check()
        assert found.durable is False and found.node in {f"127.0.0.1:{p}" for p in masters}
        assert "keeps nothing across a crash" in (found.warning or "")
        for port in masters[1:]:
            _config(redis_cluster, port, appendonly="yes", appendfsync="always")
        try:
            found = await check.check()  # only the first master would lose anything
            assert (found.node, found.durable, found.aof) == (
                f"127.0.0.1:{masters[0]}",
                False,
                False,
            )
            assert f"Redis Cluster master 127.0.0.1:{masters[0]}" in (found.warning or "")
            _config(redis_cluster, masters[0], appendonly="yes", appendfsync="always")
            found = await check.check()
            assert found.durable and found.warning is None
            assert (await check.readiness())["durable"] is True
        finally:
            for port in masters:
                _config(redis_cluster, port, appendonly="no", appendfsync="everysec")
    finally:
        await check.close()


def _config(cset: ClusterSet, port: int, **settings: str) -> None:
    client = cset.client(port)
    try:
        for name, value in settings.items():
            client.config_set(name, value)
    finally:
        client.close()


async def test_stores_follow_a_failover_and_waited_notifications_survive() -> None:
    with running_cluster() as cset:
        await _follow_a_failover(cset)


async def _follow_a_failover(cset: ClusterSet) -> None:
    target = cset.target
    store = _store(target, wait_replicas=1, wait_timeout=1.0)
    registry = RedisConnectionRegistry(target, timeout=2.0)
    limiter = RedisRateLimiter(target, timeout=2.0)
    broker = RedisClusterBroker(target, max_backoff=0.5, health_check_interval=0.5)
    await broker.start(lambda channel, payload: None)
    on_broker = RedisRateLimiter(target, timeout=2.0, broker=broker)  # as the server's
    presence = RedisChannelPresence(target, timeout=2.0)
    doomed = cset.master_of(STORE_KEY)
    # A user and a channel whose keys are on the master that dies, as the store's are.
    on_doomed = [
        f"u{i}"
        for i in range(200)
        if cset.master_of(user_key(CONNS_PREFIX, f"u{i}", cluster=True)) == doomed
    ]
    user, other = on_doomed[:2]
    healthy = next(
        f"h{i}"
        for i in range(200)
        if cset.master_of(user_key(CONNS_PREFIX, f"h{i}", cluster=True)) != doomed
    )
    limited = next(f"k{i}" for i in range(10_000) if cset.master_of(KEY_PREFIX + f"k{i}") == doomed)
    channel = next(
        f"artist:{i}" for i in range(10_000) if cset.master_of(f"rt:p:{{artist:{i}}}:c") == doomed
    )
    try:
        await registry.add(user, "c1")
        await limiter.hit(limited, 100)
        await on_broker.hit(limited, 100)
        await presence.join(Member(channel, user, "s1"))
        ids = [f"n{i}" for i in range(30)]
        for id in ids:  # every one acknowledged by the replica (WAIT 1) before it returns
            await store.enqueue(_note(id))
        device = Device(user="u1", platform=Platform.IOS, token="tok-1")
        await store.add_device(device)

        cset.kill_master_of(STORE_KEY)
        # One batch, users of the dead master and of a live one: the dead master fails
        # its own calls alone (an attempt made before the failover ends).
        _, live = await asyncio.gather(
            registry.add(other, "o1"), registry.add(healthy, "h1"), return_exceptions=True
        )
        assert live == 1
        new_port = await asyncio.to_thread(cset.wait_failover, doomed, STORE_KEY)

        # The same objects, no restart: each reaches the new master by itself.
        depth = await eventually(store.depth)
        assert sum(depth.values()) == len(ids), depth  # nothing acknowledged was lost
        assert await eventually(lambda: store.devices("u1")) == [device]
        with pytest.raises(Exception, match="0 of 1 replicas"):  # the new master has none
            await store.enqueue(_note("after"), idempotency_window=60.0)
        cset.node(doomed).restart()  # back as the new master's replica: WAIT confirms again
        await eventually(lambda: store.enqueue(_note("after"), idempotency_window=60.0))
        leases = [await store.claim("c1", time.time()) for _ in range(len(ids) + 2)]
        claimed = [lease.notification.id for lease in leases if lease is not None]
        assert sorted(claimed) == sorted([*ids, "after"])
        assert await eventually(lambda: registry.add(user, "c2")) == 2
        assert (await eventually(lambda: limiter.hit(limited, 100))).allowed
        assert (await eventually(lambda: on_broker.hit(limited, 100))).allowed
        assert await eventually(lambda: presence.counts(channel)) == Counts(1, 1)
        client = redis.Redis(port=new_port)
        try:  # and they wrote to the new master
            assert client.exists(STORE_KEY) and client.exists(
                user_key(CONNS_PREFIX, user, cluster=True)
            )
            assert client.exists(KEY_PREFIX + limited)
        finally:
            client.close()
    finally:
        for part in (store, registry, limiter, on_broker, presence, broker):
            await part.close()


async def test_a_node_on_a_cluster_keeps_its_notifications_in_the_stores_slot(
    redis_cluster: ClusterSet, cluster_target: RedisTarget
) -> None:
    """The app needs nothing cluster-specific: its store takes the cluster prefix itself and
    /readyz tells the least durable master."""
    async with running_server(redis_cluster.env()) as server, server.http() as http:
        device = {"user": "u1", "platform": "ios", "token": "tok-e2e"}
        assert (await http.post("/v1/devices", json=device)).is_success
        note = {"id": "e2e-1", "user": "u1", "priority": "normal", "title": "t", "body": "b"}
        assert (await http.post("/v1/notifications", json=note)).status_code == 202
        field = (await http.get("/readyz")).json()["redis_persistence"]
        masters = {f"127.0.0.1:{port}" for port in redis_cluster.masters()}
        assert field["node"] in masters and "keeps nothing" in field["warning"]
    keys = [key for keys in _keys_by_master(redis_cluster).values() for key in keys]
    store_keys = [key for key in keys if key.startswith(b"rt:notif:")]
    assert f"{CLUSTER_PREFIX}devices:u1".encode() in store_keys
    assert {key_slot(key) for key in store_keys} == {key_slot(STORE_KEY.encode())}
