"""Who is connecting: JWT -> Principal, and the API keys of the HTTP API.

Tokens (protocol-v1, section 2) are verified against an algorithm allow-list
chosen by the configured keys, never by the token: HS256 with the shared
secret; RS256 (RSA key) or ES256 (P-256 key) with the configured public key.
An HMAC algorithm is never verified with the public key, and ``alg: none`` is
never accepted. ``sub`` and ``exp`` are required; ``aud``, when present, must
name one of the configured audiences. Errors are values (``Error``) whose
messages say what is wrong with the token without echoing keys.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from realtime.protocol import Error, ErrorCode

#: RFC 7518 section 3.2: an HS256 key must be at least as long as the hash output.
MIN_SECRET_BYTES: Final = 32
#: The smallest RSA modulus accepted for RS256.
MIN_RSA_BITS: Final = 2048
DEFAULT_TIER: Final = "free"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user.

    ``tier`` is the raw claim (``tier``, else ``app_metadata.tier``, else
    "free"); mapping an unknown tier to free is the tier policy's job.
    ``expires_at`` is the token's ``exp`` (unix seconds). ``admin``: a dashboard's admin
    session (realtime/dashboard.py), never a user token.
    """

    user: str
    tier: str
    expires_at: float
    admin: bool = False


def _unauthorized(message: str) -> Error:
    return Error(ErrorCode.UNAUTHORIZED, message)


def _check_secret(secret: str) -> bytes:
    raw = secret.encode()
    if len(raw) < MIN_SECRET_BYTES:
        raise ValueError(f"the JWT secret must be at least {MIN_SECRET_BYTES} bytes (RFC 7518)")
    return raw


def _public_key_algorithm(pem: bytes) -> tuple[str, Any]:
    """(algorithm, key object) for a PEM public key; ValueError for an unusable key."""
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the JWT public key is not a PEM public key: {exc}") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"the JWT RSA public key must be at least {MIN_RSA_BITS} bits")
        return "RS256", key
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError("the JWT EC public key must be on curve P-256 (ES256)")
        return "ES256", key
    raise ValueError("the JWT public key must be an RSA (RS256) or P-256 EC (ES256) key")


#: The latest ``exp`` honoured (9999-12-31T23:59:59Z); a later one counts as this.
MAX_EXP = 253_402_300_799


def _is_number(value: object) -> bool:
    """A finite number (an int of any size counts; it is never turned into a float)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)


def _tier_claim(claims: Mapping[str, Any]) -> str:
    tier = claims.get("tier")
    if isinstance(tier, str) and tier:
        return tier
    metadata = claims.get("app_metadata")
    if isinstance(metadata, dict):
        tier = metadata.get("tier")
        if isinstance(tier, str) and tier:
            return tier
    return DEFAULT_TIER


class Authenticator:
    """Verifies client tokens; thread-safe and side-effect free.

    ``leeway`` (seconds) tolerates clock skew for ``exp`` and ``nbf``: a token
    is valid while ``clock() < exp + leeway``. ``clock`` gives unix seconds.
    Raises ValueError at construction for a missing, short or unusable key.
    """

    def __init__(
        self,
        *,
        secret: str | None,
        public_key_pem: bytes | None = None,
        audiences: Sequence[str] = ("authenticated",),
        leeway: float = 0.0,
        blocked_users: Iterable[str] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret and public_key_pem is None:
            raise ValueError("a JWT secret or a public key is required")
        if leeway < 0:
            raise ValueError("leeway must be >= 0")
        self._keys: dict[str, Any] = {}
        if secret:
            self._keys["HS256"] = _check_secret(secret)
        if public_key_pem is not None:
            algorithm, key = _public_key_algorithm(public_key_pem)
            self._keys[algorithm] = key
        self.audiences: frozenset[str] = frozenset(audiences)
        self.leeway = float(leeway)
        self.blocked_users: frozenset[str] = frozenset(blocked_users)
        self._clock = clock
        self._jwt = jwt.PyJWT()

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted ``alg`` values."""
        return tuple(self._keys)

    def authenticate(self, token: str) -> Principal | Error:
        """The token's principal; ``unauthorized`` for any invalid token,
        ``forbidden`` for a valid token of a blocked user."""
        if not isinstance(token, str) or not token:
            return _unauthorized("missing token")
        if len(self._keys) == 1:  # one key: no need to read the header twice
            ((algorithm, key),) = self._keys.items()
        else:
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError:
                return _unauthorized("malformed token")
            chosen = self._key_for(header.get("alg"))
            if isinstance(chosen, Error):
                return chosen
            algorithm, key = chosen
        try:
            claims: dict[str, Any] = self._jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                options={
                    "verify_signature": True,
                    "verify_exp": False,  # checked below against the injected clock
                    "verify_nbf": False,
                    "verify_iat": False,
                    "verify_aud": False,  # a token without aud is accepted (checked below)
                    "verify_iss": False,
                    "verify_sub": False,  # checked below
                    "verify_jti": False,
                },
            )
        except jwt.InvalidAlgorithmError:  # say which alg was refused
            try:
                chosen = self._key_for(jwt.get_unverified_header(token).get("alg"))
            except jwt.PyJWTError:
                chosen = _unauthorized("malformed token")
            return chosen if isinstance(chosen, Error) else _unauthorized("malformed token")
        except jwt.InvalidSignatureError:
            return _unauthorized("invalid token signature")
        except jwt.PyJWTError:
            return _unauthorized("malformed token")
        return self._principal(claims)

    def _key_for(self, algorithm: object) -> tuple[str, Any] | Error:
        """The key of a token's ``alg``, or why the algorithm is refused."""
        key = self._keys.get(algorithm) if isinstance(algorithm, str) else None
        if key is None or not isinstance(algorithm, str):
            accepted = ", ".join(self._keys)
            return _unauthorized(
                f"token algorithm {algorithm!r} not accepted (accepted: {accepted})"
            )
        return algorithm, key

    def _principal(self, claims: Mapping[str, Any]) -> Principal | Error:
        now = self._clock()
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            return _unauthorized("token has no sub claim (a non-empty string)")
        exp = claims.get("exp")
        if exp is None:
            return _unauthorized("token has no exp claim")
        if not _is_number(exp):
            return _unauthorized("token exp claim must be a number")
        # An absurd exp (1e308, 10**400) would overflow the float sums, the timers and the
        # msgpack reply: the latest honoured is MAX_EXP.
        exp = min(exp, MAX_EXP)
        if now >= exp + self.leeway:
            return _unauthorized("token expired")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or now < min(nbf, MAX_EXP) - self.leeway):
            return _unauthorized("token not yet valid (nbf)")
        if "aud" in claims:
            audience = self._check_audience(claims["aud"])
            if audience is not None:
                return audience
        if sub in self.blocked_users:
            return Error(ErrorCode.FORBIDDEN, "user is blocked")
        return Principal(user=sub, tier=_tier_claim(claims), expires_at=float(exp))

    def _check_audience(self, aud: object) -> Error | None:
        values = [aud] if isinstance(aud, str) else aud
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            return _unauthorized("token aud claim must be a string or a list of strings")
        if self.audiences.isdisjoint(values):
            return _unauthorized("token audience not accepted")
        return None


def mint_token(
    secret: str,
    user: str,
    *,
    tier: str | None = None,
    ttl: float = 3600,
    audience: str | None = "authenticated",
    now: float | None = None,
) -> str:
    """An HS256 token for ``user`` valid for ``ttl`` seconds (``exp`` in whole seconds)."""
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": user,
        "iat": int(issued),
        "exp": math.ceil(issued + ttl),
        "role": "authenticated",
    }
    if audience is not None:
        claims["aud"] = audience
    if tier is not None:
        claims["tier"] = tier
    return jwt.encode(claims, _check_secret(secret), algorithm="HS256")


class ApiKeys:
    """The HTTP API's bearer keys; several are valid at once (rotation).

    ``check`` compares the presented key with every configured key in constant
    time (SHA-256 digests, so neither which key nor its length leaks).
    """

    def __init__(self, keys: Sequence[str]) -> None:
        if not keys or any(not key for key in keys):
            raise ValueError("API keys must be a non-empty list of non-empty strings")
        self._digests = tuple(hashlib.sha256(key.encode()).digest() for key in keys)

    def check(self, authorization_header: str | None) -> bool:
        """True when the header is ``Bearer <key>`` with a configured key."""
        return self.match(authorization_header) is not None

    def match(self, authorization_header: str | None) -> int | None:
        """The index of the configured key the header presents (``Bearer <key>``), or None.

        The index, not the header, names the caller for per-key limits: variants of one
        header (case, spaces) are one key, and nothing unbounded is kept per header."""
        if not authorization_header:
            return None
        scheme, _, presented = authorization_header.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: int | None = None
        for index, known in enumerate(self._digests):
            if hmac.compare_digest(digest, known):
                found = index
        return found
