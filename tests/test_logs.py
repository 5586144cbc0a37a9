"""What the server logs: one handler for every logger, text or JSON lines, one line per state
change an operator must know, and no Redis password in any line."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator

import httpx
import pytest

import realtime
from notifications.breaker import CircuitBreaker
from notifications.router import log_breaker_transition
from realtime import logs
from tests.redis_server import RedisServer
from tests.server import ServerProcess, running_server

#: ``2026-01-02T03:04:05.678Z LEVEL logger: message``
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: "
)
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Undo ``logs.configure`` on the test process's loggers."""
    root = logging.getLogger()
    names = [*logs.UVICORN_LOGGERS, logs.PER_CONNECTION_LOGGER]
    saved = (
        list(root.handlers),
        root.level,
        {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names},
        {n: logging.getLogger(n).propagate for n in names},
    )
    try:
        yield
    finally:
        handlers, level, levels, propagate = saved
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, (lvl, hs) in levels.items():
            logger = logging.getLogger(name)
            logger.setLevel(lvl)
            logger.handlers[:] = hs
            logger.propagate = propagate[name]


def test_redact_hides_the_password_of_redis_urls_only() -> None:
    assert logs.redact("at redis://default:s3cr3t@10.0.0.5:6379/0 now") == (
        "at redis://default:***@10.0.0.5:6379/0 now"
    )
    assert logs.redact("rediss://:p@ss:w0rd@host/1") == "rediss://:***@host/1"
    assert logs.redact("redis://10.0.0.5:6379/0 and user@example.com") == (
        "redis://10.0.0.5:6379/0 and user@example.com"
    )
    assert logs.iso_utc(0.5) == "1970-01-01T00:00:00.500Z"


def test_every_logger_goes_through_one_handler_as_json(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    logging.getLogger("realtime.app").info("node %s ready", "n1")
    logging.getLogger("notifications.push").info("push via redis://u:hunter2@h:1/0")
    logging.getLogger("uvicorn.error").info("Uvicorn running")
    logging.getLogger("realtime.ws").info("per-connection line, hidden below debug")
    logging.getLogger("realtime").debug("debug line, hidden at info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("notifications.router").exception("it failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(x["level"], x["logger"]) for x in lines] == [
        ("INFO", "realtime.app"),
        ("INFO", "notifications.push"),
        ("INFO", "uvicorn.error"),
        ("ERROR", "notifications.router"),
    ]
    assert lines[0]["message"] == "node n1 ready"
    assert all(ISO_MS.match(x["ts"]) for x in lines)
    assert "hunter2" not in out.getvalue() and "redis://u:***@h:1/0" in lines[1]["message"]
    assert "exc_info" not in lines[0]
    assert "RuntimeError: boom" in lines[3]["exc_info"]


def test_text_lines_and_debug_shows_per_connection_lines(restore_logging: None) -> None:
    out = io.StringIO()
    logs.configure("debug", "text", stream=out)
    logging.getLogger("realtime.ws").debug("a connection line")
    logging.getLogger("uvicorn.error").warning("w")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and all(TEXT_LINE.match(line) for line in lines), lines
    assert lines[0].endswith(" DEBUG realtime.ws: a connection line")
    logs.configure("warning", "text", stream=out)  # again: one handler, not two
    logging.getLogger("realtime").warning("once")
    assert out.getvalue().count("once") == 1
    assert logging.getLogger("realtime.ws").getEffectiveLevel() == logging.WARNING


def test_a_breaker_logs_each_transition_once(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]

    def clock() -> float:
        return now[0]

    def on_transition(name: str, old: str, new: str) -> None:
        log_breaker_transition(breaker, old, new, clock)

    breaker = CircuitBreaker(name="webhook", clock=clock, on_transition=on_transition)
    caplog.set_level(logging.INFO, logger="notifications.router")
    for _ in range(12):  # opens at the 5th failure; the later ones change nothing
        if breaker.allow():
            breaker.record_failure()
    now[0] += 31
    assert breaker.allow()
    breaker.record_failure()  # the probe fails: open again
    now[0] += 31
    assert breaker.allow()
    breaker.record_success()  # the probe succeeds: closed
    assert breaker.record_credentials_rejected()  # the router's ERROR line, not one here
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "push adapter webhook: circuit breaker open (the provider is failing: errors, "
            "time-outs or 5xx answers); no push through it for 30.0 s, notifications wait",
        ),
        ("INFO", "push adapter webhook: circuit breaker half-open, one probe goes through"),
        (
            "WARNING",
            "push adapter webhook: circuit breaker open (its probe failed); no push through "
            "it for 30.0 s, notifications wait",
        ),
        ("INFO", "push adapter webhook: circuit breaker half-open, one probe goes through"),
        ("INFO", "push adapter webhook: circuit breaker closed, pushes go through again"),
    ]


async def wait_for_log(
    server: ServerProcess, predicate: Callable[[str], bool], timeout: float = 15.0
) -> str:
    deadline = time.monotonic() + timeout
    while not predicate(log := server.log()):
        assert time.monotonic() < deadline, f"not logged in {timeout}s:\n{log}"
        await asyncio.sleep(0.05)
    return log


@pytest.mark.timeout(40)
async def test_the_server_logs_ready_and_log_pushes_as_json() -> None:
    env = {"REALTIME_LOG_FORMAT": "json", "REALTIME_NODE_ID": "node-j"}
    async with running_server(env) as server:
        async with server.http() as client:
            device = {"user": "u1", "platform": "ios", "token": "abcdef0123456789"}
            assert (await client.post("/v1/devices", json=device)).status_code == 204
            notification = {"user": "u1", "priority": "critical", "title": "Hi", "body": "b"}
            assert (await client.post("/v1/notifications", json=notification)).status_code == 202
        log = await wait_for_log(server, lambda log: "push " in log)
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"ts", "level", "logger", "message"} <= set(line) for line in lines)
    ready = [x for x in lines if "ready" in x["message"]]
    assert [(x["level"], x["logger"], x["message"]) for x in ready] == [
        ("INFO", "realtime", f"node node-j ready: listening on 127.0.0.1:{server.port}, "
         f"memory broker, per-delivery path {realtime.NATIVE}"),
    ]  # fmt: skip
    pushes = [x for x in lines if x["logger"] == "notifications.push"]
    assert len(pushes) == 1 and pushes[0]["level"] == "INFO", pushes
    assert "abcdef0123456789" not in log  # the device token is shortened


@contextlib.asynccontextmanager
async def failing_webhook(status: int = 503) -> AsyncIterator[str]:
    """An HTTP server answering every request with ``status``; yields its URL."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)content-length: *(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                writer.write(f"HTTP/1.1 {status} Unavailable\r\ncontent-length: 0\r\n\r\n".encode())
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/push"
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.timeout(40)
async def test_a_breaker_opened_by_5xx_answers_logs_one_warning() -> None:
    async with failing_webhook() as url, running_server({"REALTIME_PUSH_WEBHOOK_URL": url}) as s:
        async with s.http() as client:
            for n in range(6):
                device = {"user": "u5", "platform": "android", "token": f"device-token-{n}"}
                assert (await client.post("/v1/devices", json=device)).status_code == 204
            notification = {"user": "u5", "priority": "critical", "title": "t", "body": "b"}
            assert (await client.post("/v1/notifications", json=notification)).status_code == 202
            log = await wait_for_log(s, lambda log: "circuit breaker open" in log)
            await asyncio.sleep(1.0)  # the remaining pushes wait; no further line
            log = s.log()
    [line] = [line for line in log.splitlines() if "circuit breaker" in line]
    assert TEXT_LINE.match(line) and " WARNING notifications.router: " in line, line
    assert "push adapter webhook: circuit breaker open (the provider is failing" in line


@pytest.mark.timeout(60)
async def test_redis_loss_and_return_are_one_line_each_and_the_password_never_shows(
    redis_server: RedisServer, redis_url: str
) -> None:
    password = "Pw-0f-the-redis-9137"
    url = redis_url.replace("redis://", f"redis://default:{password}@")
    async with running_server({"REALTIME_REDIS_URL": url}) as server:
        log = server.log()
        assert "ready: listening on" in log and "redis broker" in log
        redis_server.kill()
        try:
            await wait_for_log(server, lambda log: "redis pub/sub connection lost" in log)
            await asyncio.sleep(1.5)  # reconnect attempts meanwhile log nothing more
        finally:
            redis_server.restart()
        await wait_for_log(server, lambda log: "redis pub/sub reconnected" in log, timeout=20)
        async with httpx.AsyncClient(timeout=5) as client:  # and still serves
            assert (await client.get(f"{server.url}/readyz")).status_code == 200
        log = server.log()
    pubsub = [line for line in log.splitlines() if "redis pub/sub" in line]
    assert len(pubsub) == 2, pubsub
    assert " WARNING realtime.redis_broker: redis pub/sub connection lost (" in pubsub[0]
    assert " INFO realtime.redis_broker: redis pub/sub reconnected" in pubsub[1]
    assert password not in log
