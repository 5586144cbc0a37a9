"""Several server processes on one real Redis act as one; Redis may go away and come back."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import httpx
import pytest

from tests.redis_server import RedisServer
from tests.server import connected, running_server, start_server, ws_client

pytestmark = pytest.mark.timeout(90)


async def test_two_nodes_on_one_redis_act_as_one(redis_url: str) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-x") as on_a, connected(b, "u-x", binary=True) as on_b:
            for client in (on_a, on_b):
                await client.command("subscribe", channel="artist:newjeans")
            # A backend publish on node B reaches subscribers of both nodes.
            response = await b.publish(
                {
                    "channel": "artist:newjeans",
                    "event": "mv.released",
                    "data": {"title": "How Sweet"},
                }
            )
            assert response.status_code == 202
            for client in (on_a, on_b):
                event = await client.next_pushed()
                assert (event["event"], event["data"]) == ("mv.released", {"title": "How Sweet"})
            # A device's publish on node A reaches the same user's device on node B.
            reply = await on_a.command("publish", channel="user:u-x", event="sync", data={})
            for client in (on_a, on_b):
                assert (await client.next_pushed())["id"] == reply["result"]["id"]
            # Idempotency is shared: the same id on both nodes is delivered once.
            body = {"channel": "user:u-x", "event": "dup", "id": "same-id", "data": {}}
            assert (await a.publish(body)).status_code == 202
            assert (await b.publish(body)).status_code == 202
            await a.publish({"channel": "user:u-x", "event": "marker"})
            assert (await on_a.next_pushed())["event"] == "dup"
            assert (await on_a.next_pushed())["event"] == "marker"
            # Connections per user count across nodes: a third (free: 2) is refused.
            async with ws_client(a) as third:
                reply = await third.command("connect", token=a.token("u-x"))
                assert reply["error"]["code"] == "limit_exceeded"
                assert await third.close_code() == 4029


async def _wait_ready(client: httpx.AsyncClient, want: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (await client.get("/readyz")).status_code != want:
        assert time.monotonic() < deadline, f"/readyz never answered {want}"
        await asyncio.sleep(0.1)


async def test_redis_restart_mid_stream(redis_server: Any, redis_url: str) -> None:
    """Redis killed and restarted empty: publishes are refused while it is down, the node
    re-subscribes without a restart, and the lost history (a new epoch) closes its
    subscribers with 1001; they resume, are told recovered: false, and get what follows."""
    async with (
        running_server({"REALTIME_REDIS_URL": redis_url}) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5) as http,
    ):
        async with connected(server, "u-r", binary=True) as client:
            first = await client.command("subscribe", channel="artist:restart")
            event: dict[str, Any] = {"channel": "artist:restart", "event": "e", "data": {"n": 1}}
            assert (await server.publish(event)).status_code == 202
            seen = await client.next_pushed()
            assert seen["data"] == {"n": 1}

            redis_server.kill()
            await _wait_ready(http, 503)
            response = await server.publish({**event, "data": {"n": 2}})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "unavailable"

            redis_server.restart()
            await _wait_ready(http, 200)
            assert (await server.publish({**event, "data": {"n": 3}})).status_code == 202
            assert await client.close_code(timeout=20) == 1001
        since = {"epoch": first["result"]["epoch"], "offset": seen["offset"]}
        async with connected(server, "u-r", binary=True) as client:
            reply = await client.command("subscribe", channel="artist:restart", since=since)
            assert reply["result"]["recovered"] is False  # n=2 was refused, n=3 is history
            assert reply["result"]["epoch"] != since["epoch"]
            assert (await server.publish({**event, "data": {"n": 4}})).status_code == 202
            assert (await client.next_pushed())["data"] == {"n": 4}
        metrics = (await http.get("/metrics")).text
        assert "piggybong_realtime_broker_reconnects_total 0.0" not in metrics
        # Both channels the node held (the user's and the artist's) lost their history.
        assert "piggybong_realtime_hub_history_lost_total 2.0" in metrics


async def test_readyz_answers_within_a_second_while_redis_is_frozen(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with running_server({"REALTIME_REDIS_URL": redis_url}) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            assert (await http.get("/readyz")).status_code == 200
            redis_server.pause()
            try:
                for _ in range(3):
                    started = time.monotonic()
                    answer = await http.get("/readyz")
                    took = time.monotonic() - started
                    assert took < 1.0, took
                    if answer.status_code == 503:
                        break
                    await asyncio.sleep(1.0)
                assert answer.status_code == 503
            finally:
                redis_server.resume()
            async with asyncio.timeout(30):
                while (await http.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                    await asyncio.sleep(0.2)


async def test_a_dead_nodes_connections_stop_counting_within_30_s(redis_url: str) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as survivor:
        crashed = await start_server(env)
        try:
            clients = [ws_client(crashed) for _ in range(2)]
            opened = [await c.__aenter__() for c in clients]
            for client in opened:
                assert "result" in await client.command("connect", token=crashed.token("u-dead"))
            await crashed.stop(signal.SIGKILL)
            for cm in clients:
                with contextlib.suppress(Exception):
                    await cm.__aexit__(None, None, None)
        finally:
            crashed.log_path.unlink(missing_ok=True)
        started = time.monotonic()
        async with asyncio.timeout(35):
            while True:
                async with ws_client(survivor) as client:
                    reply = await client.command("connect", token=survivor.token("u-dead"))
                    if "result" in reply:
                        break
                    assert reply["error"]["retry_after"] == 20
                await asyncio.sleep(1.0)
        assert time.monotonic() - started < 30
