"""Redis Cluster: channels over shards with sharded pub/sub, and every part follows a
failover without a restart (real three-master cluster with replicas, tests/redis_cluster.py;
a master is SIGKILLed)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack

import httpx
import pytest
from redis.crc import key_slot

from realtime.envelope import unpack_entry
from realtime.redis_client import RedisTarget
from realtime.redis_cluster_broker import RedisClusterBroker, SlotMap
from realtime.settings import Settings
from tests.redis_cluster import ClusterSet, running_cluster
from tests.redis_cluster import eventually as _eventually
from tests.redis_server import command as _command
from tests.server import ServerProcess, connected, running_server

pytestmark = pytest.mark.timeout(120)

FAILOVER_TIMEOUT = 30.0
ARTISTS = [f"artist:{name}" for name in ("newjeans", "ive", "aespa", "bts", "twice", "seventeen")]


@pytest.fixture
def own_cluster() -> Iterator[ClusterSet]:
    """A cluster of this test's own: one of its masters gets killed."""
    with running_cluster() as cset:
        yield cset


def _shard_key(channel: str) -> bytes:
    return b"rt:{%s}" % channel.encode()


def test_settings_take_cluster_seeds_as_section_12_names_them() -> None:
    settings = Settings(redis_cluster_nodes="127.0.0.1:7000, 10.0.0.2:7001", redis_password="pw")
    assert settings.uses_redis
    assert settings.redis_target == RedisTarget(
        cluster=(("127.0.0.1", 7000), ("10.0.0.2", 7001)), password="pw"
    )
    assert settings.redis_target.is_cluster
    assert "pw" not in settings.redis_target.describe()


def test_slot_map_routes_every_slot_to_its_master() -> None:
    reply = [
        [0, 5460, [b"127.0.0.1", 7000, b"id0"], [b"127.0.0.1", 7003, b"id3"]],
        [10923, 16383, [b"", 7002, b"id2"]],
        [5461, 10922, [b"127.0.0.1", 7001, b"id1"]],
    ]
    slots = SlotMap.parse(reply, ("10.0.0.9", 7002))
    assert slots.master(0) == slots.master(5460) == ("127.0.0.1", 7000)
    assert slots.master(5461) == ("127.0.0.1", 7001)
    assert slots.master(16383) == ("10.0.0.9", 7002)  # an empty host: the node asked
    assert slots.replicas == {("127.0.0.1", 7003)}
    assert SlotMap.parse(reply[:1], ("h", 1)).master(6000) is None  # an uncovered slot
    assert slots == SlotMap.parse(list(reversed(reply)), ("10.0.0.9", 7002))


async def test_channels_spread_over_shards_one_subscriber_connection_each(
    redis_cluster: ClusterSet, cluster_target: RedisTarget
) -> None:
    """Each master carries only the channels of its slots, and each server node holds one
    pub/sub connection per master."""
    env = redis_cluster.env()
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-1") as on_a, connected(b, "u-2", binary=True) as on_b:
            for client in (on_a, on_b):
                for channel in ARTISTS:
                    await client.command("subscribe", channel=channel)
            for index, channel in enumerate(ARTISTS):
                response = await b.publish(
                    {"channel": channel, "event": "album.released", "data": {"i": index}}
                )
                assert response.status_code == 202, response.text
            for client in (on_a, on_b):
                got = {
                    (e["channel"], e["data"]["i"])
                    for e in [await client.next_pushed() for _ in ARTISTS]
                }
                assert got == {(channel, i) for i, channel in enumerate(ARTISTS)}
            masters = redis_cluster.masters()
            owners = {channel: redis_cluster.master_of(_shard_key(channel)) for channel in ARTISTS}
            assert len(set(owners.values())) >= 2, owners  # the names do spread over shards
            for port in masters:
                subscribed = {
                    c.decode() for c in _command(port, "PUBSUB", "SHARDCHANNELS", "rt:{artist:*")
                }
                assert subscribed == {
                    _shard_key(c).decode() for c, owner in owners.items() if owner == port
                }
                assert not _command(port, "PUBSUB", "CHANNELS")  # nothing on classic pub/sub
                clients = _command(port, "CLIENT", "LIST", "TYPE", "pubsub").decode().splitlines()
                assert len(clients) == 2  # one per server node


async def test_history_and_recovery_across_nodes_on_a_cluster(redis_cluster: ClusterSet) -> None:
    env = redis_cluster.env()
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-1") as client:
            positions = {}
            for channel in ARTISTS[:3]:
                positions[channel] = (await client.command("subscribe", channel=channel))["result"]
        # Published while the client is away, through the other node, with ids.
        for channel in ARTISTS[:3]:
            for i in range(3):
                body = {"channel": channel, "event": "e", "id": f"{channel}-{i}", "data": {"i": i}}
                first = await b.publish(body)
                assert first.status_code == 202, first.text
                again = await a.publish(body)  # the same id, on the other node: published once
                assert again.status_code == 202 and again.json() == first.json(), again.text
        async with connected(a, "u-1") as client:
            for channel in ARTISTS[:3]:
                start = positions[channel]
                since = {"epoch": start["epoch"], "offset": start["offset"]}
                result = (await client.command("subscribe", channel=channel, since=since))["result"]
                assert result["recovered"] is True, result
                assert [p["data"]["i"] for p in result["publications"]] == [0, 1, 2]


async def test_a_cluster_broker_follows_a_failover_other_shards_unharmed(
    own_cluster: ClusterSet,
) -> None:
    received: list[tuple[str, bytes]] = []
    moves: list[float] = []
    broker = RedisClusterBroker(own_cluster.target, max_backoff=0.5, health_check_interval=0.5)
    await broker.start(lambda c, p: received.append((c, p)), on_reconnect=lambda: moves.append(1))
    try:
        assert broker.ready and len(broker.masters) == 3
        for channel in ARTISTS:
            await broker.subscribe(channel)
        victim = ARTISTS[0]
        old = own_cluster.kill_master_of(_shard_key(victim))
        others = [c for c in ARTISTS if own_cluster.master_of(_shard_key(c)) != old]
        assert others
        # The other shards deliver while the victim's slot has no master.
        for channel in others:
            await broker.publish(channel, b"during")
            await _eventually(lambda c=channel: _has(received, c, b"during"), timeout=5)  # type: ignore[misc]
        new = await asyncio.to_thread(own_cluster.wait_failover, old, _shard_key(victim))

        async def delivered() -> None:  # at most once: until moved to the new master
            await broker.publish(victim, b"after")
            await asyncio.sleep(0.1)
            await _has(received, victim, b"after")

        await _eventually(delivered)
        assert broker.placement(victim) == ("127.0.0.1", new)
        assert broker.channels == set(ARTISTS)
        await _eventually(_ready(broker))
        assert moves, "the hub is told to fill the moved channels' gaps"
    finally:
        await broker.close()


def _ready(broker: RedisClusterBroker) -> Callable[[], Awaitable[None]]:
    async def check() -> None:
        assert broker.ready

    return check


async def _has(received: list[tuple[str, bytes]], channel: str, payload: bytes) -> None:
    if (channel, payload) not in received:
        raise AssertionError(f"{payload!r} on {channel} not received yet")


@pytest.fixture
async def two_nodes(own_cluster: ClusterSet) -> AsyncIterator[tuple[ServerProcess, ServerProcess]]:
    env = own_cluster.env()
    async with running_server(env) as a, running_server(env) as b:
        yield a, b


async def _publish(server: ServerProcess, channel: str, event: str) -> httpx.Response:
    return await server.publish({"channel": channel, "event": event, "id": event, "data": {}})


async def test_nodes_follow_a_failover_503_then_202_and_clients_resync(
    own_cluster: ClusterSet, two_nodes: tuple[ServerProcess, ServerProcess]
) -> None:
    """While the slot has no master its publishes answer 503 (not published: the retry with
    the same id publishes once); after the failover 202, without a node restart. The new
    master's replication id changes the epoch: subscribers are told to resync (1001, then
    ``recovered: false``), never fed offsets that may have been reused."""
    a, b = two_nodes
    channel = ARTISTS[0]
    async with connected(a, "u-1") as client:
        start = (await client.command("subscribe", channel=channel))["result"]
        assert (await _publish(b, channel, "e1")).status_code == 202
        assert (await client.next_pushed())["event"] == "e1"

        old = own_cluster.kill_master_of(_shard_key(channel))
        refused = await _publish(b, channel, "e2")
        assert refused.status_code == 503, refused.text
        await asyncio.to_thread(own_cluster.wait_failover, old, _shard_key(channel))

        async def accepted() -> httpx.Response:
            response = await _publish(b, channel, "e2")  # the same id, retried
            assert response.status_code == 202, response.text
            return response

        await _eventually(accepted)
        assert await client.close_code(timeout=FAILOVER_TIMEOUT) == 1001
    new = own_cluster.master_of(_shard_key(channel))
    kept = _command(new, "XRANGE", f"rt:h:{{{channel}}}", "-", "+")
    entries = [unpack_entry(1, "", fields[b"d"]) for _, fields in kept]
    events = [entry.message["event"] for entry in entries if entry is not None]
    assert events.count("e2") == 1, events  # published once, not lost
    since = {"epoch": start["epoch"], "offset": start["offset"] + 1}
    async with AsyncExitStack() as stack:
        # The first connect after the failover may be answered `unavailable` (the stores'
        # cluster client learns the new slot map from that error); the app retries.
        client = await _eventually(lambda: stack.enter_async_context(connected(a, "u-1")))
        result = (await client.command("subscribe", channel=channel, since=since))["result"]
        assert result["recovered"] is False and result["epoch"] != start["epoch"]
        assert (await _publish(b, channel, "e3")).status_code == 202
        assert (await client.next_pushed())["event"] == "e3"
    for node in (a, b):
        async with node.http() as http:
            assert (await _eventually(lambda h=http: _ready_status(h))) == 200  # type: ignore[misc]
    assert "redis cluster" in a.log()


async def _ready_status(http: httpx.AsyncClient) -> int:
    response = await http.get("/readyz")
    assert response.status_code == 200, response.text
    return response.status_code


def test_hash_tags_keep_a_channel_in_one_slot() -> None:
    """The publish script's keys and its shard channel hash alike (channel names have no
    braces: section 2's pattern)."""
    from realtime.redis_history import meta_key, result_key, stream_key

    for channel in ("artist:newjeans", "user:42", "artist:x.y-z_1"):
        slots = {
            key_slot(key)
            for key in (
                stream_key(channel),
                meta_key(channel),
                result_key(channel, "k"),
                _shard_key(channel),
            )
        }
        assert len(slots) == 1, (channel, slots)


def _node_id(port: int) -> str:
    return str(_command(port, "CLUSTER", "MYID").decode())


def _migrate_keys(slot: int, source: int, target: int) -> None:
    """The first half of a reshard: ``slot`` migrating from the master on ``source`` to the
    one on ``target``, its keys moved (the source answers ASK for them now)."""
    _command(target, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", _node_id(source))
    _command(source, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", _node_id(target))
    while keys := _command(source, "CLUSTER", "GETKEYSINSLOT", str(slot), "100"):
        names = [key.decode() for key in keys]
        _command(source, "MIGRATE", "127.0.0.1", str(target), "", "0", "5000", "KEYS", *names)


def _assign_slot(cluster: ClusterSet, slot: int, target: int) -> None:
    """The second half: every master says ``target`` serves ``slot``."""
    target_id = _node_id(target)
    for port in cluster.masters():
        _command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", target_id)


def _migrate_slot(cluster: ClusterSet, slot: int, source: int, target: int) -> None:
    """Move ``slot`` with its keys from the master on ``source`` to the one on ``target``,
    as ``redis-cli --cluster reshard`` does."""
    _migrate_keys(slot, source, target)
    _assign_slot(cluster, slot, target)


async def test_a_slot_moved_to_another_master_is_followed(own_cluster: ClusterSet) -> None:
    """Resharding: the old master drops the shard channel (``sunsubscribe``), publishes are
    answered MOVED; the broker re-reads the map, subscribes on the new master, and the
    channel's history and offsets move with its keys."""
    from realtime.history import Published
    from realtime.redis_history import RedisHistory
    from tests.test_history_contract import item

    received: list[tuple[str, bytes]] = []
    broker = RedisClusterBroker(own_cluster.target, max_backoff=0.5, health_check_interval=30)
    await broker.start(lambda c, p: received.append((c, p)))
    history = RedisHistory(broker)
    channel = ARTISTS[1]
    try:
        await broker.subscribe(channel)
        before = await history.publish([item(channel, f"e{i}") for i in range(3)])
        assert [o.offset for o in before if isinstance(o, Published)] == [1, 2, 3]
        slot = key_slot(_shard_key(channel))
        source = own_cluster.master_of(_shard_key(channel))
        target = next(port for port in own_cluster.masters() if port != source)
        await asyncio.to_thread(_migrate_slot, own_cluster, slot, source, target)

        async def moved() -> None:
            assert broker.placement(channel) == ("127.0.0.1", target)

        await _eventually(moved, timeout=10)  # told by the old master, not by the 30 s poll
        after = await history.publish([item(channel, f"e{i}") for i in range(3, 5)])
        assert [o.offset for o in after if isinstance(o, Published)] == [4, 5]
        page = await history.read(channel, 0, 10)
        assert [e.offset for e in page.entries] == [1, 2, 3, 4, 5]

        async def all_delivered() -> None:
            assert len([p for c, p in received if c == channel]) == 5

        await _eventually(all_delivered, timeout=10)
        offsets = [int(p.split(b" ", 1)[0]) for c, p in received if c == channel]
        assert offsets == [1, 2, 3, 4, 5]
    finally:
        await history.close()
        await broker.close()


async def test_a_publish_during_a_migration_follows_ask_and_the_gap_is_told(
    own_cluster: ClusterSet,
) -> None:
    """Mid-reshard the old master answers ASK for the moved keys: a publish runs on the new
    master (ASKING), once, with the next offset; one whose idempotency key is new there is
    refused TRYAGAIN (some of its keys are not moved yet): not published, and its retry
    after the reshard publishes it once. The ASKed publication's SPUBLISH reaches nobody
    (the node is subscribed on the old master), so once the channel moves the hub is told
    to fill the gap from history (``on_reconnect``)."""
    from realtime.history import HistoryUnavailable, Published
    from realtime.redis_history import RedisHistory
    from tests.test_history_contract import item

    received: list[tuple[str, bytes]] = []
    moves: list[int] = []
    broker = RedisClusterBroker(own_cluster.target, max_backoff=0.5, health_check_interval=30)
    await broker.start(lambda c, p: received.append((c, p)), on_reconnect=lambda: moves.append(1))
    history = RedisHistory(broker)
    channel = ARTISTS[2]

    def live() -> list[int]:
        return [int(p.split(b" ", 1)[0]) for c, p in received if c == channel]

    try:
        await broker.subscribe(channel)
        await history.publish([item(channel, f"e{i}") for i in range(2)])
        slot = key_slot(_shard_key(channel))
        source = own_cluster.master_of(_shard_key(channel))
        target = next(port for port in own_cluster.masters() if port != source)
        await asyncio.to_thread(_migrate_keys, slot, source, target)
        (during,) = await history.publish([item(channel, "e2")])
        assert isinstance(during, Published) and during.offset == 3
        (refused,) = await history.publish([item(channel, "e3", key="k3")])
        assert isinstance(refused, HistoryUnavailable) and "TRYAGAIN" in str(refused)
        await asyncio.to_thread(_assign_slot, own_cluster, slot, target)

        async def moved() -> None:
            assert broker.placement(channel) == ("127.0.0.1", target) and moves

        await _eventually(moved, timeout=10)
        assert live() == [1, 2]  # offset 3 is for the hub's gap fill
        (retried,) = await history.publish([item(channel, "e3", key="k3")])
        assert isinstance(retried, Published) and retried.offset == 4 and not retried.duplicate
        page = await history.read(channel, 0, 10)
        assert [e.offset for e in page.entries] == [1, 2, 3, 4]

        async def delivered() -> None:
            assert live() == [1, 2, 4]

        await _eventually(delivered, timeout=10)
    finally:
        await history.close()
        await broker.close()
