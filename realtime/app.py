"""The app factory: the one place that wires settings, broker, stores, hub and API together."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket

import realtime
from notifications.apns import ApnsAdapter
from notifications.breaker import BreakerState, CircuitBreaker
from notifications.fcm import FcmAdapter
from notifications.memory_store import MemoryNotificationStore
from notifications.metrics import NotificationMetrics
from notifications.models import Notification, Platform, Priority
from notifications.push import LogAdapter, PushAdapter, WebhookAdapter
from notifications.redis_store import RedisNotificationStore
from notifications.router import NotificationRouter, log_breaker_transition
from notifications.service import NotificationService
from notifications.store import NotificationStore
from realtime.api import (
    DIRECT_PUBLISH_STATE,
    EXCEPTION_HANDLERS,
    AnswerCounts,
    Api,
    DirectPublish,
    HttpError,
    render_internal_error,
)
from realtime.auth import ApiKeys, Authenticator
from realtime.broker import Broker, MemoryBroker
from realtime.channel_presence import ChannelPresence, MemoryChannelPresence
from realtime.connection import Connection, close_expired, flush_due_batches
from realtime.dashboard import ADMIN_CHANNEL, BACKFILL_MAX, AdminTokens, Dashboard, StatsFeed
from realtime.door import DOOR_STATE, Door, Why
from realtime.envelope import pack_notification
from realtime.gcfreeze import GcFreezer
from realtime.history import History, MemoryHistory
from realtime.hub import BROKER_LINGER, POSITION_CHECK_INTERVAL, Hub
from realtime.metrics import Metrics
from realtime.metricsport import MetricsPort
from realtime.node import Node, make_log_throttle
from realtime.presence import ConnectionRegistry, MemoryConnectionRegistry
from realtime.presence_board import PresenceBoard
from realtime.protocol import (
    Error,
    ErrorCode,
    choose_codec,
    http_error_body,
    notification_message,
)
from realtime.ratelimit import MemoryRateLimiter, RateLimiter
from realtime.redis_client import RedisTarget, redis_client
from realtime.redis_persistence import PersistenceCheck
from realtime.settings import NOTIFICATION_LEASE_TIMEOUT, Settings
from realtime.stats import StatsSampler
from realtime.tiers import load_policy
from realtime.timers import Timers
from realtime.writer import DIRECT_MAX, FlushQueue, OutboxLimits
from realtime.wsprotocol import EXTENSION

log = logging.getLogger("realtime")

#: The WebSocket endpoint's path (protocol-v1).
WS_PATH = "/v1/ws"
Endpoint = Callable[[Request], Awaitable[Response]]
#: HTTP requests under this prefix are counted in ``http_requests`` (the backend's API).
API_PREFIX = "/v1/"

#: Seconds between presence heartbeats (entries of a dead node expire after about 3 of them).
HEARTBEAT_INTERVAL = 6.0


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
        client = str((scope.get("client") or ("?", 0))[0])
        door = node.door
        if door is not None and not door.origin_allowed(websocket.headers.get("origin")):
            door.count(Why.ORIGIN, "ws", client)
            await websocket.send_denial_response(
                _error(403, ErrorCode.FORBIDDEN, "origin not allowed")
            )
            return
        codec, accepted = choice
        await websocket.accept(subprotocol=accepted)
        # Not kept alive in this frame for the connection's life: its cached headers hold the
        # handshake's header list (per-connection memory of an idle connection).
        del websocket
        await Connection(node, wire, receive, codec, client).run()


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse(http_error_body(Error(code, message)), status_code=status)


def _redis_parts(
    url: RedisTarget, metrics: Metrics
) -> tuple[Broker, ConnectionRegistry, RateLimiter]:
    from realtime.redis_broker import RedisBroker
    from realtime.redis_cluster_broker import RedisClusterBroker
    from realtime.redis_presence import RedisConnectionRegistry
    from realtime.redis_ratelimit import RedisRateLimiter

    on_reconnect = metrics.broker_reconnects.inc
    broker: RedisBroker | RedisClusterBroker = (
        RedisClusterBroker(url, on_reconnect=on_reconnect)
        if url.is_cluster
        else RedisBroker(url, on_reconnect=on_reconnect)
    )
    # The limiter's script on the broker's pipelined connection: a resume's hit and its
    # history read share a write and a wake-up (realtime/connection.py, ``_resume``).
    return broker, RedisConnectionRegistry(url), RedisRateLimiter(url, broker=broker)


def _memory_parts() -> tuple[Broker, ConnectionRegistry, RateLimiter]:
    return (
        MemoryBroker(),
        MemoryConnectionRegistry(),
        MemoryRateLimiter(),
    )


def _channel_presence(settings: Settings) -> ChannelPresence:
    if settings.uses_redis:
        from realtime.redis_channel_presence import RedisChannelPresence

        return RedisChannelPresence(settings.redis_target)
    return MemoryChannelPresence()


def _history(settings: Settings, broker: Broker) -> History:
    if settings.uses_redis:
        from realtime.redis_broker import RedisBroker
        from realtime.redis_cluster_broker import RedisClusterBroker
        from realtime.redis_history import RedisHistory

        assert isinstance(broker, RedisBroker | RedisClusterBroker)
        return RedisHistory(broker, result_ttl=settings.idempotency_window)
    assert isinstance(broker, MemoryBroker)
    return MemoryHistory(broker.deliver, result_ttl=settings.idempotency_window)


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


def _notification_store(settings: Settings, metrics: NotificationMetrics) -> NotificationStore:
    if settings.uses_redis:
        client = redis_client(
            settings.redis_target, blocking=False, **RedisNotificationStore.client_options()
        )
        return RedisNotificationStore(
            client,
            owns_client=True,
            wait_replicas=settings.notification_wait_replicas,
            wait_timeout=settings.notification_wait_timeout,
            max_depth=settings.notification_queue_max,
            lease_timeout=NOTIFICATION_LEASE_TIMEOUT,
            max_deliveries=settings.notification_max_deliveries,
            consumer_idle_timeout=settings.notification_consumer_idle_timeout,
            on_dead_letter=metrics.count_dead_letter,
        )
    return MemoryNotificationStore(
        max_depth=settings.notification_queue_max,
        lease_timeout=NOTIFICATION_LEASE_TIMEOUT,
        max_deliveries=settings.notification_max_deliveries,
        on_dead_letter=metrics.count_dead_letter,
    )


def _breakers(
    settings: Settings, adapters: dict[Platform, PushAdapter], metrics: NotificationMetrics
) -> dict[Platform, CircuitBreaker]:
    """One breaker per adapter (a webhook serving both platforms has one), named as it is."""
    by_adapter = {
        id(adapter): _breaker(adapter.name, settings, metrics) for adapter in adapters.values()
    }
    return {platform: by_adapter[id(adapter)] for platform, adapter in adapters.items()}


def _breaker(name: str, settings: Settings, metrics: NotificationMetrics) -> CircuitBreaker:
    """The breaker of the push adapter ``name``: its transitions are counted and logged."""

    def on_transition(adapter: str, old: BreakerState, new: BreakerState) -> None:
        metrics.breaker_transition(adapter, old, new)
        log_breaker_transition(breaker, old, new)

    breaker = CircuitBreaker(
        name=name,
        clock=time.time,
        credentials_cooldown=settings.push_credentials_cooldown,
        on_transition=on_transition,
    )
    return breaker


def create_app(settings: Settings | None = None) -> RealtimeApp:
    """Build the server app. Without a Redis URL: in-process broker and stores (one node).

    Everything is built here, in dependency order; the lifespan only starts the parts
    with background work and closes everything in reverse.
    """
    settings = settings or Settings()
    registry = CollectorRegistry()
    for collector in (ProcessCollector, PlatformCollector, GCCollector):
        collector(registry=registry)
    metrics = Metrics(registry)
    notification_metrics = NotificationMetrics(registry)
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
    broker, presence, limiter = (
        _redis_parts(settings.redis_target, metrics) if settings.uses_redis else _memory_parts()
    )
    history = _history(settings, broker)
    connections: set[Connection] = set()
    board = PresenceBoard(
        _channel_presence(settings),
        broker,
        lambda: [m for conn in connections if not conn.closed for m in conn.members()],
    )
    flushes = FlushQueue(direct_max=DIRECT_MAX)
    hub = Hub(
        broker,
        history,
        policy,
        metrics,
        check_interval=POSITION_CHECK_INTERVAL if settings.uses_redis else None,
        flushes=flushes,
        linger=BROKER_LINGER if settings.uses_redis else 0.0,
    )
    node = Node(
        node_id=settings.node_id or f"{socket.gethostname()}-{os.getpid()}",
        settings=settings,
        broker=broker,
        history=history,
        hub=hub,
        auth=auth,
        policy=policy,
        limiter=limiter,
        presence=presence,
        board=board,
        metrics=metrics,
        flushes=flushes,
        outbox_limits=OutboxLimits(
            settings.outbox_max_messages, settings.outbox_max_bytes, settings.close_timeout
        ),
        batch_timers=Timers(flush_due_batches),
        expiry_timers=Timers(close_expired, clock=time.time),
        log_throttle=make_log_throttle(settings.log_interval),
        connections=connections,
        door=Door.from_settings(settings, metrics),
    )
    store = _notification_store(settings, notification_metrics)
    service = NotificationService(
        store, metrics=notification_metrics, idempotency_window=settings.idempotency_window
    )
    adapters = _adapters(settings)
    breakers = _breakers(settings, adapters, notification_metrics)

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

    async def notifications_ready() -> dict[str, Any]:
        try:
            ok = await service.ready()
        except Exception:
            ok = False
        states = {b.name: b.state.value for b in breakers.values()}
        return {"ok": ok, "breakers": states}

    node.readiness["notifications"] = notifications_ready
    persistence = PersistenceCheck(settings.redis_target) if settings.uses_redis else None
    if persistence is not None:
        node.readiness["redis_persistence"] = persistence.readiness
    api = Api(node, ApiKeys(settings.effective_api_keys), service)
    answers = AnswerCounts(metrics.http_requests)
    direct_publish = DirectPublish(api, answers)
    admin_token = settings.effective_admin_token
    node.admin_tokens = AdminTokens(admin_token) if admin_token else None

    def node_status() -> dict[str, Any]:
        redis = ("up" if broker.ready else "down") if settings.uses_redis else "off"
        states = {b.name: b.state.value for b in breakers.values()}
        watched = len(board.watchers)
        return {"ready": node.is_ready(), "redis": redis, "breakers": states, "watched": watched}

    feed = StatsFeed(
        broker,
        StatsSampler(node.node_id, registry, node_status),
        backfill_max=min(BACKFILL_MAX, settings.outbox_max_messages // 2),
    )
    node.stats_feed = feed

    def on_message(channel: str, payload: bytes) -> None:
        (feed.on_message if channel == ADMIN_CHANNEL else hub.on_message)(channel, payload)

    metrics.open_connections.set_function(lambda: len(node.connections))
    gate = node.door.gate if node.door is not None else None
    if gate is not None:
        metrics.logins_in_progress.set_function(lambda: gate.active)
        metrics.logins_waiting.set_function(lambda: gate.waiting_count)
    metrics.channels.set_function(lambda: len(hub.channels))
    metrics.queued_bytes.set_function(lambda: sum(c.writer.outbox_bytes for c in node.connections))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as stack:
            # Closed in reverse order, also when a later start fails.
            for part in (broker, history, presence, board.presence, limiter, store):
                stack.push_async_callback(part.close)
            if persistence is not None:
                stack.push_async_callback(persistence.close)
            for adapter in set(adapters.values()):
                stack.push_async_callback(adapter.close)
            stack.push_async_callback(router.close)
            stack.callback(node.expiry_timers.close)
            stack.callback(node.batch_timers.close)
            if settings.metrics_port is not None:  # first: a taken port stops the start cleanly
                metrics_port = MetricsPort(registry, settings.host, settings.metrics_port)
                await metrics_port.start()
                stack.push_async_callback(metrics_port.close)
                log.info("metrics on %s:%d", settings.host, metrics_port.port)
            if persistence is not None:  # warns once when a crash of Redis would lose data
                await persistence.check()
            hub.on_presence_change = board.changed
            await broker.start(on_message, hub.on_reconnect)
            hub.start()
            stack.push_async_callback(hub.close)
            await feed.start()
            stack.push_async_callback(feed.close)
            board.start()
            stack.push_async_callback(board.close)
            await router.start()
            housekeeping = asyncio.create_task(_housekeeping(node), name="housekeeping")
            stack.push_async_callback(_cancelled, housekeeping)
            freezer.start()
            stack.push_async_callback(freezer.close)
            stack.callback(setattr, node, "draining", True)
            log.info(
                "node %s ready: listening on %s:%d, %s broker, per-delivery path %s",
                node.node_id,
                settings.host,
                settings.port,
                _kind(settings),
                realtime.NATIVE,
            )
            # uvicorn hands the lifespan state to its protocols: the door at the socket, and
            # POST /v1/publish served by the HTTP protocol itself.
            yield {DOOR_STATE: node.door, DIRECT_PUBLISH_STATE: direct_publish}

    app = RealtimeApp(
        routes=api.routes() + Dashboard(node, node.admin_tokens).routes(),
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.direct = {("POST", "/v1/publish"): api.publish}
    app.answers = answers
    app.state.node = node
    app.state.api = api
    return app


def _kind(settings: Settings) -> str:
    if not settings.uses_redis:
        return "memory"
    return settings.redis_target.describe()


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class RealtimeApp(Starlette):
    """The Starlette app, with ``/v1/ws`` sessions and ``POST /v1/publish`` handed straight
    to their endpoints.

    A WebSocket session lasts as long as the connection, and every ASGI layer it
    passes through (error and exception middleware, router, route) keeps a
    coroutine frame alive for it: about 2 KB per idle connection. Those layers do
    nothing for this route (the endpoint answers its own errors and never raises
    ``WebSocketException``), so ``/v1/ws`` skips them. ``POST /v1/publish`` is the
    backend's hot path: it skips them too, answering errors through the same
    exception handlers (``direct``); every other request, and a WebSocket to any
    other path, goes through Starlette unchanged.
    """

    ws_endpoint = WebSocketEndpoint()
    #: (method, path) -> endpoint, served without Starlette's middleware and router.
    direct: Mapping[tuple[str, str], Endpoint] = MappingProxyType({})
    #: ``http_requests`` of the direct routes
    answers: AnswerCounts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            endpoint = self.direct.get((scope["method"], scope["path"]))
            if endpoint is not None:
                await self._direct(endpoint, scope, receive, send)
            elif scope["path"].startswith(API_PREFIX):
                await super().__call__(scope, receive, self._counting(scope, send))
            else:
                await super().__call__(scope, receive, send)
        elif kind == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await self.ws_endpoint(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def _direct(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        """``endpoint``'s answer, or its error rendered as Starlette would, counted."""
        scope["app"] = self
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except ClientDisconnect:
            return  # nobody to answer
        except HttpError as exc:
            response = exc.response()
        except Exception as exc:
            response = await render_internal_error(request, exc)
        await self.answers.count(scope["path"], response)(scope, receive, send)

    def _counting(self, scope: Scope, send: Send) -> Send:
        """``send`` counting the answer in ``http_requests`` by route template and status."""
        requests = self.state.node.metrics.http_requests

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                requests.labels(route, str(message["status"])).inc()
            await send(message)

        return counted


async def _housekeeping(node: Node) -> None:
    """Presence heartbeats for this node's connections (entries of a dead node expire)."""
    while True:
        await asyncio.sleep(HEARTBEAT_INTERVAL)
        entries = [(c.user, c.conn_id) for c in node.connections if c.registered]
        try:
            await node.presence.refresh(entries)
        except Exception as exc:  # the store is down: the next beat tries again
            log.warning("presence heartbeat failed: %s", exc)
