"""The notification store: a durable priority queue with leases, devices and dead letters.

The ``NotificationStore`` Protocol (its contract in its docstring), its error
``QueueUnavailable``, its value types and what both implementations share.
``MemoryNotificationStore`` (memory_store.py) keeps everything in the process (not durable:
a restart loses the queue, the devices and the dead letters); ``RedisNotificationStore``
(redis_store.py) keeps it in Redis (the keys and the Lua scripts of notifications/lua/ are
described there).

Poison entries: an entry leased ``max_deliveries`` times without being settled (each holder
crashed, hung or was cancelled before settling) is not leased again; the claim that meets it
moves it to the dead letters. So is an entry that does not decode as a notification. On Redis
the count is the stream's delivery counter (XREADGROUP sets 1, each XAUTOCLAIM adds 1; the
``touch`` XCLAIM is JUSTID and adds nothing); the claim script hands the entry to the claimer,
then the settle script acks it with its dead letter (a crash in between leaves it pending to
the claimer: reclaimed, and dead-lettered, by a later claim). Each such letter is logged at
WARNING once it is stored, and both stores take an optional ``on_dead_letter``
(``DeadLetterHook``), called with it then (the app counts them in the dead-letter metric); it
must not raise.

Dead consumers: a consumer of the group idle for ``consumer_idle_timeout`` and holding no
pending entry is deleted (XGROUP DELCONSUMER) by a claim, at most every
``consumer_idle_timeout / 2`` seconds; one with pending entries never is (the reclaim takes
those over first). This housekeeping never fails a claim: an error is logged and the next
attempt waits for the next interval.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from notifications.models import (
    DeadLetter,
    DeliveryState,
    Device,
    Notification,
    Platform,
    Priority,
)

DEFAULT_MAX_DEPTH = 100_000
DEFAULT_LEASE_TIMEOUT = 30.0
DEFAULT_MAX_DEVICES_PER_USER = 20
DEFAULT_MAX_DEAD_LETTERS = 100_000
#: Leases of one entry without a settle before a claim dead-letters it instead (poison).
DEFAULT_MAX_DELIVERIES = 10
#: Seconds a Redis consumer may be idle, with no pending entry, before it is deleted.
DEFAULT_CONSUMER_IDLE_TIMEOUT = 3600.0
#: ``DeadLetter.target`` and ``adapter`` of an entry the store itself gave up on.
STORE = "store"
#: Called with each dead letter the store itself made (poison, undecodable) once it is stored.
DeadLetterHook = Callable[[DeadLetter], None]
#: An undecodable entry's dead letter keeps its first this many raw items (field names and
#: values alike: 8 pairs), each cut to ``RAW_TEXT_LIMIT`` characters (``data["raw_entry"]`` of
#: its placeholder).
RAW_FIELDS_LIMIT = 16
RAW_TEXT_LIMIT = 1000

#: The logger of both stores (operators filter on ``notifications.store``).
log = logging.getLogger(__name__)


class QueueUnavailable(Exception):
    """The store cannot take or hand out notifications now (HTTP 503).

    ``reason`` is ``"unreachable"`` (the backend failed; whether a notification being
    enqueued was stored is unknown, so the caller retries with the same id) or ``"full"``
    (its priority's queue is at ``limit``; nothing was stored, nothing queued was dropped).
    """

    def __init__(
        self,
        reason: Literal["unreachable", "full"],
        message: str,
        *,
        priority: Priority | None = None,
        depth: int | None = None,
        limit: int | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.priority = priority
        self.depth = depth
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Enqueued:
    """``created`` is False when the id was already accepted within the idempotency window."""

    id: str
    created: bool


@dataclass(frozen=True, slots=True)
class Lease:
    """A queued notification held by one consumer until it is settled.

    ``ref`` is the store's handle; ``state`` is a fresh copy of the persisted progress that the
    holder may change and hand back to ``settle``. ``reclaimed``: taken over from a consumer
    that held it idle for longer than the lease timeout.
    """

    ref: str
    consumer: str
    notification: Notification
    state: DeliveryState
    reclaimed: bool = False


class NotificationStore(Protocol):
    """Queue, devices and dead letters of the notification pipeline.

    Contract (tests/test_notification_store.py runs it against every implementation):

    - ``enqueue`` stores the notification in its priority's queue and returns once it is
      stored. With ``idempotency_window`` (seconds) the notification id is a caller's id: the
      same id enqueued again within the window is not stored again (``created=False``). At
      ``max_depth`` notifications queued for its priority (waiting, leased or delayed) it
      raises ``QueueUnavailable("full")``; a backend failure raises ``"unreachable"``.
    - ``claim(consumer, now)`` leases the next notification: first retries due at ``now`` move
      back into their queues, then the highest priority wins; within a priority, notifications
      whose holder let its lease sit idle for ``lease_timeout`` seconds are taken over first,
      then the oldest new one. None when nothing is available.
    - Poison: an entry already leased ``max_deliveries`` times without a settle is not leased
      again; the claim that would take it over instead moves it to the dead letters (target and
      adapter ``STORE``, reason ``poison: leased N times ...``, ``attempts`` N) and removes it
      from the queue, and goes on to the next entry. The letter is stored once and the entry
      removed with it (on Redis by the settle that follows the claim: see the module
      docstring). An entry that does not decode as a notification is dead-lettered the same
      way (reason ``undecodable entry <ref> ...``; if even its notification does not decode,
      the letter carries a placeholder: id the entry's ref, the queue's priority, the raw
      fields in ``data["raw_entry"]``). ``claim`` never raises because of an entry's content.
      ``touch`` and a settle with ``retry_at`` (a new entry) do not count as leases.
    - A lease is held until ``settle``; ``touch`` keeps it from being taken over. Both return
      False (and change nothing) when the lease was taken over by another consumer.
    - ``settle(lease, state, retry_at, dead_letters)`` ends the lease atomically: the dead
      letters are stored and, with ``retry_at`` (unix seconds), the notification is queued again
      with ``state`` once that time has come; without it the notification is done and removed.
    - ``wait(max_wait)`` returns when a claim may succeed, or after at most ``max_wait`` seconds.
    - Devices: several per user, at most ``max_devices_per_user`` (registering one more evicts
      the user's least recently registered); a token belongs to one user (registering it for
      another moves it). ``remove_device`` of an unknown device returns False.
    - ``dead_letters(limit)``: newest first. Backend failures raise ``QueueUnavailable``.
    """

    @property
    def lease_timeout(self) -> float: ...

    async def enqueue(
        self, notification: Notification, *, idempotency_window: float | None = None
    ) -> Enqueued: ...

    async def claim(self, consumer: str, now: float) -> Lease | None: ...

    async def touch(self, lease: Lease) -> bool: ...

    async def settle(
        self,
        lease: Lease,
        *,
        state: DeliveryState,
        retry_at: float | None = None,
        dead_letters: Sequence[DeadLetter] = (),
    ) -> bool: ...

    async def wait(self, max_wait: float) -> None: ...

    async def depth(self) -> dict[Priority, int]: ...

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]: ...

    async def add_device(self, device: Device) -> None: ...

    async def remove_device(self, platform: Platform, token: str) -> bool: ...

    async def devices(self, user: str) -> list[Device]: ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- shared by both


def queue_full(priority: Priority, depth: int, limit: int) -> QueueUnavailable:
    """The error of an enqueue refused at ``limit`` (``depth`` queued for ``priority``)."""
    return QueueUnavailable(
        "full",
        f"the {priority.value} notification queue is full ({depth} of {limit})",
        priority=priority,
        depth=depth,
        limit=limit,
    )


def check_max_deliveries(max_deliveries: int) -> None:
    """Refuses a ``max_deliveries`` below 1 (``ValueError``)."""
    if max_deliveries < 1:
        raise ValueError("max_deliveries must be >= 1")


def poison_letter(notification: Notification, leases: int, at: float) -> DeadLetter:
    """The dead letter of an entry leased ``leases`` times that no holder settled."""
    reason = f"poison: leased {leases} times and never settled"
    return DeadLetter(notification, STORE, STORE, reason, leases, at)


def report_dead_letter(letter: DeadLetter, hook: DeadLetterHook | None) -> None:
    """Logs a dead letter the store made, once it is stored, and passes it to ``hook``."""
    log.warning("notification %s dead-lettered: %s", letter.notification.id, letter.reason)
    if hook is not None:
        hook(letter)
