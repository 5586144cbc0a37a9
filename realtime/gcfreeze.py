"""The garbage-collector policy: long-lived objects frozen, so full collections stay short.

CPython's full (generation-2) collection walks every object it tracks; a node holding
100,000 connections (about 50 tracked objects each) would stop for seconds each time.
Frozen objects (``gc.freeze``) are never walked. So the node collects and freezes at
start-up, then every ``interval`` seconds: ``gc.collect()`` (which walks only what is not
frozen: what was made since the last freeze and still lives) and ``gc.freeze()``. A short
interval keeps each of those collections small (a second of new connections, not ten).

The cost: an object frozen while reachable that later dies in a reference cycle is not
collected until the next *full* collection. Our own long-lived objects avoid that — a
finished connection breaks its cycles (``RealtimeWSProtocol._release``,
``RealtimeHttpToolsProtocol``; tests/test_gc.py) — but libraries' objects may not (an
HTTP client's requests in flight, say). So every ``full_interval`` seconds the node
thaws, collects everything and freezes again: one pause that walks every object,
bounding what such cycles can hold to what dies within that interval.

Metrics (a collector read at scrape time; the ``gc.callbacks`` hook only does arithmetic
on plain lists, it takes no lock): ``piggybong_realtime_gc_pause_seconds{generation}``
and ``piggybong_realtime_gc_frozen_objects`` (counted at start-up and at each full
collection, since counting walks every frozen object).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import math
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from realtime.metrics import NS

#: Pause buckets (seconds) of the collection histogram.
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GcFreezer:
    """Owns the collect-and-freeze task and the collector's metrics.

    ``start()`` freezes once and, with an ``interval`` or a ``full_interval``, starts the
    task; ``close()`` cancels and awaits it and removes the ``gc.callbacks`` hook. None
    for ``interval``: no periodic freeze; None for ``full_interval``: no full collection.
    """

    def __init__(
        self, interval: float | None, full_interval: float | None, registry: CollectorRegistry
    ) -> None:
        self.interval = interval
        self.full_interval = full_interval
        self.frozen = 0
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        #: per generation: pauses per bucket (the last one is +Inf), and their sum
        self._counts = [[0] * (len(PAUSE_BUCKETS) + 1) for _ in range(3)]
        self._sums = [0.0, 0.0, 0.0]
        registry.register(_Collector(self))

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        pause = time.perf_counter() - self._started_at
        generation = info["generation"]
        self._counts[generation][bisect.bisect_left(PAUSE_BUCKETS, pause)] += 1
        self._sums[generation] += pause

    def freeze(self) -> None:
        """Collect what is not frozen, then freeze what survived."""
        gc.collect()
        gc.freeze()

    def full(self) -> None:
        """Collect everything, frozen objects included, then freeze what survived."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self.frozen = gc.get_freeze_count()

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self.freeze()
        self.frozen = gc.get_freeze_count()
        if self.interval or self.full_interval:
            self._task = asyncio.create_task(self._run(), name="gc-freeze")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.full_interval if self.full_interval else math.inf
        while True:
            now = loop.time()
            next_freeze = now + self.interval if self.interval else math.inf
            full = next_full <= next_freeze  # decided before the sleep, not by a clock read after
            await asyncio.sleep(max(0.0, min(next_freeze, next_full) - now))
            if full:
                self.full()
                next_full = loop.time() + (self.full_interval or math.inf)
            else:
                self.freeze()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)


class _Collector:
    """Reads the freezer's plain counters into Prometheus metrics at scrape time."""

    def __init__(self, freezer: GcFreezer) -> None:
        self._freezer = freezer

    def collect(self) -> Iterator[Metric]:
        freezer = self._freezer
        pauses = HistogramMetricFamily(
            f"{NS}_gc_pause_seconds",
            "Garbage-collector pauses, by generation",
            labels=["generation"],
        )
        bounds = [str(b) for b in PAUSE_BUCKETS] + ["+Inf"]
        for generation in range(3):
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, freezer._counts[generation], strict=True):
                cumulative += count
                buckets.append((bound, float(cumulative)))
            pauses.add_metric([str(generation)], buckets, freezer._sums[generation])
        yield pauses
        yield GaugeMetricFamily(
            f"{NS}_gc_frozen_objects",
            "Objects in the collector's permanent generation (at start-up and at each full "
            "collection)",
            value=freezer.frozen,
        )
