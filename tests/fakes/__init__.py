"""Fake providers for tests: a scriptable HTTP/2-over-TLS server on 127.0.0.1 (``H2Server``).

``apns_server`` and ``fcm_server`` build the APNs and FCM fakes on it; ``tls``
makes the certificates. Every request is recorded; answers come, in order,
from the scripts (``script``), else from the fake's handler.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from notifications.models import Notification, Priority

__all__ = [
    "FakeProvider",
    "H2Server",
    "ManualClock",
    "Reply",
    "Request",
    "make_notification",
    "serving",
]


def make_notification(priority: Priority = Priority.HIGH, **fields: Any) -> Notification:
    """A notification created now, with test defaults for what ``fields`` leaves out."""
    values: dict[str, Any] = {
        "id": "n-1",
        "user": "u1",
        "title": "Spent",
        "body": "You spent 12 EUR",
        "created_at": time.time(),
    }
    values.update(fields)
    return Notification(priority=priority, **values)


class ManualClock:
    """A clock for injection: it says ``now`` and moves only when a test moves it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Request:
    """One request as received; header names are lower case."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Reply:
    """An answer: ``body`` bytes are sent as-is, other values as JSON (None: no body).

    After waiting ``delay`` seconds, ``close=True`` closes the whole connection
    instead of answering.
    """

    status: int = 200
    body: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0
    close: bool = False

    def encoded(self) -> tuple[list[tuple[str, str]], bytes]:
        if self.body is None:
            body = b""
        elif isinstance(self.body, bytes):
            body = self.body
        else:
            body = json.dumps(self.body).encode()
        headers = [(":status", str(self.status))]
        if self.body is not None and not isinstance(self.body, bytes):
            headers.append(("content-type", "application/json"))
        headers.append(("content-length", str(len(body))))
        headers.extend((k.lower(), v) for k, v in self.headers.items())
        return headers, body


Handler = Callable[[Request], Reply]


class H2Server:
    """An HTTP/2-only TLS server on 127.0.0.1 and a free port.

    A connection that did not negotiate ``h2`` by ALPN is counted in
    ``refused_connections`` and closed. ``delay`` (seconds) is added before
    every answer. A handler that raises answers 500 and is kept in
    ``errors`` (the fixtures fail the test on any).
    """

    def __init__(self, ssl_context: ssl.SSLContext, handler: Handler) -> None:
        self._ssl = ssl_context
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._scripts: list[tuple[str, deque[Reply]]] = []
        self.requests: list[Request] = []
        self.errors: list[BaseException] = []
        self.refused_connections = 0
        self.connections_made = 0
        self.delay = 0.0
        self.port = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def script(self, *replies: Reply, path_prefix: str = "/") -> None:
        """The next ``len(replies)`` requests whose path starts with ``path_prefix`` get these."""
        self._scripts.append((path_prefix, deque(replies)))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), "127.0.0.1", 0, ssl=self._ssl
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Closes the listener and every connection; cancels and awaits answers in progress."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def close_connections(self) -> None:
        """Drops every open connection (as a provider restarting would)."""
        for connection in list(self._connections):
            connection.close()

    def _reply_for(self, request: Request) -> Reply:
        self.requests.append(request)
        for prefix, replies in self._scripts:
            if replies and request.path.startswith(prefix):
                return replies.popleft()
        try:
            return self._handler(request)
        except Exception as exc:
            self.errors.append(exc)
            return Reply(500, {"error": f"fake handler failed: {exc!r}"})

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _Connection(asyncio.Protocol):
    def __init__(self, server: H2Server) -> None:
        self._server = server
        config = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        self._h2 = h2.connection.H2Connection(config=config)
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, tuple[dict[str, str], bytearray]] = {}
        self._window_changed = asyncio.Event()
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is None or ssl_object.selected_alpn_protocol() != "h2":
            self._server.refused_connections += 1
            self._closed = True
            transport.close()
            return
        self._server.connections_made += 1
        self._server._connections.add(self)
        self._h2.initiate_connection()
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server._connections.discard(self)
        self._window_changed.set()

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            events = self._h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers: dict[str, str] = {}
                for name, value in event.headers:
                    key, text = str(name).lower(), str(value)
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                self._streams[event.stream_id] = (headers, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self._streams:
                    self._streams[event.stream_id][1].extend(event.data)
                self._h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in self._streams:
                    headers, body = self._streams.pop(event.stream_id)
                    request = Request(
                        method=headers.pop(":method", ""),
                        path=headers.pop(":path", ""),
                        headers=headers,
                        body=bytes(body),
                    )
                    self._server._spawn(self._answer(event.stream_id, request))
            elif isinstance(event, h2.events.StreamReset):
                self._streams.pop(event.stream_id, None)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_changed.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.close()
        self._flush()

    async def _answer(self, stream_id: int, request: Request) -> None:
        reply = self._server._reply_for(request)
        wait = self._server.delay + reply.delay
        if wait > 0:
            await asyncio.sleep(wait)
        if self._closed:
            return
        if reply.close:
            self.close()
            return
        headers, body = reply.encoded()
        try:
            self._h2.send_headers(stream_id, headers, end_stream=not body)
            self._flush()
            while body and not self._closed:
                window = min(
                    self._h2.local_flow_control_window(stream_id), self._h2.max_outbound_frame_size
                )
                if window <= 0:
                    self._window_changed.clear()
                    await self._window_changed.wait()
                    continue
                chunk, body = body[:window], body[window:]
                self._h2.send_data(stream_id, chunk, end_stream=not body)
                self._flush()
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass  # the client reset the stream or went away: nobody to answer

    def _flush(self) -> None:
        data = self._h2.data_to_send()
        if data and self._transport is not None and not self._closed:
            self._transport.write(data)


class FakeProvider:
    """What the provider fakes share: an ``H2Server`` running ``handler``, the
    device tokens it knows and the answers scripted per device token."""

    def __init__(self, server_context: ssl.SSLContext, ca_file: str) -> None:
        self.ca_file = ca_file
        self.known_tokens: set[str] = set()
        self.token_answers: dict[str, Reply] = {}
        self.server = H2Server(server_context, self.handle)

    def handle(self, request: Request) -> Reply:
        raise NotImplementedError

    def new_device_token(self) -> str:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def requests(self) -> list[Request]:
        return self.server.requests

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    def add_device(self) -> str:
        """A new device token the fake knows."""
        token = self.new_device_token()
        self.known_tokens.add(token)
        return token

    def answer_token(self, token: str, reply: Reply) -> None:
        """Every request for ``token`` that passes the other checks gets ``reply``."""
        self.token_answers[token] = reply


P = TypeVar("P", bound=FakeProvider)


@asynccontextmanager
async def serving(fake: P) -> AsyncIterator[P]:
    """Starts ``fake``, stops it on exit, then fails if its handler ever raised."""
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()
    assert not fake.server.errors, fake.server.errors
