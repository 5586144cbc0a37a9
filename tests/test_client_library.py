"""clients/python (piggybong_client) against the real server: reconnect, resume, gap fill,
resync, refresh."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from piggybong_client import Backoff, Client, ClientError, Position, retry_after, token_expiry
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from tests.server import ServerProcess, free_port, running_server, start_server

pytestmark = pytest.mark.timeout(60)


class App:
    """What the app sees: events in order, resyncs."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.resyncs: list[str] = []

    def on_event(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def on_resync(self, channel: str) -> None:
        self.resyncs.append(channel)

    def offsets(self, channel: str) -> list[int]:
        return [e["offset"] for e in self.events if e.get("channel") == channel]

    async def wait_for(self, channel: str, count: int, timeout: float = 15.0) -> None:
        async with asyncio.timeout(timeout):
            while len(self.offsets(channel)) < count:  # noqa: ASYNC110 - the client fills it
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_client(
    server: ServerProcess, app: App, user: str, *, tier: str = "paid", ttl: float = 3600
) -> AsyncIterator[Client]:
    async def token() -> str:
        return server.token(user, tier, ttl=ttl)

    client = Client(
        server.ws_url,
        token,
        app.on_event,
        on_resync=app.on_resync,
        backoff=Backoff(base=0.05, cap=0.5),
    )
    task = asyncio.create_task(client.run())
    try:
        async with asyncio.timeout(10):
            await client.connected.wait()
        yield client
    finally:
        await client.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(server: ServerProcess, channel: str, count: int, start: int = 0) -> None:
    items = [{"channel": channel, "event": f"e{i}"} for i in range(start, start + count)]
    response = await server.publish(items)
    assert response.status_code == 202


async def test_reconnects_and_resumes_without_loss_across_a_dropped_socket(
    redis_url: str,
) -> None:
    env = {"REALTIME_REDIS_URL": redis_url}
    async with running_server(env) as server:
        app = App()
        async with running_client(server, app, "u-lib1") as client:
            await client.subscribe("artist:lib")
            await publish(server, "artist:lib", 5)
            await app.wait_for("artist:lib", 5)
            assert client._ws is not None
            client._ws.transport.abort()  # the train goes underground
            await publish(server, "artist:lib", 5, start=5)
            await app.wait_for("artist:lib", 10)
            # the recovered events reach the app before the connect's own answer returns
            async with asyncio.timeout(10):
                while client.stats.connects < 2:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            assert client.stats.recovered >= 1
        first = app.offsets("artist:lib")[0]
        assert app.offsets("artist:lib") == list(range(first, first + 10))
        assert app.resyncs == []


async def test_a_server_restart_without_redis_means_resync() -> None:
    port = free_port()
    server = await start_server(port=port)
    app = App()
    try:
        async with running_client(server, app, "u-lib2") as client:
            await client.subscribe("artist:mem")
            await publish(server, "artist:mem", 3)
            await app.wait_for("artist:mem", 3)
            assert await server.stop() == 0
            server = await start_server(port=port)  # history lost: new epochs
            async with asyncio.timeout(20):
                while "artist:mem" not in app.resyncs:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await publish(server, "artist:mem", 2)
            await app.wait_for("artist:mem", 5)
            assert app.offsets("artist:mem")[-2:] == [1, 2]  # the new epoch's offsets
    finally:
        await server.stop()
        server.log_path.unlink(missing_ok=True)


async def test_a_refused_handshake_is_retried() -> None:
    """A load balancer answers the first upgrades 503 (a deploy), then passes through:
    the client keeps reconnecting (it stopped for good on the first refusal)."""
    refusals = 3
    async with running_server() as server:

        async def front(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal refusals
            head = await reader.readuntil(b"\r\n\r\n")
            if refusals > 0:
                refusals -= 1
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", server.port)
            up_writer.write(head)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
                with contextlib.suppress(OSError):
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                dst.close()

            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

        balancer = await asyncio.start_server(front, "127.0.0.1", 0)
        port = balancer.sockets[0].getsockname()[1]
        app = App()

        async def token() -> str:
            return server.token("u-lb")

        client = Client(f"ws://127.0.0.1:{port}/v1/ws", token, app.on_event,
                        backoff=Backoff(base=0.02, cap=0.1))  # fmt: skip
        task = asyncio.create_task(client.run())
        try:
            async with asyncio.timeout(10):
                await client.connected.wait()
            assert refusals == 0 and client.stats.connects == 1
        finally:
            await client.close()
            await asyncio.wait_for(task, 5)
            balancer.close()


async def test_a_gap_in_live_offsets_is_filled_from_history() -> None:
    async with running_server() as server:
        app = App()
        async with running_client(server, app, "u-lib3") as client:
            await client.subscribe("artist:gap")
            await publish(server, "artist:gap", 3)
            await app.wait_for("artist:gap", 3)
            # The client lost track of two publications (as if they never arrived).
            position = client.position("artist:gap")
            assert isinstance(position, Position)
            position.offset -= 2
            del app.events[-2:]
            await publish(server, "artist:gap", 1, start=3)
            await app.wait_for("artist:gap", 4)
            assert app.offsets("artist:gap") == [1, 2, 3, 4]
            assert client.stats.gaps_filled == 2


async def test_the_token_is_refreshed_before_it_expires() -> None:
    async with running_server() as server:
        app = App()
        # 62 s of life, refreshed 60 s before exp: at once, then again with each new token.
        async with running_client(server, app, "u-lib4", ttl=62) as client:
            async with asyncio.timeout(10):
                while client.stats.refreshes < 1:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        assert token_expiry(server.token("u", None, ttl=100)) is not None
        assert token_expiry("not-a-jwt") is None


def test_backoff_is_exponential_with_full_jitter() -> None:
    backoff = Backoff(base=0.5, cap=30.0, rand=lambda: 1.0)
    assert [backoff.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    backoff.reset()
    assert Backoff(rand=lambda: 0.25).next_delay() == 0.125


def test_a_refusal_that_says_when_to_come_back_is_honoured() -> None:
    """A connect error's retry_after, a refused handshake's Retry-After; nothing else."""
    busy = ClientError({"code": "unavailable", "message": "server busy", "retry_after": 1.0})
    assert retry_after(busy) == 1.0
    refused = InvalidStatus(Response(429, "Too Many Requests", Headers({"Retry-After": "3"})))
    assert retry_after(refused) == 3.0
    assert retry_after(InvalidStatus(Response(503, "Service Unavailable", Headers()))) is None
    assert retry_after(ClientError({"code": "bad_request", "message": "no"})) is None
    assert retry_after(ClientError({"code": "x", "message": "y", "retry_after": "soon"})) is None
    assert retry_after(TimeoutError()) is None
