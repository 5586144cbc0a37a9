"""The WebSocket contract end to end: a real server process, real clients (sections 1 to 4)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import jwt
import msgpack
import pytest
import pytest_asyncio
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.server import ServerProcess, connected, running_server, ws_client

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(30)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ServerProcess]:
    async with running_server({"REALTIME_CONNECT_TIMEOUT": "1.5"}) as srv:
        yield srv


async def test_connect_result_and_user_channel(server: ServerProcess) -> None:
    async with ws_client(server) as client:
        reply = await client.command(
            "connect", token=server.token("u-connect"), client={"app": "ios", "version": "1.0"}
        )
        result = reply["result"]
        assert result["user"] == "u-connect"
        assert result["tier"] == "free"
        assert result["ping_interval"] == 25
        assert result["subscriptions"] == ["user:u-connect"]
        assert result["limits"] == {
            "commands_per_minute": 60,
            "max_subscriptions": 20,
            "max_connections": 2,
            "batch_window_ms": 2000,
            "batch_max_items": 50,
            "max_frame_bytes": 65536,
            "recovery_window_s": 120,
            "recovery_max": 100,
        }
        assert isinstance(result["session"], str) and result["session"]
        # Auto-subscribed: a backend event on the user channel arrives.
        response = await server.publish(
            {"channel": "user:u-connect", "event": "budget.updated", "data": {"left": 5}}
        )
        assert response.status_code == 202
        event = await client.next_pushed()
        assert event["type"] == "event"
        assert event["channel"] == "user:u-connect"
        assert event["event"] == "budget.updated"
        assert event["data"] == {"left": 5}
        assert event["id"] == response.json()["ids"][0]
        assert abs(event["ts"] - time.time() * 1000) < 5000


async def test_json_and_msgpack_clients_each_get_their_encoding(server: ServerProcess) -> None:
    async with connected(server, "u-json") as js, connected(server, "u-mp", binary=True) as mp:
        epochs = set()
        for client in (js, mp):
            reply = await client.command("subscribe", channel="artist:aespa")
            assert reply["id"] == 2 and reply["result"]["offset"] == 0
            epochs.add(reply["result"]["epoch"])
        assert len(epochs) == 1  # one history for both
        response = await server.publish(
            {
                "channel": "artist:aespa",
                "event": "comeback.announced",
                "id": "evt-1",
                "data": {"album": "Armageddon"},
            }
        )
        assert response.json() == {"ids": ["evt-1"], "offsets": [1]}
        raw_json = await asyncio.wait_for(js.ws.recv(), 5)
        raw_mp = await asyncio.wait_for(mp.ws.recv(), 5)
        assert isinstance(raw_json, str)
        assert isinstance(raw_mp, bytes)
        a, b = json.loads(raw_json), msgpack.unpackb(raw_mp)
        assert a == b
        assert a["id"] == "evt-1" and a["data"] == {"album": "Armageddon"}
        assert a["offset"] == 1


async def test_client_publish_reaches_own_devices_and_is_acl_checked(server: ServerProcess) -> None:
    async with connected(server, "u-sync") as phone, connected(server, "u-sync") as tablet:
        reply = await phone.command(
            "publish", channel="user:u-sync", event="draft.saved", data={"n": 1}
        )
        eid = reply["result"]["id"]
        for client in (phone, tablet):
            event = await client.next_pushed()
            assert (event["event"], event["id"], event["data"]) == ("draft.saved", eid, {"n": 1})
        for channel in ("artist:aespa", "broadcast", "user:someone-else"):
            reply = await phone.command("publish", channel=channel, event="x", data={})
            assert reply["error"]["code"] == "forbidden", reply


async def test_subscribe_rules(server: ServerProcess) -> None:
    async with connected(server, "u-sub") as client:
        for channel in (
            "nope:x",
            "artist:",
            "artist:bad name",
            "a" * 129,
            "artist:" + "a" * 122,
            "",
            5,
        ):
            reply = await client.command("subscribe", channel=channel)
            assert reply["error"]["code"] == "bad_request", (channel, reply)
        assert (await client.command("subscribe", channel="user:other"))["error"]["code"] == (
            "forbidden"
        )
        assert (await client.command("subscribe", channel="premium:charts"))["error"][
            "code"
        ] == "forbidden"
        assert "result" in await client.command("subscribe", channel="broadcast")
        assert "result" in await client.command("subscribe", channel="broadcast")  # no change
        assert "result" in await client.command("subscribe", channel="artist:" + "a" * 121)
        # 20 subscriptions on free, user:<sub> included: 17 more fit, the 21st does not.
        for i in range(17):
            assert "result" in await client.command("subscribe", channel=f"artist:a{i}")
        reply = await client.command("subscribe", channel="artist:one-too-many")
        assert reply["error"]["code"] == "limit_exceeded"
        assert "result" in await client.command("unsubscribe", channel="artist:a0")
        assert "result" in await client.command("unsubscribe", channel="artist:never-held")
        assert "result" in await client.command("subscribe", channel="artist:one-too-many")


async def test_unsubscribe_stops_delivery(server: ServerProcess) -> None:
    async with connected(server, "u-unsub") as client:
        await client.command("subscribe", channel="artist:ive")
        await client.command("unsubscribe", channel="artist:ive")
        await server.publish({"channel": "artist:ive", "event": "gone"})
        await server.publish({"channel": "user:u-unsub", "event": "marker"})
        assert (await client.next_pushed())["event"] == "marker"


async def test_paid_tier_and_premium_channel(server: ServerProcess) -> None:
    async with connected(server, "u-paid", tier="paid") as client:
        assert "result" in await client.command("subscribe", channel="premium:charts")
        reply = await client.command("ping")
        assert reply == {"id": 3, "result": {}}


async def test_readable_but_wrong_messages_keep_the_connection(server: ServerProcess) -> None:
    async with connected(server, "u-wrong") as client:
        cases: list[tuple[dict[str, object], str]] = [
            ({"op": "subscribe"}, "bad_request"),
            ({"op": "publish", "channel": "user:u-wrong"}, "bad_request"),
            (
                {"op": "publish", "channel": "user:u-wrong", "event": "e", "data": [1]},
                "bad_request",
            ),
            ({"op": 5}, "bad_request"),
            ({"op": "dance"}, "not_found"),
            ({"op": "connect", "token": server.token("u-wrong")}, "bad_request"),
            ({"op": "refresh"}, "bad_request"),
        ]
        for i, (fields, code) in enumerate(cases, start=100):
            await client.send_raw(json.dumps({"id": i, **fields}))
            reply = await client.recv()
            assert reply["id"] == i and reply["error"]["code"] == code, (fields, reply)
        assert "result" in await client.command("ping")


@pytest.mark.parametrize(
    ("binary", "frame"),
    [
        (False, b"\xff\xfe not utf-8"),  # sent as a text frame below
        (False, "{not json"),
        (False, "[1, 2]"),
        (False, '{"op": "ping"}'),
        (False, '{"id": 0, "op": "ping"}'),
        (False, '{"id": "7", "op": "ping"}'),
        (False, b"\x81\xa2id\x01"),  # binary frame on a JSON connection
        (True, '{"id": 1, "op": "ping"}'),  # text frame on a msgpack connection
        (True, b"\xc1"),  # never-used msgpack byte
        (True, msgpack.packb([1, 2])),
    ],
)
async def test_malformed_frames_close_4000(
    server: ServerProcess, binary: bool, frame: str | bytes
) -> None:
    for before_connect in (True, False):
        async with ws_client(server, binary=binary) as client:
            if not before_connect:
                reply = await client.command("connect", token=server.token("u-bad"))
                assert "result" in reply
            if frame == b"\xff\xfe not utf-8":
                # websockets refuses to send invalid UTF-8 as text: write the frame by hand.
                client.ws.protocol.send_text(frame)
                client.ws.send_data()
            else:
                await client.send_raw(frame)
            assert await client.close_code() == 4000


async def test_before_connect(server: ServerProcess) -> None:
    async with ws_client(server) as client:
        await client.send_raw(json.dumps({"id": 1, "op": "subscribe", "channel": "broadcast"}))
        assert await client.close_code() == 4000
    async with ws_client(server) as client:
        await client.send_raw(json.dumps({"id": 1, "op": "dance"}))
        assert await client.close_code() == 4000
    async with ws_client(server) as client:  # silence
        started = time.monotonic()
        assert await client.close_code(timeout=5) == 4001
        assert 1.0 < time.monotonic() - started < 4.0
    async with ws_client(server) as client:  # a connect with a missing field: told, then on
        await client.send_raw(json.dumps({"id": 1, "op": "connect"}))
        assert (await client.recv())["error"]["code"] == "bad_request"
        reply = await client.command("connect", token=server.token("u-late"))
        assert "result" in reply


@pytest.mark.parametrize(
    "case", ["garbage", "bad-signature", "alg-none", "expired", "no-exp", "wrong-aud"]
)
async def test_refused_connect_replies_then_closes_4001(server: ServerProcess, case: str) -> None:
    now = int(time.time())
    claims = {"sub": "u-refused", "exp": now + 60, "aud": "authenticated"}
    token = {
        "garbage": "not.a.jwt",
        "bad-signature": jwt.encode(claims, "another-secret-0123456789abcdef0123", "HS256"),
        "alg-none": jwt.encode(claims, None, "none"),  # type: ignore[arg-type]
        "expired": jwt.encode({**claims, "exp": now - 5}, server.jwt_secret, "HS256"),
        "no-exp": jwt.encode({"sub": "u-refused"}, server.jwt_secret, "HS256"),
        "wrong-aud": jwt.encode({**claims, "aud": "other"}, server.jwt_secret, "HS256"),
    }[case]
    async with ws_client(server) as client:
        reply = await client.command("connect", token=token)
        assert reply["error"]["code"] == "unauthorized"
        assert await client.close_code() == 4001


async def test_token_expiry_closes_4001_within_a_second(server: ServerProcess) -> None:
    async with ws_client(server) as client:
        reply = await client.command("connect", token=server.token("u-exp", ttl=2))
        exp = time.time() + 2
        assert "result" in reply
        assert await client.close_code(timeout=6) == 4001
        assert time.time() - exp < 1.5


async def test_refresh(server: ServerProcess) -> None:
    async with ws_client(server) as client:
        assert "result" in await client.command("connect", token=server.token("u-ref", ttl=2))
        assert (await client.command("refresh", token=server.token("someone")))["error"][
            "code"
        ] == "forbidden"
        assert (await client.command("refresh", token="junk"))["error"]["code"] == "unauthorized"
        reply = await client.command("refresh", token=server.token("u-ref", ttl=60))
        assert reply["result"]["expires_at"] >= int(time.time()) + 55
        await asyncio.sleep(2.5)  # the first token has expired; the refreshed one holds
        assert "result" in await client.command("ping")


async def test_frame_over_limit_closes_1009(server: ServerProcess) -> None:
    async with connected(server, "u-big") as client:
        big = json.dumps(
            {
                "id": 9,
                "op": "publish",
                "channel": "user:u-big",
                "event": "e",
                "data": {"x": "a" * 70_000},
            }
        )
        await client.send_raw(big)
        assert await client.close_code() == 1009


async def test_unknown_subprotocol_is_refused_with_400(server: ServerProcess) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_client(server, subprotocols=["mqtt"]):
            pass
    assert info.value.response.status_code == 400
    # No subprotocol offered: JSON.
    async with ws_client(server, subprotocols=[]) as client:
        assert client.ws.subprotocol is None
        assert "result" in await client.command("connect", token=server.token("u-plain"))


async def test_websocket_on_another_path_is_refused(server: ServerProcess) -> None:
    # /v1/ws skips Starlette's router; every other path still goes through it (403, no upgrade).
    for path in ("/v1/ws/", "/v1/wsx", "/ws", "/v1/publish"):
        with pytest.raises(InvalidStatus) as info:
            async with connect(
                server.ws_url.replace("/v1/ws", path),
                open_timeout=5,
                subprotocols=[Subprotocol("piggybong.v1.json")],
            ):
                pass
        assert info.value.response.status_code == 403, path
    async with connected(server, "u-after-403") as client:
        result = (await client.command("subscribe", channel="artist:ive"))["result"]
        assert isinstance(result["offset"], int) and isinstance(result["epoch"], str)


async def test_connections_per_user_newest_closed_4029(server: ServerProcess) -> None:
    async with connected(server, "u-limit"), connected(server, "u-limit"):
        async with ws_client(server) as third:
            reply = await third.command("connect", token=server.token("u-limit"))
            assert reply["error"]["code"] == "limit_exceeded"
            assert reply["error"]["retry_after"] == 20  # when a dead node's slots are free
            assert await third.close_code() == 4029
    # The slots are released on close.
    async with connected(server, "u-limit"), connected(server, "u-limit"):
        pass


async def test_events_of_one_publisher_arrive_in_order(server: ServerProcess) -> None:
    async with connected(server, "u-order", binary=True) as client:
        await client.command("subscribe", channel="artist:order")
        body = [{"channel": "artist:order", "event": "seq", "data": {"n": n}} for n in range(300)]
        assert (await server.publish(body)).status_code == 202
        for n in range(300):
            assert (await client.next_pushed())["data"]["n"] == n
