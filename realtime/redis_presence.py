"""``RedisConnectionRegistry``: the ConnectionRegistry (presence.py) shared by every node."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from redis.commands.core import AsyncScript
from redis.crc import key_slot

from realtime.presence import DEFAULT_TTL, TIER_TTL, PresenceUnavailable
from realtime.redis_client import (
    RedisTarget,
    eval_per_slot,
    is_cluster_client,
    lua_script,
    make_client,
    redis_errors,
)

__all__ = ["RedisConnectionRegistry", "user_key"]

CONNS_PREFIX = "rt:presence:"
TIER_PREFIX = "rt:tier:"
#: On a cluster the keys carry a hash tag ``{p<n>}``, ``n`` one of ``CLUSTER_BUCKETS``
#: chosen by the user: a batch needs at most that many script calls (one per slot).
CLUSTER_BUCKETS = 64


def user_key(prefix: str, user: str, *, cluster: bool) -> str:
    """The key of ``user`` under ``prefix`` (``CONNS_PREFIX`` or ``TIER_PREFIX``)."""
    if not cluster:
        return prefix + user
    return f"{prefix}{{p{key_slot(user.encode()) % CLUSTER_BUCKETS}}}:{user}"


# realtime/lua/: each script says its KEYS, ARGV and reply.
_ADD = lua_script("presence_add.lua")
_REMOVE = lua_script("presence_remove.lua")
_SET_TIER = lua_script("presence_set_tier.lua")

#: Sends one many-keys script call: (keys, one arg per key) -> one reply per key, in order;
#: a reply may be the exception of the part of the call that failed (on a cluster).
Send = Callable[[list[str], list[str]], Awaitable[list[Any]]]


class _Batch:
    """Concurrent calls of one many-keys script, sent together.

    ``call(key, arg)`` queues its key and waits; one task (started on demand,
    ended when nothing is queued) sends what is queued with ``send`` (one EVALSHA
    of up to ``max_batch`` keys; on a cluster one per slot, in one round trip per
    master), one round trip in flight at a time: calls made during a round trip go
    together in the next, so N concurrent calls cost about ``N / max_batch`` round
    trips and one pooled connection instead of N. Each caller gets the script's
    reply for its key, or ``PresenceUnavailable`` when its part of the round trip
    fails (the others are unaffected).

    Bounds: at most ``max_pending`` callers wait, queued or in the round trip
    (beyond, ``PresenceUnavailable`` at once: Redis is not keeping up); callers that
    gave up do not count. A caller waits at most ``timeout`` s, then gets
    ``PresenceUnavailable`` (if its key was already sent, Redis may still apply it).
    A caller that gives up before its key is sent is dropped from the batch; the
    queue holds at most ``2 * max_pending`` keys, those of callers that gave up
    being dropped when it reaches that. ``close()`` cancels and awaits the task
    and fails every waiting caller.
    """

    def __init__(
        self, send: Send, what: str, *, max_batch: int, max_pending: int, timeout: float
    ) -> None:
        self._send = send
        self._what = what
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
            raise PresenceUnavailable(f"redis presence {self._what} failed: registry closed")
        if self._waiting >= self._max_pending:
            raise PresenceUnavailable(
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
            raise PresenceUnavailable(
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
                with redis_errors(f"presence {self._what}", PresenceUnavailable):
                    replies = await self._send(
                        [key for key, _, _ in batch], [arg for _, arg, _ in batch]
                    )
                answered = list(zip(self._sending, replies, strict=True))
            except Exception as exc:
                for future in self._sending:
                    if not future.done():
                        future.set_exception(_for_one_caller(exc))
            else:
                for future, reply in answered:
                    if future.done():
                        continue
                    if isinstance(reply, Exception):
                        future.set_exception(
                            PresenceUnavailable(f"redis presence {self._what} failed: {reply}")
                        )
                    else:
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
                    PresenceUnavailable(f"redis presence {self._what} failed: registry closed")
                )


def _for_one_caller(exc: Exception) -> Exception:
    """``exc`` for one of the callers of a failed round trip (an instance each)."""
    if isinstance(exc, PresenceUnavailable):
        copy = PresenceUnavailable(*exc.args)
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
    entries ``max_batch`` per Lua call. On a Redis Cluster a script's keys must share
    a slot: the keys carry one of ``CLUSTER_BUCKETS`` hash tags (``user_key``) and
    each batch is split by slot into at most that many calls, sent in one pipeline
    (one round trip per master). Bounds: ``max_pending``
    waiting callers per operation, each of ``add``, ``remove`` and ``set_tier``
    (beyond: ``PresenceUnavailable`` at once), ``timeout`` s per call.
    """

    def __init__(
        self,
        url: str | RedisTarget,
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
        self._cluster = is_cluster_client(self._client)
        self._add_script = self._client.register_script(_ADD)
        batch = partial(_Batch, max_batch=max_batch, max_pending=max_pending, timeout=timeout)
        self._adds = batch(partial(self._send, self._add_script, [self._ttl_ms]), "add")
        remove = self._client.register_script(_REMOVE)
        self._removes = batch(partial(self._send, remove, []), "remove")
        tier = self._client.register_script(_SET_TIER)
        self._tiers = batch(partial(self._send, tier, [round(TIER_TTL * 1000)]), "set_tier")

    def _key(self, prefix: str, user: str) -> str:
        return user_key(prefix, user, cluster=self._cluster)

    async def _send(
        self, script: AsyncScript, head: list[int], keys: list[str], args: list[str]
    ) -> list[Any]:
        """``script`` on ``keys``, ``ARGV = [*head, arg for each key]``: one reply per key."""
        if not self._cluster:
            return list(await script(keys=keys, args=[*head, *args]))
        by_slot: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            by_slot.setdefault(key_slot(key.encode()), []).append(i)
        groups = list(by_slot.values())
        calls = [([keys[i] for i in group], [*head, *(args[i] for i in group)]) for group in groups]
        out: list[Any] = [None] * len(keys)
        for group, reply in zip(
            groups, await eval_per_slot(self._client, script, calls), strict=True
        ):
            for j, i in enumerate(group):
                out[i] = reply if isinstance(reply, Exception) else reply[j]
        return out

    async def add(self, user: str, conn_id: str) -> int:
        return int(await self._adds.call(self._key(CONNS_PREFIX, user), conn_id))

    async def remove(self, user: str, conn_id: str) -> None:
        await self._removes.call(self._key(CONNS_PREFIX, user), conn_id)

    async def refresh(self, entries: list[tuple[str, str]]) -> None:
        for start in range(0, len(entries), self._max_batch):
            chunk = entries[start : start + self._max_batch]
            keys = [self._key(CONNS_PREFIX, user) for user, _ in chunk]
            with redis_errors("presence refresh", PresenceUnavailable):
                replies = await self._send(
                    self._add_script, [self._ttl_ms], keys, [conn_id for _, conn_id in chunk]
                )
            failed = next((r for r in replies if isinstance(r, Exception)), None)
            if failed is not None:
                raise PresenceUnavailable(f"redis presence refresh failed: {failed}")

    async def set_tier(self, user: str, tier: str) -> None:
        await self._tiers.call(self._key(TIER_PREFIX, user), tier)

    async def tier_of(self, user: str) -> str | None:
        with redis_errors("presence tier_of", PresenceUnavailable):
            value = await self._client.get(self._key(TIER_PREFIX, user))
        return value.decode() if isinstance(value, bytes) else None

    async def close(self) -> None:
        for batch in (self._adds, self._removes, self._tiers):
            await batch.close()
        await self._client.aclose()
