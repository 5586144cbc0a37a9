"""Firebase Cloud Messaging: the HTTP v1 API with a service account's OAuth2 access token."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from notifications.models import Device, Notification, Outcome, Priority, PushResult
from notifications.push import (
    TRANSPORT_ERRORS,
    http_client,
    parse_retry_after,
    status_result,
    transport_failure,
)

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Lifetime of the signed assertion (Google accepts at most an hour).
ASSERTION_LIFETIME = 3600
#: An access token is dropped this many seconds before it expires.
EARLY_REFRESH = 300.0

_FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_APNS_ERROR = "type.googleapis.com/google.firebase.fcm.v1.ApnsError"
_URGENT = frozenset({Priority.CRITICAL, Priority.HIGH})


def build_message(notification: Notification, token: str, now: float) -> dict[str, Any]:
    """The messages:send body. ``data`` values become strings (non-strings as compact JSON)
    plus ``notification_id``; ``ttl`` is what is left of the notification's life at ``now``.
    Raises TypeError/ValueError if a data value is not JSON."""
    data = {
        key: value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        for key, value in notification.data.items()
    }
    data["notification_id"] = notification.id
    left = 0 if notification.ttl == 0 else max(0, math.ceil(notification.expires_at - now))
    android: dict[str, str] = {
        "priority": "HIGH" if notification.priority in _URGENT else "NORMAL",
        "ttl": f"{left}s",
    }
    if notification.collapse_id:
        android["collapse_key"] = notification.collapse_id
    return {
        "message": {
            "token": token,
            "notification": {"title": notification.title, "body": notification.body},
            "data": data,
            "android": android,
        }
    }


class ServiceAccountAuth:
    """Signs the RS256 JWT-grant assertion and caches the access token it buys.

    ``cached()`` is the access token until ``EARLY_REFRESH`` seconds before it
    expires, else None.
    """

    def __init__(self, service_account: Mapping[str, Any], clock: Callable[[], float]) -> None:
        missing = {"client_email", "private_key", "token_uri", "project_id"} - set(service_account)
        if missing:
            raise ValueError(f"service account lacks {sorted(missing)}")
        key = load_pem_private_key(str(service_account["private_key"]).encode(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise ValueError("the service account key must be an RSA private key")
        self._key = key
        self.client_email = str(service_account["client_email"])
        self.token_uri = str(service_account["token_uri"])
        self._clock = clock
        self._token: str | None = None
        self._valid_until = 0.0

    def assertion(self) -> str:
        now = int(self._clock())
        claims = {
            "iss": self.client_email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME,
        }
        return jwt.encode(claims, self._key, algorithm="RS256")

    def cached(self) -> str | None:
        return self._token if self._token and self._clock() < self._valid_until else None

    def store(self, token: str, expires_in: float) -> None:
        self._token = token
        self._valid_until = self._clock() + expires_in - EARLY_REFRESH

    def invalidate(self, token: str) -> None:
        """Drops ``token`` if it is still the cached one."""
        if token == self._token:
            self._token = None


class FcmAdapter:
    """Sends notifications to Android devices through FCM HTTP v1.

    Outcomes: 200 delivered; UNREGISTERED or SENDER_ID_MISMATCH, or
    INVALID_ARGUMENT carrying an APNs 410, dead token; other INVALID_ARGUMENT
    and other 4xx rejected; 429 QUOTA_EXCEEDED retry with Retry-After and no
    breaker failure; 5xx retry with Retry-After and breaker failure; transport
    errors and time-outs retry with breaker failure.

    Credentials rejected (``CREDENTIALS_REJECTED``, no notification can fix
    it): the token endpoint answering 4xx other than 408/429 (invalid_grant:
    a revoked, deleted or wrong service account key, or a skewed clock;
    unauthorized_client...); a 401 that persists with a freshly bought access
    token (the first 401 drops the token and retries once at once);
    PERMISSION_DENIED without SENDER_ID_MISMATCH (the account may not send for
    the project). A token endpoint answering anything else (408, 429, 5xx) or
    unreachable is a retry (a breaker failure if 408, 5xx or unreachable).

    One access-token request is in flight at a time; the sends that waited for
    it share its answer, a refusal included, instead of asking again.
    """

    name = "fcm"

    def __init__(
        self,
        *,
        service_account: Mapping[str, Any],
        endpoint: str = "https://fcm.googleapis.com",
        ca_bundle: str | None = None,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.auth = ServiceAccountAuth(service_account, clock)
        self._clock = clock
        self._path = f"/v1/projects/{service_account['project_id']}/messages:send"
        self._client = http_client(
            timeout=timeout, ca_bundle=ca_bundle, http2=True, base_url=endpoint
        )
        self._token_lock = asyncio.Lock()
        # Token requests answered, and the last one's refusal: a send that was waiting while a
        # request was answered takes its answer (the token, or this refusal) instead of asking.
        self._token_answers = 0
        self._refusal: PushResult | None = None
        self.token_requests = 0  # access tokens asked for (for metrics and tests)

    async def send(self, notification: Notification, device: Device) -> PushResult:
        try:
            body = build_message(notification, device.token, self._clock())
            content = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        except (TypeError, ValueError) as exc:
            return PushResult(Outcome.REJECTED, reason=f"data is not JSON: {exc}")
        fresh = False  # whether the access token was bought after this send asked for it
        for first_attempt in (True, False):
            answers = self._token_answers
            token = await self._access_token()
            if isinstance(token, PushResult):
                return token
            fresh = self._token_answers != answers
            try:
                response = await self._client.post(
                    self._path,
                    content=content,
                    headers={
                        "authorization": f"Bearer {token}",
                        "content-type": "application/json; charset=utf-8",
                    },
                )
            except TRANSPORT_ERRORS as exc:
                return transport_failure(exc)
            if response.status_code == 401:
                self.auth.invalidate(token)
                if first_attempt:
                    continue
            break
        return self._result(response, fresh_token=fresh)

    async def _access_token(self) -> str | PushResult:
        """The cached access token, else a new one, else why none could be had."""
        token = self.auth.cached()
        if token is not None:
            return token
        answers = self._token_answers
        async with self._token_lock:
            token = self.auth.cached()
            if token is not None:
                return token
            if self._token_answers != answers and self._refusal is not None:
                return self._refusal  # refused while this send waited
            self.token_requests += 1
            answer = await self._buy_token()
            self._token_answers += 1
            self._refusal = answer if isinstance(answer, PushResult) else None
            return answer

    async def _buy_token(self) -> str | PushResult:
        """One JWT-grant request: the access token (now cached), or the refusal as a result."""
        try:
            response = await self._client.post(
                self.auth.token_uri,
                data={"grant_type": GRANT_TYPE, "assertion": self.auth.assertion()},
            )
        except TRANSPORT_ERRORS as exc:
            failure = transport_failure(exc)
            return dataclasses.replace(failure, reason=f"oauth: {failure.reason}")
        status = response.status_code
        try:
            answer = response.json()
            token = str(answer["access_token"])
            expires_in = float(answer.get("expires_in", 3600))
        except (ValueError, KeyError, TypeError, AttributeError):
            token = None
        if status == 200 and token is not None:
            self.auth.store(token, expires_in)
            return token
        reason = f"oauth token refused: {_oauth_error(response)}"
        if 400 <= status < 500 and status not in {408, 429}:
            return PushResult(Outcome.CREDENTIALS_REJECTED, status=status, reason=reason)
        return PushResult(
            Outcome.RETRY,
            status=status,
            reason=reason,
            retry_after=parse_retry_after(response.headers.get("retry-after"), self._clock()),
            breaker_failure=status == 408 or status >= 500,
        )

    def _result(self, response: httpx.Response, *, fresh_token: bool) -> PushResult:
        status = response.status_code
        if status == 200:
            return PushResult(Outcome.DELIVERED, status=status)
        rpc_status, fcm_code, apns_status = _error_of(response)
        reason = fcm_code or rpc_status or response.reason_phrase
        if fcm_code in {"UNREGISTERED", "SENDER_ID_MISMATCH"}:
            return PushResult(Outcome.DEAD_TOKEN, status=status, reason=reason)
        if "INVALID_ARGUMENT" in {fcm_code, rpc_status} and apns_status == 410:
            return PushResult(Outcome.DEAD_TOKEN, status=status, reason=f"{reason} (APNs 410)")
        if (status == 401 and fresh_token) or (
            status == 403 and not fcm_code and rpc_status == "PERMISSION_DENIED"
        ):
            detail = f"{reason}: {_message_of(response)}".removesuffix(": ")
            return PushResult(Outcome.CREDENTIALS_REJECTED, status=status, reason=detail)
        if status == 401:  # an access token that went stale in flight: the next send buys one
            return PushResult(Outcome.RETRY, status=status, reason=reason)
        retry_after = parse_retry_after(response.headers.get("retry-after"), self._clock())
        return status_result(status, reason, retry_after)

    async def close(self) -> None:
        await self._client.aclose()


def _oauth_error(response: httpx.Response) -> str:
    """``<status> <error>: <error_description>`` of an OAuth error answer, else its text."""
    try:
        answer = response.json()
        error, description = answer["error"], answer.get("error_description")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{response.status_code} {response.text[:200]}".rstrip()
    detail = f"{response.status_code} {error}"
    return f"{detail}: {description}" if description else detail


def _message_of(response: httpx.Response) -> str:
    """The google.rpc status message of an error answer (the first 200 characters), or ''."""
    try:
        return str(response.json()["error"].get("message") or "")[:200]
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""


def _error_of(response: httpx.Response) -> tuple[str, str, int | None]:
    """(google.rpc status, FcmError errorCode, ApnsError statusCode) of an error answer."""
    try:
        error = response.json()["error"]
        rpc_status = str(error.get("status") or "")
        details = error.get("details") or []
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", "", None
    fcm_code, apns_status = "", None
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        if detail.get("@type") == _FCM_ERROR:
            fcm_code = str(detail.get("errorCode") or "")
        elif detail.get("@type") == _APNS_ERROR and isinstance(detail.get("statusCode"), int):
            apns_status = detail["statusCode"]
    return rpc_status, fcm_code, apns_status
