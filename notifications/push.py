"""The push adapter seam, the HTTP helpers the adapters share, and the webhook and log adapters."""

from __future__ import annotations

import email.utils
import json
import logging
import math
import ssl
import time
from collections.abc import Callable, Mapping
from typing import Protocol

import httpx

from notifications.models import Device, Notification, Outcome, PushResult

log = logging.getLogger(__name__)


class PushAdapter(Protocol):
    """Sends one notification to one device of its platform.

    Contract: ``send`` never raises for a provider's answer or a transport
    failure; it returns a ``PushResult`` saying what happened (see Outcome).
    It may be called concurrently. ``close`` releases connections.
    """

    name: str

    async def send(self, notification: Notification, device: Device) -> PushResult: ...

    async def close(self) -> None: ...


#: What a failed HTTP exchange may raise; anything else is a bug and propagates.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (httpx.HTTPError, OSError)


def http_client(
    *,
    timeout: float,
    ca_bundle: str | None = None,
    http2: bool = False,
    base_url: str = "",
    headers: Mapping[str, str] | None = None,
) -> httpx.AsyncClient:
    """An AsyncClient verifying TLS against ``ca_bundle`` (a PEM file) or the system CAs."""
    verify = ssl.create_default_context(cafile=ca_bundle) if ca_bundle else True
    return httpx.AsyncClient(
        http2=http2,
        base_url=base_url,
        timeout=timeout,
        verify=verify,
        headers=dict(headers or {}),
        follow_redirects=False,
    )


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date); None if absent/bad."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now
        except (TypeError, ValueError, IndexError):
            return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def transport_failure(exc: BaseException) -> PushResult:
    """A failed exchange (connect, TLS, time-out, reset): retry, and the provider looks unwell."""
    detail = str(exc)
    reason = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
    return PushResult(Outcome.RETRY, reason=reason, breaker_failure=True)


def status_result(status: int, reason: str = "", retry_after: float | None = None) -> PushResult:
    """The generic reading of an HTTP status; adapters handle provider specifics first.

    2xx delivered; 410 dead token; 429 retry (the provider is healthy, it is
    pacing us, so no breaker failure); 5xx retry and breaker failure; other 4xx
    rejected; anything else (1xx/3xx) retry and breaker failure.
    """
    if 200 <= status < 300:
        return PushResult(Outcome.DELIVERED, status=status, reason=reason)
    if status == 410:
        return PushResult(Outcome.DEAD_TOKEN, status=status, reason=reason)
    if status == 429:
        return PushResult(Outcome.RETRY, status=status, reason=reason, retry_after=retry_after)
    if 400 <= status < 500:
        return PushResult(Outcome.REJECTED, status=status, reason=reason)
    return PushResult(
        Outcome.RETRY, status=status, reason=reason, retry_after=retry_after, breaker_failure=True
    )


class WebhookAdapter:
    """POSTs ``{"notification": {...}, "device": {...}}`` as JSON to ``url``.

    Answers are read by ``status_result`` (2xx delivered, 410 dead token, 429
    and 5xx retry with Retry-After, other 4xx rejected); a transport error is
    a retry and a breaker failure.
    """

    name = "webhook"

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        ca_bundle: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self._clock = clock
        self._client = http_client(timeout=timeout, ca_bundle=ca_bundle, headers=headers)

    async def send(self, notification: Notification, device: Device) -> PushResult:
        body = {
            "notification": notification.to_map(),
            "device": {
                "user": device.user,
                "platform": device.platform.value,
                "token": device.token,
            },
        }
        try:
            content = json.dumps(body, separators=(",", ":")).encode()
        except (TypeError, ValueError) as exc:
            return PushResult(Outcome.REJECTED, reason=f"not JSON: {exc}")
        try:
            response = await self._client.post(
                self.url, content=content, headers={"content-type": "application/json"}
            )
        except TRANSPORT_ERRORS as exc:
            return transport_failure(exc)
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
        return status_result(response.status_code, response.reason_phrase, retry_after)

    async def close(self) -> None:
        await self._client.aclose()


class LogAdapter:
    """The embedded default: logs one line per push (token shortened) and reports it delivered."""

    name = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or log

    async def send(self, notification: Notification, device: Device) -> PushResult:
        self._log.info(
            "push %s priority=%s user=%s platform=%s token=%s… title=%r",
            notification.id,
            notification.priority.value,
            device.user,
            device.platform.value,
            device.token[:8],
            notification.title,
        )
        return PushResult(Outcome.DELIVERED, reason="logged")

    async def close(self) -> None:
        return None
