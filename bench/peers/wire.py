"""What the Python peers speak of protocol-v1 and of the HTTP API: just enough for the
benchmark's clients (bench/loadgen.py), as bench/peers/node_ws/server.js does.

WebSocket: ``connect`` and ``subscribe`` commands answered ``{"id", "result"}`` (no token or
API key checked), events as ``{"type": "event", "channel", "event", "id", "ts", "data"}``,
JSON text frames only. HTTP: ``POST /v1/publish`` with one event or a list, answered 202
``{"id"}`` or ``{"ids"}``; ``GET /healthz``. Standard library only (the peers' venv has
no project dependencies).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from typing import Any

SUBPROTOCOL = "piggybong.v1.json"
HEALTH = b'{"status":"ok"}'

_ids = itertools.count(1)


def command_reply(raw: bytes | str, node: str) -> tuple[bytes, str | None]:
    """The reply to one client command, and the channel it subscribes to (or None).
    Raises ValueError on a frame that is not a JSON object."""
    command = json.loads(raw)
    if not isinstance(command, dict):
        raise ValueError("not a command")
    channel = None
    result: dict[str, Any] = {}
    if command.get("op") == "subscribe":
        channel = str(command.get("channel"))
    elif command.get("op") == "connect":
        result = {"session": node, "user": "", "tier": "free", "subscriptions": []}
    return json.dumps({"id": command.get("id"), "result": result}).encode(), channel


def publish(body: bytes, send: Callable[[str, bytes], None], prefix: str) -> bytes:
    """Each event of a publish body serialized once and handed to ``send(channel, frame)``;
    the 202 answer's body. Raises ValueError on a body that is not JSON."""
    parsed = json.loads(body)
    items = parsed if isinstance(parsed, list) else [parsed]
    ids = []
    for item in items:
        ident = f"{prefix}-{next(_ids)}"
        ids.append(ident)
        channel = str(item.get("channel"))
        frame = json.dumps(
            {
                "type": "event",
                "channel": channel,
                "event": item.get("event"),
                "id": ident,
                "ts": int(time.time() * 1000),
                "data": item.get("data"),
            },
            separators=(",", ":"),
        ).encode()
        send(channel, frame)
    return json.dumps({"ids": ids} if isinstance(parsed, list) else {"id": ids[0]}).encode()
