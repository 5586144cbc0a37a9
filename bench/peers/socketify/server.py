"""The socketify peer of the fan-out benchmark: µWebSockets (C++) under a thin Python layer.

A publish is serialized once (bench/peers/wire.py) and handed to µWebSockets' own pub/sub
(``App.publish``: its C++ topic tree writes every subscriber, corked), the way socketify is
meant to broadcast. Every handler is synchronous, so the process runs socketify's native
libuv loop directly (``UVLoop.run``, blocking in epoll): ``App.run()`` would drive that loop
from an asyncio loop that polls it without sleeping while busy, CPU that is not the
server's work. No compression; back-pressure up to 1 MiB a subscriber (above it µWebSockets
drops, and the step would fail on deliveries); no idle timeout, as the Node peer has none.

Run (from the peers' venv): ``python -m bench.peers.socketify.server --port 8100``.
"""

from __future__ import annotations

import argparse
from typing import Any

from socketify import App, AppListenOptions, OpCode

from bench.peers import wire

CHANNELS = "channels"  # a socket's user data: the topics it subscribed to


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    app = App()

    def send(channel: str, frame: bytes) -> None:
        app.publish(channel, frame, OpCode.TEXT)

    def on_message(ws: Any, message: bytes | str, opcode: Any) -> None:
        try:
            reply, channel = wire.command_reply(message, "socketify")
        except ValueError:
            ws.end(4000)
            return
        if channel is not None:
            ws.subscribe(channel)
        ws.send(reply, OpCode.TEXT)

    def on_publish(res: Any, req: Any) -> None:
        chunks: list[bytes] = []

        def on_data(res: Any, chunk: bytes, is_end: bool) -> None:
            chunks.append(chunk)
            if not is_end:
                return
            try:
                answer = wire.publish(b"".join(chunks), send, "sk")
            except ValueError:
                res.write_status(400).end(b"")
                return
            res.write_status(202).write_header("Content-Type", "application/json").end(answer)

        res.on_data(on_data)

    def on_health(res: Any, req: Any) -> None:
        res.write_header("Content-Type", "application/json").end(wire.HEALTH)

    app.ws(
        "/v1/ws",
        {
            "compression": 0,
            "max_payload_length": 64 * 1024,
            "idle_timeout": 0,
            "max_backpressure": 1 << 20,
            "message": on_message,
        },
    )
    app.post("/v1/publish", on_publish)
    app.get("/healthz", on_health)
    app.listen(AppListenOptions(port=args.port, host="127.0.0.1"))
    app.loop.uv_loop.run()  # the native libuv loop; SIGTERM ends the process


if __name__ == "__main__":
    main()
