"""Settings: the only reader of the environment.

Every setting is an environment variable with the prefix ``REALTIME_`` and a
flag of ``realtime serve`` (a flag wins). Lists are comma-separated.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

#: Used when no JWT secret is configured (dev mode, loopback only). Documented in README.
DEV_JWT_SECRET = "piggybong-dev-secret-do-not-use-in-production"
#: Used when no API key is configured (dev mode, loopback only). Documented in README.
DEV_API_KEY = "dev-api-key"


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Server settings. Defaults are the contract's (protocol-v1)."""

    model_config = SettingsConfigDict(env_prefix="REALTIME_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    redis_url: str | None = None
    node_id: str | None = None

    jwt_secret: str | None = None
    jwt_public_key: Path | None = None
    jwt_audiences: CsvList = ["authenticated"]
    jwt_leeway: float = Field(0.0, ge=0)
    api_keys: CsvList = []
    blocked_users: CsvList = []

    tier_policy: Path | None = None

    max_frame_bytes: int = Field(64 * 1024, ge=1024)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    outbox_max_messages: int = Field(1000, ge=1)
    outbox_max_bytes: int = Field(1024 * 1024, ge=1024)
    ping_interval: float = Field(25.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0)
    close_timeout: float = Field(5.0, gt=0)
    drain_timeout: float = Field(10.0, ge=0)
    idempotency_window: float = Field(600.0, gt=0)
    publish_rate_per_key: float | None = Field(None, gt=0)
    max_connections_per_user: int | None = Field(None, ge=1)

    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_interval: float = Field(10.0, gt=0)

    @field_validator("jwt_audiences", "api_keys", "blocked_users", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @model_validator(mode="after")
    def _dev_mode_on_loopback_only(self) -> Settings:
        if self.dev_mode and not _is_loopback(self.host):
            raise ValueError(
                "dev mode (no REALTIME_JWT_SECRET / REALTIME_JWT_PUBLIC_KEY or no "
                "REALTIME_API_KEYS) is refused on a non-loopback host "
                f"({self.host!r}); configure a secret and API keys"
            )
        if self.workers > 1 and not self.redis_url:
            raise ValueError("REALTIME_WORKERS > 1 needs REALTIME_REDIS_URL")
        return self

    @property
    def dev_jwt(self) -> bool:
        return not self.jwt_secret and self.jwt_public_key is None

    @property
    def dev_api(self) -> bool:
        return not self.api_keys

    @property
    def dev_mode(self) -> bool:
        return self.dev_jwt or self.dev_api

    @property
    def effective_jwt_secret(self) -> str | None:
        if self.jwt_secret:
            return self.jwt_secret
        return DEV_JWT_SECRET if self.jwt_public_key is None else None

    @property
    def effective_api_keys(self) -> list[str]:
        return self.api_keys or [DEV_API_KEY]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
