"""uvicorn's sans-I/O WebSocket protocol, opened up for the hub.

The ASGI app still does the handshake (Starlette routing, subprotocol choice,
HTTP denial responses). After ``accept`` the connection writes complete,
pre-encoded frames straight to the transport through ``WireSink``, learns of
back-pressure through ``pause_writing``/``resume_writing``, and closes with any
close code, without awaiting. Text frames reach the app as bytes (so invalid
UTF-8 is the app's 4000, not a 1007) and the server's shutdown becomes a drain
(close 1001) instead of uvicorn's 1012.
"""

from __future__ import annotations

import asyncio
import logging
import math
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Literal, Protocol, cast

from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.utils import get_local_addr, get_remote_addr, is_ssl
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.protocol import Protocol as SansIOProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol

from realtime.door import DOOR_STATE, Door, Ticket, Why

#: Key in the ASGI scope's ``extensions`` under which the protocol object is found.
EXTENSION = "piggybong.wire"
#: Pings of one connection answered per second (section 11); the rest are ignored.
PINGS_PER_SECOND = 10
#: Longest pause of reading (seconds beyond the current one) for a connection that keeps
#: sending more pings than are answered: 0 the first time, then 1, 3, 7, 15, 16, 16, ...
FLOOD_PAUSE_MAX = 16.0
#: Bytes of one read fed to the parser at a time once the connection is open.
FEED_SLICE = 8 * 1024
#: Bytes a connection without a session yet (mid-handshake) may have waiting in its socket's
#: buffer when a pong is due; beyond, the socket is aborted.
CONTROL_BUFFER_BYTES = 64 * 1024
#: Longest close reason in bytes (RFC 6455: a control frame's payload is at most 125).
MAX_CLOSE_REASON_BYTES = 123
#: Scope keys only the handshake reads, dropped once accepted (per-connection memory).
_HANDSHAKE_ONLY = ("asgi", "headers", "raw_path", "state", "subprotocols")
#: Per-connection lines (accepted, open, closed) go here; the app sets it to WARNING
#: unless the log level is debug, so 100,000 connections do not mean 200,000 log lines.
WS_LOG = logging.getLogger("realtime.ws")


class WireListener(Protocol):
    """What the protocol tells the connection that owns it (all synchronous)."""

    def on_pause(self) -> None: ...

    def on_resume(self) -> None: ...

    def on_shutdown(self) -> None: ...

    def on_lost(self) -> None: ...

    def on_control(self, data: bytes) -> None:
        """A control frame of ours (a pong) to write like any other frame (bounded)."""
        ...


class Inbox:
    """The ASGI receive queue of one connection: single consumer, FIFO.

    A lighter stand-in for the ``asyncio.Queue`` uvicorn makes (which holds four
    deques, about 3 KiB). Bounded by flow control, not by a size: the protocol
    pauses reading while a received message waits here, so it holds at most
    one message plus the disconnect event.
    """

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self, taken: Callable[[], None] | None = None) -> Any:
        """The next item; ``taken`` is called once it is out of the queue."""
        while not self._items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        item = self._items.pop(0)
        if taken is not None:
            taken()
        return item

    def empty(self) -> bool:
        return not self._items

    def qsize(self) -> int:
        return len(self._items)


class Flag:
    """``asyncio.Event``'s set/clear/wait without a deque until someone waits (uvicorn's
    ``writable``, which gates its ASGI ``send`` during the handshake)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if not self._set:
            waiter = asyncio.get_running_loop().create_future()
            if self._waiters is None:
                self._waiters = []
            self._waiters.append(waiter)
            await waiter
        return True


class PingWheel:
    """The keepalive pings due on one loop, in one-second buckets: one timer per bucket
    instead of a TimerHandle per connection. A ping goes out up to a second late."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.buckets: dict[int, dict[RealtimeWSProtocol, None]] = {}

    def add(self, proto: RealtimeWSProtocol, due: float) -> None:
        key = math.ceil(due)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = {}
            self.loop.call_at(key, self._fire, key)
        bucket[proto] = None
        proto.ping_bucket = key

    def discard(self, proto: RealtimeWSProtocol) -> None:
        bucket = self.buckets.get(proto.ping_bucket or 0)
        if bucket is not None:
            bucket.pop(proto, None)
        proto.ping_bucket = None

    def _fire(self, key: int) -> None:
        for proto in self.buckets.pop(key, {}):
            proto.ping_bucket = None
            proto.send_keepalive_ping()


def close_reason(reason: str) -> str:
    """``reason`` cut to ``MAX_CLOSE_REASON_BYTES`` of UTF-8, never inside a character."""
    encoded = reason.encode("utf-8", "replace")  # a lone surrogate becomes "?"
    return encoded[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore")


def _finished_parser() -> Generator[None, None, None]:
    """A parser with nothing more to parse (it holds no protocol)."""
    yield from ()


#: What a finished connection's transport points at instead of its protocol.
_DETACHED = asyncio.Protocol()

_wheels: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, PingWheel] = (
    weakref.WeakKeyDictionary()
)


class ClientPings:
    """The pings one client sent: how many in the current one-second window and when it
    ends, whether reading is paused for a flood (over ``PINGS_PER_SECOND``) and how often
    it was, and the unparsed rest of a read that crossed the limit."""

    __slots__ = ("count", "floods", "paused", "stash", "window_end")

    def __init__(self) -> None:
        self.count = 0
        self.window_end = 0.0
        self.paused = False
        self.floods = 0
        self.stash: bytes | None = None


class _Share:
    """What uvicorn's protocol keeps per connection that is the same for every connection of
    one server: held once per server, read through the class (``_Shared``)."""

    __slots__ = (
        "app",
        "app_state",
        "asgi_version",
        "config",
        "connections",
        "default_headers",
        "loop",
        "ping_interval",
        "ping_timeout",
        "root_path",
        "tasks",
    )

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.config = config
        self.app = config.loaded_app
        self.loop = loop
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.ping_interval = config.ws_ping_interval
        self.ping_timeout = config.ws_ping_timeout


class _Shared:
    """A protocol attribute read from its server's ``_Share`` (a class-level descriptor)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj._share, self.name)


_shares: weakref.WeakKeyDictionary[ServerState, _Share] = weakref.WeakKeyDictionary()


def _share_of(
    config: Config,
    server_state: ServerState,
    app_state: dict[str, Any],
    loop: asyncio.AbstractEventLoop,
) -> _Share:
    share = _shares.get(server_state)
    if (
        share is None
        or share.config is not config
        or share.app_state is not app_state
        or share.loop is not loop
    ):
        share = _shares[server_state] = _Share(config, server_state, app_state, loop)
    return share


#: uvicorn's per-connection starting values, as class attributes: an instance holds only
#: what changed (see ``RealtimeWSProtocol.__init__``).
_DEFAULTS: dict[str, Any] = {
    "logger": WS_LOG,
    "transport": None,
    "client": None,
    "handshake_initiated": False,
    "handshake_complete": False,
    "close_sent": False,
    "disconnected": False,
    "close_timer": None,
    "close_timeout": 10.0,
    "initial_response": None,
    "read_paused": False,
    "ping_timer": None,
    "pong_timer": None,
    "pending_ping_payload": None,
    "ping_sent_at": 0.0,
    "last_ping_rtt": 0.0,
    "curr_msg_data_type": "bytes",
}


class RealtimeWSProtocol(WebSocketsSansIOProtocol):
    """A WebSocketsSansIOProtocol with a direct write path. See the module docstring."""

    listener: WireListener | None = None
    #: The PingWheel bucket this connection's next ping waits in.
    ping_bucket: int | None = None
    #: This connection's place in its address's count (realtime/door.py), from the HTTP side.
    ticket: Ticket | None = None
    #: The client's pings, from its first one (most connections never send one).
    client_pings: ClientPings | None = None

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """uvicorn's ``__init__``, per-connection memory aside: it sets 34 attributes per
        instance, and past 29 CPython gives up the instance's compact attribute storage
        (values shared with the class's keys) for a dict of its own, 1.6 KB. Here an
        instance holds only its own parts; what its server's connections share is in one
        ``_Share``, and the starting values are class attributes (``_DEFAULTS``)."""
        if not config.loaded:
            config.load()
        self._share = _share_of(config, server_state, app_state, _loop or asyncio.get_event_loop())
        extensions = []
        if config.ws_per_message_deflate:  # realtime.cli turns it off (compressed per recipient)
            extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        self.conn = ServerProtocol(
            extensions=extensions, max_size=config.ws_max_size, logger=WS_LOG
        )
        # Lighter receive queue and write gate than asyncio's.
        self.queue = Inbox()  # type: ignore[assignment]
        self.writable = Flag()  # type: ignore[assignment]
        self.frames: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """uvicorn's, except that ``server`` and ``scheme`` are read from the transport when
        the handshake's scope is made, not kept (two names fewer, see ``__init__``)."""
        self.transport = cast(asyncio.Transport, transport)
        self.connections.add(self)
        self.client = get_remote_addr(self.transport)
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = f"{self.client[0]}:{self.client[1]} - " if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sWebSocket connection made", prefix)

    @property
    def server(self) -> tuple[str, int | None] | None:  # type: ignore[override]
        return get_local_addr(self.transport) if self.transport is not None else None

    @property
    def scheme(self) -> Literal["wss", "ws"]:  # type: ignore[override]
        return "wss" if self.transport is not None and is_ssl(self.transport) else "ws"

    @property
    def paused(self) -> bool:
        """The transport's buffer is over its high-water mark (uvicorn's write gate closed)."""
        return not self.writable.is_set()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = self
        conn = self.conn
        if conn.state is State.CONNECTING and not conn.reader.buffer and conn.parser_exc is None:
            # ServerProtocol.parse keeps the handshake request (and its headers) alive in
            # its frame for the connection's life; at a frame boundary (nothing buffered)
            # the plain frame parser it delegates to is the same, without it.
            conn.parser = SansIOProtocol.parse(conn)
            next(conn.parser)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.accept" and self.handshake_complete:
            # Nothing reads the handshake's request, response, headers or the scope's other
            # handshake parts after this (uvicorn's close log lines read client and path).
            self.request = self.response = None  # type: ignore[assignment]
            scope: dict[str, Any] = self.scope  # type: ignore[assignment]
            for key in _HANDSHAKE_ONLY:
                scope.pop(key, None)
            scope["extensions"].pop("websocket.http.response", None)

    def receive(self) -> Coroutine[Any, Any, Any]:
        """The next ASGI event. Not a coroutine of its own (uvicorn's is): one frame less
        kept alive per idle connection while the app waits."""
        inbox: Inbox = self.queue  # type: ignore[assignment]
        return inbox.get(self._taken)

    def _taken(self) -> None:
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()

    # ------------------------------------------------------------------ keepalive

    def schedule_ping(self) -> None:
        assert self.ping_interval is not None
        wheel = _wheels.get(self.loop)
        if wheel is None:
            wheel = _wheels[self.loop] = PingWheel(self.loop)
        wheel.add(self, self.loop.time() + max(0.0, self.ping_interval - self.last_ping_rtt))

    def stop_keepalive(self) -> None:
        super().stop_keepalive()
        if self.ping_bucket is not None:
            _wheels[self.loop].discard(self)

    # ------------------------------------------------------------------ inbound

    def data_received(self, data: bytes) -> None:
        """Feed the parser at most ``FEED_SLICE`` bytes at a time once open: a ping flood
        pauses reading after the slice that crossed the limit, and the rest of the read
        waits unparsed (``stash``, at most one read) until the pause is over."""
        pings = self.client_pings
        if pings is not None and pings.stash is not None:
            pings.stash += data
            return
        if len(data) <= FEED_SLICE or not self.handshake_complete:
            super().data_received(data)
            return
        view = memoryview(data)
        for start in range(0, len(data), FEED_SLICE):
            super().data_received(bytes(view[start : start + FEED_SLICE]))
            if self.transport.is_closing():
                return
            pings = self.client_pings
            if pings is not None and pings.paused:
                rest = view[start + FEED_SLICE :]
                if rest:
                    pings.stash = bytes(rest)
                return

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        # Both kinds arrive as bytes; "text" tells the app which opcode it was.
        message = {
            "type": "websocket.receive",
            "bytes": bytes(data),
            "text": "" if self.curr_msg_data_type == "text" else None,
        }
        self.queue.put_nowait(message)  # type: ignore[arg-type]
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def handle_ping(self) -> None:
        """Answer at most ``PINGS_PER_SECOND`` pings a second; a pong goes through the
        connection's writer (bounded: 4008), or, before there is one, is written unless the
        socket already holds ``CONTROL_BUFFER_BYTES`` (then it is aborted)."""
        data = b"".join(self.conn.data_to_send())
        now = self.loop.time()
        pings = self.client_pings
        if pings is None:
            pings = self.client_pings = ClientPings()
        if now >= pings.window_end:
            pings.window_end = now + 1.0
            pings.count = 0
        pings.count += 1
        if pings.count > PINGS_PER_SECOND:
            if pings.count == PINGS_PER_SECOND + 1:
                door = self.app_state.get(DOOR_STATE)
                if isinstance(door, Door):
                    client = self.client[0] if self.client else ""
                    door.count(Why.PING_FLOOD, "ws", client)
                if not pings.paused and not self.transport.is_closing():
                    # The rest of the flood is not even read: the socket waits (parsing a
                    # flood of frames would cost the node its CPU), to the end of this
                    # second the first time, twice as long each time after (at most
                    # FLOOD_PAUSE_MAX s; a pause past the next keepalive ping ends in the
                    # close of a connection that did not answer it).
                    pings.paused = True
                    self.transport.pause_reading()
                    pause = min(2.0**pings.floods - 1.0, FLOOD_PAUSE_MAX)
                    pings.floods += 1
                    pings.window_end += pause
                    self.loop.call_at(pings.window_end, self._flood_over)
            return
        if not data:
            return
        listener = self.listener
        if listener is not None:
            listener.on_control(data)
        elif self.transport.get_write_buffer_size() > CONTROL_BUFFER_BYTES:
            self.transport.abort()
        else:
            self.transport.write(data)

    def _flood_over(self) -> None:
        pings = self.client_pings
        assert pings is not None  # (a flood pause is armed by handle_ping)
        pings.paused = False
        if self.transport.is_closing():
            pings.stash = None
            return
        stash, pings.stash = pings.stash, None
        if stash:
            self.data_received(stash)  # may pause again (and stash the rest again)
        if not pings.paused and not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    # ------------------------------------------------------------------ outbound

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.listener is not None:
            self.listener.on_pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.listener is not None:
            self.listener.on_resume()

    def close_with(self, code: int, reason: str, timeout: float) -> None:
        """Send a close frame after what is already written; abort if no answer in ``timeout``
        (a connection that flooded pings is closed at once, without reading its answer)."""
        if self.close_sent or self.transport.is_closing():
            return
        self.stop_keepalive()
        reason = close_reason(reason)
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        try:
            self.conn.send_close(code, reason)
        except Exception:  # the protocol may already be closing
            self.transport.abort()
            return
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.client_pings is not None and self.client_pings.floods:
            # A ping flooder's close reply would come after megabytes of unread pings:
            # closed without waiting for it (a reset if it sends on).
            self.transport.close()
            return
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(timeout, self.transport.abort)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        listener = self.listener
        if listener is not None and not self.close_sent and self.handshake_complete:
            try:
                listener.on_shutdown()
            except Exception:  # uvicorn calls every connection in one loop: this one only
                WS_LOG.exception("drain of a connection failed; dropping it")
                self.transport.abort()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        self.listener = None
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()
        super().connection_lost(exc)
        if listener is not None:
            listener.on_lost()
        if getattr(self, "scope", None) is None:  # no ASGI task runs (none began, or it ended)
            self._release()

    def on_task_complete(self, task: asyncio.Task[None]) -> None:
        """The ASGI task ended (a done callback, not a coroutine wrapping it: no frame of
        ours kept alive per connection while its app runs). Its scope goes (its extensions
        hold this protocol); a scope of None tells ``connection_lost`` the task ended."""
        super().on_task_complete(task)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.clear()
        self.scope = None  # type: ignore[assignment]
        if self.disconnected:
            self._release()

    def _release(self) -> None:
        """Called once both the socket is lost and the ASGI task ended (or never began).

        It breaks the reference cycles a finished connection would otherwise keep
        (protocol <-> transport, protocol <-> its scope, websockets' protocol <-> its
        parser generator), so reference counting frees it at once. The cycle collector
        would too, but the server freezes long-lived objects (``gc.freeze()``) to keep
        full collections short, and a frozen cycle is never collected.
        """
        # (connection_lost has stopped the keepalive and the close timer.)
        self.conn.parser = _finished_parser()
        self.transport.set_protocol(_DETACHED)


for _name in _Share.__slots__:
    setattr(RealtimeWSProtocol, _name, _Shared(_name))
for _name, _value in _DEFAULTS.items():
    setattr(RealtimeWSProtocol, _name, _value)
