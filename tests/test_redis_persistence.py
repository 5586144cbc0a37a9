"""Persistence told: a node says when a crash of its Redis would lose notifications and devices."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from realtime.redis_persistence import Persistence, PersistenceCheck, assess
from tests.redis_server import RedisServer, find_redis_server
from tests.server import running_server

pytestmark = pytest.mark.timeout(60)


def _own_server(*extra: str) -> Iterator[RedisServer]:
    binary = find_redis_server()
    assert binary is not None, "redis-server not found"
    server = RedisServer.start_own(binary, extra)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    yield from _own_server("--appendonly", "yes", "--appendfsync", "always")


@pytest.fixture
def no_config_redis() -> Iterator[RedisServer]:
    """A Redis whose CONFIG command is renamed away (as some managed services do)."""
    yield from _own_server("--rename-command", "CONFIG", "")


@pytest.mark.parametrize(
    ("config", "info", "durable", "warning"),
    [
        ({"appendonly": "yes", "appendfsync": "always", "save": ""}, None, True, None),
        ({"appendonly": "yes", "appendfsync": "everysec", "save": ""}, None, False, "up to 1 s"),
        ({"appendonly": "yes", "appendfsync": "no", "save": ""}, None, False, "not yet written"),
        ({"appendonly": "no", "save": "3600 1"}, None, False, "since the last snapshot"),
        ({"appendonly": "no", "save": ""}, None, False, "keeps nothing across a crash"),
        (None, {"aof_enabled": 0}, False, "snapshot rules unknown"),
        (None, {"aof_enabled": 1}, False, "appendfsync unknown"),
        (None, None, False, "unknown (unreachable)"),
    ],
)
def test_assess_tells_what_a_crash_loses(
    config: dict[str, str] | None, info: dict[str, int] | None, durable: bool, warning: str | None
) -> None:
    found = assess(config, info)
    assert found.durable is durable
    if warning is None:
        assert found.warning is None
    else:
        assert found.warning is not None and warning in found.warning
        assert "queued notifications and registered devices" in found.warning
    assert found.as_dict()["ok"] is True  # information, never a readiness failure


async def test_redis_without_persistence_is_told_and_warned_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    check = PersistenceCheck(redis_url)
    try:
        with caplog.at_level(logging.INFO, logger="realtime.redis"):
            first = await check.check()
            assert first == Persistence("config", aof=False, appendfsync="everysec", save="")
            assert await check.check() == first
            ready = await check.readiness()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "keeps nothing across a crash" in warnings[0].getMessage()
        assert ready["durable"] is False and "no AOF, no RDB" in ready["warning"]
    finally:
        await check.close()


async def test_redis_with_aof_always_is_durable(aof_redis: RedisServer) -> None:
    check = PersistenceCheck(aof_redis.url)
    try:
        found = await check.check()
        assert (found.source, found.aof, found.appendfsync) == ("config", True, "always")
        assert found.durable and found.warning is None
    finally:
        await check.close()


async def test_redis_without_config_falls_back_to_info(no_config_redis: RedisServer) -> None:
    check = PersistenceCheck(no_config_redis.url)
    try:
        found = await check.check()
        assert (found.source, found.aof) == ("info", False)
        assert found.warning is not None and "no AOF" in found.warning
    finally:
        await check.close()


async def test_an_unreachable_redis_is_asked_again_by_readyz(redis_server: RedisServer) -> None:
    redis_server.ensure_up()
    redis_server.kill()
    try:
        check = PersistenceCheck(redis_server.url, refresh=3600)
        try:
            assert (await check.check()).source == "unreachable"
            redis_server.restart()
            ready = await check.readiness()  # unknown: asked again at once
            assert (ready["source"], ready["aof"]) == ("config", False)
        finally:
            await check.close()
    finally:
        redis_server.ensure_up()


async def test_a_stalled_redis_leaves_readiness_ok(redis_server: RedisServer) -> None:
    redis_server.ensure_up()
    check = PersistenceCheck(redis_server.url, refresh=0)
    try:
        assert (await check.check()).source == "config"
        redis_server.pause()
        try:
            ready = await check.readiness()  # asks again, gets no answer in time
        finally:
            redis_server.resume()
        assert ready["ok"] is True and ready["source"] == "config"  # the last finding
    finally:
        await check.close()


async def test_a_node_warns_at_start_and_readyz_shows_it(
    redis_url: str, aof_redis: RedisServer
) -> None:
    async with running_server({"REALTIME_REDIS_URL": redis_url}) as server, server.http() as http:
        ready = await http.get("/readyz")
        assert ready.status_code == 200  # told, not failed
        field = ready.json()["redis_persistence"]
        assert field["durable"] is False and "keeps nothing" in field["warning"]
        log = server.log()
        assert log.count("WARNING realtime.redis: Redis keeps nothing across a crash") == 1
    async with (
        running_server({"REALTIME_REDIS_URL": aof_redis.url}) as server,
        server.http() as http,
    ):
        field = (await http.get("/readyz")).json()["redis_persistence"]
        assert field["durable"] is True and field["warning"] is None
        assert "Redis keeps nothing" not in server.log()
