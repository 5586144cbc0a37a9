"""The door (protocol-v1, section 11) against the real server on a real socket.

Memory bounds asserted here (the server's RSS from /proc, growth over the attack):
``HEAD_RSS_BOUND`` for oversized and half-sent heads, ``PING_RSS_BOUND`` for a ping flood
that never reads. Before the door the same attacks grew the server by 114 MB (two half-sent
40 MB heads) and 89 MB (a 4 s ping flood).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import time
from pathlib import Path

import httpx
import jwt
import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.redis_server import RedisServer
from tests.server import JWT_SECRET, ServerProcess, connected, running_server, ws_client

pytestmark = pytest.mark.timeout(90)

#: RSS growth allowed while two clients hold 40 MB heads half-sent (the head limit is 16 KiB).
HEAD_RSS_BOUND = 16 * 1024 * 1024
#: RSS growth allowed during and after a 4 s ping flood from a client that never reads.
PING_RSS_BOUND = 24 * 1024 * 1024


def rss(server: ServerProcess) -> int:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def refusals(server: ServerProcess, what: str, why: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    prefix = f'piggybong_realtime_door_refusals_total{{what="{what}",why="{why}"}} '
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return 0.0


def handshake(extra: bytes = b"", protocol: bytes = b"piggybong.v1.json") -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET /v1/ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: " + protocol + b"\r\n" + extra + b"\r\n"
    )


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final client frame (payload < 64 KiB)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    if len(payload) < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload))
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(payload))
    return head + mask + masked


async def open_raw(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within ``timeout`` (reading what it sends)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


# ------------------------------------------------------------------------------ HTTP head


async def test_a_head_over_16_kib_is_answered_431_and_closed() -> None:
    async with running_server() as server:
        reader, writer = await open_raw(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(65536), 5)
        assert answer.startswith(b"HTTP/1.1 431 "), answer
        assert await closed_within(reader, 5)
        writer.close()
        # A head just under the limit is served.
        async with httpx.AsyncClient(timeout=5) as client:
            ok = await client.get(f"{server.url}/healthz", headers={"x-pad": "a" * 15_000})
        assert ok.status_code == 200
        assert refusals(server, "http", "head_too_large") == 1


async def test_half_sent_huge_heads_do_not_grow_the_server() -> None:
    async with running_server() as server:
        before = rss(server)
        held = []
        for _ in range(2):
            reader, writer = await open_raw(server)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            with contextlib.suppress(ConnectionError):
                while sent < 40 * 1024 * 1024:
                    writer.write(b"a" * 1024 * 1024)
                    sent += 1024 * 1024
                    await asyncio.wait_for(writer.drain(), 5)
            held.append((reader, writer))
        grown = rss(server) - before
        for reader, writer in held:
            assert await closed_within(reader, 5)  # closed at the limit, not held
            writer.close()
        assert grown < HEAD_RSS_BOUND, f"server grew {grown / 1e6:.1f} MB"


async def test_a_slow_head_is_closed_at_the_head_timeout() -> None:
    async with running_server({"REALTIME_HEAD_TIMEOUT": "1"}) as server:
        conns = [await open_raw(server) for _ in range(20)]
        started = time.monotonic()

        async def drip(writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.2)

        drips = [asyncio.create_task(drip(w)) for _, w in conns]
        closed = await asyncio.gather(*(closed_within(r, 5) for r, _ in conns))
        elapsed = time.monotonic() - started
        for task in drips:
            task.cancel()
        await asyncio.gather(*drips, return_exceptions=True)
        for _, writer in conns:
            writer.close()
        assert all(closed)
        assert 0.9 < elapsed < 3.0, elapsed
        assert refusals(server, "http", "head_timeout") == 20


async def test_idle_connections_are_closed_after_the_keepalive_timeout() -> None:
    async with running_server({"REALTIME_KEEPALIVE_TIMEOUT": "0.5"}) as server:
        silent_reader, silent = await open_raw(server)
        reader, writer = await open_raw(server)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)
        assert answer.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert await closed_within(reader, 3)
        assert await closed_within(silent_reader, 3)
        assert time.monotonic() - started < 2.0
        writer.close()
        silent.close()
        assert refusals(server, "http", "idle_timeout") == 1  # the one that sent nothing


# ------------------------------------------------------------------------------ per address


async def test_connections_per_address_are_capped_with_429_and_retry_after() -> None:
    async with running_server({"REALTIME_MAX_CONNECTIONS_PER_IP": "5"}) as server:
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(5):
                await stack.enter_async_context(ws_client(server))
            with pytest.raises(InvalidStatus) as refused:
                async with ws_client(server):
                    pass
            assert refused.value.response.status_code == 429
            assert refused.value.response.headers["Retry-After"] == "1"
        # The five closed: their places are free again.
        await asyncio.sleep(0.3)
        async with ws_client(server):
            pass
        assert refusals(server, "http", "connections_per_ip") == 1


async def test_new_connections_per_address_are_rate_limited() -> None:
    async with running_server({"REALTIME_CONNECT_RATE_PER_IP": "1"}) as server:

        async def get() -> bytes:
            reader, writer = await open_raw(server)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(200), 5)
            writer.close()
            return answer

        # A burst of 10 (10x the rate per second), part of it spent by the start-up polls.
        statuses = [(await get())[:12] for _ in range(12)]
        served = statuses.count(b"HTTP/1.1 200")
        assert 1 <= served <= 10, statuses
        assert statuses[served:] == [b"HTTP/1.1 429"] * (12 - served), statuses
        refused = await get()
        assert b"\r\nretry-after: 1\r\n" in refused
        await asyncio.sleep(1.1)
        assert (await get()).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(1.1)
        assert refusals(server, "http", "connect_rate_per_ip") >= 1


async def test_behind_a_trusted_proxy_the_forwarded_client_is_counted() -> None:
    env = {"REALTIME_MAX_CONNECTIONS_PER_IP": "2", "REALTIME_TRUSTED_PROXIES": "127.0.0.0/8"}
    async with running_server(env) as server:

        def via(client: str) -> dict[str, str]:
            return {"X-Forwarded-For": f"{client}, 127.0.0.5"}

        async with contextlib.AsyncExitStack() as stack:
            for _ in range(2):
                await stack.enter_async_context(
                    ws_client(server, additional_headers=via("203.0.113.7"))
                )
            with pytest.raises(InvalidStatus) as refused:
                async with ws_client(server, additional_headers=via("203.0.113.7")):
                    pass
            assert refused.value.response.status_code == 429
            # Another client behind the same proxy is not affected.
            async with ws_client(server, additional_headers=via("203.0.113.8")):
                pass
        assert "203.0.113.7" in server.log()  # the refusal names the client, not the proxy


async def test_an_origin_not_allowed_is_refused_403() -> None:
    env = {"REALTIME_ALLOWED_ORIGINS": "https://*.piggybong.app"}
    async with running_server(env) as server:
        with pytest.raises(InvalidStatus) as refused:
            async with ws_client(server, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        async with ws_client(server, origin="https://web.piggybong.app"):
            pass
        async with ws_client(server):  # the app sends no Origin
            pass


# ------------------------------------------------------------------------------ WebSocket


async def test_a_ping_flood_that_never_reads_stays_bounded() -> None:
    async with running_server() as server:
        reader, writer = await open_raw(server)
        writer.write(handshake())
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        before = rss(server)
        ping = client_frame(0x9, b"p" * 125) * 64
        deadline = time.monotonic() + 4.0
        with contextlib.suppress(ConnectionError, TimeoutError):
            while time.monotonic() < deadline:
                writer.write(ping)
                await asyncio.wait_for(writer.drain(), 1.0)
        during = rss(server) - before
        writer.close()
        await asyncio.sleep(1.0)
        after = rss(server) - before
        assert during < PING_RSS_BOUND, f"server grew {during / 1e6:.1f} MB"
        assert after < PING_RSS_BOUND, f"server kept {after / 1e6:.1f} MB"
        assert refusals(server, "ws", "ping_flood") >= 1


async def test_pings_are_answered_at_most_ten_a_second() -> None:
    async with running_server() as server, connected(server, "pinger") as client:
        pongs = 0
        for _ in range(100):
            waiter = await client.ws.ping()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, 0.005)
                pongs += 1
        assert 1 <= pongs <= 20, pongs  # within one or two one-second windows
        assert "result" in await client.command("ping")  # the connection is fine


async def test_three_errors_before_connect_then_close_4000() -> None:
    async with running_server() as server, ws_client(server) as client:
        for _ in range(3):
            reply = await client.command("connect", token=5)
            assert reply["error"]["code"] == "bad_request"
        await client.send_raw(json.dumps({"id": 99, "op": "connect", "token": 5}))
        assert await client.close_code() == 4000


async def test_absurd_exp_connects_refreshes_and_logs_no_traceback() -> None:
    async with running_server() as server:
        for exp in (10**400, 1e308):
            token = jwt.encode({"sub": "u1", "exp": exp}, JWT_SECRET, algorithm="HS256")
            async with ws_client(server, binary=True) as client:
                reply = await client.command("connect", token=token)
                assert reply["result"]["user"] == "u1", reply
                refreshed = await client.command("refresh", token=token)
                assert refreshed["result"]["expires_at"] == 253_402_300_799
        assert "Traceback" not in server.log()


async def test_a_long_close_reason_is_cut_not_aborted() -> None:
    async with running_server() as server, ws_client(server) as client:

        def b64(value: dict[str, str]) -> str:
            raw = json.dumps(value).encode()
            return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

        token = f"{b64({'alg': 'é' * 200, 'typ': 'JWT'})}.{b64({'sub': 'u'})}.c2ln"
        reply = await client.command("connect", token=token)
        assert reply["error"]["code"] == "unauthorized"
        assert await client.close_code() == 4001
        reason = client.ws.close_reason or ""
        assert 0 < len(reason.encode()) <= 123


# ------------------------------------------------------------------------------ data at entry


async def test_unsendable_data_is_refused_at_entry_over_websocket() -> None:
    async with running_server() as server:
        async with connected(server, "u2") as client:
            await client.send_raw(
                '{"id": 5, "op": "publish", "channel": "user:u2", "event": "e", "data": {"x": NaN}}'
            )
            reply = await client.recv()
            assert reply == {"id": 5, "error": reply["error"]}
            assert reply["error"]["code"] == "bad_request"
            assert "result" in await client.command("ping")
        async with connected(server, "u3", binary=True) as client:
            for data in ({"b": b"\x00"}, {1: "x"}, {"e": msgpack.ExtType(1, b"x")}):
                frame = msgpack.packb(
                    {"id": 7, "op": "publish", "channel": "user:u3", "event": "e", "data": data},
                    use_bin_type=True,
                )
                await client.send_raw(frame)
                assert (await client.recv())["error"]["code"] == "bad_request"


async def test_unsendable_publish_is_422_and_keeps_no_idempotency_claim() -> None:
    async with running_server() as server, connected(server, "u4") as client:
        async with server.http() as http:
            for body in (
                '{"channel": "user:u4", "event": "spending.x", "id": "p1", "data": {"v": NaN}}',
                '{"channel": "user:u4", "event": "spending.x", "id": "p1", "data": {"v": '
                + str(2**70)
                + "}}",
                '{"channel": "user:u4", "event": "spending.x", "id": "p1", '
                '"data": {"v": "\\ud800"}}',
            ):
                refused = await http.post(
                    "/v1/publish", content=body, headers={"content-type": "application/json"}
                )
                assert refused.status_code == 422, refused.text
            ok = await http.post(
                "/v1/publish",
                json={"channel": "user:u4", "event": "spending.x", "id": "p1", "data": {"v": 1}},
            )
            assert ok.status_code == 202
        batch = await client.next_pushed(timeout=5)
        assert [item["data"] for item in batch["items"]] == [{"v": 1}]
        assert "Traceback" not in server.log()


async def test_the_publish_rate_is_per_key_whatever_the_header_spelling() -> None:
    async with running_server({"REALTIME_PUBLISH_RATE_PER_KEY": "1"}) as server:
        body = {"channel": "broadcast", "event": "e", "data": {}}
        statuses = []
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as http:
            for header in (
                f"Bearer {server.api_key}",
                f"bearer {server.api_key}",
                f"BEARER   {server.api_key}",
            ):
                answer = await http.post(
                    "/v1/publish", json=body, headers={"Authorization": header}
                )
                statuses.append(answer.status_code)
        assert statuses == [202, 429, 429]


async def test_a_connect_through_the_door_still_works_with_msgpack() -> None:
    async with running_server() as server:
        async with connect(server.ws_url, subprotocols=["piggybong.v1.msgpack"]) as ws:  # type: ignore[list-item]
            await ws.send(msgpack.packb({"id": 1, "op": "connect", "token": server.token("m")}))
            reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))
            assert reply["result"]["user"] == "m"


async def test_connects_beyond_the_nodes_bound_are_told_to_come_back(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Two connects wait on a frozen Redis (the bound is 2): a third is answered at once,
    `unavailable` with `retry_after`, and closed; once Redis answers, connects succeed."""
    env = {"REALTIME_REDIS_URL": redis_url, "REALTIME_MAX_CONNECTS_IN_PROGRESS": "2"}
    async with running_server(env) as server:
        async with contextlib.AsyncExitStack() as stack:
            waiting = [await stack.enter_async_context(ws_client(server)) for _ in range(2)]
            busy = await stack.enter_async_context(ws_client(server))
            redis_server.pause()
            try:
                held = [
                    asyncio.create_task(c.command("connect", 30, token=server.token(f"w{i}")))
                    for i, c in enumerate(waiting)
                ]
                await asyncio.sleep(0.5)  # both are waiting on Redis now
                assert not any(task.done() for task in held)
                started = time.monotonic()
                reply = await busy.command("connect", token=server.token("third"))
                assert time.monotonic() - started < 1.0
                assert reply["error"]["code"] == "unavailable", reply
                assert reply["error"]["retry_after"] == 1.0
                assert "busy" in reply["error"]["message"]
                assert await busy.close_code() == 1011
            finally:
                redis_server.resume()
            for task in held:  # answered, one way or the other: their places are free again
                await task
        assert refusals(server, "ws", "busy") == 1.0
        async with connected(server, "later") as client:
            assert "result" in await client.command("ping")


async def answer_head(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """The response head the server sends within ``timeout``, or None."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    except TimeoutError:
        return None


async def test_handshakes_beyond_the_login_bound_wait_their_turn_in_order(
    redis_server: RedisServer, redis_url: str
) -> None:
    """One login place: a login held by a frozen Redis keeps the next handshakes waiting,
    unread and unanswered; a full queue is answered 503 with Retry-After at once; once the
    login is answered, the waiting handshakes go in in arrival order (one whose client
    left gave its queue place up at once)."""
    env = {
        "REALTIME_REDIS_URL": redis_url,
        "REALTIME_MAX_LOGINS_IN_PROGRESS": "1",
        "REALTIME_MAX_LOGINS_WAITING": "3",
    }
    async with running_server(env) as server:
        async with ws_client(server) as holder:
            redis_server.pause()
            try:
                held = asyncio.create_task(holder.command("connect", 30, token=server.token("h")))
                await asyncio.sleep(0.3)
                assert not held.done()
                queue = [await open_raw(server) for _ in range(3)]
                for _, writer in queue:
                    writer.write(handshake())
                    await writer.drain()
                    await asyncio.sleep(0.05)  # arrival order
                queue[1][1].close()  # its client gives up while it waits: its place frees
                await asyncio.sleep(0.3)
                queue[1] = await open_raw(server)
                queue[1][1].write(handshake())  # waits in the queue place the other left
                await asyncio.sleep(0.05)
                full_reader, full_writer = await open_raw(server)
                full_writer.write(handshake())
                head = await answer_head(full_reader, 5)
                assert head is not None and head.startswith(b"HTTP/1.1 503"), head
                assert b"retry-after: 1" in head.lower()
                body = await full_reader.read()
                assert json.loads(body)["error"]["code"] == "unavailable"
                full_writer.close()
                async with httpx.AsyncClient() as http:
                    metrics = (await http.get(f"{server.url}/metrics", timeout=5)).text
                assert "piggybong_realtime_door_logins_in_progress 1.0" in metrics
                assert "piggybong_realtime_door_logins_waiting 3.0" in metrics
                for reader, _ in queue:
                    assert await answer_head(reader, 0.3) is None  # waiting, unanswered
            finally:
                redis_server.resume()
            assert "result" in await held
            first = await answer_head(queue[0][0], 10)
            assert first is not None and first.startswith(b"HTTP/1.1 101"), first
            # the first waiting login holds the place until its connect is answered
            assert await answer_head(queue[2][0], 0.3) is None
            assert await answer_head(queue[1][0], 0.3) is None
            reader, writer = queue[0]
            payload = json.dumps({"id": 1, "op": "connect", "token": server.token("q0")})
            writer.write(client_frame(0x1, payload.encode()))
            frame = await asyncio.wait_for(reader.read(4096), 10)
            assert b'"result"' in frame, frame
            second = await answer_head(queue[2][0], 10)  # arrival order: then the newcomer
            assert second is not None and second.startswith(b"HTTP/1.1 101"), second
            assert await answer_head(queue[1][0], 0.3) is None
            for _, w in queue:
                w.close()
        assert refusals(server, "ws", "busy") == 1.0


async def test_a_login_that_never_connects_gives_its_place_up_after_the_lease() -> None:
    """A socket that completes its handshake and sends nothing holds the only login place
    for the lease (1 s), not longer: the next handshake is answered then."""
    env = {"REALTIME_MAX_LOGINS_IN_PROGRESS": "1", "REALTIME_LOGIN_LEASE": "1.0"}
    async with running_server(env) as server:
        idle_reader, idle_writer = await open_raw(server)
        idle_writer.write(handshake())
        head = await answer_head(idle_reader, 5)
        assert head is not None and head.startswith(b"HTTP/1.1 101"), head
        reader, writer = await open_raw(server)
        writer.write(handshake())
        assert await answer_head(reader, 0.3) is None  # the idle socket holds the place
        head = await answer_head(reader, 10)
        assert head is not None and head.startswith(b"HTTP/1.1 101"), head
        async with connected(server, "after") as client:  # the idle one holds nothing now
            assert "result" in await client.command("ping")
        for w in (idle_writer, writer):
            w.close()
