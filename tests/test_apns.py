"""ApnsAdapter against the fake APNs: real HTTP/2 over TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import ssl
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from notifications.apns import MAX_PAYLOAD_BYTES, ApnsAdapter, apns_id, build_payload
from notifications.models import Device, Outcome, Platform, Priority
from tests.fakes import ManualClock, Reply
from tests.fakes import make_notification as note

if TYPE_CHECKING:
    from tests.fakes.apns_server import FakeApns

# The fixtures (fake_apns, apns_credentials, tls_ca); a plugin must not be imported before this.
pytest_plugins = ["tests.fakes.apns_server"]


def make_adapter(fake: FakeApns, **kw: Any) -> ApnsAdapter:
    creds = fake.credentials
    args: dict[str, Any] = {
        "key_pem": creds.key_pem,
        "key_id": creds.key_id,
        "team_id": creds.team_id,
        "topic": creds.topic,
        "endpoint": fake.url,
        "ca_bundle": fake.ca_file,
        "timeout": 5.0,
    }
    args.update(kw)
    return ApnsAdapter(**args)


@pytest.fixture
async def apns(fake_apns: FakeApns) -> AsyncIterator[ApnsAdapter]:
    adapter = make_adapter(fake_apns)
    yield adapter
    await adapter.close()


@pytest.fixture
def device(fake_apns: FakeApns) -> Device:
    return Device("u1", Platform.IOS, fake_apns.add_device())


def bearer(fake: FakeApns, index: int = -1) -> str:
    return fake.requests[index].headers["authorization"].removeprefix("bearer ")


async def test_delivered_with_apples_headers_and_payload(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    n = note(Priority.CRITICAL, data={"amount": 12, "tags": ["food"]}, collapse_id="budget")
    result = await apns.send(n, device)
    assert result.outcome is Outcome.DELIVERED
    assert result.status == 200
    [request] = fake_apns.requests
    assert request.method == "POST"
    assert request.path == f"/3/device/{device.token}"
    h = request.headers
    assert h["apns-topic"] == fake_apns.credentials.topic
    assert h["apns-push-type"] == "alert"
    assert h["apns-priority"] == "10"
    assert h["apns-expiration"] == str(int(n.created_at + n.ttl))
    assert h["apns-collapse-id"] == "budget"
    assert uuid.UUID(h["apns-id"]) == uuid.UUID(apns_id("n-1"))
    assert request.json() == {
        "aps": {
            "alert": {"title": "Spent", "body": "You spent 12 EUR"},
            "sound": "default",
            "interruption-level": "critical",
        },
        "data": {"amount": 12, "tags": ["food"]},
        "notification_id": "n-1",
    }


@pytest.mark.parametrize(
    "case",
    [
        (Priority.CRITICAL, "10", "critical", True),
        (Priority.HIGH, "10", "time-sensitive", True),
        (Priority.NORMAL, "5", "active", False),
        (Priority.LOW, "5", "passive", False),
    ],
)
async def test_priority_mapping(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device, case: tuple[Priority, str, str, bool]
) -> None:
    priority, apns_priority, level, sound = case
    assert (await apns.send(note(priority), device)).outcome is Outcome.DELIVERED
    [request] = fake_apns.requests
    assert request.headers["apns-priority"] == apns_priority
    assert "apns-collapse-id" not in request.headers
    aps = request.json()["aps"]
    assert aps["interruption-level"] == level
    assert ("sound" in aps) is sound


async def test_apns_id_is_stable_across_retries_and_differs_between_notifications(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    await apns.send(note(id="a"), device)
    await apns.send(note(id="a"), device)
    await apns.send(note(id="b"), device)
    ids = [r.headers["apns-id"] for r in fake_apns.requests]
    assert ids[0] == ids[1] != ids[2]


async def test_ttl_zero_means_expiration_zero(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    await apns.send(note(ttl=0), device)
    assert fake_apns.requests[0].headers["apns-expiration"] == "0"


async def test_speaks_http2_only_and_multiplexes_one_connection(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    results = await asyncio.gather(*(apns.send(note(id=f"n{i}"), device) for i in range(40)))
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    assert fake_apns.server.connections_made == 1
    assert apns.token.signed == 1
    # the fake's HTTP/2-only check can fail: an HTTP/1.1 client is refused
    async with httpx.AsyncClient(verify=ssl.create_default_context(cafile=fake_apns.ca_file)) as h1:
        with pytest.raises(httpx.HTTPError):
            await h1.post(f"{fake_apns.url}/3/device/{device.token}", content=b"{}")
    assert fake_apns.server.refused_connections == 1


async def test_provider_token_is_reused_then_refreshed_by_the_clock(
    fake_apns: FakeApns, device: Device
) -> None:
    clock = ManualClock(time.time())
    fake_apns.clock = clock
    adapter = make_adapter(fake_apns, clock=clock)
    try:
        await adapter.send(note(), device)
        first = bearer(fake_apns)
        header = jwt.get_unverified_header(first)
        claims = jwt.decode(first, fake_apns.credentials.public_key, algorithms=["ES256"])
        assert header["alg"] == "ES256"
        assert header["kid"] == fake_apns.credentials.key_id
        assert claims == {"iss": fake_apns.credentials.team_id, "iat": int(clock.now)}

        clock.now += 39 * 60
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        assert bearer(fake_apns) == first

        clock.now += 2 * 60  # 41 minutes after signing: refreshed before Apple's hour
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        second = bearer(fake_apns)
        assert second != first
        assert jwt.decode(second, options={"verify_signature": False})["iat"] == int(clock.now)
        assert adapter.token.signed == 2
    finally:
        await adapter.close()


async def test_expired_provider_token_is_resigned_and_retried_once(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    fake_apns.script(fake_apns.error(403, "ExpiredProviderToken"))
    result = await apns.send(note(), device)
    assert result.outcome is Outcome.DELIVERED
    assert len(fake_apns.requests) == 2
    assert bearer(fake_apns, 0) != bearer(fake_apns, 1)
    assert apns.token.signed == 2


async def test_provider_token_that_stays_expired_is_credentials_rejected_never_dead_token(
    fake_apns: FakeApns, device: Device
) -> None:
    clock = ManualClock(time.time() - 2 * 3600)  # our clock is two hours behind Apple's
    adapter = make_adapter(fake_apns, clock=clock)
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert result.outcome is Outcome.CREDENTIALS_REJECTED
    assert (result.status, result.reason) == (403, "ExpiredProviderToken")
    assert not result.breaker_failure
    assert len(fake_apns.requests) == 2  # re-signed once, not more
    assert adapter.token.signed == 2


async def test_invalid_provider_token_is_credentials_rejected_and_not_resigned(
    fake_apns: FakeApns, device: Device
) -> None:
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for kw in ({"key_pem": other}, {"key_id": "WRONGKEYID"}, {"team_id": "WRONGTEAM"}):
        fake_apns.requests.clear()
        adapter = make_adapter(fake_apns, **kw)
        try:
            result = await adapter.send(note(), device)
            assert result.outcome is Outcome.CREDENTIALS_REJECTED, kw
            assert (result.status, result.reason) == (403, "InvalidProviderToken")
            assert len(fake_apns.requests) == 1
            await adapter.send(note(), device)
            # An equivalent token would be refused as well; Apple limits token updates.
            assert adapter.token.signed == 1
        finally:
            await adapter.close()


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (410, "Unregistered"),
        (410, "ExpiredToken"),
        (400, "BadDeviceToken"),
        (400, "DeviceTokenNotForTopic"),
    ],
)
async def test_dead_token_answers(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device, status: int, reason: str
) -> None:
    fake_apns.answer_token(device.token, fake_apns.error(status, reason))
    result = await apns.send(note(), device)
    assert result.outcome is Outcome.DEAD_TOKEN
    assert (result.status, result.reason) == (status, reason)
    assert not result.breaker_failure


async def test_unknown_token_is_dead(fake_apns: FakeApns, apns: ApnsAdapter) -> None:
    stranger = Device("u1", Platform.IOS, "ab" * 32)
    result = await apns.send(note(), stranger)
    assert (result.outcome, result.status, result.reason) == (
        Outcome.DEAD_TOKEN,
        400,
        "BadDeviceToken",
    )


async def test_non_hex_token_is_dead_without_a_request(
    fake_apns: FakeApns, apns: ApnsAdapter
) -> None:
    result = await apns.send(note(), Device("u1", Platform.IOS, "../../3/device/x"))
    assert result.outcome is Outcome.DEAD_TOKEN
    assert fake_apns.requests == []


async def test_429_is_retry_with_retry_after_and_no_breaker_failure(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    fake_apns.script(fake_apns.error(429, "TooManyRequests", {"retry-after": "7"}))
    result = await apns.send(note(), device)
    assert (result.outcome, result.status, result.reason) == (
        Outcome.RETRY,
        429,
        "TooManyRequests",
    )
    assert result.retry_after == 7.0
    assert not result.breaker_failure


async def test_503_with_http_date_retry_after_is_retry_and_breaker_failure(
    fake_apns: FakeApns, device: Device
) -> None:
    clock = ManualClock(time.time())
    fake_apns.clock = clock
    adapter = make_adapter(fake_apns, clock=clock)
    date = email.utils.formatdate(int(clock.now) + 120, usegmt=True)
    fake_apns.script(fake_apns.error(503, "ServiceUnavailable", {"retry-after": date}))
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status) == (Outcome.RETRY, 503)
    assert result.retry_after is not None
    assert 119.0 <= result.retry_after <= 120.0
    assert result.breaker_failure


async def test_500_is_retry_and_breaker_failure(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    fake_apns.script(fake_apns.error(500, "InternalServerError"))
    result = await apns.send(note(), device)
    assert (result.outcome, result.retry_after, result.breaker_failure) == (
        Outcome.RETRY,
        None,
        True,
    )


async def test_other_4xx_is_rejected(fake_apns: FakeApns, device: Device) -> None:
    adapter = make_adapter(fake_apns, topic="com.someone.else")
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status, result.reason) == (
        Outcome.REJECTED,
        400,
        "TopicDisallowed",
    )
    assert not result.breaker_failure


async def test_payload_size_is_checked_before_any_request(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    room = MAX_PAYLOAD_BYTES - len(build_payload(note(body="")))
    body = "é" * (room // 2) + "x" * (room % 2)  # "é" is 2 bytes in UTF-8: bytes are counted
    fits = note(body=body)
    assert len(build_payload(fits)) == MAX_PAYLOAD_BYTES
    assert (await apns.send(fits, device)).outcome is Outcome.DELIVERED
    assert len(fake_apns.requests) == 1

    result = await apns.send(note(body=body + "x"), device)
    assert result.outcome is Outcome.REJECTED
    assert "PayloadTooLarge" in result.reason
    assert len(fake_apns.requests) == 1  # nothing more was sent


async def test_data_that_is_not_json_is_rejected(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    result = await apns.send(note(data={"when": object()}), device)
    assert result.outcome is Outcome.REJECTED
    assert fake_apns.requests == []


@pytest.mark.timeout(30)
async def test_time_out_is_retry_and_breaker_failure(fake_apns: FakeApns, device: Device) -> None:
    adapter = make_adapter(fake_apns, timeout=0.5)
    fake_apns.server.delay = 3.0
    try:
        started = time.monotonic()
        result = await adapter.send(note(), device)
        elapsed = time.monotonic() - started
    finally:
        await adapter.close()
    assert result.outcome is Outcome.RETRY
    assert result.breaker_failure
    assert "Timeout" in result.reason
    assert elapsed < 2.5


async def test_connection_closed_mid_request_is_retry_and_breaker_failure(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    fake_apns.script(Reply(close=True))
    result = await apns.send(note(), device)
    assert (result.outcome, result.breaker_failure) == (Outcome.RETRY, True)
    # the next send opens a new connection and gets through
    assert (await apns.send(note(), device)).outcome is Outcome.DELIVERED
    assert fake_apns.server.connections_made == 2


async def test_unreachable_provider_is_retry_and_breaker_failure(
    fake_apns: FakeApns, device: Device
) -> None:
    adapter = make_adapter(fake_apns)
    await fake_apns.stop()
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status, result.breaker_failure) == (Outcome.RETRY, None, True)


async def test_untrusted_certificate_is_a_transport_failure(
    fake_apns: FakeApns, device: Device
) -> None:
    adapter = make_adapter(fake_apns, ca_bundle=None)  # system CAs do not trust the test CA
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.breaker_failure) == (Outcome.RETRY, True)
    assert fake_apns.requests == []


@pytest.mark.timeout(30)
async def test_connection_dropped_under_many_streams_every_send_returns_a_result(
    fake_apns: FakeApns, apns: ApnsAdapter, device: Device
) -> None:
    fake_apns.server.delay = 0.2  # keep the streams in flight while the connection drops
    fake_apns.script(*[Reply() for _ in range(9)], Reply(close=True))
    results = await asyncio.gather(*(apns.send(note(id=f"n{i}"), device) for i in range(50)))
    outcomes = {r.outcome for r in results}
    assert outcomes <= {Outcome.DELIVERED, Outcome.RETRY}
    assert Outcome.RETRY in outcomes
    assert all(r.breaker_failure for r in results if r.outcome is Outcome.RETRY)


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        ({"method": "GET"}, 405, "MethodNotAllowed"),
        ({"path": "/3/devices/x"}, 404, "BadPath"),
        ({"apns-topic": None}, 400, "MissingTopic"),
        ({"apns-priority": "7"}, 400, "BadPriority"),
        ({"apns-id": "not-a-uuid"}, 400, "BadMessageId"),
        ({"apns-collapse-id": "c" * 65}, 400, "BadCollapseId"),
        ({"authorization": None}, 403, "MissingProviderToken"),
        ({"authorization": "bearer not.a.jwt"}, 403, "InvalidProviderToken"),
        ({"iat": +120}, 403, "InvalidProviderToken"),
        ({"iat": -3700}, 403, "ExpiredProviderToken"),
        ({"body": b""}, 400, "PayloadEmpty"),
        ({"body": b"{" + b" " * 4095 + b"}"}, 413, "PayloadTooLarge"),
    ],
)
async def test_the_fake_refuses_what_apple_refuses(
    fake_apns: FakeApns, device: Device, change: dict[str, Any], status: int, reason: str
) -> None:
    """The checks the adapter tests lean on can fail: a raw HTTP/2 client breaks each rule."""
    creds = fake_apns.credentials

    async def post(change: dict[str, Any]) -> httpx.Response:
        change = dict(change)
        iat = int(time.time()) + change.pop("iat", 0)
        claims = {"iss": creds.team_id, "iat": iat}
        kid = {"kid": creds.key_id}
        token = jwt.encode(claims, creds.key_pem, algorithm="ES256", headers=kid)
        headers: dict[str, str | None] = {
            "authorization": f"bearer {token}",
            "apns-topic": creds.topic,
            "apns-push-type": "alert",
            "apns-priority": "10",
        }
        method = change.pop("method", "POST")
        path = change.pop("path", f"/3/device/{device.token}")
        body = change.pop("body", b'{"aps":{}}')
        headers.update(change)
        return await client.request(
            method,
            fake_apns.url + path,
            content=body,
            headers={k: v for k, v in headers.items() if v is not None},
        )

    ctx = ssl.create_default_context(cafile=fake_apns.ca_file)
    async with httpx.AsyncClient(http2=True, http1=False, verify=ctx) as client:
        assert (await post({})).status_code == 200  # the rule kept, the same request gets through
        response = await post(change)
        assert (response.status_code, response.json()["reason"]) == (status, reason)
