"""The push pipeline under load of the providers' failures, end to end below HTTP.

The real NotificationRouter with real CircuitBreakers drives the real ApnsAdapter and FcmAdapter
over HTTP/2 + TLS on 127.0.0.1 against the fakes in tests/fakes, with the notification store on
real Redis (``redis_url``) and in memory. Providers fail as scripted (``script`` answers the next
requests, ``answer_token`` every request for one device token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from notifications.apns import ApnsAdapter, apns_id
from notifications.breaker import BreakerState, CircuitBreaker
from notifications.fcm import FcmAdapter
from notifications.memory_store import MemoryNotificationStore
from notifications.metrics import NotificationMetrics
from notifications.models import Device, Notification, Outcome, Platform, Priority, PushResult
from notifications.push import PushAdapter
from notifications.redis_store import RedisNotificationStore
from notifications.requests import NotificationRequest
from notifications.router import Backoff, NotificationRouter
from notifications.service import NotificationService
from notifications.store import NotificationStore
from tests.fakes import Reply
from tests.fakes import make_notification as note
from tests.fakes.apns_server import FakeApns, apns_error
from tests.fakes.fcm_server import FakeFcm, fcm_error
from tests.test_notification_service import sample
from tests.test_router import InApp, push_all, wait_until

IOS, ANDROID = Platform.IOS, Platform.ANDROID
#: The provider's error code for each HTTP status the tests script.
ERROR_CODES = {
    IOS: {410: "Unregistered", 429: "TooManyRequests", 500: "InternalServerError",
          503: "ServiceUnavailable"},
    ANDROID: {404: "UNREGISTERED", 429: "QUOTA_EXCEEDED", 500: "INTERNAL", 503: "UNAVAILABLE"},
}  # fmt: skip


@dataclass(frozen=True)
class Send:
    """One finished ``send`` through a ``Recorded`` adapter (monotonic times)."""

    notification: str
    token: str
    started: float
    ended: float
    result: PushResult


class Recorded:
    """A PushAdapter forwarding to a real adapter; counts sends started and records finished ones.

    ``started`` is counted before the first await, so it moves in the same step as the
    breaker's ``allow()`` that let the send through.
    """

    def __init__(self, inner: ApnsAdapter | FcmAdapter) -> None:
        self.inner = inner
        self.name = inner.name
        self.started = 0
        self.sends: list[Send] = []

    async def send(self, notification: Notification, device: Device) -> PushResult:
        self.started += 1
        start = time.monotonic()
        result = await self.inner.send(notification, device)
        self.sends.append(Send(notification.id, device.token, start, time.monotonic(), result))
        return result

    async def close(self) -> None:
        await self.inner.close()

    def delivered(self) -> Counter[tuple[str, str]]:
        """(notification id, token) -> sends that ended delivered."""
        return Counter(
            (s.notification, s.token) for s in self.sends if s.result.outcome is Outcome.DELIVERED
        )

    def failures(self) -> int:
        return sum(s.result.breaker_failure for s in self.sends)


@dataclass(frozen=True)
class Transition:
    """A breaker state change, with the adapter's sends started and breaker failures by then."""

    old: BreakerState
    new: BreakerState
    at: float
    started: int
    failures: int


@dataclass(frozen=True)
class Provider:
    """A fake provider seen from a test: its platform, its scripts and its error answers."""

    platform: Platform
    fake: FakeApns | FakeFcm

    def script(self, *replies: Reply) -> None:
        """The next push requests (never FCM's token requests) get ``replies``."""
        if isinstance(self.fake, FakeApns):
            self.fake.script(*replies)
        else:
            self.fake.script_send(*replies)

    def error(self, status: int, headers: dict[str, str] | None = None) -> Reply:
        code = ERROR_CODES[self.platform][status]
        if isinstance(self.fake, FakeApns):
            return apns_error(status, code, headers)
        return fcm_error(status, code, headers=headers)

    def pushes(self) -> list[tuple[str, str]]:
        """(notification id, device token) of every push request received, in arrival order."""
        found = []
        for request in self.fake.requests:
            if request.path.startswith("/3/device/"):
                found.append((request.json()["notification_id"], request.path.split("/")[-1]))
            elif request.path.endswith("/messages:send"):
                message = request.json()["message"]
                found.append((message["data"]["notification_id"], message["token"]))
        return found


@dataclass
class Pipeline:
    """Builds stores, adapters, breakers and routers on one metrics registry; closes them all."""

    redis_url: str | None
    fake_apns: FakeApns
    fake_fcm: FakeFcm
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    in_app: InApp = field(default_factory=InApp)
    transitions: list[Transition] = field(default_factory=list)
    stores: list[NotificationStore] = field(default_factory=list)
    adapters: list[PushAdapter] = field(default_factory=list)
    routers: list[NotificationRouter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = NotificationMetrics(self.registry)
        self.ios = Provider(IOS, self.fake_apns)
        self.android = Provider(ANDROID, self.fake_fcm)

    def provider(self, platform: Platform) -> Provider:
        return self.ios if platform is IOS else self.android

    def store(self, *, lease_timeout: float = 30.0) -> NotificationStore:
        """A new store: on Redis (a new client on the same DB), else a new memory store."""
        store: NotificationStore
        if self.redis_url is None:
            store = MemoryNotificationStore(lease_timeout=lease_timeout)
        else:
            store = RedisNotificationStore.from_url(
                self.redis_url,
                lease_timeout=lease_timeout,
                reclaim_interval=lease_timeout / 4,
                poll_interval=0.2,
            )
        self.stores.append(store)
        return store

    def peer_store(self, store: NotificationStore, *, lease_timeout: float) -> NotificationStore:
        """The same queue as another node sees it: a second Redis client, or the same memory."""
        return store if self.redis_url is None else self.store(lease_timeout=lease_timeout)

    async def device(self, store: NotificationStore, platform: Platform) -> Device:
        """A device of user u1 with a token its platform's fake knows, registered in ``store``."""
        device = Device("u1", platform, self.provider(platform).fake.add_device())
        await store.add_device(device)
        return device

    def adapter(self, platform: Platform) -> Recorded:
        inner: ApnsAdapter | FcmAdapter
        if platform is IOS:
            creds = self.fake_apns.credentials
            inner = ApnsAdapter(
                key_pem=creds.key_pem, key_id=creds.key_id, team_id=creds.team_id,
                topic=creds.topic, endpoint=self.fake_apns.url,
                ca_bundle=self.fake_apns.ca_file, timeout=5.0,
            )  # fmt: skip
        else:
            inner = FcmAdapter(
                service_account=self.fake_fcm.service_account, endpoint=self.fake_fcm.url,
                ca_bundle=self.fake_fcm.ca_file, timeout=5.0,
            )  # fmt: skip
        adapter = Recorded(inner)
        self.adapters.append(adapter)
        return adapter

    def breaker(
        self,
        adapter: Recorded,
        *,
        failure_threshold: int = 5,
        cooldown: float = 0.5,
        credentials_cooldown: float = 0.5,
    ) -> CircuitBreaker:
        """A breaker on unix time (as the app wires it) recording its transitions."""

        def on_transition(name: str, old: BreakerState, new: BreakerState) -> None:
            self.metrics.breaker_transition(name, old, new)
            self.transitions.append(
                Transition(old, new, time.monotonic(), adapter.started, adapter.failures())
            )

        return CircuitBreaker(
            name=adapter.name, clock=time.time, failure_threshold=failure_threshold,
            cooldown=cooldown, credentials_cooldown=credentials_cooldown,
            on_transition=on_transition,
        )  # fmt: skip

    async def router(
        self,
        store: NotificationStore,
        adapters: Mapping[Platform, Recorded],
        breakers: Mapping[Platform, CircuitBreaker] | None = None,
        **options: Any,
    ) -> NotificationRouter:
        """A started router; without ``breakers``, a default breaker per adapter."""
        if breakers is None:
            breakers = {platform: self.breaker(a) for platform, a in adapters.items()}
        settings: dict[str, Any] = {
            "concurrency": 2, "max_attempts": 10, "backoff": Backoff(base=0.05, cap=0.5),
            "breaker_recheck": 0.1, "idle_wait": 0.2, "drain_timeout": 1.0,
            "depth_interval": 0.2, **options,
        }  # fmt: skip
        router = NotificationRouter(
            store, adapters, breakers, self.in_app, push_all, self.metrics, **settings
        )
        self.routers.append(router)
        await router.start()
        return router

    def sample(self, name: str, **labels: str) -> float:
        return sample(self.metrics, name, **labels)

    async def close(self) -> None:
        for router in self.routers:
            await router.close()
        for adapter in self.adapters:
            await adapter.close()
        for store in self.stores:
            await store.close()


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL of a fresh DB, or None for the memory store."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    return None


@pytest.fixture
async def pipe(
    backend: str | None, fake_apns: FakeApns, fake_fcm: FakeFcm
) -> AsyncIterator[Pipeline]:
    pipeline = Pipeline(backend, fake_apns, fake_fcm)
    yield pipeline
    await pipeline.close()


async def queued(store: NotificationStore) -> int:
    return sum((await store.depth()).values())


async def drained(store: NotificationStore) -> None:
    """Waits until the store holds no notification (rounds settle after they push)."""
    for _ in range(200):
        if await queued(store) == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{await queued(store)} notifications still queued")


# --------------------------------------------------------------------------- breaker


@pytest.mark.timeout(45)
async def test_a_503_burst_opens_the_breaker_and_every_queued_notification_arrives_once(
    pipe: Pipeline,
) -> None:
    store = pipe.store()
    tokens = [(await pipe.device(store, IOS)).token for _ in range(2)]
    apns = pipe.adapter(IOS)
    breaker = pipe.breaker(apns, failure_threshold=5, cooldown=0.5)
    # At most 4 sends are in flight (2 rounds x 2 devices), so at most 8 requests start before
    # the breaker opens; the rest of the burst is failed probes, each reopening it.
    burst = 12
    pipe.ios.script(*[pipe.ios.error(503)] * burst)
    ids = [f"burst-{i}" for i in range(8)]
    for id in ids:
        await store.enqueue(note(Priority.HIGH, id=id))
    await pipe.router(store, {IOS: apns}, {IOS: breaker}, concurrency=2)

    await wait_until(lambda: breaker.state is BreakerState.OPEN)
    first = pipe.transitions[0]
    assert (first.old, first.new, first.failures) == (BreakerState.CLOSED, BreakerState.OPEN, 5)
    assert await queued(store) == len(ids)  # nothing delivered, nothing dropped: they wait
    assert not apns.delivered()

    await wait_until(lambda: sum(apns.delivered().values()) == 2 * len(ids), timeout=30)
    await drained(store)
    await asyncio.sleep(0.3)  # a duplicate push, were one coming, would come now

    pairs = {(id, token) for id in ids for token in tokens}
    assert apns.delivered() == Counter(pairs)
    pushes = pipe.ios.pushes()
    assert len(pushes) == burst + len(pairs)  # scripts answer in arrival order
    assert Counter(pushes[burst:]) == Counter(pairs)  # each device got each notification once
    assert Counter(token for _, token in pushes[burst:]) == {t: len(ids) for t in tokens}
    assert await store.dead_letters() == []
    assert sorted(pipe.in_app.ids) == sorted(ids)

    # No send started while open; each probe waited out the cooldown.
    for opened, probing in zip(pipe.transitions, pipe.transitions[1:], strict=False):
        if opened.new is BreakerState.OPEN:
            assert probing.new is BreakerState.HALF_OPEN
            assert probing.started == opened.started
            assert probing.at - opened.at >= 0.5 * 0.9
    reopened = sum(t.old is BreakerState.HALF_OPEN and t.new is BreakerState.OPEN
                   for t in pipe.transitions)  # fmt: skip
    assert reopened >= 1
    assert pipe.transitions[-1].new is BreakerState.CLOSED
    assert breaker.state is BreakerState.CLOSED
    assert pipe.sample("breaker_state", adapter="apns") == 0
    assert pipe.sample("breaker_waits_total", adapter="apns") >= 1


# --------------------------------------------------------------------------- rejected credentials


def revoke_credentials(pipe: Pipeline, platform: Platform) -> tuple[str, Callable[[], None]]:
    """Makes the provider refuse the credentials of the adapters already built, by the fake's own
    checks: APNs no longer knows our key id (InvalidProviderToken), Google's token endpoint no
    longer knows our service account (400 invalid_grant). Returns that reason and the fix."""
    if platform is IOS:
        apns, credentials = pipe.fake_apns, pipe.fake_apns.credentials
        apns.credentials = dataclasses.replace(credentials, key_id="REVOKED000")
        return "InvalidProviderToken", lambda: setattr(apns, "credentials", credentials)
    fcm, email = pipe.fake_fcm, pipe.fake_fcm.client_email
    fcm.client_email = "deleted@piggybong-test.iam.gserviceaccount.com"
    return "invalid_grant", lambda: setattr(fcm, "client_email", email)


@pytest.mark.timeout(45)
@pytest.mark.parametrize("platform", [IOS, ANDROID])
async def test_rejected_credentials_open_the_breaker_and_every_notification_waits_for_the_fix(
    pipe: Pipeline, platform: Platform, caplog: pytest.LogCaptureFixture
) -> None:
    store = pipe.store()
    tokens = [(await pipe.device(store, platform)).token for _ in range(2)]
    adapter = pipe.adapter(platform)
    breaker = pipe.breaker(adapter, credentials_cooldown=1.0)
    reason, fix = revoke_credentials(pipe, platform)
    ids = [f"cred-{i}" for i in range(8)]
    for id in ids:
        await store.enqueue(note(Priority.HIGH, id=id))
    concurrency = 4  # rounds of 2 pushes each: at most 8 pushes in flight as it first opens
    # Were a refusal an attempt, two attempts would dead-letter all 16 pushes within a second.
    await pipe.router(store, {platform: adapter}, {platform: breaker},
                      concurrency=concurrency, max_attempts=2)  # fmt: skip

    def openings() -> int:
        return sum(t.new is BreakerState.OPEN for t in pipe.transitions)

    # It opens at the first refusal, then each probe after a cool-down is refused and reopens it.
    await wait_until(lambda: openings() >= 3, timeout=20)
    opened = openings()
    assert breaker.state is BreakerState.OPEN
    assert pipe.sample("breaker_state", adapter=adapter.name) == 2
    refused = [s for s in adapter.sends if s.result.outcome is Outcome.CREDENTIALS_REJECTED]
    assert refused and len(refused) == len(adapter.sends)
    assert all(reason in s.result.reason for s in refused)
    if platform is IOS:  # every refused push was a request to APNs: the first burst, then probes
        assert len(pipe.fake_apns.requests) == len(refused)
        assert len(refused) <= concurrency * len(tokens) + opened - 1
    else:  # one token request per opening: the sends in flight shared the first refusal
        assert len(pipe.fake_fcm.token_requests) == opened
        assert pipe.fake_fcm.send_requests == []
    assert await queued(store) == len(ids)
    assert await store.dead_letters() == []
    assert pipe.sample("retried_total", priority="high", adapter=adapter.name) == 0
    errors = [r for r in caplog.records
              if r.name == "notifications.router" and r.levelno == logging.ERROR]  # fmt: skip
    assert len(errors) == opened  # one line per opening, not per notification
    for record in errors:
        assert f"push adapter {adapter.name}: " in record.getMessage()
        assert reason in record.getMessage()

    fix()
    await wait_until(lambda: sum(adapter.delivered().values()) == len(ids) * len(tokens))
    await drained(store)
    await asyncio.sleep(0.3)  # a duplicate push, were one coming, would come now

    assert adapter.delivered() == Counter((id, token) for id in ids for token in tokens)
    assert sorted(pipe.in_app.ids) == sorted(ids)
    assert await store.dead_letters() == []
    assert breaker.state is BreakerState.CLOSED  # type: ignore[comparison-overlap]  # fix() closed it
    assert pipe.transitions[-1].new is BreakerState.CLOSED
    assert openings() == opened
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == opened
    assert pipe.sample("retried_total", priority="high", adapter=adapter.name) == 0
    assert pipe.sample("dead_lettered_total", priority="high", adapter=adapter.name) == 0
    assert pipe.sample("breaker_waits_total", adapter=adapter.name) >= len(ids)
    if platform is ANDROID:
        assert len(pipe.fake_fcm.token_requests) == opened + 1


@pytest.mark.timeout(30)
async def test_rejected_credentials_without_a_breaker_wait_max_breaker_wait(
    pipe: Pipeline, caplog: pytest.LogCaptureFixture
) -> None:
    store = pipe.store()
    device = await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    _, fix = revoke_credentials(pipe, IOS)
    await pipe.router(store, {IOS: apns}, {}, max_attempts=1, max_breaker_wait=0.5)
    await store.enqueue(note(Priority.HIGH, id="waits"))
    await wait_until(lambda: len(apns.sends) == 2, timeout=10)
    fix()
    await wait_until(lambda: ("waits", device.token) in apns.delivered(), timeout=10)
    await drained(store)

    first, second, delivered = apns.sends
    # max_breaker_wait from the start of the round, not breaker_recheck (0.1 s)
    assert second.started - first.started >= 0.5 - 0.01
    assert delivered.started - second.started >= 0.5 - 0.01
    assert await store.dead_letters() == []  # max_attempts=1: a refusal is no attempt
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2  # no breaker remembers it: one line per refusal


# --------------------------------------------------------------------------- Retry-After


@pytest.mark.timeout(30)
@pytest.mark.parametrize("platform", [IOS, ANDROID])
async def test_429_retry_after_is_honoured_without_tripping_the_breaker(
    pipe: Pipeline, platform: Platform
) -> None:
    store = pipe.store()
    device = await pipe.device(store, platform)
    provider, adapter = pipe.provider(platform), pipe.adapter(platform)
    breaker = pipe.breaker(adapter, failure_threshold=1)  # one breaker failure would open it
    await pipe.router(store, {platform: adapter}, {platform: breaker},
                      backoff=Backoff(base=0.01, cap=0.02))  # fmt: skip
    await store.enqueue(note(id="warm-up"))  # connection, provider token: ready
    await wait_until(lambda: ("warm-up", device.token) in adapter.delivered())

    provider.script(provider.error(429, {"retry-after": "1"}))
    await store.enqueue(note(id="paced"))
    await wait_until(lambda: ("paced", device.token) in adapter.delivered())
    throttled, retry = [s for s in adapter.sends if s.notification == "paced"]
    assert (throttled.result.status, throttled.result.retry_after) == (429, 1.0)
    # Counted from the answer (without Retry-After the backoff would retry within 0.02 s); the
    # slack only covers the two clocks (the router's unix time, the recorder's monotonic).
    assert retry.started - throttled.ended >= 1.0 - 0.01, retry.started - throttled.ended
    assert breaker.state is BreakerState.CLOSED
    assert pipe.transitions == []
    assert pipe.sample("retried_total", priority="high", adapter=adapter.name) == 1
    assert provider.pushes().count(("paced", device.token)) == 2


@pytest.mark.timeout(30)
@pytest.mark.parametrize("backend", ["redis"], indirect=True)
async def test_retry_after_counts_from_a_slow_answer(pipe: Pipeline) -> None:
    """Not from the start of the round that waited 1 s for the answer."""
    store = pipe.store()
    device = await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    await pipe.router(store, {IOS: apns}, backoff=Backoff(base=0.01, cap=0.02))
    await store.enqueue(note(id="warm-up"))
    await wait_until(lambda: ("warm-up", device.token) in apns.delivered())

    slow = dataclasses.replace(pipe.ios.error(429, {"retry-after": "1.5"}), delay=1.0)
    pipe.ios.script(slow)
    await store.enqueue(note(id="paced"))
    await wait_until(lambda: ("paced", device.token) in apns.delivered())
    throttled, retry = [s for s in apns.sends if s.notification == "paced"]
    assert throttled.result.retry_after == 1.5
    assert retry.started - throttled.ended >= 1.5 - 0.01, retry.started - throttled.ended


# --------------------------------------------------------------------------- dead tokens

DEAD_TOKEN_ANSWERS = {
    "apns-410-unregistered": (IOS, apns_error(410, "Unregistered")),
    "fcm-404-unregistered": (ANDROID, fcm_error(404, "UNREGISTERED")),
    "fcm-apns-410": (ANDROID, fcm_error(400, "INVALID_ARGUMENT", apns_status=410)),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", list(DEAD_TOKEN_ANSWERS))
async def test_a_dead_token_is_removed_from_the_registry_and_never_retried(
    pipe: Pipeline, case: str
) -> None:
    platform, answer = DEAD_TOKEN_ANSWERS[case]
    store = pipe.store()
    gone = await pipe.device(store, platform)
    kept = await pipe.device(store, platform)
    provider, adapter = pipe.provider(platform), pipe.adapter(platform)
    provider.fake.answer_token(gone.token, answer)
    # One round at a time: "second" is routed only after "first" has settled.
    await pipe.router(store, {platform: adapter}, concurrency=1)

    await store.enqueue(note(id="first"))
    await wait_until(lambda: ("first", kept.token) in adapter.delivered())
    await store.enqueue(note(id="second"))
    await wait_until(lambda: ("second", kept.token) in adapter.delivered())
    await asyncio.sleep(0.3)  # a retry (backoff <= 0.05 s) would have come by now

    assert Counter(provider.pushes()) == {
        ("first", gone.token): 1, ("first", kept.token): 1, ("second", kept.token): 1,
    }  # fmt: skip
    [dead] = [s.result for s in adapter.sends if s.token == gone.token]
    assert dead.outcome is Outcome.DEAD_TOKEN
    assert await store.devices("u1") == [kept]
    assert pipe.sample("dead_tokens_total", adapter=adapter.name) == 1
    assert pipe.sample("retried_total", priority="high", adapter=adapter.name) == 0
    assert await store.dead_letters() == []
    assert pipe.transitions == []  # a dead token says nothing about the provider's health


# --------------------------------------------------------------------------- priority


@pytest.mark.timeout(40)
async def test_a_critical_overtakes_a_backlog_of_normals(pipe: Pipeline) -> None:
    store = pipe.store()
    await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    pipe.fake_apns.server.delay = 0.05  # each push takes a while: the backlog is observable
    backlog = [f"normal-{i}" for i in range(30)]
    for id in backlog:
        await store.enqueue(note(Priority.NORMAL, id=id))
    await pipe.router(store, {IOS: apns}, concurrency=1)
    await wait_until(lambda: len(pipe.fake_apns.requests) >= 3)

    before = len(pipe.fake_apns.requests)
    await store.enqueue(note(Priority.CRITICAL, id="critical"))
    await wait_until(lambda: len(pipe.fake_apns.requests) == len(backlog) + 1, timeout=30)

    order = [id for id, _ in pipe.ios.pushes()]
    at = order.index("critical")
    # Only the round in flight and one claimed while the critical was being queued may go first.
    assert before <= at <= before + 2, (before, at)
    assert len(backlog) - at >= 20  # most of the backlog was still waiting
    assert sorted(order) == sorted([*backlog, "critical"])
    priorities = [r.headers["apns-priority"] for r in pipe.fake_apns.requests]
    assert priorities[at] == "10"
    assert set(priorities[:at] + priorities[at + 1 :]) == {"5"}


# --------------------------------------------------------------------------- ttl


@pytest.mark.timeout(30)
async def test_ttl_passing_while_the_breaker_is_open_drops_it_unpushed(pipe: Pipeline) -> None:
    store = pipe.store()
    device = await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    breaker = pipe.breaker(apns, failure_threshold=1, cooldown=1.2)
    pipe.ios.script(pipe.ios.error(503))
    await pipe.router(store, {IOS: apns}, {IOS: breaker})
    await store.enqueue(note(Priority.HIGH, id="opener"))
    await wait_until(lambda: breaker.state is BreakerState.OPEN)

    # 0.5 s left to live; the breaker lets a probe through 1.2 s after it opened.
    short_lived = note(Priority.HIGH, id="short-lived", ttl=1, created_at=time.time() - 0.5)
    await store.enqueue(short_lived)
    await wait_until(lambda: pipe.sample("expired_total", priority="high") == 1, timeout=15)
    await wait_until(lambda: ("opener", device.token) in apns.delivered(), timeout=15)
    await drained(store)

    assert [id for id, _ in pipe.ios.pushes()] == ["opener", "opener"]  # the 503, the probe
    assert await store.dead_letters() == []
    assert pipe.sample("expired_total", priority="high") == 1
    assert pipe.sample("delivered_total", priority="high", adapter="apns") == 1


@pytest.mark.timeout(30)
async def test_ttl_passing_while_backing_off_drops_it_without_a_retry(pipe: Pipeline) -> None:
    store = pipe.store()
    device = await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    pipe.ios.script(pipe.ios.error(429, {"retry-after": "1.5"}))  # the ttl is 1 s
    await pipe.router(store, {IOS: apns})
    await store.enqueue(note(Priority.HIGH, id="short-lived", ttl=1))

    await wait_until(lambda: pipe.sample("expired_total", priority="high") == 1, timeout=15)
    await drained(store)
    await asyncio.sleep(0.2)
    assert pipe.ios.pushes() == [("short-lived", device.token)]  # the 429, no retry
    assert await store.dead_letters() == []
    assert pipe.sample("retried_total", priority="high", adapter="apns") == 1
    assert pipe.sample("delivered_total", priority="high", adapter="apns") == 0


# --------------------------------------------------------------------------- dead letters


@pytest.mark.timeout(30)
@pytest.mark.parametrize("platform", [IOS, ANDROID])
async def test_a_token_failing_forever_is_dead_lettered_after_max_attempts(
    pipe: Pipeline, platform: Platform
) -> None:
    store = pipe.store()
    bad = await pipe.device(store, platform)
    good = await pipe.device(store, platform)
    provider, adapter = pipe.provider(platform), pipe.adapter(platform)
    provider.fake.answer_token(bad.token, provider.error(500))
    await pipe.router(store, {platform: adapter}, max_attempts=3,
                      backoff=Backoff(base=0.05, cap=0.2))  # fmt: skip
    await store.enqueue(note(Priority.HIGH, id="doomed"))

    await wait_until(
        lambda: pipe.sample("dead_lettered_total", priority="high", adapter=adapter.name) == 1
    )
    await drained(store)
    await asyncio.sleep(0.3)
    [dead] = await store.dead_letters()
    assert (dead.notification.id, dead.target, dead.adapter, dead.attempts, dead.status) == (
        "doomed", bad.key, adapter.name, 3, 500,
    )  # fmt: skip
    assert "gave up after 3 attempts" in dead.reason
    assert Counter(provider.pushes()) == {("doomed", bad.token): 3, ("doomed", good.token): 1}
    assert pipe.sample("retried_total", priority="high", adapter=adapter.name) == 2
    assert sorted(d.token for d in await store.devices("u1")) == sorted([bad.token, good.token])
    assert pipe.in_app.ids == ["doomed"]


# --------------------------------------------------------------------------- leases


@pytest.mark.timeout(40)
async def test_a_router_killed_mid_delivery_is_taken_over_by_another(pipe: Pipeline) -> None:
    store_a = pipe.store(lease_timeout=0.6)
    device = await pipe.device(store_a, IOS)
    apns_a = pipe.adapter(IOS)
    ids = [f"k{i}" for i in range(3)]
    pipe.ios.script(*[Reply(200, delay=30.0)] * len(ids))  # answers that never come in time
    router_a = await pipe.router(store_a, {IOS: apns_a}, concurrency=3, drain_timeout=0.05)
    for id in ids:
        await store_a.enqueue(note(Priority.HIGH, id=id))
    await wait_until(lambda: len(pipe.fake_apns.requests) == len(ids))

    await router_a.close()  # its rounds are cancelled mid-push; nothing is settled
    await apns_a.close()
    assert apns_a.sends == []

    store_b = pipe.peer_store(store_a, lease_timeout=0.6)
    apns_b = pipe.adapter(IOS)
    await pipe.router(store_b, {IOS: apns_b})
    await wait_until(lambda: sum(apns_b.delivered().values()) == len(ids), timeout=20)
    await drained(store_b)
    await asyncio.sleep(0.3)

    assert apns_b.delivered() == Counter((id, device.token) for id in ids)
    # Each was pushed by the killed router (unanswered) and once more by the one that took over,
    # with the same apns-id both times, so the provider can tell it is the same notification.
    assert Counter(pipe.ios.pushes()) == {(id, device.token): 2 for id in ids}
    for id in ids:
        requests = [r for r in pipe.fake_apns.requests if r.json()["notification_id"] == id]
        assert {r.headers["apns-id"] for r in requests} == {apns_id(id)}
    assert pipe.sample("delivered_total", priority="high", adapter="apns") == len(ids)
    assert await store_b.dead_letters() == []


# --------------------------------------------------------------------------- idempotency


@pytest.mark.timeout(30)
async def test_a_duplicate_id_accepted_through_the_service_is_pushed_once(pipe: Pipeline) -> None:
    store = pipe.store()
    device = await pipe.device(store, IOS)
    apns = pipe.adapter(IOS)
    service = NotificationService(store, metrics=pipe.metrics, idempotency_window=60.0)
    request = NotificationRequest(user="u1", priority=Priority.HIGH, title="t", body="b", id="dup")
    await pipe.router(store, {IOS: apns})

    ids = list(await asyncio.gather(service.accept(request), service.accept(request)))
    await wait_until(lambda: ("dup", device.token) in apns.delivered())
    ids.append(await service.accept(request))  # again, after it was delivered
    await drained(store)
    await asyncio.sleep(0.3)

    assert ids == ["dup"] * 3
    assert pipe.ios.pushes() == [("dup", device.token)]
    assert pipe.in_app.ids == ["dup"]
    assert pipe.sample("accepted_total", priority="high") == 1
    assert pipe.sample("duplicates_total", priority="high") == 2


# --------------------------------------------------------------------------- FCM message


@pytest.mark.timeout(30)
async def test_fcm_push_carries_priority_ttl_and_collapse_key_on_one_oauth_token(
    pipe: Pipeline,
) -> None:
    store = pipe.store()
    device = await pipe.device(store, ANDROID)
    fcm = pipe.adapter(ANDROID)
    started = time.time()
    first = [
        note(Priority.CRITICAL, id="critical", collapse_id="budget", ttl=600),
        note(Priority.HIGH, id="high", ttl=3600, created_at=started - 1000),
        note(Priority.NORMAL, id="normal", collapse_id="daily", ttl=120, created_at=started - 60),
        note(Priority.LOW, id="low", ttl=0),
    ]
    for n in first:  # queued before the router starts: their sends race for the token
        await store.enqueue(n)
    await pipe.router(store, {ANDROID: fcm}, concurrency=4)
    await wait_until(lambda: len(fcm.delivered()) == len(first))
    later = note(Priority.HIGH, id="later", collapse_id="budget", ttl=60)
    await store.enqueue(later)
    await wait_until(lambda: len(fcm.delivered()) == len(first) + 1)
    ended = time.time()

    assert len(pipe.fake_fcm.token_requests) == 1
    [access_token] = pipe.fake_fcm.access_tokens
    messages = {}
    for request in pipe.fake_fcm.send_requests:
        assert request.headers["authorization"] == f"Bearer {access_token}"
        message = request.json()["message"]
        assert message["token"] == device.token
        messages[message["data"]["notification_id"]] = message["android"]
    assert set(messages) == {n.id for n in [*first, later]}
    for n in [*first, later]:
        android = messages[n.id]
        urgent = n.priority in {Priority.CRITICAL, Priority.HIGH}
        assert android["priority"] == ("HIGH" if urgent else "NORMAL"), n.id
        assert android.get("collapse_key") == n.collapse_id, n.id
        # What is left of its life when it was sent (whole seconds, rounded up).
        left = int(android["ttl"].removesuffix("s"))
        if n.ttl:
            assert n.expires_at - ended <= left <= n.expires_at - started + 1, (n.id, left)
    assert messages["low"]["ttl"] == "0s"  # now or never


# --------------------------------------------------------------------------- poison


@pytest.mark.timeout(40)
async def test_a_notification_whose_routers_keep_dying_is_dead_lettered_as_poison(
    pipe: Pipeline,
) -> None:
    """Two routers die holding it (max_deliveries=2); the third dead-letters it unpushed."""

    shared = MemoryNotificationStore(lease_timeout=0.6, max_deliveries=2)

    def store() -> NotificationStore:
        """Each router's own store (Redis) or the one in-process queue (memory)."""
        if pipe.redis_url is None:
            return shared
        made = RedisNotificationStore.from_url(
            pipe.redis_url, lease_timeout=0.6, reclaim_interval=0.15, poll_interval=0.2,
            max_deliveries=2,
        )  # fmt: skip
        pipe.stores.append(made)
        return made

    first = store()
    hanging = Device("u-poison", IOS, pipe.fake_apns.add_device())
    pipe.fake_apns.answer_token(hanging.token, Reply(200, delay=30.0))  # never in time
    await first.add_device(hanging)
    fine = await pipe.device(first, IOS)
    poison = note(Priority.HIGH, id="poison", user="u-poison")
    await first.enqueue(poison)

    for died in (1, 2):
        apns = pipe.adapter(IOS)
        router = await pipe.router(first if died == 1 else store(), {IOS: apns},
                                   drain_timeout=0.05)  # fmt: skip
        await wait_until(lambda: len(pipe.ios.pushes()) == died)  # noqa: B023 (awaited here)
        await router.close()  # cancelled mid-push: the lease is left to be taken over
        await apns.close()
        assert apns.sends == []

    await first.enqueue(note(Priority.NORMAL, id="fine"))
    survivor = pipe.adapter(IOS)
    await pipe.router(store(), {IOS: survivor})
    await wait_until(lambda: ("fine", fine.token) in survivor.delivered(), timeout=20)
    await drained(first)
    await asyncio.sleep(0.3)

    assert Counter(pipe.ios.pushes()) == {("poison", hanging.token): 2, ("fine", fine.token): 1}
    [dead] = await first.dead_letters()
    assert (dead.notification, dead.target, dead.adapter, dead.attempts) == (
        poison, "store", "store", 2,
    )  # fmt: skip
    assert dead.reason == "poison: leased 2 times and never settled"
    assert pipe.in_app.ids.count("poison") == 2  # each round that died got that far
