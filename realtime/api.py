"""The HTTP API for backend services (section 6) and the operators' endpoints.

Errors are ``{"error": {"code", "message"[, "fields"]}}`` with the contract's
status codes; every handler reads its body through ``read_json`` (413 over the
limit, 400 not JSON) and answers 503 rather than acknowledge what the broker
or the queue did not take.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from notifications.models import Platform
from notifications.requests import DeviceRequest, NotificationRequest
from notifications.service import NotificationService, QueueUnavailable
from realtime.auth import ApiKeys
from realtime.broker import BrokerUnavailable
from realtime.envelope import new_event_id, now_ms, pack_event
from realtime.idempotency import IdempotencyUnavailable
from realtime.node import Node
from realtime.protocol import MAX_EVENT_LENGTH, Error, ErrorCode, parse_channel

MAX_ITEMS = 1000
T = TypeVar("T")


class HttpError(Exception):
    """An HTTP error answer as a value."""

    def __init__(
        self,
        status: int,
        code: ErrorCode,
        message: str,
        *,
        fields: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.fields = fields
        self.retry_after = retry_after

    def response(self) -> JSONResponse:
        body: dict[str, Any] = {"code": self.code.value, "message": self.message}
        if self.fields is not None:
            body["fields"] = self.fields
        headers = {}
        if self.retry_after is not None:
            body["retry_after"] = round(self.retry_after, 3)
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return JSONResponse({"error": body}, status_code=self.status, headers=headers)


def validation_error(exc: ValidationError) -> HttpError:
    fields = [
        {"loc": ".".join(str(part) for part in err["loc"]), "message": err["msg"]}
        for err in exc.errors(include_url=False, include_context=False, include_input=False)
    ]
    return HttpError(422, ErrorCode.BAD_REQUEST, "invalid fields", fields=fields)


async def read_json(request: Request, limit: int) -> Any:
    """The request body as JSON: 413 over ``limit`` bytes, 400 when it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HttpError(413, ErrorCode.LIMIT_EXCEEDED, f"body larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, ErrorCode.LIMIT_EXCEEDED, f"body larger than {limit} bytes")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, ErrorCode.BAD_REQUEST, f"body is not JSON: {exc}") from None


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
        return value


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
    """Handlers of the HTTP API, bound to one node."""

    def __init__(self, node: Node, api_keys: ApiKeys, notifications: NotificationService) -> None:
        self.node = node
        self.api_keys = api_keys
        self.notifications = notifications
        rate = node.settings.publish_rate_per_key
        self.bucket = TokenBucket(rate) if rate else None

    def authorize(self, request: Request) -> str:
        """The presented key (for per-key limits), or 401."""
        header = request.headers.get("authorization")
        if not self.api_keys.check(header):
            raise HttpError(401, ErrorCode.UNAUTHORIZED, "missing or invalid API key")
        assert header is not None
        return header

    def refuse_when_draining(self) -> None:
        if self.node.draining:
            raise HttpError(503, ErrorCode.UNAVAILABLE, "server draining", retry_after=1.0)

    async def publish(self, request: Request) -> Response:
        try:
            key = self.authorize(request)
            self.refuse_when_draining()
            if self.bucket is not None:
                wait = self.bucket.take(key)
                if wait > 0:
                    raise HttpError(
                        429, ErrorCode.RATE_LIMITED, "publish rate exceeded", retry_after=wait
                    )
            body = await read_json(request, self.node.settings.max_body_bytes)
            items = self._items(body)
            ids = await self._publish(items)
        except HttpError as exc:
            return self._answer(request, exc.response())
        return self._answer(request, JSONResponse({"ids": ids}, status_code=202))

    def _items(self, body: Any) -> list[PublishItem]:
        many = isinstance(body, list)
        raw = body if many else [body]
        if many and not raw:
            raise HttpError(
                422,
                ErrorCode.BAD_REQUEST,
                "empty list",
                fields=[{"loc": "", "message": "at least one item"}],
            )
        if len(raw) > MAX_ITEMS:
            raise HttpError(
                422,
                ErrorCode.BAD_REQUEST,
                f"more than {MAX_ITEMS} items",
                fields=[{"loc": "", "message": f"at most {MAX_ITEMS} items"}],
            )
        items: list[PublishItem] = []
        errors: list[dict[str, Any]] = []
        for index, item in enumerate(raw):
            try:
                items.append(PublishItem.model_validate(item))
            except ValidationError as exc:
                for field in validation_error(exc).fields or []:
                    loc = f"{index}.{field['loc']}" if many else field["loc"]
                    errors.append({"loc": loc, "message": field["message"]})
        if errors:
            raise HttpError(422, ErrorCode.BAD_REQUEST, "invalid fields", fields=errors)
        return items

    async def _publish(self, items: list[PublishItem]) -> list[str]:
        node = self.node
        ids = [item.id or new_event_id() for item in items]
        keyed = [i for i, item in enumerate(items) if item.id is not None]
        fresh = [True] * len(items)
        try:
            if keyed:
                claims = await node.idempotency.claim_many(
                    [f"pub:{ids[i]}" for i in keyed], node.settings.idempotency_window
                )
                for i, claimed in zip(keyed, claims, strict=True):
                    fresh[i] = claimed
        except IdempotencyUnavailable:
            raise HttpError(
                503, ErrorCode.UNAVAILABLE, "idempotency store unavailable", retry_after=1.0
            ) from None
        ts = now_ms()
        todo = [i for i in range(len(items)) if fresh[i]]
        node.metrics.duplicates.inc(len(items) - len(todo))
        # All publishes start in order in this tick: a pipelining broker sends them in one write.
        results = await asyncio.gather(
            *(
                node.broker.publish(
                    items[i].channel,
                    pack_event(items[i].channel, items[i].event, ids[i], ts, items[i].data),
                )
                for i in todo
            ),
            return_exceptions=True,
        )
        failed = [
            i for i, result in zip(todo, results, strict=True) if isinstance(result, BaseException)
        ]
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BrokerUnavailable):
                raise result
        if failed:
            unsent = [f"pub:{ids[i]}" for i in failed if items[i].id is not None]
            if unsent:
                try:
                    await node.idempotency.release_many(unsent)
                except IdempotencyUnavailable:
                    pass
            raise HttpError(
                503,
                ErrorCode.UNAVAILABLE,
                f"broker unavailable: {len(todo) - len(failed)} of {len(todo)} published",
                retry_after=1.0,
            )
        node.metrics.published.labels("http").inc(len(todo))
        return ids

    async def notify(self, request: Request) -> Response:
        try:
            self.authorize(request)
            self.refuse_when_draining()
            body = await read_json(request, self.node.settings.max_body_bytes)
            try:
                req = NotificationRequest.model_validate(body)
            except ValidationError as exc:
                raise validation_error(exc) from None
            nid = await self._queue(self.notifications.accept(req))
        except HttpError as exc:
            return self._answer(request, exc.response())
        return self._answer(request, JSONResponse({"id": nid}, status_code=202))

    async def register_device(self, request: Request) -> Response:
        try:
            self.authorize(request)
            body = await read_json(request, self.node.settings.max_body_bytes)
            try:
                req = DeviceRequest.model_validate(body)
            except ValidationError as exc:
                raise validation_error(exc) from None
            await self._queue(self.notifications.register_device(req))
        except HttpError as exc:
            return self._answer(request, exc.response())
        return self._answer(request, Response(status_code=204))

    async def remove_device(self, request: Request) -> Response:
        try:
            self.authorize(request)
            try:
                platform = Platform(request.path_params["platform"])
            except ValueError:
                raise HttpError(404, ErrorCode.NOT_FOUND, "platform is ios or android") from None
            await self._queue(
                self.notifications.remove_device(platform, request.path_params["token"])
            )
        except HttpError as exc:
            return self._answer(request, exc.response())
        return self._answer(request, Response(status_code=204))

    @staticmethod
    async def _queue(call: Awaitable[T]) -> T:
        try:
            return await call
        except QueueUnavailable as exc:
            raise HttpError(
                503,
                ErrorCode.UNAVAILABLE,
                f"notification queue unavailable: {exc}",
                retry_after=1.0,
            ) from None

    def _answer(self, request: Request, response: Response) -> Response:
        route = request.scope.get("route")
        path = getattr(route, "path", request.url.path)
        self.node.metrics.http_requests.labels(path, str(response.status_code)).inc()
        return response

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "node": self.node.node_id})

    async def readyz(self, request: Request) -> Response:
        node = self.node
        checks: dict[str, Any] = {"broker": node.broker.ready, "draining": node.draining}
        ok = node.is_ready()
        for name, check in node.readiness.items():
            checks[name] = result = await check()
            ok = ok and bool(result.get("ok", True))
        return JSONResponse(
            {"status": "ready" if ok else "unavailable", **checks}, status_code=200 if ok else 503
        )

    async def metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
