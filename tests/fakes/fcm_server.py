"""A fake FCM over real HTTP/2 + TLS: Google's OAuth token endpoint and HTTP v1 messages:send.

Fixtures: ``fcm_key`` (session) -> the service account's RSA key; ``fake_fcm`` -> a
started ``FakeFcm``; ``fake_fcm.service_account`` is the JSON key an adapter
takes (its token_uri points at the fake) and ``fake_fcm.ca_file`` its CA.
"""

from __future__ import annotations

import itertools
import re
import secrets
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes import FakeProvider, Reply, Request, serving
from tests.fakes.tls import TestCa, tls_ca

__all__ = ["FakeFcm", "fake_fcm", "fcm_error", "fcm_key", "tls_ca"]

SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
GRANT_TYPE = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH = "/token"
FCM_ERROR = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
APNS_ERROR = "type.googleapis.com/google.firebase.fcm.v1.ApnsError"
_SEND = re.compile(r"/v1/projects/(?P<project>[^/]+)/messages:send")
_DURATION = re.compile(r"\d+(\.\d{1,9})?s")
_MESSAGE_FIELDS = {"token", "notification", "data", "android", "apns", "webpush", "fcm_options"}
_ANDROID_FIELDS = {
    "priority",
    "ttl",
    "collapse_key",
    "notification",
    "data",
    "restricted_package_name",
}

_HTTP_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def fcm_error(
    status: int,
    error_code: str | None = None,
    *,
    message: str = "fake error",
    apns_status: int | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    """A google.rpc.Status error as FCM sends it, with an FcmError (and ApnsError) detail."""
    details: list[dict[str, Any]] = []
    if error_code is not None:
        details.append({"@type": FCM_ERROR, "errorCode": error_code})
    if apns_status is not None:
        details.append({"@type": APNS_ERROR, "statusCode": apns_status, "reason": "Unregistered"})
    error = {
        "code": status,
        "message": message,
        "status": _HTTP_STATUS.get(status, "UNKNOWN"),
        "details": details,
    }
    return Reply(status, {"error": error}, headers or {})


class FakeFcm(FakeProvider):
    """Serves ``POST /token`` and ``POST /v1/projects/<id>/messages:send``.

    Token endpoint: a form with grant_type jwt-bearer and an RS256 assertion
    verified against the service account's key (iss, aud = token_uri, scope,
    iat not in the future, exp after now and at most an hour after iat, by
    ``clock``); else 400 invalid_grant. It issues access tokens that live
    ``token_lifetime`` seconds.
    messages:send: 401 UNAUTHENTICATED for a missing, unknown, revoked or
    expired bearer; 403 PERMISSION_DENIED for another project; 400
    INVALID_ARGUMENT for a bad message (unknown fields, no token, non-string
    data values, a bad android priority/ttl) or a token it does not know; a
    per-token answer (``answer_token``) replaces the token check; 200 names
    the message.
    """

    def __init__(
        self,
        tls: TestCa,
        key: rsa.RSAPrivateKey,
        *,
        project_id: str = "piggybong-test",
        client_email: str = "push@piggybong-test.iam.gserviceaccount.com",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(tls.server_context(), tls.ca_file)
        self._key = key
        self.project_id = project_id
        self.client_email = client_email
        self.clock = clock
        self.token_lifetime = 3600
        self.access_tokens: dict[str, float] = {}  # token -> expires at (by clock)
        self._ids = itertools.count(1)

    error = staticmethod(fcm_error)

    def new_device_token(self) -> str:
        return secrets.token_urlsafe(48)

    @property
    def token_uri(self) -> str:
        return self.url + TOKEN_PATH

    @property
    def service_account(self) -> dict[str, str]:
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "type": "service_account",
            "project_id": self.project_id,
            "client_email": self.client_email,
            "private_key": pem.decode(),
            "token_uri": self.token_uri,
        }

    @property
    def token_requests(self) -> list[Request]:
        return [r for r in self.server.requests if r.path == TOKEN_PATH]

    @property
    def send_requests(self) -> list[Request]:
        return [r for r in self.server.requests if r.path != TOKEN_PATH]

    def revoke_access_tokens(self) -> None:
        self.access_tokens.clear()

    def script_send(self, *replies: Reply) -> None:
        """The next ``len(replies)`` messages:send requests get these."""
        self.server.script(*replies, path_prefix="/v1/")

    def script_token(self, *replies: Reply) -> None:
        """The next ``len(replies)`` token requests get these."""
        self.server.script(*replies, path_prefix=TOKEN_PATH)

    def handle(self, request: Request) -> Reply:
        if request.path == TOKEN_PATH:
            return self._token(request)
        match = _SEND.fullmatch(request.path)
        if match is None:
            return fcm_error(404, message="no such method")
        if request.method != "POST":
            return fcm_error(404, message="POST only")
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        expires = self.access_tokens.get(bearer)
        if scheme.lower() != "bearer" or expires is None or expires <= self.clock():
            return fcm_error(401, message="Request had invalid authentication credentials.")
        if match["project"] != self.project_id:
            return fcm_error(403, message="Permission denied on the project.")
        try:
            message = request.json()["message"]
        except (ValueError, KeyError, TypeError):
            return fcm_error(400, message="no message")
        problem = _message_problem(message)
        if problem is not None:
            return fcm_error(400, "INVALID_ARGUMENT", message=problem)
        token = message["token"]
        if token in self.token_answers:
            return self.token_answers[token]
        if token not in self.known_tokens:
            return fcm_error(
                400, "INVALID_ARGUMENT", message="The registration token is not valid."
            )
        return Reply(200, {"name": f"projects/{self.project_id}/messages/{next(self._ids)}"})

    def _token(self, request: Request) -> Reply:
        if request.method != "POST":
            return Reply(405, {"error": "invalid_request"})
        if not request.headers.get("content-type", "").startswith(
            "application/x-www-form-urlencoded"
        ):
            return _invalid_grant("not a form")
        form = urllib.parse.parse_qs(request.body.decode())
        if form.get("grant_type") != [GRANT_TYPE] or len(form.get("assertion", [])) != 1:
            return Reply(400, {"error": "unsupported_grant_type"})
        try:
            claims = jwt.decode(
                form["assertion"][0],
                self._key.public_key(),
                algorithms=["RS256"],
                audience=self.token_uri,
                issuer=self.client_email,
                options={"verify_iat": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError as exc:
            return _invalid_grant(f"bad assertion: {exc}")
        now = self.clock()
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return _invalid_grant("iat and exp are required")
        if iat > now + 1 or exp <= now or exp - iat > 3600:
            return _invalid_grant("Invalid JWT: Token must be a short-lived token")
        if SCOPE not in str(claims.get("scope", "")).split():
            return _invalid_grant("scope")
        token = f"ya29.fake-{secrets.token_urlsafe(16)}"
        self.access_tokens[token] = now + self.token_lifetime
        return Reply(
            200,
            {"access_token": token, "expires_in": self.token_lifetime, "token_type": "Bearer"},
        )


def _invalid_grant(description: str) -> Reply:
    return Reply(400, {"error": "invalid_grant", "error_description": description})


def _message_problem(message: Any) -> str | None:
    """What FCM would refuse in a message, else None."""
    if not isinstance(message, dict):
        return "message is not an object"
    unknown = set(message) - _MESSAGE_FIELDS
    if unknown:
        return f"Unknown name {sorted(unknown)}"
    if not isinstance(message.get("token"), str) or not message["token"]:
        return "Recipient of the message is not set."
    notification = message.get("notification", {})
    if not isinstance(notification, dict) or not all(
        isinstance(v, str) for v in notification.values()
    ):
        return "notification must hold strings"
    data = message.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        return "data must map strings to strings"
    android = message.get("android", {})
    if not isinstance(android, dict) or set(android) - _ANDROID_FIELDS:
        return "bad android config"
    if android.get("priority", "NORMAL") not in {"NORMAL", "HIGH"}:
        return "android.priority"
    if "ttl" in android and not _DURATION.fullmatch(str(android["ttl"])):
        return "android.ttl"
    if not isinstance(android.get("collapse_key", ""), str):
        return "android.collapse_key"
    return None


@pytest.fixture(scope="session")
def fcm_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def fake_fcm(tls_ca: TestCa, fcm_key: rsa.RSAPrivateKey) -> AsyncIterator[FakeFcm]:
    async with serving(FakeFcm(tls_ca, fcm_key)) as fake:
        yield fake
