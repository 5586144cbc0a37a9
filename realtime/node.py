"""The node: what every connection of one server process shares."""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from realtime.broker import Broker
from realtime.ratelimit import Decision, RateLimitUnavailable

if TYPE_CHECKING:
    from realtime.auth import Authenticator
    from realtime.connection import Connection
    from realtime.dashboard import AdminTokens, StatsFeed
    from realtime.door import Door
    from realtime.history import History
    from realtime.hub import Hub
    from realtime.metrics import Metrics
    from realtime.presence import ConnectionRegistry
    from realtime.presence_board import PresenceBoard
    from realtime.ratelimit import RateLimiter
    from realtime.settings import Settings
    from realtime.tiers import TierPolicy
    from realtime.timers import Timers
    from realtime.writer import FlushQueue, OutboxLimits


class LogThrottle:
    """At most one log line per key (a client) per interval; remembers a bounded number of keys."""

    def __init__(self, logger: logging.Logger, interval: float, max_keys: int = 10_000) -> None:
        self.logger = logger
        self.interval = interval
        self.max_keys = max_keys
        self._last: OrderedDict[str, float] = OrderedDict()

    def warning(self, key: str, msg: str, *args: Any) -> None:
        if self._due(key):
            self.logger.warning(msg, *args)

    def exception(self, key: str, exc: BaseException, msg: str, *args: Any) -> None:
        """An error with its traceback, at most once per ``key`` (a cause) per interval."""
        if self._due(key):
            self.logger.error(msg, *args, exc_info=exc)

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self.max_keys:
            self._last.popitem(last=False)
        return True


@dataclass(eq=False)
class Node:
    """Node-wide parts, built and owned by the app factory."""

    node_id: str
    settings: Settings
    broker: Broker
    #: offsets, epochs and kept publications of every channel (section 9)
    history: History
    hub: Hub
    auth: Authenticator
    policy: TierPolicy
    limiter: RateLimiter
    presence: ConnectionRegistry
    #: channel presence: memberships, heartbeat and pushes (section 10)
    board: PresenceBoard
    metrics: Metrics
    #: the writers with frames to write, flushed once per loop iteration
    flushes: FlushQueue
    #: every connection's outbox bound (4008 beyond)
    outbox_limits: OutboxLimits
    batch_timers: Timers[Connection]
    #: token expiries on the wall clock (``exp`` is unix time)
    expiry_timers: Timers[Connection]
    log_throttle: LogThrottle
    connections: set[Connection] = field(default_factory=set)
    #: name -> check for /readyz; a check returns a map whose "ok" (default True) gates readiness
    readiness: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)
    draining: bool = False
    #: the door (section 11): per-address limits, refusals counted and logged
    door: Door | None = None
    #: the dashboard's admin session tokens (None: no admin token set, no admin sessions)
    admin_tokens: AdminTokens | None = None
    #: the cluster's stats snapshots, fed to admin sessions (realtime/dashboard.py)
    stats_feed: StatsFeed | None = None

    async def limiter_hit(self, user: str, limit: int) -> Decision:
        """The user's command rate decision; allowed (fail open) when the limiter is down."""
        try:
            return await self.limiter.hit(f"cmd:{user}", limit)
        except RateLimitUnavailable:
            return Decision(True, 0.0)

    def is_ready(self) -> bool:
        return self.broker.ready and not self.draining


def make_log_throttle(interval: float) -> LogThrottle:
    return LogThrottle(logging.getLogger("realtime.clients"), interval)
