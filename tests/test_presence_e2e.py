"""Presence (section 10) against the real server: counts across nodes, sessions, pushes,
the HTTP endpoint, and a dead node's connections stopping to count."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import pytest

from tests.server import Client, connected, running_server, start_server, ws_client

pytestmark = pytest.mark.timeout(90)


async def presence_push(client: Client, timeout: float = 5.0) -> dict[str, Any]:
    while True:
        message = await client.next_pushed(timeout)
        if message.get("type") == "presence":
            return message


async def test_counts_sessions_pushes_and_http_across_two_nodes(redis_url: str) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-p1", tier="paid") as watcher:
            reply = await watcher.command("subscribe", channel="artist:p", presence=True)
            assert "result" in reply
            first = await presence_push(watcher)
            assert (first["users"], first["connections"]) == (1, 1)
            async with (
                connected(b, "u-p2") as two,
                ws_client(b) as three,
            ):
                reply = await three.command(
                    "connect", token=b.token("u-p2"), client={"app": "ios", "version": "3.1"}
                )
                assert "result" in reply
                started = time.monotonic()
                for client in (two, three):
                    await client.command("subscribe", channel="artist:p")
                pushes: list[dict[str, Any]] = []
                while not pushes or (pushes[-1]["users"], pushes[-1]["connections"]) != (2, 3):
                    pushes.append(await presence_push(watcher))
                assert time.monotonic() - started < 3
                # At most one push a second per channel.
                assert len(pushes) <= 2
                counts = await watcher.command("presence", channel="artist:p")
                assert counts["result"] == {"users": 2, "connections": 3}
                own = (await three.command("presence", channel="user:u-p2"))["result"]
                assert (own["users"], own["connections"]) == (1, 2)
                clients = sorted(str(s["client"]) for s in own["sessions"])
                assert clients == ["None", "{'app': 'ios', 'version': '3.1'}"]
                denied = await two.command("presence", channel="user:u-p1")
                assert denied["error"]["code"] == "forbidden"
                async with a.http() as http:
                    body = (await http.get("/v1/presence/artist:p", params={"members": 1})).json()
                    assert body == {"users": 2, "connections": 3, "user_ids": ["u-p1", "u-p2"]}
                    assert (await http.get("/v1/presence/nope")).status_code == 422
            # Both of u-p2's connections left: one push brings the counts back.
            while True:
                push = await presence_push(watcher)
                if (push["users"], push["connections"]) == (1, 1):
                    break


async def test_a_dead_nodes_members_stop_counting_within_30_s(redis_url: str) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as survivor:
        crashed = await start_server(env)
        try:
            holder = ws_client(crashed)
            client = await holder.__aenter__()
            assert "result" in await client.command("connect", token=crashed.token("u-gone"))
            await client.command("subscribe", channel="artist:dead")
            async with survivor.http() as http:
                body = (await http.get("/v1/presence/artist:dead")).json()
                assert body == {"users": 1, "connections": 1}
                await crashed.stop(signal.SIGKILL)
                with contextlib.suppress(Exception):
                    await holder.__aexit__(None, None, None)
                started = time.monotonic()
                async with asyncio.timeout(35):
                    while (await http.get("/v1/presence/artist:dead")).json()["connections"]:  # noqa: ASYNC110
                        await asyncio.sleep(0.5)
                assert time.monotonic() - started < 30
        finally:
            crashed.log_path.unlink(missing_ok=True)


async def test_presence_on_the_in_process_default() -> None:
    async with running_server() as server:
        async with connected(server, "u-m1") as one, connected(server, "u-m2") as two:
            for client in (one, two):
                await client.command("subscribe", channel="broadcast")
            reply = await one.command("presence", channel="broadcast")
            assert reply["result"] == {"users": 2, "connections": 2}
        async with connected(server, "u-m3") as three:
            reply = await three.command("presence", channel="broadcast")
            assert reply["result"] == {"users": 0, "connections": 0}
            reserved = await three.command("publish", channel="user:u-m3", event="presence")
            assert reserved["error"]["code"] == "bad_request"
