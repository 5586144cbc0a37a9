"""Back-pressure, keepalive and draining, end to end on the embedded (memory) broker."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal

import httpx
import pytest

from tests.server import connected, running_server, ws_client

pytestmark = pytest.mark.timeout(60)


async def test_slow_consumer_is_cut_off_4008_and_never_stalls_others() -> None:
    env = {"REALTIME_OUTBOX_MAX_BYTES": str(256 * 1024)}
    async with running_server(env) as server:
        # The slow client stops reading after its first frames: max_queue=1 stops its reads.
        async with (
            connected(server, "u-slow", max_queue=1) as slow,
            connected(server, "u-fast") as fast,
        ):
            for client in (slow, fast):
                assert "result" in await client.command("subscribe", channel="artist:flood")
            payload = "x" * 4000
            total = 3000  # events of ~4 KB: far more than the slow one buffers

            async def read_all() -> list[int]:
                return [(await fast.next_pushed(timeout=10))["data"]["n"] for _ in range(total)]

            reader = asyncio.create_task(read_all())
            for batch in range(total // 200):
                body = [
                    {
                        "channel": "artist:flood",
                        "event": "tick",
                        "data": {"n": batch * 200 + i, "p": payload},
                    }
                    for i in range(200)
                ]
                assert (await server.publish(body)).status_code == 202
            assert await reader == list(range(total))
            # The slow client now reads what it was sent, then the close frame.
            assert await slow.close_code(timeout=10) == 4008
            async with httpx.AsyncClient(base_url=server.url) as http:
                metrics = (await http.get("/metrics")).text
            assert "piggybong_realtime_ws_queue_overflows_total 1.0" in metrics
            assert 'piggybong_realtime_ws_closes_total{code="4008"} 1.0' in metrics
            assert "result" in await fast.command("ping")


async def test_unanswered_pings_close_the_connection() -> None:
    async with running_server({"REALTIME_PING_INTERVAL": "0.5"}) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        # Never answer: the server pings at 0.5 s and gives up at the next ping.
        received = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(4096):
                received += chunk
        frames = _frames(received)
        assert frames[0][0] == 0x9  # a ping
        assert frames[-1][0] == 0x8  # then a close: keepalive time-out, not the connect deadline
        assert int.from_bytes(frames[-1][1][:2], "big") == 1011
        writer.close()


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """Unmasked server frames with short payloads: (opcode, payload)."""
    frames, i = [], 0
    while i + 2 <= len(data):
        opcode, length = data[i] & 0x0F, data[i + 1] & 0x7F
        assert length < 126
        frames.append((opcode, data[i + 2 : i + 2 + length]))
        i += 2 + length
    return frames


async def test_sigterm_delivers_what_is_queued_then_closes_1001_and_exits_0() -> None:
    async with running_server() as server:
        async with connected(server, "u-drain", max_queue=1) as client:
            await client.command("subscribe", channel="artist:drain")
            body = [
                {"channel": "artist:drain", "event": "tick", "data": {"n": n, "p": "y" * 2000}}
                for n in range(400)
            ]
            assert (await server.publish(body)).status_code == 202
            server.proc.send_signal(signal.SIGTERM)
            for n in range(400):
                assert (await client.next_pushed(timeout=10))["data"]["n"] == n
            assert await client.close_code() == 1001
            assert await server.stop() == 0


def _gauge(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


async def test_nothing_is_left_behind_and_bad_clients_log_one_line() -> None:
    async with running_server() as server:
        # Connections that end every way: clean close, abrupt drop, bad frame, refused connect.
        for i in range(30):
            async with connected(server, f"u-leak-{i}") as client:
                await client.command("subscribe", channel=f"artist:leak-{i % 5}")
                await client.command("subscribe", channel="broadcast")
                if i % 3 == 1:
                    client.ws.transport.abort()
                elif i % 3 == 2:
                    await client.send_raw("not json")
                    assert await client.close_code() == 4000
        for _ in range(10):
            async with ws_client(server) as client:
                await client.command("connect", token="bad")
                assert await client.close_code() == 4001
        async with httpx.AsyncClient(base_url=server.url) as http:
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                metrics = (await http.get("/metrics")).text
                gauges = [
                    _gauge(metrics, f"piggybong_realtime_{name}")
                    for name in ("ws_open", "hub_channels", "ws_queued_bytes")
                ]
                if gauges == [0, 0, 0] or asyncio.get_running_loop().time() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert gauges == [0, 0, 0]
            assert 'piggybong_realtime_ws_connections{tier="free"} 0.0' in metrics
        # Ten connections from one address sent bad frames: one log line in the interval.
        assert server.log().count("closing a connection of 127.0.0.1") == 1


@pytest.mark.parametrize("broker", ["memory", "redis"])
async def test_clients_leaving_mid_fan_out_never_stall_the_others(
    broker: str, request: pytest.FixtureRequest
) -> None:
    # 300 quiet subscribers make each fan-out several flush slices long; clients that
    # subscribe and leave while events are published must cost the others nothing: the
    # last subscriber (written last in every fan-out) gets every event, in order.
    env = {"REALTIME_REDIS_URL": request.getfixturevalue("redis_url")} if broker == "redis" else {}
    async with running_server(env) as server, contextlib.AsyncExitStack() as stack:
        quiet_ones = []

        async def quiet(i: int) -> None:  # max_queue=1: it stops reading; the kernel buffers
            client = await stack.enter_async_context(connected(server, f"u-quiet-{i}", max_queue=1))
            assert "result" in await client.command("subscribe", channel="artist:churn")
            quiet_ones.append(client)

        for first in range(0, 300, 50):
            await asyncio.gather(*(quiet(i) for i in range(first, first + 50)))
        keeper = await stack.enter_async_context(connected(server, "u-keeper"))
        assert "result" in await keeper.command("subscribe", channel="artist:churn")
        stop = asyncio.Event()

        async def churn(worker: int) -> int:
            rounds = 0
            while not stop.is_set():
                async with connected(server, f"u-churn-{worker}-{rounds}") as client:
                    await client.command("subscribe", channel="artist:churn")
                rounds += 1
            return rounds

        churners = [asyncio.create_task(churn(w)) for w in range(8)]
        total = 400
        for start in range(0, total, 20):
            body = [
                {"channel": "artist:churn", "event": "tick", "data": {"n": n}}
                for n in range(start, start + 20)
            ]
            assert (await server.publish(body)).status_code == 202
            await asyncio.sleep(0.02)
        got = [(await keeper.next_pushed(timeout=10))["data"]["n"] for _ in range(total)]
        stop.set()
        assert sum(await asyncio.gather(*churners)) > 8  # clients did come and go meanwhile
        assert got == list(range(total))
        assert "Traceback" not in server.log() and "RuntimeError" not in server.log()
        for client in quiet_ones:  # they hold unread events: no closing handshake to wait for
            client.ws.transport.abort()
