"""``MemoryNotificationStore``: the NotificationStore (store.py) in the process, not durable."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from notifications.models import (
    PRIORITIES,
    DeadLetter,
    DeliveryState,
    Device,
    Notification,
    Platform,
    Priority,
    device_key,
)
from notifications.store import (
    DEFAULT_LEASE_TIMEOUT,
    DEFAULT_MAX_DEAD_LETTERS,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_DEVICES_PER_USER,
    DeadLetterHook,
    Enqueued,
    Lease,
    check_max_deliveries,
    poison_letter,
    queue_full,
    report_dead_letter,
)

__all__ = ["MemoryNotificationStore"]


@dataclass(slots=True)
class _Entry:
    ref: str
    notification: Notification
    state: dict[str, Any]
    leases: int = 0  # times handed out by claim; settled entries are gone


@dataclass(slots=True)
class _Held:
    entry: _Entry
    consumer: str
    touched: float


@dataclass(slots=True)
class _Lane:
    """One priority: waiting entries (FIFO), leased entries and delayed ones (heap by due)."""

    ready: deque[_Entry] = field(default_factory=deque)
    held: dict[str, _Held] = field(default_factory=dict)
    delayed: list[tuple[float, int, _Entry]] = field(default_factory=list)

    def depth(self) -> int:
        return len(self.ready) + len(self.held) + len(self.delayed)


class MemoryNotificationStore:
    """The in-process store for one node without Redis. NOT durable: a restart loses it all.

    Bounds: ``max_depth`` per priority (``QueueUnavailable("full")`` beyond),
    ``max_devices_per_user`` (the least recently registered is evicted),
    ``max_dead_letters`` (the oldest is dropped), ``max_deliveries`` leases of one entry
    (then it is dead-lettered as poison). Idempotency keys live for their window.
    ``clock`` measures lease idleness and must be the clock of the ``now`` given to
    ``claim`` and of ``retry_at`` (unix time by default, like the router's). Entries are
    objects, never undecodable; there are no consumers to remove. ``on_dead_letter``: see
    store.py's module docstring.
    """

    def __init__(
        self,
        *,
        max_depth: int = DEFAULT_MAX_DEPTH,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
        max_dead_letters: int = DEFAULT_MAX_DEAD_LETTERS,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        clock: Callable[[], float] = time.time,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        check_max_deliveries(max_deliveries)
        self._max_depth = max_depth
        self._lease_timeout = lease_timeout
        self._max_deliveries = max_deliveries
        self._on_dead_letter = on_dead_letter
        self._max_devices = max_devices_per_user
        self._clock = clock
        self._lanes = {p: _Lane() for p in PRIORITIES}
        self._refs = itertools.count(1)
        self._idem: dict[str, float] = {}
        self._idem_expiry: list[tuple[float, str]] = []
        self._devices: dict[str, OrderedDict[str, Device]] = {}
        self._owners: dict[str, str] = {}
        self._dead: deque[DeadLetter] = deque(maxlen=max_dead_letters)
        self._wakeup = asyncio.Event()

    @property
    def lease_timeout(self) -> float:
        return self._lease_timeout

    async def enqueue(
        self, notification: Notification, *, idempotency_window: float | None = None
    ) -> Enqueued:
        now = self._clock()
        self._expire_idempotency(now)
        if idempotency_window is not None and notification.id in self._idem:
            return Enqueued(notification.id, created=False)
        lane = self._lanes[notification.priority]
        if lane.depth() >= self._max_depth:
            raise queue_full(notification.priority, lane.depth(), self._max_depth)
        lane.ready.append(self._entry(notification, DeliveryState().to_map()))
        if idempotency_window is not None:
            self._idem[notification.id] = now + idempotency_window
            heapq.heappush(self._idem_expiry, (now + idempotency_window, notification.id))
        self._wakeup.set()
        return Enqueued(notification.id, created=True)

    def _entry(self, notification: Notification, state: dict[str, Any]) -> _Entry:
        return _Entry(str(next(self._refs)), notification, state)

    def _expire_idempotency(self, now: float) -> None:
        while self._idem_expiry and self._idem_expiry[0][0] <= now:
            expiry, key = heapq.heappop(self._idem_expiry)
            if self._idem.get(key) == expiry:
                del self._idem[key]

    async def claim(self, consumer: str, now: float) -> Lease | None:
        for lane in self._lanes.values():
            while lane.delayed and lane.delayed[0][0] <= now:
                lane.ready.append(heapq.heappop(lane.delayed)[2])
        idle_since = self._clock() - self._lease_timeout
        for lane in self._lanes.values():
            for ref, held in list(lane.held.items()):  # a copy: poison is deleted on the way
                if held.touched > idle_since:
                    continue
                if held.entry.leases >= self._max_deliveries:
                    del lane.held[ref]
                    letter = poison_letter(
                        held.entry.notification, held.entry.leases, self._clock()
                    )
                    self._dead.append(letter)
                    report_dead_letter(letter, self._on_dead_letter)
                    continue
                return self._hand_out(lane, held.entry, consumer, reclaimed=True)
            if lane.ready:
                return self._hand_out(lane, lane.ready.popleft(), consumer, reclaimed=False)
        self._wakeup.clear()
        return None

    def _hand_out(self, lane: _Lane, entry: _Entry, consumer: str, *, reclaimed: bool) -> Lease:
        entry.leases += 1
        lane.held[entry.ref] = _Held(entry, consumer, self._clock())
        state = DeliveryState.from_map(entry.state)
        return Lease(entry.ref, consumer, entry.notification, state, reclaimed)

    def _held(self, lease: Lease) -> _Held | None:
        held = self._lanes[lease.notification.priority].held.get(lease.ref)
        return held if held is not None and held.consumer == lease.consumer else None

    async def touch(self, lease: Lease) -> bool:
        held = self._held(lease)
        if held is None:
            return False
        held.touched = self._clock()
        return True

    async def settle(
        self,
        lease: Lease,
        *,
        state: DeliveryState,
        retry_at: float | None = None,
        dead_letters: Sequence[DeadLetter] = (),
    ) -> bool:
        if self._held(lease) is None:
            return False
        lane = self._lanes[lease.notification.priority]
        del lane.held[lease.ref]
        self._dead.extend(dead_letters)
        if retry_at is not None:
            entry = self._entry(lease.notification, state.to_map())
            heapq.heappush(lane.delayed, (retry_at, int(entry.ref), entry))
            self._wakeup.set()
        return True

    async def wait(self, max_wait: float) -> None:
        timeout = max_wait
        dues = [lane.delayed[0][0] for lane in self._lanes.values() if lane.delayed]
        if dues:
            timeout = min(timeout, max(0.0, min(dues) - self._clock()))
        held = [h.touched for lane in self._lanes.values() for h in lane.held.values()]
        if held:
            timeout = min(timeout, max(0.0, min(held) + self._lease_timeout - self._clock()))
        if timeout <= 0:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):  # not wait_for: it can swallow a cancel on 3.11
                await self._wakeup.wait()

    async def depth(self) -> dict[Priority, int]:
        return {p: lane.depth() for p, lane in self._lanes.items()}

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return list(itertools.islice(reversed(self._dead), max(0, limit)))

    async def add_device(self, device: Device) -> None:
        await self.remove_device(device.platform, device.token)
        devices = self._devices.setdefault(device.user, OrderedDict())
        devices[device.key] = device
        self._owners[device.key] = device.user
        while len(devices) > self._max_devices:
            evicted, _ = devices.popitem(last=False)
            del self._owners[evicted]

    async def remove_device(self, platform: Platform, token: str) -> bool:
        key = device_key(platform, token)
        user = self._owners.pop(key, None)
        if user is None:
            return False
        devices = self._devices[user]
        del devices[key]
        if not devices:
            del self._devices[user]
        return True

    async def devices(self, user: str) -> list[Device]:
        return list(self._devices.get(user, {}).values())

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._wakeup.set()
