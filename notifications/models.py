"""Notification values: what is accepted, where it goes, how an attempt ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Priority(StrEnum):
    """Notification priority; ``rank`` orders delivery (0 goes first)."""

    CRITICAL = "critical"
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Priority.CRITICAL: 0, Priority.HIGH: 1, Priority.NORMAL: 2, Priority.LOW: 3}
#: Priorities from the highest to the lowest.
PRIORITIES: tuple[Priority, ...] = tuple(sorted(Priority, key=lambda p: p.rank))


class Platform(StrEnum):
    IOS = "ios"
    ANDROID = "android"


DEFAULT_TTL = 86_400
MAX_TTL = 2_419_200


@dataclass(frozen=True, slots=True)
class Notification:
    """An accepted notification.

    ``created_at`` is unix seconds; it expires at ``created_at + ttl``.
    """

    id: str
    user: str
    priority: Priority
    title: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)
    collapse_id: str | None = None
    ttl: int = DEFAULT_TTL
    created_at: float = field(default_factory=time.time)

    @property
    def expires_at(self) -> float:
        return self.created_at + self.ttl

    def to_map(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "priority": self.priority.value,
            "title": self.title,
            "body": self.body,
            "data": self.data,
            "collapse_id": self.collapse_id,
            "ttl": self.ttl,
            "created_at": self.created_at,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> Notification:
        return cls(
            id=str(m["id"]),
            user=str(m["user"]),
            priority=Priority(m["priority"]),
            title=str(m["title"]),
            body=str(m["body"]),
            data=dict(m.get("data") or {}),
            collapse_id=m.get("collapse_id"),
            ttl=int(m.get("ttl", DEFAULT_TTL)),
            created_at=float(m["created_at"]),
        )


@dataclass(frozen=True, slots=True)
class Device:
    user: str
    platform: Platform
    token: str

    @property
    def key(self) -> str:
        """``<platform>:<token>``: names the device in a DeliveryState and in the registry."""
        return device_key(self.platform, self.token)


def device_key(platform: Platform, token: str) -> str:
    return f"{platform.value}:{token}"


def parse_device_key(key: str) -> tuple[Platform, str]:
    """The inverse of ``device_key``; raises ValueError for anything else."""
    platform, sep, token = key.partition(":")
    if not sep or not token:
        raise ValueError(f"not a device key: {key!r}")
    return Platform(platform), token


class Outcome(StrEnum):
    """How one push attempt to one device ended."""

    DELIVERED = "delivered"
    RETRY = "retry"  # transient: try again later (honour retry_after)
    DEAD_TOKEN = "dead_token"  # the token is gone: remove the device, do not retry
    REJECTED = "rejected"  # permanent for this notification (payload too large, bad request)
    #: The provider refused our credentials (a revoked or wrong key, account or team): no
    #: notification can succeed until they change, so the adapter is unavailable, not this push.
    CREDENTIALS_REJECTED = "credentials_rejected"


@dataclass(frozen=True, slots=True)
class PushResult:
    """The result of one push attempt.

    ``breaker_failure`` is True only for what says the provider is unwell
    (transport errors, time-outs, 5xx); a dead token or a 4xx is not. For
    ``CREDENTIALS_REJECTED``, ``status`` and ``reason`` are the provider's answer.
    """

    outcome: Outcome
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None
    breaker_failure: bool = False


#: DeliveryState / DeadLetter target of the in-app delivery (``deliver_in_app``).
IN_APP = "in_app"
#: DeliveryState / DeadLetter target of finding where to push (tier rule and device lookup).
ROUTE = "route"


@dataclass(slots=True)
class DeliveryState:
    """Progress of one queued notification, persisted with it between delivery rounds.

    Targets are ``IN_APP``, ``ROUTE`` and device keys. ``done`` maps a target to its
    final outcome (``delivered``, ``dead_token``, ``rejected``, ``failed``, ``skipped``):
    a done target is never tried again. ``attempts`` counts failed attempts per target
    (a wait for an open breaker is not an attempt). ``rounds`` counts rounds started.
    """

    rounds: int = 0
    attempts: dict[str, int] = field(default_factory=dict)
    done: dict[str, str] = field(default_factory=dict)

    def to_map(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "attempts": dict(self.attempts), "done": dict(self.done)}

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> DeliveryState:
        return cls(
            rounds=int(m.get("rounds", 0)),
            attempts={str(k): int(v) for k, v in (m.get("attempts") or {}).items()},
            done={str(k): str(v) for k, v in (m.get("done") or {}).items()},
        )


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A notification that could not reach one target, kept for an operator.

    ``target`` is ``IN_APP``, ``ROUTE``, a device key or ``notifications.store.STORE`` (an
    entry the store gave up on: poison or undecodable); ``adapter`` is the push adapter's name
    (``in_app`` / ``route`` / ``store`` for those targets); ``at`` is unix seconds.
    """

    notification: Notification
    target: str
    adapter: str
    reason: str
    attempts: int
    at: float
    status: int | None = None

    def to_map(self) -> dict[str, Any]:
        return {
            "notification": self.notification.to_map(),
            "target": self.target,
            "adapter": self.adapter,
            "reason": self.reason,
            "attempts": self.attempts,
            "at": self.at,
            "status": self.status,
        }

    @classmethod
    def from_map(cls, m: dict[str, Any]) -> DeadLetter:
        status = m.get("status")
        return cls(
            notification=Notification.from_map(m["notification"]),
            target=str(m["target"]),
            adapter=str(m["adapter"]),
            reason=str(m["reason"]),
            attempts=int(m["attempts"]),
            at=float(m["at"]),
            status=None if status is None else int(status),
        )
