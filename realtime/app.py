"""The app factory: the one place that wires settings, broker, stores, hub and API together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from notifications.apns import ApnsAdapter
from notifications.breaker import CircuitBreaker
from notifications.fcm import FcmAdapter
from notifications.memory_store import MemoryNotificationStore
from notifications.metrics import NotificationMetrics
from notifications.models import Notification, Platform, Priority
from notifications.push import LogAdapter, PushAdapter, WebhookAdapter
from notifications.redis_store import RedisNotificationStore
from notifications.router import NotificationRouter
from notifications.service import NotificationService
from notifications.store import NotificationStore
from realtime.api import Api
from realtime.auth import ApiKeys, Authenticator
from realtime.broker import Broker, MemoryBroker
from realtime.connection import Connection, close_expired, flush_due_batches
from realtime.envelope import pack_notification
from realtime.gcfreeze import GcFreezer
from realtime.hub import Hub
from realtime.idempotency import IdempotencyStore, MemoryIdempotencyStore
from realtime.metrics import Metrics
from realtime.metricsport import MetricsPort
from realtime.node import Node, make_log_throttle
from realtime.presence import ConnectionRegistry, MemoryConnectionRegistry
from realtime.protocol import ErrorCode, choose_codec, notification_message
from realtime.ratelimit import MemoryRateLimiter, RateLimiter
from realtime.settings import NOTIFICATION_LEASE_TIMEOUT, Settings
from realtime.tiers import load_policy
from realtime.timers import Timers
from realtime.writer import FlushQueue, OutboxLimits
from realtime.wsprotocol import EXTENSION, WS_LOG

log = logging.getLogger("realtime")

#: The WebSocket endpoint's path (protocol-v1).
WS_PATH = "/v1/ws"

#: Seconds between presence heartbeats (entries of a dead node expire after 3 of them).
HEARTBEAT_INTERVAL = 30.0


class WebSocketEndpoint:
    """ASGI endpoint of ``/v1/ws``: subprotocol choice and handshake, then a Connection."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        node: Node = scope["app"].state.node
        websocket = WebSocket(scope, receive, send)
        choice = choose_codec(list(scope.get("subprotocols", [])))
        if choice is None:
            await websocket.send_denial_response(
                _error(
                    400,
                    ErrorCode.BAD_REQUEST,
                    "unsupported subprotocol: offer piggybong.v1.json or piggybong.v1.msgpack",
                )
            )
            return
        wire = scope.get("extensions", {}).get(EXTENSION)
        if wire is None:
            await websocket.send_denial_response(
                _error(
                    500, ErrorCode.INTERNAL, "server runs without the realtime WebSocket protocol"
                )
            )
            return
        if node.draining:
            await websocket.send_denial_response(
                _error(503, ErrorCode.UNAVAILABLE, "server draining")
            )
            return
        codec, accepted = choice
        await websocket.accept(subprotocol=accepted)
        client = scope.get("client") or ("?", 0)
        await Connection(node, wire, receive, codec, str(client[0])).run()


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code.value, "message": message}}, status_code=status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = ErrorCode.NOT_FOUND if exc.status_code == 404 else ErrorCode.BAD_REQUEST
    message = "not found" if exc.status_code == 404 else str(exc.detail)
    return _error(exc.status_code, code, message)


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled error on %s", request.url.path, exc_info=exc)
    return _error(500, ErrorCode.INTERNAL, "internal error")


def _redis_parts(
    url: str, metrics: Metrics
) -> tuple[Broker, IdempotencyStore, ConnectionRegistry, RateLimiter]:
    from realtime.redis_broker import RedisBroker
    from realtime.redis_idempotency import RedisIdempotencyStore
    from realtime.redis_presence import RedisConnectionRegistry
    from realtime.redis_ratelimit import RedisRateLimiter

    return (
        RedisBroker(url, on_reconnect=metrics.broker_reconnects.inc),
        RedisIdempotencyStore(url),
        RedisConnectionRegistry(url),
        RedisRateLimiter(url),
    )


def _adapters(settings: Settings) -> dict[Platform, PushAdapter]:
    """The push adapter per platform: the provider when configured, else webhook, else log."""
    ca = str(settings.push_ca_bundle) if settings.push_ca_bundle else None
    fallback: PushAdapter = (
        WebhookAdapter(settings.push_webhook_url, timeout=settings.push_timeout, ca_bundle=ca)
        if settings.push_webhook_url
        else LogAdapter()
    )
    adapters: dict[Platform, PushAdapter] = {Platform.IOS: fallback, Platform.ANDROID: fallback}
    if settings.apns_configured:
        assert settings.apns_key_file and settings.apns_key_id and settings.apns_team_id
        assert settings.apns_topic
        adapters[Platform.IOS] = ApnsAdapter(
            key_pem=settings.apns_key_file.read_bytes(),
            key_id=settings.apns_key_id,
            team_id=settings.apns_team_id,
            topic=settings.apns_topic,
            endpoint=settings.apns_endpoint,
            ca_bundle=ca,
            timeout=settings.push_timeout,
        )
    if settings.fcm_service_account:
        adapters[Platform.ANDROID] = FcmAdapter(
            service_account=json.loads(settings.fcm_service_account.read_text()),
            endpoint=settings.fcm_endpoint,
            ca_bundle=ca,
            timeout=settings.push_timeout,
        )
    return adapters


def create_app(settings: Settings | None = None) -> RealtimeApp:
    """Build the server app. Without a Redis URL: in-process broker and stores (one node)."""
    settings = settings or Settings()
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    metrics = Metrics(registry)
    freezer = GcFreezer(settings.gc_freeze_interval, settings.gc_full_interval, registry)
    policy = load_policy(settings.tier_policy)
    public_key = settings.jwt_public_key.read_bytes() if settings.jwt_public_key else None
    auth = Authenticator(
        secret=settings.effective_jwt_secret,
        public_key_pem=public_key,
        audiences=settings.jwt_audiences,
        leeway=settings.jwt_leeway,
        blocked_users=settings.blocked_users,
    )
    api_keys = ApiKeys(settings.effective_api_keys)
    node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"

    broker: Broker
    idempotency: IdempotencyStore
    presence: ConnectionRegistry
    limiter: RateLimiter
    if settings.redis_url:
        broker, idempotency, presence, limiter = _redis_parts(settings.redis_url, metrics)
    else:
        broker, idempotency = MemoryBroker(), MemoryIdempotencyStore()
        presence, limiter = MemoryConnectionRegistry(), MemoryRateLimiter()

    notification_metrics = NotificationMetrics(registry)
    store: NotificationStore
    if settings.redis_url:  # from_url's options go to RedisNotificationStore.__init__
        store = RedisNotificationStore.from_url(
            settings.redis_url,
            max_depth=settings.notification_queue_max,
            lease_timeout=NOTIFICATION_LEASE_TIMEOUT,
            max_deliveries=settings.notification_max_deliveries,
            consumer_idle_timeout=settings.notification_consumer_idle_timeout,
            on_dead_letter=notification_metrics.count_dead_letter,
        )
    else:
        store = MemoryNotificationStore(
            max_depth=settings.notification_queue_max,
            lease_timeout=NOTIFICATION_LEASE_TIMEOUT,
            max_deliveries=settings.notification_max_deliveries,
            on_dead_letter=notification_metrics.count_dead_letter,
        )
    service = NotificationService(
        store, metrics=notification_metrics, idempotency_window=settings.idempotency_window
    )

    async def deliver_in_app(n: Notification) -> None:
        message = notification_message(
            n.id,
            priority=n.priority.value,
            title=n.title,
            body=n.body,
            data=n.data,
            ts=int(n.created_at * 1000),
        )
        await broker.publish(f"user:{n.user}", pack_notification(message))

    async def push_allowed(user: str, priority: Priority) -> bool:
        tier, _ = policy.resolve(await presence.tier_of(user) or policy.default_tier)
        return priority.value in tier.push_priorities

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        hub = Hub(broker, policy, metrics)
        adapters = _adapters(settings)
        # One breaker per adapter (a webhook serving both platforms has one), named as it is.
        by_adapter = {
            id(adapter): CircuitBreaker(
                name=adapter.name,
                clock=time.time,
                credentials_cooldown=settings.push_credentials_cooldown,
                on_transition=notification_metrics.breaker_transition,
            )
            for adapter in adapters.values()
        }
        breakers = {platform: by_adapter[id(adapter)] for platform, adapter in adapters.items()}
        router = NotificationRouter(
            store,
            adapters,
            breakers,
            deliver_in_app,
            push_allowed,
            notification_metrics,
            concurrency=settings.notification_concurrency,
            max_attempts=settings.notification_max_attempts,
        )
        node = Node(
            node_id=node_id,
            settings=settings,
            broker=broker,
            hub=hub,
            auth=auth,
            policy=policy,
            limiter=limiter,
            presence=presence,
            idempotency=idempotency,
            metrics=metrics,
            flushes=FlushQueue(),
            outbox_limits=OutboxLimits(settings.outbox_max_messages, settings.outbox_max_bytes),
            batch_timers=Timers(flush_due_batches),
            expiry_timers=Timers(close_expired, clock=time.time),
            log_throttle=make_log_throttle(settings.log_interval),
        )

        async def notifications_ready() -> dict[str, Any]:
            try:
                ok = await service.ready()
            except Exception:
                ok = False
            return {"ok": ok, "breakers": {b.name: b.state.value for b in by_adapter.values()}}

        node.readiness["notifications"] = notifications_ready
        app.state.node = node
        app.state.api = Api(node, api_keys, service)
        metrics.open_connections.set_function(lambda: len(node.connections))
        metrics.channels.set_function(lambda: len(hub.channels))
        metrics.queued_bytes.set_function(
            lambda: sum(c.writer.outbox_bytes for c in node.connections)
        )
        if settings.log_level != "debug":
            WS_LOG.setLevel(logging.WARNING)
        metrics_port = None
        if settings.metrics_port is not None:  # first: a taken port stops the start cleanly
            metrics_port = MetricsPort(registry, settings.host, settings.metrics_port)
            await metrics_port.start()
            log.info("metrics on %s:%d", settings.host, metrics_port.port)
        await broker.start(hub.on_message)
        await router.start()
        housekeeping = asyncio.create_task(_housekeeping(node), name="housekeeping")
        freezer.start()
        log.info("node %s ready (%s broker)", node_id, "redis" if settings.redis_url else "memory")
        try:
            yield
        finally:
            node.draining = True
            housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await housekeeping
            await freezer.close()
            if metrics_port is not None:
                await metrics_port.close()
            node.batch_timers.close()
            node.expiry_timers.close()
            await router.close()
            for adapter in set(adapters.values()):
                await adapter.close()
            await store.close()
            for part in (broker, idempotency, presence, limiter):
                await part.close()

    def handler(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            result: Response = await getattr(request.app.state.api, name)(request)
            return result

        endpoint.__name__ = name
        return endpoint

    routes = [
        Route("/v1/publish", handler("publish"), methods=["POST"]),
        Route("/v1/notifications", handler("notify"), methods=["POST"]),
        Route("/v1/devices", handler("register_device"), methods=["POST"]),
        Route("/v1/devices/{platform}/{token:path}", handler("remove_device"), methods=["DELETE"]),
        Route("/healthz", handler("healthz"), methods=["GET"]),
        Route("/readyz", handler("readyz"), methods=["GET"]),
        Route("/metrics", handler("metrics"), methods=["GET"]),
    ]
    return RealtimeApp(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error, Exception: _internal_error},
    )


class RealtimeApp(Starlette):
    """The Starlette app, with ``/v1/ws`` sessions handed straight to their endpoint.

    A WebSocket session lasts as long as the connection, and every ASGI layer it
    passes through (error and exception middleware, router, route) keeps a
    coroutine frame alive for it: about 2 KB per idle connection. Those layers do
    nothing for this route (the endpoint answers its own errors and never raises
    ``WebSocketException``), so ``/v1/ws`` skips them; every other request, and a
    WebSocket to any other path, goes through Starlette unchanged.
    """

    ws_endpoint = WebSocketEndpoint()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await self.ws_endpoint(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


async def _housekeeping(node: Node) -> None:
    """Presence heartbeats for this node's connections (entries of a dead node expire)."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        entries = [(c.user, c.conn_id) for c in node.connections if c.registered]
        try:
            await node.presence.refresh(entries)
        except Exception as exc:  # the store is down: the next beat tries again
            log.warning("presence heartbeat failed: %s", exc)
