"""The wire contract (protocol-v1), sans I/O.

Client commands are parsed from bytes into typed values; server messages are
built as maps and encoded once per codec into complete, unmasked WebSocket
frames, so the same bytes can be written to every subscriber.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, ClassVar, Final

import msgpack

JSON_SUBPROTOCOL: Final = "piggybong.v1.json"
MSGPACK_SUBPROTOCOL: Final = "piggybong.v1.msgpack"

OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8


class CloseCode(IntEnum):
    """WebSocket close codes of the contract (section 1)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    BAD_REQUEST = 4000
    UNAUTHORIZED = 4001
    FORBIDDEN = 4003
    SLOW_CONSUMER = 4008
    TOO_MANY = 4029


class ErrorCode(StrEnum):
    """Error codes of command replies and HTTP errors (section 2)."""

    BAD_REQUEST = "bad_request"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    LIMIT_EXCEEDED = "limit_exceeded"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"


@dataclass(frozen=True, slots=True)
class Error:
    """An error as a value: what a reply's ``error`` map carries."""

    code: ErrorCode
    message: str
    retry_after: float | None = None

    def to_map(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.retry_after is not None:
            out["retry_after"] = round(self.retry_after, 3)
        return out


class ProtocolViolation(Exception):
    """A frame that cannot be read as one message: the connection closes with 4000."""


# --------------------------------------------------------------------------- codecs


def frame(opcode: int, payload: bytes) -> bytes:
    """A complete, final, unmasked server frame."""
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", 0x80 | opcode, n) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, n) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, n) + payload


#: allow_nan=False: a non-finite float raises instead of becoming invalid JSON (refused at
#: entry, section 11, so only a bug reaches it).
_json_encoder = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), check_circular=False, allow_nan=False
)


class Codec:
    """One encoding of the contract: JSON text frames or msgpack binary frames."""

    __slots__ = ("binary", "index", "name", "opcode")

    def __init__(self, name: str, index: int, binary: bool) -> None:
        self.name = name
        self.index = index
        self.binary = binary
        self.opcode = OP_BINARY if binary else OP_TEXT

    def dumps(self, message: Mapping[str, Any]) -> bytes:
        if self.binary:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        return _json_encoder.encode(message).encode()

    def encode(self, message: Mapping[str, Any]) -> bytes:
        """The message as one complete server frame."""
        return frame(self.opcode, self.dumps(message))

    def decode(self, data: bytes, *, binary: bool) -> dict[str, Any]:
        """A client frame as a map, or ProtocolViolation."""
        if binary != self.binary:
            kind = "binary" if binary else "text"
            raise ProtocolViolation(f"{kind} frame on a {self.name} connection")
        try:
            if self.binary:
                value = msgpack.unpackb(data, raw=False, strict_map_key=False)
            else:
                value = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ProtocolViolation("invalid UTF-8") from exc
        except ValueError as exc:
            raise ProtocolViolation(f"invalid {self.name}: {exc}") from exc
        except Exception as exc:  # msgpack raises assorted errors on hostile input
            raise ProtocolViolation(f"invalid {self.name}") from exc
        if not isinstance(value, dict):
            raise ProtocolViolation("a message must be a map")
        return value


JSON: Final = Codec("json", 0, binary=False)
MSGPACK: Final = Codec("msgpack", 1, binary=True)
CODECS: Final = (JSON, MSGPACK)
SUBPROTOCOLS: Final = {JSON_SUBPROTOCOL: JSON, MSGPACK_SUBPROTOCOL: MSGPACK}


def choose_codec(offered: list[str]) -> tuple[Codec, str | None] | None:
    """The codec for the offered subprotocols, with the one to accept; None: refuse (400)."""
    if not offered:
        return JSON, None
    for name in offered:
        codec = SUBPROTOCOLS.get(name)
        if codec is not None:
            return codec, name
    return None


# --------------------------------------------------------------------------- channels

MAX_CHANNEL_LENGTH: Final = 128
BROADCAST: Final = "broadcast"
#: ``admin`` holds the server's own channels (the dashboard's ``admin:stats``): admin sessions
#: subscribe to it, nobody publishes to it.
NAMESPACES: Final = ("user", "artist", "premium", "admin")
_CHANNEL_RE: Final = re.compile(rf"({'|'.join(NAMESPACES)}):[A-Za-z0-9_.\-]+")


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    namespace: str  # "user", "artist", "premium" or "broadcast"
    key: str  # the part after the colon ("" for broadcast)


def parse_channel(value: object) -> Channel | Error:
    """A channel of the grammar of section 3, or a bad_request error."""
    if not isinstance(value, str):
        return Error(ErrorCode.BAD_REQUEST, "channel must be a string")
    if len(value) > MAX_CHANNEL_LENGTH:
        return Error(ErrorCode.BAD_REQUEST, f"channel longer than {MAX_CHANNEL_LENGTH} characters")
    if value == BROADCAST:
        return Channel(value, BROADCAST, "")
    if _CHANNEL_RE.fullmatch(value) is None:
        return Error(
            ErrorCode.BAD_REQUEST,
            "channel must be 'broadcast' or '<user|artist|premium>:<name>' with a name of "
            "[A-Za-z0-9_.-]",
        )
    namespace, _, key = value.partition(":")
    return Channel(value, namespace, key)


# --------------------------------------------------------------------------- commands

MAX_EVENT_LENGTH: Final = 128


class Op(StrEnum):
    """The client commands' ``op`` names (section 2)."""

    CONNECT = "connect"
    REFRESH = "refresh"
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PUBLISH = "publish"
    PING = "ping"
    HISTORY = "history"
    PRESENCE = "presence"


#: Publications ``history`` returns by default, and at most (section 9).
HISTORY_DEFAULT_LIMIT: Final = 20
HISTORY_MAX_LIMIT: Final = 100
#: Entries of ``connect``'s ``channels`` read at most (the tier's max_subscriptions applies too).
MAX_CONNECT_CHANNELS: Final = 1000
#: Event names no publish may use: the server's own message types (section 10).
RESERVED_EVENTS: Final = frozenset({"presence"})


@dataclass(frozen=True, slots=True)
class Since:
    """A client's position in a channel's history: what it last saw."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class ChannelRequest:
    """One entry of ``connect``'s ``channels``: a channel (or why it is refused) and its since."""

    name: str
    channel: Channel | Error
    since: Since | None = None


@dataclass(frozen=True, slots=True)
class Connect:
    id: int
    token: str
    client: dict[str, Any] | None = None
    channels: tuple[ChannelRequest, ...] = ()
    op: ClassVar[Op] = Op.CONNECT


@dataclass(frozen=True, slots=True)
class Refresh:
    id: int
    token: str
    op: ClassVar[Op] = Op.REFRESH


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: int
    channel: Channel
    since: Since | None = None
    presence: bool = False
    op: ClassVar[Op] = Op.SUBSCRIBE


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: int
    channel: Channel
    op: ClassVar[Op] = Op.UNSUBSCRIBE


@dataclass(frozen=True, slots=True)
class Publish:
    id: int
    channel: Channel
    event: str
    data: dict[str, Any] = field(default_factory=dict)
    op: ClassVar[Op] = Op.PUBLISH


@dataclass(frozen=True, slots=True)
class Ping:
    id: int
    op: ClassVar[Op] = Op.PING


@dataclass(frozen=True, slots=True)
class History:
    id: int
    channel: Channel
    limit: int = HISTORY_DEFAULT_LIMIT
    since: Since | None = None
    op: ClassVar[Op] = Op.HISTORY


@dataclass(frozen=True, slots=True)
class Presence:
    id: int
    channel: Channel
    op: ClassVar[Op] = Op.PRESENCE


Command = Connect | Refresh | Subscribe | Unsubscribe | Publish | Ping | History | Presence


@dataclass(frozen=True, slots=True)
class CommandError:
    """A readable message that is wrong: reply with ``error``; ``op`` as sent, if a string."""

    id: int
    op: str | None
    error: Error

    @property
    def known_op(self) -> Op | None:
        """``op`` when it names a command (the error is in its fields), else None."""
        try:
            return Op(self.op) if self.op is not None else None
        except ValueError:
            return None


#: The integers both encodings carry: msgpack's int64 and uint64 (JSON has no limit).
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1


def message_id(message: Mapping[str, Any]) -> int:
    """The message's ``id``, or ProtocolViolation (close 4000) when it has no valid one
    (an integer from 1 to 2**63 - 1: echoed in the reply, it must encode in both codecs)."""
    value = message.get("id")
    if type(value) is not int or not 1 <= value < 2**63:
        raise ProtocolViolation("a message needs an integer id from 1 to 2**63 - 1")
    return value


def unsendable(value: object) -> str | None:
    """Why ``value`` could not be sent on in both encodings (section 11), or None.

    Refused: a float that is not finite, an integer outside INT_MIN..INT_MAX, a string
    with a lone surrogate, bytes or msgpack ext values, a map key that is not a string,
    anything not JSON-like. Iterative (a deeply nested value cannot exhaust the stack).
    """
    stack: list[object] = [value]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        item = pop()
        kind = type(item)
        if kind is str:
            try:
                item.encode()  # type: ignore[attr-defined]
            except UnicodeEncodeError:
                return "a string with a lone surrogate"
        elif kind is dict:
            for key, sub in item.items():  # type: ignore[attr-defined]
                if type(key) is not str:
                    return "a map key that is not a string"
                push(key)
                push(sub)
        elif kind is list or kind is tuple:
            extend(item)  # type: ignore[arg-type]
        elif kind is int:
            if not INT_MIN <= item <= INT_MAX:  # type: ignore[operator]
                return "an integer outside the 64-bit range"
        elif kind is float:
            if not math.isfinite(item):  # type: ignore[arg-type]
                return "a float that is not finite"
        elif item is None or kind is bool:
            pass
        else:
            return f"a value of type {kind.__name__} (binary or extension data)"
    return None


def _str_field(message: Mapping[str, Any], name: str, *, max_len: int = 8192) -> str | Error:
    value = message.get(name)
    if not isinstance(value, str) or not value:
        return Error(ErrorCode.BAD_REQUEST, f"{name} must be a non-empty string")
    if len(value) > max_len:
        return Error(ErrorCode.BAD_REQUEST, f"{name} longer than {max_len} characters")
    return value


def validate_event_name(value: object) -> str | Error:
    if not isinstance(value, str) or not value:
        return Error(ErrorCode.BAD_REQUEST, "event must be a non-empty string")
    if len(value) > MAX_EVENT_LENGTH:
        return Error(ErrorCode.BAD_REQUEST, f"event longer than {MAX_EVENT_LENGTH} characters")
    if value in RESERVED_EVENTS:
        return Error(ErrorCode.BAD_REQUEST, f"event {value!r} is reserved")
    return value


def parse_since(value: object) -> Since | Error | None:
    """``since`` of subscribe / history / connect entries: absent, or ``{epoch, offset}``."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return Error(ErrorCode.BAD_REQUEST, "since must be a map {epoch, offset}")
    epoch, offset = value.get("epoch"), value.get("offset")
    if not isinstance(epoch, str) or len(epoch) > 64:
        return Error(ErrorCode.BAD_REQUEST, "since.epoch must be a string")
    if type(offset) is not int or offset < 0 or offset >= 2**63:
        return Error(ErrorCode.BAD_REQUEST, "since.offset must be an integer >= 0")
    return Since(epoch, offset)


def _parse_channels(value: object) -> tuple[ChannelRequest, ...] | Error:
    if value is None:
        return ()
    if not isinstance(value, list):
        return Error(ErrorCode.BAD_REQUEST, "channels must be a list")
    if len(value) > MAX_CONNECT_CHANNELS:
        return Error(ErrorCode.BAD_REQUEST, f"at most {MAX_CONNECT_CHANNELS} channels")
    out = []
    for i, entry in enumerate(value):
        if not isinstance(entry, dict) or not isinstance(entry.get("channel"), str):
            return Error(ErrorCode.BAD_REQUEST, f"channels[{i}] must be a map with a channel")
        name: str = entry["channel"]
        since = parse_since(entry.get("since"))
        channel = parse_channel(name)
        if isinstance(since, Error):
            out.append(ChannelRequest(name, since))
        else:
            out.append(ChannelRequest(name, channel, since))
    return tuple(out)


def validate_data(value: object) -> dict[str, Any] | Error:
    if value is None:
        return {}
    if not isinstance(value, dict):
        return Error(ErrorCode.BAD_REQUEST, "data must be a map")
    return value


def parse_command(message: Mapping[str, Any]) -> Command | CommandError:
    """A command from a decoded message (whose id is already known to be valid)."""
    cid = message_id(message)
    op = message.get("op")
    if not isinstance(op, str):
        return CommandError(cid, None, Error(ErrorCode.BAD_REQUEST, "op must be a string"))

    def bad(err: Error) -> CommandError:
        return CommandError(cid, op, err)

    if op == Op.PING:
        return Ping(cid)
    if op in (Op.SUBSCRIBE, Op.UNSUBSCRIBE, Op.PUBLISH, Op.HISTORY, Op.PRESENCE):
        channel = parse_channel(message.get("channel"))
        if isinstance(channel, Error):
            return bad(channel)
        if op == Op.UNSUBSCRIBE:
            return Unsubscribe(cid, channel)
        if op == Op.PRESENCE:
            return Presence(cid, channel)
        if op in (Op.SUBSCRIBE, Op.HISTORY):
            since = parse_since(message.get("since"))
            if isinstance(since, Error):
                return bad(since)
            if op == Op.HISTORY:
                limit = message.get("limit", HISTORY_DEFAULT_LIMIT)
                if type(limit) is not int or not 1 <= limit <= HISTORY_MAX_LIMIT:
                    return bad(
                        Error(ErrorCode.BAD_REQUEST, f"limit must be 1 to {HISTORY_MAX_LIMIT}")
                    )
                return History(cid, channel, limit, since)
            presence = message.get("presence", False)
            if not isinstance(presence, bool):
                return bad(Error(ErrorCode.BAD_REQUEST, "presence must be true or false"))
            return Subscribe(cid, channel, since, presence)
        event = validate_event_name(message.get("event"))
        if isinstance(event, Error):
            return bad(event)
        data = validate_data(message.get("data"))
        if isinstance(data, Error):
            return bad(data)
        return Publish(cid, channel, event, data)
    if op in (Op.CONNECT, Op.REFRESH):
        token = _str_field(message, "token")
        if isinstance(token, Error):
            return bad(token)
        if op == Op.REFRESH:
            return Refresh(cid, token)
        client = message.get("client")
        if client is not None and not isinstance(client, dict):
            return bad(Error(ErrorCode.BAD_REQUEST, "client must be a map"))
        channels = _parse_channels(message.get("channels"))
        if isinstance(channels, Error):
            return bad(channels)
        return Connect(cid, token, client, channels)
    return CommandError(cid, op, Error(ErrorCode.NOT_FOUND, f"unknown op {op!r}"))


# --------------------------------------------------------------------------- server messages


def reply(cid: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": cid, "result": result}


def error_reply(cid: int, error: Error) -> dict[str, Any]:
    return {"id": cid, "error": error.to_map()}


def http_error_body(error: Error, fields: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The body of an HTTP error answer (section 6): ``{"error": {code, message, ...}}``."""
    body = error.to_map()
    if fields is not None:
        body["fields"] = fields
    return {"error": body}


def event_message(channel: str, event: str, eid: str, ts: int, data: Any) -> dict[str, Any]:
    """An ``event`` server message (section 4)."""
    return {"type": "event", "channel": channel, "event": event, "id": eid, "ts": ts, "data": data}


def spending_item(event: Mapping[str, Any]) -> dict[str, Any]:
    """The ``batch`` item of a spending ``event`` message: its event, id, ts, data and offset."""
    item = {
        "event": event.get("event"),
        "id": event.get("id"),
        "ts": event.get("ts"),
        "data": event.get("data"),
    }
    if "offset" in event:
        item["offset"] = event["offset"]
    return item


def batch_message(channel: str, ts: int, items: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``batch`` server message of spending items (section 4)."""
    return {"type": "batch", "channel": channel, "ts": ts, "items": items}


def notification_message(
    nid: str, *, priority: str, title: str, body: str, data: Mapping[str, Any], ts: int
) -> dict[str, Any]:
    """A ``notification`` server message (section 4)."""
    return {
        "type": "notification",
        "id": nid,
        "priority": priority,
        "title": title,
        "body": body,
        "data": data,
        "ts": ts,
    }


def presence_message(channel: str, users: int, connections: int, ts: int) -> dict[str, Any]:
    """A ``presence`` server message (section 10)."""
    return {
        "type": "presence",
        "channel": channel,
        "users": users,
        "connections": connections,
        "ts": ts,
    }


def is_spending(event: str) -> bool:
    return event.startswith("spending.")
