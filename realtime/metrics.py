"""Prometheus metrics of the realtime server: ``piggybong_realtime_<subsystem>_<name>``.

One ``Metrics`` per app, on its own registry, so that several apps can live in
one process (tests). Hot paths count once per fan-out, not once per recipient.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NS = "piggybong_realtime"

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """The server's metrics; see docs/operations.md for what each means."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.connections = Gauge(
            "connections",
            "Open, connected WebSocket connections by tier",
            ["tier"],
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.open_connections = Gauge(
            "open",
            "WebSocket connections held by this node (connected or not yet)",
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.channels = Gauge(
            "channels",
            "Channels with at least one subscriber on this node",
            namespace=NS,
            subsystem="hub",
            registry=registry,
        )
        self.queued_bytes = Gauge(
            "queued_bytes",
            "Bytes waiting in connections' outbound queues",
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.commands = Counter(
            "commands",
            "Client commands by op and outcome (ok or an error code)",
            ["op", "outcome"],
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.messages_out = Counter(
            "messages_out",
            "Server messages written or queued to connections, by type",
            ["type"],
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.overflows = Counter(
            "queue_overflows",
            "Connections whose outbound queue overflowed (closed 4008)",
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.closes = Counter(
            "closes",
            "Connections closed by the server, by close code",
            ["code"],
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.bad_frames = Counter(
            "bad_frames",
            "Client frames that could not be read (closed 4000 or 1009)",
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.broker_reconnects = Counter(
            "reconnects",
            "Broker reconnections after losing its backend",
            namespace=NS,
            subsystem="broker",
            registry=registry,
        )
        self.published = Counter(
            "published",
            "Events accepted for publication, by source (http or ws)",
            ["source"],
            namespace=NS,
            subsystem="broker",
            registry=registry,
        )
        self.duplicates = Counter(
            "duplicates",
            "Publishes with an id already seen within the idempotency window",
            namespace=NS,
            subsystem="broker",
            registry=registry,
        )
        self.latency = Histogram(
            "publish_to_write_seconds",
            "From acceptance of an event to its fan-out on this node (write or queue)",
            namespace=NS,
            subsystem="hub",
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.gap_fills = Counter(
            "gap_fills",
            "Publications this node missed live and delivered from history",
            namespace=NS,
            subsystem="hub",
            registry=registry,
        )
        self.history_lost = Counter(
            "history_lost",
            "Channels whose subscribers were closed (1001) to resync: the history was lost",
            namespace=NS,
            subsystem="hub",
            registry=registry,
        )
        self.filtered = Counter(
            "filtered_events",
            "Premium-only events withheld from connections, by tier",
            ["tier"],
            namespace=NS,
            subsystem="hub",
            registry=registry,
        )
        self.batches = Counter(
            "batches",
            "Spending batches flushed",
            namespace=NS,
            subsystem="batch",
            registry=registry,
        )
        self.batch_items = Histogram(
            "items",
            "Items per spending batch",
            namespace=NS,
            subsystem="batch",
            registry=registry,
            buckets=(1, 2, 5, 10, 20, 30, 40, 50, 100, 200),
        )
        self.rate_limited = Counter(
            "rate_limited",
            "Commands refused by the rate limit, by tier",
            ["tier"],
            namespace=NS,
            subsystem="ws",
            registry=registry,
        )
        self.unknown_tiers = Counter(
            "unknown_tiers",
            "Tokens whose tier the policy does not know (treated as free)",
            namespace=NS,
            subsystem="auth",
            registry=registry,
        )
        self.http_requests = Counter(
            "requests",
            "HTTP API requests by route and status",
            ["route", "status"],
            namespace=NS,
            subsystem="http",
            registry=registry,
        )
        self.logins_in_progress = Gauge(
            "logins_in_progress",
            "WebSocket logins (handshake to connect answered) in the handshake gate",
            namespace=NS,
            subsystem="door",
            registry=registry,
        )
        self.logins_waiting = Gauge(
            "logins_waiting",
            "WebSocket handshakes waiting, unanswered, for a place in the handshake gate",
            namespace=NS,
            subsystem="door",
            registry=registry,
        )
        self.door_refusals = Counter(
            "refusals",
            "What the door refused or closed (what: http, ws) and why (section 11)",
            ["what", "why"],
            namespace=NS,
            subsystem="door",
            registry=registry,
        )
