"""Mergeable latency histograms and summary statistics, sans I/O.

Values are recorded in whole microseconds into log-linear buckets: exact below
128 us, then 128 buckets per power of two, so a reported percentile is within
1% of the true sample value. Histograms from many workers and intervals merge
by adding bucket counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

SUB_BITS = 7
SUB_COUNT = 1 << SUB_BITS  # 128


def bucket_index(value_us: int) -> int:
    """The bucket holding ``value_us`` (negative values count as 0)."""
    if value_us < SUB_COUNT:
        return max(value_us, 0)
    shift = value_us.bit_length() - SUB_BITS - 1
    return (shift + 1) * SUB_COUNT + ((value_us >> shift) - SUB_COUNT)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The inclusive range [low, high] of microsecond values in bucket ``index``."""
    if index < SUB_COUNT:
        return index, index
    shift = index // SUB_COUNT - 1
    low = (SUB_COUNT + index % SUB_COUNT) << shift
    return low, low + (1 << shift) - 1


class Histogram:
    """Counts of microsecond values by bucket, with exact count, sum, min and max."""

    __slots__ = ("buckets", "count", "max", "min", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value_us: int) -> None:
        value_us = max(value_us, 0)
        idx = bucket_index(value_us)
        buckets = self.buckets
        buckets[idx] = buckets.get(idx, 0) + 1
        if self.count == 0 or value_us < self.min:
            self.min = value_us
        self.max = max(self.max, value_us)
        self.count += 1
        self.total += value_us

    def record_seconds(self, seconds: float) -> None:
        self.record(int(seconds * 1_000_000))

    def merge(self, other: Histogram) -> None:
        if other.count == 0:
            return
        buckets = self.buckets
        for idx, n in other.buckets.items():
            buckets[idx] = buckets.get(idx, 0) + n
        if self.count == 0 or other.min < self.min:
            self.min = other.min
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, p: float) -> int | None:
        """The nearest-rank ``p``-th percentile (0 < p <= 100) in us; None when empty.

        The answer is the midpoint of the bucket holding the rank, clamped to the
        recorded min and max (so p100 is the exact max).
        """
        if not 0 < p <= 100:
            raise ValueError(f"percentile must be in (0, 100], not {p}")
        if self.count == 0:
            return None
        rank = nearest_rank(self.count, p)
        seen = 0
        for idx in sorted(self.buckets):
            seen += self.buckets[idx]
            if seen >= rank:
                low, high = bucket_bounds(idx)
                return min(max((low + high) // 2, self.min), self.max)
        return self.max  # unreachable while count == sum(buckets)

    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def items(self) -> Iterator[tuple[int, int]]:
        """(bucket low bound in us, count), ascending."""
        for idx in sorted(self.buckets):
            yield bucket_bounds(idx)[0], self.buckets[idx]

    def to_state(self) -> dict[str, Any]:
        """A plain, picklable and JSON-able form (bucket keys as ints)."""
        return {
            "buckets": dict(self.buckets),
            "count": self.count,
            "total": self.total,
            "min": self.min,
            "max": self.max,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> Histogram:
        hist = cls()
        hist.buckets = {int(k): int(v) for k, v in state["buckets"].items()}
        hist.count = int(state["count"])
        hist.total = int(state["total"])
        hist.min = int(state["min"])
        hist.max = int(state["max"])
        return hist


PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p999", 99.9),
)


@dataclass(frozen=True, slots=True)
class Summary:
    """A histogram's figures in milliseconds (None where there is no sample)."""

    count: int
    min: float | None
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    p999: float | None
    max: float | None

    def get(self, stat: str) -> float | None:
        value = getattr(self, stat)
        return None if value is None else float(value)

    def to_json(self) -> dict[str, Any]:
        return {
            name: getattr(self, name)
            for name in ("count", "min", "mean", "p50", "p90", "p95", "p99", "p999", "max")
        }


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000.0, 3)


def summarize(hist: Histogram) -> Summary:
    empty = hist.count == 0
    values = {name: _ms(hist.percentile(p)) for name, p in PERCENTILES}
    return Summary(
        count=hist.count,
        min=None if empty else _ms(hist.min),
        mean=_ms(hist.mean()),
        max=None if empty else _ms(hist.max),
        **values,
    )


def merged(hists: Iterable[Histogram]) -> Histogram:
    out = Histogram()
    for hist in hists:
        out.merge(hist)
    return out


def exact_percentile(values: list[int], p: float) -> int:
    """The nearest-rank percentile of raw values (the definition Histogram approximates)."""
    ordered = sorted(values)
    return ordered[nearest_rank(len(ordered), p) - 1]


def nearest_rank(count: int, p: float) -> int:
    """ceil(count * p / 100), at least 1, robust to float error (99.9% of 1000 is 999)."""
    return max(1, math.ceil(count * p / 100 - 1e-9))
