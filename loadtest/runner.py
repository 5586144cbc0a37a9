"""One load-test run, start to finish.

Phases: preflight (target healthy, file and port limits), start the workers,
connect (without stages: until every client is subscribed or has failed), publish
(the scenario's ``duration``, or through the stages), drain (wait for what is in
flight), finish (workers close their clients and account for loss), then
results and threshold verdicts. The main process publishes, samples the
server, and draws the progress line; clients run in workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TextIO

from loadtest.accounting import Loss, PublishLog
from loadtest.clients import BATCH_SLACK, Meter
from loadtest.config import Scenario, auto_workers
from loadtest.http import HttpConnection, HttpFailure
from loadtest.publisher import Publisher
from loadtest.results import MAIN, Aggregate, Phases, build_results, metrics
from loadtest.stats import Histogram, summarize
from loadtest.sysstats import (
    MetricsSampler,
    ProcSampler,
    Sampler,
    ephemeral_ports,
    find_listener,
    own_cpu_seconds,
    own_rss_bytes,
    raise_nofile,
)
from loadtest.thresholds import effective, evaluate
from loadtest.worker import LocalWorker, ProcessWorker, Tick, WorkerFailed, WorkerHandle

EXIT_OK: Final = 0
EXIT_ABORTED: Final = 1
EXIT_CONFIG: Final = 2
EXIT_THRESHOLDS: Final = 99
EXIT_INTERRUPTED: Final = 130
FD_RESERVE: Final = 64
PORT_RESERVE: Final = 1000


@dataclass(frozen=True, slots=True)
class Aborted:
    """A run that could not start or went wrong: nothing to report but this."""

    reason: str
    exit_code: int = EXIT_ABORTED


@dataclass(frozen=True, slots=True)
class Outcome:
    results: dict[str, Any]
    exit_code: int


# ------------------------------------------------------------------ preflight


def plan_sources(scenario: Scenario, ports: int) -> Scenario | Aborted:
    """Add 127.0.0.x source addresses when one address's port range is too small."""
    per_address = max(ports - PORT_RESERVE, 1)
    needed = math.ceil(scenario.peak_clients / per_address)
    have = len(scenario.source_addresses)
    if have == 0 and needed > 1:
        if needed > 254:
            return Aborted(f"{scenario.peak_clients} clients need {needed} source addresses")
        sources = [f"127.0.0.{i}" for i in range(1, needed + 1)]
        return scenario.model_copy(update={"source_addresses": sources})
    if have and needed > have:
        return Aborted(
            f"{scenario.peak_clients} clients need at least {needed} source addresses "
            f"({per_address} ports each), {have} given"
        )
    return scenario


async def check_target(scenario: Scenario) -> Aborted | None:
    conn = HttpConnection(scenario.host, scenario.port, timeout=5.0)
    try:
        answer = await conn.request("GET", "/healthz")
    finally:
        await conn.close()
    if isinstance(answer, HttpFailure):
        return Aborted(
            f"target {scenario.target} is not reachable: {answer.kind} ({answer.detail})"
        )
    if answer.status != 200:
        return Aborted(f"target {scenario.target}/healthz answered {answer.status}")
    return None


async def make_sampler(scenario: Scenario) -> tuple[Sampler | None, str]:
    """The server usage source, and a note on what was chosen."""
    if scenario.server_pid == "auto":
        pid = find_listener(scenario.port)
        if pid is None:
            return None, f"no process found listening on port {scenario.port}"
        return ProcSampler([pid]), f"server pid {pid} (and children) from /proc"
    if scenario.server_pid:
        return ProcSampler(list(scenario.server_pid)), "server pids from /proc"
    if scenario.server_metrics:
        sampler = MetricsSampler(scenario.host, scenario.port)
        if await sampler.sample() is not None:
            return sampler, "server process_* metrics from /metrics"
        await sampler.close()
        return None, "no process_* metrics at /metrics (use --server-pid)"
    return None, "server usage not measured"


# ------------------------------------------------------------------ progress


class Progress:
    """The live status line on a stream: refreshed in place on a terminal."""

    def __init__(self, stream: TextIO, mode: str, target: int) -> None:
        self.stream = stream
        tty = stream.isatty()
        self.refresh = mode == "auto" and tty
        self.enabled = mode != "off"
        self.every = 1 if (mode == "line" or tty) else 5
        self.target = target
        self.phase = "connect"
        self._last: tuple[float, int, int, int] | None = None
        self._latency = Histogram()
        self._count = 0

    def latency(self, hist: Histogram) -> None:
        self._latency.merge(hist)

    def draw(self, agg: Aggregate, server: str) -> None:
        now = time.time()
        totals = (
            now,
            agg.counts.get("connects", 0),
            agg.counts.get("published", 0),
            agg.deliveries,
        )
        self._count += 1
        if not self.enabled or self._last is None:
            self._last = totals
            return
        if self._count % self.every:
            return
        dt = max(totals[0] - self._last[0], 1e-3)
        rates = [(totals[i] - self._last[i]) / dt for i in (1, 2, 3)]
        self._last = totals
        lat = summarize(self._latency)
        self._latency = Histogram()
        line = (
            f"{now - agg.started:6.0f}s {self.phase:<8} open {agg.gauge('open'):,}/{self.target:,}"
            f"  conn/s {rates[0]:,.0f}  pub/s {rates[1]:,.0f}  deliv/s {rates[2]:,.0f}"
            f"  p50 {_ms(lat.p50)} p95 {_ms(lat.p95)} p99 {_ms(lat.p99)} ms"
            f"  err {agg.counts.get('errors', 0):,}{server}"
        )
        if self.refresh:
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\x1b[K" if self.refresh else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.refresh:
            self.stream.write("\n")
            self.stream.flush()


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ------------------------------------------------------------------ the run


class Run:
    """The state of one run; ``execute`` owns every task and worker it starts."""

    def __init__(self, scenario: Scenario, stream: TextIO, interrupt: asyncio.Event) -> None:
        self.scenario = scenario
        self.run_id = secrets.token_hex(3)
        self.workers = auto_workers(scenario)
        self.interrupt = interrupt
        self.meter = Meter()  # the main process's own counts (publishing)
        self.log = PublishLog()
        self.agg = Aggregate(time.time())
        self.progress = Progress(stream, scenario.progress, scenario.peak_clients)
        self.handles: list[WorkerHandle] = []
        self.sampler: Sampler | None = None
        self.server_line = ""

    def on_tick(self, worker: int, tick: Tick) -> None:
        self.agg.add(worker, tick)
        state = tick.get("hists", {}).get("event")
        if state is not None:
            self.progress.latency(Histogram.from_state(state))

    async def _main_ticks(self) -> None:
        """Ship the publisher's counts, sample the server, draw progress; forever."""
        previous = None
        while True:
            await asyncio.sleep(self.scenario.sample_interval)
            now = time.time()
            self.agg.add(
                MAIN,
                {"t": now, **self.meter.take(), "cpu": own_cpu_seconds(), "rss": own_rss_bytes()},
            )
            if self.sampler is not None:
                usage = await self.sampler.sample()
                if usage is not None:
                    self.agg.add_server(now, usage)
                    if previous is not None and now > previous[0]:
                        cpu = 100 * (usage.cpu_seconds - previous[1]) / (now - previous[0])
                        self.server_line = f"  srv {cpu:.0f}% {usage.rss_bytes / 2**20:.0f}MiB"
                    previous = (now, usage.cpu_seconds)
            self.progress.draw(self.agg, self.server_line)

    async def _sample_server_now(self) -> None:
        if self.sampler is not None:
            usage = await self.sampler.sample()
            if usage is not None:
                self.agg.add_server(time.time(), usage)

    async def _wait(self, seconds: float) -> bool:
        """Sleep, or return True early when interrupted."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.interrupt.wait(), max(seconds, 0.0))
        return self.interrupt.is_set()

    async def _start_workers(self) -> Aborted | None:
        limit = raise_nofile()
        if self.workers == 0:
            need = self.scenario.peak_clients + FD_RESERVE + self.scenario.publish_lanes
            if need > limit:
                return Aborted(
                    f"{self.scenario.peak_clients} clients need {need} open files, this process "
                    f"may have {limit}: use --workers N"
                )
            self.handles = [LocalWorker(self.scenario, self.run_id, 0, 1, self.on_tick)]
            return None
        procs = [
            ProcessWorker(self.scenario, self.run_id, i, self.workers, self.on_tick)
            for i in range(self.workers)
        ]
        self.handles = list(procs)
        per_worker = math.ceil(self.scenario.peak_clients / self.workers)
        for proc in procs:
            worker_limit = await proc.wait_ready()
            if per_worker + FD_RESERVE > worker_limit:
                return Aborted(
                    f"{per_worker} clients per worker exceed its open-file limit {worker_limit}: "
                    f"use more --workers"
                )
        return None

    async def _connect_phase(self) -> float | None:
        """Without stages: wait until every client is subscribed or failed."""
        scenario = self.scenario
        deadline = time.time() + scenario.ramp_seconds + scenario.connect_timeout + 5.0
        while time.time() < deadline:
            settled = self.agg.gauge("subscribed") + self.agg.gauge("failed")
            if settled >= scenario.clients:
                return time.time()
            if await self._wait(0.1):
                return None
        self.progress.note(
            f"connect phase timed out: {self.agg.gauge('subscribed')} of {scenario.clients} "
            "subscribed; publishing anyway"
        )
        return None

    async def execute(self) -> Outcome | Aborted:
        scenario = self.scenario
        problem = await check_target(scenario)
        if problem is not None:
            return problem
        self.sampler, note = await make_sampler(scenario)
        self.progress.note(
            f"run {self.run_id}: {scenario.peak_clients:,} clients on {self.workers or 'no'} "
            f"worker process(es) against {scenario.target}; {note}"
        )
        ticker: asyncio.Task[None] | None = None
        publisher: Publisher | None = None
        try:
            problem = await self._start_workers()
            if problem is not None:
                return problem
            start_at = time.time() + 0.2
            self.agg.started = start_at
            for handle in self.handles:
                await handle.start(start_at)
            ticker = asyncio.get_running_loop().create_task(self._main_ticks())
            all_connected = None
            if not scenario.stages:
                all_connected = await self._connect_phase()
            publish_start = publish_end = None
            if not self.interrupt.is_set():
                self.progress.phase = "publish"
                publisher = Publisher(
                    scenario, self.run_id, self.meter, self.log, self._population(start_at)
                )
                await self._sample_server_now()
                publisher.start()
                publish_start = time.time()
                length = (
                    scenario.stage_seconds - (publish_start - start_at)
                    if scenario.stages
                    else scenario.duration
                )
                await self._wait(length)
                publish_end = await publisher.stop()
                publisher = None
                self.progress.phase = "drain"
                await self._wait(self._drain_seconds())
            await self._sample_server_now()
            finished = time.time()
            self.progress.phase = "finish"
            loss = Loss()
            finals = await asyncio.gather(
                *(h.finish(self.log, publish_end or finished) for h in self.handles)
            )
            for handle, (tick, part) in zip(self.handles, finals, strict=True):
                self.on_tick(handle.index, tick)
                loss.merge(part)
            phases = Phases(
                start_at,
                publish_start,
                publish_end,
                finished,
                all_connected,
                self.interrupt.is_set(),
            )
            return self._outcome(loss, phases)
        except (WorkerFailed, TimeoutError) as exc:
            return Aborted(f"a worker failed: {exc}")
        finally:
            if publisher is not None:
                await publisher.stop()
            if ticker is not None:
                await _cancel_and_wait(ticker)
            for handle in self.handles:
                await handle.close()
            if isinstance(self.sampler, MetricsSampler):
                await self.sampler.close()
            self.progress.close()

    def _drain_seconds(self) -> float:
        """The scenario's drain, or longer: enough for the longest announced batch window."""
        window = max((g.get("batch_window_ms", 0) for g in self.agg.gauges.values()), default=0)
        drain = self.scenario.drain
        if self.scenario.spending_rate > 0 and window / 1000.0 + BATCH_SLACK > drain:
            drain = window / 1000.0 + BATCH_SLACK
            self.progress.note(f"drain {drain:g}s: the server batches spending for {window} ms")
        return drain

    def _population(self, start_at: float) -> Callable[[float], int]:
        offset = time.time() - start_at

        def online(elapsed: float) -> int:
            return self.scenario.target_at(elapsed + offset)

        return online

    def _outcome(self, loss: Loss, phases: Phases) -> Outcome:
        self.agg.add(MAIN, {"t": time.time(), **self.meter.take(), "cpu": own_cpu_seconds()})
        rules = effective(
            self.scenario.threshold_list, use_defaults=self.scenario.default_thresholds
        )
        verdicts = evaluate(rules, metrics(self.agg, loss, phases))
        if phases.interrupted:
            code = EXIT_INTERRUPTED
        elif any(v.breached for v in verdicts):
            code = EXIT_THRESHOLDS
        else:
            code = EXIT_OK
        source = self.sampler.source if self.sampler is not None else None
        results = build_results(
            self.scenario,
            self.run_id,
            self.agg,
            loss=loss,
            phases=phases,
            verdicts=verdicts,
            workers=self.workers,
            server_source=source,
            exit_code=code,
        )
        return Outcome(results, code)


async def run(
    scenario: Scenario, *, stream: TextIO | None = None, interrupt: asyncio.Event | None = None
) -> Outcome | Aborted:
    """Run ``scenario`` against its target; progress goes to ``stream`` (stderr)."""
    planned = plan_sources(scenario, ephemeral_ports())
    if isinstance(planned, Aborted):
        return planned
    runner = Run(planned, stream or sys.stderr, interrupt or asyncio.Event())
    return await runner.execute()


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` until it is done: a cancellation swallowed inside it is asked again."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    if not task.cancelled() and task.exception() is not None:
        raise task.exception()  # type: ignore[misc]
