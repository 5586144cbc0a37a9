"""WebhookAdapter against a real HTTP server on 127.0.0.1 (uvicorn), LogAdapter, shared helpers,
and how the FCM and APNs adapters report rejected credentials (against the HTTP/2 fakes)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
import uvicorn

from notifications.models import Device, Outcome, Platform, Priority
from notifications.push import LogAdapter, PushAdapter, WebhookAdapter, parse_retry_after
from tests.fakes import ManualClock, Reply
from tests.fakes import make_notification as note
from tests.test_apns import make_adapter as make_apns
from tests.test_fcm import make_adapter as make_fcm

if TYPE_CHECKING:
    from tests.fakes.apns_server import FakeApns
    from tests.fakes.fcm_server import FakeFcm

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

DEVICE = Device("u1", Platform.IOS, "ab" * 32)


@dataclass
class Hook:
    """An ASGI app recording every request; answers come from ``replies``, else 204."""

    url: str = ""
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    replies: deque[tuple[int, dict[str, str], float]] = field(default_factory=deque)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.requests.append((scope["method"], headers, body))
        status, reply_headers, delay = self.replies.popleft() if self.replies else (204, {}, 0.0)
        if delay:
            await asyncio.sleep(delay)
        raw = [(k.encode(), v.encode()) for k, v in reply_headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def hook() -> AsyncIterator[Hook]:
    app = Hook()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)  # connections wait in the backlog until uvicorn accepts them
    app.url = f"http://127.0.0.1:{sock.getsockname()[1]}/push"
    config = uvicorn.Config(app, lifespan="off", ws="none", log_level="warning")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield app
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def webhook(hook: Hook) -> AsyncIterator[WebhookAdapter]:
    adapter = WebhookAdapter(hook.url, timeout=5.0, headers={"x-api-key": "k1"})
    yield adapter
    await adapter.close()


async def test_webhook_posts_notification_and_device_as_json(
    hook: Hook, webhook: WebhookAdapter
) -> None:
    n = note(Priority.CRITICAL, data={"amount": 12}, collapse_id="c")
    result = await webhook.send(n, DEVICE)
    assert (result.outcome, result.status) == (Outcome.DELIVERED, 204)
    [(method, headers, body)] = hook.requests
    assert method == "POST"
    assert headers["content-type"] == "application/json"
    assert headers["x-api-key"] == "k1"
    assert json.loads(body) == {
        "notification": n.to_map(),
        "device": {"user": "u1", "platform": "ios", "token": DEVICE.token},
    }


@pytest.mark.parametrize(
    "case",
    [
        (200, {}, Outcome.DELIVERED, None, False),
        (202, {}, Outcome.DELIVERED, None, False),
        (410, {}, Outcome.DEAD_TOKEN, None, False),
        (429, {"retry-after": "17"}, Outcome.RETRY, 17.0, False),
        (503, {"retry-after": "4"}, Outcome.RETRY, 4.0, True),
        (500, {}, Outcome.RETRY, None, True),
        (400, {}, Outcome.REJECTED, None, False),
        (404, {}, Outcome.REJECTED, None, False),
    ],
)
async def test_webhook_status_mapping(
    hook: Hook,
    webhook: WebhookAdapter,
    case: tuple[int, dict[str, str], Outcome, float | None, bool],
) -> None:
    status, headers, outcome, retry_after, breaker_failure = case
    hook.replies.append((status, headers, 0.0))
    result = await webhook.send(note(), DEVICE)
    assert (result.outcome, result.status) == (outcome, status)
    assert result.retry_after == retry_after
    assert result.breaker_failure is breaker_failure


async def test_webhook_retry_after_as_http_date(hook: Hook) -> None:
    clock = ManualClock(1_800_000_000.0)
    adapter = WebhookAdapter(hook.url, timeout=5.0, clock=clock)
    date = email.utils.formatdate(clock.now + 90, usegmt=True)
    hook.replies.append((503, {"retry-after": date}, 0.0))
    try:
        result = await adapter.send(note(), DEVICE)
    finally:
        await adapter.close()
    assert (result.outcome, result.retry_after) == (Outcome.RETRY, 90.0)


@pytest.mark.timeout(30)
async def test_webhook_time_out_is_retry_and_breaker_failure(hook: Hook) -> None:
    adapter = WebhookAdapter(hook.url, timeout=0.3)
    hook.replies.append((204, {}, 1.5))
    try:
        result = await adapter.send(note(), DEVICE)
    finally:
        await adapter.close()
    assert (result.outcome, result.status, result.breaker_failure) == (Outcome.RETRY, None, True)
    assert "Timeout" in result.reason


async def test_webhook_unreachable_is_retry_and_breaker_failure() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    adapter = WebhookAdapter(f"http://127.0.0.1:{port}/push", timeout=2.0)
    try:
        result = await adapter.send(note(), DEVICE)
    finally:
        await adapter.close()
    assert (result.outcome, result.breaker_failure) == (Outcome.RETRY, True)
    assert "ConnectError" in result.reason


async def test_webhook_data_that_is_not_json_is_rejected(
    hook: Hook, webhook: WebhookAdapter
) -> None:
    result = await webhook.send(note(data={"x": object()}), DEVICE)
    assert result.outcome is Outcome.REJECTED
    assert hook.requests == []


async def test_log_adapter_logs_one_line_and_delivers(caplog: pytest.LogCaptureFixture) -> None:
    adapter: PushAdapter = LogAdapter()
    with caplog.at_level(logging.INFO, logger="notifications.push"):
        result = await adapter.send(note(id="n-42"), DEVICE)
    await adapter.close()
    assert result.outcome is Outcome.DELIVERED
    [record] = caplog.records
    line = record.getMessage()
    assert "n-42" in line
    assert "ios" in line
    assert DEVICE.token not in line  # only a prefix of the token is logged
    assert DEVICE.token[:8] in line


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("soon", None),
        ("120", 120.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),
        ("nan", None),
        ("Thu, 15 Jan 2027 08:00:30 GMT", 30.0),
        ("Thu, 15 Jan 2027 07:59:00 GMT", 0.0),  # a date in the past: no wait
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = email.utils.parsedate_to_datetime("Thu, 15 Jan 2027 08:00:00 GMT").timestamp()
    assert parse_retry_after(value, now) == expected


# --------------------------------------------------------------------------- rejected credentials

TOKEN_ENDPOINT_ANSWERS = {
    "revoked-key": (
        Reply(400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}),
        Outcome.CREDENTIALS_REJECTED,
        "oauth token refused: 400 invalid_grant: Invalid JWT Signature.", None, False,
    ),
    "unauthorized-client": (
        Reply(401, {"error": "unauthorized_client"}),
        Outcome.CREDENTIALS_REJECTED, "oauth token refused: 401 unauthorized_client", None, False,
    ),
    "not-oauth": (
        Reply(403, b"forbidden"),
        Outcome.CREDENTIALS_REJECTED, "oauth token refused: 403 forbidden", None, False,
    ),
    "pacing": (
        Reply(429, {"error": "rate_limit_exceeded"}, {"retry-after": "7"}),
        Outcome.RETRY, "oauth token refused: 429 rate_limit_exceeded", 7.0, False,
    ),
    "request-time-out": (
        Reply(408, b""), Outcome.RETRY, "oauth token refused: 408", None, True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(TOKEN_ENDPOINT_ANSWERS))
async def test_fcm_token_endpoint_4xx_is_credentials_rejected_except_408_and_429(
    fake_fcm: FakeFcm, case: str
) -> None:
    answer, outcome, reason, retry_after, breaker_failure = TOKEN_ENDPOINT_ANSWERS[case]
    device = Device("u1", Platform.ANDROID, fake_fcm.add_device())
    fake_fcm.script_token(answer)
    adapter = make_fcm(fake_fcm)
    try:
        result = await adapter.send(note(), device)
    finally:
        await adapter.close()
    assert (result.outcome, result.status, result.reason) == (outcome, answer.status, reason)
    assert (result.retry_after, result.breaker_failure) == (retry_after, breaker_failure)
    assert fake_fcm.send_requests == []


@pytest.mark.timeout(30)
async def test_fcm_sends_waiting_for_a_refused_token_request_take_its_refusal(
    fake_fcm: FakeFcm,
) -> None:
    device = Device("u1", Platform.ANDROID, fake_fcm.add_device())
    refusal = Reply(400, {"error": "invalid_grant"}, delay=0.2)  # the others queue meanwhile
    fake_fcm.script_token(refusal)
    adapter = make_fcm(fake_fcm)
    try:
        sends = (adapter.send(note(id=f"n-{i}"), device) for i in range(10))
        results = await asyncio.gather(*sends)
        assert {(r.outcome, r.reason) for r in results} == {
            (Outcome.CREDENTIALS_REJECTED, "oauth token refused: 400 invalid_grant")
        }
        assert (len(fake_fcm.token_requests), adapter.token_requests) == (1, 1)
        # A send that starts after the refusal asks again (and the endpoint now grants it).
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        assert len(fake_fcm.token_requests) == 2
    finally:
        await adapter.close()


async def test_apns_missing_provider_token_is_credentials_rejected(fake_apns: FakeApns) -> None:
    device = Device("u1", Platform.IOS, fake_apns.add_device())
    fake_apns.script(fake_apns.error(403, "MissingProviderToken"))
    adapter = make_apns(fake_apns)
    try:
        result = await adapter.send(note(), device)
        assert (result.outcome, result.status, result.reason, result.breaker_failure) == (
            Outcome.CREDENTIALS_REJECTED, 403, "MissingProviderToken", False,
        )  # fmt: skip
        assert len(fake_apns.requests) == 1
        assert (await adapter.send(note(), device)).outcome is Outcome.DELIVERED
        assert adapter.token.signed == 1  # the same token, which the fake accepts
    finally:
        await adapter.close()


@pytest.mark.timeout(30)
async def test_apns_concurrent_expired_provider_token_answers_sign_one_new_token(
    fake_apns: FakeApns,
) -> None:
    device = Device("u1", Platform.IOS, fake_apns.add_device())
    adapter = make_apns(fake_apns)
    try:
        assert (await adapter.send(note(id="warm-up"), device)).outcome is Outcome.DELIVERED
        fake_apns.script(*[fake_apns.error(403, "ExpiredProviderToken")] * 5)
        sends = (adapter.send(note(id=f"n-{i}"), device) for i in range(5))
        results = await asyncio.gather(*sends)
        assert {r.outcome for r in results} == {Outcome.DELIVERED}
        assert adapter.token.signed == 2
        assert len(fake_apns.requests) == 1 + 5 + 5
    finally:
        await adapter.close()
