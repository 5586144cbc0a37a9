"""The door (protocol-v1, section 11): what a client address may hold before it is refused.

``Door`` is sans I/O: per client address, the open connections (a ``Ticket`` each, released
when the connection ends) and a token bucket of new connections (``connect_rate_per_ip``
per second, burst 10x); the client address of a peer (the first untrusted hop of
``X-Forwarded-For`` when the peer is a trusted proxy); the ``Origin`` check. The HTTP and
WebSocket protocols (realtime/httpprotocol.py, wsprotocol.py) ask it and enforce its
answers. Every refusal is counted (``door_refusals{what,why}``) and logged at most once per
interval per cause, never per event.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from realtime.gate import GatePass, HandshakeGate
from realtime.node import LogThrottle

if TYPE_CHECKING:
    from realtime.metrics import Metrics
    from realtime.settings import Settings

#: Key of the ``Door`` in the app's lifespan state (uvicorn hands it to every protocol).
DOOR_STATE: Final = "piggybong.door"
#: Token buckets kept (least recently used dropped first; a dropped one starts full again).
MAX_BUCKETS: Final = 100_000
#: A connection's burst of new connections, in seconds of its rate (the contract's 10x).
BURST_SECONDS: Final = 10.0
#: Seconds a ``connect`` refused because the node is busy is told to wait (``retry_after``;
#: clients add jitter).
CONNECT_RETRY_AFTER: Final = 1.0
#: Longest client address kept as a key (an unparsable X-Forwarded-For hop is cut here).
MAX_ADDRESS_CHARS: Final = 64

log = logging.getLogger("realtime.door")


class Why(StrEnum):
    """Why the door refused or closed something (the ``why`` label of door_refusals)."""

    HEAD_TOO_LARGE = "head_too_large"
    HEAD_TIMEOUT = "head_timeout"
    IDLE_TIMEOUT = "idle_timeout"
    CONNECTIONS_PER_IP = "connections_per_ip"
    CONNECT_RATE_PER_IP = "connect_rate_per_ip"
    ORIGIN = "origin"
    PING_FLOOD = "ping_flood"
    ERRORS_BEFORE_LOGIN = "errors_before_login"
    UNSENDABLE_DATA = "unsendable_data"
    CONNECTION_FAULT = "connection_fault"
    BUSY = "busy"


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refused connection: answered 429 with ``Retry-After`` (whole seconds, >= 1)."""

    why: Why
    retry_after: float


class ConnectSlot:
    """One ``connect`` being answered on this node; ``release`` (idempotent) once it is."""

    __slots__ = ("door",)

    def __init__(self, door: Door) -> None:
        self.door: Door | None = door

    def release(self) -> None:
        door, self.door = self.door, None
        if door is not None:
            door.connects -= 1


class Ticket:
    """One open connection of one address; ``release`` (idempotent) when it ends. A
    WebSocket's ticket also carries its place in the handshake gate until its login ends."""

    __slots__ = ("address", "door", "gate_pass")

    def __init__(self, door: Door | None, address: str) -> None:
        self.door = door
        self.address = address
        self.gate_pass: GatePass | None = None

    def end_login(self) -> None:
        """The ``connect`` is answered (or the lease ran out): the gate's place goes."""
        gate_pass, self.gate_pass = self.gate_pass, None
        if gate_pass is not None:
            gate_pass.release()

    def release(self) -> None:
        self.end_login()
        door, self.door = self.door, None
        if door is not None:
            door.release(self.address)


def _networks(entries: Iterable[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


class Door:
    """Per-address connection counts and rates, trusted proxies, allowed origins; sans I/O."""

    def __init__(
        self,
        *,
        max_connections_per_ip: int,
        connect_rate_per_ip: float,
        trusted_proxies: Sequence[str] = (),
        allowed_origins: Sequence[str] = (),
        max_head_bytes: int = 16 * 1024,
        head_timeout: float = 10.0,
        keepalive_timeout: float = 5.0,
        max_connects_in_progress: int = 0,
        gate: HandshakeGate | None = None,
        metrics: Metrics | None = None,
        log_interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_connections = max_connections_per_ip
        self.rate = connect_rate_per_ip
        self.burst = connect_rate_per_ip * BURST_SECONDS
        self.trusted = _networks(trusted_proxies)
        self.origins = tuple(o.lower() for o in allowed_origins)
        self.max_head_bytes = max_head_bytes
        self.head_timeout = head_timeout
        self.keepalive_timeout = keepalive_timeout
        self.metrics = metrics
        self.throttle = LogThrottle(log, log_interval)
        self.clock = clock
        self.open: dict[str, int] = {}
        #: the ``connect``s this node is answering, and their bound (0: none)
        self.connects = 0
        self.max_connects = max_connects_in_progress
        #: WebSocket logins in progress, in arrival order (None: not bounded)
        self.gate = gate
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics | None = None) -> Door:
        return cls(
            max_connections_per_ip=settings.max_connections_per_ip,
            connect_rate_per_ip=settings.connect_rate_per_ip,
            trusted_proxies=settings.trusted_proxies,
            allowed_origins=settings.allowed_origins,
            max_head_bytes=settings.max_head_bytes,
            head_timeout=settings.head_timeout,
            keepalive_timeout=settings.keepalive_timeout,
            max_connects_in_progress=settings.max_connects_in_progress,
            gate=HandshakeGate(
                settings.max_logins_in_progress,
                settings.max_logins_waiting,
                settings.login_lease,
            )
            if settings.max_logins_in_progress
            else None,
            metrics=metrics,
            log_interval=settings.log_interval,
        )

    # ------------------------------------------------------------------ addresses

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` is a trusted proxy (its X-Forwarded-For names the client)."""
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)

    def client_address(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client of a connection from ``peer``: the peer itself unless it is a trusted
        proxy, else the right-most hop of ``X-Forwarded-For`` (all its values, in order) that
        is not a trusted proxy (the left-most when all are)."""
        if not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        hops = [hop for hop in hops if hop]
        client = peer
        for hop in reversed(hops):
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return hop[:MAX_ADDRESS_CHARS]  # garbage from the client's side: its key
            client = hop
            if not self.trusts(hop):
                return hop
        return client

    # ------------------------------------------------------------------ admission

    def admit(self, address: str) -> Ticket | Refusal:
        """A ticket for one more connection of ``address``, or why not (counted, logged)."""
        held = self.open.get(address, 0)
        if held >= self.max_connections:
            return self.refuse(Why.CONNECTIONS_PER_IP, "http", address, retry_after=1.0)
        now = self.clock()
        tokens, last = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[address] = (tokens, now)
            self._trim()
            wait = (1.0 - tokens) / self.rate
            return self.refuse(Why.CONNECT_RATE_PER_IP, "http", address, retry_after=wait)
        self._buckets[address] = (tokens - 1.0, now)
        self._trim()
        self.open[address] = held + 1
        return Ticket(self, address)

    def begin_connect(self, address: str) -> ConnectSlot | Refusal:
        """A place for one more authenticated ``connect`` to be answered (presence, the
        channels' positions and missed publications), or ``BUSY`` while ``max_connects``
        are: a node a crowd reconnects to does the work of the connects it can finish and
        tells the rest when to come back, instead of timing out on its stores for all."""
        if self.max_connects and self.connects >= self.max_connects:
            return self.refuse(Why.BUSY, "ws", address, retry_after=CONNECT_RETRY_AFTER)
        self.connects += 1
        return ConnectSlot(self)

    def release(self, address: str) -> None:
        held = self.open.get(address, 0) - 1
        if held > 0:
            self.open[address] = held
        else:
            self.open.pop(address, None)

    def _trim(self) -> None:
        buckets = self._buckets
        while len(buckets) > MAX_BUCKETS:
            buckets.popitem(last=False)

    def origin_allowed(self, origin: str | None) -> bool:
        """Whether a handshake with this ``Origin`` header may proceed (section 11)."""
        if not self.origins or origin is None:
            return True
        origin = origin.lower()
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self.origins)

    # ------------------------------------------------------------------ accounting

    def refuse(self, why: Why, what: str, address: str, *, retry_after: float = 1.0) -> Refusal:
        """Count and log (throttled) a refusal; the answer to give."""
        self.count(why, what, address)
        return Refusal(why, retry_after)

    def count(
        self, why: Why, what: str, address: str, detail: str = "", *, log: bool = True
    ) -> None:
        """Count one refusal or door close of ``what`` (http, ws) for ``why``; with ``log``,
        one log line per cause per interval."""
        if self.metrics is not None:
            self.metrics.door_refusals.labels(what, why.value).inc()
        if not log:
            return
        self.throttle.warning(
            why.value,
            "door: %s %s from %s%s (at most one line per %gs per cause; see door_refusals)",
            what,
            why.value,
            address,
            f": {detail}" if detail else "",
            self.throttle.interval,
        )
