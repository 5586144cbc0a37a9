"""The HTTP API for backend services (section 6) and the operators' endpoints.

Errors are ``{"error": {"code", "message"[, "fields"]}}`` with the contract's
status codes; every handler reads its body through ``read_json`` (413 over the
limit, 400 not JSON) and answers 503 rather than acknowledge what the broker
or the queue did not take.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from json.encoder import encode_basestring
from typing import Any, Final, NamedTuple, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from notifications.models import Platform
from notifications.requests import DeviceRequest, NotificationRequest
from notifications.service import NotificationService, QueueUnavailable
from realtime.auth import ApiKeys
from realtime.channel_presence import MAX_MEMBERS, ChannelPresenceUnavailable
from realtime.envelope import new_event_id, now_ms, pack_event, unpack_entry
from realtime.history import HistoryUnavailable, Publication, Published
from realtime.node import Node
from realtime.protocol import (
    HISTORY_DEFAULT_LIMIT,
    HISTORY_MAX_LIMIT,
    MAX_EVENT_LENGTH,
    Error,
    ErrorCode,
    http_error_body,
    parse_channel,
    unsendable,
    validate_event_name,
)

log = logging.getLogger("realtime.api")

MAX_ITEMS = 1000
T = TypeVar("T")


class HttpError(Exception):
    """An HTTP error answer as a value, rendered by the app's exception handler."""

    def __init__(
        self,
        status: int,
        error: Error,
        *,
        fields: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error
        self.fields = fields

    def response(self) -> JSONResponse:
        headers = {}
        if self.error.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.error.retry_after)))
        return JSONResponse(
            http_error_body(self.error, self.fields), status_code=self.status, headers=headers
        )


def unavailable(message: str) -> HttpError:
    """503: a store or the broker did not take it; retry in a second."""
    return HttpError(503, Error(ErrorCode.UNAVAILABLE, message, retry_after=1.0))


def invalid(message: str, fields: list[dict[str, Any]]) -> HttpError:
    """422 with the field errors."""
    return HttpError(422, Error(ErrorCode.BAD_REQUEST, message), fields=fields)


def validation_error(exc: ValidationError) -> HttpError:
    fields = [
        {"loc": ".".join(str(part) for part in err["loc"]), "message": err["msg"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return invalid("invalid fields", fields)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 over ``limit`` bytes, 400 when it is not JSON."""
    check_declared(request.headers.get("content-length"), limit)
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    more = True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return parse_json(chunks[0] if len(chunks) == 1 else b"".join(chunks))


def check_declared(declared: str | None, limit: int) -> None:
    """413 when the Content-Length header declares more than ``limit`` bytes."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit)


def parse_json(body: bytes) -> Any:
    """``body`` as JSON: 400 when it is not JSON, 422 when it holds what cannot be sent."""
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise HttpError(400, Error(ErrorCode.BAD_REQUEST, f"body is not JSON: {exc}")) from None
    why = unsendable(parsed)
    if why is not None:  # refused at entry (section 11): never acknowledged, then dropped
        raise invalid(f"the body holds {why}", [{"loc": "", "message": f"{why}: not sendable"}])
    return parsed


def too_large(limit: int) -> HttpError:
    return HttpError(413, Error(ErrorCode.LIMIT_EXCEEDED, f"body larger than {limit} bytes"))


class PublishItem(BaseModel):
    """One event to publish."""

    model_config = ConfigDict(extra="forbid", strict=True)

    channel: str
    event: str = Field(min_length=1, max_length=MAX_EVENT_LENGTH)
    data: dict[str, Any] = Field(default_factory=dict)
    id: str | None = Field(default=None, min_length=1, max_length=128)

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        parsed = parse_channel(value)
        if isinstance(parsed, Error):
            raise ValueError(parsed.message)
        if parsed.namespace == "admin":
            raise ValueError("admin channels are the server's own")
        return value

    @field_validator("event")
    @classmethod
    def _event(cls, value: str) -> str:
        checked = validate_event_name(value)
        if isinstance(checked, Error):
            raise ValueError(checked.message)
        return value


#: PublishItem's field names.
_ITEM_FIELDS: Final = frozenset(PublishItem.model_fields)


class _Item(NamedTuple):
    """A valid publish item (as PublishItem would hold it)."""

    channel: str
    event: str
    data: dict[str, Any]
    id: str | None


def _plain_item(raw: Any) -> _Item | None:
    """``raw`` as an item when it is plainly valid, else None.

    The checks are PublishItem's written out (a parsed JSON body holds exact types): an
    item accepted here is one PublishItem accepts, with the same values. None sends the
    item to PublishItem, whose answer (its field errors included) is the contract's.
    """
    if type(raw) is not dict or not _ITEM_FIELDS.issuperset(raw):
        return None
    channel = raw.get("channel")
    event = raw.get("event")
    if type(channel) is not str or type(event) is not str:
        return None
    data = raw.get("data")
    if data is None:
        if "data" in raw:
            return None
        data = {}
    elif type(data) is not dict:
        return None
    eid = raw.get("id")
    if eid is not None and (type(eid) is not str or not 0 < len(eid) <= 128):
        return None
    parsed = parse_channel(channel)
    if isinstance(parsed, Error) or parsed.namespace == "admin":
        return None
    if isinstance(validate_event_name(event), Error):
        return None
    return _Item(channel, event, data, eid)


class _Json(Response):
    """A JSON answer with JSONResponse's bytes and headers, made without its generality."""

    media_type = "application/json"

    def __init__(self, body: bytes, status_code: int) -> None:
        self.status_code = status_code
        self.background = None
        self.body = body
        self.raw_headers = [
            (b"content-length", b"%d" % len(body)),
            (b"content-type", b"application/json"),
        ]


def _accepted(ids: list[str], offsets: list[int]) -> Response:
    """202 ``{"ids": [...], "offsets": [...]}``, byte for byte what JSONResponse renders."""
    listed = ",".join(map(encode_basestring, ids))
    body = f'{{"ids":[{listed}],"offsets":[{",".join(map(str, offsets))}]}}'
    return _Json(body.encode(), 202)


class TokenBucket:
    """Per-key request rate (requests per second, burst of one second's worth), per node."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.burst = max(1.0, rate)
        self._state: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """0 when allowed, else the seconds until a request would be."""
        now = time.monotonic()
        tokens, last = self._state.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate


class Api:
    """Handlers of the HTTP API, bound to one node. Errors are raised as ``HttpError``."""

    def __init__(self, node: Node, api_keys: ApiKeys, notifications: NotificationService) -> None:
        self.node = node
        self.api_keys = api_keys
        self.notifications = notifications
        self.published = node.metrics.published.labels("http")
        rate = node.settings.publish_rate_per_key
        self.bucket = TokenBucket(rate) if rate else None

    def routes(self) -> list[Route]:
        return [
            Route("/v1/publish", self.publish, methods=["POST"]),
            Route("/v1/notifications", self.notify, methods=["POST"]),
            Route("/v1/devices", self.register_device, methods=["POST"]),
            Route("/v1/devices/{platform}/{token:path}", self.remove_device, methods=["DELETE"]),
            Route("/v1/history/{channel}", self.history, methods=["GET"]),
            Route("/v1/presence/{channel}", self.presence, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics, methods=["GET"]),
        ]

    def authorize(self, request: Request) -> str:
        """The presented key's name (``key<index>``, for per-key limits), or 401."""
        return self._key(request.headers.get("authorization"))

    def _key(self, authorization: str | None) -> str:
        index = self.api_keys.match(authorization)
        if index is None:
            raise HttpError(401, Error(ErrorCode.UNAUTHORIZED, "missing or invalid API key"))
        return f"key{index}"

    def refuse_when_draining(self) -> None:
        if self.node.draining:
            raise unavailable("server draining")

    async def publish(self, request: Request) -> Response:
        self.admit_publish(request.headers.get("authorization"))
        return await self.publish_parsed(
            await read_json(request, self.node.settings.max_body_bytes)
        )

    def admit_publish(self, authorization: str | None) -> None:
        """A publish's checks on its head, in this order: 401, 503 draining, 429."""
        key = self._key(authorization)
        self.refuse_when_draining()
        if self.bucket is not None:
            wait = self.bucket.take(key)
            if wait > 0:
                raise HttpError(
                    429,
                    Error(ErrorCode.RATE_LIMITED, "publish rate exceeded", retry_after=wait),
                )

    async def publish_parsed(self, body: Any) -> Response:
        """A publish's answer once its head was admitted and its body parsed (422, 503, 202)."""
        ids, offsets = await self._publish(self._items(body))
        return _accepted(ids, offsets)

    async def history(self, request: Request) -> Response:
        """``GET /v1/history/{channel}?limit=&since_offset=&epoch=``: like the history op,
        unfiltered (section 9)."""
        self.authorize(request)
        channel = parse_channel(request.path_params["channel"])
        if isinstance(channel, Error):
            raise HttpError(422, channel, fields=[{"loc": "channel", "message": channel.message}])
        query = request.query_params
        limit = _int_param(query, "limit", HISTORY_DEFAULT_LIMIT, 1, HISTORY_MAX_LIMIT)
        assert limit is not None
        since = _int_param(query, "since_offset", None, 0, 2**63 - 1)
        epoch = query.get("epoch")
        try:
            page = await self.node.history.read(channel.name, since, limit)
        except HistoryUnavailable:
            raise unavailable("history unavailable") from None
        position = page.position
        entries = page.entries if epoch is None or epoch == position.epoch else []
        publications = []
        for entry in entries:
            delivery = unpack_entry(entry.offset, position.epoch, entry.payload)
            if delivery is not None:
                publications.append(delivery.message)
        return JSONResponse(
            {"epoch": position.epoch, "offset": position.offset, "publications": publications}
        )

    def _items(self, body: Any) -> list[_Item]:
        many = isinstance(body, list)
        raw = body if many else [body]
        if many and not raw:
            raise invalid("empty list", [{"loc": "", "message": "at least one item"}])
        if len(raw) > MAX_ITEMS:
            raise invalid(
                f"more than {MAX_ITEMS} items",
                [{"loc": "", "message": f"at most {MAX_ITEMS} items"}],
            )
        items: list[_Item] = []
        errors: list[dict[str, Any]] = []
        for index, raw_item in enumerate(raw):
            item = _plain_item(raw_item)
            if item is not None:
                items.append(item)
                continue
            try:
                model = PublishItem.model_validate(raw_item)
            except ValidationError as exc:
                for field in validation_error(exc).fields or []:
                    loc = f"{index}.{field['loc']}" if many else field["loc"]
                    errors.append({"loc": loc, "message": field["message"]})
                continue
            items.append(_Item(model.channel, model.event, model.data, model.id))
        if errors:
            raise invalid("invalid fields", errors)
        return items

    async def _publish(self, items: list[_Item]) -> tuple[list[str], list[int]]:
        """Publish every item through the history (ids, offsets); 503 naming how many were
        published when some could not be (a retry with the same ids publishes the rest)."""
        node = self.node
        ids = [item.id or new_event_id() for item in items]
        ts = now_ms()
        policy = node.policy
        outcomes = await node.history.publish(
            [
                Publication(
                    item.channel,
                    pack_event(item.channel, item.event, eid, ts, item.data),
                    policy.history_of(item.channel.partition(":")[0]),
                    key=item.id,
                )
                for item, eid in zip(items, ids, strict=True)
            ]
        )
        published = [o for o in outcomes if isinstance(o, Published)]
        duplicates = sum(1 for o in published if o.duplicate)
        if duplicates:
            node.metrics.duplicates.inc(duplicates)
        self.published.inc(len(published) - duplicates)
        if len(published) < len(items):
            raise unavailable(f"history unavailable: {len(published)} of {len(items)} published")
        return ids, [o.offset for o in published]

    async def notify(self, request: Request) -> Response:
        self.authorize(request)
        self.refuse_when_draining()
        body = await read_json(request, self.node.settings.max_body_bytes)
        req = _validate(NotificationRequest, body)
        nid = await self._queue(self.notifications.accept(req))
        return JSONResponse({"id": nid}, status_code=202)

    async def register_device(self, request: Request) -> Response:
        self.authorize(request)
        body = await read_json(request, self.node.settings.max_body_bytes)
        await self._queue(self.notifications.register_device(_validate(DeviceRequest, body)))
        return Response(status_code=204)

    async def remove_device(self, request: Request) -> Response:
        self.authorize(request)
        try:
            platform = Platform(request.path_params["platform"])
        except ValueError:
            raise HttpError(404, Error(ErrorCode.NOT_FOUND, "platform is ios or android")) from None
        await self._queue(self.notifications.remove_device(platform, request.path_params["token"]))
        return Response(status_code=204)

    @staticmethod
    async def _queue(call: Awaitable[T]) -> T:
        try:
            return await call
        except QueueUnavailable as exc:
            raise unavailable(f"notification queue unavailable: {exc}") from None

    async def presence(self, request: Request) -> Response:
        """``GET /v1/presence/{channel}[?members=1]``: counts across nodes, with
        ``members=1`` the user ids too (at most MAX_MEMBERS, else 422)."""
        self.authorize(request)
        channel = parse_channel(request.path_params["channel"])
        if isinstance(channel, Error):
            raise HttpError(422, channel, fields=[{"loc": "channel", "message": channel.message}])
        presence = self.node.board.presence
        try:
            counts = await presence.counts(channel.name)
            body: dict[str, Any] = {"users": counts.users, "connections": counts.connections}
            if request.query_params.get("members") in ("1", "true"):
                members = await presence.members(channel.name, MAX_MEMBERS)
                if members is None:
                    message = f"more than {MAX_MEMBERS} members: ask for counts only"
                    raise invalid(message, [{"loc": "members", "message": message}])
                body["user_ids"] = members
        except ChannelPresenceUnavailable:
            raise unavailable("presence unavailable") from None
        return JSONResponse(body)

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: Request) -> Response:
        node = self.node
        checks: dict[str, Any] = {"broker": node.broker.ready, "draining": node.draining}
        ok = node.is_ready()
        names = list(node.readiness)
        # All checks at once, each bounded: the answer comes within a second whatever a
        # backend does (a stalled Redis makes its check "timeout", not the probe hang).
        results = await asyncio.gather(*(_bounded(node.readiness[n]) for n in names))
        for name, result in zip(names, results, strict=True):
            checks[name] = result
            ok = ok and bool(result.get("ok", True))
        return JSONResponse(
            {"status": "ready" if ok else "unavailable", **checks}, status_code=200 if ok else 503
        )

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.node.metrics.registry), media_type=CONTENT_TYPE_LATEST)


M = TypeVar("M", bound=BaseModel)
#: Seconds a readiness check may take before it counts as failed.
READINESS_TIMEOUT = 0.8


async def _bounded(check: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    try:
        async with asyncio.timeout(READINESS_TIMEOUT):
            return await check()
    except TimeoutError:
        return {"ok": False, "error": f"no answer within {READINESS_TIMEOUT} s"}


def _int_param(
    query: Mapping[str, str], name: str, default: int | None, low: int, high: int
) -> int | None:
    """An integer query parameter within ``[low, high]``, or 422 naming it."""
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        message = f"{name} must be an integer from {low} to {high}"
        raise invalid("invalid query", [{"loc": name, "message": message}])
    return value


def _validate(model: type[M], body: Any) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


async def render_http_error(request: Request, exc: Exception) -> Response:
    """Starlette's exception handler for ``HttpError``."""
    assert isinstance(exc, HttpError)
    return exc.response()


async def render_starlette_error(request: Request, exc: Exception) -> Response:
    """Starlette's own HTTP errors (404 no route, 405 wrong method) in the contract's shape."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = Error(ErrorCode.NOT_FOUND, "not found")
    else:
        error = Error(ErrorCode.BAD_REQUEST, str(exc.detail))
    return JSONResponse(http_error_body(error), status_code=exc.status_code, headers=exc.headers)


async def render_internal_error(request: Request, exc: Exception) -> Response:
    """An unexpected exception: logged with its traceback, answered 500 ``internal``."""
    return internal_error(request.url.path, exc)


def internal_error(path: str, exc: Exception) -> Response:
    """The answer to an unexpected exception on ``path``, logged with its traceback."""
    log.error("unhandled error on %s", path, exc_info=exc)
    return JSONResponse(
        http_error_body(Error(ErrorCode.INTERNAL, "internal error")), status_code=500
    )


class AnswerCounts:
    """``http_requests`` of the routes served without Starlette's router, by path and status
    (each child made once)."""

    def __init__(self, requests: Counter) -> None:
        self._requests = requests
        self._children: dict[tuple[str, int], Counter] = {}

    def count(self, path: str, response: Response) -> Response:
        """``response``, counted as the answer to a request of ``path``."""
        key = (path, response.status_code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._requests.labels(path, str(key[1]))
        child.inc()
        return response


#: The lifespan state's key of the ``DirectPublish`` (handed by uvicorn to its protocols).
DIRECT_PUBLISH_STATE: Final = "piggybong.direct_publish"


class DirectPublish:
    """``POST /v1/publish`` for the HTTP protocol's own path (realtime/httpprotocol.py): the
    checks, answers and counts of ``Api.publish`` behind ASGI, asked for with the head's
    headers (``head``), then with the whole body (``body``)."""

    path: Final = "/v1/publish"

    def __init__(self, api: Api, answers: AnswerCounts) -> None:
        self._api = api
        self._answers = answers
        #: the largest body (413 beyond)
        self.limit: int = api.node.settings.max_body_bytes

    def head(self, headers: Sequence[tuple[bytes, bytes]]) -> Response | None:
        """The answer the head alone earns (401, 503 draining, 429, 413 declared), counted;
        None: read the body. ``headers``: lower-case names, as uvicorn's scope has them."""
        authorization = declared = None
        for name, value in headers:  # the first of each, as Starlette's Headers.get
            if name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"content-length" and declared is None:
                declared = value.decode("latin-1")
        try:
            self._api.admit_publish(authorization)
            check_declared(declared, self.limit)
        except HttpError as exc:
            return self._answers.count(self.path, exc.response())
        except Exception as exc:
            return self._answers.count(self.path, internal_error(self.path, exc))
        return None

    def too_large(self) -> Response:
        """413: the body grew past ``limit``; counted."""
        return self._answers.count(self.path, too_large(self.limit).response())

    async def body(self, body: bytes) -> Response:
        """The answer to an admitted publish of ``body``, counted."""
        try:
            response = await self._api.publish_parsed(parse_json(body))
        except HttpError as exc:
            response = exc.response()
        except Exception as exc:
            response = internal_error(self.path, exc)
        return self._answers.count(self.path, response)


#: The app's exception handlers: every error answer has the contract's shape.
EXCEPTION_HANDLERS: dict[Any, Any] = {
    HttpError: render_http_error,
    HTTPException: render_starlette_error,
    Exception: render_internal_error,
}
