"""The picows peer of the fan-out benchmark: picows' Cython WebSocket protocol on uvloop
(and on aiofastnet's transports, which picows 2.3 uses when installed, as here).

A publish is serialized once (bench/peers/wire.py) and ``WSTransport.send`` is called for
each subscriber in a loop: the peers table's "serialize once, loop send". No compression.
picows answers only WebSocket upgrades (a ``POST`` with a body is refused), so
``POST /v1/publish`` is served on a second port (``--http-port``) by a minimal keep-alive
HTTP/1.1 protocol in the same process and loop, its CPU counted with the server's.

Run (from the peers' venv): ``python -m bench.peers.picows.server --port 8100 --http-port 8101``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any, cast

import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from bench.peers import wire

channels: dict[str, set[WSTransport]] = {}


def send(channel: str, frame: bytes) -> None:
    for transport in channels.get(channel, ()):
        transport.send(WSMsgType.TEXT, frame)


class Subscriber(WSListener):  # type: ignore[misc]
    """One WebSocket client: answers its commands, holds its channels."""

    def __init__(self) -> None:
        self.mine: set[str] = set()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != WSMsgType.TEXT:
            if frame.msg_type == WSMsgType.CLOSE:
                transport.send_close(frame.get_close_code())
                transport.disconnect()
            return
        try:
            reply, channel = wire.command_reply(frame.get_payload_as_bytes(), "picows")
        except ValueError:
            transport.send_close(4000)
            transport.disconnect()
            return
        if channel is not None:
            channels.setdefault(channel, set()).add(transport)
            self.mine.add(channel)
        transport.send(WSMsgType.TEXT, reply)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        for channel in self.mine:
            channels.get(channel, set()).discard(transport)


def upgrade(request: WSUpgradeRequest) -> Any:
    if request.path != b"/v1/ws":
        return None
    offered = request.headers.get("sec-websocket-protocol", "")
    headers = {"Sec-WebSocket-Protocol": wire.SUBPROTOCOL} if wire.SUBPROTOCOL in offered else {}
    response = WSUpgradeResponse.create_101_response(extra_headers=headers)
    return WSUpgradeResponseWithListener(response, Subscriber())


class Publish(asyncio.Protocol):
    """``POST /v1/publish`` and ``GET /healthz``, keep-alive, pipelined requests in order."""

    def __init__(self) -> None:
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while (end := buf.find(b"\r\n\r\n")) >= 0:
            head = buf[:end].split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(buf) < end + 4 + length:
                break
            body, buf = buf[end + 4 : end + 4 + length], buf[end + 4 + length :]
            if head[0].startswith(b"POST /v1/publish "):
                try:
                    out.append((b"202 Accepted", wire.publish(body, send, "pw")))
                except ValueError:
                    out.append((b"400 Bad Request", b""))
            elif head[0].startswith(b"GET /healthz "):
                out.append((b"200 OK", wire.HEALTH))
            else:
                out.append((b"404 Not Found", b""))
        self.buf = buf
        if out and self.transport is not None:
            self.transport.write(
                b"".join(
                    b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (status, len(answer), answer)
                    for status, answer in out
                )
            )


async def serve(port: int, http_port: int) -> None:
    loop = asyncio.get_running_loop()
    ws = await ws_create_server(upgrade, "127.0.0.1", port, backlog=4096)
    http = await loop.create_server(Publish, "127.0.0.1", http_port, backlog=128)
    async with ws, http:
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--http-port", type=int, default=8101)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.http_port))


if __name__ == "__main__":
    main()
