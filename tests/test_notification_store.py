"""The NotificationStore contract, run against MemoryNotificationStore and RedisNotificationStore
(real Redis from tests/redis_server.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from notifications.memory_store import MemoryNotificationStore
from notifications.metrics import NotificationMetrics
from notifications.models import (
    PRIORITIES,
    DeadLetter,
    DeliveryState,
    Device,
    Notification,
    Platform,
    Priority,
)
from notifications.redis_store import RedisNotificationStore
from notifications.store import (
    STORE,
    Enqueued,
    Lease,
    NotificationStore,
    QueueUnavailable,
)
from realtime.redis_client import redis_client
from tests.redis_sentinel import redis_where

StoreFactory = Callable[..., NotificationStore]


def note(id: str, priority: Priority = Priority.NORMAL, **kw: Any) -> Notification:
    fields: dict[str, Any] = {"user": "u1", "title": "t", "body": "b", **kw}
    return Notification(id=id, priority=priority, **fields)


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """Builds stores of the parametrized kind; Redis ones share one flushed DB (like nodes)."""
    made: list[NotificationStore] = []
    url = None if request.param == "memory" else redis_where(request.param, request)
    shared_memory: dict[str, MemoryNotificationStore] = {}

    def make(**options: Any) -> NotificationStore:
        store: NotificationStore
        if url is None:
            options.pop("reclaim_interval", None)
            options.pop("poll_interval", None)
            options.pop("consumer_idle_timeout", None)
            # Memory "nodes" share one store: it is in-process.
            key = repr(sorted(options.items()))
            if key not in shared_memory:
                shared_memory[key] = MemoryNotificationStore(**options)
            store = shared_memory[key]
        else:
            client = redis_client(url, blocking=False, **RedisNotificationStore.client_options())
            store = RedisNotificationStore(client, owns_client=True, **options)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def take(store: NotificationStore, consumer: str = "c1", now: float | None = None) -> Lease:
    lease = await store.claim(consumer, time.time() if now is None else now)
    assert lease is not None
    return lease


async def test_enqueue_claim_settle_roundtrip(make_store: StoreFactory) -> None:
    store = make_store()
    original = note(
        "n-1",
        Priority.HIGH,
        data={"amount": 12.5, "tags": ["a", "ü"], "nested": {"k": None}},
        collapse_id="c-1",
        ttl=60,
        title="컴백 알림 🎉",
    )
    assert await store.enqueue(original) == Enqueued("n-1", created=True)
    assert (await store.depth())[Priority.HIGH] == 1

    lease = await take(store)
    assert lease.notification == original
    assert lease.state == DeliveryState()
    assert not lease.reclaimed
    assert await store.claim("c1", time.time()) is None  # leased: not handed out twice

    assert await store.settle(lease, state=lease.state)
    assert await store.claim("c1", time.time()) is None
    assert (await store.depth())[Priority.HIGH] == 0


async def test_highest_priority_first_then_oldest_first(make_store: StoreFactory) -> None:
    store = make_store()
    order = [
        ("low-1", Priority.LOW),
        ("normal-1", Priority.NORMAL),
        ("low-2", Priority.LOW),
        ("high-1", Priority.HIGH),
        ("critical-1", Priority.CRITICAL),
        ("normal-2", Priority.NORMAL),
        ("critical-2", Priority.CRITICAL),
    ]
    for id, priority in order:
        await store.enqueue(note(id, priority))
    taken = []
    while (lease := await store.claim("c1", time.time())) is not None:
        taken.append(lease.notification.id)
        await store.settle(lease, state=lease.state)
    assert taken == ["critical-1", "critical-2", "high-1", "normal-1", "normal-2", "low-1", "low-2"]


async def test_caller_id_is_idempotent_within_the_window(make_store: StoreFactory) -> None:
    store = make_store()
    first = await store.enqueue(note("same", Priority.NORMAL), idempotency_window=0.5)
    again = await store.enqueue(note("same", Priority.CRITICAL), idempotency_window=0.5)
    assert (first.created, again.created) == (True, False)
    assert again.id == "same"
    assert sum((await store.depth()).values()) == 1

    lease = await take(store)
    await store.settle(lease, state=lease.state)
    assert (await store.enqueue(note("same"), idempotency_window=0.5)).created is False

    await asyncio.sleep(0.8)  # the window has passed: the id may be used again
    assert (await store.enqueue(note("same"), idempotency_window=0.5)).created is True


async def test_queue_is_bounded_per_priority_and_counts_leased_and_delayed(
    make_store: StoreFactory,
) -> None:
    store = make_store(max_depth=3)
    for i in range(3):
        await store.enqueue(note(f"n{i}"))
    with pytest.raises(QueueUnavailable) as info:
        await store.enqueue(note("n3"))
    assert (info.value.reason, info.value.priority, info.value.depth, info.value.limit) == (
        "full",
        Priority.NORMAL,
        3,
        3,
    )
    await store.enqueue(note("c0", Priority.CRITICAL))  # another priority has its own bound

    critical = await take(store)
    assert critical.notification.id == "c0"
    await store.settle(critical, state=critical.state)

    lease = await take(store)
    assert await store.settle(lease, state=lease.state, retry_at=time.time() + 60)
    with pytest.raises(QueueUnavailable):  # delayed still counts
        await store.enqueue(note("n3"))
    other = await take(store)
    with pytest.raises(QueueUnavailable):  # leased still counts
        await store.enqueue(note("n3"))
    await store.settle(other, state=other.state)
    await store.enqueue(note("n3"))  # room again; nothing was dropped to make it
    assert (await store.depth())[Priority.NORMAL] == 3


async def test_retry_comes_back_when_due_with_its_state(make_store: StoreFactory) -> None:
    store = make_store()
    await store.enqueue(note("r1"))
    lease = await take(store)
    state = DeliveryState(rounds=1, attempts={"ios:abc": 2}, done={"in_app": "delivered"})
    due = time.time() + 30
    assert await store.settle(lease, state=state, retry_at=due)

    assert await store.claim("c1", due - 1) is None
    again = await take(store, now=due + 0.01)
    assert again.notification == lease.notification
    assert again.state == state
    assert again.ref != lease.ref


async def test_retry_goes_behind_nothing_of_a_higher_priority(make_store: StoreFactory) -> None:
    store = make_store()
    await store.enqueue(note("low", Priority.LOW))
    lease = await take(store)
    now = time.time()
    await store.settle(lease, state=lease.state, retry_at=now)
    await store.enqueue(note("crit", Priority.CRITICAL))
    assert (await take(store, now=now + 1)).notification.id == "crit"
    assert (await take(store, now=now + 1)).notification.id == "low"


async def test_dead_letters_newest_first(make_store: StoreFactory) -> None:
    store = make_store()
    await store.enqueue(note("d1"))
    lease = await take(store)
    letters = [
        DeadLetter(lease.notification, f"ios:t{i}", "apns", f"reason {i}", i + 1, 1000.0 + i, 410)
        for i in range(3)
    ]
    assert await store.settle(lease, state=lease.state, dead_letters=letters)
    assert await store.dead_letters(10) == letters[::-1]
    assert await store.dead_letters(2) == letters[:0:-1]
    assert await store.dead_letters(0) == []
    assert sum((await store.depth()).values()) == 0


async def test_only_the_holder_settles_or_touches(make_store: StoreFactory) -> None:
    store = make_store()
    await store.enqueue(note("o1"))
    lease = await take(store, "c1")
    impostor = Lease(lease.ref, "c2", lease.notification, lease.state)
    assert not await store.touch(impostor)
    assert not await store.settle(impostor, state=lease.state)
    assert await store.touch(lease)
    assert await store.settle(lease, state=lease.state)
    assert not await store.settle(lease, state=lease.state)  # already settled


@pytest.mark.timeout(20)
async def test_idle_lease_is_taken_over_and_touch_keeps_it(make_store: StoreFactory) -> None:
    options = {"lease_timeout": 0.4, "reclaim_interval": 0.05}
    node_a, node_b = make_store(**options), make_store(**options)
    await node_a.enqueue(note("k1", Priority.HIGH))
    await node_a.enqueue(note("k2", Priority.LOW))
    held = await take(node_a, "a")
    assert held.notification.id == "k1"

    for _ in range(6):  # touched every 0.1 s for 0.6 s: never idle for 0.4 s
        await asyncio.sleep(0.1)
        assert await node_a.touch(held)
    taken = await take(node_b, "b")
    assert taken.notification.id == "k2"  # k1 is still held
    await node_b.settle(taken, state=taken.state)

    await asyncio.sleep(0.8)  # "a" died: its lease goes idle
    reclaimed = await take(node_b, "b")
    assert reclaimed.notification == held.notification
    assert reclaimed.reclaimed
    assert not await node_a.settle(held, state=held.state)  # the old holder lost it
    assert await node_b.settle(reclaimed, state=reclaimed.state)
    assert sum((await node_b.depth()).values()) == 0


@pytest.mark.timeout(20)
async def test_an_entry_never_settled_is_dead_lettered_after_max_deliveries(
    make_store: StoreFactory,
) -> None:
    """Holders that crash (never settle, stop touching) are the poison path of both stores."""
    options = {"lease_timeout": 0.2, "reclaim_interval": 0.05, "max_deliveries": 3}
    store = make_store(**options)
    poison = note("poison", Priority.HIGH)
    await store.enqueue(poison)
    await store.enqueue(note("fine", Priority.LOW))
    first = await take(store, "c0")
    assert (first.notification, first.reclaimed) == (poison, False)
    for _ in range(5):
        assert await store.touch(first)  # a touch is not a lease
    holders = [first]
    for i in (1, 2):  # each holder crashes: its lease goes idle and is taken over
        await asyncio.sleep(0.3)
        lease = await take(store, f"c{i}")
        assert (lease.notification, lease.reclaimed) == (poison, True)
        holders.append(lease)
    assert await store.dead_letters() == []

    await asyncio.sleep(0.3)  # the third holder crashes too: no fourth lease
    after = await take(store, "c3")
    assert (after.notification.id, after.reclaimed) == ("fine", False)
    [dead] = await store.dead_letters()
    assert (dead.notification, dead.target, dead.adapter, dead.attempts, dead.status) == (
        poison, STORE, STORE, 3, None,
    )  # fmt: skip
    assert dead.reason == "poison: leased 3 times and never settled"
    assert (await store.depth())[Priority.HIGH] == 0
    assert not await store.touch(holders[-1])  # the last holder lost it
    assert not await store.settle(holders[-1], state=holders[-1].state)
    assert await store.settle(after, state=after.state)
    await asyncio.sleep(0.3)
    assert await store.claim("c4", time.time()) is None
    assert len(await store.dead_letters()) == 1


async def test_rounds_settled_for_a_retry_are_not_poison(make_store: StoreFactory) -> None:
    store = make_store(max_deliveries=2)
    await store.enqueue(note("patient"))
    for rounds in range(1, 6):  # each retry is a new entry with a count of its own
        lease = await take(store)
        assert lease.state.rounds == rounds - 1
        assert await store.settle(lease, state=DeliveryState(rounds=rounds), retry_at=0.0)
    assert (await take(store)).state.rounds == 5
    assert await store.dead_letters() == []


def test_max_deliveries_is_at_least_one() -> None:
    with pytest.raises(ValueError, match="max_deliveries"):
        MemoryNotificationStore(max_deliveries=0)
    client = aioredis.Redis()  # never connected
    with pytest.raises(ValueError, match="max_deliveries"):
        RedisNotificationStore(client, max_deliveries=0)
    with pytest.raises(ValueError, match="consumer_idle_timeout"):
        RedisNotificationStore(client, lease_timeout=30.0, consumer_idle_timeout=30.0)
    with pytest.raises(ValueError, match="consumer_idle_timeout"):
        RedisNotificationStore(client, consumer_idle_timeout=float("nan"))


@pytest.mark.timeout(20)
async def test_wait_wakes_on_enqueue_and_on_due_retry(make_store: StoreFactory) -> None:
    store = make_store(poll_interval=30.0, lease_timeout=60.0)
    assert await store.claim("c1", time.time()) is None
    waiter = asyncio.create_task(store.wait(20.0))
    await asyncio.sleep(0.1)
    assert not waiter.done()
    started = time.monotonic()
    await store.enqueue(note("w1"))
    await asyncio.wait_for(waiter, 5.0)
    assert time.monotonic() - started < 3.0

    lease = await take(store)
    await store.settle(lease, state=lease.state, retry_at=time.time() + 0.3)
    assert await store.claim("c1", time.time()) is None
    started = time.monotonic()
    await store.wait(20.0)
    assert 0.2 <= time.monotonic() - started < 5.0
    assert (await take(store)).notification.id == "w1"


async def test_devices_several_per_user_moved_and_removed(make_store: StoreFactory) -> None:
    store = make_store()
    phone = Device("u1", Platform.IOS, "tok-ios")
    tablet = Device("u1", Platform.ANDROID, "tok:with:colons")
    await store.add_device(phone)
    await store.add_device(tablet)
    await store.add_device(phone)  # again: no duplicate
    assert sorted(await store.devices("u1"), key=lambda d: d.token) == [phone, tablet]
    assert await store.devices("nobody") == []

    await store.add_device(Device("u2", Platform.IOS, "tok-ios"))  # the token changed hands
    assert await store.devices("u1") == [tablet]
    assert await store.devices("u2") == [Device("u2", Platform.IOS, "tok-ios")]

    assert await store.remove_device(Platform.ANDROID, "tok:with:colons")
    assert not await store.remove_device(Platform.ANDROID, "tok:with:colons")
    assert not await store.remove_device(Platform.IOS, "unknown")
    assert await store.devices("u1") == []


async def test_devices_per_user_are_bounded_least_recent_evicted(make_store: StoreFactory) -> None:
    ticks = iter(range(1_000_000))
    store = make_store(max_devices_per_user=2, clock=lambda: float(next(ticks)))
    for token in ("a", "b", "c"):
        await store.add_device(Device("u1", Platform.IOS, token))
    assert sorted(d.token for d in await store.devices("u1")) == ["b", "c"]
    assert not await store.remove_device(Platform.IOS, "a")  # evicted entirely
    await store.add_device(Device("u1", Platform.IOS, "b"))  # refreshed: now the newest
    await store.add_device(Device("u1", Platform.IOS, "d"))
    assert sorted(d.token for d in await store.devices("u1")) == ["b", "d"]


async def test_depth_counts_each_priority(make_store: StoreFactory) -> None:
    store = make_store()
    for i, priority in enumerate(PRIORITIES):
        for j in range(i + 1):
            await store.enqueue(note(f"{priority.value}-{j}", priority))
    assert await store.depth() == {p: i + 1 for i, p in enumerate(PRIORITIES)}
    assert await store.ping()


# --------------------------------------------------------------------------- Redis only


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_redis_unreachable_is_queue_unavailable() -> None:
    store = RedisNotificationStore.from_url(f"redis://127.0.0.1:{_closed_port()}/0")
    try:
        with pytest.raises(QueueUnavailable) as info:
            await store.enqueue(note("x"))
        assert info.value.reason == "unreachable"
        with pytest.raises(QueueUnavailable):
            await store.claim("c1", time.time())
        with pytest.raises(QueueUnavailable):
            await store.add_device(Device("u1", Platform.IOS, "t"))
        assert not await store.ping()
    finally:
        await store.close()


async def test_redis_keys_live_under_the_prefix_and_streams_lost_are_recreated(
    redis_url: str,
) -> None:
    store = RedisNotificationStore.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.enqueue(note("p1"), idempotency_window=60)
        await store.add_device(Device("u1", Platform.IOS, "t"))
        lease = await take(store)
        await store.settle(lease, state=lease.state, retry_at=time.time() + 60)
        keys = {str(k) for k in await client.keys("*")}
        assert keys and all(k.startswith("rt:notif:") for k in keys), keys

        await client.flushdb()  # as after a restart of a Redis without persistence
        await store.enqueue(note("p2"))
        assert (await take(store)).notification.id == "p2"
    finally:
        await client.aclose()
        await store.close()


async def test_redis_undecodable_entries_are_dead_lettered_not_raised(redis_url: str) -> None:
    store = RedisNotificationStore.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    stream, delayed = "rt:notif:q:normal", "rt:notif:delayed:normal"
    try:
        assert await store.claim("c1", time.time()) is None  # the consumer groups exist
        half = note("half")  # a notification whose state is broken
        corrupt: list[tuple[dict[Any, Any], str]] = [
            ({"n": b"\xff\xfe", "s": "{}"}, "UnicodeDecodeError"),
            ({"n": "{not json", "s": "{}"}, "JSONDecodeError"),
            ({"n": json.dumps({"id": "x"}), "s": "{}"}, "KeyError: 'user'"),
            ({"x": "y"}, "KeyError: 'n'"),
            ({"n": json.dumps(half.to_map()), "s": "[1, 2]"}, "AttributeError"),
        ]
        refs = [str(await client.xadd(stream, fields)) for fields, _ in corrupt]
        await client.zadd(delayed, {"garbage": 0, '["only one"]': 0})  # not [n, s]
        await store.enqueue(note("good"))

        lease = await take(store)  # the five are dead-lettered on the way, nothing raises
        assert lease.notification.id == "good"
        assert await store.settle(lease, state=lease.state)
        assert await store.claim("c1", time.time()) is None  # the promoted two go too

        letters = await store.dead_letters(10)
        assert len(letters) == 7
        assert {(d.target, d.adapter, d.attempts) for d in letters} == {(STORE, STORE, 0)}
        for (fields, error), ref, dead in zip(corrupt, refs, letters[:1:-1], strict=True):
            assert dead.reason.startswith(f"undecodable entry {ref} in the normal queue: ")
            assert error in dead.reason, dead.reason
            if "n" in fields and fields["s"] == "[1, 2]":
                assert dead.notification == half
            else:
                assert (dead.notification.id, dead.notification.priority) == (
                    ref, Priority.NORMAL,
                )  # fmt: skip
        assert letters[6].notification.data["raw_entry"] == ["n", "\\xff\\xfe", "s", "{}"]
        assert letters[5].notification.data["raw_entry"] == ["n", "{not json", "s", "{}"]
        raws = sorted(d.notification.data["raw_entry"][1] for d in letters[:2])
        assert raws == ['["only one"]', "garbage"]
        assert all("undecodable entry" in d.reason for d in letters[:2])

        assert await client.xlen(stream) == 0
        assert (await client.xpending(stream, "routers"))["pending"] == 0
        assert sum((await store.depth()).values()) == 0
    finally:
        await client.aclose()
        await store.close()


async def _consumers(client: aioredis.Redis) -> dict[str, dict[str, int]]:
    """Priority -> {consumer: pending entries} of the group, from XINFO CONSUMERS."""
    found = {}
    for priority in PRIORITIES:
        infos = await client.xinfo_consumers(f"rt:notif:q:{priority.value}", "routers")
        found[priority.value] = {str(i["name"]): int(i["pending"]) for i in infos}
    return found


@pytest.mark.timeout(30)
async def test_redis_idle_consumers_are_removed_but_never_with_pending_entries(
    redis_url: str,
) -> None:
    idle = {"lease_timeout": 0.2, "consumer_idle_timeout": 0.8}
    store = RedisNotificationStore.from_url(redis_url, reclaim_interval=3600.0, **idle)
    heir = RedisNotificationStore.from_url(redis_url, reclaim_interval=0.05, **idle)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await store.enqueue(note("held"))
        await store.enqueue(note("done"))
        held = await take(store, "crashed")  # never settled: its holder died
        done = await take(store, "finished")  # settled, then its holder went away
        assert await store.settle(done, state=done.state)
        assert (await _consumers(client))["normal"] == {"crashed": 1, "finished": 0}

        started = time.monotonic()
        while time.monotonic() - started < 2.0:  # a live router, idle: claims every 0.1 s
            assert await store.claim("live", time.time()) is None
            await asyncio.sleep(0.1)
        consumers = await _consumers(client)
        assert all("finished" not in c for c in consumers.values())  # idle, nothing pending
        assert consumers["normal"]["crashed"] == 1  # pending: kept
        # The live router holds nothing: Redis < 7.2 does not count its empty reads as
        # activity and it goes too; from 7.2 they count and it may stay.
        assert consumers["normal"].keys() <= {"crashed", "live"}
        assert consumers["normal"].get("live", 0) == 0
        assert await store.touch(held)  # its pending entry is intact

        await asyncio.sleep(0.3)
        taken = await take(heir, "heir")  # the reclaim empties the dead consumer first
        assert (taken.notification.id, taken.reclaimed) == ("held", True)
        assert await heir.settle(taken, state=taken.state)
        await asyncio.sleep(1.0)
        assert await heir.claim("heir", time.time()) is None
        consumers = await _consumers(client)
        assert all("crashed" not in c and "finished" not in c for c in consumers.values())
        assert sum((await store.depth()).values()) == 0
    finally:
        await client.aclose()
        await heir.close()
        await store.close()


def _prune_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "notifications.store" and "removing idle consumers failed" in r.getMessage()
    ]


@pytest.mark.timeout(30)
async def test_redis_a_failing_consumer_removal_never_stops_claims(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A real failure: the store's Redis user may not run XGROUP DELCONSUMER (an ACL), so every
    removal of an idle consumer fails. Claims go on; the failure is logged once per interval."""
    caplog.set_level(logging.WARNING, logger="notifications.store")
    idle = {"lease_timeout": 0.2, "consumer_idle_timeout": 0.5}
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    user = f"router-{secrets.token_hex(4)}"
    await admin.acl_setuser(
        user, enabled=True, passwords=["+secret"], keys=["*"], channels=["*"],
        categories=["+@all"], commands=["-xgroup|delconsumer"],
    )  # fmt: skip
    parts = urlsplit(redis_url)
    locked_url = urlunsplit(parts._replace(netloc=f"{user}:secret@{parts.netloc}"))
    store = RedisNotificationStore.from_url(redis_url, **idle)
    locked = RedisNotificationStore.from_url(locked_url, **idle)
    try:
        await store.enqueue(note("first"))
        done = await take(store, "gone")  # settled, then its holder went away
        assert await store.settle(done, state=done.state)
        await asyncio.sleep(0.7)  # "gone" is idle for longer than 0.5 s, holding nothing
        for id in ("a", "b"):
            await store.enqueue(note(id))

        now = time.time()
        assert (await take(locked, "router", now)).notification.id == "a"
        assert "gone" in (await _consumers(admin))["normal"]  # the removal did fail
        [failure] = _prune_failures(caplog)
        assert "next try in 0.25 s" in failure, failure
        assert (await take(locked, "router", now + 0.1)).notification.id == "b"
        assert len(_prune_failures(caplog)) == 1  # not tried again within the interval
        assert await locked.claim("router", now + 0.3) is None  # tried again, failed again
        assert len(_prune_failures(caplog)) == 2
        assert "gone" in (await _consumers(admin))["normal"]
    finally:
        await locked.close()
        await store.close()
        await admin.acl_deluser(user)
        await admin.aclose()


@pytest.mark.parametrize("timeout", [float("inf"), 1e306])  # 1e306 s is inf in milliseconds
async def test_redis_an_endless_consumer_idle_timeout_turns_the_removal_off(
    redis_url: str, caplog: pytest.LogCaptureFixture, timeout: float
) -> None:
    caplog.set_level(logging.WARNING, logger="notifications.store")
    store = RedisNotificationStore.from_url(redis_url, consumer_idle_timeout=timeout)
    try:
        await store.enqueue(note("n"))
        lease = await take(store)
        assert await store.settle(lease, state=lease.state)
        assert await store.claim("c1", time.time() + 10**9) is None
        assert _prune_failures(caplog) == []
    finally:
        await store.close()


def dead_lettered(metrics: NotificationMetrics, priority: str, adapter: str) -> float:
    labels = {"priority": priority, "adapter": adapter}
    value = metrics.registry.get_sample_value(
        "piggybong_realtime_notifications_dead_lettered_total", labels
    )
    return 0.0 if value is None else value


@pytest.mark.timeout(20)
async def test_the_stores_own_dead_letters_are_counted_and_no_others(
    make_store: StoreFactory,
) -> None:
    """``on_dead_letter`` hears of poison letters once they are stored; letters handed to
    ``settle`` (the router's, which it counts itself) are not passed to it."""
    metrics = NotificationMetrics(CollectorRegistry())
    store = make_store(
        lease_timeout=0.2, reclaim_interval=0.05, max_deliveries=1,
        on_dead_letter=metrics.count_dead_letter,
    )  # fmt: skip
    await store.enqueue(note("poison", Priority.CRITICAL))
    await store.enqueue(note("routed", Priority.LOW))
    await take(store, "crashed")  # never settled
    routed = await take(store, "live")
    letter = DeadLetter(routed.notification, "ios:t", "apns", "rejected", 1, time.time())
    assert await store.settle(routed, state=routed.state, dead_letters=[letter])
    assert dead_lettered(metrics, "low", "apns") == 0

    await asyncio.sleep(0.3)
    assert await store.claim("live", time.time()) is None  # the second lease: poison
    assert [d.reason for d in await store.dead_letters()] == [
        "poison: leased 1 times and never settled", "rejected",
    ]  # fmt: skip
    assert dead_lettered(metrics, "critical", STORE) == 1
    assert dead_lettered(metrics, "low", "apns") == 0


async def test_redis_undecodable_entries_are_counted_and_logged(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="notifications.store")
    metrics = NotificationMetrics(CollectorRegistry())
    store = RedisNotificationStore.from_url(redis_url, on_dead_letter=metrics.count_dead_letter)
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await store.claim("c1", time.time()) is None  # the consumer groups exist
        await client.xadd("rt:notif:q:high", {"x": "y"})
        await client.zadd("rt:notif:delayed:normal", {"garbage": 0})
        assert await store.claim("c1", time.time()) is None
        assert len(await store.dead_letters()) == 2
        assert dead_lettered(metrics, "high", STORE) == 1
        assert dead_lettered(metrics, "normal", STORE) == 1
        logged = [r.getMessage() for r in caplog.records if "dead-lettered" in r.getMessage()]
        assert len(logged) == 2 and all("undecodable entry" in m for m in logged), logged
    finally:
        await client.aclose()
        await store.close()
