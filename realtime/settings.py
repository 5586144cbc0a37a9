"""Settings: the only reader of the environment.

Every setting is an environment variable with the prefix ``REALTIME_`` and a
flag of ``realtime serve`` (a flag wins). Lists are comma-separated.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from realtime.redis_client import RedisTarget

#: Used when no JWT secret is configured (dev mode, loopback only). Documented in README.
DEV_JWT_SECRET = "piggybong-dev-secret-do-not-use-in-production"
#: Used when no API key is configured (dev mode, loopback only). Documented in README.
DEV_API_KEY = "dev-api-key"
#: The dashboard's admin token in dev mode (loopback only). Documented in docs/operations.md.
DEV_ADMIN_TOKEN = "dev-admin-token"
#: Seconds a leased notification may sit untouched before another router takes it over; not a
#: setting: app.py gives it to the notification store, and the consumer idle timeout exceeds it.
NOTIFICATION_LEASE_TIMEOUT = 30.0
#: What a REALTIME_REDIS_URL starts with.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Server settings. Defaults are the contract's (protocol-v1)."""

    model_config = SettingsConfigDict(env_prefix="REALTIME_", extra="ignore", allow_inf_nan=False)

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port (>1 needs Redis)")
    reuse_port: bool = Field(
        False,
        description="listen with SO_REUSEPORT: several `realtime serve` processes share the "
        "port, the kernel spreads connections (one worker each)",
    )
    metrics_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="also serve /metrics on this port of this process "
        "alone (scrape each process when several share the API port); unset: API port only",
    )
    redis_url: str | None = Field(
        None, description="Redis URL; unset: in-process broker and queues (one node)"
    )
    redis_sentinels: CsvList = Field(
        [],
        description="host:port of the Redis Sentinels, comma-separated (instead of "
        "REALTIME_REDIS_URL; with REALTIME_REDIS_SENTINEL_MASTER)",
    )
    redis_sentinel_master: str | None = Field(
        None, description="the master's name the sentinels monitor"
    )
    redis_cluster_nodes: CsvList = Field(
        [],
        description="host:port seeds of a Redis Cluster, comma-separated (any reachable "
        "one names the others)",
    )
    redis_password: SecretStr | None = Field(
        None, description="the Redis servers' password (AUTH), where one is needed"
    )
    notification_wait_replicas: int = Field(
        0,
        ge=0,
        description="replicas that must have an accepted notification or device before the "
        "202 (Redis WAIT); 0: no wait",
    )
    notification_wait_timeout: float = Field(
        1.0, gt=0, description="seconds to wait for those replicas (503 when fewer answered)"
    )
    node_id: str | None = Field(None, description="this node's name (default host-pid)")

    jwt_secret: str | None = Field(
        None, description="HS256 secret (32+ bytes); unset with no public key: dev mode"
    )
    jwt_public_key: Path | None = Field(None, description="PEM file of the RS256/ES256 public key")
    jwt_audiences: CsvList = Field(
        ["authenticated"], description="accepted aud values, comma-separated"
    )
    jwt_leeway: float = Field(0.0, ge=0, description="seconds of clock skew allowed on exp/nbf")
    api_keys: CsvList = Field([], description="backend API keys, comma-separated; unset: dev mode")
    blocked_users: CsvList = Field([], description="user ids refused with 4003, comma-separated")
    admin_token: str | None = Field(
        None,
        description="password of the operators' dashboard (/dashboard, HTTP Basic, any user "
        "name); unset: the dashboard answers 404 (dev mode: the dev admin token)",
    )

    tier_policy: Path | None = Field(None, description="tier policy file (JSON or TOML)")

    max_frame_bytes: int = Field(
        64 * 1024, ge=1024, description="largest client frame (1009 beyond)"
    )
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="largest HTTP body (413 beyond)")
    outbox_max_messages: int = Field(
        1000, ge=1, description="queued messages per connection (4008 beyond)"
    )
    outbox_max_bytes: int = Field(
        1024 * 1024, ge=1024, description="queued bytes per connection (4008 beyond)"
    )
    ping_interval: float = Field(
        25.0, gt=0, description="seconds between server pings; no pong by the next: closed"
    )
    connect_timeout: float = Field(
        10.0, gt=0, description="seconds for the first connect (4001 after)"
    )
    close_timeout: float = Field(
        5.0, gt=0, description="seconds to wait for a close reply before aborting"
    )
    drain_timeout: float = Field(
        10.0, ge=0, description="seconds to deliver queued messages on SIGTERM"
    )
    idempotency_window: float = Field(600.0, gt=0, description="seconds a caller id is remembered")
    publish_rate_per_key: float | None = Field(
        None,
        gt=0,
        description="HTTP publish requests/s per API key and node (429 beyond); unset: off",
    )
    max_connections_per_user: int | None = Field(
        None, ge=1, description="overrides the tiers' connections per user"
    )

    notification_concurrency: int = Field(
        16, ge=1, description="notification deliveries in flight per node"
    )
    notification_max_attempts: int = Field(
        8, ge=1, description="push attempts before a notification is dead-lettered"
    )
    notification_queue_max: int = Field(
        100_000, ge=1, description="queued notifications per priority (503 beyond)"
    )
    notification_max_deliveries: int = Field(
        10,
        ge=1,
        description="leases of one queued notification never settled (its routers "
        "crashed or hung) before it is dead-lettered as poison",
    )
    notification_consumer_idle_timeout: float = Field(
        3600.0,
        gt=NOTIFICATION_LEASE_TIMEOUT,
        description="seconds a Redis router consumer "
        "holding nothing may be idle before it is deleted; over the "
        f"{NOTIFICATION_LEASE_TIMEOUT:g} s lease timeout",
    )
    apns_key_file: Path | None = Field(None, description="APNs .p8 token-signing key (ES256)")
    apns_key_id: str | None = Field(None, description="APNs key id (kid)")
    apns_team_id: str | None = Field(None, description="Apple team id (iss)")
    apns_topic: str | None = Field(None, description="the app's bundle id (apns-topic)")
    apns_endpoint: str = Field("https://api.push.apple.com", description="APNs base URL")
    fcm_service_account: Path | None = Field(None, description="FCM service-account JSON key")
    fcm_endpoint: str = Field("https://fcm.googleapis.com", description="FCM base URL")
    push_ca_bundle: Path | None = Field(None, description="CA bundle for push endpoints")
    push_webhook_url: str | None = Field(
        None, description="POST pushes here for platforms with no provider configured"
    )
    push_timeout: float = Field(10.0, gt=0, description="seconds per push request")
    push_credentials_cooldown: float = Field(
        300.0,
        ge=1,
        description="seconds a push adapter's breaker stays open after the "
        "provider rejected our credentials (nothing is sent meanwhile but one probe after)",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="log level of every logger (debug adds per-connection lines)"
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="log lines: text, or json (one object per line: ts, level, logger, "
        "message, exc_info)",
    )
    gc_freeze_interval: float | None = Field(
        1.0,
        ge=0.1,
        description="seconds between collect-and-freeze of long-lived objects "
        "(keeps full GC pauses short); empty: only at start-up",
    )
    gc_full_interval: float | None = Field(
        3600.0,
        ge=1,
        description="seconds between full collections of everything, frozen "
        "included (frees cycles that died after being frozen); empty: never",
    )
    log_interval: float = Field(
        10.0, gt=0, description="seconds between log lines about one bad client"
    )
    # The door (section 11): what a client may hold before it is refused.
    max_head_bytes: int = Field(
        16 * 1024, ge=1024, description="largest HTTP request head (431 beyond, then close)"
    )
    head_timeout: float = Field(
        10.0, gt=0, description="seconds for a request head to arrive whole after its first byte"
    )
    keepalive_timeout: float = Field(
        5.0, gt=0, description="seconds an idle HTTP connection (keep-alive or new) is kept"
    )
    max_connections_per_ip: int = Field(
        1000, ge=1, description="open connections per client address (429 beyond)"
    )
    connect_rate_per_ip: float = Field(
        100.0, gt=0, description="new connections per second per client address, burst 10x"
    )
    max_connects_in_progress: int = Field(
        256,
        ge=0,
        description="authenticated connects this node answers at once; beyond, a connect is "
        "answered unavailable with retry_after, and closed; 0: no bound",
    )
    max_logins_in_progress: int = Field(
        64,
        ge=0,
        description="WebSocket logins (handshake to connect answered) this node works on at "
        "once; the rest wait, not read, in arrival order; 0: no bound",
    )
    max_logins_waiting: int = Field(
        16384,
        ge=1,
        description="handshakes waiting for a login place; beyond, refused 503 with Retry-After",
    )
    login_lease: float = Field(
        2.0,
        gt=0,
        description="seconds a login holds its place at most (a client that never sends "
        "connect goes on outside the bound after this)",
    )
    trusted_proxies: CsvList = Field(
        [],
        description="addresses or CIDRs of proxies whose X-Forwarded-For names the client, "
        "comma-separated; unset: the peer address is the client",
    )
    allowed_origins: CsvList = Field(
        [],
        description="Origin values a handshake may carry (* wildcards), comma-separated; "
        "unset: any",
    )

    @field_validator(
        "jwt_secret",
        "admin_token",
        "redis_url",
        "redis_sentinel_master",
        "redis_password",
        "gc_freeze_interval",
        "gc_full_interval",
        "metrics_port",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str | None) -> str | None:
        """Refuses what the broker could not parse, without quoting it (it may hold a password)."""
        if value is None:
            return value
        if not value.startswith(REDIS_SCHEMES):
            raise ValueError("must start with redis:// , rediss:// or unix://")
        from redis.asyncio.connection import parse_url

        try:
            options = parse_url(value)
            int(options.get("port", 6379))
        except (ValueError, TypeError):
            raise ValueError(
                "not a valid Redis URL (redis://[user:password@]host[:port][/db])"
            ) from None
        return value

    @field_validator(
        "jwt_audiences",
        "api_keys",
        "blocked_users",
        "trusted_proxies",
        "allowed_origins",
        "redis_sentinels",
        "redis_cluster_nodes",
        mode="before",
    )
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"not an address or CIDR: {entry!r}") from None
        return value

    @field_validator("redis_sentinels", "redis_cluster_nodes")
    @classmethod
    def _host_ports(cls, value: list[str]) -> list[str]:
        for item in value:
            _host_port(item)
        return value

    @model_validator(mode="after")
    def _one_way_to_redis(self) -> Settings:
        ways = [
            name
            for name, given in (
                ("REALTIME_REDIS_URL", self.redis_url),
                ("REALTIME_REDIS_SENTINELS", self.redis_sentinels),
                ("REALTIME_REDIS_CLUSTER_NODES", self.redis_cluster_nodes),
            )
            if given
        ]
        if len(ways) > 1:
            raise ValueError(f"set one way to Redis, not {' and '.join(ways)}")
        if self.redis_sentinels and not self.redis_sentinel_master:
            raise ValueError("REALTIME_REDIS_SENTINELS needs REALTIME_REDIS_SENTINEL_MASTER")
        if self.redis_sentinel_master and not self.redis_sentinels:
            raise ValueError("REALTIME_REDIS_SENTINEL_MASTER needs REALTIME_REDIS_SENTINELS")
        return self

    @property
    def uses_redis(self) -> bool:
        """Redis is configured (a URL, sentinels or a cluster): else in-process broker and
        stores."""
        return bool(self.redis_url or self.redis_sentinels or self.redis_cluster_nodes)

    @property
    def redis_target(self) -> RedisTarget:
        """Where Redis is (``uses_redis`` must be true)."""
        from realtime.redis_client import RedisTarget

        password = self.redis_password.get_secret_value() if self.redis_password else None
        if self.redis_url:
            return RedisTarget(url=self.redis_url, password=password)
        if self.redis_cluster_nodes:
            return RedisTarget(
                cluster=tuple(_host_port(item) for item in self.redis_cluster_nodes),
                password=password,
            )
        assert self.redis_sentinels and self.redis_sentinel_master
        return RedisTarget(
            sentinels=tuple(_host_port(item) for item in self.redis_sentinels),
            master=self.redis_sentinel_master,
            password=password,
        )

    @model_validator(mode="after")
    def _dev_mode_on_loopback_only(self) -> Settings:
        if self.dev_mode and not _is_loopback(self.host):
            raise ValueError(
                "REALTIME_HOST: dev mode (no REALTIME_JWT_SECRET / REALTIME_JWT_PUBLIC_KEY or no "
                "REALTIME_API_KEYS) is refused on a non-loopback host "
                f"({self.host!r}); configure a secret and API keys"
            )
        if self.jwt_secret is not None and len(self.jwt_secret.encode()) < 32:
            raise ValueError("REALTIME_JWT_SECRET: must be at least 32 bytes (RFC 7518 for HS256)")
        if self.workers > 1 and not self.uses_redis:
            raise ValueError("REALTIME_WORKERS: more than 1 needs REALTIME_REDIS_URL")
        if self.reuse_port and not hasattr(socket, "SO_REUSEPORT"):
            raise ValueError("REALTIME_REUSE_PORT: this platform has no SO_REUSEPORT")
        if self.reuse_port and self.workers > 1:
            raise ValueError(
                "REALTIME_REUSE_PORT: needs REALTIME_WORKERS=1 (workers share one socket); "
                "run several `realtime serve --reuse-port` processes instead"
            )
        if self.metrics_port is not None and self.workers > 1:
            raise ValueError(
                "REALTIME_METRICS_PORT: needs REALTIME_WORKERS=1 (workers would all bind it); "
                "run several `realtime serve --reuse-port --metrics-port N` processes instead"
            )
        return self

    @property
    def apns_configured(self) -> bool:
        return bool(
            self.apns_key_file and self.apns_key_id and self.apns_team_id and self.apns_topic
        )

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

    @property
    def effective_admin_token(self) -> str | None:
        """The dashboard's password: the configured one, in dev mode the dev one, else None."""
        if self.admin_token:
            return self.admin_token
        return DEV_ADMIN_TOKEN if self.dev_mode else None


def _host_port(item: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{item!r} is not host:port")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
