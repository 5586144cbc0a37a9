"""A finished connection is freed by reference counting, however it ended.

The server freezes long-lived objects (realtime/gcfreeze.py) so that full collections
stay short; a frozen object that dies in a reference cycle is never collected. So every
way a connection can end must leave no cycle behind. The server runs in this process
(uvloop, a real socket, ``realtime.cli.uvicorn_config``) so its objects can be counted
with the cycle collector disabled; clients are real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from realtime.auth import mint_token
from realtime.cli import uvicorn_config
from realtime.settings import DEV_API_KEY, DEV_JWT_SECRET, Settings
from tests.server import connected, free_port, running_server

pytestmark = pytest.mark.timeout(60)

#: Server-side classes of one WebSocket connection.
SERVER_TYPES = (
    "realtime.connection.Connection",
    "realtime.wsprotocol.RealtimeWSProtocol",
    "websockets.server.ServerProtocol",
    "realtime.wsprotocol.Inbox",
    "realtime.wsprotocol.Flag",
    "realtime.httpprotocol.RealtimeHttpToolsProtocol",
    "httptools.parser.parser.HttpRequestParser",
    "uvicorn.protocols.http.flow_control.FlowControl",
)


def census() -> dict[str, int]:
    counts = collections.Counter(
        f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
    )
    return {name: counts[name] for name in SERVER_TYPES}


async def _client(port: int, user: str, **kw: Any) -> ClientConnection:
    ws = await connect(
        f"ws://127.0.0.1:{port}/v1/ws",
        subprotocols=["piggybong.v1.json"],  # type: ignore[list-item]
        compression=None,
        open_timeout=5,
        **kw,
    )
    token = mint_token(DEV_JWT_SECRET, user, ttl=60)
    await ws.send(f'{{"id":1,"op":"connect","token":"{token}"}}')
    assert '"result"' in str(await ws.recv())
    await ws.send('{"id":2,"op":"subscribe","channel":"artist:gc"}')
    assert '"result"' in str(await ws.recv())
    return ws


async def _closed_by_client(port: int) -> None:
    ws = await _client(port, "u-close")
    await ws.close()


async def _aborted_by_client(port: int) -> None:
    ws = await _client(port, "u-abort")
    ws.transport.abort()
    await ws.wait_closed()


async def _bad_frame(port: int) -> None:
    ws = await _client(port, "u-bad")
    await ws.send("not json")
    await ws.wait_closed()
    assert ws.close_code == 4000


async def _refused_token(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None) as ws:
        await ws.send('{"id":1,"op":"connect","token":"nope"}')
        await ws.recv()
        await ws.wait_closed()
    assert ws.close_code == 4001


async def _no_connect_in_time(port: int) -> None:
    async with connect(f"ws://127.0.0.1:{port}/v1/ws", compression=None) as ws:
        await ws.wait_closed()
    assert ws.close_code == 4001


async def _denied_subprotocol(port: int) -> None:
    with pytest.raises(InvalidStatus):
        await connect(f"ws://127.0.0.1:{port}/v1/ws", subprotocols=["mqtt"])  # type: ignore[list-item]


async def _slow_consumer(port: int) -> None:
    ws = await _client(port, "u-slow", max_queue=1)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        for _ in range(40):  # 40 x 200 KB: more than the socket buffers and the outbox
            body = {"channel": "artist:gc", "event": "tick", "data": {"p": "x" * 200_000}}
            response = await http.post(
                "/v1/publish", json=body, headers={"authorization": f"Bearer {DEV_API_KEY}"}
            )
            assert response.status_code == 202
    with pytest.raises(ConnectionClosed):
        while True:
            await ws.recv()
    assert ws.close_code == 4008


SCENARIOS: dict[str, Callable[[int], Awaitable[None]]] = {
    "closed by the client": _closed_by_client,
    "aborted by the client": _aborted_by_client,
    "bad frame, 4000": _bad_frame,
    "refused token, 4001": _refused_token,
    "no connect in time, 4001": _no_connect_in_time,
    "handshake denied, 400": _denied_subprotocol,
    "slow consumer, 4008": _slow_consumer,
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_a_finished_connection_leaves_no_reference_cycle(
    scenario: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The app reads its settings from the environment (create_app is uvicorn's factory).
    for name, value in {
        "CONNECT_TIMEOUT": "0.5",
        "OUTBOX_MAX_BYTES": str(256 * 1024),
        "LOG_LEVEL": "warning",
        "GC_FREEZE_INTERVAL": "3600",
        "GC_FULL_INTERVAL": "",
    }.items():
        monkeypatch.setenv(f"REALTIME_{name}", value)
    for name in ("REDIS_URL", "JWT_SECRET", "API_KEYS"):
        monkeypatch.delenv(f"REALTIME_{name}", raising=False)

    async def main() -> dict[str, int]:
        port = free_port()
        server = uvicorn.Server(uvicorn_config(Settings(port=port), loop="none"))
        task = asyncio.create_task(server.serve())
        try:
            for _ in range(500):
                if server.started:
                    break
                await asyncio.sleep(0.02)
            await _closed_by_client(port)  # warm-up: lazy imports and caches
            await asyncio.sleep(0.2)
            gc.collect()
            gc.disable()
            try:
                before = census()
                for _ in range(3):
                    await SCENARIOS[scenario](port)
                for _ in range(50):  # closing handshakes and cleanups finish
                    await asyncio.sleep(0.05)
                    left = {k: v - before[k] for k, v in census().items() if v > before[k]}
                    if not left:
                        break
                return left
            finally:
                gc.enable()
        finally:
            server.should_exit = True
            await task

    try:
        assert uvloop.run(main()) == {}
    finally:
        gc.unfreeze()  # what the server froze at start-up (the objects of this process)


def _frozen(metrics: str) -> float:
    line = next(
        line
        for line in metrics.splitlines()
        if line.startswith("piggybong_realtime_gc_frozen_objects ")
    )
    return float(line.split()[1])


@pytest.mark.asyncio
async def test_the_server_freezes_what_connections_hold_and_frees_it_when_they_close() -> None:
    env = {"REALTIME_GC_FREEZE_INTERVAL": "0.3", "REALTIME_GC_FULL_INTERVAL": "1"}
    async with running_server(env) as server, httpx.AsyncClient(base_url=server.url) as http:
        await asyncio.sleep(0.5)
        idle = _frozen((await http.get("/metrics")).text)
        assert idle > 10_000  # start-up froze the modules' objects
        async with contextlib.AsyncExitStack() as stack:
            for i in range(100):
                await stack.enter_async_context(connected(server, f"u-gc-{i}"))
            await asyncio.sleep(1.5)  # a full collection or more, which counts what is frozen
            metrics = (await http.get("/metrics")).text
            held = _frozen(metrics)
            assert held > idle + 100 * 20  # each connection's objects were frozen
            full_collections = next(
                float(line.split()[1])
                for line in metrics.splitlines()
                if line.startswith('piggybong_realtime_gc_pause_seconds_count{generation="2"}')
            )
            assert full_collections > 0  # the freezes' collections, timed by the gc hook
        await asyncio.sleep(1.5)
        after = _frozen((await http.get("/metrics")).text)
        # Closed connections left the permanent generation.
        assert after < idle + (held - idle) * 0.2, (idle, held, after)


def test_gc_intervals_empty_means_off_and_bounds_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("REALTIME_GC_FREEZE_INTERVAL", "")
    monkeypatch.setenv("REALTIME_GC_FULL_INTERVAL", "")
    settings = Settings()
    assert (settings.gc_freeze_interval, settings.gc_full_interval) == (None, None)
    for name, value in (
        ("GC_FREEZE_INTERVAL", "0.001"),
        ("GC_FREEZE_INTERVAL", "inf"),
        ("GC_FULL_INTERVAL", "nan"),
        ("NOTIFICATION_CONSUMER_IDLE_TIMEOUT", "inf"),
    ):
        monkeypatch.setenv(f"REALTIME_{name}", value)
        with pytest.raises(ValidationError, match=name.lower()):
            Settings()
        monkeypatch.delenv(f"REALTIME_{name}")
