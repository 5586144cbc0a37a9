"""RedisBroker: the Broker seam over Redis pub/sub, so that many nodes act as one.

Per node: ONE pub/sub connection, read by an ``asyncio.Protocol`` that parses
RESP2 in ``data_received`` and hands every message to the handler synchronously
(no task, no await, no queue per message), and ONE supervisor task that
connects, re-subscribes every wanted channel after a loss (exponential backoff
with jitter), health-checks the connection with PING and is cancelled and
awaited by ``close()``. PUBLISHes are pipelined on a second connection (opened
on demand, bounded in-flight count), in call order.

Redis channel of channel ``c``: ``"rt:" + c``. The parser is ``hiredis`` when it
is installed (``parser="auto"``), else a pure-Python RESP2 reader.

A node that reads too slowly is disconnected by Redis at its pub/sub output
buffer limit (``client-output-buffer-limit pubsub``); it then reconnects and
re-subscribes like after any other loss (messages in between are lost: the
broker is at most once).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from types import ModuleType
from typing import Any, Final, Literal, Protocol, cast

import redis.asyncio as aredis
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from realtime.broker import BrokerUnavailable, MessageHandler

hiredis: ModuleType | None
try:
    hiredis = importlib.import_module("hiredis")
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None

__all__ = [
    "CHANNEL_PREFIX",
    "RedisBroker",
    "RedisProtocolError",
    "RedisReplyError",
    "RespReader",
    "backoff_delay",
    "make_client",
    "redis_errors",
]

log = logging.getLogger(__name__)

CHANNEL_PREFIX: Final = b"rt:"
_SUBSCRIBE_CHUNK: Final = 1000  # channels per SUBSCRIBE command when re-subscribing
_BACKOFF_BASE: Final = 0.05
_HIREDIS_FEED: Final = 16 * 1024


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RedisProtocolError(Exception):
    """Bytes from Redis that are not RESP2: the connection is dropped."""


class _ConnectionLost(Exception):
    """The pub/sub connection closed before Redis answered."""


# --------------------------------------------------------------------------- helpers


def make_client(url: str, *, timeout: float = 5.0, max_connections: int = 32) -> aredis.Redis:
    """A command client for ``url``: bytes replies, no retries, bounded pool.

    No command is retried (a retried PUBLISH / SET NX / rate-limit hit could
    apply twice). At most ``max_connections`` commands are in flight; a caller
    beyond that waits up to ``timeout`` s for a connection, then gets a
    ``ConnectionError`` (mapped to ``BrokerUnavailable`` by ``redis_errors``).
    """
    pool = aredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        protocol=2,
    )
    return aredis.Redis.from_pool(pool)


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Re-raise a Redis or socket error in the block as ``BrokerUnavailable``."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise BrokerUnavailable(f"redis {what} failed: {exc}") from exc


def backoff_delay(attempt: int, *, cap: float, base: float = _BACKOFF_BASE,
                  rand: Callable[[], float] = random.random) -> float:  # fmt: skip
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, jittered.

    ``d = min(cap, base * 2**attempt)``; the delay is uniform in ``[d/2, d]``, so
    nodes that lost Redis together do not reconnect in lock-step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + rand() * ceiling / 2


def _pack(*args: bytes) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


# --------------------------------------------------------------------------- RESP2 reader


class _Incomplete(Exception):
    def __init__(self, need: int) -> None:
        self.need = need


_MESSAGE: Final = b"*3\r\n$7\r\nmessage\r\n"


def _bulk(buf: bytes, pos: int) -> tuple[bytes | None, int]:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(max(pos, len(buf)) + 1)
    if buf[pos] != 0x24:  # "$"
        raise RedisProtocolError(f"expected a bulk string at {buf[pos : pos + 16]!r}")
    size = int(buf[pos + 1 : end])
    if size < 0:
        return None, end + 2
    start = end + 2
    stop = start + size
    if stop + 2 > len(buf):
        raise _Incomplete(stop + 2)
    return buf[start:stop], stop + 2


def _value(buf: bytes, pos: int) -> tuple[object, int]:
    if pos >= len(buf):
        raise _Incomplete(pos + 1)
    kind = buf[pos]
    if kind == 0x24:  # "$"
        return _bulk(buf, pos)
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete(len(buf) + 1)
    if kind == 0x2A:  # "*"
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items: list[object] = []
        pos = end + 2
        for _ in range(count):
            item, pos = _value(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x3A:  # ":"
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x2B:  # "+"
        return buf[pos + 1 : end], end + 2
    if kind == 0x2D:  # "-"
        return RedisReplyError(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise RedisProtocolError(f"unknown RESP type byte {kind!r}")


class RespReader:
    """Incremental RESP2 reader with ``hiredis.Reader``'s interface (sans-I/O).

    ``feed(data)`` appends bytes; ``gets()`` returns the next complete reply, or
    ``False`` when more bytes are needed. Replies: bytes (simple and bulk
    strings), int, list, None (nil), ``RedisReplyError`` (error replies). Raises
    ``RedisProtocolError`` on bytes that are not RESP2. A reply split across many
    chunks is joined once, when enough bytes have arrived.
    """

    __slots__ = ("_buf", "_chunks", "_need", "_pos", "_size")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0
        self._chunks: list[bytes] = []
        self._size = 0
        self._need = 0

    def feed(self, data: bytes) -> None:
        if self._chunks:
            self._chunks.append(data)
            self._size += len(data)
        elif self._pos >= len(self._buf):
            self._buf = data
            self._pos = 0
            return
        else:
            rest = self._buf[self._pos :]
            self._chunks = [rest, data]
            self._size = len(rest) + len(data)
            self._buf = b""
            self._pos = 0
        if self._size >= self._need:
            self._buf = b"".join(self._chunks)
            self._chunks = []

    def gets(self) -> Any:
        if self._chunks:
            return False
        buf = self._buf
        pos = self._pos
        if pos >= len(buf):
            return False
        try:
            if buf.startswith(_MESSAGE, pos):  # the hot path: a pub/sub message
                channel, after = _bulk(buf, pos + 17)
                payload, after = _bulk(buf, after)
                value: object = [b"message", channel, payload]
            else:
                value, after = _value(buf, pos)
        except _Incomplete as incomplete:
            self._need = incomplete.need - pos
            return False
        except (ValueError, IndexError) as exc:
            raise RedisProtocolError(f"malformed RESP: {exc}") from exc
        self._pos = after
        return value


class _Reader(Protocol):
    def feed(self, data: bytes, /) -> None: ...

    def gets(self) -> Any: ...


class _HiredisReader:
    """A ``hiredis.Reader`` fed at most ``_HIREDIS_FEED`` bytes at a time.

    hiredis moves the rest of its buffer after each reply it returns, so one
    256 KiB feed of 1 KiB messages costs more than parsing them in Python; small
    feeds keep that move short (measured: 16 KiB is 3-5x faster than whole reads).
    """

    __slots__ = ("_data", "_offset", "_reader")

    def __init__(self, module: ModuleType) -> None:
        self._reader = module.Reader(protocolError=RedisProtocolError, replyError=RedisReplyError)
        self._data = b""
        self._offset = 0

    def feed(self, data: bytes) -> None:
        if self._offset < len(self._data):  # not expected: gets() was not drained
            self._reader.feed(self._data, self._offset, len(self._data) - self._offset)
        self._data = data
        self._offset = 0

    def gets(self) -> Any:
        reader = self._reader
        reply = reader.gets()
        while reply is False:
            data = self._data
            offset = self._offset
            if offset >= len(data):
                return False
            size = min(_HIREDIS_FEED, len(data) - offset)
            reader.feed(data, offset, size)
            self._offset = offset + size
            reply = reader.gets()
        return reply


def _make_reader(parser: Literal["auto", "hiredis", "python"]) -> Callable[[], _Reader]:
    if parser == "python" or (parser == "auto" and hiredis is None):
        return RespReader
    if hiredis is None:
        raise ValueError('parser="hiredis" but the hiredis package is not installed')
    module = hiredis
    return lambda: _HiredisReader(module)


# --------------------------------------------------------------------------- connection


class _Pending:
    __slots__ = ("future", "remaining")

    def __init__(self, future: asyncio.Future[object] | None, remaining: int) -> None:
        self.future = future
        self.remaining = remaining


class _RespConnection(asyncio.Protocol):
    """One Redis connection: commands are pipelined, pub/sub messages go to ``handler``.

    Every command sent expects ``replies`` replies, in order (SUBSCRIBE of n
    channels: n confirmations); its future gets the last one, or the error
    reply, or ``_ConnectionLost``. Messages of channels in ``wanted`` are handed to
    ``handler`` from ``data_received``. ``lost`` completes when the connection ends.
    """

    def __init__(self, reader: _Reader, wanted: dict[bytes, str], handler: MessageHandler) -> None:
        self._reader = reader
        self._wanted = wanted
        self._handler = handler
        self._transport: asyncio.Transport | None = None
        self._pending: deque[_Pending] = deque()
        self._outgoing: list[bytes] = []  # packed commands not yet written (this iteration)
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        pending, self._pending = self._pending, deque()
        for item in pending:
            if item.future is not None and not item.future.done():
                item.future.set_exception(_ConnectionLost(str(exc or "connection closed")))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        wanted = self._wanted
        handler = self._handler
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if type(reply) is list and reply and reply[0] == b"message":
                    name = wanted.get(reply[1])
                    if name is not None:
                        try:
                            handler(name, reply[2])
                        except Exception:
                            log.exception("broker handler raised on channel %r", name)
                else:
                    self._reply(reply)
        except RedisProtocolError:
            log.exception("redis pub/sub connection sent bad RESP; dropping it")
            self.abort()

    def _reply(self, reply: object) -> None:
        if not self._pending:
            log.debug("unexpected reply on the pub/sub connection: %r", reply)
            return
        head = self._pending[0]
        future = head.future
        if isinstance(reply, RedisReplyError):
            self._pending.popleft()
            if future is not None and not future.done():
                future.set_exception(reply)
            elif future is None:
                log.warning("redis pub/sub error reply: %s", reply)
            return
        head.remaining -= 1
        if head.remaining <= 0:
            self._pending.popleft()
            if future is not None and not future.done():
                future.set_result(reply)

    async def command(self, *args: bytes, replies: int = 1) -> object:
        """Send one command and wait for its ``replies`` replies (the last is returned)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._send(_Pending(future, replies), args)
        return await future

    def send(self, *args: bytes, replies: int = 1) -> None:
        """Send one command whose replies nobody waits for (consumed in order, errors logged)."""
        self._send(_Pending(None, replies), args)

    def _send(self, pending: _Pending, args: tuple[bytes, ...]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise _ConnectionLost("not connected")
        self._pending.append(pending)
        if not self._outgoing:  # commands sent in one loop iteration go in one write
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(_pack(*args))

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class _KeyedLock:
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
        url: str,
        *,
        on_reconnect: Callable[[], None] | None = None,
        max_backoff: float = 5.0,
        health_check_interval: float = 5.0,
        timeout: float = 5.0,
        max_inflight: int = 10_000,
        parser: Literal["auto", "hiredis", "python"] = "auto",
    ) -> None:
        self._make_reader = _make_reader(parser)
        options = parse_url(url)
        self._host = str(options.get("host", "localhost"))
        self._port = int(options.get("port", 6379))
        self._path = options.get("path")
        self._ssl = ssl.create_default_context() if url.startswith("rediss://") else None
        username = options.get("username")
        password = options.get("password")
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
        self._publisher: _RespConnection | None = None  # pipelined PUBLISH connection
        self._publisher_attempt: asyncio.Future[_RespConnection] | None = None
        self._inflight = asyncio.Semaphore(max_inflight)
        self._handler: MessageHandler | None = None
        self._wanted: dict[bytes, str] = {}  # Redis channel -> channel name
        self._locks = _KeyedLock()
        self._conn: _RespConnection | None = None  # set while connected and re-subscribed
        self._latest: _RespConnection | None = None  # the newest connection, for close()
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

    async def publish(self, channel: str, payload: bytes) -> None:
        try:
            await self.command(b"PUBLISH", CHANNEL_PREFIX + channel.encode(), payload)
        except RedisReplyError as exc:
            raise BrokerUnavailable(f"redis PUBLISH failed: {exc}") from exc

    async def command(self, *args: bytes, timeout: float | None = None) -> object:
        """Run one command on the pipelined publisher connection and return its reply.

        Raises ``BrokerUnavailable`` unless Redis answered within ``timeout`` (default: the
        broker's); on a time-out the connection is dropped (the next command reconnects).
        An error reply is raised as ``RedisReplyError``.
        """
        if self._closed:
            raise BrokerUnavailable("broker closed")
        conn: _RespConnection | None = None
        limit = self._timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                async with self._inflight:
                    conn = self._publisher
                    if conn is None or conn.lost.done():
                        conn = await self._publisher_connection()
                    reply = await conn.command(*args)
                    if self._conn is None:
                        self._wake.set()  # Redis answers: the pub/sub reconnects now
                    return reply
        except TimeoutError as exc:
            if conn is not None:
                conn.abort()  # Redis does not answer: the next command reconnects
            name = args[0].decode()
            raise BrokerUnavailable(f"redis {name} timed out after {limit} s") from exc
        except (OSError, _ConnectionLost) as exc:
            raise BrokerUnavailable(f"redis {args[0].decode()} failed: {exc}") from exc

    async def _publisher_connection(self) -> _RespConnection:
        """The publisher connection; concurrent callers share one connection attempt."""
        attempt = self._publisher_attempt
        if attempt is None:
            attempt = asyncio.ensure_future(self._open({}, _ignore_message))
            self._publisher_attempt = attempt
            attempt.add_done_callback(self._publisher_opened)
        return await asyncio.shield(attempt)

    def _publisher_opened(self, attempt: asyncio.Future[_RespConnection]) -> None:
        self._publisher_attempt = None
        if attempt.cancelled() or attempt.exception() is not None:
            return
        if self._closed:
            attempt.result().abort()
        else:
            self._publisher = attempt.result()

    async def subscribe(self, channel: str) -> None:
        key = CHANNEL_PREFIX + channel.encode()
        async with self._locks.hold(key):
            if key in self._wanted:
                return
            conn = self._conn
            if conn is None:
                raise BrokerUnavailable("not connected to redis")
            self._wanted[key] = channel
            try:
                await conn.command(b"SUBSCRIBE", key)
            except (_ConnectionLost, RedisReplyError) as exc:
                # Dropped before the supervisor can re-subscribe from ``_wanted``: it wakes
                # after us (FIFO callbacks) and reconnects only after awaiting the network.
                self._wanted.pop(key, None)
                raise BrokerUnavailable(f"redis SUBSCRIBE failed: {exc}") from exc
            except asyncio.CancelledError:
                self._wanted.pop(key, None)
                with suppress(_ConnectionLost):
                    conn.send(b"UNSUBSCRIBE", key)  # ordered after our SUBSCRIBE
                raise

    async def unsubscribe(self, channel: str) -> None:
        key = CHANNEL_PREFIX + channel.encode()
        async with self._locks.hold(key):
            if self._wanted.pop(key, None) is None:
                return
            conn = self._conn
            if conn is None:
                return  # the supervisor drops it when it re-subscribes (see _connect)
            # On a lost connection the subscription is gone with it and, no longer wanted,
            # is never restored.
            with suppress(_ConnectionLost, RedisReplyError):
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
                expected = (OSError, TimeoutError, _ConnectionLost, RedisReplyError)
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

    async def _open(self, wanted: dict[bytes, str], handler: MessageHandler) -> _RespConnection:
        """A new authenticated connection (raises OSError, TimeoutError, _ConnectionLost...)."""
        loop = asyncio.get_running_loop()
        reader = self._make_reader()

        def factory() -> _RespConnection:
            return _RespConnection(reader, wanted, handler)

        async with asyncio.timeout(self._timeout):
            if self._path is not None:
                _, conn = await loop.create_unix_connection(factory, self._path)
            else:
                _, conn = await loop.create_connection(
                    factory, self._host, self._port, ssl=self._ssl
                )
            try:
                if self._auth:
                    await conn.command(*self._auth)
            except BaseException:
                conn.abort()
                raise
        return conn

    async def _connect(self) -> _RespConnection:
        """The pub/sub connection, with every wanted channel subscribed."""
        handler = self._handler
        assert handler is not None
        conn = self._latest = await self._open(self._wanted, handler)
        try:
            async with asyncio.timeout(self._timeout):
                sent = list(self._wanted)
                await asyncio.gather(*(
                    conn.command(b"SUBSCRIBE", *chunk, replies=len(chunk))
                    for chunk in _chunks(sent, _SUBSCRIBE_CHUNK)
                ))  # fmt: skip
                # Channels unsubscribed while we were not ready (subscribe refuses then).
                subscribed = set(sent)
                while extra := [key for key in subscribed if key not in self._wanted]:
                    subscribed.difference_update(extra)
                    await conn.command(b"UNSUBSCRIBE", *extra, replies=len(extra))
        except BaseException:
            conn.abort()
            raise
        return conn

    async def _watch(self, conn: _RespConnection) -> str:
        """Return why ``conn`` was lost; PING it when idle and drop it if it does not answer."""
        try:
            while not conn.lost.done():
                await asyncio.wait([conn.lost], timeout=self._health_interval)
                if conn.lost.done():
                    break
                try:
                    async with asyncio.timeout(self._timeout):
                        await conn.command(b"PING")
                except (TimeoutError, _ConnectionLost, RedisReplyError):
                    conn.abort()
                    await conn.lost
                    return "no answer to PING"
            return "closed by Redis or the network"
        except asyncio.CancelledError:
            conn.abort()
            raise


def _ignore_message(channel: str, payload: bytes) -> None:
    """The publisher connection subscribes to nothing."""


def _chunks(items: list[bytes], size: int) -> Iterator[list[bytes]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
