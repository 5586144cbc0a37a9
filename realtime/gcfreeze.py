"""The garbage-collector policy: long-lived objects frozen, so full collections stay short.

CPython's full (generation-2) collection walks every object it tracks; a node holding
100,000 connections (about 50 tracked objects each) would stop for seconds each time.
Frozen objects (``gc.freeze``) are never walked. So the node collects and freezes at
start-up, then every ``interval`` seconds: ``gc.collect()`` (which walks only what is not
frozen: what was made since the last freeze and still lives) and ``gc.freeze()``. A short interval
keeps each of those collections small (a second of new connections, not ten).

What this relies on: a long-lived object that dies is freed by reference counting, not
left in a reference cycle, since a frozen cycle is never collected. A finished
connection breaks its cycles (``RealtimeWSProtocol._finished``; tests/test_gc.py checks
every way a connection ends). ``piggybong_realtime_gc_frozen_objects`` follows the connections
held down as well as up; if it only grows, something is leaking.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram

from realtime.metrics import NS

#: Pause buckets (seconds) of the collection histogram.
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class GcFreezer:
    """Owns the periodic collect-and-freeze task and the collector's metrics.

    ``start()`` freezes once and, with an ``interval``, starts the task; ``close()``
    cancels and awaits it and removes the ``gc.callbacks`` hook. Without an interval
    (None) only the start-up freeze happens.
    """

    def __init__(self, interval: float | None, registry: CollectorRegistry) -> None:
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self.pauses = Histogram(
            "pause_seconds", "Garbage-collector pauses, by generation",
            ["generation"], namespace=NS, subsystem="gc", registry=registry,
            buckets=PAUSE_BUCKETS,
        )
        self._by_generation = [self.pauses.labels(str(g)) for g in range(3)]
        self.frozen = Gauge(
            "frozen_objects", "Objects in the garbage collector's permanent generation",
            namespace=NS, subsystem="gc", registry=registry,
        )
        self.frozen.set_function(gc.get_freeze_count)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(
                time.perf_counter() - self._started_at)

    def freeze(self) -> None:
        """Collect what is not frozen, then freeze what survived."""
        gc.collect()
        gc.freeze()

    def start(self) -> None:
        gc.callbacks.append(self._on_gc)
        self.freeze()
        if self.interval:
            self._task = asyncio.create_task(self._run(self.interval), name="gc-freeze")

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.freeze()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
