"""What travels over the broker between nodes: one msgpack map per payload.

An event carries the server message exactly as subscribers receive it, so a
node decodes a payload once and encodes it once per codec in use.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any

import msgpack

from realtime.protocol import event_message

KIND_EVENT = "event"
KIND_NOTIFICATION = "notification"


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded payload: ``message`` is the server message (a map) to send."""

    kind: str
    message: dict[str, Any]
    accepted_at: float  # unix seconds at acceptance, for the latency histogram


def now_ms() -> int:
    return int(time.time() * 1000)


_counter = itertools.count(1)
_node_prefix = os.urandom(4).hex()


def new_event_id() -> str:
    """A server-made event id: unique per node (random prefix) and increasing within it."""
    return f"{_node_prefix}-{int(time.time() * 1000):x}-{next(_counter):x}"


def pack_event(channel: str, event: str, eid: str, ts: int, data: Any) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {"k": KIND_EVENT, "m": event_message(channel, event, eid, ts, data), "a": time.time()},
        use_bin_type=True,
    )


def pack_notification(message: dict[str, Any]) -> bytes:
    return msgpack.packb(  # type: ignore[no-any-return]
        {"k": KIND_NOTIFICATION, "m": message, "a": time.time()}, use_bin_type=True
    )


def unpack(payload: bytes) -> Delivery | None:
    """The payload as a Delivery; None when it is not one of ours (ignored)."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        kind, message = raw["k"], raw["m"]
        accepted = float(raw.get("a", 0.0))
    except Exception:
        return None
    if not isinstance(message, dict) or kind not in (KIND_EVENT, KIND_NOTIFICATION):
        return None
    return Delivery(kind, message, accepted)
