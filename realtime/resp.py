"""RESP2 over asyncio, for the pub/sub broker: a reader and a pipelined connection.

``RespReader`` is an incremental, sans-I/O RESP2 reader with ``hiredis.Reader``'s
interface; ``make_reader(parser)`` picks ``hiredis`` when it is installed
(``parser="auto"``), else ``RespReader``. ``RespConnection`` is one Redis connection
read by an ``asyncio.Protocol``: commands are pipelined (those of one loop
iteration go in one write; ``flush`` writes them at once) and pub/sub messages are
handed to a handler in the loop turn after ``data_received`` read them, in the order read
(one ``call_soon`` per turn, no task, no await). Used by
``RedisBroker`` (redis_broker.py); the stores use redis-py (redis_client.py).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
from collections import deque
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final, Literal, Protocol, cast

from realtime.broker import MessageHandler

hiredis: ModuleType | None
try:
    hiredis = importlib.import_module("hiredis")
except ImportError:  # pragma: no cover - depends on the environment
    hiredis = None

__all__ = [
    "ConnectionLost",
    "Reader",
    "RedisProtocolError",
    "RedisReplyError",
    "RespConnection",
    "RespReader",
    "make_reader",
    "pack_command",
]

# The broker's logger: these are the broker's connections (one logger name for operators).
log = logging.getLogger("realtime.redis_broker")

_HIREDIS_FEED: Final = 16 * 1024


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from Redis."""


class RedisProtocolError(Exception):
    """Bytes from Redis that are not RESP2: the connection is dropped."""


class ConnectionLost(Exception):
    """The pub/sub connection closed before Redis answered."""


#: ``$<n>`` of a bulk string of n bytes, made once for the usual sizes.
_BULK_HEADS: Final = tuple(b"$%d" % n for n in range(1024))


def pack_command(*args: bytes) -> bytes:
    """One command as RESP2 (an array of bulk strings)."""
    parts = [b"*%d" % len(args)]
    heads = _BULK_HEADS
    for arg in args:
        size = len(arg)
        parts.append(heads[size] if size < 1024 else b"$%d" % size)
        parts.append(arg)
    parts.append(b"")
    return b"\r\n".join(parts)


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


class Reader(Protocol):
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


def make_reader(parser: Literal["auto", "hiredis", "python"]) -> Callable[[], Reader]:
    if parser == "python" or (parser == "auto" and hiredis is None):
        return RespReader
    if hiredis is None:
        raise ValueError('parser="hiredis" but the hiredis package is not installed')
    module = hiredis
    return lambda: _HiredisReader(module)


# --------------------------------------------------------------------------- connection


class _Pending:
    __slots__ = ("deadline", "future", "remaining")

    def __init__(
        self, future: asyncio.Future[object] | None, remaining: int, deadline: float = math.inf
    ) -> None:
        self.future = future
        self.remaining = remaining
        #: the loop time past which ``future`` gets ``TimeoutError`` (inf: never)
        self.deadline = deadline


#: Seconds early a timer may fire (uvloop rounds delays down to milliseconds): commands
#: due within this much of the sweep are timed out by it rather than by one more timer.
_TIMER_SLACK: Final = 0.001


class RespConnection(asyncio.Protocol):
    """One Redis connection: commands are pipelined, pub/sub messages go to ``handler``.

    Every command sent expects ``replies`` replies, in order (SUBSCRIBE of n
    channels: n confirmations); its future gets the last one, or the error
    reply, or ``ConnectionLost``. Messages of channels in ``wanted`` are handed to
    ``handler``. ``lost`` completes when the connection ends.

    Sharded pub/sub (``sharded``): messages are ``smessage``; a ``sunsubscribe`` of a
    channel that no SUNSUBSCRIBE sent here waits for is the server's own (its slot
    moved away) and goes to ``on_unsubscribed(channel)``, not to a command.

    Messages are handed over in the loop turn after they were read (``_hand_over``, one
    ``call_soon`` for all those read meanwhile), not from ``data_received``: a fan-out (up
    to thousands of socket writes) then runs after the callbacks already queued (a
    command's write, a task woken by a reply) instead of ahead of them. The inbox holds
    what was read since the last hand-over (bounded by the reads of one turn); a reply or
    push that follows messages hands them over first: all is seen in the order read.

    Time-outs: one timer per connection, armed for the earliest deadline of the commands
    waiting (not one per command); it times out every command then due and re-arms.
    Must be made in the loop it is used from.
    """

    def __init__(
        self,
        reader: Reader,
        wanted: dict[bytes, str],
        handler: MessageHandler,
        *,
        sharded: bool = False,
        on_unsubscribed: Callable[[bytes], None] | None = None,
    ) -> None:
        self._reader = reader
        self._wanted = wanted
        self._handler = handler
        self._message = b"smessage" if sharded else b"message"
        self._on_unsubscribed = on_unsubscribed
        #: channels of SUNSUBSCRIBEs sent and not yet confirmed, with their count
        self.unsubscribing: dict[bytes, int] = {}
        self._transport: asyncio.Transport | None = None
        self._pending: deque[_Pending] = deque()
        self._outgoing: list[bytes] = []  # packed commands not yet written (this iteration)
        #: pub/sub messages read and not yet handed to ``handler`` (those of this iteration's
        #: reads: the next loop turn takes them all)
        self._inbox: list[tuple[str, bytes]] = []
        # Kept: asyncio.get_running_loop() makes a getpid() system call on every call.
        self._loop = loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None  # armed for ``_timer_at``
        self._timer_at = math.inf
        #: the server's host and port (None on a Unix socket)
        self.address: tuple[str, int] | None = None
        #: the server's replication id when the connection opened (b"": not asked)
        self.replid = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer, self._timer_at = None, math.inf
        pending, self._pending = self._pending, deque()
        for item in pending:
            if item.future is not None and not item.future.done():
                item.future.set_exception(ConnectionLost(str(exc or "connection closed")))
        if not self.lost.done():
            self.lost.set_result(None)

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        wanted = self._wanted
        message = self._message
        inbox = self._inbox
        try:
            reader.feed(data)
            while (reply := reader.gets()) is not False:
                if type(reply) is list and reply and reply[0] == message:
                    name = wanted.get(reply[1])
                    if name is not None:
                        if not inbox:
                            self._loop.call_soon(self._hand_over)
                        inbox.append((name, reply[2]))
                    continue
                if inbox:  # what came before a reply is handled before it (the order read)
                    self._hand_over()
                    inbox = self._inbox
                if self._on_unsubscribed is not None and self._pushed(reply):
                    self._on_unsubscribed(reply[1])
                else:
                    self._reply(reply)
        except RedisProtocolError:
            log.exception("redis pub/sub connection sent bad RESP; dropping it")
            self.abort()

    def _hand_over(self) -> None:
        """Hand the messages read to ``handler``, in the order read."""
        inbox = self._inbox
        if not inbox:
            return
        self._inbox = []
        handler = self._handler
        for name, payload in inbox:
            try:
                handler(name, payload)
            except Exception:
                log.exception("broker handler raised on channel %r", name)

    def _pushed(self, reply: Any) -> bool:
        """A ``sunsubscribe`` the server sent on its own (no SUNSUBSCRIBE of ours waits)."""
        if type(reply) is not list or len(reply) != 3 or reply[0] != b"sunsubscribe":
            return False
        waiting = self.unsubscribing.get(reply[1], 0)
        if waiting == 0:
            return True
        if waiting == 1:
            del self.unsubscribing[reply[1]]
        else:
            self.unsubscribing[reply[1]] = waiting - 1
        return False

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

    async def command(self, *args: bytes, replies: int = 1, timeout: float | None = None) -> object:
        """Send one command and wait for its ``replies`` replies (the last is returned);
        ``TimeoutError`` when they have not come within ``timeout`` seconds (a reply that
        comes later is read and dropped)."""
        return await self.request(*args, replies=replies, timeout=timeout)

    def request(
        self, *args: bytes, replies: int = 1, timeout: float | None = None
    ) -> asyncio.Future[object]:
        """``command`` without a coroutine: the command is sent now (raises
        ``ConnectionLost`` when not connected) and the future gets its reply, its error
        reply, ``ConnectionLost`` or, ``timeout`` seconds on, ``TimeoutError``."""
        loop = self._loop
        future: asyncio.Future[object] = loop.create_future()
        if timeout is None:
            self._send(_Pending(future, replies), args)
            return future
        deadline = loop.time() + timeout
        self._send(_Pending(future, replies, deadline), args)
        if deadline < self._timer_at:
            self._arm(deadline)
        return future

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._sweep)

    def _sweep(self) -> None:
        """Time out the commands now due; re-arm for the earliest deadline left."""
        self._timer, self._timer_at = None, math.inf
        due = self._loop.time() + _TIMER_SLACK
        nearest = math.inf
        for item in self._pending:  # answered in order: a late reply is read and dropped
            future = item.future
            if future is None or future.done() or item.deadline == math.inf:
                continue
            if item.deadline <= due:
                future.set_exception(TimeoutError())
            elif item.deadline < nearest:
                nearest = item.deadline
        if nearest != math.inf:
            self._arm(nearest)

    async def sunsubscribe(self, channel: bytes) -> None:
        """SUNSUBSCRIBE one channel and wait for its confirmation (or error reply)."""
        self.unsubscribing[channel] = self.unsubscribing.get(channel, 0) + 1
        try:
            await self.command(b"SUNSUBSCRIBE", channel)
        except RedisReplyError:  # MOVED: no confirmation will come
            self._pushed([b"sunsubscribe", channel, 0])
            raise

    def send(self, *args: bytes, replies: int = 1) -> None:
        """Send one command whose replies nobody waits for (consumed in order, errors logged)."""
        self._send(_Pending(None, replies), args)

    def _send(self, pending: _Pending, args: tuple[bytes, ...]) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            raise ConnectionLost("not connected")
        self._pending.append(pending)
        if not self._outgoing:  # commands sent in one loop iteration go in one write
            self._loop.call_soon(self._flush)
        self._outgoing.append(pack_command(*args))

    def flush(self) -> None:
        """Write the commands sent so far now, not at the end of the loop iteration."""
        if self._outgoing:
            self._flush()

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if not outgoing:  # written already (``flush``)
            return
        if self._transport is not None:
            self._transport.write(b"".join(outgoing))

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
