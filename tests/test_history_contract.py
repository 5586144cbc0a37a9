"""The History contract (realtime/history.py), run against every implementation.

MemoryHistory over a MemoryBroker, and RedisHistory over a RedisBroker on a real
redis-server; Redis-only faults (a stalled Redis) below the suite.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis.asyncio as aredis

from realtime.broker import MemoryBroker
from realtime.envelope import pack_event, unpack
from realtime.history import (
    History,
    HistoryUnavailable,
    MemoryHistory,
    Publication,
    Published,
)
from realtime.redis_broker import RedisBroker
from realtime.redis_client import RedisTarget
from realtime.redis_cluster_broker import RedisClusterBroker
from realtime.redis_history import _READ, RedisHistory, meta_key
from realtime.tiers import HistoryLimits
from tests.redis_sentinel import redis_where
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)

KINDS = ["memory", "redis", "sentinel", "cluster"]
LIMITS = HistoryLimits(size=5, ttl_s=3600)


class Received:
    """The broker handler: what each channel received, decoded."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int, str, dict[str, Any]]] = []

    def __call__(self, channel: str, payload: bytes) -> None:
        delivery = unpack(payload)
        assert delivery is not None
        self.items.append((channel, delivery.offset, delivery.epoch, delivery.message))

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.items) < count:  # noqa: ASYNC110 - polls a list the broker fills
                await asyncio.sleep(0.01)


@asynccontextmanager
async def make_history(
    kind: str, url: str | RedisTarget | None, *, result_ttl: float = 600.0, timeout: float = 4.5
) -> AsyncIterator[tuple[History, Received, Callable[[str], Any]]]:
    received = Received()
    if kind == "memory":
        broker = MemoryBroker()
        await broker.start(received)
        history: History = MemoryHistory(broker.deliver, result_ttl=result_ttl)
        try:
            yield history, received, broker.subscribe
        finally:
            await history.close()
            await broker.close()
        return
    assert url is not None
    redis: RedisBroker | RedisClusterBroker
    if isinstance(url, RedisTarget) and url.is_cluster:
        redis = RedisClusterBroker(url, max_backoff=0.5, health_check_interval=1.0)
    else:
        redis = RedisBroker(url, max_backoff=0.5, health_check_interval=1.0)
    await redis.start(received)
    history = RedisHistory(redis, result_ttl=result_ttl, timeout=timeout)
    try:
        yield history, received, redis.subscribe
    finally:
        await history.close()
        await redis.close()


def item(
    channel: str, eid: str, *, key: str | None = None, limits: HistoryLimits = LIMITS
) -> Publication:
    return Publication(channel, pack_event(channel, "e", eid, 1, {"eid": eid}), limits, key=key)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest, redis_server: RedisServer) -> str:
    return str(request.param)


@pytest.fixture
def url(kind: str, request: pytest.FixtureRequest) -> str | RedisTarget | None:
    return None if kind == "memory" else redis_where(kind, request)


async def test_offsets_grow_by_one_and_are_delivered_framed(kind: str, url: str | None) -> None:
    async with make_history(kind, url) as (history, received, subscribe):
        await subscribe("artist:a")
        empty = await history.read("artist:a", None, 10)
        assert empty.position.offset == 0 and empty.entries == []
        outcomes = await history.publish([item("artist:a", f"e{i}") for i in range(3)])
        assert [o.offset for o in outcomes if isinstance(o, Published)] == [1, 2, 3]
        epochs = {o.epoch for o in outcomes if isinstance(o, Published)}
        assert epochs == {empty.position.epoch}  # a read fixes the epoch for what follows
        await received.wait_for(3)
        assert [(c, o, e, m["id"]) for c, o, e, m in received.items] == [
            ("artist:a", i + 1, empty.position.epoch, f"e{i}") for i in range(3)
        ]
        assert [m["offset"] for *_, m in received.items] == [1, 2, 3]


async def test_reads_racing_publishes_stop_at_their_position(
    kind: str, url: str | RedisTarget | None
) -> None:
    """A page holds exactly the publications up to its position, none past it, even while
    other publications land (on Redis the entries are read right after the position)."""
    async with make_history(kind, url) as (history, _, _sub):
        await history.publish([item("artist:race", "e0")])

        async def publish() -> None:
            for i in range(1, 120):
                await history.publish([item("artist:race", f"e{i}")])
                await asyncio.sleep(0)

        writer = asyncio.create_task(publish())
        pages = []
        while not writer.done():
            pages.append(await history.read("artist:race", 0, 1000))
            pages.append(await history.read("artist:race", None, 5))
            await asyncio.sleep(0)  # the in-process history never waits: let the writer run
        await writer
        assert len(pages) > 4
        for page in pages:
            offsets = [e.offset for e in page.entries]
            top = page.position.offset
            assert offsets and offsets[-1] == top, (offsets, top)
            assert offsets == list(range(offsets[0], top + 1))


async def test_read_since_latest_and_the_size_bound(kind: str, url: str | None) -> None:
    async with make_history(kind, url) as (history, _, _sub):
        await history.publish([item("artist:b", f"e{i}") for i in range(1, 9)])
        page = await history.read("artist:b", None, 3)
        assert page.position.offset == 8
        assert [e.offset for e in page.entries] == [6, 7, 8]  # the latest, oldest first
        page = await history.read("artist:b", 4, 2)
        assert [e.offset for e in page.entries] == [5, 6]
        page = await history.read("artist:b", 0, 100)
        assert [e.offset for e in page.entries] == [4, 5, 6, 7, 8]  # size 5 kept
        assert (await history.read("artist:b", 8, 10)).entries == []
        only = await history.read("artist:b", None, 0)
        assert only.entries == [] and only.position == page.position
        assert unpack_payload(page.entries[-1].payload)["id"] == "e8"


def unpack_payload(payload: bytes) -> dict[str, Any]:
    import msgpack

    message = msgpack.unpackb(payload)["m"]
    assert isinstance(message, dict)
    return message


async def test_a_duplicate_key_gets_its_first_offset_and_is_not_delivered(
    kind: str, url: str | None
) -> None:
    async with make_history(kind, url) as (history, received, subscribe):
        await subscribe("user:1")
        first = await history.publish([item("user:1", "x", key="order-1")])
        again = await history.publish(
            [item("user:1", "x", key="order-1"), item("user:1", "y", key="order-2")]
        )
        assert first == [Published(1, first[0].epoch)]  # type: ignore[union-attr]
        assert again[0] == Published(1, first[0].epoch, duplicate=True)  # type: ignore[union-attr]
        assert isinstance(again[1], Published) and again[1].offset == 2
        # The key is per channel: the same id on another channel is another publication.
        other = await history.publish([item("user:2", "x", key="order-1")])
        assert isinstance(other[0], Published) and not other[0].duplicate
        await received.wait_for(2)
        await asyncio.sleep(0.1)
        assert [m["id"] for c, *_, m in received.items if c == "user:1"] == ["x", "y"]


async def test_channels_are_independent_and_keep_list_order(kind: str, url: str | None) -> None:
    async with make_history(kind, url) as (history, received, subscribe):
        for channel in ("artist:c", "artist:d"):
            await subscribe(channel)
        batch = [item("artist:c" if i % 2 else "artist:d", f"e{i}") for i in range(20)]
        outcomes = await history.publish(batch)
        assert all(isinstance(o, Published) for o in outcomes)
        await received.wait_for(20)
        for channel in ("artist:c", "artist:d"):
            offsets = [o for c, o, *_ in received.items if c == channel]
            assert offsets == list(range(1, 11))


async def test_an_expired_history_starts_a_new_epoch(kind: str, url: str | None) -> None:
    short = HistoryLimits(size=10, ttl_s=1)
    async with make_history(kind, url) as (history, _, _sub):
        (first,) = await history.publish([item("artist:e", "a", limits=short)])
        assert isinstance(first, Published)
        await asyncio.sleep(1.3)
        page = await history.read("artist:e", 0, 10)
        assert page.entries == []  # the history expired
        # Memory drops the epoch with it; Redis keeps epoch and offset (the meta key lives
        # longer), so the client sees a history that no longer holds offset 1.
        if kind == "memory":
            assert page.position.epoch != first.epoch and page.position.offset == 0
        else:
            assert page.position == type(page.position)(first.epoch, 1)


async def test_closed_history_refuses(kind: str, url: str | None) -> None:
    async with make_history(kind, url) as (history, _, _sub):
        await history.close()
        (outcome,) = await history.publish([item("artist:f", "a")])
        assert isinstance(outcome, HistoryUnavailable)
        with pytest.raises(HistoryUnavailable):
            await history.read("artist:f", None, 1)


# ------------------------------------------------------------------------------ Redis faults


async def test_another_replication_id_starts_a_new_epoch_offsets_go_on(redis_url: str) -> None:
    """What a failover does to a channel: the meta was written under another master's
    replication id, so the next read or publish takes a new epoch (offsets continue)."""
    client = aredis.Redis.from_url(redis_url)
    try:
        async with make_history("redis", redis_url) as (history, _, _sub):
            await history.publish([item("artist:r", f"e{i}") for i in range(3)])
            before = (await history.read("artist:r", None, 0)).position
            replid = (await client.info("replication"))["master_replid"]
            meta = await client.hgetall(meta_key("artist:r"))
            assert meta[b"r"] == replid.encode(), (meta, await client.keys("*"), redis_url)
            await client.hset(meta_key("artist:r"), "r", "a-promoted-replica-had-this")
            after = (await history.read("artist:r", None, 0)).position
            assert after.epoch != before.epoch and after.offset == before.offset == 3
            (published,) = await history.publish([item("artist:r", "e3")])
            assert isinstance(published, Published)
            assert (published.epoch, published.offset) == (after.epoch, 4)  # stable again
        # A caller that does not know the id ('' as ARGV[3]): the script asks INFO itself.
        await client.hset(meta_key("artist:r"), "r", "another")
        source = _READ.source.decode()
        reply = await client.eval(source, 1, meta_key("artist:r"), "fresh-epoch", 60, "")
        assert reply[0] == b"fresh-epoch"
        assert await client.hget(meta_key("artist:r"), "r") == replid.encode()
    finally:
        await client.aclose()


async def test_a_read_after_the_scripts_were_flushed_loads_them_again(redis_url: str) -> None:
    """A restarted Redis has no scripts: the read's EVALSHA answers NOSCRIPT, and the
    position (EVAL) and its entries are read again, in one pipelined write."""
    client = aredis.Redis.from_url(redis_url)
    try:
        async with make_history("redis", redis_url) as (history, _, _sub):
            await history.publish([item("artist:n", f"e{i}") for i in range(4)])
            before = await history.read("artist:n", 1, 10)
            await client.script_flush()
            after = await history.read("artist:n", 1, 10)
            assert after == before
            assert [e.offset for e in after.entries] == [2, 3, 4]
            assert after.position.offset == 4
            assert await client.script_exists(_READ.sha.decode()) == [True]
    finally:
        await client.aclose()


@pytest.mark.timeout(60)
async def test_a_publish_that_redis_reaches_too_late_is_not_published(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Redis frozen (SIGSTOP) past the publish deadline: 503, and after SIGCONT the queued
    script does nothing; the caller's retry of the same id publishes it once."""
    async with make_history("redis", redis_url, timeout=1.0) as (history, received, subscribe):
        await subscribe("user:9")
        await history.publish([item("user:9", "before", key="k0")])
        await received.wait_for(1)
        redis_server.pause()
        try:
            (outcome,) = await history.publish([item("user:9", "stalled", key="k1")])
            assert isinstance(outcome, HistoryUnavailable)
            with pytest.raises(HistoryUnavailable):  # a read too: no answer in time
                await history.read("user:9", 0, 10)
        finally:
            redis_server.resume()
        await asyncio.sleep(0.5)  # the queued script, if any, runs now
        page = await history.read("user:9", 0, 10)
        assert [e.offset for e in page.entries] == [1]  # nothing more was kept
        async with asyncio.timeout(20):
            while True:  # the retry, as a caller would after its 503
                (retry,) = await history.publish([item("user:9", "stalled", key="k1")])
                if isinstance(retry, Published):
                    break
                await asyncio.sleep(0.2)
        assert retry.offset == 2 and not retry.duplicate
        await received.wait_for(2)
        await asyncio.sleep(0.2)
        assert [m["id"] for *_, m in received.items] == ["before", "stalled"]
