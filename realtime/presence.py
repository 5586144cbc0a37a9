"""Who is connected: each user's connections across nodes, and the user's last known tier."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from redis.commands.core import AsyncScript

from realtime.broker import BrokerUnavailable
from realtime.redis_broker import make_client, redis_errors

__all__ = [
    "DEFAULT_TTL",
    "TIER_TTL",
    "ConnectionRegistry",
    "MemoryConnectionRegistry",
    "RedisConnectionRegistry",
]

#: Seconds a connection entry lives without a heartbeat (a dead node's entries expire).
DEFAULT_TTL = 20.0
#: Seconds a user's last tier is remembered (push rules while the app is closed).
TIER_TTL = 30 * 86_400.0
CONNS_PREFIX = "rt:presence:"
TIER_PREFIX = "rt:tier:"


class ConnectionRegistry(Protocol):
    """The connections of each user, counted across every node sharing the registry.

    Contract (tests/test_presence.py, against every implementation):

    - ``add(user, conn_id)`` registers a connection and returns the user's count of
      live connections now, this one included (atomic: two concurrent adds of one
      user on two nodes never both see the same count).
    - ``remove(user, conn_id)`` forgets it; unknown ones are ignored.
    - ``refresh(entries)`` is a node's heartbeat for its live ``(user, conn_id)``
      pairs (re-adding any that expired); an entry not added or refreshed for ``ttl``
      seconds (a dead node's) no longer counts.
    - ``set_tier`` / ``tier_of``: the user's last known tier name (kept ``TIER_TTL``), or None.
    - Raises ``BrokerUnavailable`` when the backend cannot answer; ``close()`` releases it.
    """

    async def add(self, user: str, conn_id: str) -> int: ...

    async def remove(self, user: str, conn_id: str) -> None: ...

    async def refresh(self, entries: list[tuple[str, str]]) -> None: ...

    async def set_tier(self, user: str, tier: str) -> None: ...

    async def tier_of(self, user: str) -> str | None: ...

    async def close(self) -> None: ...


class MemoryConnectionRegistry:
    """One node's registry.

    Bounded: expired entries are dropped on ``add`` (that user) and ``refresh`` (all);
    tiers are kept for at most ``max_tiers`` users (the least recently set is dropped).
    """

    def __init__(
        self,
        *,
        ttl: float = DEFAULT_TTL,
        max_tiers: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.ttl = ttl
        self.max_tiers = max_tiers
        self._clock = clock
        self._conns: dict[str, dict[str, float]] = {}  # user -> conn_id -> expiry
        self._tiers: OrderedDict[str, tuple[str, float]] = OrderedDict()  # user -> tier, expiry

    async def add(self, user: str, conn_id: str) -> int:
        now = self._clock()
        conns = self._conns.setdefault(user, {})
        for expired in [cid for cid, expiry in conns.items() if expiry <= now]:
            del conns[expired]
        conns[conn_id] = now + self.ttl
        return len(conns)

    async def remove(self, user: str, conn_id: str) -> None:
        conns = self._conns.get(user)
        if conns is not None:
            conns.pop(conn_id, None)
            if not conns:
                del self._conns[user]

    async def refresh(self, entries: list[tuple[str, str]]) -> None:
        now = self._clock()
        for user in list(self._conns):
            conns = self._conns[user]
            for expired in [cid for cid, expiry in conns.items() if expiry <= now]:
                del conns[expired]
            if not conns:
                del self._conns[user]
        for user, conn_id in entries:
            self._conns.setdefault(user, {})[conn_id] = now + self.ttl

    async def set_tier(self, user: str, tier: str) -> None:
        self._tiers[user] = (tier, self._clock() + TIER_TTL)
        self._tiers.move_to_end(user)
        while len(self._tiers) > self.max_tiers:
            self._tiers.popitem(last=False)

    async def tier_of(self, user: str) -> str | None:
        entry = self._tiers.get(user)
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._tiers[user]
            return None
        return entry[0]

    async def close(self) -> None:
        self._conns.clear()
        self._tiers.clear()


# KEYS: users' ZSETs (member conn_id, score expiry in ms on Redis's clock); ARGV[1]: ttl ms,
# ARGV[i + 1]: the conn_id for KEYS[i]. For each in turn, atomically: drop the expired
# entries, add (or re-arm) the conn_id, count. Returns the counts, in KEYS order.
_ADD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local counts = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  redis.call('ZADD', key, now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl)
  counts[i] = redis.call('ZCARD', key)
end
return counts
"""
# KEYS: users' ZSETs; ARGV[i]: the conn_id to forget from KEYS[i]. Returns ZREM's replies.
_REMOVE = """
local removed = {}
for i, key in ipairs(KEYS) do
  removed[i] = redis.call('ZREM', key, ARGV[i])
end
return removed
"""
# KEYS: users' tier keys; ARGV[1]: ttl ms, ARGV[i + 1]: the tier for KEYS[i]. Returns 1s.
_SET_TIER = """
local done = {}
for i, key in ipairs(KEYS) do
  redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
  done[i] = 1
end
return done
"""


class _Batch:
    """Concurrent calls of one many-keys script, sent together.

    ``call(key, arg)`` queues its key and waits; one task (started on demand,
    ended when nothing is queued) sends what is queued as one EVALSHA of up to
    ``max_batch`` keys, ``ARGV = [param if given, arg for each key]``, one round
    trip in flight at a time: calls made during a round trip go together in the
    next, so N concurrent calls cost about ``N / max_batch`` round trips and one
    pooled connection instead of N. Each caller gets the script's reply for its
    key, or ``BrokerUnavailable`` when its round trip fails (the others are
    unaffected).

    Bounds: at most ``max_pending`` callers wait, queued or in the round trip
    (beyond, ``BrokerUnavailable`` at once: Redis is not keeping up); callers that
    gave up do not count. A caller waits at most ``timeout`` s, then gets
    ``BrokerUnavailable`` (if its key was already sent, Redis may still apply it).
    A caller that gives up before its key is sent is dropped from the batch; the
    queue holds at most ``2 * max_pending`` keys, those of callers that gave up
    being dropped when it reaches that. ``close()`` cancels and awaits the task
    and fails every waiting caller.
    """

    def __init__(
        self,
        script: AsyncScript,
        what: str,
        param: int | None = None,
        *,
        max_batch: int,
        max_pending: int,
        timeout: float,
    ) -> None:
        self._script = script
        self._what = what
        self._head = [] if param is None else [param]
        self._max_batch = max_batch
        self._max_pending = max_pending
        self._timeout = timeout
        self._pending: deque[tuple[str, str, asyncio.Future[Any]]] = deque()
        self._waiting = 0  # callers inside ``call``, queued or in the round trip
        self._sending: list[asyncio.Future[Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def call(self, key: str, arg: str) -> Any:
        if self._closed:
            raise BrokerUnavailable(f"redis presence {self._what} failed: registry closed")
        if self._waiting >= self._max_pending:
            raise BrokerUnavailable(
                f"redis presence {self._what} failed: "
                f"{self._waiting} calls already waiting for Redis"
            )
        if len(self._pending) >= 2 * self._max_pending:
            self._drop_given_up()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((key, arg, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._send_all(), name=f"presence-{self._what}")
        self._waiting += 1
        try:
            async with asyncio.timeout(self._timeout):
                return await future
        except TimeoutError:
            raise BrokerUnavailable(
                f"redis presence {self._what} failed: no reply within {self._timeout} s"
            ) from None
        finally:
            self._waiting -= 1

    def _drop_given_up(self) -> None:
        """Drops the queued keys of callers that gave up, in place (``_send_all`` holds the
        deque). At most ``max_pending`` remain, so this runs at most once per
        ``max_pending`` calls: O(1) a call."""
        live = [item for item in self._pending if not item[2].done()]
        self._pending.clear()
        self._pending.extend(live)

    async def _send_all(self) -> None:
        pending = self._pending
        while pending:
            batch: list[tuple[str, str, asyncio.Future[Any]]] = []
            while pending and len(batch) < self._max_batch:
                item = pending.popleft()
                if not item[2].done():  # its caller gave up (timeout or cancel)
                    batch.append(item)
            if not batch:
                continue
            self._sending = [future for _, _, future in batch]
            try:
                with redis_errors(f"presence {self._what}"):
                    replies = await self._script(
                        keys=[key for key, _, _ in batch],
                        args=[*self._head, *(arg for _, arg, _ in batch)],
                    )
                answered = list(zip(self._sending, replies, strict=True))
            except Exception as exc:
                for future in self._sending:
                    if not future.done():
                        future.set_exception(_for_one_caller(exc))
            else:
                for future, reply in answered:
                    if not future.done():
                        future.set_result(reply)
            self._sending = []

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        waiting = [*self._sending, *(future for _, _, future in self._pending)]
        self._sending = []
        self._pending.clear()
        for future in waiting:
            if not future.done():
                future.set_exception(
                    BrokerUnavailable(f"redis presence {self._what} failed: registry closed")
                )


def _for_one_caller(exc: Exception) -> Exception:
    """``exc`` for one of the callers of a failed round trip (an instance each)."""
    if isinstance(exc, BrokerUnavailable):
        copy = BrokerUnavailable(*exc.args)
        copy.__cause__ = exc.__cause__
        return copy
    return exc


class RedisConnectionRegistry:
    """The registry shared by every node.

    ``rt:presence:<user>``: a ZSET of conn ids scored by expiry (Redis's clock, so
    node clocks do not matter), expiring with its newest entry. ``rt:tier:<user>``:
    the tier, ``TIER_TTL``. ``add``, ``remove`` and ``set_tier`` are each coalesced
    (``_Batch``): the concurrent calls of a connect flood share one Lua call per
    ``max_batch`` users (drop expired, add, count, for each user in turn), so the
    pool of ``make_client`` stays free for the heartbeat. ``refresh`` sends its
    entries ``max_batch`` per Lua call. Bounds: ``max_pending`` waiting callers per
    operation, each of ``add``, ``remove`` and ``set_tier`` (beyond:
    ``BrokerUnavailable`` at once), ``timeout`` s per call.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl: float = DEFAULT_TTL,
        timeout: float = 5.0,
        max_batch: int = 500,
        max_pending: int = 100_000,
    ) -> None:
        self.ttl = ttl
        self._ttl_ms = max(1, round(ttl * 1000))
        self._max_batch = max_batch
        self._client = make_client(url, timeout=timeout)
        self._add_script = self._client.register_script(_ADD)
        batch = partial(_Batch, max_batch=max_batch, max_pending=max_pending, timeout=timeout)
        self._adds = batch(self._add_script, "add", self._ttl_ms)
        self._removes = batch(self._client.register_script(_REMOVE), "remove")
        self._tiers = batch(
            self._client.register_script(_SET_TIER), "set_tier", round(TIER_TTL * 1000)
        )

    async def add(self, user: str, conn_id: str) -> int:
        return int(await self._adds.call(CONNS_PREFIX + user, conn_id))

    async def remove(self, user: str, conn_id: str) -> None:
        await self._removes.call(CONNS_PREFIX + user, conn_id)

    async def refresh(self, entries: list[tuple[str, str]]) -> None:
        for start in range(0, len(entries), self._max_batch):
            chunk = entries[start : start + self._max_batch]
            args: list[str | int] = [self._ttl_ms, *(conn_id for _, conn_id in chunk)]
            with redis_errors("presence refresh"):
                await self._add_script(keys=[CONNS_PREFIX + user for user, _ in chunk], args=args)

    async def set_tier(self, user: str, tier: str) -> None:
        await self._tiers.call(TIER_PREFIX + user, tier)

    async def tier_of(self, user: str) -> str | None:
        with redis_errors("presence tier_of"):
            value = await self._client.get(TIER_PREFIX + user)
        return value.decode() if isinstance(value, bytes) else None

    async def close(self) -> None:
        for batch in (self._adds, self._removes, self._tiers):
            await batch.close()
        await self._client.aclose()
