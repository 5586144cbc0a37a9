"""RedisBroker: the Broker seam over Redis pub/sub, so that many nodes act as one.

Per node: ONE pub/sub connection, read by an ``asyncio.Protocol`` that parses
RESP2 in ``data_received`` and hands the messages of a read to the handler in the next
loop turn, in order (no task, no await; realtime/resp.py), and ONE supervisor task that
connects, re-subscribes every wanted channel after a loss (exponential backoff
with jitter), health-checks the connection with PING and is cancelled and
awaited by ``close()``. PUBLISHes are pipelined on a second connection (opened
on demand, bounded in-flight count), in call order.

Redis channel of channel ``c``: ``"rt:" + c``; ``"rt:{" + c + "}"`` with ``sharded`` (the
Redis Cluster's sharded pub/sub, SSUBSCRIBE / SPUBLISH, on the master of the channel's
slot: realtime/redis_cluster_broker.py keeps one such broker per master). The parser is
``hiredis`` when it is installed (``parser="auto"``), else a pure-Python RESP2 reader.

Under Redis Sentinel (a ``RedisTarget`` with sentinels) every connection is opened to
the master the sentinels name, and checked with ROLE. The supervisor asks the
sentinels again at each health check: when they name another master (a failover),
both connections are dropped and reopened to it. A READONLY or MASTERDOWN reply on
the command connection (a demoted master) drops that connection too. Commands
answer ``BrokerUnavailable`` while no master is reachable.

A node that reads too slowly is disconnected by Redis at its pub/sub output
buffer limit (``client-output-buffer-limit pubsub``); it then reconnects and
re-subscribes like after any other loss (messages in between are lost: the
broker is at most once).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, suppress
from typing import Final, Literal

from redis.asyncio.connection import parse_url
from redis.exceptions import RedisError

from realtime.broker import BrokerUnavailable, MessageHandler
from realtime.redis_client import RedisTarget, as_target, backoff_delay, make_sentinel
from realtime.resp import (
    ConnectionLost,
    RedisReplyError,
    RespConnection,
    make_reader,
)

__all__ = [
    "CHANNEL_PREFIX",
    "KeyedLock",
    "RedisBroker",
    "Slots",
    "ignore_message",
    "shard_channel_key",
]

log = logging.getLogger(__name__)

CHANNEL_PREFIX: Final = b"rt:"
_SUBSCRIBE_CHUNK: Final = 1000  # channels per SUBSCRIBE command when re-subscribing
#: Error replies of a server that is no longer (or not yet) a usable master.
_NOT_MASTER: Final = ("READONLY", "MASTERDOWN", "LOADING")
_REPLID: Final = re.compile(rb"master_replid:(\w+)")


class KeyedLock:
    """One asyncio.Lock per key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[bytes, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: bytes) -> AsyncIterator[None]:
        entry = self._locks.get(key)
        if entry is None:
            entry = self._locks[key] = (asyncio.Lock(), [0])
        lock, users = entry
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class Slots:
    """At most ``size`` slots taken at once: ``take`` one now, or ``wait`` for one (FIFO);
    ``give`` hands a slot back, to the first waiter if any. (``asyncio.Semaphore``'s bound,
    without its cost on the path where a slot is free.)"""

    __slots__ = ("_waiters", "free")

    def __init__(self, size: int) -> None:
        self.free = size
        self._waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        """Take a slot at once (True); False when none is free or others wait for one."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        """Take a slot, waiting as long as it takes (cancellable: then no slot is held)."""
        if self.take():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # a give() handed its slot over
        except BaseException:
            if future.done() and not future.cancelled():
                self.give()  # handed over as we were cancelled: pass it on
            elif future in self._waiters:
                self._waiters.remove(future)
            raise

    def give(self) -> None:
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
                return
        self.free += 1


# --------------------------------------------------------------------------- broker


class RedisBroker:
    """The Broker seam (realtime/broker.py) over Redis pub/sub; see the module docstring.

    - ``start`` returns after the first connection attempt (``ready`` tells how it went);
      an unreachable Redis is retried in the background.
    - ``subscribe`` returns once Redis confirmed it; it raises ``BrokerUnavailable`` (and
      the channel is not wanted) when the node is not connected or the connection drops
      before the confirmation. A channel already wanted returns at once.
    - ``unsubscribe`` stops delivery at once; it never raises (a subscription on a lost
      connection is gone with it, and a wanted set is what is restored).
    - Calls for one channel are serialised; different channels proceed concurrently.
    - ``on_reconnect`` is called (synchronously) after every successful RE-connection,
      once every wanted channel is subscribed again: messages may have been missed.
    - ``publish`` raises ``BrokerUnavailable`` unless Redis answered the PUBLISH (within
      ``timeout``). PUBLISHes are pipelined on one connection of their own, in call order;
      at most ``max_inflight`` await their reply, later callers wait (within ``timeout``).
    """

    def __init__(
        self,
        url: str | RedisTarget,
        *,
        on_reconnect: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
        health_check_interval: float = 5.0,
        timeout: float = 5.0,
        max_inflight: int = 10_000,
        parser: Literal["auto", "hiredis", "python"] = "auto",
        sharded: bool = False,
        on_slot_lost: Callable[[str], None] | None = None,
    ) -> None:
        self._make_reader = make_reader(parser)
        #: sharded pub/sub (a Redis Cluster master): SSUBSCRIBE, SPUBLISH, hash-tagged names
        self.sharded = sharded
        self.publish_command = b"SPUBLISH" if sharded else b"PUBLISH"
        self._subscribe_command = b"SSUBSCRIBE" if sharded else b"SUBSCRIBE"
        #: called with a channel this broker no longer serves (its slot moved away; a
        #: sharded broker only): it is no longer wanted here
        self._on_slot_lost = on_slot_lost
        target = as_target(url)
        self._sentinel = make_sentinel(target) if target.sentinel else None
        self._master_name = target.master
        options = parse_url(target.url) if target.url else {}
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._path = options.get("path")
        self._db = int(options.get("db") or 0)  # the history scripts' keys live there
        tls = bool(target.url and target.url.startswith("rediss://"))
        self._ssl = ssl.create_default_context() if tls else None
        username = options.get("username")
        password = options.get("password", target.password)
        #: the master the pub/sub connection is on (Sentinel)
        self._master: tuple[str, int] | None = None
        self._auth: tuple[bytes, ...] = ()
        if password is not None:
            self._auth = (b"AUTH", *((username.encode(),) if username else ()), password.encode())
        self._on_reconnect = on_reconnect
        self._on_resubscribed: Callable[[], None] | None = None
        #: set when a command succeeds while pub/sub is down: Redis is back, retry at once
        self._wake = asyncio.Event()
        self._max_backoff = max_backoff
        self._health_interval = health_check_interval
        self._timeout = timeout
        self._publisher: RespConnection | None = None  # pipelined PUBLISH connection
        self._publisher_attempt: asyncio.Future[RespConnection] | None = None
        self._inflight = Slots(max_inflight)
        self._handler: MessageHandler | None = None
        self._wanted: dict[bytes, str] = {}  # Redis channel -> channel name
        self._locks = KeyedLock()
        self._conn: RespConnection | None = None  # set while connected and re-subscribed
        self._latest: RespConnection | None = None  # the newest connection, for close()
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._closed = False

    # -- Broker -------------------------------------------------------------------------

    async def start(
        self, handler: MessageHandler, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        if self._task is not None:
            raise RuntimeError("RedisBroker.start() called twice")
        self._handler = handler
        self._on_resubscribed = on_reconnect
        self._task = asyncio.create_task(self._supervise(), name="redis-broker-supervisor")
        await self._first_attempt.wait()

    def channel_key(self, channel: str) -> bytes:
        """The Redis channel of ``channel``."""
        if self.sharded:
            return shard_channel_key(channel)
        return CHANNEL_PREFIX + channel.encode()

    async def publish(self, channel: str, payload: bytes) -> None:
        try:
            await self.command(self.publish_command, self.channel_key(channel), payload)
        except RedisReplyError as exc:
            raise BrokerUnavailable(f"redis PUBLISH failed: {exc}") from exc

    async def command(
        self,
        *args: bytes,
        timeout: float | None = None,
        replid_at: int | None = None,
        asking: bool = False,
    ) -> object:
        """Run one command on the pipelined publisher connection and return its reply.

        ``replid_at``: the index of an argument replaced by the replication id of the
        server the command goes to (as read when its connection opened; b"" if unknown).
        ``asking``: ASKING goes right before it (a Redis Cluster ASK redirection).

        Raises ``BrokerUnavailable`` unless Redis answered within ``timeout`` (default: the
        broker's); on a time-out the connection is dropped (the next command reconnects).
        An error reply is raised as ``RedisReplyError``.
        """
        if self._closed:
            raise BrokerUnavailable("broker closed")
        conn: RespConnection | None = None
        limit = self._timeout if timeout is None else timeout
        inflight = self._inflight
        try:
            ready = self._publisher
            if ready is not None and not ready.lost.done() and inflight.take():
                # The common case: no slot or connection to wait for, only the reply, timed
                # by the connection (cheaper than a timeout scope; the same bound).
                try:
                    conn = ready
                    reply = await self._request(conn, args, replid_at, asking, limit)
                finally:
                    inflight.give()
            else:
                async with asyncio.timeout(limit):
                    await inflight.wait()
                    try:
                        conn = self._publisher
                        if conn is None or conn.lost.done():
                            conn = await self._publisher_connection()
                        reply = await self._request(conn, args, replid_at, asking, None)
                    finally:
                        inflight.give()
        except TimeoutError as exc:
            if conn is not None:
                conn.abort()  # Redis does not answer: the next command reconnects
            name = args[0].decode()
            raise BrokerUnavailable(f"redis {name} timed out after {limit} s") from exc
        except RedisReplyError as exc:
            if not str(exc).startswith(_NOT_MASTER):
                raise
            if conn is not None:
                conn.abort()  # a demoted master: the next command finds the new one
            raise BrokerUnavailable(f"redis {args[0].decode()} failed: {exc}") from exc
        except (OSError, ConnectionLost) as exc:
            raise BrokerUnavailable(f"redis {args[0].decode()} failed: {exc}") from exc
        if self._conn is None:
            self._wake.set()  # Redis answers: the pub/sub reconnects now
        return reply

    async def pipeline(
        self, commands: Sequence[tuple[tuple[bytes, ...], int | None]], *, timeout: float
    ) -> list[object]:
        """Run ``commands`` (each with its ``replid_at``, as ``command`` takes it) on the
        pipelined connection, written at once in one write in this order (with whatever else
        this iteration sent before them: not behind the loop's next turn, where a fan-out may
        be queued), and return each one's reply,
        or its error reply (``RedisReplyError``) in its place.

        One slot of ``max_inflight`` and no task for them all: the caller wakes once, when
        the last reply has come (replies come in order). Raises ``BrokerUnavailable`` as
        ``command`` does (no reply within ``timeout``, no connection, a demoted master).
        """
        if self._closed:
            raise BrokerUnavailable("broker closed")
        conn: RespConnection | None = None
        futures: list[asyncio.Future[object]] = []
        name = commands[0][0][0].decode()
        try:
            async with asyncio.timeout(timeout):
                await self._inflight.wait()
                try:
                    conn = self._publisher
                    if conn is None or conn.lost.done():
                        conn = await self._publisher_connection()
                    for args, at in commands:
                        sent = args if at is None else (*args[:at], conn.replid, *args[at + 1 :])
                        futures.append(conn.request(*sent))
                    conn.flush()  # the caller waits for these: not behind the next turn
                    with suppress(RedisReplyError, ConnectionLost):  # read below
                        await futures[-1]
                finally:
                    self._inflight.give()
            replies = [f.exception() or f.result() for f in futures]
        except TimeoutError as exc:
            if conn is not None:
                conn.abort()  # Redis does not answer: the next command reconnects
            raise BrokerUnavailable(f"redis {name} timed out after {timeout} s") from exc
        except (OSError, ConnectionLost) as exc:
            raise BrokerUnavailable(f"redis {name} failed: {exc}") from exc
        finally:
            for future in futures:
                if not future.done():
                    future.cancel()  # timed out or cancelled: its reply is dropped
        if self._conn is None:
            self._wake.set()  # Redis answers: the pub/sub reconnects now
        for reply in replies:
            if isinstance(reply, ConnectionLost):
                raise BrokerUnavailable(f"redis {name} failed: {reply}") from reply
            if isinstance(reply, RedisReplyError) and str(reply).startswith(_NOT_MASTER):
                conn.abort()  # a demoted master: the next command finds the new one
                raise BrokerUnavailable(f"redis {name} failed: {reply}") from reply
        return replies

    @staticmethod
    def _request(
        conn: RespConnection,
        args: tuple[bytes, ...],
        replid_at: int | None,
        asking: bool,
        timeout: float | None,
    ) -> asyncio.Future[object]:
        """Send ``args`` on ``conn`` now; the future of its reply."""
        if replid_at is not None:
            args = (*args[:replid_at], conn.replid, *args[replid_at + 1 :])
        if asking:
            conn.send(b"ASKING")  # the same write as the command, just before it
        return conn.request(*args, timeout=timeout)

    async def _publisher_connection(self) -> RespConnection:
        """The publisher connection; concurrent callers share one connection attempt."""
        attempt = self._publisher_attempt
        if attempt is None:
            attempt = asyncio.ensure_future(self._open({}, ignore_message, replid=True))
            self._publisher_attempt = attempt
            attempt.add_done_callback(self._publisher_opened)
        return await asyncio.shield(attempt)

    def _publisher_opened(self, attempt: asyncio.Future[RespConnection]) -> None:
        self._publisher_attempt = None
        if attempt.cancelled() or attempt.exception() is not None:
            return
        if self._closed:
            attempt.result().abort()
        else:
            self._publisher = attempt.result()

    async def subscribe(self, channel: str) -> None:
        key = self.channel_key(channel)
        async with self._locks.hold(key):
            if key in self._wanted:
                return
            conn = self._conn
            if conn is None:
                raise BrokerUnavailable("not connected to redis")
            self._wanted[key] = channel
            try:
                await conn.command(self._subscribe_command, key)
            except (ConnectionLost, RedisReplyError) as exc:
                # Dropped before the supervisor can re-subscribe from ``_wanted``: it wakes
                # after us (FIFO callbacks) and reconnects only after awaiting the network.
                self._wanted.pop(key, None)
                raise BrokerUnavailable(f"redis SUBSCRIBE failed: {exc}") from exc
            except asyncio.CancelledError:
                self._wanted.pop(key, None)
                with suppress(ConnectionLost):
                    if self.sharded:  # ordered after our SSUBSCRIBE; confirmation not awaited
                        conn.unsubscribing[key] = conn.unsubscribing.get(key, 0) + 1
                        conn.send(b"SUNSUBSCRIBE", key)
                    else:
                        conn.send(b"UNSUBSCRIBE", key)  # ordered after our SUBSCRIBE
                raise

    async def unsubscribe(self, channel: str) -> None:
        key = self.channel_key(channel)
        async with self._locks.hold(key):
            if self._wanted.pop(key, None) is None:
                return
            conn = self._conn
            if conn is None:
                return  # the supervisor drops it when it re-subscribes (see _connect)
            # On a lost connection the subscription is gone with it and, no longer wanted,
            # is never restored.
            with suppress(ConnectionLost, RedisReplyError):
                if self.sharded:
                    await conn.sunsubscribe(key)
                else:
                    await conn.command(b"UNSUBSCRIBE", key)

    @property
    def ready(self) -> bool:
        return self._conn is not None

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
        attempt = self._publisher_attempt
        if attempt is not None:
            attempt.cancel()
            await asyncio.wait([attempt])
        for conn in (self._latest, self._publisher):
            if conn is not None:
                conn.abort()
                await asyncio.wait([conn.lost], timeout=self._timeout)
        self._latest = self._publisher = None
        self._wanted.clear()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    # -- introspection (tests, metrics) ---------------------------------------------------

    @property
    def channels(self) -> frozenset[str]:
        """The channels this node wants (restored after a reconnect)."""
        return frozenset(self._wanted.values())

    # -- supervisor ---------------------------------------------------------------------

    async def _supervise(self) -> None:
        # One WARNING when pub/sub goes down (unreachable at start, or lost), one INFO when it
        # is back; nothing per failed attempt in between.
        attempt = 0
        connected_before = False
        down = False
        while True:
            try:
                conn = await self._connect()
            except Exception as exc:
                expected = (OSError, TimeoutError, ConnectionLost, RedisReplyError)
                if not isinstance(exc, expected):
                    log.exception("unexpected error connecting redis pub/sub; retrying")
                elif not down:
                    log.warning("redis pub/sub unreachable (%s); retrying", exc)
                down = True
                self._first_attempt.set()
                self._wake.clear()
                with suppress(TimeoutError):
                    async with asyncio.timeout(backoff_delay(attempt, cap=self._max_backoff)):
                        await self._wake.wait()
                attempt += 1
                continue
            attempt = 0
            self._conn = conn
            self._first_attempt.set()
            if down:
                log.info("redis pub/sub reconnected; %d channels re-subscribed", len(self._wanted))
                down = False
            if connected_before:
                for callback in (self._on_reconnect, self._on_resubscribed):
                    if callback is None:
                        continue
                    try:
                        callback()
                    except Exception:
                        log.exception("on_reconnect callback raised")
            connected_before = True
            try:
                why = await self._watch(conn)
            finally:
                self._conn = None
            log.warning("redis pub/sub connection lost (%s); reconnecting", why)
            down = True

    async def _address(self) -> tuple[str, int]:
        """Where to connect: the URL's host and port, or the master the sentinels name."""
        if self._sentinel is None:
            return self._host, self._port
        try:
            host, port = await self._sentinel.discover_master(self._master_name)
        except RedisError as exc:  # MasterNotFoundError: no sentinel names a healthy master
            raise ConnectionLost(str(exc)) from exc
        return str(host), int(port)

    async def _open(
        self, wanted: dict[bytes, str], handler: MessageHandler, *, replid: bool = False
    ) -> RespConnection:
        """A new authenticated connection (raises OSError, TimeoutError, ConnectionLost...).

        Under Sentinel: to the master the sentinels name, refused unless ROLE says master.
        ``replid``: read the server's replication id into ``conn.replid``.
        """
        loop = asyncio.get_running_loop()
        reader = self._make_reader()

        def factory() -> RespConnection:
            if not self.sharded:
                return RespConnection(reader, wanted, handler)
            lost = self._unsubscribed_by_server
            return RespConnection(reader, wanted, handler, sharded=True, on_unsubscribed=lost)

        async with asyncio.timeout(self._timeout):
            if self._path is not None:
                _, conn = await loop.create_unix_connection(factory, self._path)
            else:
                host, port = await self._address()
                _, conn = await loop.create_connection(factory, host, port, ssl=self._ssl)
                conn.address = (host, port)
            try:
                if self._auth:
                    await conn.command(*self._auth)
                if self._sentinel is not None:
                    role = await conn.command(b"ROLE")
                    if not isinstance(role, list) or not role or role[0] != b"master":
                        raise ConnectionLost(f"{conn.address} is not a master (yet)")
                if self._db:
                    await conn.command(b"SELECT", b"%d" % self._db)
                if replid:
                    info = await conn.command(b"INFO", b"replication")
                    found = _REPLID.search(info if isinstance(info, bytes) else b"")
                    conn.replid = found.group(1) if found else b""
            except BaseException:
                conn.abort()
                raise
        return conn

    async def _connect(self) -> RespConnection:
        """The pub/sub connection, with every wanted channel subscribed."""
        handler = self._handler
        assert handler is not None
        conn = self._latest = await self._open(self._wanted, handler)
        self._master = conn.address
        try:
            async with asyncio.timeout(self._timeout):
                sent = list(self._wanted)
                if self.sharded:
                    subscribed = await self._resubscribe_sharded(conn, sent)
                else:
                    await asyncio.gather(*(
                        conn.command(b"SUBSCRIBE", *chunk, replies=len(chunk))
                        for chunk in _chunks(sent, _SUBSCRIBE_CHUNK)
                    ))  # fmt: skip
                    subscribed = set(sent)
                # Channels unsubscribed while we were not ready (subscribe refuses then).
                while extra := [key for key in subscribed if key not in self._wanted]:
                    subscribed.difference_update(extra)
                    if self.sharded:
                        for key in extra:
                            with suppress(RedisReplyError):
                                await conn.sunsubscribe(key)
                    else:
                        await conn.command(b"UNSUBSCRIBE", *extra, replies=len(extra))
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _resubscribe_sharded(self, conn: RespConnection, keys: list[bytes]) -> set[bytes]:
        """SSUBSCRIBE each of ``keys`` (one slot per command) and return those subscribed;
        a channel whose slot this master no longer serves (MOVED) is given up and
        reported (``on_slot_lost``)."""
        replies = await asyncio.gather(
            *(conn.command(b"SSUBSCRIBE", key) for key in keys), return_exceptions=True
        )
        subscribed = set()
        for key, reply in zip(keys, replies, strict=True):
            if not isinstance(reply, BaseException):
                subscribed.add(key)
                continue
            if not isinstance(reply, RedisReplyError) or not str(reply).startswith("MOVED"):
                raise reply
            self._unsubscribed_by_server(key)
        return subscribed

    def _unsubscribed_by_server(self, key: bytes) -> None:
        """The server dropped (or refused) ``key``: its slot is served elsewhere now."""
        name = self._wanted.pop(key, None)
        if name is not None and self._on_slot_lost is not None:
            self._on_slot_lost(name)

    async def _watch(self, conn: RespConnection) -> str:
        """Return why ``conn`` was lost; PING it when idle and drop it if it does not answer."""
        try:
            while not conn.lost.done():
                await asyncio.wait([conn.lost], timeout=self._health_interval)
                if conn.lost.done():
                    break
                try:
                    async with asyncio.timeout(self._timeout):
                        await conn.command(b"PING")
                except (TimeoutError, ConnectionLost, RedisReplyError):
                    conn.abort()
                    await conn.lost
                    return "no answer to PING"
                moved = await self._master_moved()
                if moved is not None:
                    conn.abort()
                    if self._publisher is not None:
                        self._publisher.abort()
                    await conn.lost
                    return f"the sentinels name another master, {moved}"
            return "closed by Redis or the network"
        except asyncio.CancelledError:
            conn.abort()
            raise

    async def _master_moved(self) -> str | None:
        """Under Sentinel, ``host:port`` of a master other than ours the sentinels name.

        None when they name ours, or cannot be asked (a working master is kept).
        """
        if self._sentinel is None:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                address = await self._address()
        except (TimeoutError, ConnectionLost):
            return None
        if address == self._master:
            return None
        return f"{address[0]}:{address[1]}"


def shard_channel_key(channel: str) -> bytes:
    """The shard channel of ``channel`` on a Redis Cluster: hash-tagged, in the slot of the
    channel's history keys (realtime/redis_history.py)."""
    return b"rt:{%s}" % channel.encode()


def ignore_message(channel: str, payload: bytes) -> None:
    """A connection that subscribes to nothing (a publisher, a slot-map reader)."""


def _chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
