"""The scenario: every knob of a run, validated before anything starts.

A scenario comes from defaults, then an optional file (TOML, JSON, or YAML
when PyYAML is installed), then command-line flags; ``load_scenario`` merges
them and returns a ``Scenario`` or a ``ConfigError`` listing every problem.
Only 127.0.0.0/8 targets and source addresses are accepted.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from loadtest.thresholds import Threshold, parse_threshold

DEV_JWT_SECRET: Final = "piggybong-dev-secret-do-not-use-in-production"
DEV_API_KEY: Final = "dev-api-key"
WS_PATH: Final = "/v1/ws"

_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*")
_DURATION_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> object:
    """Seconds from a number or a string like ``500ms``, ``30s``, ``2m``, ``1h``."""
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (use e.g. 500ms, 30s, 2m, 1h)")
        return float(match[1]) * _DURATION_UNITS[match[2]]
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration)]


def loopback_ipv4(host: str) -> str | None:
    """The address for a host in 127.0.0.0/8 (``localhost`` is 127.0.0.1), else None."""
    if host == "localhost":
        return "127.0.0.1"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr.version == 4 and addr in ipaddress.ip_network("127.0.0.0/8"):
        return str(addr)
    return None


class Stage(BaseModel):
    """Ramp the open connections (and optionally the event rate) linearly to a target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    duration: Seconds = Field(gt=0)
    clients: int = Field(ge=0)
    event_rate: float | None = Field(default=None, ge=0)


def parse_stage(value: object) -> object:
    """``"30s:1000"`` or ``"30s:1000:50"`` (duration:clients[:event_rate]) as a Stage map."""
    if not isinstance(value, str):
        return value
    parts = value.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"stage {value!r}: expected duration:clients[:event_rate]")
    out: dict[str, object] = {"duration": parts[0], "clients": parts[1]}
    if len(parts) == 3:
        out["event_rate"] = parts[2]
    return out


class Scenario(BaseModel):
    """A load-test run. Rates are per second for the whole run, across all workers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scenario: Literal["mixed", "broadcast", "drops", "node-kill", "redis-freeze", "redis-kill"] = (
        "mixed"
    )
    target: str = "http://127.0.0.1:8000"

    # clients
    clients: int = Field(default=100, ge=1, le=1_000_000)
    connect_rate: float = Field(
        default=500.0, gt=0, description="new connections per second, at most"
    )
    connect_timeout: Seconds = Field(default=10.0, gt=0)
    max_handshakes: int = Field(default=256, ge=1, description="connection attempts in flight")
    paid_fraction: float = Field(default=0.2, ge=0, le=1)
    msgpack_fraction: float = Field(default=0.3, ge=0, le=1)
    artists: int = Field(default=20, ge=1, le=100_000, description="artist channels in play")
    artists_per_client: int = Field(default=3, ge=0, le=199)
    stages: list[Annotated[Stage, BeforeValidator(parse_stage)]] = []

    # publishers
    event_rate: float = Field(default=20.0, ge=0, description="artist events per second")
    spending_rate: float = Field(default=5.0, ge=0, description="spending events per second")
    notification_rate: float = Field(default=1.0, ge=0, description="notifications per second")
    premium_fraction: float = Field(default=0.1, ge=0, le=1, description="share of market.* events")
    premium_prefix: str = "market."
    payload_bytes: int = Field(default=150, ge=0, le=60_000, description="approximate data size")
    publish_lanes: int = Field(default=4, ge=1, le=256, description="concurrent HTTP connections")
    publish_batch: int = Field(default=1, ge=1, le=1000, description="events per POST at most")
    publish_queue: int = Field(default=10_000, ge=1, description="pending sends per lane at most")
    request_timeout: Seconds = Field(default=10.0, gt=0)

    # timing
    duration: Seconds = Field(default=30.0, gt=0, description="publishing time when no stages")
    drain: Seconds = Field(default=3.0, ge=0, description="wait after the last publish")
    token_ttl: Seconds | None = Field(
        default=None, gt=0, description="default: run length + 10 min"
    )

    # processes and addresses
    workers: int | Literal["auto"] = "auto"
    source_addresses: list[str] = []
    cpus: list[int] = Field(default=[], description="pin the harness's processes to these CPUs")

    # credentials
    jwt_secret: str = DEV_JWT_SECRET
    audience: str | None = "authenticated"
    api_key: str = DEV_API_KEY

    # reconnect scenarios (loadtest/recovery.py): the harness runs its own nodes and Redis
    fault_at: Seconds = Field(default=5.0, ge=0, description="fault time into publishing")
    fault_length: Seconds | None = Field(
        default=None, ge=0, description="freeze or downtime; default per fault"
    )
    drops_per_s: float = Field(default=5.0, gt=0, description="sockets dropped per second")
    backend: Literal["redis", "memory"] = Field(
        default="redis", description="drops: two nodes on Redis, or one in-process node"
    )

    # measurement and output
    thresholds: list[str] = []
    default_thresholds: bool = True
    server_pid: list[int] | Literal["auto"] | None = None
    server_metrics: bool = True
    sample_interval: Seconds = Field(default=1.0, ge=0.1, le=60)
    seed: int = 1
    out: Path | None = None
    html: Path | None = None
    progress: Literal["auto", "line", "off"] = "auto"

    @field_validator("target")
    @classmethod
    def _loopback_target(cls, value: str) -> str:
        parts = urlsplit(value if "://" in value else "http://" + value)
        if parts.scheme not in ("http", "ws"):
            raise ValueError(f"target scheme must be http or ws, not {parts.scheme!r}")
        host = parts.hostname or ""
        if loopback_ipv4(host) is None:
            raise ValueError(
                f"target host {host!r} refused: only 127.0.0.0/8 (or localhost) may be load-tested"
            )
        if parts.path not in ("", "/"):
            raise ValueError("target is the server's base URL, without a path")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ValueError(f"target port: {exc}") from None
        return f"http://{host}:{port}"

    @field_validator("source_addresses")
    @classmethod
    def _loopback_sources(cls, value: list[str]) -> list[str]:
        out = []
        for host in value:
            addr = loopback_ipv4(host)
            if addr is None:
                raise ValueError(f"source address {host!r} is not in 127.0.0.0/8")
            out.append(addr)
        if len(set(out)) != len(out):
            raise ValueError("source addresses repeat")
        return out

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpu_list(cls, value: object) -> object:
        """``"1"`` or ``"0,1"`` (flags) or a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("cpus")
    @classmethod
    def _cpus_exist(cls, value: list[int]) -> list[int]:
        available = os.sched_getaffinity(0)
        missing = sorted(set(value) - available)
        if missing:
            raise ValueError(f"CPUs {missing} are not available (have {sorted(available)})")
        return value

    @field_validator("thresholds")
    @classmethod
    def _thresholds_parse(cls, value: list[str]) -> list[str]:
        problems = [str(t) for t in map(parse_threshold, value) if not isinstance(t, Threshold)]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("thresholds", mode="before")
    @classmethod
    def _thresholds_map(cls, value: object) -> object:
        """A map ``{metric: "<150"}`` (config files) or a list of expressions."""
        if isinstance(value, Mapping):
            return [f"{metric}{cond}" for metric, cond in value.items()]
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("workers")
    @classmethod
    def _workers_range(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 64:
            raise ValueError("workers must be 0 (in this process) to 64, or 'auto'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        if self.stages:
            peak = max(stage.clients for stage in self.stages)
            if peak == 0:
                raise ValueError("stages never open a connection (every target is 0)")
            if "clients" in self.model_fields_set and self.clients < peak:
                raise ValueError(f"clients ({self.clients}) is below the stages' peak ({peak})")
        if self.scenario != "broadcast" and self.artists_per_client > self.artists:
            raise ValueError(
                f"artists_per_client ({self.artists_per_client}) exceeds artists ({self.artists})"
            )
        return self

    # ----------------------------------------------------------------- derived values

    @property
    def host(self) -> str:
        return urlsplit(self.target).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        return urlsplit(self.target).port or 80

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{WS_PATH}"

    @property
    def peak_clients(self) -> int:
        return max(stage.clients for stage in self.stages) if self.stages else self.clients

    @property
    def ramp_seconds(self) -> float:
        """Time to open every client at the connect rate (no stages)."""
        return self.clients / self.connect_rate

    @property
    def stage_seconds(self) -> float:
        return sum(stage.duration for stage in self.stages)

    @property
    def effective_token_ttl(self) -> float:
        if self.token_ttl is not None:
            return self.token_ttl
        run = self.stage_seconds if self.stages else self.ramp_seconds + self.duration
        return run + self.drain + 600.0

    @property
    def threshold_list(self) -> list[Threshold]:
        return [t for t in map(parse_threshold, self.thresholds) if isinstance(t, Threshold)]

    @property
    def artist_channels(self) -> int:
        return 1 if self.scenario == "broadcast" else self.artists

    def target_at(self, elapsed: float) -> int:
        """Connections that should be open ``elapsed`` seconds into the run."""
        if not self.stages:
            return self.clients
        previous = 0
        for stage in self.stages:
            if elapsed < stage.duration:
                frac = max(elapsed, 0.0) / stage.duration
                return round(previous + (stage.clients - previous) * frac)
            elapsed -= stage.duration
            previous = stage.clients
        return previous

    def event_rate_at(self, elapsed: float) -> float:
        """Artist events per second ``elapsed`` seconds into publishing."""
        if not self.stages:
            return self.event_rate
        previous = self.event_rate
        for stage in self.stages:
            goal = self.event_rate if stage.event_rate is None else stage.event_rate
            if elapsed < stage.duration:
                return previous + (goal - previous) * max(elapsed, 0.0) / stage.duration
            elapsed -= stage.duration
            previous = goal
        return previous


def broadcast_preset(values: dict[str, Any]) -> dict[str, Any]:
    """The benchmark shape: every client on one artist channel, only artist events."""
    out = dict(values)
    out.setdefault("artists", 1)
    out.setdefault("artists_per_client", 1)
    out.setdefault("spending_rate", 0.0)
    out.setdefault("notification_rate", 0.0)
    out.setdefault("premium_fraction", 0.0)
    # one channel is one ordered lane: let a backlog go as one request
    out.setdefault("publish_batch", 20)
    for key, want in (("artists", 1), ("artists_per_client", 1)):
        if out[key] != want:
            raise ValueError(f"the broadcast scenario uses {key}={want}, not {out[key]}")
    return out


@dataclass(frozen=True, slots=True)
class ConfigError:
    """A scenario that cannot run, with every problem found (one per line)."""

    problems: list[str]

    def __str__(self) -> str:
        return "invalid scenario:\n" + "\n".join(f"  - {p}" for p in self.problems)


def read_file(path: Path) -> dict[str, Any] | ConfigError:
    """A scenario file's map: ``.toml``, ``.json``, ``.yaml``/``.yml`` (PyYAML needed)."""
    try:
        text = path.read_text()
    except OSError as exc:
        return ConfigError([f"{path}: {exc.strerror or exc}"])
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            data: object = tomllib.loads(text)
        elif suffix == ".json":
            data = json.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml  # type: ignore[import-untyped]
            except ImportError:
                return ConfigError([f"{path}: YAML needs PyYAML (pip install pyyaml); or use TOML"])
            data = yaml.safe_load(text)
        else:
            return ConfigError([f"{path}: unknown scenario format (use .toml, .json or .yaml)"])
    except Exception as exc:  # each parser raises its own error type
        return ConfigError([f"{path}: {exc}"])
    if not isinstance(data, dict):
        return ConfigError([f"{path}: the top level must be a map of settings"])
    return data


def load_scenario(
    file: Path | None = None, overrides: Mapping[str, Any] | None = None
) -> Scenario | ConfigError:
    """Defaults, then ``file``, then ``overrides`` (flags; None values are ignored)."""
    values: dict[str, Any] = {}
    if file is not None:
        data = read_file(file)
        if isinstance(data, ConfigError):
            return data
        values.update(data)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        if values.get("scenario") == "broadcast":
            values = broadcast_preset(values)
        return Scenario.model_validate(values)
    except ValidationError as exc:
        return ConfigError([_describe(err) for err in exc.errors()])
    except ValueError as exc:
        return ConfigError([str(exc)])


def _describe(err: Mapping[str, Any]) -> str:
    where = ".".join(str(part) for part in err.get("loc", ()))
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def auto_workers(scenario: Scenario) -> int:
    """0 (drive clients in this process) up to 1,000 clients, else one process per 10,000."""
    if scenario.workers != "auto":
        return scenario.workers
    if scenario.peak_clients <= 1000:
        return 0
    return math.ceil(scenario.peak_clients / 10_000)
