"""uvicorn's httptools HTTP protocol with the door (protocol-v1, section 11) and a clean
hand-over to WebSocket.

The door, when the app's lifespan state holds one (``DOOR_STATE``):

- a new connection is admitted by its peer address (``Door.admit``: open connections and
  new ones per second); over either its first bytes are answered 429 with ``Retry-After``,
  then it is closed. Behind a trusted proxy the client is the first untrusted hop of
  ``X-Forwarded-For``: a WebSocket handshake is admitted by that address once its head is
  read, and the scope's ``client`` names it.
- a request head (request line and headers) is at most ``max_head_bytes``: 431 beyond,
  then close, counted as the bytes arrive (httptools itself has no limit);
- a head must arrive whole within ``head_timeout`` of its first byte, else the connection
  is closed (slowloris);
- a connection idle before its first byte or between requests is closed after
  ``keepalive_timeout``.

``POST /v1/publish`` (exactly that target), when the lifespan state holds a ``DirectPublish``
(``DIRECT_PUBLISH_STATE``), is served here without uvicorn's ASGI cycle: its head is
checked (``DirectPublish.head``: 401, 503 draining, 429, 413 declared) once the door has
passed it, its body is kept as it arrives (413 past the limit), and the publish runs in a
task of uvicorn's as a request's ASGI task would; the answer is one write. The answers and
their counts are those of ``Api.publish`` behind ASGI. The request holds a
``RequestResponseCycle`` of its own, so uvicorn's pipelining queue, a lost connection and
shutdown (``Connection: close`` on the answer) treat it as any request. A request it does
not take (another target or a query string, ``Expect: 100-continue``, an earlier request
still unanswered, writing paused) goes through the ASGI app as before.

After an upgrade the transport belongs to the WebSocket protocol and the HTTP protocol is
garbage, but in a reference cycle (its ``HttpRequestParser`` holds its bound callbacks).
The node freezes long-lived objects (``realtime/gcfreeze.py``); a cycle frozen while it
was still reachable is never collected. Dropping the parser at the upgrade lets
reference counting free the protocol at once. The connection's door ticket goes with
the transport to the WebSocket protocol, which releases it when the socket is lost.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from http import HTTPStatus
from typing import Any, Final

import httptools
from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.protocols.utils import get_client_addr

from realtime.api import DIRECT_PUBLISH_STATE, DirectPublish
from realtime.door import CONNECT_RETRY_AFTER, DOOR_STATE, Door, Refusal, Ticket, Why
from realtime.gate import GatePass

#: Request line bytes beyond the URL, and per header beyond its name and value (": ", CRLF).
_LINE_OVERHEAD: Final = 16
_HEADER_OVERHEAD: Final = 4


#: Seconds a connection the door answered (429, 431) is read, and its bytes dropped, before
#: it is closed.
LINGER: Final = 1.0


class _Answered(Exception):
    """Raised from a parser callback once the door has answered: stops the parse."""


def _answer(status: int, code: str, message: str, retry_after: float | None = None) -> bytes:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        head.append(f"retry-after: {max(1, math.ceil(retry_after))}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


#: The request target this protocol serves itself when it is a POST.
_PUBLISH_URL: Final = DirectPublish.path.encode()


def _nothing() -> None:
    pass


class _PublishCycle(RequestResponseCycle):
    """A ``POST /v1/publish`` the protocol serves itself: uvicorn's request state, so that
    pipelining, a lost connection and shutdown treat it as any request."""


class RealtimeHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with the door and the direct publish; see the module docstring."""

    door: Door | None = None
    #: POST /v1/publish served here (None: every request goes to the ASGI app)
    publish: DirectPublish | None = None
    #: its answers get uvicorn's access log line (the logger has a handler and takes INFO)
    log_access: bool = False
    #: this connection's place in its address's count (handed to WebSocket on upgrade)
    ticket: Ticket | None = None
    #: set when the door refused the connection: its first bytes are answered 429
    refusal: Refusal | None = None
    #: a door answer was written: nothing more is read
    answered: bool = False
    #: between a request's first byte and its complete head
    in_head: bool = False
    head_bytes: int = 0
    head_timer: asyncio.TimerHandle | None = None
    #: no byte has arrived yet (an idle close then counts as idle_timeout)
    fresh: bool = True
    #: a WebSocket handshake waiting for its place in the handshake gate
    waiting: GatePass | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        publish = self.app_state.get(DIRECT_PUBLISH_STATE)
        # What the direct path does not do (uvicorn's concurrency limit, fresh contextvars per
        # request) leaves every request to the ASGI app.
        if (
            isinstance(publish, DirectPublish)
            and self.limit_concurrency is None
            and not getattr(self.config, "reset_contextvars", False)
        ):
            self.publish = publish
            self.log_access = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        door = self.app_state.get(DOOR_STATE)
        if not isinstance(door, Door):
            return
        self.door = door
        self.timeout_keep_alive = door.keepalive_timeout  # type: ignore[assignment]
        peer = self._peer()
        if not door.trusts(peer):
            admitted = door.admit(peer)
            if isinstance(admitted, Refusal):
                self.refusal = admitted
            else:
                self.ticket = admitted
        # A connection that never sends a byte is idle from the start.
        self.timeout_keep_alive_task = self.loop.call_later(
            door.keepalive_timeout, self.timeout_keep_alive_handler
        )

    def _peer(self) -> str:
        return self.client[0] if self.client else ""

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()
        super().connection_lost(exc)

    def timeout_keep_alive_handler(self) -> None:
        if self.fresh and self.door is not None and not self.transport.is_closing():
            self.door.count(Why.IDLE_TIMEOUT, "http", self._peer(), "no byte sent")
        if not self.transport.is_closing():
            self.transport.close()

    # ------------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        door = self.door
        if door is None:
            super().data_received(data)
            return
        if self.answered:
            return
        if self.waiting is not None:  # bytes before the handshake's answer: not a client
            self.transport.close()
            return
        self.fresh = False
        if self.refusal is not None:
            refusal = self.refusal
            message = "too many connections from this address"
            if refusal.why is Why.CONNECT_RATE_PER_IP:
                message = "too many new connections from this address"
            self._answer_and_close(
                _answer(429, "rate_limited", message, retry_after=refusal.retry_after)
            )
            return
        self._unset_keepalive_if_required()
        if self.head_timer is None and not self.in_head and self._idle():
            # A byte between requests starts a head: it must be whole within head_timeout.
            self.head_timer = self.loop.call_later(door.head_timeout, self._head_timed_out)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self.answered:
                return
            if self._should_upgrade():
                self._upgrade_through_gate(door)
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError:
            if self.answered:
                return
            self.logger.debug("Invalid HTTP request received.")
            self._stop_head_timer()
            self.send_400_response("Invalid HTTP request received.")
            return
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > door.max_head_bytes:
                self._head_too_large(door)

    def _idle(self) -> bool:
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.in_head = True
        self.head_bytes = 0

    def on_headers_complete(self) -> None:
        door = self.door
        if door is not None:
            self._door_head(door)
        if not self._publish_head():
            super().on_headers_complete()

    def _door_head(self, door: Door) -> None:
        """The door's checks of a complete head (raises ``_Answered`` when it answered)."""
        self.in_head = False
        self._stop_head_timer()
        size = len(self.url) + _LINE_OVERHEAD
        for name, value in self.headers:
            size += len(name) + len(value) + _HEADER_OVERHEAD
        if size > door.max_head_bytes:
            self._head_too_large(door)
            raise _Answered
        peer = self._peer()
        if door.trusts(peer):
            forwarded = [v.decode("latin-1") for n, v in self.headers if n == b"x-forwarded-for"]
            address = door.client_address(peer, forwarded)
            self.scope["client"] = (address, 0)
            if self.parser.should_upgrade() and self._should_upgrade():
                # A WebSocket through the proxy is this address's connection.
                admitted = door.admit(address)
                if isinstance(admitted, Refusal):
                    self._answer_and_close(
                        _answer(
                            429,
                            "rate_limited",
                            "too many connections from this address",
                            retry_after=admitted.retry_after,
                        )
                    )
                    raise _Answered
                if self.ticket is not None:
                    self.ticket.release()
                self.ticket = admitted

    # ------------------------------------------------------------------ direct publish

    def _publish_head(self) -> bool:
        """Take a ``POST /v1/publish`` in hand (True), or leave the request to uvicorn.

        Only the plain case is taken: exactly that target, no request of this connection
        still unanswered (a pipelined one queues behind it as uvicorn queues any), no
        ``Expect: 100-continue``, no upgrade, the transport not paused for writing. The
        answers, checks and counts are ``DirectPublish``'s, those of ``Api.publish``.
        """
        publish = self.publish
        cycle = self.cycle
        if (
            publish is None
            or self.url != _PUBLISH_URL
            or self.parser.get_method() != b"POST"
            or (cycle is not None and not cycle.response_complete)
            or self.expect_100_continue
            or self.flow.write_paused
            or self.parser.should_upgrade()
        ):
            return False
        version = self.parser.get_http_version()
        scope = self.scope
        scope["method"] = "POST"
        scope["path"] = publish.path
        scope["raw_path"] = _PUBLISH_URL
        scope["query_string"] = b""
        if version != "1.1":
            scope["http_version"] = version
        self._unset_keepalive_if_required()  # re-armed once answered
        self.cycle = cycle = _PublishCycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.log_access,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=False,
            keep_alive=version != "1.0" and self.parser.should_keep_alive(),
            on_response=_nothing,  # finished here; a bound method would make a reference cycle
        )
        answer = publish.head(self.headers)
        if answer is not None:
            self._publish_answer(cycle, answer)
        return True

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if type(cycle) is not _PublishCycle:
            super().on_body(body)
            return
        if cycle.response_complete:
            return  # answered on its head: the rest is read and dropped
        cycle.body += body  # at most the limit: not paused for reading
        publish = self.publish
        assert publish is not None
        if len(cycle.body) > publish.limit:
            self._publish_answer(cycle, publish.too_large())

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is not _PublishCycle:
            super().on_message_complete()
            return
        if cycle.response_complete:
            return
        cycle.more_body = False
        task = self.loop.create_task(self._publish_body(cycle, bytes(cycle.body)))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # awaited by uvicorn's shutdown, as a request's ASGI task

    async def _publish_body(self, cycle: _PublishCycle, body: bytes) -> None:
        publish = self.publish
        assert publish is not None
        try:
            answer = await publish.body(body)
            if self.flow.write_paused and not cycle.disconnected:
                await self.flow.drain()
        except asyncio.CancelledError:  # uvicorn's shutdown gave up waiting: no answer
            self.transport.close()
            raise
        self._publish_answer(cycle, answer)

    def _publish_answer(self, cycle: _PublishCycle, answer: Response) -> None:
        """Write ``answer`` in one write, as uvicorn would write it, then finish the request
        as uvicorn does (close without keep-alive; the next pipelined request starts)."""
        if cycle.disconnected or self.transport.is_closing():
            return
        cycle.response_started = True
        if cycle.access_log:  # uvicorn's line
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(cycle.scope),
                "POST",
                DirectPublish.path,
                cycle.scope["http_version"],
                answer.status_code,
            )
        content: list[bytes | memoryview] = [STATUS_LINE[answer.status_code]]
        for name, value in (*cycle.default_headers, *answer.raw_headers):
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content += (b"\r\n", answer.body)
        self.transport.write(b"".join(content))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()

    def _head_too_large(self, door: Door) -> None:
        door.count(Why.HEAD_TOO_LARGE, "http", self._peer())
        self._answer_and_close(
            _answer(
                431,
                "limit_exceeded",
                f"request head larger than {door.max_head_bytes} bytes",
            )
        )

    def _head_timed_out(self) -> None:
        self.head_timer = None
        if self.answered or self.transport.is_closing():
            return
        if self.door is not None:
            self.door.count(Why.HEAD_TIMEOUT, "http", self._peer())
        self.answered = True
        self.transport.close()

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def _answer_and_close(self, response: bytes) -> None:
        """Write ``response``, then close: after a lingering ``LINGER`` seconds in which what
        the client still sends is read and dropped (closing with unread bytes would reset
        the connection, and the client could lose the answer)."""
        self.answered = True
        self._stop_head_timer()
        self._unset_keepalive_if_required()
        transport = self.transport
        if transport.is_closing():
            return
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
            self.loop.call_later(LINGER, transport.close)
        else:
            transport.close()

    # ------------------------------------------------------------------ upgrade

    def _upgrade_through_gate(self, door: Door) -> None:
        """The upgrade now, or once the handshake gate lets it in (realtime/gate.py): a
        waiting handshake is not read meanwhile; a full queue is answered 503 at once."""
        gate, ticket = door.gate, self.ticket
        if gate is None or ticket is None:
            self.handle_websocket_upgrade()
            return
        gate_pass = gate.enter()
        if gate_pass is None:
            door.count(Why.BUSY, "ws", self._peer(), "handshake queue full")
            message = "server busy: too many handshakes waiting"
            self._answer_and_close(
                _answer(503, "unavailable", message, retry_after=CONNECT_RETRY_AFTER)
            )
            return
        ticket.gate_pass = gate_pass
        if gate_pass.active:
            self._let_in(gate_pass)
            return
        # Still read while it waits: a client that gives up (its close) leaves the queue at
        # once; one that sends anything before its answer breaks the protocol and is closed.
        self.waiting = gate_pass
        gate_pass.on_admit = self._admit_soon

    def _admit_soon(self) -> None:
        """Called by the gate from another login's end: the upgrade runs on its own turn."""
        if self.waiting is not None:
            self.loop.call_soon(self._admitted, self.waiting)

    def _admitted(self, gate_pass: GatePass) -> None:
        self.waiting = None
        if not gate_pass.active:  # the connection ended meanwhile
            return
        if self.transport.is_closing():
            gate_pass.release()
            return
        self._let_in(gate_pass)

    def _let_in(self, gate_pass: GatePass) -> None:
        gate_pass.lease_timer = self.loop.call_later(gate_pass.gate.lease, gate_pass.release)
        self.handle_websocket_upgrade()

    def handle_websocket_upgrade(self) -> None:
        """uvicorn's hand-over, with the client address and the door ticket passed on."""
        self._stop_head_timer()
        self._unset_keepalive_if_required()
        self.connections.discard(self)
        method = self.scope["method"].encode()
        output = [method, b" ", self.url, b" HTTP/1.1\r\n"]
        for name, value in self.scope["headers"]:
            output += [name, b": ", value, b"\r\n"]
        output.append(b"\r\n")
        protocol: Any = self.ws_protocol_class(  # type: ignore[call-arg, misc]
            config=self.config,
            server_state=self.server_state,
            app_state=self.app_state,
        )
        protocol.connection_made(self.transport)
        client = self.scope.get("client")
        if client is not None:
            protocol.client = client
        protocol.ticket, self.ticket = self.ticket, None
        self.transport.set_protocol(protocol)
        protocol.data_received(b"".join(output))
        # Nothing reads the parser again: the transport now calls the WebSocket protocol.
        del self.parser
