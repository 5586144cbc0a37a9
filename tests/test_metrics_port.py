"""REALTIME_METRICS_PORT: each process's own /metrics beside a shared API port."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import pytest

from tests.server import connected, free_port, running_server, server_env
from tests.test_cli import _healthz_node, realtime

pytestmark = pytest.mark.timeout(60)


def _open_connections(metrics: str) -> float:
    line = next(
        line for line in metrics.splitlines() if line.startswith("piggybong_realtime_ws_open ")
    )
    return float(line.split()[1])


async def test_each_reuse_port_process_answers_its_own_metrics() -> None:
    port, metrics_a, metrics_b = free_port(), free_port(), free_port()
    env = {"REALTIME_REUSE_PORT": "true"}
    async with (
        running_server(
            {**env, "REALTIME_METRICS_PORT": str(metrics_a), "REALTIME_NODE_ID": "node-a"}, port
        ) as a,
        running_server(
            {**env, "REALTIME_METRICS_PORT": str(metrics_b), "REALTIME_NODE_ID": "node-b"}, port
        ),
        httpx.AsyncClient(timeout=5) as http,
        contextlib.AsyncExitStack() as stack,
    ):
        async with asyncio.timeout(20):  # node-a answered the start-up check for node-b too
            while True:
                if await _healthz_node(a.url) == "node-b":
                    break
                await asyncio.sleep(0.05)
        for i in range(30):  # new TCP connections: the kernel spreads them over both
            await stack.enter_async_context(connected(a, f"u-metrics-{i}"))
        counts = []
        for metrics_port in (metrics_a, metrics_b):
            response = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            counts.append(_open_connections(response.text))
        # Each process counts its own connections: together, all 30, and both have some.
        assert sum(counts) == 30 and min(counts) > 0, counts
        assert (await http.get(f"http://127.0.0.1:{metrics_a}/healthz")).status_code == 404
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_a)
        writer.write(b"POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.read()).startswith(b"HTTP/1.1 404 ")
        writer.close()


def test_a_taken_metrics_port_stops_the_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {
            **server_env(),
            "REALTIME_PORT": str(free_port()),
            "REALTIME_METRICS_PORT": str(taken.getsockname()[1]),
        }
        result = realtime("serve", env=env)
    assert result.returncode != 0
    assert "address already in use" in result.stderr.lower(), result.stderr


def test_a_metrics_port_with_workers_is_refused() -> None:
    result = realtime(
        "serve", "--workers", "2", "--metrics-port", "9101", "--redis-url", "redis://127.0.0.1:1/0"
    )
    assert result.returncode == 2
    assert "REALTIME_METRICS_PORT: needs REALTIME_WORKERS=1" in result.stderr, result.stderr


async def test_the_metrics_port_is_bounded() -> None:
    metrics_port = free_port()
    async with (
        running_server({"REALTIME_METRICS_PORT": str(metrics_port)}),
        contextlib.AsyncExitStack() as stack,
    ):
        silent = []
        for _ in range(16):  # clients that never send a request hold every slot...
            reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
            stack.callback(writer.close)
            silent.append(reader)
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", metrics_port)
        async with asyncio.timeout(2):  # ...so one more is closed at once, unanswered
            assert await reader.read() == b""
        writer.close()
        async with asyncio.timeout(8):  # and each silent one is cut after 5 s
            for held in silent:
                with contextlib.suppress(ConnectionError):
                    assert await held.read() == b""
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.get(f"http://127.0.0.1:{metrics_port}/metrics")
            assert response.status_code == 200
