"""FcmAdapter against the fake FCM (OAuth token endpoint + HTTP v1) over HTTP/2 + TLS."""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from notifications.fcm import EARLY_REFRESH, FcmAdapter
from notifications.models import Device, Outcome, Platform, Priority
from tests.fakes import ManualClock, Reply
from tests.fakes import make_notification as note

if TYPE_CHECKING:
    from tests.fakes.fcm_server import FakeFcm

# The fixtures (fake_fcm, fcm_key, tls_ca); a plugin must not be imported before this.
pytest_plugins = ["tests.fakes.fcm_server"]


def make_adapter(fake: FakeFcm, **kw: Any) -> FcmAdapter:
    args: dict[str, Any] = {
        "service_account": fake.service_account,
        "endpoint": fake.url,
        "ca_bundle": fake.ca_file,
        "timeout": 5.0,
    }
    args.update(kw)
    return FcmAdapter(**args)


@pytest.fixture
async def fcm(fake_fcm: FakeFcm) -> AsyncIterator[FcmAdapter]:
    adapter = make_adapter(fake_fcm)
    yield adapter
    await adapter.close()


@pytest.fixture
def device(fake_fcm: FakeFcm) -> Device:
    return Device("u1", Platform.ANDROID, fake_fcm.add_device())


async def test_delivered_with_the_v1_message_and_a_jwt_grant(
    fake_fcm: FakeFcm, device: Device
) -> None:
    clock = ManualClock(time.time())
    fake_fcm.clock = clock
    adapter = make_adapter(fake_fcm, clock=clock)
    n = note(
        Priority.CRITICAL,
        data={"amount": 12, "shop": "Bakery", "tags": ["food"]},
        collapse_id="budget",
        created_at=clock.now - 100,
    )
    try:
        result = await adapter.send(n, device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status) == (Outcome.DELIVERED, 200)

    [grant] = fake_fcm.token_requests
    form = urllib.parse.parse_qs(grant.body.decode())
    assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    assertion = form["assertion"][0]
    assert jwt.get_unverified_header(assertion)["alg"] == "RS256"
    claims = jwt.decode(assertion, options={"verify_signature": False})
    assert claims == {
        "iss": fake_fcm.client_email,
        "scope": "https://www.googleapis.com/auth/firebase.messaging",
        "aud": fake_fcm.token_uri,
        "iat": int(clock.now),
        "exp": int(clock.now) + 3600,
    }

    [send] = fake_fcm.send_requests
    assert send.path == f"/v1/projects/{fake_fcm.project_id}/messages:send"
    assert send.headers["authorization"].startswith("Bearer ya29.fake-")
    assert send.json() == {
        "message": {
            "token": device.token,
            "notification": {"title": "Spent", "body": "You spent 12 EUR"},
            "data": {
                "amount": "12",
                "shop": "Bakery",
                "tags": '["food"]',
                "notification_id": "n-1",
            },
            "android": {"priority": "HIGH", "ttl": "86300s", "collapse_key": "budget"},
        }
    }


@pytest.mark.parametrize(
    ("priority", "android_priority"),
    [
        (Priority.CRITICAL, "HIGH"),
        (Priority.HIGH, "HIGH"),
        (Priority.NORMAL, "NORMAL"),
        (Priority.LOW, "NORMAL"),
    ],
)
async def test_priority_mapping(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device, priority: Priority, android_priority: str
) -> None:
    assert (await fcm.send(note(priority), device)).outcome is Outcome.DELIVERED
    android = fake_fcm.send_requests[0].json()["message"]["android"]
    assert android["priority"] == android_priority
    assert "collapse_key" not in android


async def test_ttl_zero_stays_zero(fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device) -> None:
    await fcm.send(note(ttl=0), device)
    assert fake_fcm.send_requests[0].json()["message"]["android"]["ttl"] == "0s"


async def test_access_token_is_cached_and_fetched_once_under_concurrency(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device
) -> None:
    results = await asyncio.gather(*(fcm.send(note(id=f"n{i}"), device) for i in range(30)))
    assert {r.outcome for r in results} == {Outcome.DELIVERED}
    await fcm.send(note(), device)
    assert len(fake_fcm.token_requests) == 1
    assert fcm.token_requests == 1
    assert len({r.headers["authorization"] for r in fake_fcm.send_requests}) == 1


async def test_access_token_is_refreshed_before_it_expires(
    fake_fcm: FakeFcm, device: Device
) -> None:
    clock = ManualClock(time.time())
    fake_fcm.clock = clock
    adapter = make_adapter(fake_fcm, clock=clock)
    try:
        await adapter.send(note(), device)
        clock.now += fake_fcm.token_lifetime - EARLY_REFRESH - 1
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        assert len(fake_fcm.token_requests) == 1
        clock.now += 2  # now within the last five minutes of the token's life
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        assert len(fake_fcm.token_requests) == 2
        auth = [r.headers["authorization"] for r in fake_fcm.send_requests]
        assert auth[0] == auth[1] != auth[2]
    finally:
        await adapter.close()


async def test_401_drops_the_access_token_and_retries_once(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device
) -> None:
    await fcm.send(note(), device)
    fake_fcm.revoke_access_tokens()
    result = await fcm.send(note(), device)
    assert result.outcome is Outcome.DELIVERED
    assert len(fake_fcm.token_requests) == 2
    assert len(fake_fcm.send_requests) == 3


async def test_401_that_persists_with_a_fresh_token_is_credentials_rejected_never_dead_token(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device
) -> None:
    fake_fcm.script_send(fake_fcm.error(401, "THIRD_PARTY_AUTH_ERROR"), fake_fcm.error(401))
    result = await fcm.send(note(), device)
    assert (result.outcome, result.status, result.breaker_failure) == (
        Outcome.CREDENTIALS_REJECTED, 401, False,
    )  # fmt: skip
    assert result.reason == "UNAUTHENTICATED: fake error"
    assert len(fake_fcm.send_requests) == 2
    assert len(fake_fcm.token_requests) == 2
    # the next send asks for a fresh token again: the refused one was dropped
    assert (await fcm.send(note(), device)).outcome is Outcome.DELIVERED
    assert len(fake_fcm.token_requests) == 3


@pytest.mark.parametrize(
    "case",
    [
        (404, "UNREGISTERED", None),
        (400, "INVALID_ARGUMENT", 410),
        (403, "SENDER_ID_MISMATCH", None),
    ],
)
async def test_dead_token_answers(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device, case: tuple[int, str, int | None]
) -> None:
    status, code, apns_status = case
    reply = fake_fcm.error(status, code, apns_status=apns_status)
    fake_fcm.answer_token(device.token, reply)
    result = await fcm.send(note(), device)
    assert (result.outcome, result.status, result.breaker_failure) == (
        Outcome.DEAD_TOKEN,
        reply.status,
        False,
    )


async def test_invalid_argument_is_rejected(fake_fcm: FakeFcm, fcm: FcmAdapter) -> None:
    stranger = Device("u1", Platform.ANDROID, "not-a-token-the-fake-knows")
    result = await fcm.send(note(), stranger)
    assert (result.outcome, result.status, result.reason) == (
        Outcome.REJECTED,
        400,
        "INVALID_ARGUMENT",
    )
    fake_fcm.answer_token("apns-400", fake_fcm.error(400, "INVALID_ARGUMENT", apns_status=400))
    result = await fcm.send(note(), Device("u1", Platform.ANDROID, "apns-400"))
    assert result.outcome is Outcome.REJECTED


@pytest.mark.parametrize(
    "case",
    [
        (429, "QUOTA_EXCEEDED", "30", 30.0, False),
        (503, "UNAVAILABLE", "12", 12.0, True),
        (500, "INTERNAL", None, None, True),
        (502, None, None, None, True),
    ],
)
async def test_transient_answers_are_retry(
    fake_fcm: FakeFcm,
    fcm: FcmAdapter,
    device: Device,
    case: tuple[int, str | None, str | None, float | None, bool],
) -> None:
    status, code, retry_after_header, retry_after, breaker_failure = case
    headers = {"retry-after": retry_after_header} if retry_after_header else {}
    if code is None:  # not even Google's error shape, as a load balancer would answer
        fake_fcm.script_send(Reply(status, b"<html>bad gateway</html>", headers))
    else:
        fake_fcm.script_send(fake_fcm.error(status, code, headers=headers))
    result = await fcm.send(note(), device)
    assert (result.outcome, result.status) == (Outcome.RETRY, status)
    assert result.retry_after == retry_after
    assert result.breaker_failure is breaker_failure


async def test_other_project_is_credentials_rejected(fake_fcm: FakeFcm, device: Device) -> None:
    account = {**fake_fcm.service_account, "project_id": "someone-else"}
    adapter = make_adapter(fake_fcm, service_account=account)
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status) == (Outcome.CREDENTIALS_REJECTED, 403)
    assert result.reason == "PERMISSION_DENIED: Permission denied on the project."


async def test_assertion_signed_by_another_key_is_credentials_rejected_without_sending(
    fake_fcm: FakeFcm, device: Device
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    account = {**fake_fcm.service_account, "private_key": pem.decode()}
    adapter = make_adapter(fake_fcm, service_account=account)
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status, result.breaker_failure) == (
        Outcome.CREDENTIALS_REJECTED, 400, False,
    )  # fmt: skip
    assert result.reason.startswith("oauth token refused: 400 invalid_grant: bad assertion")
    assert fake_fcm.send_requests == []


async def test_token_endpoint_down_is_retry_and_breaker_failure(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device
) -> None:
    fake_fcm.script_token(
        Reply(503, {"error": "unavailable"}, {"retry-after": "5"}), Reply(close=True)
    )
    result = await fcm.send(note(), device)
    assert (result.outcome, result.status, result.retry_after, result.breaker_failure) == (
        Outcome.RETRY,
        503,
        5.0,
        True,
    )
    result = await fcm.send(note(), device)
    assert (result.outcome, result.status, result.breaker_failure) == (Outcome.RETRY, None, True)
    assert result.reason.startswith("oauth: ")
    assert fake_fcm.send_requests == []
    assert (await fcm.send(note(), device)).outcome is Outcome.DELIVERED


@pytest.mark.timeout(30)
async def test_time_out_is_retry_and_breaker_failure(fake_fcm: FakeFcm, device: Device) -> None:
    adapter = make_adapter(fake_fcm, timeout=0.5)
    try:
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        fake_fcm.script_send(Reply(200, {"name": "late"}, delay=3.0))
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.breaker_failure) == (Outcome.RETRY, True)
    assert "Timeout" in result.reason


async def test_data_that_is_not_json_is_rejected_without_a_request(
    fake_fcm: FakeFcm, fcm: FcmAdapter, device: Device
) -> None:
    result = await fcm.send(note(data={"when": object()}), device)
    assert result.outcome is Outcome.REJECTED
    assert fake_fcm.requests == []


def test_a_service_account_without_its_fields_is_refused() -> None:
    with pytest.raises(ValueError, match="private_key"):
        FcmAdapter(service_account={"client_email": "x", "token_uri": "y", "project_id": "p"})
