"""realtime.auth: token verification, the algorithm allow-list, API keys."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from realtime.auth import ApiKeys, Authenticator, Principal, mint_token
from realtime.protocol import Error, ErrorCode

SECRET = "test-secret-0123456789-abcdefghijklmnop"
NOW = 1_764_057_600.0


def clock() -> float:
    return NOW


def auth(**kwargs: Any) -> Authenticator:
    kwargs.setdefault("secret", SECRET)
    kwargs.setdefault("clock", clock)
    return Authenticator(**kwargs)


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "u42", "exp": int(NOW) + 600, "aud": "authenticated"}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def hs256(payload: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(payload, secret, algorithm="HS256")


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to sign the hostile ones)."""
    signing_input = b64(json.dumps(header).encode()) + "." + b64(json.dumps(payload).encode())
    signature = b"" if key is None else hmac.new(key, signing_input.encode(), "sha256").digest()
    return signing_input + "." + b64(signature)


def assert_error(result: Principal | Error, code: ErrorCode, fragment: str) -> None:
    assert isinstance(result, Error), result
    assert result.code is code
    assert fragment in result.message
    assert SECRET not in result.message


def public_pem(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def pem_pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return private, public_pem(key.public_key())


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, bytes]:
    return pem_pair(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.fixture(scope="module")
def ec_keys() -> tuple[bytes, bytes]:
    return pem_pair(ec.generate_private_key(ec.SECP256R1()))


# --------------------------------------------------------------------------- valid tokens


def test_valid_hs256() -> None:
    result = auth().authenticate(hs256(claims()))
    assert result == Principal(user="u42", tier="free", expires_at=NOW + 600)


def test_valid_rs256(rsa_keys: tuple[bytes, bytes]) -> None:
    private, public = rsa_keys
    token = jwt.encode(claims(tier="paid"), private, algorithm="RS256")
    a = auth(secret=None, public_key_pem=public)
    assert a.algorithms == ("RS256",)
    assert a.authenticate(token) == Principal("u42", "paid", NOW + 600)


def test_valid_es256(ec_keys: tuple[bytes, bytes]) -> None:
    private, public = ec_keys
    token = jwt.encode(claims(), private, algorithm="ES256")
    a = auth(public_key_pem=public)
    assert set(a.algorithms) == {"HS256", "ES256"}
    assert a.authenticate(token) == Principal("u42", "free", NOW + 600)
    # the secret still works alongside the public key
    assert isinstance(a.authenticate(hs256(claims())), Principal)


def test_rs256_with_the_wrong_key_is_rejected(
    rsa_keys: tuple[bytes, bytes], ec_keys: tuple[bytes, bytes]
) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = jwt.encode(claims(), other, algorithm="RS256")
    assert_error(
        auth(public_key_pem=rsa_keys[1]).authenticate(token), ErrorCode.UNAUTHORIZED, "signature"
    )
    # an RS256 token while the configured key is EC: RS256 is not on the allow-list
    good = jwt.encode(claims(), rsa_keys[0], algorithm="RS256")
    assert_error(
        auth(public_key_pem=ec_keys[1]).authenticate(good), ErrorCode.UNAUTHORIZED, "'RS256'"
    )


def test_mint_token_round_trip() -> None:
    token = mint_token(SECRET, "alice", tier="paid", ttl=90, now=NOW)
    assert auth().authenticate(token) == Principal("alice", "paid", NOW + 90)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["aud"] == "authenticated"
    assert payload["iat"] == int(NOW)
    no_aud = mint_token(SECRET, "bob", audience=None, now=NOW)
    assert "aud" not in jwt.decode(no_aud, options={"verify_signature": False})
    assert auth().authenticate(no_aud) == Principal("bob", "free", NOW + 3600)


def test_mint_token_uses_the_wall_clock_by_default() -> None:
    token = mint_token(SECRET, "alice", ttl=60)
    result = Authenticator(secret=SECRET).authenticate(token)
    assert isinstance(result, Principal)
    assert time.time() + 55 < result.expires_at <= time.time() + 61


# --------------------------------------------------------------------------- expiry and claims


def test_expired() -> None:
    token = hs256(claims(exp=int(NOW) - 1))
    assert_error(auth().authenticate(token), ErrorCode.UNAUTHORIZED, "expired")


def test_expiry_is_exact_at_exp_and_leeway_extends_it() -> None:
    token = hs256(claims(exp=int(NOW)))
    assert_error(auth().authenticate(token), ErrorCode.UNAUTHORIZED, "expired")
    assert auth(leeway=5).authenticate(token) == Principal("u42", "free", NOW)
    just_valid = hs256(claims(exp=NOW + 0.25))
    assert auth().authenticate(just_valid) == Principal("u42", "free", NOW + 0.25)


def test_no_exp() -> None:
    assert_error(auth().authenticate(hs256(claims(exp=None))), ErrorCode.UNAUTHORIZED, "no exp")


@pytest.mark.parametrize("exp", ["9999999999", True, [1]])
def test_exp_must_be_a_number(exp: object) -> None:
    result = auth().authenticate(hs256(claims(exp=exp)))
    assert_error(result, ErrorCode.UNAUTHORIZED, "exp")


def test_no_sub() -> None:
    assert_error(auth().authenticate(hs256(claims(sub=None))), ErrorCode.UNAUTHORIZED, "no sub")
    assert_error(auth().authenticate(hs256(claims(sub=""))), ErrorCode.UNAUTHORIZED, "sub")
    assert_error(auth().authenticate(hs256(claims(sub=42))), ErrorCode.UNAUTHORIZED, "sub")


def test_not_yet_valid() -> None:
    token = hs256(claims(nbf=int(NOW) + 30))
    assert_error(auth().authenticate(token), ErrorCode.UNAUTHORIZED, "nbf")
    assert isinstance(auth(leeway=60).authenticate(token), Principal)


def test_bad_signature() -> None:
    token = hs256(claims(), secret="another-secret-0123456789-abcdefghijkl")
    assert_error(auth().authenticate(token), ErrorCode.UNAUTHORIZED, "signature")
    tampered = hs256(claims())
    head, _, sig = tampered.split(".")
    forged = b64(json.dumps(claims(sub="admin")).encode())
    assert_error(auth().authenticate(f"{head}.{forged}.{sig}"), ErrorCode.UNAUTHORIZED, "signature")


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "...."])
def test_malformed(token: str) -> None:
    result = auth().authenticate(token)
    assert isinstance(result, Error)
    assert result.code is ErrorCode.UNAUTHORIZED


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none(alg: str) -> None:
    token = raw_token({"alg": alg, "typ": "JWT"}, claims(), key=None)
    assert_error(auth().authenticate(token), ErrorCode.UNAUTHORIZED, "algorithm")


@pytest.mark.parametrize("with_secret", [False, True])
def test_algorithm_confusion_rejected(rsa_keys: tuple[bytes, bytes], with_secret: bool) -> None:
    """An HS256 token 'signed' with the public key PEM as the HMAC secret."""
    public = rsa_keys[1]
    token = raw_token({"alg": "HS256", "typ": "JWT"}, claims(), key=public)
    a = auth(secret=SECRET if with_secret else None, public_key_pem=public)
    result = a.authenticate(token)
    assert isinstance(result, Error)
    assert result.code is ErrorCode.UNAUTHORIZED
    # and the same forgery against other HMAC variants is not on the allow-list
    for alg in ("HS384", "HS512"):
        forged = raw_token({"alg": alg, "typ": "JWT"}, claims(), key=public)
        assert_error(a.authenticate(forged), ErrorCode.UNAUTHORIZED, "algorithm")


def test_public_key_only_refuses_hs256_even_with_valid_looking_tokens(
    rsa_keys: tuple[bytes, bytes],
) -> None:
    a = auth(secret=None, public_key_pem=rsa_keys[1])
    assert_error(a.authenticate(hs256(claims())), ErrorCode.UNAUTHORIZED, "'HS256'")


# --------------------------------------------------------------------------- audience


def test_audience_list_and_mismatch() -> None:
    a = auth(audiences=("authenticated", "service"))
    assert isinstance(a.authenticate(hs256(claims(aud="service"))), Principal)
    assert isinstance(a.authenticate(hs256(claims(aud=["other", "service"]))), Principal)
    assert_error(a.authenticate(hs256(claims(aud="other"))), ErrorCode.UNAUTHORIZED, "audience")
    assert_error(a.authenticate(hs256(claims(aud=["x", "y"]))), ErrorCode.UNAUTHORIZED, "audience")
    assert_error(a.authenticate(hs256(claims(aud=7))), ErrorCode.UNAUTHORIZED, "aud")
    default = auth()
    assert_error(
        default.authenticate(hs256(claims(aud="service"))), ErrorCode.UNAUTHORIZED, "audience"
    )


def test_token_without_aud_accepted() -> None:
    assert auth().authenticate(hs256(claims(aud=None))) == Principal("u42", "free", NOW + 600)


# --------------------------------------------------------------------------- tier and blocks


def test_tier_from_claim_app_metadata_and_default() -> None:
    a = auth()
    from_claim = a.authenticate(hs256(claims(tier="paid", app_metadata={"tier": "gold"})))
    assert isinstance(from_claim, Principal) and from_claim.tier == "paid"
    from_metadata = a.authenticate(hs256(claims(app_metadata={"tier": "gold"})))
    assert isinstance(from_metadata, Principal) and from_metadata.tier == "gold"
    default = a.authenticate(hs256(claims(app_metadata={"provider": "email"})))
    assert isinstance(default, Principal) and default.tier == "free"
    # a non-string claim does not count
    odd = a.authenticate(hs256(claims(tier=3, app_metadata={"tier": "paid"})))
    assert isinstance(odd, Principal) and odd.tier == "paid"
    # an unknown tier is passed through raw; the policy maps it
    raw = a.authenticate(hs256(claims(tier="platinum")))
    assert isinstance(raw, Principal) and raw.tier == "platinum"


def test_blocked_user_is_forbidden() -> None:
    a = auth(blocked_users=["u42"])
    assert_error(a.authenticate(hs256(claims())), ErrorCode.FORBIDDEN, "blocked")
    assert isinstance(a.authenticate(hs256(claims(sub="u43"))), Principal)
    # an invalid token of a blocked user is still just unauthorized
    assert_error(a.authenticate(hs256(claims(exp=int(NOW) - 5))), ErrorCode.UNAUTHORIZED, "expired")


# --------------------------------------------------------------------------- configuration


def test_configuration_errors() -> None:
    with pytest.raises(ValueError, match="secret or a public key"):
        Authenticator(secret=None)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Authenticator(secret="short")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        mint_token("short", "u")
    with pytest.raises(ValueError, match="PEM"):
        Authenticator(secret=None, public_key_pem=b"not a key")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    pem = public_pem(small)
    with pytest.raises(ValueError, match="2048"):
        Authenticator(secret=None, public_key_pem=pem)
    pem = public_pem(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(ValueError, match="P-256"):
        Authenticator(secret=None, public_key_pem=pem)


# --------------------------------------------------------------------------- API keys


def test_api_keys() -> None:
    keys = ApiKeys(["key-one", "key-two"])
    assert keys.check("Bearer key-one")
    assert keys.check("Bearer key-two")
    assert keys.check("bearer  key-two ")
    assert not keys.check(None)
    assert not keys.check("")
    assert not keys.check("Bearer")
    assert not keys.check("Bearer ")
    assert not keys.check("Basic key-one")
    assert not keys.check("key-one")
    assert not keys.check("Bearer key-three")
    assert not keys.check("Bearer key-on")
    assert not keys.check("Bearer key-one-and-more")


def test_api_keys_compare_every_key(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    keys = ApiKeys(["first", "second", "third"])
    monkeypatch.setattr(hmac, "compare_digest", counting)
    assert keys.check("Bearer first")
    assert len(calls) == 3  # no early exit on the first match
    assert all(a == hashlib.sha256(b"first").digest() for a, _ in calls)


def test_api_keys_configuration() -> None:
    with pytest.raises(ValueError):
        ApiKeys([])
    with pytest.raises(ValueError):
        ApiKeys(["ok", ""])
