"""NotificationService: validation, acceptance (idempotent, bounded, durable) and devices."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from notifications.memory_store import MemoryNotificationStore
from notifications.metrics import NotificationMetrics
from notifications.models import DEFAULT_TTL, Device, Platform, Priority
from notifications.redis_store import RedisNotificationStore
from notifications.requests import DeviceRequest, NotificationRequest
from notifications.router import Backoff, NotificationRouter
from notifications.service import NotificationService, QueueUnavailable
from notifications.store import NotificationStore
from tests.redis_server import find_redis_server
from tests.test_router import InApp, ScriptedAdapter, push_all, wait_until

BODY: dict[str, Any] = {"user": "42", "priority": "high", "title": "Comeback", "body": "aespa"}


def request(**overrides: Any) -> NotificationRequest:
    return NotificationRequest.model_validate({**BODY, **overrides})


def metrics() -> NotificationMetrics:
    return NotificationMetrics(CollectorRegistry())


def sample(m: NotificationMetrics, name: str, **labels: str) -> float:
    value = m.registry.get_sample_value(f"piggybong_realtime_notifications_{name}", labels)
    return 0.0 if value is None else value


# --------------------------------------------------------------------------- validation


def test_request_defaults_and_conversion() -> None:
    req = request(data={"k": [1, 2]}, collapse_id="x" * 64)
    assert (req.id, req.ttl, req.priority) == (None, DEFAULT_TTL, Priority.HIGH)
    n = req.to_notification(id="abc", created_at=1000.0)
    assert (n.id, n.user, n.data, n.collapse_id, n.expires_at) == (
        "abc", "42", {"k": [1, 2]}, "x" * 64, 1000.0 + DEFAULT_TTL,
    )  # fmt: skip
    assert request(data=None).to_notification(id="a", created_at=0).data == {}
    assert request(ttl=0).ttl == 0
    assert request(ttl=2_419_200).ttl == 2_419_200
    assert request(collapse_id="가" * 21).collapse_id == "가" * 21  # 63 bytes


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"priority": "urgent"}, "priority"),
        ({"id": ""}, "id"),
        ({"id": "x" * 129}, "id"),
        ({"user": ""}, "user"),
        ({"user": "u" * 129}, "user"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": 2_419_201}, "ttl"),
        ({"ttl": "60"}, "ttl"),
        ({"ttl": 1.5}, "ttl"),
        ({"collapse_id": "x" * 65}, "collapse_id"),
        ({"collapse_id": "가" * 22}, "collapse_id"),  # 22 chars, 66 bytes
        ({"data": [1]}, "data"),
        ({"title": None}, "title"),
        ({"prority": "low"}, "prority"),
    ],
)
def test_invalid_notification_requests_name_the_field(
    overrides: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as info:
        request(**overrides)
    assert field in {str(e["loc"][0]) for e in info.value.errors()}


def test_missing_fields_are_refused() -> None:
    for missing in BODY:
        body = {k: v for k, v in BODY.items() if k != missing}
        with pytest.raises(ValidationError):
            NotificationRequest.model_validate(body)


def test_device_request() -> None:
    req = DeviceRequest.model_validate({"user": "42", "platform": "ios", "token": "t" * 4096})
    assert req.to_device() == Device("42", Platform.IOS, "t" * 4096)
    for bad in (
        {"user": "42", "platform": "windows", "token": "t"},
        {"user": "42", "platform": "ios", "token": ""},
        {"user": "42", "platform": "ios", "token": "t" * 4097},
        {"user": "", "platform": "android", "token": "t"},
    ):
        with pytest.raises(ValidationError):
            DeviceRequest.model_validate(bad)


# --------------------------------------------------------------------------- service on both stores


@pytest.fixture(params=["memory", "redis"])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    made: list[NotificationStore] = []
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None

    def make(**options: Any) -> NotificationStore:
        store: NotificationStore = (
            MemoryNotificationStore(**options)
            if url is None
            else RedisNotificationStore.from_url(url, **options)
        )
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


async def test_accept_makes_or_echoes_ids_and_is_idempotent(make_store: Any) -> None:
    store, m = make_store(), metrics()
    service = NotificationService(store, metrics=m, idempotency_window=60)
    server_id = await service.accept(request())
    assert len(server_id) == 32 and server_id != await service.accept(request())

    assert await service.accept(request(id="caller-1")) == "caller-1"
    assert await service.accept(request(id="caller-1", title="changed")) == "caller-1"
    assert sample(m, "accepted_total", priority="high") == 3
    assert sample(m, "duplicates_total", priority="high") == 1
    assert (await store.depth())[Priority.HIGH] == 3

    titles = []
    while (lease := await store.claim("c", time.time())) is not None:
        titles.append((lease.notification.id, lease.notification.title))
        await store.settle(lease, state=lease.state)
    assert ("caller-1", "Comeback") in titles  # the first body wins
    assert len(titles) == 3


async def test_accept_at_the_bound_is_refused_and_drops_nothing(make_store: Any) -> None:
    store, m = make_store(max_depth=2), metrics()
    service = NotificationService(store, metrics=m)
    accepted = [await service.accept(request(id=f"a{i}")) for i in range(2)]
    with pytest.raises(QueueUnavailable) as info:
        await service.accept(request(id="a2"))
    assert info.value.reason == "full"
    assert sample(m, "refused_total", reason="full") == 1
    assert await service.accept(request(id="c0", priority="critical")) == "c0"

    taken = []
    while (lease := await store.claim("c", time.time())) is not None:
        taken.append(lease.notification.id)
        await store.settle(lease, state=lease.state)
    assert taken == ["c0", *accepted]
    assert await service.accept(request(id="a2")) == "a2"  # refused ones were not remembered


async def test_devices_register_and_remove(make_store: Any) -> None:
    store = make_store()
    service = NotificationService(store)
    await service.register_device(
        DeviceRequest.model_validate({"user": "42", "platform": "ios", "token": "abc"})
    )
    await service.register_device(
        DeviceRequest.model_validate({"user": "42", "platform": "android", "token": "def"})
    )
    assert len(await store.devices("42")) == 2
    await service.remove_device(Platform.IOS, "abc")
    await service.remove_device(Platform.IOS, "abc")  # unknown now: no error
    assert await store.devices("42") == [Device("42", Platform.ANDROID, "def")]
    assert await service.ready()
    assert await service.dead_letters() == []


async def test_unreachable_store_is_queue_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = RedisNotificationStore.from_url(f"redis://127.0.0.1:{port}/0")
    m = metrics()
    service = NotificationService(store, metrics=m)
    try:
        with pytest.raises(QueueUnavailable) as info:
            await service.accept(request())
        assert info.value.reason == "unreachable"
        assert sample(m, "refused_total", reason="unreachable") == 1
        with pytest.raises(QueueUnavailable):
            await service.register_device(
                DeviceRequest.model_validate({"user": "42", "platform": "ios", "token": "t"})
            )
        assert not await service.ready()
    finally:
        await store.close()


@pytest.mark.timeout(30)
async def test_duplicate_id_is_pushed_once(redis_url: str) -> None:
    store = RedisNotificationStore.from_url(redis_url)
    m = metrics()
    service = NotificationService(store, metrics=m)
    await store.add_device(Device("42", Platform.IOS, "phone"))
    apns, in_app = ScriptedAdapter("apns"), InApp()
    router = NotificationRouter(store, {Platform.IOS: apns}, {}, in_app, push_all, m, idle_wait=0.2)
    await router.start()
    try:
        ids = [await service.accept(request(id="dup")) for _ in range(3)]
        await wait_until(lambda: len(apns.calls) == 1)
        await asyncio.sleep(0.5)
        assert ids == ["dup"] * 3
        assert [c[:2] for c in apns.calls] == [("dup", "phone")]
        assert in_app.ids == ["dup"]
    finally:
        await router.close()
        await store.close()


# --------------------------------------------------------------------------- durability


class DurableRedis:
    """A redis-server with AOF fsynced on every write, which this test may SIGKILL and restart."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
                "--appendfsync", "always", "--logfile", str(self.directory / "redis.log"),
            ],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        raise
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    binary = find_redis_server()
    if binary is None:
        pytest.fail("redis-server not found: the durability test needs a real Redis")
    server = DurableRedis(binary, tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@pytest.mark.timeout(60)
async def test_accepted_notifications_survive_a_redis_crash(durable_redis: DurableRedis) -> None:
    store = RedisNotificationStore.from_url(durable_redis.url, lease_timeout=1.0)
    m = metrics()
    service = NotificationService(store, metrics=m)
    try:
        # Half of them taken by a router that then dies too: their leases must survive as well.
        accepted = [await service.accept(request(id=f"keep-{i}")) for i in range(20)]
        half = [await store.claim("dead-router", time.time()) for _ in range(10)]
        assert all(lease is not None for lease in half)

        durable_redis.kill()
        with pytest.raises(QueueUnavailable):
            await service.accept(request(id="while-down"))
        durable_redis.start()

        in_app = InApp()
        router = NotificationRouter(
            store, {}, {}, in_app, push_all, m, idle_wait=0.2, backoff=Backoff(base=0.05)
        )
        await router.start()
        try:
            await wait_until(lambda: sorted(in_app.ids) == sorted(accepted), timeout=30)
        finally:
            await router.close()
        assert sum((await store.depth()).values()) == 0
    finally:
        await store.close()
