"""Attackers for the hostile mix (``bench/run.py --only hostile``), in a process of their own.

``python -m bench.hostile --port P`` holds, until killed, ``--slow-heads`` connections that
send their request head one byte a second (slowloris) from ``--slow-from`` and
``--ping-floods`` WebSocket connections that send pings as fast as the socket takes them and
never read, from ``--flood-from``. Each attacker reconnects when the server closes it, as a
real one would. Every second it prints one JSON line: attackers open, reconnects, refusals.
Loopback only (127.0.0.0/8).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence

SLOW_HEAD = b"GET /v1/ws HTTP/1.1\r\nHost: bench\r\nX-Slow: " + b"a" * 4000


def ping_frame(payload: bytes = b"p" * 125) -> bytes:
    """A masked, final client ping frame."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x89, 0x80 | len(payload)) + mask + masked


def handshake() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /v1/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: piggybong.v1.json\r\n\r\n"
    )


class Attack:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.open: Counter[str] = Counter()
        self.events: Counter[str] = Counter()

    async def _connect(
        self, source: str
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            return await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))
        except OSError:
            self.events["connect_failed"] += 1
            await asyncio.sleep(1.0)
            return None

    async def slow_head(self, source: str) -> None:
        while True:
            conn = await self._connect(source)
            if conn is None:
                continue
            reader, writer = conn
            self.open["slow_heads"] += 1
            try:
                for byte in SLOW_HEAD:
                    if reader.at_eof():
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    with contextlib.suppress(TimeoutError):
                        answer = await asyncio.wait_for(reader.read(64), 1.0)
                        if answer.startswith(b"HTTP/1.1 429"):
                            self.events["slow_head_429"] += 1
                        break  # answered or closed
            except (ConnectionError, OSError):
                pass
            finally:
                self.open["slow_heads"] -= 1
                self.events["slow_head_closed"] += 1
                writer.close()

    async def ping_flood(self, source: str) -> None:
        burst = ping_frame() * 64
        while True:
            conn = await self._connect(source)
            if conn is None:
                continue
            reader, writer = conn
            try:
                writer.write(handshake())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                if not head.startswith(b"HTTP/1.1 101"):
                    self.events["flood_refused"] += 1
                    await asyncio.sleep(1.0)
                    continue
                self.open["ping_floods"] += 1
                try:
                    while True:  # never reads again
                        writer.write(burst)
                        await asyncio.wait_for(writer.drain(), 30)
                        self.events["pings_sent"] += 64
                finally:
                    self.open["ping_floods"] -= 1
            except (ConnectionError, OSError, TimeoutError, asyncio.IncompleteReadError):
                self.events["flood_closed"] += 1
            finally:
                writer.close()

    async def report(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            line = {"t": round(time.time(), 1), "open": dict(self.open), **self.events}
            print(json.dumps(line), flush=True)


async def main_async(args: argparse.Namespace) -> None:
    attack = Attack(args.host, args.port)
    tasks = [asyncio.create_task(attack.report())]
    for _ in range(args.slow_heads):
        tasks.append(asyncio.create_task(attack.slow_head(args.slow_from)))
    for _ in range(args.ping_floods):
        tasks.append(asyncio.create_task(attack.ping_flood(args.flood_from)))
    await asyncio.gather(*tasks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--slow-heads", type=int, default=1000)
    parser.add_argument("--ping-floods", type=int, default=10)
    parser.add_argument("--slow-from", default="127.0.0.2", help="source address")
    parser.add_argument("--flood-from", default="127.0.0.3", help="source address")
    args = parser.parse_args(argv)
    if not (args.host.startswith("127.") and args.slow_from.startswith("127.")):
        print("bench.hostile: loopback only", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
