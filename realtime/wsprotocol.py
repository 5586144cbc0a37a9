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

import logging
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

#: Key in the ASGI scope's ``extensions`` under which the protocol object is found.
EXTENSION = "piggybong.wire"
#: Per-connection lines (accepted, open, closed) go here; the app sets it to WARNING
#: unless the log level is debug, so 100,000 connections do not mean 200,000 log lines.
WS_LOG = logging.getLogger("realtime.ws")


class WireListener(Protocol):
    """What the protocol tells the connection that owns it (all synchronous)."""

    def on_pause(self) -> None: ...

    def on_resume(self) -> None: ...

    def on_shutdown(self) -> None: ...

    def on_lost(self) -> None: ...


class RealtimeWSProtocol(WebSocketsSansIOProtocol):
    """A WebSocketsSansIOProtocol with a direct write path. See the module docstring."""

    listener: WireListener | None = None
    paused: bool = False
    #: Set while a close frame of ours is on its way; the transport is aborted after the timeout.
    closing: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = WS_LOG
        self.conn.logger = WS_LOG

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope["extensions"][EXTENSION] = self

    # ------------------------------------------------------------------ inbound

    def send_receive_event_to_app(self) -> None:
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return
        # Both kinds arrive as bytes; "text" tells the app which opcode it was.
        message = {"type": "websocket.receive", "bytes": bytes(data),
                   "text": "" if self.curr_msg_data_type == "text" else None}
        self.queue.put_nowait(message)  # type: ignore[arg-type]
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    # ------------------------------------------------------------------ outbound

    def write_frames(self, data: bytes) -> None:
        """Write complete frames (caller keeps order and checks ``paused``)."""
        self.transport.write(data)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.paused = True
        if self.listener is not None:
            self.listener.on_pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.paused = False
        if self.listener is not None:
            self.listener.on_resume()

    def close_with(self, code: int, reason: str, timeout: float) -> None:
        """Send a close frame after what is already written; abort if no answer in ``timeout``."""
        if self.close_sent or self.transport.is_closing():
            return
        self.stop_keepalive()
        self.queue.put_nowait({"type": "websocket.disconnect", "code": code, "reason": reason})
        try:
            self.conn.send_close(code, reason)
        except Exception:  # the protocol may already be closing
            self.transport.abort()
            return
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.closing = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()
        self.close_timer = self.loop.call_later(timeout, self.transport.abort)

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        listener = self.listener
        if listener is not None and not self.close_sent and self.handshake_complete:
            listener.on_shutdown()
            return
        super().shutdown()

    def connection_lost(self, exc: Exception | None) -> None:
        listener = self.listener
        self.listener = None
        super().connection_lost(exc)
        if listener is not None:
            listener.on_lost()
