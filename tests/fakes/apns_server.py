"""A fake APNs provider API over real HTTP/2 + TLS, checking what Apple checks.

Fixtures: ``apns_credentials`` (session) -> ``ApnsCredentials`` (an ES256 .p8
key, key id, team id, topic); ``fake_apns`` -> a started ``FakeApns`` whose CA
file is ``fake_apns.ca_file``.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import FakeProvider, Reply, Request, serving
from tests.fakes.tls import TestCa, tls_ca

__all__ = [
    "ApnsCredentials",
    "FakeApns",
    "apns_credentials",
    "apns_error",
    "fake_apns",
    "tls_ca",
]

TOKEN_MAX_AGE = 3600.0
MAX_PAYLOAD = 4096
_PATH = re.compile(r"/3/device/(?P<token>[^/?]*)")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_PUSH_TYPES = {"alert", "background", "location", "voip", "complication", "fileprovider", "mdm"}


def apns_error(status: int, reason: str, headers: dict[str, str] | None = None) -> Reply:
    """An APNs error answer: ``{"reason": ...}`` (plus a timestamp for 410, as Apple sends)."""
    body: dict[str, object] = {"reason": reason}
    if status == 410:
        body["timestamp"] = int(time.time() * 1000)
    return Reply(status, body, headers or {})


@dataclass(frozen=True)
class ApnsCredentials:
    key_pem: bytes
    public_key: ec.EllipticCurvePublicKey
    key_id: str = "ABC123DEFG"
    team_id: str = "DEF123GHIJ"
    topic: str = "com.piggybong.app"


class FakeApns(FakeProvider):
    """Answers ``POST /3/device/<token>`` as APNs does.

    Checks, in order: method (405), path (404 BadPath), the bearer ES256 JWT
    (403 MissingProviderToken / InvalidProviderToken for a bad signature, kid,
    iss, alg or an iat in the future / ExpiredProviderToken for an iat older
    than an hour, by ``clock``), apns-topic (400 MissingTopic /
    TopicDisallowed), apns-push-type, apns-priority in {5, 10},
    apns-expiration, apns-id, apns-collapse-id (400 Bad…), payload (400
    PayloadEmpty, 413 PayloadTooLarge over 4096 bytes), the token (400
    BadDeviceToken if not 64 hex digits or not in ``known_tokens``). A per-token
    answer (``answer_token``) replaces the token check. 200 carries apns-id.
    """

    def __init__(
        self, tls: TestCa, credentials: ApnsCredentials, *, clock: Callable[[], float] = time.time
    ) -> None:
        super().__init__(tls.server_context(), tls.ca_file)
        self.credentials = credentials
        self.clock = clock

    error = staticmethod(apns_error)

    def new_device_token(self) -> str:
        return secrets.token_hex(32)

    def script(self, *replies: Reply) -> None:
        """The next ``len(replies)`` requests get these, whatever they hold."""
        self.server.script(*replies)

    def handle(self, request: Request) -> Reply:
        if request.method != "POST":
            return apns_error(405, "MethodNotAllowed")
        match = _PATH.fullmatch(request.path)
        if match is None:
            return apns_error(404, "BadPath")
        problem = self._check_auth(request.headers.get("authorization"))
        if problem is not None:
            return apns_error(403, problem)
        headers = request.headers
        topic = headers.get("apns-topic")
        if topic is None:
            return apns_error(400, "MissingTopic")
        if topic != self.credentials.topic:
            return apns_error(400, "TopicDisallowed")
        if headers.get("apns-push-type", "alert") not in _PUSH_TYPES:
            return apns_error(400, "InvalidPushType")
        if headers.get("apns-priority", "10") not in {"5", "10"}:
            return apns_error(400, "BadPriority")
        if not headers.get("apns-expiration", "0").isdigit():
            return apns_error(400, "BadExpirationDate")
        apns_id = headers.get("apns-id")
        if apns_id is not None and not _is_canonical_uuid(apns_id):
            return apns_error(400, "BadMessageId")
        if len(headers.get("apns-collapse-id", "").encode()) > 64:
            return apns_error(400, "BadCollapseId")
        if not request.body:
            return apns_error(400, "PayloadEmpty")
        if len(request.body) > MAX_PAYLOAD:
            return apns_error(413, "PayloadTooLarge")
        token = match["token"]
        if token in self.token_answers:
            return self.token_answers[token]
        if not _HEX64.fullmatch(token) or token not in self.known_tokens:
            return apns_error(400, "BadDeviceToken")
        return Reply(200, headers={"apns-id": apns_id or str(uuid.uuid4())})

    def _check_auth(self, authorization: str | None) -> str | None:
        """None if the provider token is good, else the APNs reason."""
        if authorization is None:
            return "MissingProviderToken"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "MissingProviderToken"
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(
                token,
                self.credentials.public_key,
                algorithms=["ES256"],
                options={"verify_iat": False, "verify_exp": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            return "InvalidProviderToken"
        if header.get("kid") != self.credentials.key_id:
            return "InvalidProviderToken"
        if claims.get("iss") != self.credentials.team_id:
            return "InvalidProviderToken"
        iat = claims.get("iat")
        now = self.clock()
        if not isinstance(iat, int) or iat > now:
            return "InvalidProviderToken"
        if now - iat > TOKEN_MAX_AGE:
            return "ExpiredProviderToken"
        return None


def _is_canonical_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower() and len(value) == 36
    except ValueError:
        return False


@pytest.fixture(scope="session")
def apns_credentials() -> ApnsCredentials:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return ApnsCredentials(key_pem=pem, public_key=key.public_key())


@pytest.fixture
async def fake_apns(tls_ca: TestCa, apns_credentials: ApnsCredentials) -> AsyncIterator[FakeApns]:
    async with serving(FakeApns(tls_ca, apns_credentials)) as fake:
        yield fake
