"""The hot path in-process: writer, flush queue, hub and HTTP API, driven with fakes.

A fake socket records the bytes handed to it (as websockets tests its protocol bytes in,
bytes out); fake subscribers stand for connections. No server process, no network.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from prometheus_client import CollectorRegistry
from starlette.testclient import TestClient

from realtime.app import create_app
from realtime.broker import BrokerUnavailable, MemoryBroker
from realtime.envelope import frame as broker_frame
from realtime.envelope import pack_event, pack_notification, unpack_entry, unpack_message
from realtime.history import MemoryHistory, Publication
from realtime.hub import Hub
from realtime.metrics import Metrics
from realtime.protocol import JSON, MSGPACK, CloseCode, Codec, notification_message
from realtime.settings import Settings
from realtime.tiers import FREE, PAID, Tier, TierPolicy
from realtime.writer import FLUSH_BYTES, FLUSH_SLICE, QUIET_S, FlushQueue, OutboxLimits, Writer

pytestmark = pytest.mark.timeout(10)


class FakeSocket:
    """What a Writer needs of its socket, recording what it was given."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closes: list[tuple[int, str]] = []
        self.broken = False

    def write(self, data: bytes) -> None:
        if self.broken:
            raise RuntimeError("unable to perform operation on closed transport")
        self.writes.append(data)

    def close_with(self, code: int, reason: str, timeout: float) -> None:
        self.closes.append((code, reason))


def frame(n: int, size: int = 10) -> bytes:
    return bytes([n % 256]) * size


def make_writer(
    flushes: FlushQueue,
    metrics: Metrics,
    *,
    max_messages: int = 5,
    max_bytes: int = 1000,
    codec: Codec = JSON,
) -> tuple[Writer, FakeSocket]:
    sock = FakeSocket()
    limits = OutboxLimits(max_messages, max_bytes)
    writer = Writer(sock.write, sock, flushes, limits, metrics, codec_index=codec.index)
    return writer, sock


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"piggybong_realtime_{name}", labels)
    return value or 0.0


# ------------------------------------------------------------------------------ writer


async def test_frames_of_one_tick_go_out_in_one_write_in_order(metrics: Metrics) -> None:
    flushes = FlushQueue()
    writer, sock = make_writer(flushes, metrics)
    for n in range(3):
        writer.write(frame(n))
    assert sock.writes == []  # nothing before the flush
    assert len(flushes) == 1  # queued once, however many frames
    await asyncio.sleep(0)
    assert sock.writes == [frame(0) + frame(1) + frame(2)]
    assert len(flushes) == 0


async def test_pending_bytes_at_the_threshold_write_at_once(metrics: Metrics) -> None:
    writer, sock = make_writer(FlushQueue(), metrics)
    big = b"x" * (FLUSH_BYTES // 2)
    writer.write(big)
    writer.write(big)
    assert sock.writes == [big + big]  # before any flush
    writer.write(b"tail")
    await asyncio.sleep(0)
    assert sock.writes == [big + big, b"tail"]


async def test_a_frame_of_the_threshold_alone_is_written_at_once(metrics: Metrics) -> None:
    flushes = FlushQueue()
    others = [make_writer(flushes, metrics) for _ in range(3)]
    for writer, _ in others:
        writer.write(b"a")  # queued for the next flush
    writer, sock = make_writer(flushes, metrics)
    big = b"x" * FLUSH_BYTES
    writer.write(big)
    assert sock.writes == [big]  # at once, ahead of the writers queued before it
    assert len(flushes) == 3
    writer.write(b"tail")  # a small frame after it waits for the flush as usual
    assert sock.writes == [big]
    await asyncio.sleep(0)
    assert sock.writes == [big, b"tail"]
    assert all(s.writes == [b"a"] for _, s in others)


async def test_flush_writes_a_slice_per_iteration_and_late_frames_join(metrics: Metrics) -> None:
    flushes = FlushQueue()
    pairs = [make_writer(flushes, metrics) for _ in range(FLUSH_SLICE + 10)]
    for writer, _ in pairs:
        writer.write(b"a")
    flushes.flush()  # the first slice, as the loop would run it
    written = [sock for _, sock in pairs if sock.writes]
    assert len(written) == FLUSH_SLICE
    # A message fanned out between slices: the writers not yet written carry both frames.
    for writer, _ in pairs:
        writer.write(b"b")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    for i, (_, sock) in enumerate(pairs):
        if i < FLUSH_SLICE:
            assert sock.writes == [b"a", b"b"]
        else:
            assert sock.writes == [b"ab"]


def fan_out(flushes: FlushQueue, writers: list[Writer], data: bytes) -> None:
    """As the hub's ``write_to_all`` tells the flush queue of a fan-out."""
    flushes.begin_fan_out(len(writers))
    try:
        for writer in writers:
            writer.write(data)
    finally:
        flushes.end_fan_out()


async def test_a_fan_out_to_a_node_that_keeps_up_is_written_at_once(metrics: Metrics) -> None:
    flushes = FlushQueue(direct_max=3)
    pairs = [make_writer(flushes, metrics) for _ in range(3)]
    writers, socks = [w for w, _ in pairs], [s for _, s in pairs]
    fan_out(flushes, writers, b"a")
    assert all(sock.writes == [b"a"] for sock in socks)  # nothing to coalesce with
    fan_out(flushes, writers, b"b")  # right after another: what follows joins it
    fan_out(flushes, writers, b"c")
    assert all(sock.writes == [b"a"] for sock in socks) and len(flushes) == 3
    await asyncio.sleep(0)
    assert all(sock.writes == [b"a", b"bc"] for sock in socks)
    await asyncio.sleep(QUIET_S * 2)
    fan_out(flushes, [*writers, make_writer(flushes, metrics)[0]], b"d")  # over direct_max
    assert all(sock.writes == [b"a", b"bc"] for sock in socks)
    await asyncio.sleep(0)
    assert all(sock.writes == [b"a", b"bc", b"d"] for sock in socks)
    await asyncio.sleep(QUIET_S * 2)
    flushes.add(make_writer(flushes, metrics)[0])  # a writer waits: everyone coalesces
    fan_out(flushes, writers, b"e")
    assert all(sock.writes == [b"a", b"bc", b"d"] for sock in socks)
    await asyncio.sleep(0)
    assert all(sock.writes == [b"a", b"bc", b"d", b"e"] for sock in socks)
    await asyncio.sleep(QUIET_S * 2)
    fan_out(flushes, writers[1:], b"f")
    writers[0].write(b"g")  # outside a fan-out (a reply, a pong): coalesced as ever
    assert socks[0].writes[-1] == b"e" and socks[1].writes[-1] == b"f"
    assert not FlushQueue().direct  # without direct_max: never at once


async def test_a_write_at_once_never_overtakes_what_waits(metrics: Metrics) -> None:
    flushes = FlushQueue(direct_max=10)
    paused, paused_sock = make_writer(flushes, metrics, max_messages=100, max_bytes=10_000)
    paused.pause()
    paused.write(frame(1))  # to the outbox
    flushes.direct = True  # (as in a fan-out that is written at once)
    paused.write(frame(2))
    assert paused_sock.writes == []
    paused.resume()
    paused.write(frame(3))
    assert paused_sock.writes == [frame(1) + frame(2), frame(3)]
    flushes.direct = False
    waiting, waiting_sock = make_writer(flushes, metrics)
    waiting.write(frame(4))
    flushes.direct = True
    waiting.write(frame(5))  # joins its pending frame, not ahead of it
    flushes.direct = False
    assert waiting_sock.writes == []
    await asyncio.sleep(0)
    assert waiting_sock.writes == [frame(4) + frame(5)]


async def test_a_write_at_once_to_a_closed_socket_closes_the_writer(metrics: Metrics) -> None:
    flushes = FlushQueue(direct_max=10)
    writer, sock = make_writer(flushes, metrics)
    sock.broken = True
    fan_out(flushes, [writer], b"x")
    assert writer.closed  # at once, not at a flush
    writer.write(b"y")
    assert writer.pending == [] and sock.writes == []

    def wrong(data: bytes) -> None:
        raise TypeError("a bug in the write path")

    sock = FakeSocket()
    writer = Writer(wrong, sock, flushes, OutboxLimits(5, 1000), metrics)
    await asyncio.sleep(QUIET_S * 2)
    fan_out(flushes, [writer], b"x")  # a fault is this writer's alone, closed 1011
    assert writer.closed and sock.closes == [(1011, "internal error")]


async def test_order_is_kept_across_pause_and_resume(metrics: Metrics) -> None:
    writer, sock = make_writer(FlushQueue(), metrics, max_messages=100, max_bytes=10_000)
    writer.write(frame(1))
    writer.pause()
    writer.write(frame(2))  # pending frames go first, even paused
    await asyncio.sleep(0)
    writer.write(frame(3))
    writer.write(frame(4))
    assert sock.writes == [frame(1) + frame(2)]
    assert writer.outbox_bytes == 20
    writer.resume()
    assert sock.writes == [frame(1) + frame(2), frame(3) + frame(4)]
    writer.write(frame(5))
    await asyncio.sleep(0)
    assert b"".join(sock.writes) == b"".join(frame(n) for n in range(1, 6))
    assert writer.outbox_bytes == 0


@pytest.mark.parametrize(("messages", "size"), [(4, 10), (100, 25)])
async def test_outbox_bound_closes_4008_and_drops(
    metrics: Metrics, messages: int, size: int
) -> None:
    writer, sock = make_writer(FlushQueue(), metrics, max_messages=3, max_bytes=60)
    writer.pause()
    for n in range(messages):
        writer.write(frame(n, size))
    assert sock.closes == [(4008, "slow consumer")]
    assert writer.closed and not writer.outbox and writer.outbox_bytes == 0
    assert sample(metrics, "ws_queue_overflows_total") == 1
    assert sample(metrics, "ws_closes_total", code="4008") == 1
    writer.resume()
    writer.write(b"after")
    await asyncio.sleep(0)
    assert sock.writes == []  # nothing after the cut


async def test_close_flushes_what_was_taken_first(metrics: Metrics) -> None:
    writer, sock = make_writer(FlushQueue(), metrics)
    writer.write(b"last words")
    writer.close(CloseCode.GOING_AWAY, "bye")
    assert sock.writes == [b"last words"]
    assert sock.closes == [(1001, "bye")]
    writer.close(CloseCode.NORMAL)
    assert sock.closes == [(1001, "bye")]  # once


async def test_a_closed_socket_closes_the_writer(metrics: Metrics) -> None:
    writer, sock = make_writer(FlushQueue(), metrics)
    sock.broken = True
    writer.write(b"x")
    await asyncio.sleep(0)
    assert writer.closed
    writer.write(b"y")
    assert writer.pending == []


async def test_drain_closes_once_the_outbox_is_written(metrics: Metrics) -> None:
    loop = asyncio.get_running_loop()
    writer, sock = make_writer(FlushQueue(), metrics)
    writer.pause()
    writer.write(b"queued")
    writer.drain(5.0, loop)
    assert sock.closes == []
    writer.resume()
    assert sock.writes == [b"queued"]
    assert sock.closes == [(1001, "server shutting down")]


async def test_drain_gives_up_after_its_timeout(metrics: Metrics) -> None:
    writer, sock = make_writer(FlushQueue(), metrics)
    writer.pause()
    writer.write(b"never read")
    writer.drain(0.05, asyncio.get_running_loop())
    await asyncio.sleep(0.1)
    assert sock.closes == [(1001, "server shutting down")]
    assert sock.writes == []


# ------------------------------------------------------------------------------ hub


@dataclass(eq=False)
class FakeSubscriber:
    """A connection as the hub sees it."""

    user: str
    codec: Codec
    tier: Tier
    writer: Writer
    sock: FakeSocket
    spending: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def add_spending(self, channel: str, item: dict[str, Any]) -> None:
        self.spending.append((channel, item))

    def fail(self, exc: BaseException, where: str, /) -> None:
        self.writer.close(CloseCode.INTERNAL_ERROR, where)

    def __hash__(self) -> int:
        return id(self)


@pytest.fixture
def flushes() -> FlushQueue:
    return FlushQueue()


@pytest.fixture
def hub(metrics: Metrics) -> Hub:
    broker = MemoryBroker()
    return Hub(broker, MemoryHistory(broker.deliver), TierPolicy(), metrics)


def subscriber(
    flushes: FlushQueue, metrics: Metrics, user: str, codec: Codec = JSON, tier: Tier = PAID
) -> FakeSubscriber:
    writer, sock = make_writer(flushes, metrics, codec=codec)
    return FakeSubscriber(user, codec, tier, writer, sock)


async def join(hub: Hub, sub: FakeSubscriber, channel: str, *, read: bool = False) -> None:
    """Subscribe and go live (as a connection does); ``read``: at the history's position,
    else at offset 0 of epoch "ep" (the frames these tests hand the hub)."""
    await hub.subscribe(sub, channel)
    if read:
        position = (await hub.history.read(channel, None, 0)).position
        hub.go_live(sub, channel, position.offset, position.epoch)
    else:
        hub.go_live(sub, channel, 0, "ep")


async def test_a_gap_is_filled_from_history_and_a_lost_history_closes_1001(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    """The node missed publications (pub/sub dropped them): it fills them from history, in
    order, before what arrived meanwhile; another epoch closes its subscribers."""
    broker = MemoryBroker()
    history = MemoryHistory(lambda channel, payload: None)  # the broker never hears of them
    hub = Hub(broker, history, TierPolicy(), metrics)
    sub = subscriber(flushes, metrics, "a")
    await join(hub, sub, "artist:g", read=True)
    epoch = (await history.read("artist:g", None, 0)).position.epoch
    limits = TierPolicy().history_of("artist")
    for eid in ("one", "two", "three"):
        payload = pack_event("artist:g", "e", eid, 1, {})
        await history.publish([Publication("artist:g", payload, limits)])
    hub.on_message("artist:g", broker_frame(1, epoch, pack_event("artist:g", "e", "one", 1, {})))
    # Offset 4 arrives live while 2 and 3 never did: held, 2 and 3 read, then 4.
    hub.on_message("artist:g", broker_frame(4, epoch, pack_event("artist:g", "e", "four", 1, {})))
    await asyncio.sleep(0.05)
    assert [(m["id"], m["offset"]) for m in decoded(sub)] == [
        ("one", 1),
        ("two", 2),
        ("three", 3),
        ("four", 4),
    ]
    assert sample(metrics, "hub_gap_fills_total") == 2
    hub.on_message(
        "artist:g", broker_frame(1, "new-epoch", pack_event("artist:g", "e", "x", 1, {}))
    )
    assert sub.sock.closes == [(1001, "history lost; resume to resync")]
    await hub.close()


def decoded(sub: FakeSubscriber) -> list[dict[str, Any]]:
    """The messages in the subscriber's writes (frames of at most 125 bytes)."""
    out = []
    data = b"".join(sub.sock.writes)
    while data:
        length = data[1] & 0x7F
        assert length < 126
        payload, data = data[2 : 2 + length], data[2 + length :]
        out.append(msgpack.unpackb(payload) if sub.codec is MSGPACK else json.loads(payload))
    return out


async def test_one_encode_per_codec_same_bytes_to_all(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    subs = [subscriber(flushes, metrics, f"u{i}", JSON if i % 2 else MSGPACK) for i in range(6)]
    for sub in subs:
        await join(hub, sub, "artist:x")
    hub.on_message(
        "artist:x", broker_frame(1, "ep", pack_event("artist:x", "comeback", "e1", 1, {"n": 1}))
    )
    pending = [sub.writer.pending[0] for sub in subs]
    json_frames = {id(f) for f, s in zip(pending, subs, strict=True) if s.codec is JSON}
    msgpack_frames = {id(f) for f, s in zip(pending, subs, strict=True) if s.codec is MSGPACK}
    assert len(json_frames) == 1 and len(msgpack_frames) == 1  # one object per codec
    await asyncio.sleep(0)
    for sub in subs:
        (message,) = decoded(sub)
        assert message["id"] == "e1" and message["data"] == {"n": 1}
    assert sample(metrics, "ws_messages_out_total", type="event") == 6


async def test_premium_events_skip_free_subscribers(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    free = subscriber(flushes, metrics, "f", tier=FREE)
    paid = subscriber(flushes, metrics, "p", tier=PAID)
    for sub in (free, paid):
        await join(hub, sub, "broadcast")
    hub.on_message(
        "broadcast", broker_frame(1, "ep", pack_event("broadcast", "market.open", "m1", 1, {}))
    )
    hub.on_message("broadcast", broker_frame(2, "ep", pack_event("broadcast", "news", "n1", 2, {})))
    await asyncio.sleep(0)
    assert [m["id"] for m in decoded(paid)] == ["m1", "n1"]
    assert [m["id"] for m in decoded(free)] == ["n1"]
    assert sample(metrics, "hub_filtered_events_total", tier="free") == 1


async def test_spending_goes_to_the_batcher_and_notifications_to_the_writer(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    sub = subscriber(flushes, metrics, "42")
    await join(hub, sub, "user:42")
    spent = pack_event("user:42", "spending.created", "s1", 7, {"won": 5})
    hub.on_message("user:42", broker_frame(3, "ep", spent))
    assert sub.spending == [
        (
            "user:42",
            {"event": "spending.created", "id": "s1", "ts": 7, "data": {"won": 5}, "offset": 3},
        )
    ]
    note = notification_message("n1", priority="high", title="t", body="b", data={}, ts=1)
    hub.on_message("user:42", pack_notification(note))
    hub.on_message("user:42", b"not ours")  # ignored
    await asyncio.sleep(0)
    assert decoded(sub) == [note]


def event_frame(channel: str, offset: int, eid: str) -> bytes:
    return broker_frame(offset, "ep", pack_event(channel, "e", eid, 1, {}))


async def test_a_subscription_is_held_until_it_goes_live(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    """Publications racing a subscribe are held, handed back, and never sent twice."""
    live = subscriber(flushes, metrics, "live")
    await join(hub, live, "artist:x")
    late = subscriber(flushes, metrics, "late")
    await hub.subscribe(late, "artist:x")
    hub.on_message("artist:x", event_frame("artist:x", 1, "a"))
    hub.on_message("artist:x", event_frame("artist:x", 2, "b"))
    assert [d.offset for d in hub.take_held(late, "artist:x")] == [1, 2]
    assert hub.take_held(late, "artist:x") == []  # handed back once
    # The subscriber's read said offset 3; 3 is still on its way to this node.
    hub.go_live(late, "artist:x", 3, "ep")
    hub.on_message("artist:x", event_frame("artist:x", 3, "c"))  # it had it in its reply
    hub.on_message("artist:x", event_frame("artist:x", 4, "d"))
    await asyncio.sleep(0)
    assert [m["id"] for m in decoded(live)] == ["a", "b", "c", "d"]
    assert [(m["id"], m["offset"]) for m in decoded(late)] == [("d", 4)]
    # Back to the fast path once everyone is live.
    assert hub._unsettled == {}


async def test_notifications_reach_a_held_subscription_at_once(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    sub = subscriber(flushes, metrics, "42")
    await hub.subscribe(sub, "user:42")
    note = notification_message("n1", priority="high", title="t", body="b", data={}, ts=1)
    hub.on_message("user:42", pack_notification(note))
    await asyncio.sleep(0)
    assert decoded(sub) == [note]
    assert hub.take_held(sub, "user:42") == []


class StalledBroker(MemoryBroker):
    """A broker whose subscribe waits until released (or fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.fail = False

    async def subscribe(self, channel: str) -> None:
        await self.release.wait()
        if self.fail:
            raise BrokerUnavailable("down")
        await super().subscribe(channel)


async def test_a_cancelled_subscribe_is_a_cancellation(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    broker = StalledBroker()
    hub = Hub(broker, MemoryHistory(broker.deliver), TierPolicy(), metrics)
    first, second = subscriber(flushes, metrics, "a"), subscriber(flushes, metrics, "b")
    task = asyncio.create_task(hub.subscribe(first, "artist:x"))
    waiter = asyncio.create_task(hub.subscribe(second, "artist:x"))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(BrokerUnavailable):
        await waiter
    assert "artist:x" not in hub.channels
    # A cancelled waiter leaves too, and the channel works afterwards.
    broker.release.set()
    await hub.subscribe(first, "artist:x")
    assert list(hub.channels["artist:x"]) == [first]


async def test_a_failed_subscribe_leaves_nothing_behind(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    broker = StalledBroker()
    broker.fail = True
    broker.release.set()
    hub = Hub(broker, MemoryHistory(broker.deliver), TierPolicy(), metrics)
    with pytest.raises(BrokerUnavailable):
        await hub.subscribe(subscriber(flushes, metrics, "a"), "artist:x")
    assert hub.channels == {}


class CountingBroker(MemoryBroker):
    """A memory broker that tells what it was asked: ("sub"|"unsub", channel) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.wanted: set[str] = set()

    async def subscribe(self, channel: str) -> None:
        self.calls.append(("sub", channel))
        self.wanted.add(channel)
        await super().subscribe(channel)

    async def unsubscribe(self, channel: str) -> None:
        self.calls.append(("unsub", channel))
        self.wanted.discard(channel)
        await super().unsubscribe(channel)


async def test_the_broker_stays_subscribed_for_the_linger_after_the_last_leave(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    broker = CountingBroker()
    hub = Hub(broker, MemoryHistory(broker.deliver), TierPolicy(), metrics, linger=0.05)
    first, second = subscriber(flushes, metrics, "a"), subscriber(flushes, metrics, "b")
    await hub.subscribe(first, "artist:x")
    await hub.unsubscribe(first, "artist:x")
    assert "artist:x" not in hub.channels and broker.wanted == {"artist:x"}
    await hub.subscribe(second, "artist:x")  # back within the linger: the timer is dropped
    await asyncio.sleep(0.1)
    assert broker.wanted == {"artist:x"}
    await hub.unsubscribe(second, "artist:x")
    await asyncio.sleep(0.1)
    assert broker.wanted == set()
    assert broker.calls == [("sub", "artist:x"), ("sub", "artist:x"), ("unsub", "artist:x")]
    await hub.close()


async def test_a_subscriber_back_as_the_linger_ends_keeps_the_broker_subscribed(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    """The linger's end and a subscribe in the same loop iteration: the unsubscribe, which
    runs after the subscribe's first step, sees the subscriber and leaves the broker be."""
    broker = CountingBroker()
    hub = Hub(broker, MemoryHistory(broker.deliver), TierPolicy(), metrics, linger=60)
    first, second = subscriber(flushes, metrics, "a"), subscriber(flushes, metrics, "b")
    await hub.subscribe(first, "artist:x")
    await hub.unsubscribe(first, "artist:x")
    hub._lingering["artist:x"].cancel()
    hub._linger_over("artist:x")  # as its timer would: the unsubscribe task is created
    await hub.subscribe(second, "artist:x")
    await asyncio.sleep(0.01)  # the task runs
    assert broker.wanted == {"artist:x"}
    assert broker.calls == [("sub", "artist:x"), ("sub", "artist:x")]
    assert list(hub.channels["artist:x"]) == [second]
    await hub.close()


# ------------------------------------------------------------------------------ HTTP API

KEY = {"Authorization": "Bearer dev-api-key"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    app = create_app(Settings(gc_freeze_interval=None))
    with TestClient(app) as test_client:
        yield test_client


def test_publish_reaches_a_subscriber_through_the_memory_broker(client: TestClient) -> None:
    node = client.app.state.node  # type: ignore[attr-defined]
    sub = subscriber(node.flushes, node.metrics, "42")
    client.portal.call(functools.partial(join, node.hub, sub, "user:42", read=True))  # type: ignore[union-attr]
    answer = client.post(
        "/v1/publish",
        headers=KEY,
        json=[
            {"channel": "user:42", "event": "budget.updated", "data": {"left": 1}, "id": "a"},
            {"channel": "artist:x", "event": "nobody.listens"},
        ],
    )
    assert answer.status_code == 202
    ids = answer.json()["ids"]
    assert ids[0] == "a" and len(ids) == 2
    client.portal.call(asyncio.sleep, 0)  # type: ignore[union-attr]
    assert [(m["channel"], m["id"], m["data"]) for m in decoded(sub)] == [
        ("user:42", "a", {"left": 1})
    ]
    again = client.post("/v1/publish", headers=KEY, json={"channel": "user:42", "event": "e",
                                                           "id": "a"})  # fmt: skip
    assert again.status_code == 202 and again.json() == {"ids": ["a"], "offsets": [1]}
    client.portal.call(asyncio.sleep, 0)  # type: ignore[union-attr]
    assert len(decoded(sub)) == 1  # the duplicate is not delivered


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"),
    [
        ({}, {"channel": "user:1", "event": "e"}, 401, "unauthorized"),
        (KEY, b"{not json", 400, "bad_request"),
        (KEY, {"channel": "nope", "event": "e"}, 422, "bad_request"),
        (KEY, [], 422, "bad_request"),
        (KEY, b"x" * 2_000_000, 413, "limit_exceeded"),
    ],
)
def test_publish_errors(
    client: TestClient, headers: dict[str, str], body: Any, status: int, code: str
) -> None:
    if isinstance(body, bytes):
        answer = client.post("/v1/publish", headers=headers, content=body)
    else:
        answer = client.post("/v1/publish", headers=headers, json=body)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code


def test_unknown_path_and_method(client: TestClient) -> None:
    assert client.get("/v1/nothing").json() == {
        "error": {"code": "not_found", "message": "not found"}
    }
    answer = client.get("/v1/publish")
    assert answer.status_code == 405
    assert answer.json()["error"]["code"] == "bad_request"


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert "piggybong_realtime_ws_open" in client.get("/metrics").text


def test_api_requests_are_counted_by_route_and_status(client: TestClient) -> None:
    client.post("/v1/publish", headers=KEY, json={"channel": "user:1", "event": "e"})
    client.post("/v1/publish", json={"channel": "user:1", "event": "e"})
    client.delete("/v1/devices/ios/abc", headers=KEY)
    text = client.get("/metrics").text
    for route, status in [
        ("/v1/publish", "202"),
        ("/v1/publish", "401"),
        ("/v1/devices/{platform}/{token:path}", "204"),
    ]:
        line = f'piggybong_realtime_http_requests_total{{route="{route}",status="{status}"}} 1.0'
        assert line in text


# ------------------------------------------------------------------------------ fault boundary


class Exploding(FakeSubscriber):
    """A subscriber whose batching raises (a bug, or an item it cannot encode)."""

    def add_spending(self, channel: str, item: dict[str, Any]) -> None:
        raise TypeError("Object of type bytes is not JSON serializable")


async def test_one_subscribers_failure_in_the_fan_out_closes_it_alone(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    bad = Exploding("bad", JSON, PAID, *make_writer(flushes, metrics))
    good = [subscriber(flushes, metrics, f"g{i}") for i in range(2)]
    for sub in (good[0], bad, good[1]):
        await join(hub, sub, "artist:f")
    hub.on_message(
        "artist:f", broker_frame(1, "ep", pack_event("artist:f", "spending.x", "s", 1, {}))
    )
    assert [len(sub.spending) for sub in good] == [1, 1]
    assert bad.sock.closes == [(1011, "fan-out")]
    assert good[0].sock.closes == good[1].sock.closes == []


async def test_a_writer_that_raises_is_failed_and_the_others_still_get_the_frame(
    hub: Hub, flushes: FlushQueue, metrics: Metrics
) -> None:
    subs = [subscriber(flushes, metrics, f"w{i}") for i in range(3)]
    for sub in subs:
        await join(hub, sub, "artist:w")

    def broken(data: bytes) -> None:
        raise ValueError("a transport bug")

    subs[0].writer._write = broken
    hub.on_message("artist:w", broker_frame(1, "ep", pack_event("artist:w", "e", "x", 1, {})))
    await asyncio.sleep(0)
    assert subs[0].sock.closes == [(1011, "internal error")]
    assert [len(decoded(sub)) for sub in subs[1:]] == [1, 1]


def test_a_batch_flush_that_raises_closes_that_connection_and_flushes_the_others() -> None:
    from typing import cast

    from realtime.connection import Connection, close_expired, flush_due_batches

    @dataclass
    class Conn:
        raises: bool
        flushed: int = 0
        expired_: int = 0
        failed: list[str] = field(default_factory=list)

        def flush_batches(self) -> None:
            if self.raises:
                raise TypeError("cannot encode")
            self.flushed += 1

        def expired(self) -> None:
            if self.raises:
                raise OverflowError("absurd")
            self.expired_ += 1

        def fail(self, exc: BaseException, where: str) -> None:
            self.failed.append(where)

    conns = [Conn(False), Conn(True), Conn(False)]
    flush_due_batches(cast(list[Connection], conns))
    close_expired(cast(list[Connection], conns))
    assert [c.flushed for c in conns] == [1, 0, 1]
    assert [c.expired_ for c in conns] == [1, 0, 1]
    assert conns[1].failed == ["batch flush", "expiry"]


async def test_an_encode_failure_skips_that_codec_only(
    flushes: FlushQueue, metrics: Metrics
) -> None:
    from realtime.writer import write_to_all

    subs = [subscriber(flushes, metrics, "j", JSON), subscriber(flushes, metrics, "m", MSGPACK)]
    write_to_all(tuple(subs), {"type": "event", "data": {"b": b"\x00"}})  # JSON cannot
    assert subs[0].writer.pending == []
    assert len(subs[1].writer.pending) == 1


def test_publish_body_in_chunks(client: TestClient) -> None:
    """A body without Content-Length, in several chunks: joined, and refused over the limit."""
    body = json.dumps({"channel": "user:1", "event": "e", "data": {"s": "x" * 5000}}).encode()

    def chunks(data: bytes, size: int) -> Iterator[bytes]:
        for start in range(0, len(data), size):
            yield data[start : start + size]

    answer = client.post("/v1/publish", headers=KEY, content=chunks(body, 1000))
    assert answer.status_code == 202 and answer.json()["offsets"] == [1]
    limit = client.app.state.node.settings.max_body_bytes  # type: ignore[attr-defined]
    huge = chunks(b" " * (limit + 1), 65536)
    answer = client.post("/v1/publish", headers=KEY, content=huge)
    assert answer.status_code == 413


def test_unexpected_publish_failure_is_a_contract_500(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception nobody expected: logged once, answered 500 ``internal``, counted."""
    node = client.app.state.node  # type: ignore[attr-defined]

    async def broken(items: Any) -> Any:
        raise RuntimeError("disk on fire")

    node.history.publish = broken
    answer = client.post("/v1/publish", headers=KEY, json={"channel": "user:1", "event": "e"})
    assert answer.status_code == 500
    assert answer.json() == {"error": {"code": "internal", "message": "internal error"}}
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "unhandled error on /v1/publish"
    ]
    line = 'piggybong_realtime_http_requests_total{route="/v1/publish",status="500"} 1.0'
    assert line in client.get("/metrics").text


def test_unpack_message_is_unpack_entrys_message() -> None:
    """A resume's reply decodes its entries without a Delivery each: the same messages,
    and the same refusals (an entry either cannot read is a hole)."""
    event = pack_event("artist:a", "e", "id-1", 5, {"n": 1})
    notification = msgpack.packb({"k": "notification", "m": {"type": "notification"}})
    refused = [
        b"",
        b"not msgpack",
        msgpack.packb([1, 2]),
        msgpack.packb({"k": "event"}),
        msgpack.packb({"k": "other", "m": {}}),
        msgpack.packb({"k": "event", "m": [1]}),
        msgpack.packb({"k": "event", "m": {}, "a": "not a number"}),
    ]
    for payload in [event, notification, *refused]:
        for offset in (0, 7):
            delivery = unpack_entry(offset, "ep", payload)
            message = unpack_message(offset, payload)
            assert message == (delivery.message if delivery is not None else None), payload
    assert unpack_message(7, event) == {
        "type": "event", "channel": "artist:a", "event": "e", "id": "id-1", "ts": 5,
        "data": {"n": 1}, "offset": 7,
    }  # fmt: skip
