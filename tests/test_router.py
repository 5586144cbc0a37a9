"""NotificationRouter over a real Redis, with scripted PushAdapters and a real CircuitBreaker."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from notifications.breaker import CircuitBreaker
from notifications.metrics import NotificationMetrics
from notifications.models import (
    DeliveryState,
    Device,
    Notification,
    Outcome,
    Platform,
    Priority,
    PushResult,
)
from notifications.redis_store import RedisNotificationStore
from notifications.router import Backoff, Breaker, DeliveryRound, NotificationRouter, is_expired
from notifications.store import NotificationStore
from tests.redis_server import RedisServer

DELIVERED = PushResult(Outcome.DELIVERED, status=200)
TRANSIENT = PushResult(Outcome.RETRY, status=503, reason="unavailable", breaker_failure=True)
FAST = Backoff(base=0.05, cap=0.2)
_ids = itertools.count()


class ScriptedAdapter:
    """A real PushAdapter: answers from ``script`` in call order, then ``default``.

    Records (notification id, token, monotonic time) per call; ``gate`` (when set) holds every
    send until it is opened; ``delay`` makes each send take that long.
    """

    def __init__(
        self,
        name: str,
        script: Iterable[PushResult] = (),
        *,
        default: PushResult = DELIVERED,
        delay: float = 0.0,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.name = name
        self.script = deque(script)
        self.default = default
        self.delay = delay
        self.gate = gate
        self.calls: list[tuple[str, str, float]] = []

    async def send(self, notification: Notification, device: Device) -> PushResult:
        self.calls.append((notification.id, device.token, time.monotonic()))
        if self.gate is not None:
            await self.gate.wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.script.popleft() if self.script else self.default

    async def close(self) -> None:
        return None

    def calls_for(self, notification_id: str) -> list[tuple[str, str, float]]:
        return [c for c in self.calls if c[0] == notification_id]


class InApp:
    """deliver_in_app that records ids in order; fails its first ``failures`` calls."""

    def __init__(self, *, delay: float = 0.0, failures: int = 0) -> None:
        self.ids: list[str] = []
        self.delay = delay
        self.failures = failures

    async def __call__(self, notification: Notification) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("broker down")
        if self.delay:
            await asyncio.sleep(self.delay)
        self.ids.append(notification.id)


async def push_all(user: str, priority: Priority) -> bool:
    return True


async def wait_until(predicate: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def note(priority: Priority = Priority.NORMAL, **kw: Any) -> Notification:
    fields: dict[str, Any] = {"user": "u1", "title": "t", "body": "b", **kw}
    fields.setdefault("id", f"n{next(_ids)}")
    return Notification(priority=priority, **fields)


@dataclass
class Rig:
    """Stores (one per simulated node, all on one Redis DB), routers and their metrics."""

    url: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    stores: list[RedisNotificationStore] = field(default_factory=list)
    routers: list[NotificationRouter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = NotificationMetrics(self.registry)

    def store(self, **options: Any) -> RedisNotificationStore:
        store = RedisNotificationStore.from_url(self.url, **options)
        self.stores.append(store)
        return store

    async def router(
        self,
        store: NotificationStore,
        adapters: dict[Platform, ScriptedAdapter],
        *,
        in_app: Callable[[Notification], Awaitable[None]],
        breakers: dict[Platform, Breaker] | None = None,
        push_allowed: Callable[[str, Priority], Awaitable[bool]] = push_all,
        **options: Any,
    ) -> NotificationRouter:
        options.setdefault("backoff", FAST)
        options.setdefault("idle_wait", 0.2)
        router = NotificationRouter(
            store,
            adapters,
            breakers or {},
            in_app,
            push_allowed,
            self.metrics,
            **options,
        )
        self.routers.append(router)
        await router.start()
        return router

    def sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(f"piggybong_realtime_notifications_{name}", labels)
        return 0.0 if value is None else value


@pytest.fixture
async def rig(redis_url: str) -> AsyncIterator[Rig]:
    rig = Rig(redis_url)
    yield rig
    for router in rig.routers:
        await router.close()
    for store in rig.stores:
        await store.close()


async def with_device(store: NotificationStore, token: str = "ios-1", user: str = "u1") -> Device:
    device = Device(user, Platform.IOS, token)
    await store.add_device(device)
    return device


# --------------------------------------------------------------------------- sans-I/O cores


def test_backoff_grows_with_jitter_is_capped_and_honours_retry_after() -> None:
    backoff = Backoff(base=1.0, cap=10.0)
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (30, 10.0)]:
        assert backoff.delay(attempt, None, 0.0) == ceiling / 2
        assert ceiling / 2 <= backoff.delay(attempt, None, 0.999) < ceiling
    assert backoff.delay(1, 42.0, 0.5) == 42.0
    assert backoff.delay(4, 1.0, 0.5) == 6.0


def test_round_waits_for_the_latest_of_retries_and_breakers() -> None:
    n = note()
    rnd = DeliveryRound(n, DeliveryState(), max_attempts=3, now=100.0)
    assert rnd.retry_at(FAST, 0.0) is None
    rnd.failed("ios:a", "apns", "503", retry_after=7.0)
    rnd.wait_for_breaker("fcm", 103.0)
    assert rnd.retry_at(Backoff(base=1.0), 0.0) == 107.0
    rnd.failed("ios:a", "apns", "503")
    rnd.failed("ios:a", "apns", "503")  # third attempt of three: dead-lettered
    assert rnd.state.done["ios:a"] == "failed"
    assert [(d.target, d.attempts) for d in rnd.dead] == [("ios:a", 3)]


def test_ttl_zero_means_one_round() -> None:
    n = note(ttl=0, created_at=0.0)
    assert not is_expired(n, DeliveryState(), now=50.0)
    assert is_expired(n, DeliveryState(rounds=1), now=50.0)
    m = note(ttl=10, created_at=100.0)
    assert not is_expired(m, DeliveryState(rounds=5), now=110.0)
    assert is_expired(m, DeliveryState(), now=110.01)


# --------------------------------------------------------------------------- over Redis


@pytest.mark.timeout(60)
async def test_backlog_of_normal_never_delays_a_critical(rig: Rig) -> None:
    store = rig.store()
    backlog = 200
    for _ in range(backlog):
        await store.enqueue(note(Priority.NORMAL))
    in_app = InApp(delay=0.02)  # the backlog takes ~4 s at concurrency 2
    await rig.router(store, {}, in_app=in_app, concurrency=2)
    await wait_until(lambda: len(in_app.ids) >= 10)

    critical = note(Priority.CRITICAL, id="the-critical")
    await store.enqueue(critical)
    before = len(in_app.ids)
    await wait_until(lambda: "the-critical" in in_app.ids)
    position = in_app.ids.index("the-critical")
    # Only the rounds already in flight (2) and at most a few more claims may come first.
    assert position - before <= 4, (position, before)
    assert len(in_app.ids) < backlog / 2
    await wait_until(lambda: len(in_app.ids) == backlog + 1, timeout=30)


@pytest.mark.timeout(30)
async def test_mixed_queue_is_delivered_in_priority_order(rig: Rig) -> None:
    store = rig.store()
    queued = [note(p) for p in [Priority.LOW, Priority.NORMAL, Priority.HIGH] * 5]
    queued += [note(Priority.CRITICAL) for _ in range(3)]
    for n in queued:
        await store.enqueue(n)
    in_app = InApp()
    await rig.router(store, {}, in_app=in_app, concurrency=1)
    await wait_until(lambda: len(in_app.ids) == len(queued))
    by_id = {n.id: n for n in queued}
    ranks = [by_id[i].priority.rank for i in in_app.ids]
    assert ranks == sorted(ranks)
    assert rig.sample("delivered_total", priority="critical", adapter="in_app") == 3


@pytest.mark.timeout(30)
async def test_in_app_always_push_only_where_allowed(rig: Rig) -> None:
    store = rig.store()
    await with_device(store, "ios-a", "free-user")
    await with_device(store, "ios-b", "paid-user")

    async def normal_for_paid_only(user: str, priority: Priority) -> bool:
        return priority is not Priority.NORMAL or user == "paid-user"

    apns = ScriptedAdapter("apns")
    in_app = InApp()
    await rig.router(store, {Platform.IOS: apns}, in_app=in_app, push_allowed=normal_for_paid_only)
    for user in ("free-user", "paid-user"):
        await store.enqueue(note(Priority.NORMAL, user=user, id=f"normal-{user}"))
        await store.enqueue(note(Priority.HIGH, user=user, id=f"high-{user}"))
    await wait_until(lambda: len(in_app.ids) == 4 and len(apns.calls) == 3)
    await asyncio.sleep(0.3)
    assert sorted((c[0], c[1]) for c in apns.calls) == [
        ("high-free-user", "ios-a"),
        ("high-paid-user", "ios-b"),
        ("normal-paid-user", "ios-b"),
    ]
    assert sorted(in_app.ids) == sorted(
        ["normal-free-user", "high-free-user", "normal-paid-user", "high-paid-user"]
    )


@pytest.mark.timeout(30)
async def test_expired_notifications_are_dropped_and_counted(rig: Rig) -> None:
    store = rig.store()
    await with_device(store)
    apns = ScriptedAdapter("apns", default=TRANSIENT)  # never succeeds
    in_app = InApp()
    await store.enqueue(note(Priority.HIGH, id="stale", ttl=5, created_at=time.time() - 10))
    await store.enqueue(note(Priority.HIGH, id="short", ttl=1))
    await rig.router(store, {Platform.IOS: apns}, in_app=in_app, max_attempts=1000)

    await wait_until(lambda: rig.sample("expired_total", priority="high") == 2)
    assert in_app.ids == ["short"]  # "stale" was never delivered anywhere
    assert {c[0] for c in apns.calls} == {"short"}
    assert len(apns.calls) >= 2  # retried until its ttl passed
    assert await store.dead_letters() == []
    await wait_until(lambda: rig.sample("queue_depth", priority="high") == 0, timeout=10)
    assert (await store.depth())[Priority.HIGH] == 0


@pytest.mark.timeout(30)
async def test_retries_back_off_then_dead_letter_after_max_attempts(rig: Rig) -> None:
    store = rig.store()
    device = await with_device(store)
    apns = ScriptedAdapter("apns", default=TRANSIENT)
    in_app = InApp()
    await store.enqueue(note(Priority.HIGH, id="doomed"))
    await rig.router(
        store, {Platform.IOS: apns}, in_app=in_app, max_attempts=4,
        backoff=Backoff(base=0.2, cap=1.0),
    )  # fmt: skip
    await wait_until(
        lambda: rig.sample("dead_lettered_total", priority="high", adapter="apns") == 1
    )
    assert len(apns.calls) == 4
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(apns.calls)]
    for attempt, gap in enumerate(gaps, start=1):  # at least half of base * 2**(n-1)
        assert gap >= 0.2 * 2 ** (attempt - 1) / 2 * 0.95, gaps
    assert in_app.ids == ["doomed"]  # in-app went once, not once per retry
    [dead] = await store.dead_letters()
    assert (dead.notification.id, dead.target, dead.adapter, dead.attempts) == (
        "doomed", device.key, "apns", 4,
    )  # fmt: skip
    assert dead.status == 503
    assert rig.sample("retried_total", priority="high", adapter="apns") == 3
    assert (await store.depth())[Priority.HIGH] == 0


@pytest.mark.timeout(30)
async def test_retry_after_is_honoured(rig: Rig) -> None:
    store = rig.store()
    await with_device(store)
    throttled = PushResult(Outcome.RETRY, status=429, reason="TooManyRequests", retry_after=1.0)
    apns = ScriptedAdapter("apns", [throttled])
    await rig.router(store, {Platform.IOS: apns}, in_app=InApp(), backoff=Backoff(base=0.01))
    await store.enqueue(note(id="slow-down"))
    await wait_until(lambda: len(apns.calls) == 2)
    assert apns.calls[1][2] - apns.calls[0][2] >= 0.95
    await wait_until(lambda: rig.sample("delivered_total", priority="normal", adapter="apns") == 1)


@pytest.mark.timeout(30)
async def test_rejected_is_dead_lettered_at_once_dead_token_removes_the_device(rig: Rig) -> None:
    store = rig.store()
    gone = await with_device(store, "ios-gone")
    bad = Device("u1", Platform.ANDROID, "android-bad")
    await store.add_device(bad)
    apns = ScriptedAdapter("apns", [PushResult(Outcome.DEAD_TOKEN, status=410)])
    fcm = ScriptedAdapter("fcm", [PushResult(Outcome.REJECTED, status=400, reason="too big")])
    await rig.router(store, {Platform.IOS: apns, Platform.ANDROID: fcm}, in_app=InApp())
    await store.enqueue(note(Priority.CRITICAL, id="x"))
    await wait_until(lambda: rig.sample("dead_tokens_total", adapter="apns") == 1)
    await wait_until(
        lambda: rig.sample("dead_lettered_total", priority="critical", adapter="fcm") == 1
    )
    await asyncio.sleep(0.5)  # nothing is retried
    assert (len(apns.calls), len(fcm.calls)) == (1, 1)
    assert rig.sample("retried_total", priority="critical", adapter="apns") == 0
    assert rig.sample("retried_total", priority="critical", adapter="fcm") == 0
    assert await store.devices("u1") == [bad]
    assert gone not in await store.devices("u1")
    [dead] = await store.dead_letters()
    assert (dead.target, dead.status, dead.attempts) == (bad.key, 400, 1)
    assert "too big" in dead.reason


@pytest.mark.timeout(30)
async def test_a_retry_for_one_device_does_not_repush_the_others(rig: Rig) -> None:
    store = rig.store()
    await with_device(store, "ios-ok")
    await with_device(store, "ios-flaky")

    class PerToken(ScriptedAdapter):
        async def send(self, notification: Notification, device: Device) -> PushResult:
            result = await super().send(notification, device)
            flaky_calls = [c for c in self.calls if c[1] == "ios-flaky"]
            return TRANSIENT if device.token == "ios-flaky" and len(flaky_calls) <= 2 else result

    apns = PerToken("apns")
    in_app = InApp()
    await rig.router(store, {Platform.IOS: apns}, in_app=in_app)
    await store.enqueue(note(id="multi"))
    await wait_until(lambda: rig.sample("delivered_total", priority="normal", adapter="apns") == 2)
    await asyncio.sleep(0.3)
    assert Counter(c[1] for c in apns.calls) == {"ios-ok": 1, "ios-flaky": 3}
    assert in_app.ids == ["multi"]


@pytest.mark.timeout(30)
async def test_in_app_failure_is_retried(rig: Rig) -> None:
    store = rig.store()
    in_app = InApp(failures=2)
    await rig.router(store, {}, in_app=in_app)
    await store.enqueue(note(id="retry-in-app"))
    await wait_until(lambda: in_app.ids == ["retry-in-app"])
    assert rig.sample("retried_total", priority="normal", adapter="in_app") == 2


@pytest.mark.timeout(40)
async def test_killed_router_leases_are_reclaimed_and_delivered_by_another(rig: Rig) -> None:
    options = {"lease_timeout": 0.6, "reclaim_interval": 0.1}
    store_a, store_b = rig.store(**options), rig.store(**options)
    await with_device(store_a)
    stuck = ScriptedAdapter("apns", gate=asyncio.Event())  # never answers
    router_a = await rig.router(
        store_a, {Platform.IOS: stuck}, in_app=InApp(), concurrency=3, drain_timeout=0.05
    )
    ids = [f"k{i}" for i in range(3)]
    for id in ids:
        await store_a.enqueue(note(Priority.HIGH, id=id))
    await wait_until(lambda: len(stuck.calls) == 3)
    await router_a.close()  # cancelled mid-delivery: nothing acked

    raw = aioredis.Redis.from_url(rig.url)
    try:
        pending = await raw.xpending("rt:notif:q:high", "routers")
        assert pending["pending"] == 3
    finally:
        await raw.aclose()

    apns_b = ScriptedAdapter("apns")
    await rig.router(store_b, {Platform.IOS: apns_b}, in_app=InApp())
    await wait_until(lambda: len(apns_b.calls) == 3)
    assert sorted(c[0] for c in apns_b.calls) == ids
    await wait_until(lambda: rig.sample("delivered_total", priority="high", adapter="apns") == 3)
    await asyncio.sleep(0.3)
    assert (await store_b.depth())[Priority.HIGH] == 0
    assert len(apns_b.calls) == 3


@pytest.mark.timeout(60)
async def test_open_breaker_holds_notifications_until_recovery(rig: Rig) -> None:
    store = rig.store()
    await with_device(store)
    # Five provider failures open the breaker; after them the provider is healthy again.
    apns = ScriptedAdapter("apns", [TRANSIENT] * 5)
    # The breaker's clock (monotonic) is not the router's: its retry_at() cannot be used, so
    # the router looks again every breaker_recheck -- many waits, none of them an attempt.
    breaker = CircuitBreaker(
        name="apns", clock=time.monotonic, failure_threshold=5, cooldown=1.5,
        on_transition=rig.metrics.breaker_transition,
    )  # fmt: skip
    in_app = InApp()
    await rig.router(
        store, {Platform.IOS: apns}, in_app=in_app, breakers={Platform.IOS: breaker},
        concurrency=1, max_attempts=6, breaker_recheck=0.1,
    )  # fmt: skip
    ids = [f"b{i}" for i in range(10)]
    for id in ids:
        await store.enqueue(note(Priority.HIGH, id=id))

    await wait_until(lambda: rig.sample("breaker_state", adapter="apns") == 2)  # open
    assert len(apns.calls) == 5
    await asyncio.sleep(0.5)
    assert len(apns.calls) == 5  # nothing is pushed while open
    assert (await store.depth())[Priority.HIGH] > 0  # they wait in the queue

    await wait_until(
        lambda: rig.sample("delivered_total", priority="high", adapter="apns") == 10, timeout=30
    )
    assert sorted({c[0] for c in apns.calls}) == ids
    assert len(apns.calls) == 15  # 5 failures, then each notification once
    assert await store.dead_letters() == []
    assert rig.sample("breaker_waits_total", adapter="apns") > 10
    assert (
        rig.sample("breaker_transitions_total", adapter="apns", **{"from": "closed", "to": "open"})
        == 1
    )
    assert (
        rig.sample(
            "breaker_transitions_total", adapter="apns", **{"from": "half_open", "to": "closed"}
        )
        == 1
    )
    assert rig.sample("breaker_state", adapter="apns") == 0
    assert sorted(in_app.ids) == ids


@pytest.mark.timeout(60)
async def test_router_rides_out_a_redis_restart(rig: Rig, redis_server: RedisServer) -> None:
    store = rig.store()
    in_app = InApp()
    await rig.router(store, {}, in_app=in_app)
    await store.enqueue(note(id="before"))
    await wait_until(lambda: in_app.ids == ["before"])

    redis_server.restart()  # no persistence here: the streams and the group are gone
    await asyncio.sleep(0.5)
    for _ in range(100):  # the first command on a stale connection may fail once
        try:
            await store.enqueue(note(id="after"))
            break
        except Exception:
            await asyncio.sleep(0.1)
    await wait_until(lambda: in_app.ids == ["before", "after"], timeout=20)


@pytest.mark.timeout(60)
async def test_an_outage_while_idle_does_not_raise_concurrency(
    rig: Rig, redis_server: RedisServer
) -> None:
    store = rig.store()
    in_flight, peak = 0, 0

    class Counting(ScriptedAdapter):
        async def send(self, notification: Notification, device: Device) -> PushResult:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await super().send(notification, device)
            finally:
                in_flight -= 1

    apns = Counting("apns", delay=0.1)
    await rig.router(store, {Platform.IOS: apns}, in_app=InApp(), concurrency=1)
    await asyncio.sleep(0.5)  # idle: the dispatcher blocks in wait()
    redis_server.kill()
    await asyncio.sleep(1.5)
    redis_server.restart()
    for _ in range(100):  # the first command on a stale connection may fail once
        try:
            await with_device(store)
            break
        except Exception:
            await asyncio.sleep(0.1)
    for i in range(6):
        await store.enqueue(note(id=f"o{i}"))
    await wait_until(lambda: len(apns.calls) == 6, timeout=30)
    assert peak == 1
