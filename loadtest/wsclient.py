"""A lean RFC 6455 client on ``asyncio.Protocol``: no task, no queue per connection.

The protocol writes the upgrade request when the TCP connection is made,
checks the 101 answer (accept key and subprotocol), then parses frames
straight out of ``data_received`` and calls its hooks synchronously. It
answers pings, echoes a server's close, masks what it sends and offers no
extension (so frames arrive uncompressed). Subclasses implement the hooks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import struct
from typing import Final, cast

from websockets.speedups import apply_mask

GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER_BYTES: Final = 16 * 1024

OP_CONT: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

#: Close code when the TCP connection ended without a close frame (RFC 6455 7.1.5).
ABNORMAL: Final = 1006
#: Close code for a frame this client could not read.
PROTOCOL_ERROR: Final = 1002

# states
CONNECTING: Final = 0  # TCP up, waiting for the 101
OPEN: Final = 1
CLOSING: Final = 2  # a close frame was sent
CLOSED: Final = 3


def accept_key(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + GUID).digest())  # RFC 6455 mandates SHA-1


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    mask = os.urandom(4)
    return head + mask + apply_mask(payload, mask)


class FrameError(Exception):
    """The server sent bytes that are not a valid frame sequence."""


class WSClient(asyncio.Protocol):
    """One client WebSocket. Hooks run on the event loop and must not block.

    Hooks: ``on_open(subprotocol)``; ``on_message(payload, binary)`` per complete
    message; ``on_refused(reason)`` when the upgrade fails (then the transport
    is closed); ``on_closed(code, reason, by_server)`` exactly once after
    ``on_open``, where ``code`` is 1006 when no close frame arrived.
    ``now`` holds the loop time (``time.time()``) of the current data chunk.
    """

    def __init__(self, host: str, path: str, subprotocol: str | None) -> None:
        self.host = host
        self.path = path
        self.subprotocol = subprotocol
        self.state = CONNECTING
        self.transport: asyncio.Transport | None = None
        self._key = base64.b64encode(os.urandom(16))
        self._buf = bytearray()
        self._fragments: list[bytes] = []
        self._fragment_op = 0
        self._close_code: int | None = None
        self._close_reason = ""
        self._closed_by_server = False
        self._opened = False

    # ------------------------------------------------------------ hooks (override)

    def on_open(self, subprotocol: str | None) -> None:
        """The upgrade succeeded."""

    def on_message(self, payload: bytes, binary: bool) -> None:
        """One complete text or binary message."""

    def on_refused(self, reason: str) -> None:
        """The upgrade failed: ``reason`` is e.g. ``http 400`` or ``bad accept key``."""

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        """The connection ended (after ``on_open``)."""

    # ------------------------------------------------------------ sending

    def send(self, payload: bytes, *, binary: bool) -> bool:
        """Send one message; False when the connection is not open."""
        if self.state != OPEN or self.transport is None:
            return False
        self.transport.write(encode_frame(OP_BINARY if binary else OP_TEXT, payload))
        return True

    def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the closing handshake (the caller aborts stragglers); no-op unless open."""
        if self.state != OPEN or self.transport is None:
            if self.state == CONNECTING and self.transport is not None:
                self.abort()
            return
        self.state = CLOSING
        self._close_code = code
        self._close_reason = reason
        self.transport.write(encode_frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key.decode()}",
            "Sec-WebSocket-Version: 13",
            "User-Agent: piggybong-loadtest",
        ]
        if self.subprotocol:
            lines.append(f"Sec-WebSocket-Protocol: {self.subprotocol}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        if self.state == CONNECTING:
            buf += data
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._refuse("upgrade answer headers too large")
                return
            head = bytes(buf[:end])
            data = bytes(buf[end + 4 :])
            buf.clear()
            problem = self._check_upgrade(head)
            if problem is not None:
                self._refuse(problem)
                return
            self.state = OPEN
            self._opened = True
            self.on_open(self.subprotocol)
        elif buf:  # a frame was split across reads
            buf += data
            data = bytes(buf)
            buf.clear()
        try:
            used = self._parse_frames(data)
        except FrameError as exc:
            self._fail(str(exc))
            return
        if used < len(data) and self.state != CLOSED:
            buf += memoryview(data)[used:]

    def connection_lost(self, exc: Exception | None) -> None:
        previous = self.state
        self.state = CLOSED
        if previous == CONNECTING:
            self.on_refused(f"connection lost during upgrade: {exc or 'closed'}")
            return
        if not self._opened:
            return
        code = self._close_code if self._close_code is not None else ABNORMAL
        self.on_closed(code, self._close_reason, self._closed_by_server)

    # ------------------------------------------------------------ internals

    def _check_upgrade(self, head: bytes) -> str | None:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            return f"http {status[1] if len(status) > 1 else '?'}"
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("sec-websocket-accept", "").encode() != accept_key(self._key):
            return "bad Sec-WebSocket-Accept"
        chosen = headers.get("sec-websocket-protocol") or None
        if chosen != self.subprotocol:
            return f"subprotocol {chosen!r} answered for {self.subprotocol!r}"
        if headers.get("sec-websocket-extensions"):
            return "an extension was accepted that was not offered"
        return None

    def _refuse(self, reason: str) -> None:
        self.state = CLOSED
        self.on_refused(reason)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, reason: str) -> None:
        self._close_code = PROTOCOL_ERROR
        self._close_reason = reason
        self._closed_by_server = False
        self.abort()

    def _parse_frames(self, data: bytes) -> int:
        """Handle every complete frame in ``data``; returns how many bytes they took."""
        pos = 0
        size = len(data)
        while size - pos >= 2:
            b0 = data[pos]
            b1 = data[pos + 1]
            length = b1 & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = (data[pos + 2] << 8) | data[pos + 3]
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                head = 10
            if size - pos < head + length:
                break
            if b1 & 0x80:
                raise FrameError("the server masked a frame")
            if b0 & 0x70:
                raise FrameError("reserved bits set without an extension")
            payload = data[pos + head : pos + head + length]
            pos += head + length
            self._frame(b0 & 0x0F, bool(b0 & 0x80), payload)
            if self.state == CLOSED:
                break
        return pos

    def _frame(self, opcode: int, fin: bool, payload: bytes) -> None:
        if opcode in (OP_TEXT, OP_BINARY):
            if self._fragments:
                raise FrameError("a new message began inside a fragmented one")
            if fin:
                if self.state == OPEN:
                    self.on_message(payload, opcode == OP_BINARY)
                return
            self._fragment_op = opcode
            self._fragments.append(payload)
        elif opcode == OP_CONT:
            if not self._fragments:
                raise FrameError("a continuation frame without a message")
            self._fragments.append(payload)
            if fin:
                message = b"".join(self._fragments)
                self._fragments.clear()
                if self.state == OPEN:
                    self.on_message(message, self._fragment_op == OP_BINARY)
        elif opcode == OP_PING:
            if self.transport is not None and self.state == OPEN:
                self.transport.write(encode_frame(OP_PONG, payload))
        elif opcode == OP_PONG:
            pass
        elif opcode == OP_CLOSE:
            self._on_close_frame(payload)
        else:
            raise FrameError(f"unknown opcode {opcode:#x}")

    def _on_close_frame(self, payload: bytes) -> None:
        if self.state == OPEN:  # the server closes: echo its code, then hang up
            code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
            self._close_code = code
            self._close_reason = payload[2:].decode("utf-8", "replace")
            self._closed_by_server = True
            if self.transport is not None:
                self.transport.write(encode_frame(OP_CLOSE, payload[:2]))
        # our close is answered (CLOSING), or the server's close was echoed: done
        self.state = CLOSED
        if self.transport is not None:
            self.transport.close()
