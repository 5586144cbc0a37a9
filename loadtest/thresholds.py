"""Pass/fail thresholds in the style of k6, sans I/O.

A threshold is ``<metric> <op> <value>[unit]``, e.g. ``p95<150``, ``p(99)<=250ms``,
``error_rate<0.1%``, ``lost==0``, ``deliveries_per_s>=50000``. Latency metrics
are in milliseconds (units ``us``, ``ms``, ``s`` accepted); ratio metrics are
fractions (``%`` accepted). They are evaluated against the flat map of a run's
metrics (see ``METRICS``).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

Kind = Literal["latency", "ratio", "count", "number"]

#: Latency categories: ``<category>_<stat>``; the ``event`` category may drop its prefix.
LATENCY_CATEGORIES: Final = ("event", "batch", "notification", "connect", "publish")
LATENCY_STATS: Final = ("min", "mean", "p50", "p90", "p95", "p99", "p999", "max")

_OTHER_METRICS: Final[dict[str, tuple[Kind, str]]] = {
    "error_rate": ("ratio", "errors / operations (connects, commands, HTTP requests)"),
    "errors": ("count", "failed operations and unexpected closes"),
    "loss_rate": ("ratio", "lost / expected deliveries"),
    "lost": ("count", "expected deliveries that never arrived"),
    "expected": ("count", "deliveries the server owed"),
    "delivered": ("count", "expected deliveries that arrived"),
    "duplicates": ("count", "deliveries received more than once"),
    "out_of_order": ("count", "deliveries that arrived before an earlier event of their channel"),
    "premium_leaks": ("count", "premium-only events delivered to free clients"),
    "deliveries_per_s": ("number", "deliveries per second of the publishing phase"),
    "connected": ("count", "connections that completed connect"),
    "connect_failures": ("count", "connection attempts that never completed connect"),
    "closed_by_server": ("count", "connections the server closed"),
    "publish_failures": ("count", "HTTP publish/notification requests that were not 202"),
    "server_cpu_percent": ("number", "mean server CPU during publishing (100 = one core)"),
    "server_rss_mb": ("number", "largest server resident memory seen"),
}


def _metric_table() -> dict[str, tuple[Kind, str]]:
    table: dict[str, tuple[Kind, str]] = {}
    for category in LATENCY_CATEGORIES:
        for stat in LATENCY_STATS:
            table[f"{category}_{stat}"] = ("latency", f"{category} latency {stat}, ms")
    for stat in LATENCY_STATS:
        table[stat] = ("latency", f"event latency {stat}, ms (same as event_{stat})")
    table.update(_OTHER_METRICS)
    return table


#: Every metric a threshold may name: name -> (kind, meaning).
METRICS: Final = _metric_table()

_OPS: Final[dict[str, Callable[[float, float], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_UNIT_FACTORS: Final[dict[Kind, dict[str, float]]] = {
    "latency": {"": 1.0, "ms": 1.0, "us": 0.001, "s": 1000.0},
    "ratio": {"": 1.0, "%": 0.01},
    "count": {"": 1.0},
    "number": {"": 1.0},
}
_SYNTAX: Final = re.compile(
    r"\s*(?P<metric>[A-Za-z_][A-Za-z0-9_().]*)\s*(?P<op><=|>=|==|!=|<|>)\s*"
    r"(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*(?P<unit>ms|us|s|%)?\s*"
)
_K6_PERCENTILE: Final = re.compile(r"(?:(?P<cat>[a-z]+)_)?p\((?P<p>\d+(?:\.\d+)?)\)")
_ALIASES: Final = {"avg": "mean", "med": "p50", "p99.9": "p999"}


@dataclass(frozen=True, slots=True)
class Threshold:
    """One parsed threshold; ``value`` is in the metric's base unit (ms, fraction, count)."""

    expr: str
    metric: str
    op: str
    value: float

    def holds(self, actual: float) -> bool:
        return _OPS[self.op](actual, self.value)


@dataclass(frozen=True, slots=True)
class ThresholdSyntaxError:
    """A threshold that cannot be read, with the reason."""

    expr: str
    reason: str

    def __str__(self) -> str:
        return f"threshold {self.expr!r}: {self.reason}"


def _canonical_metric(name: str) -> str:
    name = name.strip().lower()
    match = _K6_PERCENTILE.fullmatch(name)
    if match:
        p = match["p"].rstrip("0").rstrip(".") if "." in match["p"] else match["p"]
        stat = "p" + p.replace(".", "")
        name = f"{match['cat']}_{stat}" if match["cat"] else stat
    for alias, real in _ALIASES.items():
        if name == alias or name.endswith("_" + alias):
            name = name[: len(name) - len(alias)] + real
    if name.startswith("event_"):
        name = name.removeprefix("event_")
    return name


def parse_threshold(text: str) -> Threshold | ThresholdSyntaxError:
    """A threshold from its text, or the reason it is not one."""
    match = _SYNTAX.fullmatch(text)
    if match is None:
        return ThresholdSyntaxError(
            text, "expected '<metric> <op> <number>[unit]' with op one of < <= > >= == !="
        )
    metric = _canonical_metric(match["metric"])
    if metric not in METRICS:
        return ThresholdSyntaxError(
            text, f"unknown metric {match['metric']!r}; known: {', '.join(sorted(METRICS))}"
        )
    kind = METRICS[metric][0]
    unit = match["unit"] or ""
    factors = _UNIT_FACTORS[kind]
    if unit not in factors:
        allowed = ", ".join(repr(u) for u in factors if u) or "none"
        return ThresholdSyntaxError(text, f"unit {unit!r} does not fit {metric} (units: {allowed})")
    value = float(match["value"]) * factors[unit]
    if kind == "ratio" and not 0.0 <= value <= 1.0:
        return ThresholdSyntaxError(text, f"{metric} is a fraction: 0..1 or 0%..100%")
    return Threshold(text.strip(), metric, match["op"], value)


#: The product spec's defaults: p95 < 200 ms, error rate < 0.1%, no message lost.
DEFAULT_EXPRESSIONS: Final = ("p95<200", "error_rate<0.1%", "lost==0")


def defaults() -> list[Threshold]:
    out = [parse_threshold(expr) for expr in DEFAULT_EXPRESSIONS]
    return [t for t in out if isinstance(t, Threshold)]


def effective(user: Iterable[Threshold], *, use_defaults: bool = True) -> list[Threshold]:
    """The user's thresholds plus each default whose metric the user did not set."""
    user = list(user)
    if not use_defaults:
        return user
    named = {t.metric for t in user}
    return [t for t in defaults() if t.metric not in named] + user


Status = Literal["pass", "fail", "no data"]


@dataclass(frozen=True, slots=True)
class Verdict:
    """A threshold checked against a run: ``breached`` counts toward the exit code.

    A metric with no data (e.g. latency when nothing was delivered) does not breach.
    """

    threshold: Threshold
    actual: float | None
    status: Status

    @property
    def breached(self) -> bool:
        return self.status == "fail"

    def to_json(self) -> dict[str, object]:
        return {
            "threshold": self.threshold.expr,
            "metric": self.threshold.metric,
            "op": self.threshold.op,
            "limit": self.threshold.value,
            "actual": self.actual,
            "status": self.status,
        }


def evaluate(thresholds: Iterable[Threshold], metrics: Mapping[str, float | None]) -> list[Verdict]:
    verdicts = []
    for threshold in thresholds:
        actual = metrics.get(threshold.metric)
        if actual is None:
            verdicts.append(Verdict(threshold, None, "no data"))
        else:
            status: Status = "pass" if threshold.holds(actual) else "fail"
            verdicts.append(Verdict(threshold, float(actual), status))
    return verdicts
