"""Notifications end to end: HTTP accept, in-app delivery, push to a fake APNs over HTTP/2 + TLS."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from pydantic import ValidationError

from notifications.models import DeliveryState, Notification, Priority
from realtime.settings import NOTIFICATION_LEASE_TIMEOUT, Settings
from tests.fakes import Request
from tests.fakes.apns_server import ApnsCredentials, FakeApns, apns_error
from tests.server import ServerProcess, connected, running_server

pytestmark = pytest.mark.timeout(60)


def apns_env(fake: FakeApns, credentials: ApnsCredentials, tmp_path: Path) -> dict[str, str]:
    key = tmp_path / "AuthKey.p8"
    key.write_bytes(credentials.key_pem)
    return {
        "REALTIME_APNS_KEY_FILE": str(key),
        "REALTIME_APNS_KEY_ID": credentials.key_id,
        "REALTIME_APNS_TEAM_ID": credentials.team_id,
        "REALTIME_APNS_TOPIC": credentials.topic,
        "REALTIME_APNS_ENDPOINT": fake.url,
        "REALTIME_PUSH_CA_BUNDLE": fake.ca_file,
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def api(server: ServerProcess, method: str, path: str, body: Any = None) -> httpx.Response:
    async with server.http() as client:
        return await client.request(method, path, json=body)


def pushes_to(fake: FakeApns, token: str) -> list[Request]:
    return [r for r in fake.requests if r.path == f"/3/device/{token}"]


async def test_notification_in_app_and_pushed_by_tier_and_priority(
    fake_apns: FakeApns, apns_credentials: ApnsCredentials, tmp_path: Path
) -> None:
    async with running_server(apns_env(fake_apns, apns_credentials, tmp_path)) as server:
        paid_token, free_token = fake_apns.add_device(), fake_apns.add_device()
        for user, token in (("u-paid", paid_token), ("u-free", free_token)):
            response = await api(
                server, "POST", "/v1/devices", {"user": user, "platform": "ios", "token": token}
            )
            assert response.status_code == 204
        async with (
            connected(server, "u-paid", tier="paid") as paid,
            connected(server, "u-free") as free,
        ):
            for user in ("u-paid", "u-free"):
                response = await api(
                    server,
                    "POST",
                    "/v1/notifications",
                    {
                        "user": user,
                        "priority": "normal",
                        "title": "Budget",
                        "body": "80% of your album budget",
                        "data": {"pct": 80},
                    },
                )
                assert response.status_code == 202
            for client in (paid, free):
                message = await client.next_pushed(timeout=10)
                assert message["type"] == "notification"
                assert (message["priority"], message["title"], message["data"]) == (
                    "normal",
                    "Budget",
                    {"pct": 80},
                )
            # normal is pushed for paid only (free: critical and high).
            await wait_for(lambda: len(pushes_to(fake_apns, paid_token)) == 1)
            request = pushes_to(fake_apns, paid_token)[0]
            assert request.headers["apns-priority"] == "5"
            assert request.headers["apns-topic"] == apns_credentials.topic
            assert request.json()["aps"]["alert"] == {
                "title": "Budget",
                "body": "80% of your album budget",
            }
            response = await api(
                server,
                "POST",
                "/v1/notifications",
                {"user": "u-free", "priority": "high", "title": "Comeback", "body": "tonight"},
            )
            assert response.status_code == 202
            await wait_for(lambda: len(pushes_to(fake_apns, free_token)) == 1)
            assert pushes_to(fake_apns, free_token)[0].headers["apns-priority"] == "10"
            assert len(pushes_to(fake_apns, free_token)) == 1  # the normal one never was


async def test_duplicate_id_pushed_once_and_dead_token_removed(
    fake_apns: FakeApns, apns_credentials: ApnsCredentials, tmp_path: Path
) -> None:
    async with running_server(apns_env(fake_apns, apns_credentials, tmp_path)) as server:
        live, dead = fake_apns.add_device(), fake_apns.add_device()
        fake_apns.answer_token(dead, apns_error(410, "Unregistered"))
        for token in (live, dead):
            await api(
                server, "POST", "/v1/devices", {"user": "u-d", "platform": "ios", "token": token}
            )
        body = {"id": "notif-1", "user": "u-d", "priority": "critical", "title": "t", "body": "b"}
        first = await api(server, "POST", "/v1/notifications", body)
        second = await api(server, "POST", "/v1/notifications", body)
        assert first.status_code == second.status_code == 202
        assert first.json() == second.json() == {"id": "notif-1"}
        await wait_for(
            lambda: len(pushes_to(fake_apns, live)) == 1 and len(pushes_to(fake_apns, dead)) == 1
        )
        # A second notification: the dead token was removed, the live one still gets it.
        await api(
            server,
            "POST",
            "/v1/notifications",
            {"user": "u-d", "priority": "critical", "title": "t2", "body": "b"},
        )
        await wait_for(lambda: len(pushes_to(fake_apns, live)) == 2)
        await asyncio.sleep(0.5)
        assert len(pushes_to(fake_apns, dead)) == 1  # 410: not retried, not pushed again
        assert len(pushes_to(fake_apns, live)) == 2  # the duplicate id was pushed once
        async with server.http() as client:
            metrics = (await client.get("/metrics")).text
        assert "piggybong" in metrics and "notification" in metrics


async def test_notification_and_device_validation() -> None:
    async with running_server() as server:
        bad = [
            {"user": "u", "priority": "urgent", "title": "t", "body": "b"},
            {"user": "u", "priority": "high", "title": "t", "body": "b", "ttl": -1},
            {"user": "u", "priority": "high", "title": "t", "body": "b", "ttl": 2_419_201},
            {"user": "u", "priority": "high", "title": "t", "body": "b", "collapse_id": "é" * 33},
            {"priority": "high", "title": "t", "body": "b"},
        ]
        for body in bad:
            response = await api(server, "POST", "/v1/notifications", body)
            assert response.status_code == 422, body
            assert response.json()["error"]["fields"], body
        response = await api(
            server, "POST", "/v1/devices", {"user": "u", "platform": "windows", "token": "x"}
        )
        assert response.status_code == 422
        assert (await api(server, "DELETE", "/v1/devices/ios/never-registered")).status_code == 204
        assert (await api(server, "DELETE", "/v1/devices/palm/x")).status_code == 404
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post("/v1/notifications", json=bad[0])
            assert response.status_code == 401


async def test_notification_reaches_the_app_on_another_node(redis_url: str) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-far", binary=True) as client:
            response = await api(
                b,
                "POST",
                "/v1/notifications",
                {"user": "u-far", "priority": "low", "title": "Sale", "body": "merch -20%"},
            )
            assert response.status_code == 202
            message = await client.next_pushed(timeout=10)
            assert message["type"] == "notification"
            assert message["id"] == response.json()["id"]
            assert message["title"] == "Sale"


async def test_the_stores_dead_letters_are_counted_with_the_configured_max_deliveries(
    redis_url: str,
) -> None:
    """Before the server starts, one entry was leased once by a router that died (idle past
    the lease timeout) and one is garbage. With REALTIME_NOTIFICATION_MAX_DELIVERIES=1 the
    server's first claims dead-letter both, and /metrics counts them under adapter "store"."""
    stream = "rt:notif:q:normal"
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.xgroup_create(stream, "routers", id="0", mkstream=True)
        orphan = Notification("orphan", "u-o", Priority.NORMAL, "t", "b")
        ref = await client.xadd(
            stream, {"n": json.dumps(orphan.to_map()), "s": json.dumps(DeliveryState().to_map())}
        )
        await client.xreadgroup("routers", "died", {stream: ">"}, count=1)
        await client.xclaim(stream, "routers", "died", 0, [ref], idle=60_000, retrycount=1)
        await client.xadd(stream, {"x": "garbage"})
        env = {"REALTIME_REDIS_URL": redis_url, "REALTIME_NOTIFICATION_MAX_DELIVERIES": "1"}
        async with running_server(env) as server:
            counted = 'dead_lettered_total{adapter="store",priority="normal"} 2.0'
            async with server.http() as http:
                deadline = time.monotonic() + 10
                while counted not in (metrics := (await http.get("/metrics")).text):
                    assert time.monotonic() < deadline, metrics
                    await asyncio.sleep(0.1)
        entries = await client.xrange("rt:notif:dead") or []
        letters = [json.loads(str(fields["d"])) for _, fields in entries if fields]
        assert [d["reason"].split(" ")[0] for d in letters] == ["poison:", "undecodable"]
        assert letters[0]["notification"]["id"] == "orphan"
        assert letters[0]["reason"] == "poison: leased 1 times and never settled"
    finally:
        await client.aclose()


def test_store_bounds_are_refused_below_their_floor() -> None:
    with pytest.raises(ValidationError, match="notification_max_deliveries"):
        Settings(notification_max_deliveries=0)
    with pytest.raises(ValidationError, match="notification_consumer_idle_timeout"):
        Settings(notification_consumer_idle_timeout=NOTIFICATION_LEASE_TIMEOUT)
    settings = Settings(notification_consumer_idle_timeout=NOTIFICATION_LEASE_TIMEOUT + 1)
    assert (settings.notification_max_deliveries, settings.notification_consumer_idle_timeout) == (
        10, NOTIFICATION_LEASE_TIMEOUT + 1,
    )  # fmt: skip


async def test_rejected_credentials_open_the_breaker_for_the_configured_cooldown(
    fake_apns: FakeApns, apns_credentials: ApnsCredentials, tmp_path: Path
) -> None:
    env = {
        **apns_env(fake_apns, apns_credentials, tmp_path),
        "REALTIME_APNS_KEY_ID": "WRONGKEY01",  # APNs knows no such key: 403 InvalidProviderToken
        "REALTIME_PUSH_CREDENTIALS_COOLDOWN": "42",
    }
    async with running_server(env) as server:
        token = fake_apns.add_device()
        await api(
            server, "POST", "/v1/devices", {"user": "u-cred", "platform": "ios", "token": token}
        )
        for n in range(5):
            response = await api(
                server,
                "POST",
                "/v1/notifications",
                {"user": "u-cred", "priority": "critical", "title": f"t{n}", "body": "b"},
            )
            assert response.status_code == 202

        async def breaker() -> str:
            state: str = (await api(server, "GET", "/readyz")).json()["notifications"]["breakers"][
                "apns"
            ]
            return state

        async with asyncio.timeout(10):
            while True:
                if await breaker() == "open":
                    break
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        assert await breaker() == "open"
        assert len(pushes_to(fake_apns, token)) <= 5  # refused, and not retried meanwhile
        assert "no push through it for 42.0 s" in server.log()
        assert server.log().count("rejected our credentials") == 1  # one line per opening
