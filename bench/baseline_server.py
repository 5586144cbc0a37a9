"""The naive baseline: a Starlette endpoint on uvicorn that keeps a set of sockets per channel
and sends to each in a loop.

It speaks just enough of protocol-v1 for the benchmark's clients (``connect`` and
``subscribe`` replies, ``event`` messages, JSON only) and of the HTTP API
(``POST /v1/publish`` with one event or a list, ``GET /healthz``). It checks no
token and no API key. The publish handler encodes the message once and awaits
``send_text`` to every subscriber in turn before it answers 202, as the simplest
Starlette broadcast would. uvicorn runs with ``--ws websockets-sansio`` (its
fastest WebSocket implementation, the one the peers table measured) and no
compression. Nothing is tuned: the garbage collector keeps its defaults.

Run: ``python -m bench.baseline_server --port 8100``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from loadtest.sysstats import raise_nofile

SUBPROTOCOL = "piggybong.v1.json"

channels: dict[str, set[WebSocket]] = {}
_ids = itertools.count(1)


async def ws_endpoint(websocket: WebSocket) -> None:
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    mine: set[str] = set()
    try:
        while True:
            command = json.loads(await websocket.receive_text())
            op = command.get("op")
            if op == "subscribe":
                channel = str(command.get("channel"))
                channels.setdefault(channel, set()).add(websocket)
                mine.add(channel)
                await websocket.send_text(json.dumps({"id": command.get("id"), "result": {}}))
            elif op == "connect":
                await websocket.send_text(
                    json.dumps(
                        {
                            "id": command.get("id"),
                            "result": {
                                "session": "baseline",
                                "user": "",
                                "tier": "free",
                                "subscriptions": [],
                            },
                        }
                    )
                )
            else:
                await websocket.send_text(json.dumps({"id": command.get("id"), "result": {}}))
    except WebSocketDisconnect:
        pass
    finally:
        for channel in mine:
            subs = channels.get(channel)
            if subs is not None:
                subs.discard(websocket)


async def publish(request: Request) -> Response:
    body = json.loads(await request.body())
    items: list[dict[str, Any]] = body if isinstance(body, list) else [body]
    ids = []
    for item in items:
        eid = f"b-{next(_ids)}"
        ids.append(eid)
        channel = str(item["channel"])
        text = json.dumps(
            {
                "type": "event",
                "channel": channel,
                "event": item["event"],
                "id": eid,
                "ts": int(time.time() * 1000),
                "data": item.get("data"),
            },
            separators=(",", ":"),
        )
        for websocket in list(channels.get(channel, ())):
            try:
                await websocket.send_text(text)
            except Exception:  # the socket went away mid-loop
                channels.get(channel, set()).discard(websocket)
    return JSONResponse({"ids": ids} if isinstance(body, list) else {"id": ids[0]}, status_code=202)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok", "node": "baseline"})


async def bare_publish(request: Request) -> Response:
    """The bare HTTP baseline: a bearer check, a JSON parse, 202. Nothing is published."""
    if request.headers.get("authorization") != "Bearer dev-api-key":
        return JSONResponse({"error": "unauthorized"}, status_code=401)
    body = json.loads(await request.body())
    return JSONResponse({"ids": [body.get("id")]}, status_code=202)


def create_app() -> Starlette:
    app = Starlette(
        routes=[
            Route("/v1/publish", publish, methods=["POST"]),
            Route("/bare/publish", bare_publish, methods=["POST"]),
            Route("/healthz", healthz),
            WebSocketRoute("/v1/ws", ws_endpoint),
        ]
    )
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    raise_nofile()
    uvicorn.run(
        create_app(),
        host=args.host,
        port=args.port,
        loop="uvloop",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
