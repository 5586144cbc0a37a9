"""The wire contract (protocol-v1), sans I/O.

Client commands are parsed from bytes into typed values; server messages are
built as maps and encoded once per codec into complete, unmasked WebSocket
frames, so the same bytes can be written to every subscriber.
"""

from __future__ import annotations

import json
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


_json_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)


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
NAMESPACES: Final = ("user", "artist", "premium")
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


@dataclass(frozen=True, slots=True)
class Connect:
    id: int
    token: str
    client: dict[str, Any] | None = None
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


Command = Connect | Refresh | Subscribe | Unsubscribe | Publish | Ping


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


def message_id(message: Mapping[str, Any]) -> int:
    """The message's ``id``, or ProtocolViolation (close 4000) when it has no valid one."""
    value = message.get("id")
    if type(value) is not int or value < 1:
        raise ProtocolViolation("a message needs an integer id >= 1")
    return value


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
    return value


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
    if op in (Op.SUBSCRIBE, Op.UNSUBSCRIBE, Op.PUBLISH):
        channel = parse_channel(message.get("channel"))
        if isinstance(channel, Error):
            return bad(channel)
        if op == Op.SUBSCRIBE:
            return Subscribe(cid, channel)
        if op == Op.UNSUBSCRIBE:
            return Unsubscribe(cid, channel)
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
        return Connect(cid, token, client)
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
    """The ``batch`` item of a spending ``event`` message: its event, id, ts and data."""
    return {
        "event": event.get("event"),
        "id": event.get("id"),
        "ts": event.get("ts"),
        "data": event.get("data"),
    }


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


def is_spending(event: str) -> bool:
    return event.startswith("spending.")
