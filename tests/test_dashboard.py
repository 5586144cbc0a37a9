"""The operators' dashboard: /dashboard behind Basic auth, admin sessions on /v1/ws, the
stats feed of every node (through Redis), and the snapshot's figures against /metrics."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from realtime.broker import MemoryBroker
from realtime.dashboard import ADMIN_TOKEN_TTL, AdminTokens, StatsFeed
from realtime.protocol import JSON as JSON_CODEC
from realtime.protocol import CloseCode
from realtime.stats import StatsSampler, assess, quantile
from tests.redis_server import RedisServer
from tests.server import Client, ServerProcess, connected, running_server, ws_client

pytestmark = pytest.mark.timeout(60)

ADMIN = "admin-token-for-tests-0123456789"
ENV = {"REALTIME_ADMIN_TOKEN": ADMIN}


def basic(password: str, user: str = "ops") -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


async def admin_session(server: ServerProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
        response = await http.post("/dashboard/session", headers=basic(ADMIN))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return body


@asynccontextmanager
async def admin_client(server: ServerProcess) -> AsyncIterator[Client]:
    session = await admin_session(server)
    async with ws_client(server) as client:
        reply = await client.command("connect", token=session["token"])
        assert reply["result"]["user"] == session["user"]
        assert (await client.command("subscribe", channel="admin:stats"))["result"] == {}
        yield client


async def next_stats(client: Client, node: str | None = None, after: int = 0) -> dict[str, Any]:
    """The next snapshot (of ``node``, stamped after ``after`` ms)."""
    while True:
        message = await client.next_pushed(timeout=5)
        if message.get("event") != "node.stats":
            continue
        data: dict[str, Any] = message["data"]
        if (node is None or data["node"] == node) and data["ts"] > after:
            return data


def metric(text: str, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_the_dashboard_needs_the_admin_token_and_is_404_without_one() -> None:
    async with running_server(ENV) as server, running_server() as disabled:
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            for path in ("/dashboard", "/dashboard/dashboard.js"):
                refused = await http.get(path)
                assert refused.status_code == 401
                assert refused.headers["www-authenticate"].startswith("Basic realm=")
                assert (await http.get(path, headers=basic("wrong"))).status_code == 401
                assert (
                    await http.get(path, headers={"Authorization": "Basic !!"})
                ).status_code == 401
            assert (
                await http.post("/dashboard/session", headers=basic(ADMIN[:-1]))
            ).status_code == 401
            page = await http.get("/dashboard", headers=basic(ADMIN, user="anyone"))
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            assert '<script type="module" src="/dashboard/dashboard.js">' in page.text
            for name in ("dashboard.js", "dashboard.css", "piggybong-client.js"):
                assert (
                    await http.get(f"/dashboard/{name}", headers=basic(ADMIN))
                ).status_code == 200
            missing = await http.get("/dashboard/secrets.txt", headers=basic(ADMIN))
            assert missing.status_code == 404
        async with httpx.AsyncClient(base_url=disabled.url, timeout=5) as http:
            off = await http.get("/dashboard", headers=basic(ADMIN))
            assert off.status_code == 404
            assert "REALTIME_ADMIN_TOKEN" in off.json()["error"]["message"]
            assert (await http.post("/dashboard/session", headers=basic(ADMIN))).status_code == 404
        assert ADMIN not in server.log()


async def test_only_admin_sessions_read_admin_stats_and_nobody_publishes_there() -> None:
    async with running_server(ENV) as server:
        async with connected(server, "fan-1", tier="paid") as fan:
            reply = await fan.command("subscribe", channel="admin:stats")
            assert reply["error"]["code"] == "forbidden"
            reply = await fan.command("history", channel="admin:stats")
            assert reply["error"]["code"] == "forbidden"
        async with ws_client(server) as client:
            reply = await client.command(
                "connect", token=server.token("fan-2"), channels=[{"channel": "admin:stats"}]
            )
            assert reply["result"]["refused"]["admin:stats"]["code"] == "forbidden"
        response = await server.publish({"channel": "admin:stats", "event": "x", "data": {}})
        assert response.status_code == 422
        # A token that claims the admin kid but is signed with the JWT secret is refused.
        forged = AdminTokens("not-the-admin-token").mint()[0]
        async with ws_client(server) as client:
            reply = await client.command("connect", token=forged)
            assert reply["error"]["code"] == "unauthorized"
            assert await client.close_code() == 4001


async def test_an_admin_session_gets_recent_and_live_snapshots_that_match_metrics() -> None:
    async with running_server(ENV) as server:
        await asyncio.sleep(1.2)  # one snapshot kept before the page subscribes
        async with connected(server, "fan-1", tier="paid") as fan:
            await fan.command("subscribe", channel="artist:aespa", presence=True)
            for i in range(5):
                response = await server.publish(
                    {"channel": "artist:aespa", "event": "news", "data": {"i": i}}
                )
                assert response.status_code == 202
            async with admin_client(server) as page:
                first = await next_stats(page)  # a kept one: from before the subscribe
                assert first["ts"] < time.time() * 1000 - 100
                now_ms = int(time.time() * 1000)
                snap = await next_stats(page, after=now_ms)
                async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
                    text = (await http.get("/metrics")).text
        assert snap["level"] == "normal" and snap["reasons"] == []
        assert snap["ready"] is True and snap["redis"] == "off"
        assert (
            snap["totals"]["published"]
            == 5
            == metric(text, "piggybong_realtime_broker_published_total")
        )
        # fan + the admin session itself, both connected on this node
        assert snap["connections"] == {"paid": 1, "free": 1}
        assert snap["totals"]["connects"] == 2
        assert snap["totals"]["delivered"] >= 5
        assert snap["latency"]["p50"] is not None and snap["latency"]["p99"] < 1.0
        assert snap["window"]["fanouts"] == 5
        assert snap["channels"] == 3 and snap["presence_watched"] == 1  # 2 user channels
        assert set(snap["breakers"].values()) == {"closed"}


async def test_every_node_sees_the_whole_cluster_through_redis(redis_url: str) -> None:
    env = {**ENV, "REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as a, running_server(env) as b:
        async with connected(b, "fan-b", tier="paid") as fan:
            await fan.command("subscribe", channel="broadcast")
            async with admin_client(a) as page:
                seen: dict[str, dict[str, Any]] = {}
                deadline = time.monotonic() + 10
                while len(seen) < 2 and time.monotonic() < deadline:
                    snap = await next_stats(page)
                    seen[snap["node"]] = snap
        assert len(seen) == 2, seen.keys()
        on_b = [s for s in seen.values() if s["connections"].get("paid") == 1]
        assert len(on_b) == 1 and all(s["redis"] == "up" for s in seen.values())


async def test_an_admin_session_refreshes_with_a_token_of_its_own_user() -> None:
    async with running_server(ENV) as server:
        session = await admin_session(server)
        async with ws_client(server) as client:
            await client.command("connect", token=session["token"])
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
                again = await http.post(
                    "/dashboard/session", params={"user": session["user"]}, headers=basic(ADMIN)
                )
            renewed = again.json()
            assert renewed["user"] == session["user"]
            reply = await client.command("refresh", token=renewed["token"])
            assert reply["result"]["expires_at"] >= session["expires_at"]
            # A user token of the same name is not an admin session's.
            reply = await client.command("refresh", token=server.token(session["user"]))
            assert reply["error"]["code"] == "forbidden"


def test_admin_tokens_expire_and_are_bound_to_the_admin_token() -> None:
    now = [1_000_000.0]
    tokens = AdminTokens("secret-admin", clock=lambda: now[0])
    token, user, expires = tokens.mint("admin.0123456789abcdef")
    assert user == "admin.0123456789abcdef" and expires == now[0] + ADMIN_TOKEN_TTL
    principal = tokens.authenticate(token)
    assert not isinstance(principal, type(None)) and getattr(principal, "admin", False)
    assert tokens.mint("user:42")[1].startswith("admin.")  # not an admin name: a new one
    now[0] += ADMIN_TOKEN_TTL
    assert getattr(tokens.authenticate(token), "code", None) == "unauthorized"
    assert tokens.authenticate("not.a.jwt") is None  # not an admin token: the usual auth
    assert not tokens.check_basic(None) and not tokens.check_basic("Bearer secret-admin")
    assert tokens.check_basic(basic("secret-admin", user="")["Authorization"])


def test_quantiles_follow_prometheus_histogram_quantile() -> None:
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (float("inf"), 100.0)]
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.7, buckets) == pytest.approx(0.15)
    assert quantile(0.95, buckets) == pytest.approx(0.35)
    assert quantile(0.99, [(1.0, 1.0), (float("inf"), 2.0)]) == 1.0
    assert quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None


def test_levels_follow_the_spec_thresholds() -> None:
    base: dict[str, Any] = {
        "ready": True,
        "redis": "up",
        "latency": {"p95": 0.15},
        "window": {"http": 10_000, "http_5xx": 10, "dead_letters": 0},
        "breakers": {"apns": "closed"},
    }
    assert assess(base) == ("normal", [])
    assert assess({**base, "latency": {"p95": 0.25}})[0] == "warning"
    assert assess({**base, "latency": {"p95": 1.5}})[0] == "critical"
    assert assess({**base, "window": {"http": 1000, "http_5xx": 2}}) == (
        "warning",
        ["HTTP error rate 0.20% (over 0.1%)"],
    )
    assert assess({**base, "window": {"http": 100, "http_5xx": 2}})[0] == "critical"
    level, reasons = assess({**base, "breakers": {"apns": "open", "fcm": "closed"}})
    assert (level, reasons) == ("warning", ["push breaker apns open"])
    level, reasons = assess({**base, "ready": False, "breakers": {"apns": "half_open"}})
    assert level == "critical" and reasons[0].startswith("node not ready")


def test_the_sampler_reads_rates_windows_and_missing_families_as_zero() -> None:
    registry = CollectorRegistry()
    published = Counter(
        "published",
        "",
        ["source"],
        namespace="piggybong_realtime",
        subsystem="broker",
        registry=registry,
    )
    door = Counter(
        "refused", "", namespace="piggybong_realtime", subsystem="door", registry=registry
    )
    latency = Histogram(
        "publish_to_write_seconds",
        "",
        namespace="piggybong_realtime",
        subsystem="hub",
        registry=registry,
        buckets=(0.01, 0.1, 1.0),
    )
    walks: list[int] = []

    def walk() -> float:  # stands for a walk over every connection
        walks.append(1)
        return 0.0

    queued = Gauge(
        "queued_bytes", "", namespace="piggybong_realtime", subsystem="ws", registry=registry
    )
    queued.set_function(walk)
    sampler = StatsSampler("n1", registry, lambda: {"ready": True}, window=10)
    first = sampler.sample(100.0)
    assert first["rates"]["published"] == 0 and first["latency"]["p95"] is None
    published.labels("http").inc(4)
    door.inc(3)
    for _ in range(10):
        latency.observe(0.5)
    second = sampler.sample(102.0)
    assert second["rates"]["published"] == 2.0 and second["totals"]["door_refused"] == 3
    assert second["latency"]["p50"] == pytest.approx(0.55) and second["window"]["fanouts"] == 10
    assert second["totals"]["dead_letters"] == 0  # no notification metrics in this registry
    latency.observe(0.005)
    third = sampler.sample(115.0)  # the 0.5 s observations left the 10 s window
    assert third["window"]["fanouts"] == 1 and third["latency"]["p99"] < 0.01
    assert len(walks) <= 1  # at most the first sample's listing of the families, never after


async def test_a_node_that_loses_redis_shows_it_critical_and_recovers(
    redis_server: RedisServer, redis_url: str
) -> None:
    async with running_server({**ENV, "REALTIME_REDIS_URL": redis_url}) as server:
        async with admin_client(server) as page:
            assert (await next_stats(page))["redis"] == "up"
            redis_server.kill()
            try:
                while (down := await next_stats(page))["redis"] != "down":
                    pass
            finally:
                redis_server.restart()
        assert down["level"] == "critical" and "Redis unreachable" in down["reasons"]
        assert down["ready"] is False
        # Redis came back empty: sessions were closed 1001 to resync; a page reconnects.
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            deadline = time.monotonic() + 20
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "not ready again"
                await asyncio.sleep(0.1)
        async with admin_client(server) as page:
            deadline = time.monotonic() + 20
            while (snap := await next_stats(page, after=int(time.time() * 1000)))[
                "level"
            ] != "normal":
                assert time.monotonic() < deadline, snap["reasons"]
        assert snap["redis"] == "up"


class _Sink:
    """Collects the frames written to one admin session."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.codec = JSON_CODEC
        self.writer = self

    def write(self, data: bytes, /) -> None:
        self.frames.append(data)

    def close(self, code: CloseCode, reason: str = "", /) -> None:
        raise AssertionError("not closed")

    def fail(self, exc: BaseException, where: str, /) -> None:
        raise AssertionError(f"not failed: {where}") from exc


def test_a_new_session_gets_at_most_the_backfill_bound_whole_seconds_of_every_node() -> None:
    feed = StatsFeed(MemoryBroker(), StatsSampler("n", CollectorRegistry(), dict), backfill_max=100)
    for second in range(1000, 1300):  # 300 s of 3 nodes, a few ms apart
        for k, node in enumerate(("a", "b", "c")):
            feed.on_message(
                "admin:stats", json.dumps({"node": node, "ts": second * 1000 + k}).encode()
            )
    sink = _Sink()
    feed.add(sink)
    sent = [json.loads(frame[2:] if frame[1] < 126 else frame[4:]) for frame in sink.frames]
    # every 9th second (900 kept, at most 100 sent), of all three nodes
    assert len(sent) == 3 * len([s for s in range(1000, 1300) if s % 9 == 0]) <= 100
    seconds = {m["ts"] // 1000 for m in sent}
    assert all(second % 9 == 0 for second in seconds)
    assert all(sum(m["ts"] // 1000 == s for m in sent) == 3 for s in seconds)
    feed.on_message("admin:stats", json.dumps({"node": "a", "ts": 1_300_000}).encode())
    assert len(sink.frames) == len(sent) + 1  # then every new one
    feed.on_message("admin:stats", b"not json")  # dropped, logged
    assert len(sink.frames) == len(sent) + 1
