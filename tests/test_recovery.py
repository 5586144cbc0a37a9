"""History and recovery (section 9) against the real server: memory, and two nodes on Redis."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis

from tests.server import Client, ServerProcess, connected, running_server, ws_client

pytestmark = pytest.mark.timeout(90)


@asynccontextmanager
async def node(kind: str, redis_url: str, **env: str) -> AsyncIterator[ServerProcess]:
    extra = dict(env)
    if kind == "redis":
        extra["REALTIME_REDIS_URL"] = redis_url
    async with running_server(extra) as server:
        yield server


async def publish(server: ServerProcess, channel: str, *events: str, **extra: Any) -> list[int]:
    response = await server.publish([{"channel": channel, "event": e, **extra} for e in events])
    assert response.status_code == 202, response.text
    offsets: list[int] = response.json()["offsets"]
    return offsets


async def pushed_events(client: Client, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < count:
        message = await client.next_pushed(timeout)
        if message.get("type") == "event":
            out.append(message)
    return out


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_resume_returns_what_was_missed_then_live(kind: str, redis_url: str) -> None:
    async with node(kind, redis_url) as server:
        async with connected(server, "u-r1") as client:
            reply = await client.command("subscribe", channel="artist:ive")
            position = reply["result"]
            assert set(position) == {"epoch", "offset"}
            await publish(server, "artist:ive", "a", "b")
            seen = await pushed_events(client, 2)
            assert [e["offset"] for e in seen] == [position["offset"] + 1, position["offset"] + 2]
        last = {"epoch": position["epoch"], "offset": seen[-1]["offset"]}
        missed = await publish(server, "artist:ive", "c", "d", "e")
        async with connected(server, "u-r1") as client:
            reply = await client.command("subscribe", channel="artist:ive", since=last)
            result = reply["result"]
            assert result["recovered"] is True
            assert result["epoch"] == last["epoch"] and result["offset"] == missed[-1]
            assert [(p["event"], p["offset"]) for p in result["publications"]] == list(
                zip("cde", missed, strict=True)
            )
            assert all(p["type"] == "event" for p in result["publications"])
            live = await publish(server, "artist:ive", "f")
            (event,) = await pushed_events(client, 1)
            assert (event["event"], event["offset"]) == ("f", live[0])
            # history op: the latest, and after a position
            latest = (await client.command("history", channel="artist:ive", limit=2))["result"]
            assert [p["event"] for p in latest["publications"]] == ["e", "f"]
            after = await client.command("history", channel="artist:ive", since=last, limit=2)
            assert [p["event"] for p in after["result"]["publications"]] == ["c", "d"]


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_when_recovery_is_refused(kind: str, redis_url: str) -> None:
    async with node(kind, redis_url) as server:
        async with connected(server, "u-r2") as client:
            top = (await client.command("subscribe", channel="artist:aespa"))["result"]
        await publish(server, "artist:aespa", *[f"e{i}" for i in range(101)])  # free max: 100
        async with connected(server, "u-r2") as client:
            cases = [
                {"epoch": "not-the-epoch", "offset": top["offset"]},
                {"epoch": top["epoch"], "offset": top["offset"] + 500},  # ahead
                {"epoch": top["epoch"], "offset": top["offset"]},  # 101 missed > 100
            ]
            for since in cases:
                reply = await client.command("subscribe", channel="artist:aespa", since=since)
                result = reply["result"]
                assert (result["recovered"], result["publications"]) == (False, []), since
                assert result["offset"] == top["offset"] + 101
                await client.command("unsubscribe", channel="artist:aespa")
            # 100 missed is within the free tier's maximum.
            since = {"epoch": top["epoch"], "offset": top["offset"] + 1}
            reply = await client.command("subscribe", channel="artist:aespa", since=since)
            assert reply["result"]["recovered"] is True
            assert len(reply["result"]["publications"]) == 100


async def test_connect_resumes_a_session_in_one_round_trip(tmp_path: Path) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"tiers": {"free": {"max_subscriptions": 3}}}))
    async with running_server({"REALTIME_TIER_POLICY": str(policy)}) as server:
        async with connected(server, "u-r3") as client:
            first = await client.command("subscribe", channel="artist:txt")
        await publish(server, "artist:txt", "x", "spending.created")
        await publish(server, "user:u-r3", "spending.created", "spending.updated")
        async with ws_client(server) as client:
            since = {"epoch": first["result"]["epoch"], "offset": first["result"]["offset"]}
            reply = await client.command(
                "connect",
                token=server.token("u-r3"),
                channels=[
                    {"channel": "artist:txt", "since": since},
                    {"channel": "user:u-r3", "since": {"epoch": "old", "offset": 0}},
                    {"channel": "user:someone-else"},
                    {"channel": "nonsense"},
                    {"channel": "artist:one"},
                    {"channel": "artist:two"},  # over max_subscriptions (3)
                ],
            )
            result = reply["result"]
            assert sorted(result["subscriptions"]) == ["artist:one", "artist:txt", "user:u-r3"]
            txt = result["channels"]["artist:txt"]
            assert txt["recovered"] is True
            # Spending items come back one by one as events.
            assert [p["event"] for p in txt["publications"]] == ["x", "spending.created"]
            assert result["channels"]["user:u-r3"]["recovered"] is False  # another epoch
            assert "recovered" not in result["channels"]["artist:one"]
            assert {k: v["code"] for k, v in result["refused"].items()} == {
                "user:someone-else": "forbidden",
                "nonsense": "bad_request",
                "artist:two": "limit_exceeded",
            }


async def test_free_connections_never_recover_premium_events() -> None:
    async with running_server() as server:
        async with (
            connected(server, "u-r4") as free,
            connected(server, "u-r5", tier="paid") as paid,
        ):
            positions = {}
            for name, client in (("free", free), ("paid", paid)):
                reply = await client.command("subscribe", channel="broadcast")
                positions[name] = reply["result"]
        await publish(server, "broadcast", "news", "market.open", "news2")
        got = {}
        for name, tier in (("free", None), ("paid", "paid")):
            async with connected(server, f"u-r-{name}", tier=tier) as client:
                since = {k: positions[name][k] for k in ("epoch", "offset")}
                reply = await client.command("subscribe", channel="broadcast", since=since)
                got[name] = [p["event"] for p in reply["result"]["publications"]]
        assert got == {"free": ["news", "news2"], "paid": ["news", "market.open", "news2"]}


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_http_history_and_offsets(kind: str, redis_url: str) -> None:
    async with node(kind, redis_url) as server:
        offsets = await publish(server, "artist:le", "one", "two", "three")
        assert offsets == [offsets[0], offsets[0] + 1, offsets[0] + 2]
        async with server.http() as http:
            page = (await http.get("/v1/history/artist:le", params={"limit": 2})).json()
            assert [p["event"] for p in page["publications"]] == ["two", "three"]
            since = {"since_offset": offsets[0], "epoch": page["epoch"]}
            page = (await http.get("/v1/history/artist:le", params=since)).json()
            assert [p["offset"] for p in page["publications"]] == offsets[1:]
            bad = await http.get("/v1/history/artist:le", params={"limit": 0})
            assert bad.status_code == 422
            assert (await http.get("/v1/history/nope")).status_code == 422
            reserved = await http.post("/v1/publish", json={"channel": "broadcast",
                                                            "event": "presence"})  # fmt: skip
            assert reserved.status_code == 422


async def test_resume_racing_publishes_on_another_node(redis_url: str) -> None:
    """A subscribe with ``since`` on node A while node B publishes without pause: every
    publication after the position arrives once, in order, recovered or live."""
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as a, running_server(env) as b:
        async with connected(a, "u-race", tier="paid") as client:
            start = (await client.command("subscribe", channel="artist:race"))["result"]
        total = 300
        stop = asyncio.Event()

        async def publisher() -> None:
            async with b.http() as http:
                for i in range(total):
                    response = await http.post(
                        "/v1/publish", json={"channel": "artist:race", "event": f"e{i}"}
                    )
                    assert response.status_code == 202
                    if i == total // 3:
                        stop.set()

        task = asyncio.create_task(publisher())
        await stop.wait()
        async with connected(a, "u-race", tier="paid") as client:
            since = {"epoch": start["epoch"], "offset": start["offset"]}
            reply = await client.command("subscribe", channel="artist:race", since=since)
            result = reply["result"]
            assert result["recovered"] is True
            offsets = [p["offset"] for p in result["publications"]]
            await task
            while not offsets or offsets[-1] < start["offset"] + total:
                message = await client.next_pushed(10)
                if message.get("type") == "event":
                    offsets.append(message["offset"])
        assert offsets == list(range(start["offset"] + 1, start["offset"] + total + 1))


async def test_a_node_fills_what_its_lost_pubsub_missed(redis_url: str) -> None:
    """Node A loses Redis (its ACL user disabled, its connections killed) while node B
    publishes 100 events; when A is let back in, its subscriber gets every publication
    once and in order, live: A fills the gap from history."""
    admin = aredis.Redis.from_url(redis_url)
    await admin.acl_setuser(
        "node-a", enabled=True, passwords=["+pw-a"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    a_url = redis_url.replace("redis://", "redis://node-a:pw-a@")
    async with (
        running_server({"REALTIME_REDIS_URL": a_url}) as a,
        running_server({"REALTIME_REDIS_URL": redis_url}) as b,
    ):
        async with connected(a, "u-gap", tier="paid") as client:
            start = (await client.command("subscribe", channel="artist:gap"))["result"]
            total = 300

            async def publisher() -> None:
                async with b.http() as http:
                    for i in range(total):
                        if i == 100:
                            await admin.acl_setuser("node-a", enabled=False)
                            await admin.client_kill_filter(user="node-a")
                        if i == 200:
                            await admin.acl_setuser("node-a", enabled=True)
                        body = {"channel": "artist:gap", "event": f"e{i}"}
                        response = await http.post("/v1/publish", json=body)
                        assert response.status_code == 202

            task = asyncio.create_task(publisher())
            offsets: list[int] = []
            while not offsets or offsets[-1] < start["offset"] + total:
                message = await client.next_pushed(20)
                if message.get("type") == "event":
                    offsets.append(message["offset"])
            await task
        async with a.http() as http:
            metrics = (await http.get("/metrics")).text
    await admin.acl_deluser("node-a")
    await admin.aclose()
    assert offsets == list(range(start["offset"] + 1, start["offset"] + total + 1))
    filled = [x for x in metrics.splitlines() if x.startswith("piggybong_realtime_hub_gap_fills")]
    assert filled and float(filled[0].split()[1]) >= 50, filled  # the loss was real, filled
