"""The Broker contract (realtime/broker.py), run against every implementation.

MemoryBroker, and RedisBroker with each RESP parser, on a real redis-server.
Redis-only behaviour (several nodes, losing Redis, one connection per node) and
the sans-I/O RESP reader are tested below the contract suite.
"""

from __future__ import annotations

import asyncio
import importlib.util
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

import pytest
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.broker import Broker, BrokerUnavailable, MemoryBroker
from realtime.redis_broker import RedisBroker, Slots
from realtime.redis_client import RedisTarget, backoff_delay
from realtime.redis_cluster_broker import RedisClusterBroker
from realtime.resp import (
    RedisProtocolError,
    RedisReplyError,
    RespConnection,
    RespReader,
    make_reader,
    pack_command,
)
from tests.redis_cluster import ClusterSet
from tests.redis_sentinel import data_url, redis_where
from tests.redis_server import RedisServer

HAVE_HIREDIS = importlib.util.find_spec("hiredis") is not None
REDIS_KINDS = ["redis-python", "redis-hiredis"]
KINDS = ["memory", *REDIS_KINDS, "sentinel", "cluster"]


class Collector:
    """A broker handler that records deliveries and lets a test wait for them."""

    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self._event = asyncio.Event()

    def __call__(self, channel: str, payload: bytes) -> None:
        self.items.append((channel, payload))
        self._event.set()

    def on(self, channel: str) -> list[bytes]:
        return [payload for name, payload in self.items if name == channel]

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.items) < count:
                self._event.clear()
                await self._event.wait()


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls state that has no event to await
            await asyncio.sleep(0.02)


MakeBroker = Callable[..., Awaitable[tuple[Broker, Collector]]]


def _redis_broker(
    url: str | RedisTarget, kind: str, **options: Any
) -> RedisBroker | RedisClusterBroker:
    parser: Literal["hiredis", "python"] = "hiredis" if kind == "redis-hiredis" else "python"
    options.setdefault("max_backoff", 0.5)
    options.setdefault("health_check_interval", 1.0)
    if kind == "cluster":
        assert isinstance(url, RedisTarget)
        return RedisClusterBroker(url, **options)
    return RedisBroker(url, parser=parser, **options)


def _skip_without_hiredis(kind: str) -> str:
    if kind == "redis-hiredis" and not HAVE_HIREDIS:
        pytest.skip("hiredis is not installed: the pure-Python parser is tested instead")
    return kind


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return _skip_without_hiredis(request.param)


@pytest.fixture(params=REDIS_KINDS)
def redis_kind(request: pytest.FixtureRequest) -> str:
    return _skip_without_hiredis(request.param)


async def _factory(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    brokers: list[Broker] = []
    url = redis_where(kind, request) if kind != "memory" else ""

    async def make(**options: Any) -> tuple[Broker, Collector]:
        broker: Broker = MemoryBroker() if kind == "memory" else _redis_broker(url, kind, **options)
        collector = Collector()
        await broker.start(collector)
        brokers.append(broker)
        return broker, collector

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
async def make_broker(kind: str, request: pytest.FixtureRequest) -> AsyncIterator[MakeBroker]:
    """Started brokers of every kind (Redis ones share one Redis: several nodes), closed after."""
    async for make in _factory(kind, request):
        yield make


@pytest.fixture
async def make_redis_broker(
    redis_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[MakeBroker]:
    """Started RedisBrokers (several nodes on one Redis), closed after."""
    async for make in _factory(redis_kind, request):
        yield make


async def _numsub(url: str, channel: str) -> int:
    client = aredis.Redis.from_url(url)
    try:
        counts = await client.pubsub_numsub(b"rt:" + channel.encode())
        return int(counts[0][1])
    finally:
        await client.aclose()


async def _shard_numsub(request: pytest.FixtureRequest, channel: str) -> int:
    """Subscribers of ``channel``'s shard channel on the master of its slot."""
    cluster: ClusterSet = request.getfixturevalue("redis_cluster")
    key = b"rt:{%s}" % channel.encode()
    client = aredis.Redis(port=cluster.master_of(key))
    try:
        counts = await client.execute_command("PUBSUB", "SHARDNUMSUB", key)  # type: ignore[no-untyped-call]
        return int(counts[1])
    finally:
        await client.aclose()


# --------------------------------------------------------------------------- contract


async def test_subscribe_then_publish_is_delivered(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    assert broker.ready
    await broker.subscribe("room:a")
    await broker.publish("room:a", b"hello")
    await got.wait_for(1)
    assert got.items == [("room:a", b"hello")]


async def test_one_publisher_order_is_kept(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.subscribe("seq")
    sent = [b"%d" % i for i in range(500)]
    for payload in sent:
        await broker.publish("seq", payload)
    await got.wait_for(len(sent))
    assert got.on("seq") == sent


async def test_concurrent_publishers_each_keep_their_order(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.subscribe("many")

    async def publisher(name: bytes) -> None:
        for i in range(200):
            await broker.publish("many", b"%s:%d" % (name, i))

    names = [b"p%d" % n for n in range(8)]
    await asyncio.gather(*(publisher(name) for name in names))
    await got.wait_for(200 * len(names))
    for name in names:
        mine = [p for p in got.on("many") if p.startswith(name + b":")]
        assert mine == [b"%s:%d" % (name, i) for i in range(200)]


async def test_unsubscribe_stops_delivery(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.subscribe("gone")
    await broker.subscribe("marker")
    await broker.publish("gone", b"before")
    await got.wait_for(1)  # (a message still unread when unsubscribe is called is dropped)
    await broker.unsubscribe("gone")
    await broker.publish("gone", b"after")
    await broker.publish("marker", b"m")
    await got.wait_for(2)
    await asyncio.sleep(0.05)
    assert got.items == [("gone", b"before"), ("marker", b"m")]


async def test_unsubscribed_channels_are_not_delivered(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.subscribe("mine")
    await broker.publish("other", b"x")
    await broker.publish("mine", b"y")
    await got.wait_for(1)
    await asyncio.sleep(0.05)
    assert got.items == [("mine", b"y")]


async def test_subscribe_and_unsubscribe_are_idempotent(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.unsubscribe("never")  # unknown channel: no error
    await broker.subscribe("twice")
    await broker.subscribe("twice")
    await broker.publish("twice", b"1")
    await broker.subscribe("marker")
    await broker.publish("marker", b"m")
    await got.wait_for(2)
    await asyncio.sleep(0.05)
    assert got.on("twice") == [b"1"]  # once, not once per subscribe
    await broker.unsubscribe("twice")
    await broker.unsubscribe("twice")
    await broker.publish("twice", b"2")
    await broker.publish("marker", b"m2")
    await got.wait_for(3)
    assert got.on("twice") == [b"1"]


async def test_payload_bytes_arrive_intact(make_broker: MakeBroker) -> None:
    broker, got = await make_broker()
    await broker.subscribe("bin")
    payloads = [b"", b"\r\n*3\r\n$7\r\nmessage\r\n", bytes(range(256)), random.randbytes(1 << 20)]
    for payload in payloads:
        await broker.publish("bin", payload)
    await got.wait_for(len(payloads))
    assert got.on("bin") == payloads


async def test_concurrent_subscribe_unsubscribe_end_in_the_last_state(
    make_broker: MakeBroker, kind: str, request: pytest.FixtureRequest
) -> None:
    broker, got = await make_broker()
    rng = random.Random(7)
    for round_ in range(12):
        channel = f"race:{round_}"
        ops = [rng.choice([broker.subscribe, broker.unsubscribe]) for _ in range(rng.randint(2, 7))]
        await asyncio.gather(*(op(channel) for op in ops))
        want = ops[-1] == broker.subscribe
        if kind == "cluster":
            assert await _shard_numsub(request, channel) == int(want)
        elif kind != "memory":
            where = redis_where(kind, request)
            assert await _numsub(data_url(where, request), channel) == int(want)
        await broker.subscribe("marker")
        before = len(got.items)
        await broker.publish(channel, b"probe")
        await broker.publish("marker", b"m")
        await got.wait_for(before + 1 + int(want))
        assert got.on(channel) == ([b"probe"] if want else [])
        await broker.unsubscribe(channel)


async def test_redis_handler_errors_do_not_stop_delivery(redis_kind: str, redis_url: str) -> None:
    seen: list[bytes] = []

    def handler(channel: str, payload: bytes) -> None:
        seen.append(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    broker = _redis_broker(redis_url, redis_kind)
    try:
        await broker.start(handler)
        await broker.subscribe("c")
        await broker.publish("c", b"boom")
        await broker.publish("c", b"ok")
        await wait_until(lambda: len(seen) == 2, 10)
        assert seen == [b"boom", b"ok"]
        assert broker.ready
    finally:
        await broker.close()


async def test_close_stops_background_work(make_broker: MakeBroker) -> None:
    before = asyncio.all_tasks()
    broker, _ = await make_broker()
    await broker.subscribe("x")
    await broker.close()
    assert asyncio.all_tasks() == before
    assert not broker.ready
    with pytest.raises(BrokerUnavailable):
        await broker.publish("x", b"after close")


# --------------------------------------------------------------------------- Redis only


async def test_two_nodes_share_channels(make_redis_broker: MakeBroker) -> None:
    node_a, got_a = await make_redis_broker()
    node_b, got_b = await make_redis_broker()
    await node_a.subscribe("shared")
    await node_b.subscribe("shared")
    await node_b.subscribe("only-b")
    await node_a.publish("shared", b"from a")
    await node_b.publish("shared", b"from b")
    await node_a.publish("only-b", b"to b")
    await got_a.wait_for(2)
    await got_b.wait_for(3)
    assert got_a.items == [("shared", b"from a"), ("shared", b"from b")]
    assert sorted(got_b.items) == sorted(
        [("shared", b"from a"), ("shared", b"from b"), ("only-b", b"to b")]
    )


async def test_one_pubsub_connection_per_node(
    make_redis_broker: MakeBroker, redis_url: str
) -> None:
    broker, _ = await make_redis_broker()
    channels = [f"c{i}" for i in range(50)]
    await asyncio.gather(*(broker.subscribe(c) for c in channels))
    client = aredis.Redis.from_url(redis_url)
    try:
        subscribers = [c for c in await client.client_list() if int(c["sub"]) > 0]
    finally:
        await client.aclose()
    assert [int(c["sub"]) for c in subscribers] == [len(channels)]


async def test_redis_restart_mid_stream(
    make_redis_broker: MakeBroker, redis_server: RedisServer, redis_url: str
) -> None:
    reconnects: list[int] = []
    broker, got = await make_redis_broker(on_reconnect=lambda: reconnects.append(1))
    other, _ = await make_redis_broker()
    await broker.subscribe("stream")
    await broker.subscribe("later-dropped")
    for i in range(50):
        await other.publish("stream", b"%d" % i)
    await got.wait_for(50)

    redis_server.kill()
    await wait_until(lambda: not broker.ready)
    with pytest.raises(BrokerUnavailable):
        await broker.publish("stream", b"lost")
    with pytest.raises(BrokerUnavailable):
        await broker.subscribe("while-down")
    await broker.unsubscribe("later-dropped")  # while down: must not come back

    redis_server.restart()
    await wait_until(lambda: broker.ready and other.ready)
    assert reconnects == [1]
    for i in range(50, 100):
        await other.publish("stream", b"%d" % i)
    await other.publish("later-dropped", b"no")
    await other.publish("while-down", b"no")
    await got.wait_for(100)
    await asyncio.sleep(0.1)
    assert got.on("stream") == [b"%d" % i for i in range(100)]
    assert len(got.items) == 100
    assert await _numsub(redis_url, "stream") == 1
    assert await _numsub(redis_url, "later-dropped") == 0


@pytest.mark.timeout(40)
async def test_hung_redis_publish_is_refused_and_ready_flips(
    make_redis_broker: MakeBroker, redis_server: RedisServer
) -> None:
    broker, got = await make_redis_broker(timeout=1.0, health_check_interval=0.5, max_inflight=2)
    await broker.subscribe("h")
    await broker.publish("h", b"before")
    await got.wait_for(1)
    redis_server.pause()
    try:
        started = time.monotonic()
        results = await asyncio.gather(
            *(broker.publish("h", b"unanswered") for _ in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, BrokerUnavailable) for r in results), results
        assert time.monotonic() - started < 10
        await wait_until(lambda: not broker.ready)  # the PING health check gave up
    finally:
        redis_server.resume()
    await wait_until(lambda: broker.ready)
    await broker.publish("h", b"after")
    await wait_until(lambda: b"after" in got.on("h"))
    assert got.on("h")[0] == b"before"


async def test_start_while_redis_is_down_then_it_comes_up(
    redis_kind: str, redis_server: RedisServer, redis_url: str
) -> None:
    redis_server.kill()
    got = Collector()
    broker = _redis_broker(redis_url, redis_kind)
    try:
        await broker.start(got)
        assert not broker.ready
        with pytest.raises(BrokerUnavailable):
            await broker.publish("x", b"1")
        redis_server.restart()
        await wait_until(lambda: broker.ready)
        await broker.subscribe("x")
        await broker.publish("x", b"2")
        await got.wait_for(1)
        assert got.items == [("x", b"2")]
    finally:
        await broker.close()


async def test_a_connection_times_out_each_command_at_its_own_deadline(
    redis_server: RedisServer,
) -> None:
    """One timer per connection: a command sent after another but due before it times out
    first; a command without a time-out waits; late replies are read and dropped, in order."""
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: RespConnection(make_reader("python")(), {}, lambda channel, payload: None),
        "127.0.0.1",
        redis_server.port,
    )
    try:
        assert await conn.command(b"PING", timeout=5.0) == b"PONG"
        redis_server.pause()
        try:
            untimed = conn.request(b"ECHO", b"untimed")
            later = conn.request(b"ECHO", b"later", timeout=60.0)
            sooner = conn.request(b"ECHO", b"sooner", timeout=0.2)
            with pytest.raises(TimeoutError):
                await sooner
            assert not untimed.done() and not later.done()
        finally:
            redis_server.resume()
        assert await untimed == b"untimed"
        assert await later == b"later"
        # The reply to the timed-out command was read and dropped: the next gets its own.
        assert await conn.command(b"ECHO", b"next", timeout=5.0) == b"next"
    finally:
        conn.abort()
        await conn.lost


async def test_slots_bound_hand_over_in_order_and_survive_cancelled_waiters() -> None:
    slots = Slots(1)
    assert slots.take() and not slots.take()
    first = asyncio.ensure_future(slots.wait())
    cancelled = asyncio.ensure_future(slots.wait())
    last = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    cancelled.cancel()  # while waiting: it holds nothing
    await asyncio.sleep(0)
    slots.give()  # to ``first``
    await first
    assert not last.done() and slots.free == 0
    slots.give()  # to ``last`` (the cancelled one is skipped)
    await last
    assert slots.free == 0
    handed = asyncio.ensure_future(slots.wait())
    after = asyncio.ensure_future(slots.wait())
    await asyncio.sleep(0)
    slots.give()  # handed to ``handed``, which is cancelled before it runs: passed on
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    await after
    slots.give()
    assert slots.free == 1 and slots.take()


@settings(max_examples=200, deadline=None)
@given(args=st.lists(st.binary(max_size=1500), min_size=1, max_size=8))
def test_pack_command_is_resp2_arrays_of_bulk_strings(args: list[bytes]) -> None:
    packed = pack_command(*args)
    assert packed == b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(arg), arg) for arg in args
    )
    reader = RespReader()
    reader.feed(packed)
    assert reader.gets() == args


# --------------------------------------------------------------------------- sans-I/O parts

_REPLY = st.recursive(
    st.one_of(
        st.binary(max_size=64),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.none(),
        st.text(alphabet="abc XYZ", max_size=20).map(lambda s: RedisReplyError("ERR " + s)),
    ),
    lambda inner: st.lists(inner, max_size=4),
    max_leaves=12,
)


def _encode(value: object, *, simple: bool = False) -> bytes:
    if isinstance(value, RedisReplyError):
        return b"-%s\r\n" % str(value).encode()
    if isinstance(value, bytes):
        if simple and b"\r" not in value and b"\n" not in value:
            return b"+%s\r\n" % value
        return b"$%d\r\n%s\r\n" % (len(value), value)
    if isinstance(value, int):
        return b":%d\r\n" % value
    if value is None:
        return b"$-1\r\n"
    assert isinstance(value, list)
    return b"*%d\r\n" % len(value) + b"".join(_encode(v) for v in value)


def _norm(value: object) -> object:
    if isinstance(value, RedisReplyError):
        return ("error", str(value))
    if isinstance(value, list):
        return [_norm(v) for v in value]
    return value


def _read_all(reader: Any, data: bytes, cuts: list[int]) -> list[object]:
    out: list[object] = []
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        reader.feed(data[start:cut])
        start = cut
        while (reply := reader.gets()) is not False:
            out.append(_norm(reply))
    return out


@settings(max_examples=200, deadline=None)
@given(
    replies=st.lists(
        st.one_of(
            _REPLY,
            st.tuples(st.binary(min_size=1, max_size=20), st.binary(max_size=300)).map(
                lambda cp: [b"message", b"rt:" + cp[0], cp[1]]
            ),
        ),
        max_size=20,
    ),
    simple=st.booleans(),
    data=st.data(),
)
def test_resp_readers_parse_any_split(replies: list[object], simple: bool, data: Any) -> None:
    wire = b"".join(_encode(r, simple=simple) for r in replies)
    cuts = data.draw(st.lists(st.integers(0, max(len(wire), 0)), max_size=30))
    expected = [_norm(r) for r in replies]
    assert _read_all(RespReader(), wire, cuts) == expected
    if HAVE_HIREDIS:
        assert _read_all(make_reader("hiredis")(), wire, cuts) == expected


def test_resp_reader_byte_by_byte_and_large_payload() -> None:
    payload = random.randbytes(200_000)
    wire = pack_command(b"message", b"rt:big", payload) + b"+OK\r\n"
    reader = RespReader()
    replies: list[object] = []
    for i in range(0, len(wire), 997):
        reader.feed(wire[i : i + 997])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    assert replies == [[b"message", b"rt:big", payload], b"OK"]
    small = pack_command(b"message", b"rt:c", b"xy")
    replies = []
    for i in range(len(small)):
        reader.feed(small[i : i + 1])
        while (reply := reader.gets()) is not False:
            replies.append(reply)
    assert replies == [[b"message", b"rt:c", b"xy"]]


def test_resp_reader_rejects_garbage() -> None:
    reader = RespReader()
    reader.feed(b"?what\r\n")
    with pytest.raises(RedisProtocolError):
        reader.gets()


def test_backoff_grows_is_capped_and_jittered() -> None:
    low = [backoff_delay(a, cap=5.0, rand=lambda: 0.0) for a in range(12)]
    high = [backoff_delay(a, cap=5.0, rand=lambda: 1.0) for a in range(12)]
    assert low == sorted(low)
    assert high[-1] == 5.0
    assert low[-1] == 2.5
    assert all(lo * 2 == pytest.approx(hi) for lo, hi in zip(low, high, strict=True))
    assert high[0] < 0.2
    assert backoff_delay(10_000, cap=5.0) <= 5.0


async def test_pubsub_messages_are_handed_over_next_turn_in_order_and_before_a_reply() -> None:
    """Messages read are handed to the handler in the loop turn after the read, after the
    callbacks queued before it; a reply that follows messages in the stream comes after
    them (the order read)."""
    seen: list[object] = []
    closed = asyncio.Event()
    chunks: list[bytes] = []

    def message(payload: bytes) -> bytes:
        return pack_command(b"message", b"rt:a", payload)  # a RESP array, as Redis sends

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(64)  # the ECHO
        for chunk in chunks:
            writer.write(chunk)
            await writer.drain()
        await reader.read(64)  # until the client closes
        writer.close()
        closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: RespConnection(
            make_reader("python")(), {b"rt:a": "a"}, lambda channel, payload: seen.append(payload)
        ),
        "127.0.0.1",
        port,
    )
    try:
        # Two messages, then the reply to the ECHO, in one write: the messages first.
        chunks.append(message(b"1") + message(b"2") + b"$4\r\necho\r\n")
        echo = conn.request(b"ECHO", b"echo")
        assert await echo == b"echo"
        assert seen == [b"1", b"2"]
        # Messages alone: nothing from data_received itself; after what was queued before.
        seen.clear()
        conn.data_received(message(b"3") + message(b"4"))
        loop.call_soon(seen.append, "queued after the read")
        assert seen == []
        await asyncio.sleep(0)
        assert seen == [b"3", b"4", "queued after the read"]
        seen.clear()
        loop.call_soon(seen.append, "queued before the read")
        conn.data_received(message(b"5"))
        await asyncio.sleep(0)
        assert seen == ["queued before the read", b"5"]
    finally:
        conn.abort()
        await conn.lost
        await asyncio.wait_for(closed.wait(), 5.0)
        server.close()
        await server.wait_closed()


async def test_flush_writes_the_commands_sent_without_a_loop_turn() -> None:
    """``flush`` hands the commands sent so far to the socket now; without it they wait
    for the end of the loop iteration."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    received = bytearray()
    arrived = threading.Event()

    def serve() -> None:
        peer, _ = listener.accept()
        with peer:
            while data := peer.recv(4096):  # nothing is answered
                received.extend(data)
                if b"ECHO" in received:
                    arrived.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: RespConnection(make_reader("python")(), {}, lambda channel, payload: None),
        "127.0.0.1",
        port,
    )
    try:
        conn.send(b"PING")  # replies nobody waits for
        assert not arrived.wait(0.2)  # the loop has not turned: nothing written yet
        conn.send(b"ECHO", b"x")
        conn.flush()
        assert arrived.wait(5.0)  # still without a turn: written by ``flush``
        assert bytes(received) == pack_command(b"PING") + pack_command(b"ECHO", b"x")
        await asyncio.sleep(0)  # the end-of-iteration write finds nothing left to write
        await asyncio.sleep(0.05)
        assert bytes(received) == pack_command(b"PING") + pack_command(b"ECHO", b"x")
    finally:
        conn.abort()
        await conn.lost
        listener.close()
        thread.join(5.0)
