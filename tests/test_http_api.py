"""The backend's HTTP API end to end (section 6: publish, health, metrics)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from tests.server import ServerProcess, connected, running_server

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(30)]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server() -> AsyncIterator[ServerProcess]:
    async with running_server({"REALTIME_MAX_BODY_BYTES": "4096"}) as srv:
        yield srv


async def post(
    server: ServerProcess,
    body: bytes | None = None,
    *,
    key: str | None = "default",
    json_body: object = None,
    path: str = "/v1/publish",
) -> httpx.Response:
    headers = {}
    if key is not None:
        headers["Authorization"] = f"Bearer {server.api_key if key == 'default' else key}"
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        if json_body is not None:
            return await client.post(path, json=json_body, headers=headers)
        return await client.post(path, content=body or b"", headers=headers)


EVENT = {"channel": "broadcast", "event": "hello", "data": {}}


async def test_api_keys(server: ServerProcess) -> None:
    for key in (None, "wrong", "test-api-key-but-longer"):
        response = await post(server, json_body=EVENT, key=key)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"
    for key in ("default", "second-key"):  # several keys valid at once (rotation)
        assert (await post(server, json_body=EVENT, key=key)).status_code == 202


async def test_bad_bodies(server: ServerProcess) -> None:
    response = await post(server, b"{nope")
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    response = await post(server, b"\xff\xfe")
    assert response.status_code == 400
    response = await post(
        server, b'{"channel": "broadcast", "event": "e", "data": "' + b"x" * 5000 + b'"}'
    )
    assert response.status_code == 413
    response = await post(
        server, json_body={"channel": "nope:x", "event": "", "data": 3, "extra": 1}
    )
    assert response.status_code == 422
    locs = {field["loc"] for field in response.json()["error"]["fields"]}
    assert {"channel", "event", "data", "extra"} <= locs


async def test_a_list_with_one_bad_item_is_refused_whole(server: ServerProcess) -> None:
    async with connected(server, "u-list") as client:
        await client.command("subscribe", channel="artist:list")
        good = {"channel": "artist:list", "event": "ok", "data": {}}
        response = await post(server, json_body=[good, {"channel": "artist:list"}, good])
        assert response.status_code == 422
        assert response.json()["error"]["fields"][0]["loc"].startswith("1.")
        response = await post(server, json_body=[good] * 1001)
        assert response.status_code in (413, 422)
        response = await post(server, json_body=[])
        assert response.status_code == 422
        await server.publish({"channel": "user:u-list", "event": "marker"})
        assert (await client.next_pushed())["event"] == "marker"  # nothing of the bad lists


async def test_idempotent_publish_delivers_once(server: ServerProcess) -> None:
    async with connected(server, "u-idem") as client:
        body = {"channel": "user:u-idem", "event": "purchase", "id": "order-42", "data": {}}
        first = await post(server, json_body=body)
        second = await post(server, json_body=body)
        assert first.status_code == second.status_code == 202
        # The duplicate gets the first publication's offset (section 9).
        assert first.json() == second.json() == {"ids": ["order-42"], "offsets": [1]}
        await server.publish({"channel": "user:u-idem", "event": "marker"})
        assert (await client.next_pushed())["id"] == "order-42"
        assert (await client.next_pushed())["event"] == "marker"


async def test_not_found_and_method_not_allowed_are_json(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        response = await client.get("/nope")
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
        response = await client.get("/v1/publish")
        assert response.status_code == 405
        assert "error" in response.json()


async def test_health_ready_metrics(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["broker"] is True
        async with connected(server, "u-metrics"):
            text = (await client.get("/metrics")).text
            assert 'piggybong_realtime_ws_connections{tier="free"} 1.0' in text
        assert "piggybong_realtime_hub_publish_to_write_seconds_bucket" in text
        assert "process_resident_memory_bytes" in text
