"""The operators' dashboard (section 12): ``GET /dashboard`` behind HTTP Basic authentication,
and the cluster-wide stats feed the page reads over ``/v1/ws``.

- Every node samples its stats once a second (realtime/stats.py) and publishes the snapshot
  on the broker channel ``admin:stats``; every node (through Redis when there is one) keeps
  the last ``KEEP_SECONDS`` of snapshots of every node and writes each new one to its admin
  subscribers as an ``event`` (``node.stats``).
- The page authenticates with Basic (any user name, the password ``REALTIME_ADMIN_TOKEN``;
  compared in constant time), then ``POST /dashboard/session`` mints a short-lived admin
  token (``ADMIN_TOKEN_TTL`` s, HS256 with a key derived from the admin token, header ``kid``
  ``piggybong-admin``). With it the page connects to ``/v1/ws`` like any client and subscribes
  to ``admin:stats``; only admin sessions may, and no one publishes there but the nodes.
- No admin token (and not dev mode): every dashboard path answers 404.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any, Final

import jwt
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from realtime.auth import DEFAULT_TIER, Principal
from realtime.broker import Broker, BrokerUnavailable
from realtime.envelope import new_event_id
from realtime.protocol import Error, ErrorCode, http_error_body
from realtime.stats import StatsSampler
from realtime.writer import Recipient, write_to_all

if TYPE_CHECKING:
    from realtime.node import Node

log = logging.getLogger("realtime.dashboard")

#: The broker channel of the snapshots, and the channel an admin session subscribes to.
ADMIN_CHANNEL: Final = "admin:stats"
#: The event name of a snapshot on the admin channel.
STATS_EVENT: Final = "node.stats"
#: Seconds between two snapshots of a node.
INTERVAL: Final = 1.0
#: Seconds of snapshots every node keeps per node (sent to a page when it subscribes).
KEEP_SECONDS: Final = 300
#: Most kept snapshots sent to a new admin session (within its outbox bound): beyond, every
#: n-th second of every node.
BACKFILL_MAX: Final = 300
#: Lifetime of an admin session token (the page refreshes it before it expires).
ADMIN_TOKEN_TTL: Final = 300.0
#: The ``kid`` header that marks an admin session token.
ADMIN_KID: Final = "piggybong-admin"
ADMIN_AUDIENCE: Final = "piggybong-admin"
_ADMIN_USER: Final = re.compile(r"admin\.[0-9a-f]{16}")
#: The page's files, served from the package (realtime/dashboard_static).
STATIC: Final = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "piggybong-client.js": "text/javascript; charset=utf-8",
}
_SECURITY_HEADERS: Final = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; "
    "img-src 'self' data:; frame-ancestors 'none'",
}


class AdminTokens:
    """Mints and verifies admin session tokens from the admin token (every node derives the
    same key, so a token minted by one node is accepted by all)."""

    def __init__(self, admin_token: str, clock: Callable[[], float] = time.time) -> None:
        self._password = hashlib.sha256(admin_token.encode()).digest()
        self._key = hmac.new(admin_token.encode(), b"piggybong-admin-ws-v1", "sha256").digest()
        self._clock = clock

    def check_basic(self, authorization: str | None) -> bool:
        """True when the header is ``Basic`` with any user name and the admin token
        (constant-time comparison of SHA-256 digests)."""
        if not authorization:
            return False
        scheme, _, encoded = authorization.strip().partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            decoded = base64.b64decode(encoded.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return False
        _, sep, password = decoded.partition(":")
        presented = hashlib.sha256(password.encode()).digest()
        return bool(sep) and hmac.compare_digest(presented, self._password)

    def mint(self, user: str | None = None) -> tuple[str, str, float]:
        """A session token: (token, its user, its expiry). ``user`` keeps a session's user
        across refreshes (an ``admin.<16 hex>`` name); None makes a new one."""
        if user is None or _ADMIN_USER.fullmatch(user) is None:
            user = f"admin.{os.urandom(8).hex()}"
        now = self._clock()
        expires = math.floor(now + ADMIN_TOKEN_TTL)
        claims = {"sub": user, "aud": ADMIN_AUDIENCE, "iat": int(now), "exp": expires}
        token = jwt.encode(claims, self._key, algorithm="HS256", headers={"kid": ADMIN_KID})
        return token, user, float(expires)

    def authenticate(self, token: str) -> Principal | Error | None:
        """The admin principal of an admin session token; an error for an invalid one; None
        when the token is not one (no admin ``kid``): the caller's usual authentication."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        if header.get("kid") != ADMIN_KID:
            return None
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=["HS256"],
                audience=ADMIN_AUDIENCE,
                options={"require": ["sub", "exp"], "verify_exp": False},
            )
        except jwt.PyJWTError:
            return Error(ErrorCode.UNAUTHORIZED, "invalid admin token")
        sub, exp = claims["sub"], claims["exp"]
        if not isinstance(sub, str) or _ADMIN_USER.fullmatch(sub) is None:
            return Error(ErrorCode.UNAUTHORIZED, "invalid admin token")
        if not isinstance(exp, int | float) or self._clock() >= exp:
            return Error(ErrorCode.UNAUTHORIZED, "admin token expired")
        return Principal(user=sub, tier=DEFAULT_TIER, expires_at=float(exp), admin=True)


class StatsFeed:
    """Publishes this node's snapshots, keeps every node's recent ones, feeds admin sessions.

    ``on_message`` is the broker handler of ``ADMIN_CHANNEL`` (app.py routes it); it never
    raises. A snapshot the broker refuses (Redis down) is still shown locally.
    """

    def __init__(
        self,
        broker: Broker,
        sampler: StatsSampler,
        interval: float = INTERVAL,
        backfill_max: int = BACKFILL_MAX,
    ) -> None:
        self.broker = broker
        self.sampler = sampler
        self.interval = interval
        self.backfill_max = max(backfill_max, 1)
        self.subscribers: set[Recipient] = set()
        self.recent: dict[str, deque[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None
        self._subscribed = False

    async def start(self) -> None:
        await self._subscribe()
        self._task = asyncio.create_task(self._run(), name="stats-feed")

    async def _subscribe(self) -> None:
        """Subscribes ``ADMIN_CHANNEL`` once; a broker that cannot yet is asked again at the
        next snapshot (the broker keeps it across its own reconnects)."""
        if self._subscribed:
            return
        try:
            await self.broker.subscribe(ADMIN_CHANNEL)
            self._subscribed = True
        except BrokerUnavailable:
            pass

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.subscribers.clear()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            deadline += self.interval
            await asyncio.sleep(max(deadline - loop.time(), 0.0))
            await self._subscribe()
            payload = json.dumps(self.sampler.sample(time.time())).encode()
            try:
                await self.broker.publish(ADMIN_CHANNEL, payload)
            except BrokerUnavailable:  # Redis down: this node's page still sees this node
                self.on_message(ADMIN_CHANNEL, payload)

    def on_message(self, channel: str, payload: bytes) -> None:
        try:
            snapshot = json.loads(payload)
            node = snapshot["node"]
            ts = int(snapshot["ts"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable stats snapshot on %s dropped", channel)
            return
        kept = self.recent.setdefault(str(node), deque(maxlen=int(KEEP_SECONDS / self.interval)))
        kept.append(snapshot)
        if self.subscribers:
            write_to_all(tuple(self.subscribers), _event(snapshot, ts))

    def add(self, subscriber: Recipient) -> None:
        """Subscribes an admin session, sending it the kept snapshots first (oldest first):
        all of them, or when there are more than ``backfill_max``, those of every n-th second
        (the same seconds for every node, so that the page's sums stay whole)."""
        kept = sorted((s for d in self.recent.values() for s in d), key=lambda s: int(s["ts"]))
        step = math.ceil(len(kept) / self.backfill_max)
        for snapshot in kept:
            ts = int(snapshot["ts"])
            if step == 1 or (ts // 1000) % step == 0:
                write_to_all((subscriber,), _event(snapshot, ts))
        self.subscribers.add(subscriber)

    def discard(self, subscriber: Recipient) -> None:
        self.subscribers.discard(subscriber)


def _event(snapshot: dict[str, Any], ts: int) -> dict[str, Any]:
    return {
        "type": "event",
        "channel": ADMIN_CHANNEL,
        "event": STATS_EVENT,
        "id": new_event_id(),
        "ts": ts,
        "data": snapshot,
    }


class Dashboard:
    """The dashboard's HTTP routes; ``tokens`` is None when no admin token is set (404)."""

    def __init__(self, node: Node, tokens: AdminTokens | None) -> None:
        self.node = node
        self.tokens = tokens

    def routes(self) -> list[Route]:
        return [
            Route("/dashboard", self.page, methods=["GET"]),
            Route("/dashboard/session", self.session, methods=["POST"]),
            Route("/dashboard/{name}", self.static, methods=["GET"]),
        ]

    def _authorize(self, request: Request) -> AdminTokens | Response:
        if self.tokens is None:
            return _error(
                404,
                ErrorCode.NOT_FOUND,
                "the dashboard is disabled: set REALTIME_ADMIN_TOKEN to enable it",
            )
        if not self.tokens.check_basic(request.headers.get("authorization")):
            response = _error(401, ErrorCode.UNAUTHORIZED, "the dashboard needs the admin token")
            response.headers["WWW-Authenticate"] = 'Basic realm="PiggyBong Realtime dashboard"'
            return response
        return self.tokens

    async def page(self, request: Request) -> Response:
        return self._file(request, "index.html")

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            authorized = self._authorize(request)
            if isinstance(authorized, Response):
                return authorized
            return _error(404, ErrorCode.NOT_FOUND, "no such file")
        return self._file(request, name)

    def _file(self, request: Request, name: str) -> Response:
        authorized = self._authorize(request)
        if isinstance(authorized, Response):
            return authorized
        body = resources.files("realtime").joinpath("dashboard_static", name).read_bytes()
        return Response(body, media_type=STATIC[name], headers=_SECURITY_HEADERS)

    async def session(self, request: Request) -> Response:
        """``POST /dashboard/session`` (``?user=`` keeps a session's user on refresh):
        ``{token, user, expires_at, channel, ws}``."""
        authorized = self._authorize(request)
        if isinstance(authorized, Response):
            return authorized
        token, user, expires_at = authorized.mint(request.query_params.get("user"))
        body = {
            "token": token,
            "user": user,
            "expires_at": expires_at,
            "channel": ADMIN_CHANNEL,
            "ws": "/v1/ws",
            "node": self.node.node_id,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})


def _error(status: int, code: ErrorCode, message: str) -> JSONResponse:
    return JSONResponse(
        http_error_body(Error(code, message)), status_code=status, headers=_SECURITY_HEADERS
    )
