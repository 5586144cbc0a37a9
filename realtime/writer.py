"""The write side of connections: one connection's ``Writer``, the node's flush queue, and
``write_to_all``, which gives one message to many writers, encoded once per codec.

A ``Writer`` turns complete frames into socket writes, in order, without a task
or an await: while its socket takes data a frame joins the writer's pending
frames, and the node's ``FlushQueue`` (one ``call_soon`` while any writer has
pending frames) hands each writer's frames to its socket in one write, 128
writers per loop iteration (sooner, at ``FLUSH_BYTES``): the busier the node,
the more frames share a write. A fan-out to a node that is keeping up (no
writer waits in the queue, none for ``QUIET_S``, at most ``DIRECT_MAX``
subscribers: ``FlushQueue.begin_fan_out``) has nothing to coalesce with, and
its frames are written at once instead, to every writer with nothing pending
or queued. While the socket is paused a frame waits in the bounded outbox
instead; at the bound the connection is closed with 4008 and the outbox
dropped. ``resume`` writes the outbox, coalesced, in order. Once closed, a
writer writes nothing more.

The writer knows its socket only through ``write`` (the transport's) and a
``Socket``'s ``close_with``: the real one is ``RealtimeWSProtocol``, tests pass
a fake. Where ``sendfast`` (realtime/sendfast.c) was built and the transport is uvloop's
plain TCP one, ``direct_socket`` sets the transport to pause its protocol as soon as it
holds a byte (high-water mark 0), so a writer that is not paused knows its transport holds
nothing, whoever wrote to it: such a writer sends from C with one ``send(2)``; what the
socket does not take goes to the transport after it (which pauses the writer), and bytes
leave in the order they were given. The descriptor is valid while the writer is open: the
connection stops its writer in ``connection_lost``, and uvloop closes the socket only after
that.

This module is the per-delivery path: ``realtime/native_build.py`` compiles it with mypyc
where the machine can, and ``realtime/native.py`` runs that build while it is current (the
interpreted module otherwise; both pass the same tests).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, cast

from realtime.node import LogThrottle
from realtime.protocol import CODECS, CloseCode, Codec

if TYPE_CHECKING:
    from realtime.metrics import Metrics

#: Writers flushed per loop iteration (the loop reads its sockets between slices).
FLUSH_SLICE: Final = 128
#: Pending bytes at which a writer writes at once instead of waiting for the flush.
FLUSH_BYTES: Final = 64 * 1024
#: The largest fan-out written at once (a larger one goes through the queue, in slices).
DIRECT_MAX: Final = 1024
#: Seconds since the last fan-out after which a node counts as keeping up: a message that
#: arrives sooner (a list publish, a busy node) is coalesced with what follows.
QUIET_S: Final = 0.001
#: Largest single write when the outbox is flushed on resume.
RESUME_CHUNK_BYTES: Final = 256 * 1024
#: The outbox of a writer that never queued: takes nothing (maxlen 0), costs nothing.
_NO_OUTBOX: Final[deque[bytes]] = deque(maxlen=0)


def _load_send_now() -> Callable[[int, bytes], int] | None:
    try:
        from realtime.sendfast import send
    except ImportError:  # not built (or switched off): every write goes through the transport
        return None
    return send


#: ``send(fd, data)``: the bytes left unsent after one non-blocking send (-1: a socket error).
SEND_NOW: Final = _load_send_now()


def direct_socket(transport: asyncio.BaseTransport) -> int:
    """Make ``transport`` ready for a writer's sends from C and return its socket's
    descriptor, or -1 (every write goes through the transport). Only uvloop's plain TCP
    transport qualifies (TLS must go through its transport), and only where ``sendfast`` was
    built. Its high-water mark becomes 0: the protocol is paused while the transport holds a
    byte and resumed once it holds none. The descriptor stays open until after the
    protocol's ``connection_lost``, where the connection stops its writer."""
    if SEND_NOW is None or _TCP_TRANSPORT is None or type(transport) is not _TCP_TRANSPORT:
        return -1
    sock = transport.get_extra_info("socket")
    try:
        fd = sock.fileno() if sock is not None else -1
    except OSError:
        return -1
    if not isinstance(fd, int) or fd < 0:
        return -1
    cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=0, low=0)
    return fd


def _tcp_transport_type() -> type | None:
    try:
        loop_module = importlib.import_module("uvloop.loop")
    except ImportError:
        return None
    found = getattr(loop_module, "TCPTransport", None)  # not in uvloop's stubs
    return found if isinstance(found, type) else None


_TCP_TRANSPORT: Final = _tcp_transport_type()


#: ``write(data)``: hand bytes to the socket; raises RuntimeError once the socket is closed.
WriteBytes = Callable[[bytes], None]


class FrameSink(Protocol):
    """Where a fan-out puts a subscriber's frames (a ``Writer``; tests pass fakes)."""

    def write(self, data: bytes, /) -> None:
        """Take one complete frame; never blocks, never raises."""
        ...

    def close(self, code: CloseCode, reason: str = "", /) -> None:
        """Close the subscriber's connection after what it was given."""
        ...


class Recipient(Protocol):
    """What ``write_to_all`` needs of a connection."""

    @property
    def codec(self) -> Codec: ...

    @property
    def writer(self) -> FrameSink: ...

    def fail(self, exc: BaseException, where: str, /) -> None: ...


class Socket(Protocol):
    """How a writer closes its socket."""

    def close_with(self, code: int, reason: str, timeout: float) -> None:
        """Send a close frame after what was written; abort if unanswered in ``timeout`` s."""
        ...


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """The bound of one writer's outbox (beyond either, the connection is closed with 4008),
    and how long a close waits for the client's answer."""

    max_messages: int
    max_bytes: int
    close_timeout: float = 5.0


class FlushQueue:
    """The writers with pending frames on one node, flushed in slices, in the order they got
    their first pending frame. Bounded by the node's writers (each is queued at most once).

    ``direct``: True during a fan-out whose frames are written at once (``begin_fan_out``);
    never with ``direct_max`` 0 (a queue made without it always coalesces).
    """

    __slots__ = ("_direct_max", "_loop", "_pending", "_quiet_after", "_scheduled", "direct")

    def __init__(
        self, loop: asyncio.AbstractEventLoop | None = None, *, direct_max: int = 0
    ) -> None:
        self._pending: deque[Writer] = deque()
        self._scheduled = False
        self._loop = loop
        self._direct_max = direct_max
        self._quiet_after = 0.0
        self.direct = False

    def __len__(self) -> int:
        return len(self._pending)

    def begin_fan_out(self, count: int) -> None:
        """A message is about to go to ``count`` writers: written at once when the node keeps
        up (nothing waits in the queue, no fan-out for ``QUIET_S``) and ``count`` is at most
        ``direct_max``; otherwise coalesced. ``end_fan_out`` must follow."""
        self.direct = (
            0 < count <= self._direct_max
            and not self._pending
            and self._running_loop().time() >= self._quiet_after
        )

    def end_fan_out(self) -> None:
        self.direct = False
        if self._direct_max:
            self._quiet_after = self._running_loop().time() + QUIET_S

    def add(self, writer: Writer) -> None:
        """``writer`` has a first pending frame: it is flushed with the others, in turn."""
        self._pending.append(writer)
        if not self._scheduled:
            self._schedule()

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _schedule(self) -> None:
        self._scheduled = True
        self._running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """One write per pending writer, ``FLUSH_SLICE`` writers now, the rest next iteration.

        Between slices the loop reads its sockets, so a message that arrives during a big
        fan-out joins the pending frames of the writers not yet written (one write carries
        both); the writers already written are queued again.
        """
        pending = self._pending
        count = len(pending)
        if count > FLUSH_SLICE:
            count = FLUSH_SLICE
            self._schedule()  # the rest, after the sockets
        else:
            self._scheduled = False  # a writer queued from here on schedules anew
        popleft = pending.popleft
        try:
            for _ in range(count):
                writer = popleft()
                try:
                    writer.flush()
                except Exception as exc:  # the fault boundary: this writer's alone
                    writer.fail(exc)
        finally:
            if pending and not self._scheduled:  # a flush raised: the rest still go
                self._schedule()


class Writer:
    """The ordered, bounded output of one connection. See the module docstring."""

    __slots__ = (
        "_fd",
        "_flushes",
        "_metrics",
        "_socket",
        "_write",
        "close_timer",
        "closed",
        "codec_index",
        "limits",
        "outbox",
        "outbox_bytes",
        "paused",
        "pending",
        "pending_bytes",
    )

    def __init__(
        self,
        write: WriteBytes,
        socket: Socket,
        flushes: FlushQueue,
        limits: OutboxLimits,
        metrics: Metrics,
        *,
        paused: bool = False,
        codec_index: int = 0,
        fd: int = -1,
    ) -> None:
        self._write = write
        #: the socket's descriptor for ``SEND_NOW``, from ``direct_socket`` (which makes
        #: "not paused" mean "the transport holds nothing"); None: every write goes to ``write``
        self._fd: int | None = fd if SEND_NOW is not None and fd >= 0 else None  # (boxed once)
        #: the index in ``CODECS`` of the frames this writer takes (its connection's codec)
        self.codec_index = codec_index
        self._socket = socket
        self._flushes = flushes
        self._metrics = metrics
        self.limits = limits
        #: the socket's buffer is full (``pause`` / ``resume``)
        self.paused = paused
        #: frames taken but not yet handed to the socket (see ``flush``)
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self.outbox = _NO_OUTBOX  # a deque of its own from the first frame it queues
        self.outbox_bytes = 0
        self.closed = False
        #: the drain's deadline, while a drain waits for the outbox
        self.close_timer: asyncio.TimerHandle | None = None

    def write(self, data: bytes) -> None:
        """Take one complete frame: written at once in a direct fan-out, or when it is
        ``FLUSH_BYTES`` or more, when nothing of this writer waits; else with the next
        flush, or queued while the socket is paused (4008 at the outbox's bound). Nothing
        happens once closed."""
        if self.closed:
            return
        pending = self.pending
        if pending:
            pending.append(data)
            self.pending_bytes += len(data)
            if self.pending_bytes >= FLUSH_BYTES:
                self.flush()
            return
        if self.outbox_bytes or self.paused:  # (frames are never empty: bytes, not len(deque))
            self._queue(data)
            return
        flushes = self._flushes
        # At once (``_transmit`` inlined: this runs once per delivery); a large frame too
        # (a resume's reply: nothing to coalesce it with, and the flush may be slices away).
        if flushes.direct or len(data) >= FLUSH_BYTES:
            try:
                self._send(data)
            except RuntimeError:
                self._finish()
            except Exception as exc:  # as the flush queue would: this writer's alone
                self.fail(exc)
            return
        pending.append(data)
        self.pending_bytes = len(data)
        flushes.add(self)

    def _queue(self, data: bytes) -> None:
        outbox = self.outbox
        if outbox is _NO_OUTBOX:
            outbox = self.outbox = deque()
        limits = self.limits
        if len(outbox) >= limits.max_messages or self.outbox_bytes + len(data) > limits.max_bytes:
            self._metrics.overflows.inc()
            self.close(CloseCode.SLOW_CONSUMER, "slow consumer")
            return
        outbox.append(data)
        self.outbox_bytes += len(data)

    def flush(self) -> None:
        """Hand the pending frames to the socket in one write (the flush queue calls it).

        They go even if the socket paused meanwhile: that is at most ``FLUSH_BYTES`` plus
        one frame more in its buffer; later frames wait in the bounded outbox.
        """
        pending = self.pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self.pending_bytes = 0
        if not self.closed:
            self._transmit(data)

    def _transmit(self, data: bytes) -> None:
        """Write to the socket; on a socket already closed (uvloop raises) the writer is
        closed and what it queued is dropped: nothing more can reach the client."""
        try:
            self._send(data)
        except RuntimeError:
            self._finish()

    def _send(self, data: bytes) -> None:
        """Send from C when the transport holds nothing (not paused: see ``direct_socket``);
        what the socket does not take now goes to the transport, after it. Else through the
        transport, in order."""
        fd = self._fd
        send = SEND_NOW
        if fd is not None and send is not None and not self.paused:
            left = send(fd, data)
            if left == 0:
                return
            if left > 0:
                data = data[len(data) - left :]
        self._write(data)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        """The socket takes data again: write the outbox in order, coalesced; a drain whose
        outbox is now empty closes (1001)."""
        self.paused = False
        outbox = self.outbox
        while outbox and not self.paused and not self.closed:
            chunk: list[bytes] = []
            size = 0
            while outbox and size < RESUME_CHUNK_BYTES:
                data = outbox.popleft()
                chunk.append(data)
                size += len(data)
            self.outbox_bytes -= size
            self._transmit(b"".join(chunk))
        if self.close_timer is not None and not outbox:
            self.close(CloseCode.GOING_AWAY, "server shutting down")

    def drain(self, timeout: float, loop: asyncio.AbstractEventLoop) -> None:
        """Close with 1001 once the outbox is written, or after ``timeout`` seconds."""
        if self.closed:
            return
        self.flush()
        if not self.outbox:
            self.close(CloseCode.GOING_AWAY, "server shutting down")
        elif self.close_timer is None:
            self.close_timer = loop.call_later(
                timeout, self.close, CloseCode.GOING_AWAY, "server shutting down"
            )

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Close with ``code`` after what was already taken; drop the outbox."""
        if self.closed:
            return
        self.flush()
        self._finish()
        self._metrics.closes.labels(str(int(code))).inc()
        self._socket.close_with(int(code), reason, self.limits.close_timeout)

    def _finish(self) -> None:
        """Write nothing more: the socket is closing, closed or lost."""
        self.closed = True
        self.pending.clear()
        self.pending_bytes = 0
        self.outbox.clear()
        self.outbox_bytes = 0
        if self.close_timer is not None:
            self.close_timer.cancel()
            self.close_timer = None

    def stop(self) -> None:
        """Write nothing more (the socket is gone, or the connection is cleaning up)."""
        self._finish()

    def fail(self, exc: BaseException) -> None:
        """An unexpected error while writing: close with 1011 (or just stop), logged once per
        interval per cause."""
        _faults.exception(type(exc).__name__, exc, "closing a connection (1011): write failed")
        try:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        except Exception:
            self._finish()


def write_to_all(
    targets: tuple[Recipient, ...], message: dict[str, Any], flushes: FlushQueue | None = None
) -> None:
    """Encode ``message`` at most once per codec and give the same frame to every target;
    with the node's ``flushes``, written at once when the node keeps up (see the module
    docstring), else coalesced.

    A message one codec cannot encode (refused at entry; only a bug lets one through) goes
    to the other codec's targets and is logged; a target whose write raises is failed
    (closed 1011), the others get the frame all the same."""
    frames: list[bytes | None] = [None, None]
    if flushes is not None:
        flushes.begin_fan_out(len(targets))
    try:
        for conn in targets:
            sink = conn.writer
            index = sink.codec_index if isinstance(sink, Writer) else conn.codec.index
            data = frames[index]
            if data is None:
                data = frames[index] = _encode(index, message)
            if not len(data):
                continue
            try:
                if isinstance(sink, Writer):  # a direct call, not a lookup, once compiled
                    sink.write(data)
                else:
                    sink.write(data)
            except Exception as exc:
                conn.fail(exc, "fan-out")
    finally:
        if flushes is not None:
            flushes.end_fan_out()


def write_to_writers(
    writers: tuple[Writer, ...], message: dict[str, Any], flushes: FlushQueue | None = None
) -> None:
    """``write_to_all`` for a tuple of writers the caller keeps (the hub, per channel): the
    same frames, order and fault boundary (a writer whose write raises is failed, 1011),
    without looking each connection's writer up per delivery."""
    frames: list[bytes | None] = [None, None]
    if flushes is not None:
        flushes.begin_fan_out(len(writers))
    try:
        for writer in writers:
            index = writer.codec_index
            data = frames[index]
            if data is None:
                data = frames[index] = _encode(index, message)
            if len(data):
                try:
                    writer.write(data)
                except Exception as exc:
                    writer.fail(exc)
    finally:
        if flushes is not None:
            flushes.end_fan_out()


def _encode(index: int, message: dict[str, Any]) -> bytes:
    codec = CODECS[index]
    try:
        return codec.encode(message)
    except Exception as exc:
        _unencodable.exception(
            codec.name, exc, "a message could not be encoded for %s; not sent", codec.name
        )
        return b""


_log = logging.getLogger("realtime.writer")
_faults = LogThrottle(_log, 10.0)
_unencodable = LogThrottle(_log, 10.0)
