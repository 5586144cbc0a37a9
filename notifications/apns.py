"""Apple Push Notification service: the HTTP/2 provider API with token (ES256 JWT) auth."""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from notifications.models import Device, Notification, Outcome, Priority, PushResult
from notifications.push import (
    TRANSPORT_ERRORS,
    http_client,
    parse_retry_after,
    status_result,
    transport_failure,
)

#: Apple refuses payloads over this many bytes (413 PayloadTooLarge).
MAX_PAYLOAD_BYTES = 4096
#: A provider token is reused for this long; Apple wants 20 to 60 minutes.
TOKEN_REFRESH_AFTER = 40 * 60.0
#: Namespace of the deterministic apns-id (uuid5 of the notification id).
APNS_ID_NAMESPACE = uuid.UUID("5d1f0c3e-8a43-4f57-9c36-3b1f2a6e0b7d")

DEAD_TOKEN_REASONS = frozenset(
    {"BadDeviceToken", "DeviceTokenNotForTopic", "Unregistered", "ExpiredToken"}
)
#: 403 reasons that refuse our provider token, i.e. the key, key id or team id (or our clock):
#: no notification can fix them.
PROVIDER_TOKEN_REASONS = frozenset(
    {"ExpiredProviderToken", "InvalidProviderToken", "MissingProviderToken"}
)

_INTERRUPTION_LEVEL = {
    Priority.CRITICAL: "critical",
    Priority.HIGH: "time-sensitive",
    Priority.NORMAL: "active",
    Priority.LOW: "passive",
}
_URGENT = frozenset({Priority.CRITICAL, Priority.HIGH})
_DEVICE_TOKEN = re.compile(r"[0-9a-fA-F]+")


def apns_id(notification_id: str) -> str:
    """The apns-id of a notification: the same on every attempt, so a retry is recognisable."""
    return str(uuid.uuid5(APNS_ID_NAMESPACE, notification_id))


def build_payload(notification: Notification) -> bytes:
    """The compact JSON payload; raises TypeError/ValueError if ``data`` is not JSON."""
    aps: dict[str, Any] = {
        "alert": {"title": notification.title, "body": notification.body},
        "interruption-level": _INTERRUPTION_LEVEL[notification.priority],
    }
    if notification.priority in _URGENT:
        aps["sound"] = "default"
    payload = {"aps": aps, "data": notification.data, "notification_id": notification.id}
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def build_headers(notification: Notification, topic: str) -> dict[str, str]:
    """The apns-* headers (without authorization). A ttl of 0 means: deliver now or never."""
    expiration = 0 if notification.ttl == 0 else int(notification.expires_at)
    headers = {
        "apns-topic": topic,
        "apns-push-type": "alert",
        "apns-priority": "10" if notification.priority in _URGENT else "5",
        "apns-expiration": str(expiration),
        "apns-id": apns_id(notification.id),
        "content-type": "application/json",
    }
    if notification.collapse_id:
        headers["apns-collapse-id"] = notification.collapse_id
    return headers


class ProviderToken:
    """The ES256 provider JWT (header kid, claims iss and iat), signed once and reused.

    ``current()`` signs a new one when none is held, when the held one is
    ``refresh_after`` seconds old, or when the clock went back before its iat.
    """

    def __init__(
        self,
        *,
        key_pem: bytes,
        key_id: str,
        team_id: str,
        clock: Callable[[], float],
        refresh_after: float = TOKEN_REFRESH_AFTER,
    ) -> None:
        key = load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("the APNs key must be an EC P-256 private key (.p8)")
        self._key = key
        self._key_id = key_id
        self._team_id = team_id
        self._clock = clock
        self._refresh_after = refresh_after
        self._token: str | None = None
        self._issued_at = 0
        self.signed = 0  # how many tokens were signed (for metrics and tests)

    def current(self) -> str:
        now = self._clock()
        if self._token is None or not 0 <= now - self._issued_at < self._refresh_after:
            self._issued_at = int(now)
            self._token = jwt.encode(
                {"iss": self._team_id, "iat": self._issued_at},
                self._key,
                algorithm="ES256",
                headers={"kid": self._key_id},
            )
            self.signed += 1
        return self._token

    def invalidate(self, token: str) -> None:
        """Drops ``token`` if it is still the current one (concurrent refusals sign once)."""
        if token == self._token:
            self._token = None


class ApnsAdapter:
    """Sends alerts to iOS devices through APNs over HTTP/2.

    Outcomes: 200 delivered; 410, or BadDeviceToken / DeviceTokenNotForTopic /
    Unregistered, dead token; 403 InvalidProviderToken / ExpiredProviderToken /
    MissingProviderToken credentials rejected (a wrong key, key id or team id,
    or a clock Apple disagrees with), but after ExpiredProviderToken the token
    is re-signed and the push retried once at once first. Otherwise a refused
    token is kept until it is due for refresh: signing the same key, key id and
    team again gives an equivalent token, and Apple refuses tokens updated too
    often (429 TooManyProviderTokenUpdates); a clock set right re-signs anyway;
    429 retry with Retry-After and no breaker failure (Apple sends it for one
    device token or our token updates: the service is healthy); 5xx retry with
    Retry-After and breaker failure; other 4xx rejected; a payload over 4096
    bytes is rejected before any request; transport errors and time-outs retry
    with breaker failure. ``timeout`` is httpx's per-phase time-out.
    """

    name = "apns"

    def __init__(
        self,
        *,
        key_pem: bytes,
        key_id: str,
        team_id: str,
        topic: str,
        endpoint: str = "https://api.push.apple.com",
        ca_bundle: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.topic = topic
        self._clock = clock
        self.token = ProviderToken(key_pem=key_pem, key_id=key_id, team_id=team_id, clock=clock)
        self._client = http_client(
            timeout=timeout, ca_bundle=ca_bundle, http2=True, base_url=endpoint
        )

    async def send(self, notification: Notification, device: Device) -> PushResult:
        if not _DEVICE_TOKEN.fullmatch(device.token):
            return PushResult(Outcome.DEAD_TOKEN, reason="BadDeviceToken (not hex)")
        try:
            payload = build_payload(notification)
        except (TypeError, ValueError) as exc:
            return PushResult(Outcome.REJECTED, reason=f"data is not JSON: {exc}")
        if len(payload) > MAX_PAYLOAD_BYTES:
            return PushResult(
                Outcome.REJECTED, reason=f"PayloadTooLarge ({len(payload)} > {MAX_PAYLOAD_BYTES})"
            )
        headers = build_headers(notification, self.topic)
        for first_attempt in (True, False):
            provider_token = self.token.current()
            headers["authorization"] = f"bearer {provider_token}"
            try:
                response = await self._client.post(
                    f"/3/device/{device.token}", content=payload, headers=headers
                )
            except TRANSPORT_ERRORS as exc:
                return transport_failure(exc)
            reason = _reason(response)
            if first_attempt and response.status_code == 403 and reason == "ExpiredProviderToken":
                self.token.invalidate(provider_token)  # concurrent refusals sign one new token
                continue
            break
        return self._result(response, reason)

    def _result(self, response: httpx.Response, reason: str) -> PushResult:
        status = response.status_code
        if status == 200:
            return PushResult(Outcome.DELIVERED, status=status)
        if reason in DEAD_TOKEN_REASONS:
            return PushResult(Outcome.DEAD_TOKEN, status=status, reason=reason)
        if status == 403 and reason in PROVIDER_TOKEN_REASONS:
            return PushResult(Outcome.CREDENTIALS_REJECTED, status=status, reason=reason)
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
        return status_result(status, reason, retry_after)

    async def close(self) -> None:
        await self._client.aclose()


def _reason(response: httpx.Response) -> str:
    """APNs' ``{"reason": ...}``, else the HTTP reason phrase."""
    try:
        reason = response.json().get("reason")
    except (ValueError, AttributeError):
        reason = None
    return reason if isinstance(reason, str) else response.reason_phrase
