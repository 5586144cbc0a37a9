"""RedisClusterBroker: the Broker seam over a Redis Cluster's sharded pub/sub.

A channel ``c`` is the shard channel ``"rt:{c}"``: its hash tag puts it in the same slot
as the channel's history keys (``rt:h:{c}``, ``rt:m:{c}``, realtime/redis_history.py),
so the publish script's SPUBLISH and its keys run on one master, atomically, and the
publication crosses only that shard. No single Redis core carries every channel.

Per master of the cluster, one sharded ``RedisBroker`` (its pub/sub connection, its
pipelined command connection, its reconnects and health checks). A slot map (CLUSTER
SLOTS, from any node that answers) routes each channel and each command to its master:

- Re-read when a command is answered MOVED (the command, which did not run, is retried
  once on the master the reply names), when a master's pub/sub drops a channel (its
  slot moved: Redis sends ``sunsubscribe``), when a command finds its master
  unreachable, and every ``health_check_interval`` seconds (a failover).
- After a re-read, every wanted channel whose slot changed master is subscribed on the
  new master and dropped from the old one; brokers of nodes that are no longer masters
  are closed. If any channel moved, ``on_reconnect`` is called, as after a reconnect:
  publications may have been missed in between (the hub fills the gap from history).
- An ASK redirection (a slot being migrated) is followed for that one command.

The contract is ``Broker``'s (realtime/broker.py); ``ready`` is True while the slot map
is known and every master's pub/sub is connected. ``command`` routes EVAL/EVALSHA by
their first key and other commands by their first argument.
"""

from __future__ import annotations

import asyncio
import logging
import random
from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from typing import Final, Literal

from redis.crc import key_slot

from realtime.broker import BrokerUnavailable, MessageHandler
from realtime.redis_broker import KeyedLock, RedisBroker, ignore_message, shard_channel_key
from realtime.redis_client import RedisTarget, backoff_delay
from realtime.resp import ConnectionLost, RedisReplyError, RespConnection, make_reader

__all__ = ["RedisClusterBroker", "SlotMap"]

log = logging.getLogger("realtime.redis_broker")

Address = tuple[str, int]
_SCRIPTS: Final = (b"EVALSHA", b"EVAL")
#: Error replies of a cluster that did nothing and may accept the command later: no master
#: for the slot, or a multi-key command on a slot being migrated (some keys moved already).
_RETRY_LATER: Final = ("CLUSTERDOWN", "TRYAGAIN", "MOVED", "ASK")
#: A map older than this is re-read before a retry after MOVED (it may be stale).
_REFRESH_MIN_INTERVAL: Final = 0.05
#: Channels moved to a new master at once after a map change (their SSUBSCRIBEs pipelined).
_MOVE_BATCH: Final = 500


class SlotMap:
    """Which master serves each of the 16384 slots (sans-I/O: built from CLUSTER SLOTS)."""

    __slots__ = ("_firsts", "_masters", "replicas")

    def __init__(
        self, ranges: Iterable[tuple[int, int, Address]], replicas: Iterable[Address] = ()
    ):
        ordered = sorted(ranges)
        self._firsts = [first for first, _, _ in ordered]
        self._masters = [(last, master) for _, last, master in ordered]
        self.replicas = frozenset(replicas)

    @classmethod
    def parse(cls, reply: object, asked: Address) -> SlotMap:
        """From a CLUSTER SLOTS reply; ``asked``: the node asked (its host stands in for an
        empty or ``?`` one)."""
        if not isinstance(reply, list):
            raise ValueError(f"unexpected CLUSTER SLOTS reply {reply!r:.100}")
        ranges: list[tuple[int, int, Address]] = []
        replicas: list[Address] = []
        for entry in reply:
            first, last, master, *others = entry
            ranges.append((int(first), int(last), _address(master, asked)))
            replicas.extend(_address(node, asked) for node in others)
        return cls(ranges, replicas)

    def master(self, slot: int) -> Address | None:
        index = bisect_right(self._firsts, slot) - 1
        if index < 0:
            return None
        last, master = self._masters[index]
        return master if slot <= last else None

    @property
    def masters(self) -> frozenset[Address]:
        return frozenset(master for _, master in self._masters)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, SlotMap)
            and self._firsts == other._firsts
            and self._masters == other._masters
        )

    __hash__ = None  # type: ignore[assignment]


def _address(node: object, asked: Address) -> Address:
    assert isinstance(node, list) and len(node) >= 2
    host = node[0].decode() if isinstance(node[0], bytes) else str(node[0])
    if host in ("", "?"):
        host = asked[0]
    return host, int(node[1])


def _redirect(exc: RedisReplyError) -> tuple[str, Address] | None:
    """``("MOVED" | "ASK", address)`` of a redirection error reply, else None."""
    parts = str(exc).split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], (host, int(port))


class RedisClusterBroker:
    """The Broker seam over a Redis Cluster; see the module docstring."""

    publish_command = b"SPUBLISH"

    def __init__(
        self,
        target: RedisTarget,
        *,
        on_reconnect: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
        health_check_interval: float = 5.0,
        timeout: float = 5.0,
        max_inflight: int = 10_000,
        parser: Literal["auto", "hiredis", "python"] = "auto",
    ) -> None:
        if not target.cluster:
            raise ValueError("RedisClusterBroker needs a cluster target")
        self._seeds: list[Address] = list(target.cluster)
        self._password = target.password
        self._max_inflight = max_inflight
        self._parser = parser
        self._timeout = timeout
        self._health_interval = health_check_interval
        self._max_backoff = max_backoff
        self._on_reconnect = on_reconnect
        self._on_moved: Callable[[], None] | None = None
        self._handler: MessageHandler | None = None
        self._map: SlotMap | None = None
        self._map_read_at = 0.0
        self._shards: dict[Address, RedisBroker] = {}
        self._wanted: set[str] = set()
        #: channel -> the master it is subscribed on (absent: to be placed)
        self._placed: dict[str, Address] = {}
        self._locks = KeyedLock()
        self._stale = asyncio.Event()
        self._refreshing: asyncio.Future[SlotMap] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    # -- Broker -------------------------------------------------------------------------

    async def start(
        self, handler: MessageHandler, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        if self._task is not None:
            raise RuntimeError("RedisClusterBroker.start() called twice")
        self._handler = handler
        self._on_moved = on_reconnect
        with suppress(BrokerUnavailable):
            slots = await self._refresh()
            await asyncio.gather(*(self._shard(master) for master in slots.masters))
        self._task = asyncio.create_task(self._watch(), name="redis-cluster-topology")

    def channel_key(self, channel: str) -> bytes:
        return shard_channel_key(channel)

    async def publish(self, channel: str, payload: bytes) -> None:
        try:
            await self.command(b"SPUBLISH", self.channel_key(channel), payload)
        except RedisReplyError as exc:
            raise BrokerUnavailable(f"redis SPUBLISH failed: {exc}") from exc

    async def command(
        self, *args: bytes, timeout: float | None = None, replid_at: int | None = None
    ) -> object:
        """One command on the master of its key's slot (``RedisBroker.command``'s contract).

        MOVED is retried once on the master it names (and the map re-read in the
        background); ASK once on the node it names, after ASKING. Raises
        ``BrokerUnavailable`` when the master cannot be reached, and when the cluster did
        nothing but may later (CLUSTERDOWN, TRYAGAIN mid-migration, a second redirection).
        """
        if self._closed:
            raise BrokerUnavailable("broker closed")
        key = args[3] if args[0] in _SCRIPTS and args[2] != b"0" else args[1]
        shard = await self._shard_for(key_slot(key))
        try:
            try:
                return await shard.command(*args, timeout=timeout, replid_at=replid_at)
            except RedisReplyError as exc:
                redirect = _redirect(exc)
                if redirect is None:
                    raise
                kind, address = redirect
                other = await self._shard(address)
                if kind == "MOVED":
                    self._stale.set()  # the slot has a new master: the map and channels follow
                asking = kind == "ASK"
                return await other.command(
                    *args, timeout=timeout, replid_at=replid_at, asking=asking
                )
        except BrokerUnavailable:
            self._stale.set()  # the master may have failed over
            raise
        except RedisReplyError as exc:
            if str(exc).startswith(_RETRY_LATER):  # nothing was done: 503, retry later
                self._stale.set()
                raise BrokerUnavailable(f"redis {args[0].decode()} failed: {exc}") from exc
            raise

    async def pipeline(
        self, commands: Sequence[tuple[tuple[bytes, ...], int | None]], *, timeout: float
    ) -> list[object]:
        """``RedisBroker.pipeline``'s contract, each command as ``command`` runs it (so each
        follows its own redirection); started in this order in one tick, so commands of
        one slot go to its master in one write, in order."""
        replies = await asyncio.gather(
            *(self.command(*args, timeout=timeout, replid_at=at) for args, at in commands),
            return_exceptions=True,
        )
        for reply in replies:
            if isinstance(reply, BrokerUnavailable):
                raise reply
            if isinstance(reply, BaseException) and not isinstance(reply, Exception):
                raise reply
        return list(replies)

    async def subscribe(self, channel: str) -> None:
        async with self._locks.hold(self.channel_key(channel)):
            if channel in self._wanted:
                return
            self._wanted.add(channel)
            try:
                await self._place(channel)
            except BaseException:
                self._wanted.discard(channel)
                raise

    async def unsubscribe(self, channel: str) -> None:
        async with self._locks.hold(self.channel_key(channel)):
            self._wanted.discard(channel)
            address = self._placed.pop(channel, None)
            shard = self._shards.get(address) if address is not None else None
            if shard is not None:
                await shard.unsubscribe(channel)

    @property
    def ready(self) -> bool:
        slots = self._map
        if slots is None or self._closed:
            return False
        return all(
            (shard := self._shards.get(master)) is not None and shard.ready
            for master in slots.masters
        )

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        shards, self._shards = list(self._shards.values()), {}
        await asyncio.gather(*(shard.close() for shard in shards))
        self._wanted.clear()
        self._placed.clear()

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self._wanted)

    @property
    def masters(self) -> frozenset[Address]:
        """The masters of the current slot map (empty before the first read)."""
        return self._map.masters if self._map is not None else frozenset()

    def placement(self, channel: str) -> Address | None:
        """The master ``channel`` is subscribed on, if it is."""
        return self._placed.get(channel)

    # -- routing ------------------------------------------------------------------------

    async def _place(self, channel: str) -> None:
        """Subscribe ``channel`` on its slot's master (MOVED: re-read the map, once)."""
        slot = key_slot(self.channel_key(channel))
        for attempt in range(2):
            shard = await self._shard_for(slot)
            try:
                await shard.subscribe(channel)
            except BrokerUnavailable as exc:
                if attempt == 0 and "MOVED" in str(exc):
                    await self._refresh(min_age=_REFRESH_MIN_INTERVAL)
                    continue
                self._stale.set()
                raise
            address = next(a for a, s in self._shards.items() if s is shard)
            self._placed[channel] = address
            return

    async def _shard_for(self, slot: int) -> RedisBroker:
        slots = self._map
        if slots is None:
            slots = await self._refresh()
        master = slots.master(slot)
        if master is None:
            self._stale.set()
            raise BrokerUnavailable(f"no master serves slot {slot}")
        return await self._shard(master)

    async def _shard(self, address: Address) -> RedisBroker:
        """The broker of the master at ``address`` (started on first use)."""
        shard = self._shards.get(address)
        if shard is not None:
            return shard
        if self._closed:
            raise BrokerUnavailable("broker closed")
        handler = self._handler
        assert handler is not None, "start() first"
        host, port = address
        shard = RedisBroker(
            RedisTarget(url=f"redis://{host}:{port}/0", password=self._password),
            on_reconnect=self._on_reconnect,
            sharded=True,
            on_slot_lost=self._slot_lost,
            max_backoff=self._max_backoff,
            health_check_interval=self._health_interval,
            timeout=self._timeout,
            max_inflight=self._max_inflight,
            parser=self._parser,
        )
        self._shards[address] = shard
        await shard.start(handler, on_reconnect=self._on_moved)
        return shard

    def _slot_lost(self, channel: str) -> None:
        """A master dropped ``channel`` (its slot moved): place it again after a re-read."""
        self._placed.pop(channel, None)
        self._stale.set()

    # -- the slot map -------------------------------------------------------------------

    async def _refresh(self, min_age: float = 0.0) -> SlotMap:
        """Re-read the slot map (concurrent callers share one read); BrokerUnavailable if
        no node answers."""
        loop = asyncio.get_running_loop()
        if self._map is not None and loop.time() - self._map_read_at < min_age:
            return self._map
        attempt = self._refreshing
        if attempt is None:
            attempt = self._refreshing = asyncio.ensure_future(self._read_map())
            attempt.add_done_callback(self._map_read)
        return await asyncio.shield(attempt)

    def _map_read(self, attempt: asyncio.Future[SlotMap]) -> None:
        self._refreshing = None
        if attempt.cancelled() or attempt.exception() is not None:
            return
        self._map = attempt.result()
        self._map_read_at = asyncio.get_running_loop().time()

    def _candidates(self) -> list[Address]:
        """Nodes to ask: the known masters first, then replicas, then the seeds."""
        known: list[Address] = []
        if self._map is not None:
            known = [*self._map.masters, *self._map.replicas]
            random.shuffle(known)
        return list(dict.fromkeys([*known, *self._seeds]))

    async def _read_map(self) -> SlotMap:
        errors: list[str] = []
        for address in self._candidates():
            try:
                async with asyncio.timeout(min(self._timeout, 2.0)):
                    reply = await self._ask(address, b"CLUSTER", b"SLOTS")
                slots = SlotMap.parse(reply, address)
            except (OSError, TimeoutError, ConnectionLost, RedisReplyError, ValueError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            if slots.masters:
                return slots
            errors.append(f"{address[0]}:{address[1]}: no slots")
        raise BrokerUnavailable("no cluster node answers CLUSTER SLOTS: " + "; ".join(errors))

    async def _ask(self, address: Address, *args: bytes) -> object:
        loop = asyncio.get_running_loop()
        reader = make_reader(self._parser)()
        _, conn = await loop.create_connection(
            lambda: RespConnection(reader, {}, ignore_message), address[0], address[1]
        )
        try:
            if self._password is not None:
                await conn.command(b"AUTH", self._password.encode())
            return await conn.command(*args)
        finally:
            conn.abort()

    async def _watch(self) -> None:
        """Re-read the map when told it is stale or every health-check interval, and
        move the channels whose slot changed master."""
        failures = 0
        while True:
            with suppress(TimeoutError):
                delay = (
                    self._health_interval
                    if failures == 0
                    else backoff_delay(failures, cap=self._max_backoff)
                )
                async with asyncio.timeout(delay):
                    await self._stale.wait()
            self._stale.clear()
            try:
                await self._refresh()
                await self._reconcile()
            except BrokerUnavailable as exc:
                if failures == 0:
                    log.warning("redis cluster slot map unavailable (%s); retrying", exc)
                failures += 1
                continue
            except Exception:
                log.exception("unexpected error following the redis cluster slot map")
                failures += 1
                continue
            failures = 0

    async def _reconcile(self) -> None:
        """Move wanted channels to their slot's master; close brokers of ex-masters."""
        slots = self._map
        assert slots is not None
        for master in slots.masters:  # new masters first: connected before channels move
            with suppress(BrokerUnavailable):
                await self._shard(master)
        stray = [
            channel
            for channel in self._wanted
            if (owner := slots.master(key_slot(self.channel_key(channel)))) is not None
            and self._placed.get(channel) != owner
        ]
        moved = 0
        for start in range(0, len(stray), _MOVE_BATCH):  # pipelined, a batch at a time
            done = await asyncio.gather(
                *(self._move(c) for c in stray[start : start + _MOVE_BATCH])
            )
            moved += sum(done)
        for address in [a for a in self._shards if a not in slots.masters]:
            if any(placed == address for placed in self._placed.values()):
                continue
            shard = self._shards.pop(address)
            await shard.close()
        if moved:
            log.info("redis cluster: %d channels moved to their slot's new master", moved)
            if self._on_moved is not None:
                try:
                    self._on_moved()
                except Exception:
                    log.exception("on_reconnect callback raised")

    async def _move(self, channel: str) -> bool:
        """Subscribe ``channel`` on its slot's master, dropped from the old one; False when
        it is no longer wanted or cannot be placed now (the next pass tries again)."""
        async with self._locks.hold(self.channel_key(channel)):
            if channel not in self._wanted:
                return False
            old = self._placed.pop(channel, None)
            if old is not None and (shard := self._shards.get(old)) is not None:
                await shard.unsubscribe(channel)
            try:
                await self._place(channel)
            except BrokerUnavailable:
                self._stale.set()
                return False
            return True
