"""The real server in a subprocess on a free port, and a small real WebSocket client."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import msgpack
from websockets.asyncio.client import ClientConnection, connect

from realtime.auth import mint_token

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "test-secret-0123456789abcdef0123456789"
API_KEY = "test-api-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running ``python -m realtime serve``."""

    port: int
    proc: asyncio.subprocess.Process
    log_path: Path
    api_key: str = API_KEY
    jwt_secret: str = JWT_SECRET

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def token(self, user: str, tier: str | None = None, ttl: float = 3600, **kw: Any) -> str:
        return mint_token(self.jwt_secret, user, tier=tier, ttl=ttl, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"}, timeout=10
        )

    async def publish(self, body: Any) -> httpx.Response:
        async with self.http() as client:
            return await client.post("/v1/publish", json=body)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError(f"server did not exit in {timeout}s:\n{self.log()}") from None
        assert self.proc.returncode is not None
        return self.proc.returncode


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    # REALTIME_NATIVE passes: a test run on the interpreted or compiled path starts its
    # servers on the same one.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("REALTIME_") or k == "REALTIME_NATIVE"
    }
    env.update(
        {
            "REALTIME_HOST": "127.0.0.1",
            "REALTIME_JWT_SECRET": JWT_SECRET,
            "REALTIME_API_KEYS": f"{API_KEY},second-key",
            "REALTIME_LOG_LEVEL": "info",
            # Every test connection comes from 127.0.0.1, faster than the internet's clients:
            # the door's rate (section 11) is tested on its own (tests/test_door.py).
            "REALTIME_CONNECT_RATE_PER_IP": "100000",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra or {})
    return env


async def start_server(
    env: dict[str, str] | None = None, port: int | None = None, ready_timeout: float = 20.0
) -> ServerProcess:
    port = port or free_port()
    full_env = server_env(env)
    full_env["REALTIME_PORT"] = str(port)
    fd, log_name = tempfile.mkstemp(prefix="realtime-test-", suffix=".log")
    log_file = os.fdopen(fd, "wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "realtime",
        "serve",
        env=full_env,
        cwd=str(ROOT),
        stdout=log_file,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    log_file.close()
    server = ServerProcess(port, proc, Path(log_name))
    deadline = time.monotonic() + ready_timeout
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            if proc.returncode is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{server.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{server.url}/healthz")).status_code == 200:
                    return server
            if time.monotonic() > deadline:
                proc.kill()
                await proc.wait()
                raise AssertionError(f"server not up in {ready_timeout}s:\n{server.log()}")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_server(
    env: dict[str, str] | None = None, port: int | None = None
) -> AsyncIterator[ServerProcess]:
    """A server for the duration of the block; stopped with SIGTERM (it must exit 0)."""
    server = await start_server(env, port)
    try:
        yield server
    finally:
        if server.proc.returncode is None:
            code = await server.stop()
            assert code == 0, f"server exited {code}:\n{server.log()}"
        server.log_path.unlink(missing_ok=True)


@dataclass
class Client:
    """A real WebSocket client speaking the contract; messages that are not replies are kept."""

    ws: ClientConnection
    binary: bool
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    pushed: list[dict[str, Any]] = field(default_factory=list)

    def encode(self, message: Any) -> str | bytes:
        if self.binary:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(message)

    def decode(self, frame: str | bytes) -> dict[str, Any]:
        if self.binary:
            assert isinstance(frame, bytes), "a msgpack connection got a text frame"
            return msgpack.unpackb(frame, raw=False)  # type: ignore[no-any-return]
        assert isinstance(frame, str), "a JSON connection got a binary frame"
        return json.loads(frame)  # type: ignore[no-any-return]

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        return self.decode(await asyncio.wait_for(self.ws.recv(), timeout))

    async def command(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        cid = next(self.ids)
        await self.ws.send(self.encode({"id": cid, "op": op, **fields}))
        deadline = time.monotonic() + timeout
        while True:
            message = await self.recv(max(0.01, deadline - time.monotonic()))
            if message.get("id") == cid and "type" not in message:
                return message
            self.pushed.append(message)

    async def next_pushed(self, timeout: float = 5.0) -> dict[str, Any]:
        if self.pushed:
            return self.pushed.pop(0)
        return await self.recv(timeout)

    async def close_code(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code it sent."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout):
                while True:
                    await self.ws.recv()
        return self.ws.close_code


@contextlib.asynccontextmanager
async def ws_client(
    server: ServerProcess, *, binary: bool = False, subprotocols: list[str] | None = None, **kw: Any
) -> AsyncIterator[Client]:
    if subprotocols is None:
        subprotocols = ["piggybong.v1.msgpack" if binary else "piggybong.v1.json"]
    if subprotocols:
        kw["subprotocols"] = subprotocols
    async with connect(
        server.ws_url, compression=None, open_timeout=5, close_timeout=2, **kw
    ) as ws:
        yield Client(ws, binary)


@contextlib.asynccontextmanager
async def connected(
    server: ServerProcess, user: str, *, tier: str | None = None, binary: bool = False, **kw: Any
) -> AsyncIterator[Client]:
    async with ws_client(server, binary=binary, **kw) as client:
        reply = await client.command("connect", token=server.token(user, tier))
        assert "result" in reply, reply
        yield client
