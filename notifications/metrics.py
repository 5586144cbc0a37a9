"""Prometheus metrics of the notification pipeline: ``<namespace>_notifications_<name>``.

Labels: ``priority`` (critical/high/normal/low) and ``adapter`` (a push adapter's name,
``in_app`` / ``route`` for the in-app delivery and the push routing step, or ``store`` for
the entries the store itself dead-lettered: poison or undecodable).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from notifications.models import DeadLetter, Priority

NAMESPACE = "piggybong_realtime"
SUBSYSTEM = "notifications"

PUSH_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

#: Values of the breaker state gauge.
BREAKER_STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class NotificationMetrics:
    """The pipeline's metrics on ``registry`` (one per app, so several apps fit in a process)."""

    def __init__(self, registry: CollectorRegistry, *, namespace: str = NAMESPACE) -> None:
        def counter(name: str, doc: str, labels: list[str]) -> Counter:
            return Counter(
                name, doc, labels, namespace=namespace, subsystem=SUBSYSTEM, registry=registry
            )

        self.registry = registry
        self.accepted = counter(
            "accepted", "Notifications accepted (202), by priority", ["priority"]
        )
        self.duplicates = counter(
            "duplicates", "Notifications with an id accepted within the window", ["priority"]
        )
        self.refused = counter(
            "refused", "Notifications refused with 503, by reason (full, unreachable)", ["reason"]
        )
        self.delivered = counter(
            "delivered", "Deliveries to a target, by priority and adapter", ["priority", "adapter"]
        )
        self.retried = counter(
            "retried", "Failed attempts scheduled for a retry", ["priority", "adapter"]
        )
        self.waited = counter(
            "breaker_waits", "Deliveries put back to wait for an open breaker", ["adapter"]
        )
        self.expired = counter(
            "expired", "Notifications dropped because their ttl passed", ["priority"]
        )
        self.dead_lettered = counter(
            "dead_lettered",
            "Dead letters stored, by priority and adapter (store: poison or undecodable entries)",
            ["priority", "adapter"],
        )
        self.dead_tokens = counter(
            "dead_tokens", "Devices removed because their token is gone", ["adapter"]
        )
        self.lost_leases = counter(
            "lost_leases", "Leases another consumer took over before they were settled", []
        )
        self.push_latency = Histogram(
            "push_seconds",
            "Duration of one push attempt, by adapter",
            ["adapter"],
            namespace=namespace,
            subsystem=SUBSYSTEM,
            registry=registry,
            buckets=PUSH_LATENCY_BUCKETS,
        )
        self.breaker_state = Gauge(
            "breaker_state",
            "Circuit breaker state by adapter: 0 closed, 1 half-open, 2 open",
            ["adapter"],
            namespace=namespace,
            subsystem=SUBSYSTEM,
            registry=registry,
        )
        self.breaker_transitions = counter(
            "breaker_transitions", "Circuit breaker state changes", ["adapter", "from", "to"]
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Notifications queued (waiting, in delivery or delayed), by priority",
            ["priority"],
            namespace=namespace,
            subsystem=SUBSYSTEM,
            registry=registry,
        )

    def set_breaker_state(self, adapter: str, state: str) -> None:
        """Sets the gauge; ``state`` is closed, half_open or open (a BreakerState is one)."""
        self.breaker_state.labels(adapter).set(BREAKER_STATE_VALUES[str(state)])

    def breaker_transition(self, adapter: str, old: str, new: str) -> None:
        """Fits ``CircuitBreaker(on_transition=...)``: counts the change and sets the gauge."""
        self.breaker_transitions.labels(adapter, str(old), str(new)).inc()
        self.set_breaker_state(adapter, new)

    def count_dead_letter(self, letter: DeadLetter) -> None:
        """Counts one stored dead letter; fits the stores' ``on_dead_letter``."""
        self.dead_lettered.labels(letter.notification.priority.value, letter.adapter).inc()

    def set_queue_depth(self, depths: Mapping[Priority, int]) -> None:
        for priority, depth in depths.items():
            self.queue_depth.labels(priority.value).set(depth)
