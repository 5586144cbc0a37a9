"""A self-contained HTML report of a results document: tables and inline SVG charts.

Charts: latency percentile curves (on a "nines" axis; batches by the receiver's tier), the
event latency distribution, throughput and connections over time, latency over time, and
server CPU and memory when they were measured. Each chart has one y axis in one unit and
scales to the page's width. No script, no external asset.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from loadtest.stats import nearest_rank

#: The charts' drawing size; they scale to the page's width (width="100%").
WIDTH: Final = 1200
HEIGHT: Final = 300
PAD_L: Final = 64
PAD_R: Final = 16
PAD_T: Final = 44
PAD_B: Final = 40
COLORS: Final = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")
CURVE_POINTS: Final = (1, 10, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.9, 99.95, 99.99, 100)
#: Latency histograms charted and tabled by percentile: batches by the receiver's tier, since
#: the free tier's 2 s window would hide the paid tier's 250 ms in one curve.
CURVES: Final = (
    ("event", "event"), ("batch, free tier", "batch_free"), ("batch, paid tier", "batch_paid"),
    ("notification", "notification"),
)  # fmt: skip

Series = tuple[str, Sequence[float | None]]
#: Charts over time: title, (legend, timeseries column) pairs, y axis label.
TIME_CHARTS: Final = (
    ("Throughput", (("deliveries/s", "deliveries"), ("published/s", "published")), "per second"),
    ("Open connections", (("open", "open"),), "connections"),
    ("Event latency over time", (("p50", "p50"), ("p95", "p95"), ("p99", "p99")), "ms"),
    ("Server CPU", (("cpu %", "server_cpu_percent"),), "% of one core"),
    ("Server memory", (("rss MiB", "server_rss_mb"),), "MiB"),
    ("Harness event-loop lag", (("lag", "harness_lag_ms"),), "ms"),
)


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _nice_step(span: float, parts: int = 5) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) near ``span / parts``."""
    raw = span / parts if span > 0 else 1.0
    exp = 10.0 ** math.floor(math.log10(raw))
    for step in (1, 2, 2.5, 5, 10):
        if raw <= step * exp:
            return step * exp
    return 10 * exp


def _num(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10 or value == 0:
        return f"{value:.0f}"
    return f"{value:.3g}"


@dataclass(frozen=True, slots=True)
class Axis:
    """Maps data to [0, 1] along an axis, linear or log10, with its tick values."""

    lo: float
    hi: float
    log: bool = False

    @classmethod
    def linear(cls, lo: float, hi: float) -> Axis:
        step = _nice_step(hi - lo)
        return cls(math.floor(lo / step) * step, math.ceil(hi / step) * step or step)

    @classmethod
    def log10(cls, lo: float, hi: float) -> Axis:
        low = 10.0 ** math.floor(math.log10(max(lo, 1e-3)))
        return cls(low, max(10.0 ** math.ceil(math.log10(max(hi, low * 10))), low * 10), True)

    def frac(self, value: float) -> float:
        if self.log:
            value = max(value, self.lo)
            return (math.log10(value) - math.log10(self.lo)) / (
                math.log10(self.hi) - math.log10(self.lo)
            )
        return (value - self.lo) / ((self.hi - self.lo) or 1.0)

    def ticks(self) -> list[float]:
        if self.log:
            first, last = round(math.log10(self.lo)), round(math.log10(self.hi))
            return [10.0**e for e in range(first, last + 1)]
        step = _nice_step(self.hi - self.lo)
        count = round((self.hi - self.lo) / step)
        return [self.lo + i * step for i in range(count + 1)]


def line_chart(
    title: str,
    xs: Sequence[float],
    series: Sequence[Series],
    *,
    x_label: str,
    y_label: str,
    x_ticks: Sequence[tuple[float, str]] | None = None,
    log_y: bool = False,
) -> str:
    """An SVG line chart; ``None`` values break a line."""
    values = [v for _, ys in series for v in ys if v is not None]
    if not xs or not values:
        return f"<p class=empty>{_esc(title)}: no data</p>"
    x_axis = Axis(min(xs), max(xs)) if x_ticks else Axis.linear(min(xs), max(xs))
    y_axis = Axis.log10(min(values), max(values)) if log_y else Axis.linear(0, max(values))
    plot_w = WIDTH - PAD_L - PAD_R
    plot_h = HEIGHT - PAD_T - PAD_B

    def sx(x: float) -> float:
        return PAD_L + x_axis.frac(x) * plot_w

    def sy(y: float) -> float:
        return PAD_T + plot_h - y_axis.frac(y) * plot_h

    parts = [_frame(title, x_label, y_label)]
    for y in y_axis.ticks():
        parts.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" '
            f'stroke="#e5e7eb"/><text x="{PAD_L - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">'
            f"{_num(y)}</text>"
        )
    ticks = x_ticks or [(x, _num(x)) for x in x_axis.ticks()]
    for x, label in ticks:
        anchor = "end" if sx(x) > WIDTH - PAD_R - 20 else "middle"
        parts.append(
            f'<text x="{sx(x):.1f}" y="{HEIGHT - PAD_B + 16}" text-anchor="{anchor}">'
            f"{_esc(label)}</text>"
        )
    legend_x = float(PAD_L)
    for k, (name, ys) in enumerate(series):
        color = COLORS[k % len(COLORS)]
        path: list[str] = []
        pen_up = True
        for x, value in zip(xs, ys, strict=False):
            if value is None:
                pen_up = True
                continue
            path.append(f"{'M' if pen_up else 'L'}{sx(x):.1f},{sy(value):.1f}")
            pen_up = False
        parts.append(f'<path d="{" ".join(path)}" stroke="{color}" fill="none" stroke-width="2"/>')
        parts.append(
            f'<rect x="{legend_x:.0f}" y="{PAD_T - 16}" width="12" height="4" fill="{color}"/>'
            f'<text x="{legend_x + 16:.0f}" y="{PAD_T - 11}">{_esc(name)}</text>'
        )
        legend_x += 28 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def bar_chart(title: str, bars: Sequence[tuple[str, float]], *, x_label: str, y_label: str) -> str:
    if not bars:
        return f"<p class=empty>{_esc(title)}: no data</p>"
    y_axis = Axis.linear(0, max(v for _, v in bars))
    plot_w = WIDTH - PAD_L - PAD_R
    plot_h = HEIGHT - PAD_T - PAD_B
    width = plot_w / len(bars)
    parts = [_frame(title, x_label, y_label)]
    for y in y_axis.ticks():
        top = PAD_T + plot_h - y_axis.frac(y) * plot_h
        parts.append(
            f'<line x1="{PAD_L}" x2="{WIDTH - PAD_R}" y1="{top:.1f}" y2="{top:.1f}" '
            f'stroke="#e5e7eb"/><text x="{PAD_L - 6}" y="{top + 4:.1f}" text-anchor="end">'
            f"{_num(y)}</text>"
        )
    every = max(1, len(bars) // 10)
    for i, (label, value) in enumerate(bars):
        h = y_axis.frac(value) * plot_h
        x = PAD_L + i * width
        parts.append(
            f'<rect x="{x + 1:.1f}" y="{PAD_T + plot_h - h:.1f}" width="{max(width - 2, 1):.1f}" '
            f'height="{h:.1f}" fill="{COLORS[0]}"><title>{_esc(label)}: {value:,.0f}</title></rect>'
        )
        if i % every == 0:
            parts.append(
                f'<text x="{x + width / 2:.1f}" y="{HEIGHT - PAD_B + 16}" '
                f'text-anchor="middle">{_esc(label)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _frame(title: str, x_label: str, y_label: str) -> str:
    """The opening of a chart: styled by attributes, so it also stands alone."""
    plot_h = HEIGHT - PAD_T - PAD_B
    middle = PAD_T + plot_h / 2
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="100%" role="img" aria-label="{_esc(title)}" '
        f'font-family="system-ui, sans-serif" font-size="11" fill="#333">'
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="#fff"/>'
        f'<text x="{WIDTH / 2}" y="15" text-anchor="middle" font-size="13" font-weight="600">'
        f"{_esc(title)}</text>"
        f'<rect x="{PAD_L}" y="{PAD_T}" width="{WIDTH - PAD_L - PAD_R}" height="{plot_h}" '
        f'fill="none" stroke="#bbb"/>'
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" text-anchor="middle">{_esc(x_label)}</text>'
        f'<text x="14" y="{middle}" text-anchor="middle" '
        f'transform="rotate(-90 14 {middle})">{_esc(y_label)}</text>'
    )


def percentile_from_pairs(pairs: Sequence[Sequence[int]], p: float) -> float | None:
    """The nearest-rank percentile (ms) of a histogram given as [[low_us, count], ...]."""
    total = sum(n for _, n in pairs)
    if total == 0:
        return None
    rank = nearest_rank(total, p)
    seen = 0
    for low, n in pairs:
        seen += n
        if seen >= rank:
            return low / 1000.0
    return pairs[-1][0] / 1000.0


def _nines(p: float) -> float:
    return -math.log10(max(1 - p / 100, 1e-4))


def _curves(hists: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(legend, histogram) pairs present; the tier split where it exists, else ``batch``."""
    curves = [(name, key) for name, key in CURVES if key in hists]
    if "batch" in hists and not any(key.startswith("batch_") for _, key in curves):
        curves.insert(1, ("batch", "batch"))
    return curves


def latency_curves(results: Mapping[str, Any]) -> str:
    hists = results.get("histograms", {})
    xs = [_nines(p) for p in CURVE_POINTS]
    series = [
        (name, [percentile_from_pairs(hists[key], p) for p in CURVE_POINTS])
        for name, key in _curves(hists)
    ]
    ticks = [(_nines(p), f"p{p:g}") for p in (50, 90, 99, 99.9, 99.99)]
    return line_chart(
        "Latency by percentile (log scale)",
        xs,
        series,
        x_label="percentile",
        y_label="ms",
        x_ticks=ticks,
        log_y=True,
    )


def latency_histogram(results: Mapping[str, Any], category: str = "event") -> str:
    """Counts in bins a quarter of a power of two wide, from the fine buckets."""
    pairs = results.get("histograms", {}).get(category, [])
    bins: dict[int, int] = {}
    for low, n in pairs:
        index = math.floor(4 * math.log2(max(low, 1)))
        bins[index] = bins.get(index, 0) + n
    if not bins:
        return f"<p class=empty>{category} latency distribution: no data</p>"
    bars = [
        (f"{2 ** (i / 4) / 1000:.3g}", float(bins.get(i, 0)))
        for i in range(min(bins), max(bins) + 1)
    ]
    return bar_chart(
        f"{category.capitalize()} latency distribution",
        bars,
        x_label="ms (bin lower bound)",
        y_label="deliveries",
    )


def tier_batch_rows(hists: Mapping[str, Any]) -> dict[str, dict[str, object]]:
    """Batch latency rows by tier from the histograms (nearest rank, ms)."""
    rows: dict[str, dict[str, object]] = {}
    for name, key in CURVES:
        pairs = hists.get(key) if key.startswith("batch_") else None
        if pairs:
            row: dict[str, object] = {"count": sum(n for _, n in pairs)}
            for label, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100)):
                row[label] = percentile_from_pairs(pairs, p)
            rows[name] = row
    return rows


def _row(label: str, value: object) -> str:
    return f"<tr><th>{_esc(label)}</th><td>{_esc(value)}</td></tr>"


def _table(title: str, rows: Sequence[tuple[str, object]]) -> str:
    body = "".join(_row(k, v) for k, v in rows)
    return f"<h2>{_esc(title)}</h2><table>{body}</table>"


def render_html(results: Mapping[str, Any]) -> str:
    ts = results.get("timeseries", [])
    xs = [row["t"] for row in ts]

    def col(name: str) -> list[float | None]:
        return [row.get(name) for row in ts]

    conn = results["connections"]
    dlv = results["delivery"]
    srv = results["server"]
    started = datetime.fromtimestamp(results["started_at"], UTC).isoformat(timespec="seconds")
    verdict = "PASSED" if results["passed"] else "THRESHOLDS BREACHED"
    summary_rows: list[tuple[str, object]] = [
        ("started", started),
        ("scenario", results["scenario"]["scenario"]),
        ("target", results["scenario"]["target"]),
        ("connected", f"{conn['connected']:,} of {conn['target']:,}"),
        ("delivered / owed", f"{dlv['delivered']:,} / {dlv['expected']:,} (lost {dlv['lost']:,})"),
        ("deliveries per second", dlv["deliveries_per_s"]),
        ("error rate", results["errors"]["rate"]),
        ("server deliveries per CPU-second", srv.get("deliveries_per_cpu_second", "-")),
        ("exit code", results["exit_code"]),
    ]
    threshold_rows = "".join(
        f"<tr class={'fail' if v['status'] == 'fail' else 'ok'}><td>{_esc(v['threshold'])}</td>"
        f"<td>{_esc(v['actual'])}</td><td>{_esc(v['status'])}</td></tr>"
        for v in results["thresholds"]
    )
    latency_rows = "".join(
        f"<tr><td>{_esc(cat)}</td>"
        + "".join(f"<td>{_esc(lat[k])}</td>" for k in ("count", "p50", "p95", "p99", "max"))
        + "</tr>"
        for cat, lat in {
            **results["latency_ms"],
            **tier_batch_rows(results.get("histograms", {})),
            "connect": conn["connect_ms"],
        }.items()
    )
    charts = [latency_curves(results), latency_histogram(results)]
    for title, columns, y_label in TIME_CHARTS:
        if any(row.get(columns[0][1]) is not None for row in ts):
            series = [(name, col(column)) for name, column in columns]
            charts.append(line_chart(title, xs, series, x_label="seconds", y_label=y_label))
    errors = results["errors"]["by_kind"] or {"none": 0}
    warnings = "".join(f"<li>{_esc(w)}</li>" for w in results["harness"]["warnings"])
    scenario_rows = list(results["scenario"].items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>PiggyBong load test {_esc(results["run_id"])}</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#111}}
table{{border-collapse:collapse;margin:8px 0}} td,th{{border:1px solid #ddd;padding:3px 8px;
text-align:left}} tr.fail td{{background:#fee2e2}} tr.ok td{{background:#f0fdf4}}
svg{{display:block;margin:12px 0;width:100%;height:auto}} .verdict{{font-size:18px;font-weight:700}}
.empty{{color:#888}}
</style></head><body>
<h1>Load test {_esc(results["run_id"])}</h1>
<p class=verdict>{verdict}</p>
{_table("Summary", summary_rows)}
<h2>Thresholds</h2><table><tr><th>threshold</th><th>actual</th><th>status</th></tr>
{threshold_rows}</table>
<h2>Latency (ms)</h2><table><tr><th>kind</th><th>count</th><th>p50</th><th>p95</th>
<th>p99</th><th>max</th></tr>{latency_rows}</table>
{"".join(charts)}
{_table("Errors", list(errors.items()))}
{_table("Closed by server", list(conn["closed_by_server"].items()) or [("none", 0)])}
{f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""}
{_table("Scenario", scenario_rows)}
</body></html>
"""
