"""A node's stats snapshot for the operators' dashboard, and its alert level (sans-I/O).

``StatsSampler.sample(now)`` reads the app's Prometheus registry once and returns a compact,
JSON-able map: gauges as they are, counters as totals and as rates per second since the
previous sample, fan-out latency quantiles over the last ``window`` seconds, and the alert
level with its reasons (``assess``). Families that do not exist (a metric another part adds
later, such as the door's refusals) count as zero: the sampler reads what the registry has.

The thresholds are the product spec's, as deploy/prometheus/alerts.yml pages on them:
fan-out p95 under 200 ms (critical over 1 s), HTTP error rate under 0.1 % (critical over
1 %), a push breaker opens after 5 failures (warning while it is not closed), and a node is
checked every 30 s (the page marks a node silent for longer critical).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from prometheus_client import CollectorRegistry, Metric

NS: Final = "piggybong_realtime_"

#: Alert levels, in increasing order.
NORMAL: Final = "normal"
WARNING: Final = "warning"
CRITICAL: Final = "critical"
LEVELS: Final = (NORMAL, WARNING, CRITICAL)

P95_WARNING: Final = 0.2
P95_CRITICAL: Final = 1.0
ERROR_RATE_WARNING: Final = 0.001
ERROR_RATE_CRITICAL: Final = 0.01
#: Seconds without a snapshot after which the page marks a node critical (the health period).
SILENT_AFTER: Final = 30.0
#: Seconds of history the quantiles and the error rate are computed over.
DEFAULT_WINDOW: Final = 60.0

#: Counter totals of a snapshot: name -> (family, label filter or None, label to sum by).
_COUNTERS: Final[dict[str, tuple[str, dict[str, str] | None]]] = {
    "connects": ("ws_commands", {"op": "connect", "outcome": "ok"}),
    "published": ("broker_published", None),
    "delivered": ("ws_messages_out", None),
    "slow_cuts": ("ws_queue_overflows", None),
    "rate_limited": ("ws_rate_limited", None),
    "http": ("http_requests", None),
    "retried": ("notifications_retried", None),
    "dead_letters": ("notifications_dead_lettered", None),
    "expired": ("notifications_expired", None),
    "gap_fills": ("hub_gap_fills", None),
    "history_lost": ("hub_history_lost", None),
    "broker_reconnects": ("broker_reconnects", None),
}

#: Families a snapshot never reads: their collection costs a pass over every connection.
SKIPPED: Final = (NS + "ws_queued_bytes",)
_SUFFIXES: Final = ("", "_total", "_created", "_bucket", "_count", "_sum")

Samples = dict[str, list[tuple[dict[str, str], float]]]


class _Source(Protocol):
    def collect(self) -> Iterable[Metric]: ...


def read_samples(registry: _Source) -> Samples:
    """Every sample of the registry by sample name (``..._total``, ``..._bucket``, ...)."""
    samples: Samples = {}
    for family in registry.collect():
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def server_families(registry: CollectorRegistry) -> _Source:
    """The registry restricted to the server's own families (``piggybong_realtime_*``) but
    ``SKIPPED``: no process or gc collectors, nothing that walks every connection."""
    names = {
        family.name + suffix
        for family in registry.collect()
        if family.name.startswith(NS) and family.name not in SKIPPED
        for suffix in _SUFFIXES
    }
    return registry.restricted_registry(names)


def _sum(samples: Samples, name: str, match: Mapping[str, str] | None = None) -> float:
    return sum(
        value
        for labels, value in samples.get(name, ())
        if match is None or all(labels.get(k) == v for k, v in match.items())
    )


def _by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        key = labels.get(label, "")
        out[key] = out.get(key, 0.0) + value
    return out


def _door_refusals(samples: Samples) -> float:
    """Refusals at the door (section 11): every counter whose name holds ``door``."""
    return sum(
        value
        for name, rows in samples.items()
        if name.startswith(NS) and "door" in name and name.endswith("_total")
        for _, value in rows
    )


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative ``(le, count)`` pairs (le ascending,
    +Inf last): linear within the bucket; None when there is no observation."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if math.isinf(le):
                return lower  # beyond the last finite bound: its bound, as Prometheus does
            span = count - below
            return lower + (le - lower) * ((rank - below) / span if span > 0 else 1.0)
        lower, below = le, count
    return lower


def _buckets(samples: Samples, name: str) -> list[tuple[float, float]]:
    rows = [(float(labels["le"]), value) for labels, value in samples.get(name, ())]
    return sorted(rows)


@dataclass
class StatsSampler:
    """Samples ``registry`` into snapshots; keeps what the rates and quantiles need.

    ``status`` returns the node's live state that is not a metric: ``ready`` (bool),
    ``redis`` ("up", "down" or "off"), ``breakers`` (adapter -> closed/half_open/open) and
    ``watched`` (channels whose presence this node's connections watch).
    The families read are those the registry has at the first sample (create them first).
    """

    node_id: str
    registry: CollectorRegistry
    status: Callable[[], dict[str, Any]]
    window: float = DEFAULT_WINDOW
    _history: deque[tuple[float, dict[str, float], list[tuple[float, float]]]] = field(
        default_factory=deque
    )
    _source: _Source | None = None

    def sample(self, now: float) -> dict[str, Any]:
        """One snapshot at ``now`` (unix seconds); see docs/operations.md for its fields."""
        if self._source is None:
            self._source = server_families(self.registry)
        samples = read_samples(self._source)
        tiers = {k: int(v) for k, v in _by_label(samples, NS + "ws_connections", "tier").items()}
        totals = {
            name: _sum(samples, NS + family + "_total", match)
            for name, (family, match) in _COUNTERS.items()
        }
        totals["door_refused"] = _door_refusals(samples)
        totals["http_5xx"] = sum(
            value
            for labels, value in samples.get(NS + "http_requests_total", ())
            if labels.get("status", "").startswith("5")
        )
        # Connected sessions that ended: every connect that is not open any more.
        totals["disconnects"] = max(totals["connects"] - sum(tiers.values()), 0.0)
        buckets = _buckets(samples, NS + "hub_publish_to_write_seconds_bucket")
        previous = self._history[-1] if self._history else None
        self._history.append((now, totals, buckets))
        while len(self._history) > 2 and now - self._history[1][0] >= self.window:
            self._history.popleft()
        oldest = self._history[0]
        first = len(self._history) == 1  # nothing older: the window is the node's lifetime
        base_totals = {} if first else oldest[1]
        base_buckets = {} if first else dict(oldest[2])
        rates = dict.fromkeys(totals, 0.0)
        if previous is not None and now > previous[0]:
            dt = now - previous[0]
            rates = {k: max(v - previous[1].get(k, 0.0), 0.0) / dt for k, v in totals.items()}
        windowed = [(le, count - base_buckets.get(le, 0.0)) for le, count in buckets]
        latency = {f"p{round(q * 100)}": quantile(q, windowed) for q in (0.5, 0.95, 0.99)}
        span = {k: max(v - base_totals.get(k, 0.0), 0.0) for k, v in totals.items()}
        status = self.status()
        queue = _by_label(samples, NS + "notifications_queue_depth", "priority")
        snapshot: dict[str, Any] = {
            "node": self.node_id,
            "ts": int(now * 1000),
            "ready": bool(status.get("ready", True)),
            "redis": status.get("redis", "off"),
            "connections": tiers,
            "open": int(_sum(samples, NS + "ws_open")),
            "channels": int(_sum(samples, NS + "hub_channels")),
            "presence_watched": int(status.get("watched", 0)),
            "totals": {k: int(v) for k, v in totals.items()},
            "rates": {k: round(v, 3) for k, v in rates.items()},
            "latency": {k: None if v is None else round(v, 6) for k, v in latency.items()},
            "window": {
                "seconds": round(now - oldest[0], 3),
                "http": int(span["http"]),
                "http_5xx": int(span["http_5xx"]),
                "dead_letters": int(span["dead_letters"]),
                "fanouts": int(windowed[-1][1]) if windowed else 0,
            },
            "breakers": dict(status.get("breakers", {})),
            "queue": {k: int(v) for k, v in queue.items()},
        }
        snapshot["level"], snapshot["reasons"] = assess(snapshot)
        return snapshot


def worst(levels: Iterable[str]) -> str:
    """The highest of ``levels`` (normal when empty)."""
    return max(levels, key=LEVELS.index, default=NORMAL)


def assess(snapshot: Mapping[str, Any]) -> tuple[str, list[str]]:
    """The node's alert level and why, from one snapshot (the module doc's thresholds)."""
    found: list[tuple[str, str]] = []
    if not snapshot.get("ready", True):
        found.append((CRITICAL, "node not ready (broker or notification queue unreachable)"))
    if snapshot.get("redis") == "down":
        found.append((CRITICAL, "Redis unreachable"))
    p95 = snapshot.get("latency", {}).get("p95")
    if p95 is not None and p95 > P95_WARNING:
        level = CRITICAL if p95 > P95_CRITICAL else WARNING
        limit = P95_CRITICAL if level == CRITICAL else P95_WARNING
        found.append((level, f"fan-out p95 {p95 * 1000:.0f} ms (over {limit * 1000:.0f} ms)"))
    window = snapshot.get("window", {})
    requests = window.get("http", 0)
    if requests:
        rate = window.get("http_5xx", 0) / requests
        if rate > ERROR_RATE_WARNING:
            level = CRITICAL if rate > ERROR_RATE_CRITICAL else WARNING
            limit = ERROR_RATE_CRITICAL if level == CRITICAL else ERROR_RATE_WARNING
            found.append((level, f"HTTP error rate {rate:.2%} (over {limit:.1%})"))
    for adapter, state in sorted(snapshot.get("breakers", {}).items()):
        if state != "closed":
            found.append((WARNING, f"push breaker {adapter} {state.replace('_', '-')}"))
    if window.get("dead_letters", 0):
        found.append((WARNING, f"{window['dead_letters']} dead letters in the last minute"))
    level = worst(level for level, _ in found)
    return level, [reason for _, reason in sorted(found, key=lambda f: -LEVELS.index(f[0]))]
