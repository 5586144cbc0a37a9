"""Redis Sentinel: every part follows a failover without a restart (real master, replica and
three sentinels, tests/redis_sentinel.py; the master is SIGKILLed)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import redis
from redis.exceptions import RedisError

from notifications.models import Device, Notification, Platform, Priority
from notifications.redis_store import RedisNotificationStore
from realtime.channel_presence import Counts, Member
from realtime.redis_broker import RedisBroker
from realtime.redis_channel_presence import RedisChannelPresence
from realtime.redis_client import RedisTarget, make_client, redis_client
from realtime.redis_persistence import PersistenceCheck
from realtime.redis_presence import RedisConnectionRegistry
from realtime.redis_ratelimit import RedisRateLimiter
from realtime.settings import Settings
from tests.redis_cluster import eventually as _eventually
from tests.redis_sentinel import MASTER_NAME, SentinelSet, running_set
from tests.redis_server import command as _command
from tests.server import ServerProcess, connected, running_server

pytestmark = pytest.mark.timeout(120)

FAILOVER_TIMEOUT = 30.0


@pytest.fixture
def own_set() -> Iterator[SentinelSet]:
    """A Sentinel set of this test's own: its master gets killed."""
    with running_set() as sset:
        yield sset


async def _failover(sset: SentinelSet) -> int:
    old = sset.kill_master()
    return await asyncio.to_thread(sset.wait_failover, old)


def test_settings_take_sentinels_as_section_12_names_them() -> None:
    settings = Settings(
        redis_sentinels="127.0.0.1:26379, 10.0.0.2:26380",
        redis_sentinel_master="main",
        redis_password="s3cret",
    )
    assert settings.uses_redis
    assert settings.redis_target == RedisTarget(
        sentinels=(("127.0.0.1", 26379), ("10.0.0.2", 26380)), master="main", password="s3cret"
    )
    assert "s3cret" not in settings.redis_target.describe()
    bad: list[dict[str, Any]] = [
        {"redis_sentinels": "127.0.0.1:26379"},  # no master name
        {"redis_sentinel_master": "main"},  # no sentinels
        {"redis_sentinels": "127.0.0.1", "redis_sentinel_master": "main"},  # no port
        {
            "redis_url": "redis://127.0.0.1:6379/0",
            "redis_sentinels": "127.0.0.1:26379",
            "redis_sentinel_master": "main",
        },
        {"redis_cluster_nodes": "127.0.0.1:7000", "redis_url": "redis://127.0.0.1:6379/0"},
        {"redis_cluster_nodes": "127.0.0.1"},  # no port
    ]
    for options in bad:
        with pytest.raises(ValueError):
            Settings(**options)


async def test_stores_follow_a_failover_and_waited_notifications_survive(
    own_set: SentinelSet,
) -> None:
    target = own_set.target
    store = RedisNotificationStore(
        redis_client(target, blocking=False, **RedisNotificationStore.client_options()),
        owns_client=True,
        wait_replicas=1,
        wait_timeout=5.0,
    )
    registry = RedisConnectionRegistry(target, timeout=2.0)
    limiter = RedisRateLimiter(target, timeout=2.0)
    broker = RedisBroker(target, max_backoff=0.5, health_check_interval=0.5)
    await broker.start(lambda channel, payload: None)
    on_broker = RedisRateLimiter(target, timeout=2.0, broker=broker)  # as the server's
    presence = RedisChannelPresence(target, timeout=2.0)
    try:
        await registry.add("u1", "c1")
        await limiter.hit("u1", 100)
        await on_broker.hit("u2", 100)
        await presence.join(Member("artist:x", "u1", "s1"))
        ids = [f"n{i}" for i in range(30)]
        for id in ids:  # every one acknowledged by the replica (WAIT 1) before it returns
            note = Notification(id=id, priority=Priority.NORMAL, user="u1", title="t", body="b")
            await store.enqueue(note)
        device = Device(user="u1", platform=Platform.IOS, token="tok-1")
        await store.add_device(device)  # its WAIT covers every earlier write too

        new_port = await _failover(own_set)

        # The same objects, no restart: each reaches the new master by itself.
        depth = await _eventually(store.depth)
        assert sum(depth.values()) == len(ids), depth  # nothing acknowledged was lost
        assert await _eventually(lambda: store.devices("u1")) == [device]
        assert await _eventually(lambda: registry.add("u1", "c2")) == 2
        await _eventually(lambda: limiter.hit("u1", 100))
        await _eventually(lambda: on_broker.hit("u2", 100))
        assert await _eventually(lambda: presence.counts("artist:x")) == Counts(1, 1)
        client = redis.Redis(port=new_port)
        try:  # and they wrote to the new master
            assert _command(new_port, "ROLE")[0] == b"master"
            assert client.exists("rt:notif:q:normal")
            assert client.exists("rt:rl:u2")
        finally:
            client.close()
    finally:
        for part in (store, registry, limiter, on_broker, presence, broker):
            await part.close()


async def test_wait_answers_unavailable_when_no_replica_confirms(own_set: SentinelSet) -> None:
    replica = next(s for s in own_set.servers if s.port != own_set.master_port())
    store = RedisNotificationStore(
        redis_client(own_set.target, blocking=False, **RedisNotificationStore.client_options()),
        owns_client=True,
        wait_replicas=1,
        wait_timeout=0.3,
    )
    try:
        replica.pause()
        try:
            note = Notification(id="w1", priority=Priority.HIGH, user="u1", title="t", body="b")
            with pytest.raises(Exception, match="0 of 1 replicas"):
                await store.enqueue(note)
        finally:
            replica.resume()
    finally:
        await store.close()


@pytest.mark.parametrize("how", ["kill", "coordinated"])
async def test_a_broker_follows_a_failover(own_set: SentinelSet, how: str) -> None:
    """Killed, the master's connections drop; demoted by ``SENTINEL FAILOVER`` it lives on
    as a replica, and the broker must leave it for the new master all the same."""
    received: list[tuple[str, bytes]] = []
    broker = RedisBroker(own_set.target, max_backoff=0.5, health_check_interval=0.5)
    await broker.start(lambda channel, payload: received.append((channel, payload)))
    try:
        await broker.subscribe("c")
        await broker.publish("c", b"before")
        await _eventually(lambda: _has(received, b"before"), timeout=5)
        if how == "kill":
            await _failover(own_set)
        else:
            old = own_set.master_port()
            own_set.ask("SENTINEL", "FAILOVER", MASTER_NAME)
            new = await asyncio.to_thread(own_set.wait_failover, old)
            _wait_replicated(new)  # the old master follows the new one

        async def delivered() -> None:  # pub/sub is at most once: until re-subscribed
            await broker.publish("c", b"after")
            await asyncio.sleep(0.1)
            await _has(received, b"after")

        await _eventually(delivered)
        assert broker.ready and broker.channels == {"c"}
        assert broker._master is not None and broker._master[1] == own_set.master_port()
    finally:
        await broker.close()


async def _has(received: list[tuple[str, bytes]], payload: bytes) -> None:
    if ("c", payload) not in received:
        raise AssertionError(f"{payload!r} not received yet")


@pytest.fixture
async def two_nodes(own_set: SentinelSet) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    env = own_set.env()
    async with running_server(env) as a, running_server(env) as b:
        yield a, b


async def _publish(server: ServerProcess, event: str) -> httpx.Response:
    return await server.publish({"channel": "artist:fo", "event": event, "data": {}})


async def test_nodes_follow_a_failover_503_while_no_master_then_202(
    own_set: SentinelSet, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = two_nodes
    async with connected(a, "u-1") as client:
        start = (await client.command("subscribe", channel="artist:fo"))["result"]
        assert (await _publish(b, "e1")).status_code == 202
        assert (await client.next_pushed())["event"] == "e1"

        old = own_set.kill_master()
        # The sentinels still name the dead master for a second: nothing is accepted.
        assert (await _publish(b, "lost")).status_code == 503
        await asyncio.to_thread(own_set.wait_failover, old)

        async def accepted() -> httpx.Response:
            response = await _publish(b, "e2")
            assert response.status_code == 202, response.text
            return response

        await _eventually(accepted)
        # The epoch changed with the master: the node closes its subscribers 1001 to resync.
        assert await client.close_code(timeout=FAILOVER_TIMEOUT) == 1001
    since = {"epoch": start["epoch"], "offset": start["offset"] + 1}
    async with connected(a, "u-1") as client:
        result = (await client.command("subscribe", channel="artist:fo", since=since))["result"]
        assert result["recovered"] is False and result["epoch"] != start["epoch"]
        assert (await _publish(b, "e3")).status_code == 202  # delivery resumed, no restart
        assert (await client.next_pushed())["event"] == "e3"
    for node in (a, b):
        async with node.http() as http:
            assert (await http.get("/readyz")).status_code == 200
    assert "sentinel master" in a.log()


async def test_an_event_lost_in_replication_lag_is_never_skipped_silently(
    own_set: SentinelSet, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    a, b = two_nodes
    master_port = own_set.master_port()
    replica = next(s for s in own_set.servers if s.port != master_port)
    async with connected(a, "u-1") as watcher:
        start = (await watcher.command("subscribe", channel="artist:fo"))["result"]
        for event in ("e1", "e2"):
            assert (await _publish(b, event)).status_code == 202
        _wait_replicated(master_port)
        # Cut replication: the replica cannot resync (a wrong masterauth), then two more
        # publications are acknowledged by the master alone and delivered.
        _command(replica.port, "CONFIG", "SET", "masterauth", "wrong")
        _command(master_port, "CLIENT", "KILL", "TYPE", "replica")
        lost = [(await _publish(b, event)).json()["offsets"][0] for event in ("e3", "e4")]
        seen = [(await watcher.next_pushed()) for _ in range(4)]
        assert [e["offset"] for e in seen][-2:] == lost
        await _failover(own_set)
        _command(replica.port, "CONFIG", "SET", "masterauth", "")
        # The new master lacks e3 and e4: its offsets are reused by the next publications.
        reused = []
        for event in ("n1", "n2"):
            response = await _eventually(lambda e=event: _accepted(b, e))  # type: ignore[misc]
            reused.append(response.json()["offsets"][0])
        assert reused == lost
        # The watcher is not fed n1, n2 as if they followed e4: it is told to resync.
        assert await watcher.close_code(timeout=FAILOVER_TIMEOUT) == 1001
    since = {"epoch": start["epoch"], "offset": lost[-1]}
    async with connected(a, "u-1") as client:
        result = (await client.command("subscribe", channel="artist:fo", since=since))["result"]
        assert result["recovered"] is False, result
        assert result["epoch"] != start["epoch"]


async def _accepted(server: ServerProcess, event: str) -> httpx.Response:
    response = await _publish(server, event)
    assert response.status_code == 202, response.text
    return response


def _wait_replicated(port: int, timeout: float = 30.0) -> None:
    """Until a replica of ``port`` has everything written so far (a demoted master first
    has to be told by the sentinels to follow, then to sync: seconds on a busy machine)."""
    deadline = time.monotonic() + timeout
    while int(_command(port, "WAIT", "1", "1000")) != 1:
        assert time.monotonic() < deadline, f"no replica of {port} acknowledged in {timeout} s"


def test_the_fixture_names_its_master() -> None:
    assert MASTER_NAME == "rt-master"


async def test_redis_password_reaches_a_protected_set_and_a_protected_url() -> None:
    """REALTIME_REDIS_PASSWORD is the servers' password: used through the sentinels (which
    take none here) and with a URL that carries none; a wrong one is refused."""
    password = "s3cret-pw"
    with running_set(password) as sset:
        url = f"redis://127.0.0.1:{sset.master_port()}/0"
        for target in (sset.target, RedisTarget(url=url, password=password)):
            await _reached(target)
            wrong = make_client(dataclasses.replace(target, password="wrong"))
            try:
                with pytest.raises(RedisError):
                    await wrong.set("k", "v")
            finally:
                await wrong.aclose()


async def _reached(target: RedisTarget) -> None:
    """The broker, a store client and the persistence check all work at ``target``."""
    received: list[tuple[str, bytes]] = []
    broker = RedisBroker(target, max_backoff=0.5)
    await broker.start(lambda channel, payload: received.append((channel, payload)))
    client = make_client(target)
    check = PersistenceCheck(target)
    try:
        assert broker.ready
        await broker.subscribe("c")
        await broker.publish("c", b"hello")
        await _eventually(lambda: _has(received, b"hello"), timeout=5)
        await client.set("k", "v")
        assert (await check.check()).source == "config"
    finally:
        await broker.close()
        await client.aclose()
        await check.close()
