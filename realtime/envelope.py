"""What travels over the broker between nodes: one msgpack map per payload.

An event carries the server message exactly as subscribers receive it, so a
node decodes a payload once and encodes it once per codec in use.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from realtime.protocol import event_message

KIND_EVENT = "event"
KIND_NOTIFICATION = "notification"
#: A control frame: the channel's presence counts changed on some node (no message).
KIND_PRESENCE = "presence"
_KINDS: Final = (KIND_EVENT, KIND_NOTIFICATION, KIND_PRESENCE)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded payload: ``message`` is the server message (a map) to send; a channel
    publication's message carries its ``offset``."""

    kind: str
    message: dict[str, Any]
    accepted_at: float  # unix seconds at acceptance, for the latency histogram
    offset: int = 0  # 0: not a channel publication (a notification)
    epoch: str = ""


#: The epoch field of a frame that is not a channel publication.
NO_EPOCH: Final = "-"


def frame(offset: int, epoch: str, payload: bytes) -> bytes:
    """What the broker carries: ``b"<offset> <epoch> "`` and the envelope."""
    return b"%d %s %s" % (offset, epoch.encode(), payload)


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
    """A notification, framed for the broker (not a channel publication: offset 0)."""
    packed = msgpack.packb(
        {"k": KIND_NOTIFICATION, "m": message, "a": time.time()}, use_bin_type=True
    )
    return frame(0, NO_EPOCH, packed)


def pack_presence_change() -> bytes:
    """The control frame a node publishes when a join or leave changed a channel's counts."""
    return frame(0, NO_EPOCH, msgpack.packb({"k": KIND_PRESENCE, "m": {}}, use_bin_type=True))


def unpack_entry(offset: int, epoch: str, payload: bytes | memoryview) -> Delivery | None:
    """An envelope as a Delivery (a publication's message gets its ``offset``); None when
    it is not one of ours."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        kind, message = raw["k"], raw["m"]
        accepted = float(raw.get("a", 0.0))
    except Exception:
        return None
    if not isinstance(message, dict) or kind not in (KIND_EVENT, KIND_NOTIFICATION, KIND_PRESENCE):
        return None
    if offset:
        message["offset"] = offset
    return Delivery(kind, message, accepted, offset, epoch)


def unpack_message(offset: int, payload: bytes) -> dict[str, Any] | None:
    """``unpack_entry(offset, epoch, payload).message``, without the Delivery (a resume's
    reply takes up to 1,000 of these); None for what ``unpack_entry`` refuses."""
    try:
        raw = msgpack.unpackb(payload, raw=False)
        kind, message = raw["k"], raw["m"]
        float(raw.get("a", 0.0))
    except Exception:
        return None
    if not isinstance(message, dict) or kind not in _KINDS:
        return None
    if offset:
        message["offset"] = offset
    return message


def unpack(data: bytes) -> Delivery | None:
    """A broker frame (``frame``) as a Delivery; None when it is not one of ours."""
    first = data.find(b" ")
    second = data.find(b" ", first + 1)
    if first <= 0 or second < 0:
        return None
    try:
        offset = int(data[:first])
        epoch = data[first + 1 : second].decode()
    except ValueError:
        return None
    return unpack_entry(offset, epoch, memoryview(data)[second + 1 :])
