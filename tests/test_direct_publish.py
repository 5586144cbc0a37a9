"""``POST /v1/publish`` served by the HTTP protocol itself (realtime/httpprotocol.py), on the
real server over a raw socket: every answer is the one the ASGI path gives (the same target
with a query string goes through the ASGI app), keep-alive and pipelined requests keep their
order, the body limit answers 413, answers are counted, draining refuses with 503."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from starlette.testclient import TestClient

from realtime.api import DirectPublish
from realtime.app import create_app
from realtime.settings import Settings
from tests.server import API_KEY, ServerProcess, running_server

pytestmark = pytest.mark.timeout(60)

LIMIT = 2048
ENV = {"REALTIME_MAX_BODY_BYTES": str(LIMIT)}
AUTH = f"Authorization: Bearer {API_KEY}\r\n"
Answer = tuple[int, list[tuple[str, str]], bytes]


def post(target: str, body: bytes, headers: str = AUTH, version: str = "1.1") -> bytes:
    return (
        f"POST {target} HTTP/{version}\r\nHost: t\r\n{headers}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")[:-2]
    status = int(lines[0].split()[1])
    headers = [(n.lower(), v) for n, v in (line.split(": ", 1) for line in lines[1:])]
    length = next(int(v) for n, v in headers if n == "content-length")
    # The date changes every second: it is the one header compared by name only.
    headers = [(n, "" if n == "date" else v) for n, v in headers]
    return status, headers, await reader.readexactly(length)


async def exchange(server: ServerProcess, raw: bytes, answers: int = 1) -> list[Answer]:
    """``raw`` written at once on a new connection, then ``answers`` answers read in order."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(raw)
        return [await read_answer(reader) for _ in range(answers)]
    finally:
        writer.close()


def item(channel: str = "artist:direct", event: str = "e", **more: Any) -> dict[str, Any]:
    return {"channel": channel, "event": event, **more}


#: (headers, body) of requests whose answers must not depend on the path taken
CASES: list[tuple[str, Any]] = [
    (AUTH, item(id="one", data={"n": 1})),
    (AUTH, [item(id="two"), item("user:u1", id="three", data={"é": "ü"})]),
    ("", item(id="x")),
    ("Authorization: Bearer wrong\r\n", item(id="x")),
    ("Authorization: Basic abc\r\n", item(id="x")),
    (AUTH, b"{not json"),
    (AUTH, b'{"channel": "artist:a", "event": "e", "data": {"f": NaN}}'),
    (AUTH, item("bad chan")),
    (AUTH, item("admin:stats")),
    (AUTH, item(event="presence")),
    (AUTH, item(event="")),
    (AUTH, item(event="e" * 129)),
    (AUTH, item(id="")),
    (AUTH, item(id=5)),
    (AUTH, item(data=None)),
    (AUTH, item(data=[1])),
    (AUTH, item(extra=1)),
    (AUTH, {"event": "e"}),
    (AUTH, [item(id="ok4"), item("nope"), 7]),
    (AUTH, []),
    (AUTH, 7),
    (AUTH, "s"),
    (AUTH, b"[" + b",".join([b"{}"] * 1001) + b"]"),
    (AUTH, b" " * (LIMIT + 1)),
]


def encoded(body: Any) -> bytes:
    return body if isinstance(body, bytes) else json.dumps(body).encode()


async def test_every_answer_is_the_asgi_paths() -> None:
    async with running_server(ENV) as server:
        for headers, body in CASES:
            raw = encoded(body)
            # Direct first: a 202 publishes there, and the ASGI path answers the same ids and
            # offsets (duplicates of the same ids).
            direct = await exchange(server, post("/v1/publish", raw, headers))
            asgi = await exchange(server, post("/v1/publish?via=asgi", raw, headers))
            assert direct == asgi, (headers, body)
        status, _, answer = direct[0]
        assert status == 413 and json.loads(answer)["error"]["code"] == "limit_exceeded"


async def test_connection_close_and_http_1_0_answer_then_close() -> None:
    async with running_server(ENV) as server:
        for target in ("/v1/publish", "/v1/publish?via=asgi"):
            for extra, version in (("Connection: close\r\n", "1.1"), ("", "1.0")):
                reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
                writer.write(post(target, encoded(item(id=f"c{version}")), AUTH + extra, version))
                status, headers, _ = await read_answer(reader)
                assert status == 202 and ("connection", "close") in headers
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed by the server
                writer.close()


async def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async with running_server(ENV) as server:
        channel = "artist:pipe"
        raw = b"".join(
            [
                post("/v1/publish", encoded(item(channel, id="p1"))),
                b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
                post("/v1/publish", encoded(item(channel, id="p2"))),
                post("/v1/publish?via=asgi", encoded(item(channel, id="p3"))),
                post("/v1/publish", b"{oops"),
                post("/v1/publish", encoded(item(channel, id="p4"))),
                post("/v1/publish", encoded(item(channel, id="p2"))),  # a duplicate
            ]
        )
        answers = await exchange(server, raw, 7)
        assert [status for status, _, _ in answers] == [202, 200, 202, 202, 400, 202, 202]
        bodies = [json.loads(body) for _, _, body in answers]
        assert bodies[1]["status"] == "ok"
        offsets = [bodies[i]["offsets"] for i in (0, 2, 3, 5, 6)]
        assert offsets == [[1], [2], [3], [4], [2]]
        # A head split from its body, and a body in pieces, on one kept-alive connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        request = post("/v1/publish", encoded(item(channel, id="p5", data={"s": "x" * 500})))
        for start in range(0, len(request), 97):
            writer.write(request[start : start + 97])
            await writer.drain()
            await asyncio.sleep(0.001)
        status, _, body = await read_answer(reader)
        assert status == 202 and json.loads(body)["offsets"] == [5]
        writer.write(post("/v1/publish", encoded(item(channel, id="p6"))))
        status, _, body = await read_answer(reader)
        assert status == 202 and json.loads(body)["offsets"] == [6]
        writer.close()


async def test_a_chunked_body_over_the_limit_is_413_and_the_connection_goes_on() -> None:
    async with running_server(ENV) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        chunk = b"x" * 1000
        head = f"POST /v1/publish HTTP/1.1\r\nHost: t\r\n{AUTH}Transfer-Encoding: chunked\r\n\r\n"
        writer.write(
            head.encode()
            + b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
            + b"0\r\n\r\n"
            + post("/v1/publish", encoded(item(id="after")))
        )
        status, _, body = await read_answer(reader)
        assert status == 413 and b"larger than 2048 bytes" in body
        status, _, body = await read_answer(reader)
        assert status == 202 and json.loads(body)["ids"] == ["after"]
        writer.close()


async def test_direct_answers_are_counted_and_logged() -> None:
    async with running_server(ENV) as server:
        await exchange(server, post("/v1/publish", encoded(item(id="m1"))))
        await exchange(server, post("/v1/publish", encoded(item(id="m2"))))
        await exchange(server, post("/v1/publish", encoded(item(id="m3")), ""))
        async with server.http() as client:
            text = (await client.get("/metrics")).text
        for status, count in (("202", 2), ("401", 1)):
            labels = f'{{route="/v1/publish",status="{status}"}}'
            assert f"realtime_http_requests_total{labels} {count}.0" in text
        # uvicorn's access line too (the tests' servers log at info)
        assert '- "POST /v1/publish HTTP/1.1" 401' in server.log()


def test_draining_refuses_on_the_head_as_the_asgi_path_does() -> None:
    settings = Settings(api_keys=[API_KEY])
    app = create_app(settings)
    with TestClient(app) as client:
        node = app.state.node
        node.draining = True
        asgi = client.post(
            "/v1/publish", headers={"Authorization": f"Bearer {API_KEY}"}, json=item()
        )
        direct = DirectPublish(app.state.api, app.answers).head(
            [(b"authorization", f"Bearer {API_KEY}".encode())]
        )
        assert direct is not None
        assert (direct.status_code, bytes(direct.body)) == (asgi.status_code, asgi.content)
        assert asgi.status_code == 503 and asgi.headers["retry-after"] == "1"
        assert (b"retry-after", b"1") in direct.raw_headers
