"""The notification store: a durable priority queue with leases, devices and dead letters.

``MemoryNotificationStore`` keeps everything in the process (not durable: a restart loses
the queue, the devices and the dead letters). ``RedisNotificationStore`` keeps it in Redis
under a prefix (default ``rt:notif:``):

- ``q:<priority>``        one stream per priority, consumer group ``routers``. An entry holds the
                          notification (``n``) and its DeliveryState (``s``). It is XACKed and
                          XDELed only when settled, so XLEN counts what is still to be done.
- ``delayed:<priority>``  ZSET of entries waiting for a retry or for an open breaker, scored by
                          the unix time they are due; ``claim`` moves due ones back to the stream.
- ``dead``                stream of dead letters (the oldest trimmed beyond about
                          ``max_dead_letters``).
- ``idem:<id>``           caller ids seen within the idempotency window.
- ``devices:<user>``      ZSET of ``<platform>:<token>`` scored by registration time;
  ``device:<platform>:<token>`` names the token's user.

Every move (enqueue with its idempotency key, settle with its retry and dead letters, the
promotion of due retries, the claim, the removal of dead consumers) is one Lua script, so a
crash between two steps cannot lose or duplicate an entry. Dead-lettering a poison or
undecodable entry is two of them, the claim then the settle (see below), and is just as safe:
a crash in between leaves the entry pending, to be dead-lettered by a later claim.
Durability across a Redis restart needs Redis persistence (AOF with ``appendfsync always``
for no loss at all); the scripts assume one Redis (not a cluster).

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

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import RedisError, ResponseError

from notifications.models import (
    PRIORITIES,
    DeadLetter,
    DeliveryState,
    Device,
    Notification,
    Platform,
    Priority,
    device_key,
    parse_device_key,
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


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _full(priority: Priority, depth: int, limit: int) -> QueueUnavailable:
    return QueueUnavailable(
        "full",
        f"the {priority.value} notification queue is full ({depth} of {limit})",
        priority=priority,
        depth=depth,
        limit=limit,
    )


def _check_max_deliveries(max_deliveries: int) -> None:
    if max_deliveries < 1:
        raise ValueError("max_deliveries must be >= 1")


def _poison(notification: Notification, leases: int, at: float) -> DeadLetter:
    """The dead letter of an entry leased ``leases`` times that no holder settled."""
    reason = f"poison: leased {leases} times and never settled"
    return DeadLetter(notification, STORE, STORE, reason, leases, at)


def _stored(letter: DeadLetter, hook: DeadLetterHook | None) -> None:
    """Logs a dead letter the store made, once it is stored, and passes it to ``hook``."""
    log.warning("notification %s dead-lettered: %s", letter.notification.id, letter.reason)
    if hook is not None:
        hook(letter)


# --------------------------------------------------------------------------- memory


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
    the module docstring.
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
        _check_max_deliveries(max_deliveries)
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
            raise _full(notification.priority, lane.depth(), self._max_depth)
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
                    letter = _poison(held.entry.notification, held.entry.leases, self._clock())
                    self._dead.append(letter)
                    _stored(letter, self._on_dead_letter)
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


# --------------------------------------------------------------------------- redis

_ENQUEUE = """
-- KEYS: stream, delayed, idempotency key ('' for none)
-- ARGV: notification, state, max_depth, window_ms, id
if KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then
  return {0, 0}
end
local depth = redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
if depth >= tonumber(ARGV[3]) then
  return {-1, depth}
end
redis.call('XADD', KEYS[1], '*', 'n', ARGV[1], 's', ARGV[2])
if KEYS[3] ~= '' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
end
return {1, depth + 1}
"""

_CLAIM = """
-- KEYS[1..4]: streams, highest priority first; KEYS[5..8]: their delayed sets
-- ARGV: group, consumer, now, min_idle_ms, reclaim ('1' or '0'), promote_limit, 4 cursors
-- Returns {rank, id, fields, reclaimed, cursors, deliveries} or, with nothing to hand out,
-- {0, '', {}, 0, cursors, last ids, next due}. A delayed member that is not
-- [notification, state] goes back as an entry {raw = member}, for the caller to dead-letter.
local group, consumer, now = ARGV[1], ARGV[2], ARGV[3]
for i = 1, 4 do
  local due = redis.call('ZRANGEBYSCORE', KEYS[4 + i], '-inf', now, 'LIMIT', 0, ARGV[6])
  for _, member in ipairs(due) do
    local ok, item = pcall(cjson.decode, member)
    if ok and type(item) == 'table' and type(item[1]) == 'string' and type(item[2]) == 'string' then
      redis.call('XADD', KEYS[i], '*', 'n', item[1], 's', item[2])
    else
      redis.call('XADD', KEYS[i], '*', 'raw', member)
    end
    redis.call('ZREM', KEYS[4 + i], member)
  end
end
local cursors = {ARGV[7], ARGV[8], ARGV[9], ARGV[10]}
for i = 1, 4 do
  if ARGV[5] == '1' then
    local r = redis.call('XAUTOCLAIM', KEYS[i], group, consumer, ARGV[4], cursors[i], 'COUNT', 1)
    cursors[i] = r[1]
    local e = r[2][1]
    if type(e) == 'table' and type(e[2]) == 'table' then
      local p = redis.call('XPENDING', KEYS[i], group, e[1], e[1], 1)
      return {i, e[1], e[2], 1, cursors, p[1][4]}
    end
  end
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', KEYS[i], '>')
  if r then
    local e = r[1][2][1]
    return {i, e[1], e[2], 0, cursors, 1}
  end
end
local last = {}
for i = 1, 4 do
  local info = redis.call('XINFO', 'STREAM', KEYS[i])
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then last[i] = info[j + 1] end
  end
end
local next_due = ''
for i = 1, 4 do
  local first = redis.call('ZRANGE', KEYS[4 + i], 0, 0, 'WITHSCORES')
  if first[2] and (next_due == '' or tonumber(first[2]) < tonumber(next_due)) then
    next_due = first[2]
  end
end
return {0, '', {}, 0, cursors, last, next_due}
"""

_PRUNE = """
-- KEYS: streams; ARGV: group, min_idle_ms. Deletes the group's consumers idle for longer
-- than min_idle_ms that hold no pending entry; returns {stream, consumer, ...} deleted.
local removed = {}
for i = 1, #KEYS do
  local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[i], ARGV[1])
  if consumers.err == nil then
    for _, c in ipairs(consumers) do
      local info = {}
      for j = 1, #c, 2 do info[c[j]] = c[j + 1] end
      if info['pending'] == 0 and info['idle'] > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[i], ARGV[1], info['name'])
        table.insert(removed, KEYS[i])
        table.insert(removed, info['name'])
      end
    end
  end
end
return removed
"""

_OWNED = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
"""

_TOUCH = (
    _OWNED
    + """
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""
)

_SETTLE = (
    _OWNED
    + """
-- KEYS: stream, delayed, dead; ARGV: group, consumer, id, due ('' = done), member,
-- max dead letters, dead letters...
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if ARGV[4] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
end
for i = 7, #ARGV do
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'd', ARGV[i])
end
return 1
"""
)

_ADD_DEVICE = """
-- KEYS: user's device set, token owner key; ARGV: device key, user, now, max, prefix
local previous = redis.call('GET', KEYS[2])
if previous and previous ~= ARGV[2] then
  redis.call('ZREM', ARGV[5] .. 'devices:' .. previous, ARGV[1])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[4])
if n > max then
  for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, n - max - 1)) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('DEL', ARGV[5] .. 'device:' .. member)
  end
end
return 1
"""

_REMOVE_DEVICE = """
-- KEYS: token owner key; ARGV: device key, prefix
local user = redis.call('GET', KEYS[1])
if not user then return 0 end
redis.call('DEL', KEYS[1])
redis.call('ZREM', ARGV[2] .. 'devices:' .. user, ARGV[1])
return 1
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """Why an entry does not decode; ``notification`` if at least that part did."""

    error: str
    notification: Notification | None = None


def _decode_entry(flat: Sequence[Any]) -> tuple[Notification, DeliveryState] | _Undecodable:
    """A stream entry's notification and state, or why it cannot be decoded."""
    notification = None
    try:
        fields = _fields(flat)
        notification = Notification.from_map(json.loads(fields["n"]))
        state = DeliveryState.from_map(json.loads(fields["s"]))
    except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        return _Undecodable(f"{type(exc).__name__}: {exc}", notification)
    return notification, state


def _undecodable(
    ref: str, priority: Priority, flat: Sequence[Any], why: _Undecodable, at: float
) -> DeadLetter:
    """The dead letter of entry ``ref``: its own notification if that decoded, else a
    placeholder (id ``ref``, ``priority``, the raw fields cut short in ``data["raw_entry"]``)."""
    notification = why.notification
    if notification is None:
        raw = [
            (v if isinstance(v, bytes) else str(v).encode()).decode("utf-8", "backslashreplace")
            for v in flat[:RAW_FIELDS_LIMIT]
        ]
        data = {"raw_entry": [text[:RAW_TEXT_LIMIT] for text in raw]}
        notification = Notification(ref, "", priority, "", "", data, ttl=0, created_at=at)
    reason = f"undecodable entry {ref} in the {priority.value} queue: {why.error}"
    return DeadLetter(notification, STORE, STORE, reason, 0, at)


def _fields(flat: Sequence[Any]) -> dict[str, str]:
    items = [_text(v) for v in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


class RedisNotificationStore:
    """The store in Redis (see the module docstring for the keys and the scripts).

    Leases are stream entries pending for a consumer; one idle for ``lease_timeout``
    (Redis server time) is taken over with XAUTOCLAIM, scanned at most every
    ``reclaim_interval`` seconds. ``wait`` blocks in XREAD on the streams from their last ids,
    at most ``poll_interval`` seconds and not past the next due retry it knows of.
    Bounds: ``max_depth`` per priority (stream + delayed), ``max_devices_per_user``,
    ``max_dead_letters`` (approximate trim of the oldest), ``max_deliveries`` leases of one
    entry (then a claim dead-letters it as poison). Housekeeping runs inside ``claim`` (the
    router's dispatch loop; no task of its own): at most every ``consumer_idle_timeout / 2``
    seconds of ``now``, and on the first claim, the group's consumers idle for more than
    ``consumer_idle_timeout`` and holding no pending entry are deleted. The check and the
    delete are one script, so a consumer holding a lease is never deleted. A failure is logged
    at WARNING and never fails the claim; the next try waits for the next interval either way.

    "Idle" is XINFO CONSUMERS ``idle``, whose meaning changed in Redis 7.2. Before, it counts
    from the consumer's last successful read or claim (one that finds nothing does not count),
    so a live router that has found nothing in a stream for that long is deleted too:
    harmless, it holds nothing there and Redis creates it again when it next reads an entry.
    From 7.2 it counts from the last attempt, found or not, so only a consumer that has not
    even tried that stream for that long goes (a dead router; or a live one kept on higher
    priorities, just as harmlessly). 7.2's ``inactive`` field (since the last successful
    interaction, the old ``idle``) is not used: ``idle`` is the better sign of a dead consumer
    where it differs, and the only one before 7.2.

    ``consumer_idle_timeout`` must exceed ``lease_timeout``; keep it well beyond. ``inf`` (or
    any timeout too large to count in milliseconds) turns the housekeeping off.
    ``on_dead_letter``: see the module docstring.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "rt:notif:",
        group: str = "routers",
        max_depth: int = DEFAULT_MAX_DEPTH,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        reclaim_interval: float | None = None,
        poll_interval: float = 1.0,
        max_devices_per_user: int = DEFAULT_MAX_DEVICES_PER_USER,
        max_dead_letters: int = DEFAULT_MAX_DEAD_LETTERS,
        promote_limit: int = 100,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
        consumer_idle_timeout: float = DEFAULT_CONSUMER_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        _check_max_deliveries(max_deliveries)
        if not consumer_idle_timeout > lease_timeout:  # not <=: refuses NaN too
            raise ValueError("consumer_idle_timeout must exceed lease_timeout")
        self._redis = client
        self._prefix = prefix
        self._group = group
        self._max_depth = max_depth
        self._lease_timeout = lease_timeout
        self._reclaim_interval = lease_timeout / 2 if reclaim_interval is None else reclaim_interval
        self._poll_interval = poll_interval
        self._max_devices = max_devices_per_user
        self._max_dead = max_dead_letters
        self._promote_limit = promote_limit
        self._max_deliveries = max_deliveries
        self._consumer_idle_timeout = consumer_idle_timeout
        idle_ms = consumer_idle_timeout * 1000
        self._prune_idle_ms = int(idle_ms) if math.isfinite(idle_ms) else None  # None: never
        self._on_dead_letter = on_dead_letter
        self._clock = clock
        self._owns_client = owns_client
        self._streams = [f"{prefix}q:{p.value}" for p in PRIORITIES]
        self._delayed = [f"{prefix}delayed:{p.value}" for p in PRIORITIES]
        self._dead_key = f"{prefix}dead"
        self._groups_ready = False
        self._cursors = ["0-0"] * len(PRIORITIES)
        self._reclaim_at = 0.0
        self._prune_at = 0.0
        self._last_ids: list[str] | None = None
        self._next_due: float | None = None
        self._enqueue_script = client.register_script(_ENQUEUE)
        self._claim_script = client.register_script(_CLAIM)
        self._touch_script = client.register_script(_TOUCH)
        self._settle_script = client.register_script(_SETTLE)
        self._prune_script = client.register_script(_PRUNE)
        self._add_device_script = client.register_script(_ADD_DEVICE)
        self._remove_device_script = client.register_script(_REMOVE_DEVICE)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisNotificationStore:
        """A store with its own client (closed by ``close``); options go to ``__init__``."""
        timeout = max(5.0, float(options.get("poll_interval", 1.0)) + 2.0)
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=2.0,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            health_check_interval=15,
        )
        return cls(client, owns_client=True, **options)

    @property
    def lease_timeout(self) -> float:
        return self._lease_timeout

    def _index(self, priority: Priority) -> int:
        return priority.rank

    async def enqueue(
        self, notification: Notification, *, idempotency_window: float | None = None
    ) -> Enqueued:
        i = self._index(notification.priority)
        idem = "" if idempotency_window is None else f"{self._prefix}idem:{notification.id}"
        window_ms = 0 if idempotency_window is None else max(1, int(idempotency_window * 1000))
        try:
            status, depth = await self._enqueue_script(
                keys=[self._streams[i], self._delayed[i], idem],
                args=[
                    _dumps(notification.to_map()),
                    _dumps(DeliveryState().to_map()),
                    self._max_depth,
                    window_ms,
                    notification.id,
                ],
            )
        except RedisError as exc:
            raise _unreachable(exc) from exc
        if int(status) < 0:
            raise _full(notification.priority, int(depth), self._max_depth)
        return Enqueued(notification.id, created=int(status) == 1)

    async def _ensure_groups(self) -> None:
        for stream in self._streams:
            try:
                await self._redis.xgroup_create(stream, self._group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._groups_ready = True

    async def claim(self, consumer: str, now: float) -> Lease | None:
        try:
            if not self._groups_ready:
                await self._ensure_groups()
            if now >= self._prune_at:
                await self._prune(now)
            while True:  # each turn that does not return dead-letters the entry it met
                reply = await self._claim_step(consumer, now)
                if int(reply[0]) == 0:
                    self._last_ids = [_text(i) for i in reply[5]]
                    self._next_due = float(reply[6]) if reply[6] else None
                    return None
                lease = await self._lease_or_bury(consumer, reply)
                if lease is not None:
                    return lease
        except RedisError as exc:
            raise _unreachable(exc) from exc

    async def _claim_step(self, consumer: str, now: float) -> list[Any]:
        reclaim = now >= self._reclaim_at
        try:
            reply = await self._run_claim(consumer, now, reclaim)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc) and "no such key" not in str(exc):
                raise
            # The streams were lost (a Redis without persistence restarted): recreate.
            await self._ensure_groups()
            reply = await self._run_claim(consumer, now, reclaim)
        self._cursors = [_text(c) for c in reply[4]]
        if reclaim and all(c == "0-0" for c in self._cursors):
            self._reclaim_at = now + self._reclaim_interval
        return reply

    async def _lease_or_bury(self, consumer: str, reply: list[Any]) -> Lease | None:
        """The lease of a claimed entry, or None once a poison or undecodable entry has been
        moved to the dead letters (atomically, if this consumer still holds it)."""
        i, ref, flat = int(reply[0]) - 1, _text(reply[1]), reply[2]
        reclaimed, deliveries = bool(int(reply[3])), int(reply[5])
        decoded = _decode_entry(flat)
        if isinstance(decoded, _Undecodable):
            letter = _undecodable(ref, PRIORITIES[i], flat, decoded, self._clock())
        elif deliveries > self._max_deliveries:
            letter = _poison(decoded[0], deliveries - 1, self._clock())
        else:
            notification, state = decoded
            return Lease(ref, consumer, notification, state, reclaimed)
        if await self._settle_entry(i, consumer, ref, None, [letter]):
            _stored(letter, self._on_dead_letter)
        return None

    async def _prune(self, now: float) -> None:
        """Deletes the idle consumers that hold nothing. Never raises (but a cancel): a failure
        is logged, and the next try, like after a success, waits for the next interval."""
        interval = self._consumer_idle_timeout / 2
        self._prune_at = now + interval
        if self._prune_idle_ms is None:
            return
        try:
            reply = await self._prune_script(
                keys=self._streams, args=[self._group, self._prune_idle_ms]
            )
            removed = list(zip(map(_text, reply[::2]), map(_text, reply[1::2]), strict=True))
        except Exception as exc:  # housekeeping must never block claims
            log.warning("removing idle consumers failed, next try in %g s: %r", interval, exc)
            return
        for stream, consumer in removed:
            log.info("removed idle consumer %s from %s", consumer, stream)

    async def _run_claim(self, consumer: str, now: float, reclaim: bool) -> list[Any]:
        reply: list[Any] = await self._claim_script(
            keys=[*self._streams, *self._delayed],
            args=[
                self._group,
                consumer,
                repr(now),
                int(self._lease_timeout * 1000),
                "1" if reclaim else "0",
                self._promote_limit,
                *self._cursors,
            ],
        )
        return reply

    async def touch(self, lease: Lease) -> bool:
        i = self._index(lease.notification.priority)
        try:
            owned = await self._touch_script(
                keys=[self._streams[i]], args=[self._group, lease.consumer, lease.ref]
            )
        except RedisError as exc:
            raise _unreachable(exc) from exc
        return bool(int(owned))

    async def settle(
        self,
        lease: Lease,
        *,
        state: DeliveryState,
        retry_at: float | None = None,
        dead_letters: Sequence[DeadLetter] = (),
    ) -> bool:
        i = self._index(lease.notification.priority)
        retry = None
        if retry_at is not None:
            # The ref makes the member unique; the claim script reads [notification, state].
            member = _dumps_list(
                [_dumps(lease.notification.to_map()), _dumps(state.to_map()), lease.ref]
            )
            retry = (retry_at, member)
        try:
            owned = await self._settle_entry(i, lease.consumer, lease.ref, retry, dead_letters)
        except RedisError as exc:
            raise _unreachable(exc) from exc
        if retry_at is not None and (self._next_due is None or retry_at < self._next_due):
            self._next_due = retry_at
        return owned

    async def _settle_entry(
        self,
        i: int,
        consumer: str,
        ref: str,
        retry: tuple[float, str] | None,
        dead_letters: Sequence[DeadLetter],
    ) -> bool:
        """Acks and deletes entry ``ref`` of stream ``i`` held by ``consumer``, stores the dead
        letters and, with ``retry`` (due, delayed member), delays it; False if not held."""
        owned = await self._settle_script(
            keys=[self._streams[i], self._delayed[i], self._dead_key],
            args=[
                self._group,
                consumer,
                ref,
                "" if retry is None else repr(retry[0]),
                "" if retry is None else retry[1],
                self._max_dead,
                *(_dumps(d.to_map()) for d in dead_letters),
            ],
        )
        return bool(int(owned))

    async def wait(self, max_wait: float) -> None:
        now = self._clock()
        timeout = min(max_wait, self._poll_interval, max(0.0, self._reclaim_at - now))
        if self._next_due is not None:
            timeout = min(timeout, max(0.0, self._next_due - now))
        if timeout <= 0.001:
            return
        if self._last_ids is None:
            await asyncio.sleep(timeout)
            return
        streams = dict(zip(self._streams, self._last_ids, strict=True))
        try:
            await self._redis.xread(streams, count=1, block=max(1, int(timeout * 1000)))  # type: ignore[arg-type]
        except RedisError as exc:
            raise _unreachable(exc) from exc

    async def depth(self) -> dict[Priority, int]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, delayed in zip(self._streams, self._delayed, strict=True):
                    pipe.xlen(stream)
                    pipe.zcard(delayed)
                counts = await pipe.execute()
        except RedisError as exc:
            raise _unreachable(exc) from exc
        return {p: int(counts[2 * i]) + int(counts[2 * i + 1]) for i, p in enumerate(PRIORITIES)}

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        try:
            entries = await self._redis.xrevrange(self._dead_key, count=limit)
        except RedisError as exc:
            raise _unreachable(exc) from exc
        return [DeadLetter.from_map(json.loads(_fields_of(e[1])["d"])) for e in entries or []]

    async def add_device(self, device: Device) -> None:
        try:
            await self._add_device_script(
                keys=[f"{self._prefix}devices:{device.user}", f"{self._prefix}device:{device.key}"],
                args=[
                    device.key,
                    device.user,
                    repr(self._clock()),
                    self._max_devices,
                    self._prefix,
                ],
            )
        except RedisError as exc:
            raise _unreachable(exc) from exc

    async def remove_device(self, platform: Platform, token: str) -> bool:
        key = device_key(platform, token)
        try:
            removed = await self._remove_device_script(
                keys=[f"{self._prefix}device:{key}"], args=[key, self._prefix]
            )
        except RedisError as exc:
            raise _unreachable(exc) from exc
        return bool(int(removed))

    async def devices(self, user: str) -> list[Device]:
        try:
            members = await self._redis.zrange(f"{self._prefix}devices:{user}", 0, -1)
        except RedisError as exc:
            raise _unreachable(exc) from exc
        devices = []
        for member in members:
            platform, token = parse_device_key(_text(member))
            devices.append(Device(user=user, platform=platform, token=token))
        return devices

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except RedisError:
            return False

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()


def _dumps_list(value: list[str]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fields_of(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return _fields(value)


def _unreachable(exc: Exception) -> QueueUnavailable:
    return QueueUnavailable("unreachable", f"notification store unreachable: {exc}")
