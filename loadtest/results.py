"""Merging the workers' ticks into a run's results, sans I/O.

``Aggregate`` takes ticks (from ``loadtest.worker``) and server usage samples
as they come; ``build_results`` turns it, the loss accounting and the phase
times into the results document (the JSON written by ``--out``), whose
``metrics`` map is what thresholds are checked against.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any, Final

from loadtest.accounting import Loss
from loadtest.clients import CATEGORIES, DELIVERY_CATEGORIES
from loadtest.config import Scenario
from loadtest.stats import Histogram, summarize
from loadtest.sysstats import Usage
from loadtest.thresholds import LATENCY_STATS, Verdict

RESULTS_VERSION: Final = 1
MAIN: Final = -1  # the worker index of the main process's own ticks (publisher)
CONNECT_FAILURE_KINDS: Final = ("dial:", "handshake:", "connect:", "connect_timeout")
CPU_WARNING: Final = 0.9  # share of one core above which a harness process may be the limit
LAG_WARNING: Final = 0.1  # seconds of event-loop lag worth a warning
SECRETS: Final = frozenset({"jwt_secret", "api_key"})  # never written to results


@dataclass(slots=True)
class Second:
    """What happened in one second of the run."""

    counts: Counter[str] = field(default_factory=Counter)
    latency: Histogram = field(default_factory=Histogram)
    gauges: dict[int, dict[str, int]] = field(default_factory=dict)
    server: tuple[float, Usage] | None = None
    lag: float = 0.0  # the longest harness event-loop lag seen in this second


@dataclass(frozen=True, slots=True)
class Phases:
    """Wall-clock times (unix s) of a run's phases; ``publish_*`` None when it never published."""

    started: float
    publish_start: float | None
    publish_end: float | None
    finished: float
    all_connected: float | None = None
    interrupted: bool = False

    @property
    def publish_seconds(self) -> float:
        if self.publish_start is None or self.publish_end is None:
            return 0.0
        return max(self.publish_end - self.publish_start, 0.0)


class Aggregate:
    """Totals, per-second series, latest gauges and process figures of a run so far."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.counts: Counter[str] = Counter()
        self.hists: dict[str, Histogram] = {c: Histogram() for c in CATEGORIES}
        self.gauges: dict[int, dict[str, int]] = {}
        self.cpu: dict[int, list[tuple[float, float]]] = {}
        self.lag: dict[int, float] = {}
        self.rss: dict[int, tuple[int, int]] = {}  # worker -> (peak rss, peak open connections)
        self.seconds: dict[int, Second] = {}
        self.server: list[tuple[float, Usage]] = []

    def second(self, t: float) -> Second:
        index = max(math.floor(t - self.started), 0)
        sec = self.seconds.get(index)
        if sec is None:
            sec = self.seconds[index] = Second()
        return sec

    def add(self, worker: int, tick: Mapping[str, Any]) -> None:
        sec = self.second(tick["t"])
        counts = tick.get("counts", {})
        self.counts.update(counts)
        sec.counts.update(counts)
        for category, state in tick.get("hists", {}).items():
            hist = Histogram.from_state(state)
            self.hists[category].merge(hist)
            if category in DELIVERY_CATEGORIES:
                sec.counts["deliveries"] += hist.count
            if category == "event":
                sec.latency.merge(hist)
        if "gauges" in tick:
            self.gauges[worker] = tick["gauges"]
            sec.gauges[worker] = tick["gauges"]
        if "cpu" in tick:
            self.cpu.setdefault(worker, []).append((tick["t"], tick["cpu"]))
        self.lag[worker] = max(self.lag.get(worker, 0.0), tick.get("lag", 0.0))
        sec.lag = max(sec.lag, tick.get("lag", 0.0))
        rss, peak_open = self.rss.get(worker, (0, 0))
        self.rss[worker] = (
            max(rss, tick.get("rss", 0)),
            max(peak_open, tick.get("gauges", {}).get("open", 0)),
        )

    def add_server(self, t: float, usage: Usage) -> None:
        self.server.append((t, usage))
        self.second(t).server = (t, usage)

    def gauge(self, name: str) -> int:
        return sum(g.get(name, 0) for g in self.gauges.values())

    @property
    def deliveries(self) -> int:
        return sum(self.hists[c].count for c in DELIVERY_CATEGORIES)

    def server_between(self, start: float, end: float) -> tuple[float, float] | None:
        """(cpu seconds, wall seconds) the server used between the samples nearest the times."""
        if len(self.server) < 2:
            return None
        first = min(self.server, key=lambda s: abs(s[0] - start))
        last = min(self.server, key=lambda s: abs(s[0] - end))
        if last[0] <= first[0]:
            return None
        return last[1].cpu_seconds - first[1].cpu_seconds, last[0] - first[0]


def _errors_by_kind(counts: Mapping[str, int]) -> dict[str, int]:
    return {
        k.removeprefix("error:"): v for k, v in sorted(counts.items()) if k.startswith("error:")
    }


def metrics(agg: Aggregate, loss: Loss, phases: Phases) -> dict[str, float | None]:
    """The flat map thresholds are checked against (see thresholds.METRICS)."""
    out: dict[str, float | None] = {}
    for category in CATEGORIES:
        summary = summarize(agg.hists[category])
        for stat in LATENCY_STATS:
            out[f"{category}_{stat}"] = summary.get(stat)
    for stat in LATENCY_STATS:
        out[stat] = out[f"event_{stat}"]
    counts = agg.counts
    errors = _errors_by_kind(counts)
    ops = counts.get("ops", 0)
    out["errors"] = counts.get("errors", 0)
    out["error_rate"] = counts.get("errors", 0) / ops if ops else None
    out["expected"] = loss.expected
    out["delivered"] = loss.delivered
    out["lost"] = loss.lost
    out["loss_rate"] = loss.lost / loss.expected if loss.expected else None
    out["duplicates"] = loss.duplicates
    out["out_of_order"] = loss.out_of_order
    out["premium_leaks"] = loss.premium_leaks
    seconds = phases.publish_seconds
    out["deliveries_per_s"] = agg.deliveries / seconds if seconds > 0 else None
    out["connected"] = counts.get("connects", 0)
    out["connect_failures"] = sum(
        n for k, n in errors.items() if k.startswith(CONNECT_FAILURE_KINDS)
    )
    out["closed_by_server"] = sum(n for k, n in counts.items() if k.startswith("close:"))
    out["publish_failures"] = sum(n for k, n in errors.items() if k.startswith("http:"))
    server = _server_figures(agg, phases)
    out["server_cpu_percent"] = server.get("cpu_percent_mean")
    out["server_rss_mb"] = server.get("rss_mb_max")
    return out


def _server_figures(agg: Aggregate, phases: Phases) -> dict[str, Any]:
    if not agg.server:
        return {}
    out: dict[str, Any] = {
        "rss_mb_max": round(max(u.rss_bytes for _, u in agg.server) / 2**20, 1),
        "rss_mb_end": round(agg.server[-1][1].rss_bytes / 2**20, 1),
    }
    if phases.publish_start is not None and phases.publish_end is not None:
        used = agg.server_between(phases.publish_start, phases.finished)
        if used is not None:
            cpu, wall = used
            out["cpu_seconds"] = round(cpu, 3)
            out["cpu_percent_mean"] = round(100 * cpu / wall, 1)
            out["deliveries_per_cpu_second"] = round(agg.deliveries / cpu) if cpu > 0 else None
    return out


def _timeseries(agg: Aggregate) -> list[dict[str, Any]]:
    rows = []
    latest: dict[int, dict[str, int]] = {}
    previous_server: tuple[float, Usage] | None = None
    for index in range(max(agg.seconds, default=-1) + 1):
        sec = agg.seconds.get(index, Second())
        latest.update(sec.gauges)
        row: dict[str, Any] = {
            "t": index,
            "open": sum(g.get("open", 0) for g in latest.values()),
            "connects": sec.counts.get("connects", 0),
            "deliveries": sec.counts.get("deliveries", 0),
            "published": sec.counts.get("published", 0),
            "errors": sec.counts.get("errors", 0),
            "harness_lag_ms": round(1000 * sec.lag, 1),
        }
        summary = summarize(sec.latency)
        row.update(p50=summary.p50, p95=summary.p95, p99=summary.p99)
        if sec.server is not None:
            t, usage = sec.server
            if previous_server is not None and t > previous_server[0]:
                used = usage.cpu_seconds - previous_server[1].cpu_seconds
                row["server_cpu_percent"] = round(100 * used / (t - previous_server[0]), 1)
            row["server_rss_mb"] = round(usage.rss_bytes / 2**20, 1)
            previous_server = sec.server
        rows.append(row)
    return rows


def _harness(agg: Aggregate, counts: Mapping[str, int], lanes: int) -> dict[str, Any]:
    warnings = []
    busiest: dict[str, float] = {}
    for worker, samples in sorted(agg.cpu.items()):
        peak = 0.0
        for (t0, c0), (t1, c1) in pairwise(samples):
            if t1 - t0 > 0.2:
                peak = max(peak, (c1 - c0) / (t1 - t0))
        name = "main" if worker == MAIN else f"worker {worker}"
        busiest[name] = round(100 * peak, 1)
        if peak > CPU_WARNING:
            warnings.append(
                f"{name} used {100 * peak:.0f}% of a core: the harness may be the bottleneck"
            )
    for worker, lag in sorted(agg.lag.items()):
        if lag > LAG_WARNING:
            name = "main" if worker == MAIN else f"worker {worker}"
            warnings.append(f"{name}'s event loop lagged {1000 * lag:.0f} ms")
    behind = counts.get("publish_behind", 0)
    if behind:
        warnings.append(f"{behind} publishes were not sent: the publisher lanes were full")
    unsent = counts.get("publish_unsent_at_stop", 0)
    # a few items waiting behind the requests in flight at the stop are normal
    if unsent > max(2 * lanes, 0.01 * counts.get("published", 0)):
        warnings.append(
            f"{unsent} publishes were still queued when publishing stopped: the publisher fell "
            "behind its rate (raise --publish-batch or --publish-lanes)"
        )
    memory = {}
    for worker, (rss, connections) in sorted(agg.rss.items()):
        name = "main" if worker == MAIN else f"worker {worker}"
        memory[name] = {
            "peak_rss_mb": round(rss / 2**20, 1),
            "kib_per_connection": round(rss / 1024 / connections, 1) if connections else None,
        }
    return {
        "processes": len(agg.cpu),
        "peak_cpu_percent": busiest,
        "memory": memory,
        "loop_lag_ms_max": round(1000 * max(agg.lag.values(), default=0.0), 1),
        "warnings": warnings,
    }


def build_results(
    scenario: Scenario,
    run_id: str,
    agg: Aggregate,
    *,
    loss: Loss,
    phases: Phases,
    verdicts: list[Verdict],
    workers: int,
    server_source: str | None,
    exit_code: int,
) -> dict[str, Any]:
    counts = agg.counts
    flat = metrics(agg, loss, phases)
    errors = _errors_by_kind(counts)
    ops = counts.get("ops", 0)
    closes = {
        k.removeprefix("close:"): v for k, v in sorted(counts.items()) if k.startswith("close:")
    }
    seconds = phases.publish_seconds
    peak = max((row["deliveries"] for row in _timeseries(agg)), default=0)
    return {
        "version": RESULTS_VERSION,
        "run_id": run_id,
        "started_at": phases.started,
        "interrupted": phases.interrupted,
        "scenario": scenario.model_dump(mode="json", exclude=set(SECRETS)),
        "workers": workers,
        "phases": {
            "connect_s": (
                round(phases.all_connected - phases.started, 3)
                if phases.all_connected is not None
                else None
            ),
            "publish_s": round(seconds, 3),
            "total_s": round(phases.finished - phases.started, 3),
        },
        "connections": {
            "target": scenario.peak_clients,
            "attempted": counts.get("attempts", 0),
            "connected": counts.get("connects", 0),
            "failed": flat["connect_failures"],
            "closed_by_server": closes,
            "connect_ms": summarize(agg.hists["connect"]).to_json(),
        },
        "publishing": {
            "sent": counts.get("published", 0),
            "accepted": counts.get("publish_accepted", 0),
            "rejected": counts.get("publish_rejected", 0),
            "not_sent_lanes_full": counts.get("publish_behind", 0),
            "not_sent_at_stop": counts.get("publish_unsent_at_stop", 0),
            "rate_per_s": round(counts.get("published", 0) / seconds, 2) if seconds else None,
            "http_ms": summarize(agg.hists["publish"]).to_json(),
        },
        "delivery": {
            **loss.to_json(),
            "received": agg.deliveries,
            "deliveries_per_s": (
                round(flat["deliveries_per_s"], 1) if flat["deliveries_per_s"] else None
            ),
            "peak_deliveries_per_s": peak,
        },
        "latency_ms": {
            category: summarize(agg.hists[category]).to_json() for category in DELIVERY_CATEGORIES
        },
        "errors": {
            "total": counts.get("errors", 0),
            "operations": ops,
            "rate": flat["error_rate"],
            "by_kind": errors,
        },
        "server": {"source": server_source, **_server_figures(agg, phases)},
        "harness": _harness(agg, counts, scenario.publish_lanes * scenario.publish_batch),
        "thresholds": [v.to_json() for v in verdicts],
        "passed": not any(v.breached for v in verdicts),
        "exit_code": exit_code,
        "metrics": flat,
        "timeseries": _timeseries(agg),
        "histograms": {
            category: [[low, n] for low, n in agg.hists[category].items()]
            for category in CATEGORIES
            if agg.hists[category].count
        },
    }


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}{unit}"


def summary_text(results: Mapping[str, Any]) -> str:
    """The readable end-of-run summary."""
    conn = results["connections"]
    pub = results["publishing"]
    dlv = results["delivery"]
    err = results["errors"]
    srv = results["server"]
    lines = [
        f"run {results['run_id']}  scenario {results['scenario']['scenario']}  "
        f"workers {results['workers']}  total {results['phases']['total_s']:.1f}s"
        + ("  (interrupted)" if results["interrupted"] else ""),
        f"connections  {conn['connected']:,} connected of {conn['target']:,} "
        f"({conn['failed']:,} failed)  connect p50 {_fmt(conn['connect_ms']['p50'], ' ms')} "
        f"p95 {_fmt(conn['connect_ms']['p95'], ' ms')}",
        f"publishing   {pub['sent']:,} sent, {pub['accepted']:,} accepted over "
        f"{results['phases']['publish_s']:.1f}s ({_fmt(pub['rate_per_s'], '/s')})",
        f"delivery     {dlv['delivered']:,} of {dlv['expected']:,} owed, lost {dlv['lost']:,}, "
        f"duplicates {dlv['duplicates']:,}, out of order {dlv['out_of_order']:,}, "
        f"premium leaks {dlv['premium_leaks']:,}",
        f"             {_fmt(dlv['deliveries_per_s'], '/s')} on average, "
        f"peak {dlv['peak_deliveries_per_s']:,}/s",
    ]
    for category, lat in results["latency_ms"].items():
        if lat["count"]:
            lines.append(
                f"latency {category:<13} n={lat['count']:,}  p50 {_fmt(lat['p50'])}  "
                f"p95 {_fmt(lat['p95'])}  p99 {_fmt(lat['p99'])}  max {_fmt(lat['max'])} ms"
            )
    rate = err["rate"]
    lines.append(
        f"errors       {err['total']:,} of {err['operations']:,} operations "
        f"({_fmt(None if rate is None else 100 * rate, '%', 3)})"
        + (
            "  " + ", ".join(f"{k}={v}" for k, v in list(err["by_kind"].items())[:8])
            if err["by_kind"]
            else ""
        )
    )
    if srv.get("source"):
        lines.append(
            f"server       cpu {_fmt(srv.get('cpu_percent_mean'), '%')} while publishing, "
            f"rss max {_fmt(srv.get('rss_mb_max'), ' MiB')}, "
            f"{_fmt(srv.get('deliveries_per_cpu_second'), '', 0)} deliveries per CPU-second "
            f"({srv['source']})"
        )
    for warning in results["harness"]["warnings"]:
        lines.append(f"warning      {warning}")
    for verdict in results["thresholds"]:
        mark = {"pass": "ok  ", "fail": "FAIL", "no data": "n/a "}[verdict["status"]]
        lines.append(
            f"threshold    {mark} {verdict['threshold']:<22} "
            f"actual {_fmt(verdict['actual'], '', 3)}"
        )
    lines.append("result       " + ("PASSED" if results["passed"] else "THRESHOLDS BREACHED"))
    return "\n".join(lines)
