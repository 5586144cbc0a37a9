"""The attacks of issue 12, each against a fresh server, with what they did to it.

``python -m bench.attacks [--src DIR] [--only NAME]`` starts ``python -m realtime serve``
from ``DIR`` (default: this tree; give an export of another commit to compare) on a free
loopback port for each attack and prints one JSON line per attack: what the client saw and
what the server paid (RSS growth from /proc, log bytes). Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
import msgpack
from websockets.asyncio.client import connect

SECRET = "attack-secret-0123456789abcdef0123456789"
KEY = "attack-api-key"
ROOT = Path(__file__).resolve().parent.parent


class Server:
    def __init__(self, src: Path, env: dict[str, str]) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        fd, name = tempfile.mkstemp(prefix="attack-", suffix=".log")
        self.log_path = Path(name)
        full = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
        full.update(
            REALTIME_PORT=str(self.port),
            REALTIME_JWT_SECRET=SECRET,
            REALTIME_API_KEYS=KEY,
            PYTHONPATH=str(src),
            PYTHONDONTWRITEBYTECODE="1",
            **env,
        )
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "realtime", "serve"],
                cwd=src,
                env=full,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    async def ready(self) -> None:
        deadline = time.monotonic() + 20
        async with httpx.AsyncClient(timeout=1) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise RuntimeError(self.log_path.read_text())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
        return 0.0

    def log_bytes(self) -> int:
        return self.log_path.stat().st_size

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log_path.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def server(src: Path, env: dict[str, str] | None = None) -> AsyncIterator[Server]:
    running = Server(src, env or {})
    try:
        await running.ready()
        yield running
    finally:
        running.stop()


def token(user: str, **claims: Any) -> str:
    return jwt.encode({"sub": user, "exp": int(time.time()) + 3600, **claims}, SECRET, "HS256")


def handshake() -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /v1/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def ping_frame() -> bytes:
    mask = os.urandom(4)
    payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
    return struct.pack("!BB", 0x89, 0x80 | 125) + mask + payload


async def raw(srv: Server) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", srv.port)


async def alive(reader: asyncio.StreamReader) -> bool:
    with contextlib.suppress(TimeoutError):
        try:
            return bool(await asyncio.wait_for(reader.read(1), 0.05)) or not reader.at_eof()
        except ConnectionError:
            return False
    return not reader.at_eof()


# ------------------------------------------------------------------------------ attacks


async def head_50mb(src: Path) -> dict[str, Any]:
    async with server(src) as srv:
        reader, writer = await raw(srv)
        sent = 0
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: ")
        with contextlib.suppress(ConnectionError, TimeoutError):
            while sent < 50 * 2**20:
                writer.write(b"a" * 2**20)
                await asyncio.wait_for(writer.drain(), 10)
                sent += 2**20
            writer.write(b"\r\n\r\n")
            await writer.drain()
        answer = b""
        with contextlib.suppress(ConnectionError, TimeoutError):
            answer = await asyncio.wait_for(reader.read(200), 10)
        writer.close()
        return {
            "header_mb_sent": round(sent / 2**20),
            "answer": answer[:40].decode(errors="replace"),
        }


async def half_heads(src: Path) -> dict[str, Any]:
    async with server(src) as srv:
        before = srv.rss_mb()
        held = []
        for _ in range(2):
            reader, writer = await raw(srv)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: ")
            with contextlib.suppress(ConnectionError, TimeoutError):
                for _ in range(40):
                    writer.write(b"a" * 2**20)
                    await asyncio.wait_for(writer.drain(), 10)
            held.append((reader, writer))
        await asyncio.sleep(1)
        grown = round(srv.rss_mb() - before, 1)
        still = sum([await alive(r) for r, _ in held])
        for _, writer in held:
            writer.close()
        return {"rss_growth_mb_while_held": grown, "connections_still_open": still}


async def slowloris(src: Path, seconds: float = 20.0, count: int = 200) -> dict[str, Any]:
    async with server(src) as srv:
        conns = [await raw(srv) for _ in range(count)]
        head = b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-A: " + b"a" * 1000
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds:
            for _, writer in conns:
                with contextlib.suppress(ConnectionError, OSError):
                    writer.write(head[sent : sent + 1])
            sent += 1
            await asyncio.sleep(1.0)
        open_ = sum([await alive(r) for r, _ in conns])
        for _, writer in conns:
            writer.close()
        return {"connections": count, "seconds": seconds, "alive_after": open_}


async def ping_flood(src: Path) -> dict[str, Any]:
    async with server(src) as srv:
        reader, writer = await raw(srv)
        writer.write(handshake())
        await reader.readuntil(b"\r\n\r\n")
        before = srv.rss_mb()
        burst = ping_frame() * 64
        deadline = time.monotonic() + 4
        pings = 0
        with contextlib.suppress(ConnectionError, TimeoutError):
            while time.monotonic() < deadline:
                writer.write(burst)
                await asyncio.wait_for(writer.drain(), 1)
                pings += 64
        during = round(srv.rss_mb() - before, 1)
        writer.close()
        await asyncio.sleep(5)
        return {
            "pings_sent": pings,
            "rss_growth_mb_after_4s": during,
            "rss_growth_mb_5s_after_close": round(srv.rss_mb() - before, 1),
        }


async def per_address(src: Path, count: int = 1200) -> dict[str, Any]:
    async with server(src) as srv:
        statuses: dict[str, int] = {}
        held = []
        for _ in range(count):
            try:
                reader, writer = await raw(srv)
                writer.write(handshake())
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                status = head[9:12].decode()
            except (ConnectionError, TimeoutError, asyncio.IncompleteReadError):
                status = "closed"
            statuses[status] = statuses.get(status, 0) + 1
            held.append(writer)
        for writer in held:
            writer.close()
        return {"handshakes_from_one_address": count, "answers": statuses}


async def prelogin_log(src: Path, count: int = 100) -> dict[str, Any]:
    async with server(src) as srv:
        before = srv.log_bytes()
        bad = token("u", exp=10**400)
        codes: dict[str, int] = {}
        for _ in range(count):
            async with connect(srv.ws_url) as ws:
                await ws.send(json.dumps({"id": 1, "op": "connect", "token": bad}))
                reply: Any = None
                with contextlib.suppress(Exception):
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 5))
                    await asyncio.wait_for(ws.recv(), 0.2)
                code = "connected" if reply and "result" in reply else str(ws.close_code)
                codes[code] = codes.get(code, 0) + 1
        return {"connects": count, "close_codes": codes, "log_bytes": srv.log_bytes() - before}


async def spending_fan_out(src: Path) -> dict[str, Any]:
    """A msgpack device publishes a spending item with bin data; the user's JSON device and
    another msgpack device hold the channel; 50 good items follow."""
    async with server(src) as srv:
        tok = token("spender", tier="paid")
        out: dict[str, Any] = {}
        async with (
            connect(srv.ws_url, subprotocols=["piggybong.v1.msgpack"]) as pub,  # type: ignore[list-item]
            connect(srv.ws_url, subprotocols=["piggybong.v1.json"]) as jdev,  # type: ignore[list-item]
            connect(srv.ws_url, subprotocols=["piggybong.v1.msgpack"]) as mdev,  # type: ignore[list-item]
        ):
            for i, ws in enumerate((pub, jdev, mdev)):
                hello = {"id": 1, "op": "connect", "token": tok}
                await ws.send(msgpack.packb(hello) if i != 1 else json.dumps(hello))
                await asyncio.wait_for(ws.recv(), 5)
            bad = {"id": 2, "op": "publish", "channel": "user:spender", "event": "spending.x"}
            await pub.send(msgpack.packb({**bad, "data": {"b": b"\x00"}}, use_bin_type=True))
            with contextlib.suppress(Exception):
                out["bad_publish_reply"] = msgpack.unpackb(await asyncio.wait_for(pub.recv(), 5))
            items = 0
            with contextlib.suppress(Exception):
                async with asyncio.timeout(2):
                    while True:
                        message = msgpack.unpackb(await mdev.recv())
                        items += len(message.get("items", []))
            out["other_device_items"] = items
            with contextlib.suppress(Exception):
                await asyncio.wait_for(jdev.recv(), 1)
            out["json_device_close"] = jdev.close_code
            out["publisher_close"] = pub.close_code
        return out


async def unsendable_publish(src: Path) -> dict[str, Any]:
    async with server(src) as srv, httpx.AsyncClient(base_url=srv.url, timeout=10) as http:
        auth = {"Authorization": f"Bearer {KEY}", "content-type": "application/json"}
        out: dict[str, Any] = {}
        head = '{"channel":"broadcast","event":"e","id":'
        bodies = {
            "nan": head + '"i1","data":{"v":NaN}}',
            "int_2**70": head + f'"i2","data":{{"v":{2**70}}}}}',
            "lone_surrogate": head + '"i3","data":{"v":"\\ud800"}}',
        }
        async with connect(srv.ws_url) as ws:
            await ws.send(json.dumps({"id": 1, "op": "connect", "token": token("r")}))
            await ws.recv()
            await ws.send(json.dumps({"id": 2, "op": "subscribe", "channel": "broadcast"}))
            await ws.recv()
            for name, body in bodies.items():
                first = (await http.post("/v1/publish", content=body, headers=auth)).status_code
                eid = json.loads(body.replace("NaN", "0").replace("\\ud800", "x"))["id"]
                fixed = {"channel": "broadcast", "event": "e", "id": eid, "data": {"v": 1}}
                retry = (await http.post("/v1/publish", json=fixed, headers=auth)).status_code
                got = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        got.append(json.loads(await asyncio.wait_for(ws.recv(), 0.5)))
                out[name] = {
                    "first": first,
                    "retry_with_good_data": retry,
                    "subscriber_got": [m.get("data") for m in got],
                }
        return out


async def rate_key_variants(src: Path) -> dict[str, Any]:
    env = {"REALTIME_PUBLISH_RATE_PER_KEY": "1"}
    async with server(src, env) as srv, httpx.AsyncClient(base_url=srv.url, timeout=5) as http:
        statuses = []
        for header in (f"Bearer {KEY}", f"bearer {KEY}", f"BEARER  {KEY}", f"Bearer   {KEY}"):
            answer = await http.post(
                "/v1/publish",
                json={"channel": "broadcast", "event": "e"},
                headers={"Authorization": header},
            )
            statuses.append(answer.status_code)
        return {"statuses_within_one_second": statuses}


async def long_close_reason(src: Path) -> dict[str, Any]:
    def b64(value: dict[str, str]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    async with server(src) as srv, connect(srv.ws_url) as ws:
        bad = f"{b64({'alg': 'é' * 200})}.{b64({'sub': 'u'})}.c2ln"
        await ws.send(json.dumps({"id": 1, "op": "connect", "token": bad}))
        with contextlib.suppress(Exception):
            while True:
                await asyncio.wait_for(ws.recv(), 5)
        return {"close_code": ws.close_code, "reason_bytes": len((ws.close_reason or "").encode())}


async def absurd_exp(src: Path) -> dict[str, Any]:
    async with server(src) as srv:
        out: dict[str, Any] = {}
        for name, exp in (("1e308", 1e308), ("10**400", 10**400)):
            async with connect(srv.ws_url, subprotocols=["piggybong.v1.msgpack"]) as ws:  # type: ignore[list-item]
                tok = token("u", exp=exp)
                steps = []
                with contextlib.suppress(Exception):
                    await ws.send(msgpack.packb({"id": 1, "op": "connect", "token": tok}))
                    steps.append(sorted(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))))
                    await ws.send(msgpack.packb({"id": 2, "op": "refresh", "token": tok}))
                    steps.append(sorted(msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))))
                out[name] = {"replies": steps, "close_code": ws.close_code}
        return out


ATTACKS: dict[str, Callable[[Path], Awaitable[dict[str, Any]]]] = {
    "head_50mb": head_50mb,
    "half_heads": half_heads,
    "slowloris": slowloris,
    "ping_flood": ping_flood,
    "per_address": per_address,
    "prelogin_log": prelogin_log,
    "spending_fan_out": spending_fan_out,
    "unsendable_publish": unsendable_publish,
    "rate_key_variants": rate_key_variants,
    "long_close_reason": long_close_reason,
    "absurd_exp": absurd_exp,
}


async def main_async(src: Path, only: Sequence[str] | None) -> None:
    for name, attack in ATTACKS.items():
        if only and name not in only:
            continue
        try:
            result = await attack(src)
        except Exception as exc:
            result = {"failed": repr(exc)}
        print(json.dumps({"attack": name, **result}), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacks", description=__doc__)
    parser.add_argument("--src", type=Path, default=ROOT, help="tree to run the server from")
    parser.add_argument("--only", action="append", choices=sorted(ATTACKS))
    args = parser.parse_args(argv)
    asyncio.run(main_async(args.src.resolve(), args.only))
    return 0


if __name__ == "__main__":
    sys.exit(main())
