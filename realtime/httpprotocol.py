"""uvicorn's httptools HTTP protocol, releasing itself when a request upgrades to WebSocket.

After an upgrade the transport belongs to the WebSocket protocol and the HTTP protocol is
garbage, but in a reference cycle (its ``HttpRequestParser`` holds its bound callbacks).
The node freezes long-lived objects (``realtime/gcfreeze.py``); a cycle frozen while it
was still reachable is never collected. Dropping the parser at the upgrade lets
reference counting free the protocol at once.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class RealtimeHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` that breaks its parser cycle once it hands over to WebSocket."""

    def handle_websocket_upgrade(self) -> None:
        super().handle_websocket_upgrade()
        # Nothing reads the parser again: the transport now calls the WebSocket protocol.
        del self.parser
