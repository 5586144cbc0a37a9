"""The dashboard in a real headless Chromium against a real server with traffic flowing: its
figures move and match /metrics, a push breaker forced open turns the level to Warning with
its reason, and a screenshot is kept (tests/artifacts/dashboard.png, gitignored)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import CHROMIUM, Page, chromium_page
from tests.fakes.apns_server import ApnsCredentials, FakeApns
from tests.server import ROOT, ServerProcess, connected, running_server
from tests.test_dashboard import ADMIN, metric
from tests.test_notifications_e2e import apns_env

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)"),
]

ARTIFACTS = ROOT / "tests" / "artifacts"


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"the page never showed {what}"
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def traffic(server: ServerProcess, per_second: float) -> AsyncIterator[None]:
    """HTTP publishes to artist:aespa at about ``per_second`` until the block ends."""

    async def publish() -> None:
        async with server.http() as http:
            n = 0
            while True:
                n += 1
                body = {"channel": "artist:aespa", "event": "news", "data": {"n": n}}
                assert (await http.post("/v1/publish", json=body)).status_code == 202
                await asyncio.sleep(1 / per_second)

    task = asyncio.create_task(publish())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def cluster(page: Page) -> dict[str, Any] | None:
    value: dict[str, Any] | None = await page.evaluate(
        "window.__dashboard ? JSON.parse(JSON.stringify(window.__dashboard.cluster)) : null"
    )
    return value


async def text(page: Page, element: str) -> str:
    return str(await page.evaluate(f"document.getElementById({element!r}).textContent"))


async def test_the_dashboard_in_chromium_shows_live_figures_and_an_open_breaker(
    fake_apns: FakeApns, apns_credentials: ApnsCredentials, tmp_path: Path
) -> None:
    env = {
        **apns_env(fake_apns, apns_credentials, tmp_path),
        "REALTIME_APNS_KEY_ID": "WRONGKEY01",  # APNs refuses our credentials: breaker opens
        "REALTIME_ADMIN_TOKEN": ADMIN,
    }
    async with (
        running_server(env) as server,
        connected(server, "fan-1", tier="paid") as fan1,
        connected(server, "fan-2") as fan2,
        chromium_page() as page,
    ):
        for fan in (fan1, fan2):
            await fan.command("subscribe", channel="artist:aespa")
        auth = base64.b64encode(f"ops:{ADMIN}".encode()).decode()
        await page.call("Network.enable")
        await page.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {auth}"})
        async with traffic(server, per_second=20):
            await page.call("Page.navigate", url=f"{server.url}/dashboard")
            first = await eventually(
                lambda: _with_published(page), 15, "a snapshot with publications"
            )
            assert await text(page, "feed") == "live"
            await asyncio.sleep(2.5)
            later = await cluster(page)
            assert later is not None
            # The figures move: more publications and deliveries, a rate near the traffic's.
            assert later["publishedTotal"] > first["publishedTotal"]
            assert later["deliveredTotal"] > first["deliveredTotal"]
            assert 5 <= later["published"] <= 40, later["published"]
            async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
                metrics = (await http.get("/metrics")).text
            published = metric(metrics, "piggybong_realtime_broker_published_total")
            # The page is at most a snapshot (1 s) and a render (1 s) behind /metrics.
            assert published - 60 <= later["publishedTotal"] <= published
            connections = metric(metrics, "piggybong_realtime_ws_connections")
            assert later["connections"] == connections == 3  # two fans and the page itself
            assert await text(page, "c-connections") == "3"
            assert later["p95"] is not None and later["p95"] < 1.0
            assert (later["level"], await text(page, "level-name")) == ("normal", "Normal")

            # Force the APNs breaker open: APNs refuses our credentials.
            async with server.http() as http:
                token = fake_apns.add_device()
                device = {"user": "fan-1", "platform": "ios", "token": token}
                assert (await http.post("/v1/devices", json=device)).status_code == 204
                note = {"user": "fan-1", "priority": "critical", "title": "t", "body": "b"}
                assert (await http.post("/v1/notifications", json=note)).status_code == 202
            level = await eventually(
                lambda: page.evaluate("document.getElementById('level').dataset.level"),
                15,
                "a level",
            )
            await eventually(
                lambda: _level_is(page, ("warning", "critical")), 15, "Warning or Critical"
            )
            level = await text(page, "level-name")
            reasons = await text(page, "reasons")
            assert level in ("Warning", "Critical")
            assert "push breaker apns open" in reasons, reasons
            assert "apns open" in await text(page, "c-breaker-list")
            await asyncio.sleep(1.2)  # a full render with the charts' latest second
            await page.screenshot(ARTIFACTS / "dashboard.png")
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


async def _with_published(page: Page) -> dict[str, Any] | None:
    state = await cluster(page)
    return state if state is not None and state["publishedTotal"] > 0 else None


async def _level_is(page: Page, levels: tuple[str, ...]) -> bool:
    state = await cluster(page)
    return state is not None and state["level"] in levels
