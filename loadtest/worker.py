"""Where clients run: in this process or in worker processes, behind one seam.

A ``Driver`` runs one share of the clients (a ``Fleet``) and reports *ticks*:
the counts and histograms since the previous tick, gauges, and this process's
CPU time and loop lag. ``LocalWorker`` runs a driver on the caller's loop;
``ProcessWorker`` runs one in a spawned process and talks over a pipe:

    worker -> main: ("ready", open_file_limit) ("tick", tick) ("final", tick, loss) ("error", text)
    main -> worker: ("start", start_at) ("finish", published_until, log) ("exit",)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import signal
import threading
import time
import traceback
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from typing import Any, Final, Protocol, TypeVar

from loadtest.accounting import Loss, PublishLog, account
from loadtest.clients import Fleet
from loadtest.config import Scenario
from loadtest.sysstats import own_cpu_seconds, own_rss_bytes, pin_cpus, raise_nofile

T = TypeVar("T")
Tick = dict[str, Any]
TickHandler = Callable[[int, Tick], None]
READY_TIMEOUT: Final = 60.0
READER_JOIN_TIMEOUT: Final = 15.0
FREEZE_EVERY: Final = 1000  # gc.freeze() after this many new connections


class Driver:
    """One share of the clients, and what they measured."""

    def __init__(self, scenario: Scenario, run_id: str, worker: int, workers: int) -> None:
        self.fleet = Fleet(scenario, run_id, worker, workers)
        self._frozen_at = 0

    def start(self, start_at: float) -> None:
        self.fleet.start(start_at)

    def tick(self) -> Tick:
        """What happened since the previous tick."""
        fleet = self.fleet
        taken = fleet.meter.take()
        gauges = fleet.gauges()
        connected = gauges["open"]
        if connected - self._frozen_at >= FREEZE_EVERY:
            # long-lived connection objects out of the collector's way (full passes stall)
            gc.collect()
            gc.freeze()
            self._frozen_at = connected
        lag, fleet.max_lag = fleet.max_lag, 0.0
        return {
            "t": time.time(),
            **taken,
            "gauges": gauges,
            "cpu": own_cpu_seconds(),
            "rss": own_rss_bytes(),
            "lag": lag,
        }

    async def finish(self, log: PublishLog, published_until: float) -> tuple[Tick, Loss]:
        """Close every client, then account for what each was owed."""
        await self.fleet.shutdown()
        loss = account(log, self.fleet.receipts(), published_until=published_until)
        return self.tick(), loss


class WorkerHandle(Protocol):
    """A share of the clients. ``start`` begins (ticks then go to the handler given at
    creation, about once per sample interval); ``finish`` closes the clients and
    returns the last tick and the loss accounting; ``close`` releases everything and
    may be called at any time, more than once."""

    index: int

    async def start(self, start_at: float) -> None: ...

    async def finish(self, log: PublishLog, published_until: float) -> tuple[Tick, Loss]: ...

    async def close(self) -> None: ...


class LocalWorker:
    """A driver on the caller's loop, with a ticker task it owns."""

    def __init__(
        self, scenario: Scenario, run_id: str, index: int, count: int, on_tick: TickHandler
    ) -> None:
        self.index = index
        self.scenario = scenario
        self.driver = Driver(scenario, run_id, index, count)
        self.on_tick = on_tick
        self._ticker: asyncio.Task[None] | None = None

    async def start(self, start_at: float) -> None:
        self.driver.start(start_at)
        self._ticker = asyncio.get_running_loop().create_task(self._tick_forever())

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.scenario.sample_interval)
            self.on_tick(self.index, self.driver.tick())

    async def _stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def finish(self, log: PublishLog, published_until: float) -> tuple[Tick, Loss]:
        await self._stop_ticker()
        return await self.driver.finish(log, published_until)

    async def close(self) -> None:
        await self._stop_ticker()
        await self.driver.fleet.shutdown(close_timeout=1.0)


class WorkerFailed(Exception):
    """A worker process reported an error or went away."""


class ProcessWorker:
    """A driver in a spawned process. The pipe is read by a loop reader, and large
    messages are written from a thread so the loop keeps reading ticks."""

    def __init__(
        self, scenario: Scenario, run_id: str, index: int, count: int, on_tick: TickHandler
    ) -> None:
        self.index = index
        self.on_tick = on_tick
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=worker_main,
            args=(child, scenario.model_dump_json(), run_id, index, count),
            name=f"loadtest-worker-{index}",
            daemon=True,
        )
        self.proc.start()
        child.close()
        self.loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[int] = self.loop.create_future()
        self.final: asyncio.Future[tuple[Tick, Loss]] = self.loop.create_future()
        for future in (self.ready, self.final):  # a failure nobody waits for is not an error
            future.add_done_callback(_retrieve)
        self.reader = PipeReader(self.conn, self.loop, self._received, until=None)

    def _fail(self, error: BaseException) -> None:
        for future in (self.ready, self.final):
            if not future.done():
                future.set_exception(error)

    def _received(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "tick":
            self.on_tick(self.index, message[1])
        elif kind == "ready" and not self.ready.done():
            self.ready.set_result(message[1])
        elif kind == "final" and not self.final.done():
            self.final.set_result((message[1], message[2]))
        elif kind == "error":
            self._fail(WorkerFailed(f"worker {self.index}: {message[1]}"))
        elif kind == EOF:
            self._fail(WorkerFailed(f"worker {self.index} exited ({self.proc.exitcode})"))

    async def wait_ready(self) -> int:
        """The worker's open-file limit, once it is ready."""
        return await asyncio.wait_for(asyncio.shield(self.ready), READY_TIMEOUT)

    async def _send(self, message: tuple[Any, ...]) -> None:
        await self.loop.run_in_executor(None, self.conn.send, message)

    async def start(self, start_at: float) -> None:
        await self.wait_ready()
        await self._send(("start", start_at))

    async def finish(self, log: PublishLog, published_until: float) -> tuple[Tick, Loss]:
        await self._send(("finish", published_until, log))
        return await asyncio.wait_for(asyncio.shield(self.final), 120.0)

    async def close(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, ValueError):
                await self._send(("exit",))
            await self.loop.run_in_executor(None, self.proc.join, 10.0)
        if self.proc.is_alive():
            self.proc.terminate()
            await self.loop.run_in_executor(None, self.proc.join, 5.0)
        # the worker is gone, so its end of the pipe is closed and the reader saw EOF
        await self.loop.run_in_executor(None, self.reader.join, 5.0)
        self.conn.close()
        for future in (self.ready, self.final):
            if not future.done():
                future.cancel()


EOF: Final = "eof"


class PipeReader(threading.Thread):
    """Reads a pipe with blocking calls and hands each message to ``handler`` on ``loop``.

    A thread, because an event loop's reader would make the pipe non-blocking and
    ``Connection.recv`` cannot resume a message cut short. It ends after a message
    whose kind is ``until``, or at end of file (then handing over ``("eof",)``); its
    owner joins it.
    """

    def __init__(
        self,
        conn: Connection,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[[tuple[Any, ...]], None],
        *,
        until: str | None,
    ) -> None:
        super().__init__(name="loadtest-pipe-reader", daemon=True)
        self.conn = conn
        self.loop = loop
        self.handler = handler
        self.until = until
        self.start()

    def _hand(self, message: tuple[Any, ...]) -> bool:
        try:
            self.loop.call_soon_threadsafe(self.handler, message)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def run(self) -> None:
        while True:
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self._hand((EOF,))
                return
            if not self._hand(message) or message[0] == self.until:
                return


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


# ------------------------------------------------------------------ the worker process


def worker_main(conn: Connection, scenario_json: str, run_id: str, index: int, count: int) -> None:
    """Entry point of a worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and says finish
    limit = raise_nofile()
    pin_cpus(Scenario.model_validate_json(scenario_json).cpus)
    run_event_loop(_serve(conn, scenario_json, run_id, (index, count), limit))


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop when it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    result: T = uvloop.run(main)
    return result


async def _serve(
    conn: Connection, scenario_json: str, run_id: str, share: tuple[int, int], limit: int
) -> None:
    index, count = share
    loop = asyncio.get_running_loop()
    # control messages only: the parent sends at most start, finish and exit
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue(maxsize=8)
    reader = PipeReader(conn, loop, inbox.put_nowait, until="exit")  # EOF: the parent is gone
    driver: Driver | None = None
    ticker: asyncio.Task[None] | None = None
    try:
        scenario = Scenario.model_validate_json(scenario_json)
        driver = Driver(scenario, run_id, index, count)
        conn.send(("ready", limit))
        message = await inbox.get()
        if message[0] != "start":
            return
        driver.start(message[1])

        async def tick_forever(drv: Driver) -> None:
            while True:
                await asyncio.sleep(scenario.sample_interval)
                conn.send(("tick", drv.tick()))

        ticker = loop.create_task(tick_forever(driver))
        message = await inbox.get()
        ticker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ticker
        ticker = None
        if message[0] != "finish":
            return
        tick, loss = await driver.finish(message[2], message[1])
        conn.send(("final", tick, loss))
        while (await inbox.get())[0] not in ("exit", EOF):
            pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc(limit=5)))
    finally:
        if ticker is not None:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        if driver is not None:
            await driver.fleet.shutdown(close_timeout=1.0)
        # the reader ends at "exit" (the parent's close sends it) or when the parent is gone
        await loop.run_in_executor(None, reader.join, READER_JOIN_TIMEOUT)
        conn.close()
