"""Tier policy and spending batches end to end: real server processes, real sockets, real Redis.

Timing bounds are generous (2 cores, other work): lower bounds come from the
server's own stamps (an item's ``ts`` when accepted, a batch's ``ts`` when
sent), upper bounds allow for a loaded machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed

from tests.server import (
    ROOT,
    Client,
    ServerProcess,
    connected,
    running_server,
    server_env,
    start_server,
    ws_client,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(30)]

FREE_WINDOW_MS = 2000
PAID_WINDOW_MS = 250
MAX_ITEMS = 50
#: Milliseconds a server stamp may trail the true instant (whole-ms truncation, loop clock).
CLOCK_SLACK_MS = 25
FILTERED = "piggybong_realtime_hub_filtered_events_total"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ServerProcess]:
    async with running_server() as srv:
        yield srv


# --------------------------------------------------------------------------- helpers


async def next_batch(client: Client, timeout: float = 5.0) -> tuple[float, dict[str, Any]]:
    """The next pushed message, which must be a batch, and when it arrived (time.time())."""
    message = await client.next_pushed(timeout)
    arrived = time.time()
    assert message["type"] == "batch", message
    return arrived, message


async def collect_items(client: Client, want: int, timeout: float) -> list[dict[str, Any]]:
    """Batches until they hold ``want`` items in all."""
    batches: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while sum(len(b["items"]) for b in batches) < want:
        _, batch = await next_batch(client, max(0.01, deadline - time.monotonic()))
        batches.append(batch)
    return batches


def check_batch_rules(batches: list[dict[str, Any]], channel: str, window_ms: int) -> None:
    """Section 4: never empty, never over the cap, a partial batch only after its window."""
    for batch in batches:
        items = batch["items"]
        assert batch["channel"] == channel
        assert 1 <= len(items) <= MAX_ITEMS, len(items)
        assert all(item["ts"] <= batch["ts"] for item in items)
        waited = batch["ts"] - items[0]["ts"]
        if len(items) < MAX_ITEMS:
            assert waited >= window_ms - CLOCK_SLACK_MS, (
                f"a batch of {len(items)} was sent {waited} ms after its first item"
            )
        else:
            # Full: sent when the 50th item came in, not at the end of the window.
            assert batch["ts"] - items[-1]["ts"] < window_ms / 2, batch["ts"] - items[-1]["ts"]


async def metric(server: ServerProcess, name: str, labels: dict[str, str]) -> float:
    """A sample of the server's /metrics (0 when the labelled child does not exist yet)."""
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def spending(channel: str, n: int) -> dict[str, Any]:
    return {"channel": channel, "event": "spending.created", "data": {"n": n, "krw": 1000 + n}}


async def recv_until_closed(client: Client, timeout: float) -> tuple[list[dict[str, Any]], int]:
    """Every message until the server closes, and the close code."""
    messages: list[dict[str, Any]] = list(client.pushed)
    client.pushed.clear()
    with contextlib.suppress(ConnectionClosed):
        async with asyncio.timeout(timeout):
            while True:
                messages.append(client.decode(await client.ws.recv()))
    assert client.ws.close_code is not None
    return messages, client.ws.close_code


# --------------------------------------------------------------------------- 1, 2: batching


async def test_free_client_gets_500_spending_events_in_batches(server: ServerProcess) -> None:
    user = "u-free-500"
    channel = f"user:{user}"
    async with connected(server, user) as client:
        ids: list[str] = []
        started = time.monotonic()
        for chunk in range(20):  # 20 requests of 25, ~50 ms apart: about one second
            body = [spending(channel, chunk * 25 + i) for i in range(25)]
            response = await server.publish(body)
            assert response.status_code == 202, response.text
            ids.extend(response.json()["ids"])
            await asyncio.sleep(max(0.0, started + (chunk + 1) * 0.05 - time.monotonic()))
        assert time.monotonic() - started < 3.0, "publishing took far longer than planned"

        batches = await collect_items(client, 500, timeout=10)
        items = [item for batch in batches for item in batch["items"]]
        assert [item["id"] for item in items] == ids  # all, in order, none lost or duplicated
        assert [item["data"]["n"] for item in items] == list(range(500))
        assert {item["event"] for item in items} == {"spending.created"}
        check_batch_rules(batches, channel, FREE_WINDOW_MS)

        # A lone event: one-item batch after the free window. Were any item of the 500 still
        # held (a duplicate, a late batch), it would arrive first or share this batch.
        sent_at = time.time()
        response = await server.publish({**spending(channel, 500), "id": "lone-free"})
        arrived, batch = await next_batch(client, timeout=6)
        assert [item["id"] for item in batch["items"]] == ["lone-free"]
        assert 1.8 <= arrived - sent_at <= 4.0, arrived - sent_at
        check_batch_rules([batch], channel, FREE_WINDOW_MS)


async def test_window_opens_with_the_first_item(server: ServerProcess) -> None:
    user = "u-free-window"
    channel = f"user:{user}"
    async with connected(server, user, binary=True) as client:
        first = await server.publish(spending(channel, 0))
        await asyncio.sleep(1.0)
        second = await server.publish(spending(channel, 1))
        _, batch = await next_batch(client, timeout=6)
        assert [i["id"] for i in batch["items"]] == first.json()["ids"] + second.json()["ids"]
        # Sent at the end of the first item's window, not two seconds after the second one.
        waited = batch["ts"] - batch["items"][0]["ts"]
        assert FREE_WINDOW_MS - CLOCK_SLACK_MS <= waited < FREE_WINDOW_MS + 900, waited


async def test_paid_client_partial_batches_arrive_within_its_window(server: ServerProcess) -> None:
    user = "u-paid-window"
    channel = f"user:{user}"
    async with connected(server, user, tier="paid", binary=True) as client:
        # 120 at once: two full batches straight away, then a partial one after 0.25 s.
        response = await server.publish([spending(channel, n) for n in range(120)])
        batches = await collect_items(client, 120, timeout=5)
        assert [len(b["items"]) for b in batches] == [50, 50, 20]
        assert [i["id"] for b in batches for i in b["items"]] == response.json()["ids"]
        check_batch_rules(batches, channel, PAID_WINDOW_MS)
        for size in (1, 7, 23):  # lone partial batches, each within the paid window
            sent_at = time.time()
            response = await server.publish([spending(channel, n) for n in range(size)])
            arrived, batch = await next_batch(client, timeout=3)
            assert [i["id"] for i in batch["items"]] == response.json()["ids"]
            waited = batch["ts"] - batch["items"][0]["ts"]
            assert PAID_WINDOW_MS - CLOCK_SLACK_MS <= waited <= 600, waited
            assert arrived - sent_at <= 1.0, arrived - sent_at
            check_batch_rules([batch], channel, PAID_WINDOW_MS)


# --------------------------------------------------------------------------- 3: premium filter


async def test_free_client_never_sees_premium_only_events(server: ServerProcess) -> None:
    channel = "artist:premium-filter"
    before = await metric(server, FILTERED, {"tier": "free"})
    async with (
        connected(server, "u-pf-free") as free,
        connected(server, "u-pf-paid", tier="paid", binary=True) as paid,
    ):
        for client in (free, paid):
            assert "result" in await client.command("subscribe", channel=channel)
        response = await server.publish(
            [
                {"channel": channel, "event": "market.price", "data": {"album": "MY WORLD"}},
                {"channel": channel, "event": "comeback.announced", "data": {"date": "05-27"}},
            ]
        )
        market_id, comeback_id = response.json()["ids"]
        got = [await paid.next_pushed(), await paid.next_pushed()]
        assert [(e["event"], e["id"]) for e in got] == [
            ("market.price", market_id),
            ("comeback.announced", comeback_id),
        ]
        # Same channel, same publisher, in order: had the free one been sent market.price,
        # it would come before the comeback event.
        event = await free.next_pushed()
        assert (event["event"], event["id"]) == ("comeback.announced", comeback_id)
        # On the user's own channel too.
        await server.publish(
            [
                {"channel": "user:u-pf-free", "event": "market.price.alert", "data": {}},
                {"channel": "user:u-pf-free", "event": "budget.updated", "data": {}},
            ]
        )
        assert (await free.next_pushed())["event"] == "budget.updated"
    after = await metric(server, FILTERED, {"tier": "free"})
    assert after - before == 2


# --------------------------------------------------------------------------- 4: rate limit


async def pipeline_pings(client: Client, n: int) -> list[tuple[float, dict[str, Any]]]:
    """Send ``n`` pings without waiting, then read their replies (with arrival times)."""
    for _ in range(n):
        await client.ws.send(client.encode({"id": next(client.ids), "op": "ping"}))
    replies: list[tuple[float, dict[str, Any]]] = []
    while len(replies) < n:
        message = await client.recv(timeout=10)
        assert "type" not in message, message
        replies.append((time.monotonic(), message))
    return replies


async def ping_until_closed(client: Client, most: int) -> tuple[list[dict[str, Any]], int | None]:
    """One ping at a time until the server closes (at most ``most``): replies and close code."""
    replies: list[dict[str, Any]] = []
    for _ in range(most):
        try:
            await client.ws.send(client.encode({"id": next(client.ids), "op": "ping"}))
            replies.append(await client.recv(timeout=5))
        except ConnectionClosed:
            break
    return replies, client.ws.close_code


def check_refusal(reply: dict[str, Any], arrived: float, started: float) -> None:
    """A truthful retry_after: the oldest counted command (sent after ``started``) leaves the
    60 s window at most 60 s from now and at least 60 s minus the time since ``started``."""
    error = reply["error"]
    assert error["code"] == "rate_limited", reply
    assert 0 < error["retry_after"] <= 60, error
    assert error["retry_after"] >= 60 - (arrived - started) - 0.5, error


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("tier", "limit", "each"), [("free", 60, 35), ("paid", 300, 155)])
async def test_rate_limit_is_per_user_across_two_nodes(
    redis_url: str, tier: str, limit: int, each: int
) -> None:
    # 2 * each - limit == 10 refusals in the first round: neither connection can have been
    # closed yet (that takes 11 refusals on one connection).
    user = f"u-rate-{tier}"
    env = {"REALTIME_REDIS_URL": redis_url}
    async with (
        running_server(env) as a,
        running_server(env) as b,
        connected(a, user, tier=tier) as on_a,
        connected(b, user, tier=tier, binary=True) as on_b,
    ):
        started = time.monotonic()
        rounds = await asyncio.gather(pipeline_pings(on_a, each), pipeline_pings(on_b, each))
        oks = [[r for _, r in replies if "result" in r] for replies in rounds]
        assert sum(len(ok) for ok in oks) == limit, [len(ok) for ok in oks]
        refused: list[int] = []
        for replies in rounds:
            errors = [(t, r) for t, r in replies if "result" not in r]
            for arrived, reply in errors:
                check_refusal(reply, arrived, started)
            refused.append(len(errors))
        assert sum(refused) == 2 * each - limit

        # The window is a sliding 60 s log: nothing comes back within the test. Each connection
        # is refused until the 10th command after its first refusal closes it with 4029.
        for client, already in zip((on_a, on_b), refused, strict=True):
            more, code = await ping_until_closed(client, most=15)
            assert all("result" not in r for r in more), more
            for reply in more:
                check_refusal(reply, time.monotonic(), started)
            assert already + len(more) == 10, (already, len(more))
            assert code == 4029


@pytest.mark.timeout(60)
async def test_a_rate_limited_resume_leaves_no_subscription(redis_url: str) -> None:
    """On Redis a resume (subscribe with ``since``) joins while the shared limiter decides;
    refused, it answers rate_limited and its join is undone: the node holds no subscription
    for it (a held one would keep the channel on the node, and hold its publications)."""
    channel = "artist:rate-resume"
    gauge = "piggybong_realtime_hub_channels"
    async with (
        running_server({"REALTIME_REDIS_URL": redis_url}) as node,
        connected(node, "u-rate-resume", tier="free") as client,
    ):
        position = (await client.command("subscribe", channel=channel))["result"]
        held = await metric(node, gauge, {})
        assert "result" in await client.command("unsubscribe", channel=channel)
        assert await metric(node, gauge, {}) == held - 1
        replies = await pipeline_pings(client, 58)  # 60 a minute on the free tier
        assert all("result" in r for _, r in replies), replies[-1]
        since = {"epoch": position["epoch"], "offset": position["offset"]}
        reply = await client.command("subscribe", channel=channel, since=since)
        assert reply["error"]["code"] == "rate_limited", reply
        assert await metric(node, gauge, {}) == held - 1


# --------------------------------------------------------------------------- 5: refresh


async def test_refresh_changes_tier_without_reconnecting(server: ServerProcess) -> None:
    user = "u-upgrade"
    channel = "artist:upgrade"
    premium = "premium:upgrade-charts"
    commands = 0

    async def command(client: Client, op: str, **fields: Any) -> dict[str, Any]:
        nonlocal commands
        commands += 1
        return await client.command(op, **fields)

    async def lone_spending_wait(client: Client, n: int) -> int:
        await server.publish(spending(f"user:{user}", n))
        _, batch = await next_batch(client, timeout=6)
        assert len(batch["items"]) == 1
        return int(batch["ts"] - batch["items"][0]["ts"])

    async with connected(server, user) as client:
        assert "result" in await command(client, "subscribe", channel=channel)
        reply = await command(client, "subscribe", channel=premium)
        assert reply["error"]["code"] == "forbidden"

        # Upgrade.
        reply = await command(client, "refresh", token=server.token(user, "paid"))
        assert reply["result"]["expires_at"] > time.time()
        assert "result" in await command(client, "subscribe", channel=premium)
        response = await server.publish(
            [
                {"channel": channel, "event": "market.price", "data": {}},
                {"channel": premium, "event": "chart.updated", "data": {}},
            ]
        )
        got = [await client.next_pushed(), await client.next_pushed()]
        assert [e["id"] for e in got] == response.json()["ids"]
        assert PAID_WINDOW_MS - CLOCK_SLACK_MS <= await lone_spending_wait(client, 1) <= 600
        # Paid limits: more than free's 20 subscriptions, more than free's 60 commands a minute.
        for i in range(25):
            assert "result" in await command(client, "subscribe", channel=f"artist:up{i}")
        while commands < 70:
            assert "result" in await command(client, "ping")

        # Downgrade (the 71st command, still under paid's 300): premium channels are dropped.
        reply = await command(client, "refresh", token=server.token(user))
        assert reply["result"]["tier"] == "free"
        assert premium not in reply["result"]["subscriptions"]
        assert channel in reply["result"]["subscriptions"]
        response = await server.publish(
            [
                {"channel": premium, "event": "chart.updated", "data": {}},
                {"channel": channel, "event": "market.price", "data": {}},
                {"channel": channel, "event": "comeback.announced", "data": {}},
            ]
        )
        event = await client.next_pushed()
        assert (event["event"], event["id"]) == ("comeback.announced", response.json()["ids"][2])
        assert FREE_WINDOW_MS - CLOCK_SLACK_MS <= await lone_spending_wait(client, 2) <= 3000
        # Free's 60 commands a minute apply at once: 71 were counted within the minute.
        reply = await command(client, "ping")
        assert reply["error"]["code"] == "rate_limited", reply


# --------------------------------------------------------------------------- 6: shutdown


@pytest.mark.timeout(40)
async def test_sigterm_flushes_pending_batches_before_1001(tmp_path: Path) -> None:
    # A 10 s free window: only the drain can have sent these batches in time.
    policy = tmp_path / "policy.toml"
    policy.write_text("[tiers.free]\nbatch_window_ms = 10000\n")
    server = await start_server({"REALTIME_TIER_POLICY": str(policy)})
    try:
        async with (
            connected(server, "u-drain") as one,
            connected(server, "u-drain-mp", binary=True) as two,
            connected(server, "u-drain-idle") as idle,
        ):
            assert "result" in await one.command("subscribe", channel="artist:drain")
            body = [spending("user:u-drain", n) for n in range(3)]
            body += [spending("artist:drain", n) for n in range(2)]
            body += [spending("user:u-drain-mp", n) for n in range(4)]
            ids = (await server.publish(body)).json()["ids"]
            await asyncio.sleep(0.3)  # taken in by the hub, windows open
            assert not one.pushed and not two.pushed
            stopped = asyncio.create_task(server.stop())

            received: dict[str, tuple[list[dict[str, Any]], int]] = {}
            for name, client in (("one", one), ("two", two), ("idle", idle)):
                received[name] = await recv_until_closed(client, timeout=15)
            assert await stopped == 0, server.log()

        messages, code = received["one"]
        assert code == 1001
        by_channel = {m["channel"]: [i["id"] for i in m["items"]] for m in messages}
        assert [m["type"] for m in messages] == ["batch", "batch"]
        assert by_channel == {"user:u-drain": ids[0:3], "artist:drain": ids[3:5]}
        for message in messages:
            assert message["ts"] - message["items"][0]["ts"] < 8000
        messages, code = received["two"]
        assert code == 1001
        assert [(m["type"], [i["id"] for i in m["items"]]) for m in messages] == [
            ("batch", ids[5:9])
        ]
        assert received["idle"] == ([], 1001)
    finally:
        if server.proc.returncode is None:
            server.proc.kill()
            await server.proc.wait()
        server.log_path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 7: policy file


async def test_tier_policy_file_is_applied(tmp_path: Path) -> None:
    policy = tmp_path / "tiers.toml"
    policy.write_text(
        'premium_event_patterns = ["insider.*"]\n'
        "[tiers.free]\n"
        "batch_window_ms = 600\n"
        "max_subscriptions = 3\n"
        "[tiers.vip]\n"
        'extends = "paid"\n'
        "commands_per_minute = 1000\n"
    )
    async with running_server({"REALTIME_TIER_POLICY": str(policy)}) as server:
        async with (
            connected(server, "u-pol") as free,
            connected(server, "u-pol-vip", tier="vip") as vip,
        ):
            reply = await free.command("connect", token=server.token("u-pol"))
            assert reply["error"]["code"] == "bad_request"  # already connected
            assert "result" in await free.command("subscribe", channel="artist:pol")
            assert "result" in await free.command("subscribe", channel="artist:pol2")
            reply = await free.command("subscribe", channel="artist:pol3")
            assert reply["error"]["code"] == "limit_exceeded"  # 3, user channel included

            # The pattern list is replaced: insider.* is withheld, market.* no longer is.
            response = await server.publish(
                [
                    {"channel": "artist:pol", "event": "insider.tip", "data": {}},
                    {"channel": "artist:pol", "event": "market.price", "data": {}},
                ]
            )
            event = await free.next_pushed()
            assert (event["event"], event["id"]) == ("market.price", response.json()["ids"][1])

            sent_at = time.time()
            await server.publish(spending("user:u-pol", 0))
            arrived, batch = await next_batch(free, timeout=5)
            waited = batch["ts"] - batch["items"][0]["ts"]
            assert 600 - CLOCK_SLACK_MS <= waited <= 1500, waited
            assert 0.55 <= arrived - sent_at <= 2.5

            # A new tier extending paid.
            assert "result" in await vip.command("subscribe", channel="premium:vip")
        async with ws_client(server) as client:
            reply = await client.command("connect", token=server.token("u-pol-vip2", "vip"))
            assert reply["result"]["tier"] == "vip"
            assert reply["result"]["limits"] == {
                "commands_per_minute": 1000,
                "max_subscriptions": 200,
                "max_connections": 5,
                "batch_window_ms": PAID_WINDOW_MS,
                "batch_max_items": 50,
                "max_frame_bytes": 65536,
                "recovery_window_s": 86_400,
                "recovery_max": 1000,
            }
        async with ws_client(server) as client:
            reply = await client.command("connect", token=server.token("u-pol-free2"))
            assert reply["result"]["limits"]["batch_window_ms"] == 600
            assert reply["result"]["limits"]["max_subscriptions"] == 3


@pytest.mark.parametrize(
    ("name", "text", "named"),
    [
        ("zero.toml", "[tiers.free]\nbatch_window_ms = 0\n", "tiers.free.batch_window_ms"),
        ("word.toml", '[tiers.free]\nbatch_window_ms = "fast"\n', "tiers.free.batch_window_ms"),
        (
            "typo.json",
            json.dumps({"tiers": {"paid": {"batch_windw_ms": 100}}}),
            "tiers.paid.batch_windw_ms",
        ),
        ("new.toml", "[tiers.vip]\ncommands_per_minute = 500\n", "tiers.vip.max_subscriptions"),
        ("prio.toml", '[tiers.paid]\npush_priorities = ["urgent"]\n', "tiers.paid.push_priorities"),
    ],
)
async def test_bad_policy_file_stops_the_server(
    tmp_path: Path, name: str, text: str, named: str
) -> None:
    policy = tmp_path / name
    policy.write_text(text)
    env = server_env({"REALTIME_TIER_POLICY": str(policy), "REALTIME_PORT": "0"})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "realtime",
        "serve",
        env=env,
        cwd=str(ROOT),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text_out = output.decode(errors="replace")
    assert proc.returncode not in (None, 0), text_out
    assert named in text_out, text_out
    assert str(policy) in text_out, text_out
