"""``RedisNotificationStore``: the NotificationStore (store.py) in Redis.

Everything is kept under a prefix (default ``rt:notif:``):

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
undecodable entry is two of them, the claim then the settle (see store.py), and is just as safe:
a crash in between leaves the entry pending, to be dead-lettered by a later claim.
Durability across a Redis restart needs Redis persistence (AOF with ``appendfsync always``
for no loss at all).

On a Redis Cluster (the client a ``RedisCluster``) every key of the store carries one hash
tag (default prefix ``rt:notif:{n}:``), so the whole store is one slot on one master: each
script's keys, declared or built inside Lua from the prefix, are in that slot, and the
store follows that master through failovers. On one Redis the keys keep their names
(``rt:notif:``), so queued notifications survive an upgrade.

The scripts are notifications/lua/*.lua (package data), read at import. Poison entries,
dead letters and the removal of dead consumers: see store.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)

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
from notifications.store import (
    DEFAULT_CONSUMER_IDLE_TIMEOUT,
    DEFAULT_LEASE_TIMEOUT,
    DEFAULT_MAX_DEAD_LETTERS,
    DEFAULT_MAX_DELIVERIES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_DEVICES_PER_USER,
    RAW_FIELDS_LIMIT,
    RAW_TEXT_LIMIT,
    STORE,
    DeadLetterHook,
    Enqueued,
    Lease,
    QueueUnavailable,
    check_max_deliveries,
    poison_letter,
    queue_full,
    report_dead_letter,
)

__all__ = ["CLUSTER_PREFIX", "PREFIX", "RedisNotificationStore"]

#: What a command may raise when Redis cannot answer (a cluster's slot not served: the
#: second).
_ERRORS = (RedisError, RedisClusterException)

#: The keys' prefix on one Redis (or under Sentinel), and on a Redis Cluster: one hash
#: tag, so every key of the store is in one slot.
PREFIX = "rt:notif:"
CLUSTER_PREFIX = "rt:notif:{n}:"

# The store's logger, shared with memory_store.py (operators filter on ``notifications.store``).
log = logging.getLogger("notifications.store")


def _lua(name: str) -> str:
    """The text of the Lua script ``notifications/lua/<name>`` (shipped as package data)."""
    return (resources.files("notifications") / "lua" / name).read_text(encoding="utf-8")


# notifications/lua/: each script says its KEYS, ARGV and reply.
_ENQUEUE = _lua("enqueue.lua")
_CLAIM = _lua("claim.lua")
_PRUNE = _lua("prune.lua")
_TOUCH = _lua("touch.lua")  # 0 unless the consumer still holds the entry (settle.lua too)
_SETTLE = _lua("settle.lua")
_ADD_DEVICE = _lua("add_device.lua")
_REMOVE_DEVICE = _lua("remove_device.lua")


def _dumps(value: Mapping[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


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
    ``on_dead_letter``: see store.py's module docstring.

    ``client``: a ``redis.asyncio.Redis`` (one Redis, or a Sentinel master) or a
    ``RedisCluster``. ``prefix`` defaults to ``PREFIX``, on a cluster ``CLUSTER_PREFIX``;
    on a cluster a prefix without a hash tag is refused (``ValueError``).
    ``wait_replicas``: writes that must survive the master's death (enqueue, add_device)
    are answered only once that many replicas have them (``WAIT`` on the connection of
    the write, on the master serving the store's slot on a cluster), else
    ``QueueUnavailable``: the caller retries with the same id.
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        prefix: str | None = None,
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
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        check_max_deliveries(max_deliveries)
        if not consumer_idle_timeout > lease_timeout:  # not <=: refuses NaN too
            raise ValueError("consumer_idle_timeout must exceed lease_timeout")
        self._cluster = client if isinstance(client, RedisCluster) else None
        if prefix is None:
            prefix = PREFIX if self._cluster is None else CLUSTER_PREFIX
        elif self._cluster is not None and not _hash_tag(prefix):
            raise ValueError(f"on a Redis Cluster the prefix needs a hash tag: {prefix!r}")
        # Both clients have every command the store sends; typed as the one-Redis client.
        self._redis = cast(aioredis.Redis, client)
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
        self._wait_replicas = wait_replicas
        self._wait_ms = max(1, int(wait_timeout * 1000))
        self._wait_key = f"{prefix}wait"
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

    @staticmethod
    def client_options(poll_interval: float = 1.0) -> dict[str, Any]:
        """redis-py options of the store's own client (``from_url``'s; the app's under Sentinel)."""
        timeout = max(5.0, poll_interval + 2.0)
        return {
            "socket_timeout": timeout,
            "socket_connect_timeout": 2.0,
            "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
            "health_check_interval": 15,
        }

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisNotificationStore:
        """A store with its own client (closed by ``close``); options go to ``__init__``."""
        client_options = cls.client_options(float(options.get("poll_interval", 1.0)))
        client = aioredis.Redis.from_url(url, **client_options)
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
        idem = f"{self._prefix}idem:{notification.id}"  # used only with a window
        window_ms = 0 if idempotency_window is None else max(1, int(idempotency_window * 1000))
        try:
            (status, depth), acked = await self._replicated(
                self._enqueue_script,
                keys=[self._streams[i], self._delayed[i], idem],
                args=[
                    _dumps(notification.to_map()),
                    _dumps(DeliveryState().to_map()),
                    self._max_depth,
                    window_ms,
                    notification.id,
                ],
            )
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        if int(status) < 0:
            raise queue_full(notification.priority, int(depth), self._max_depth)
        self._check_acked(acked)
        return Enqueued(notification.id, created=int(status) == 1)

    async def _replicated(
        self, script: AsyncScript, *, keys: list[str], args: list[Any]
    ) -> tuple[Any, int]:
        """Run ``script``; with ``wait_replicas``, then WAIT for them on the same connection.

        Returns the script's reply and how many replicas have it (``wait_replicas`` when no
        wait is asked). A write after the script (``INCR <prefix>wait``) gives WAIT something
        to wait for even when the script wrote nothing (a duplicate whose first write may
        not have reached the replicas yet).
        """
        if not self._wait_replicas:
            return await script(keys=keys, args=args), self._wait_replicas
        if self._cluster is not None:
            return await self._replicated_in_cluster(self._cluster, script, keys, args)
        pipe = self._redis.pipeline(transaction=False)
        await script(keys=keys, args=args, client=pipe)
        pipe.incr(self._wait_key)
        pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms)
        results = await pipe.execute()
        return results[0], int(results[-1])

    async def _replicated_in_cluster(
        self, cluster: RedisCluster, script: AsyncScript, keys: list[str], args: list[Any]
    ) -> tuple[Any, int]:
        """``_replicated`` on a cluster: the script, INCR and WAIT in one pipeline to the
        master of the store's slot, which sends them on one connection. Redirections are
        not followed (a redirected write would leave WAIT on the old master): a MOVED
        (the script did not run) updates the slot map and the three are sent once more, as
        after a NOSCRIPT (a promoted replica has no script cache)."""
        for attempt in range(2):
            await cluster.initialize()  # the slot map: read once, then again when due
            node = cluster.get_node_from_key(self._wait_key)
            async with cluster.pipeline(transaction=False) as pipe:
                await script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
                pipe.incr(self._wait_key)
                pipe.execute_command("WAIT", self._wait_replicas, self._wait_ms, target_nodes=node)
                results = await pipe.execute(raise_on_error=False, allow_redirections=False)
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is None:
                return results[0], int(results[-1])
            if attempt or not isinstance(failed, NoScriptError | MovedError):
                raise failed
            if isinstance(failed, NoScriptError):
                await cluster.script_load(script.script)
            else:  # the cluster client follows the MOVED and learns the slot's master
                await cluster.exists(self._wait_key)
        raise AssertionError("unreachable")  # pragma: no cover

    def _check_acked(self, acked: int) -> None:
        if acked < self._wait_replicas:
            raise QueueUnavailable(
                "unreachable",
                f"stored on the Redis master but {acked} of {self._wait_replicas} replicas "
                f"confirmed it within {self._wait_ms} ms; retry with the same id",
            )

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
        except _ERRORS as exc:
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
            letter = poison_letter(decoded[0], deliveries - 1, self._clock())
        else:
            notification, state = decoded
            return Lease(ref, consumer, notification, state, reclaimed)
        if await self._settle_entry(i, consumer, ref, None, [letter]):
            report_dead_letter(letter, self._on_dead_letter)
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
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
        except _ERRORS as exc:
            raise _unreachable(exc) from exc

    async def depth(self) -> dict[Priority, int]:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for stream, delayed in zip(self._streams, self._delayed, strict=True):
                    pipe.xlen(stream)
                    pipe.zcard(delayed)
                counts = await pipe.execute()
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        return {p: int(counts[2 * i]) + int(counts[2 * i + 1]) for i, p in enumerate(PRIORITIES)}

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        if limit <= 0:
            return []
        try:
            entries = await self._redis.xrevrange(self._dead_key, count=limit)
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        return [DeadLetter.from_map(json.loads(_fields_of(e[1])["d"])) for e in entries or []]

    async def add_device(self, device: Device) -> None:
        try:
            _, acked = await self._replicated(
                self._add_device_script,
                keys=[f"{self._prefix}devices:{device.user}", f"{self._prefix}device:{device.key}"],
                args=[
                    device.key,
                    device.user,
                    repr(self._clock()),
                    self._max_devices,
                    self._prefix,
                ],
            )
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        self._check_acked(acked)

    async def remove_device(self, platform: Platform, token: str) -> bool:
        key = device_key(platform, token)
        try:
            removed = await self._remove_device_script(
                keys=[f"{self._prefix}device:{key}"], args=[key, self._prefix]
            )
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        return bool(int(removed))

    async def devices(self, user: str) -> list[Device]:
        try:
            members = await self._redis.zrange(f"{self._prefix}devices:{user}", 0, -1)
        except _ERRORS as exc:
            raise _unreachable(exc) from exc
        devices = []
        for member in members:
            platform, token = parse_device_key(_text(member))
            devices.append(Device(user=user, platform=platform, token=token))
        return devices

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _ERRORS:
            return False

    async def close(self) -> None:
        if self._owns_client:
            await self._redis.aclose()


def _hash_tag(key: str) -> str:
    """``key``'s hash tag (what Redis Cluster hashes), "" if none."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else ""


def _dumps_list(value: list[str]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _fields_of(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {_text(k): _text(v) for k, v in value.items()}
    return _fields(value)


def _unreachable(exc: Exception) -> QueueUnavailable:
    return QueueUnavailable("unreachable", f"notification store unreachable: {exc}")
