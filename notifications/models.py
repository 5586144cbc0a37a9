"""Notification values: what is accepted, where it goes, how an attempt ended."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Priority(str, Enum):
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


class Platform(str, Enum):
    IOS = "ios"
    ANDROID = "android"


DEFAULT_TTL = 86_400
MAX_TTL = 2_419_200


@dataclass(frozen=True, slots=True)
class Notification:
    """An accepted notification. ``created_at`` is unix seconds; it expires at ``created_at + ttl``."""

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


class Outcome(str, Enum):
    """How one push attempt to one device ended."""

    DELIVERED = "delivered"
    RETRY = "retry"  # transient: try again later (honour retry_after)
    DEAD_TOKEN = "dead_token"  # the token is gone: remove the device, do not retry
    REJECTED = "rejected"  # permanent for this notification (payload too large, bad request)


@dataclass(frozen=True, slots=True)
class PushResult:
    """The result of one push attempt.

    ``breaker_failure`` is True only for what says the provider is unwell
    (transport errors, time-outs, 5xx); a dead token or a 4xx is not.
    """

    outcome: Outcome
    status: int | None = None
    reason: str = ""
    retry_after: float | None = None
    breaker_failure: bool = False
