"""The backend's side of the load: events, spending updates and notifications over HTTP.

A pacer turns the scenario's rates into items (open loop: it does not wait for
answers) and hands each to the lane of its key, so every key's events are sent
in order over one connection. A lane is one keep-alive connection with a
bounded queue: at the bound a new item is not sent and is counted as
``publish_behind`` (the harness could not keep up; nothing is owed for it).
Each item is numbered and logged in the ``PublishLog`` at the moment it is
written, with its send time embedded in its data (``seq``, ``t``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

from loadtest.accounting import PublishLog, notify_key
from loadtest.clients import Meter, artist_channel, user_channel, user_name
from loadtest.config import Scenario
from loadtest.http import HttpConnection, HttpFailure

EVENT_TYPES: Final = ("comeback.announced", "chart.updated", "live.started", "merch.dropped")
SPENDING_EVENT: Final = "spending.created"
PRIORITIES: Final = ("critical", "high", "normal", "low")
PACER_PERIOD: Final = 0.01
DATA_OVERHEAD: Final = 48  # bytes of {"seq":…,"t":…,"pad":""} before padding


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to send: an event on ``channel`` or a notification to ``user``."""

    kind: Literal["publish", "notify"]
    key: str
    target: str  # channel or user
    event: str
    premium: bool = False


class Lane:
    """One connection sending its items in order; at most ``capacity`` waiting."""

    def __init__(self, publisher: Publisher, conn: HttpConnection, capacity: int) -> None:
        self.publisher = publisher
        self.conn = conn
        self.capacity = capacity
        self.items: deque[Item] = deque()
        self.wake = asyncio.Event()
        self.stopping = False

    def put(self, item: Item) -> bool:
        if len(self.items) >= self.capacity or self.stopping:
            return False
        self.items.append(item)
        self.wake.set()
        return True

    async def run(self) -> None:
        limit = self.publisher.scenario.publish_batch
        while True:
            if not self.items:
                if self.stopping:
                    return
                self.wake.clear()
                await self.wake.wait()
                continue
            batch = [self.items.popleft()]
            if batch[0].kind == "publish":
                while self.items and len(batch) < limit and self.items[0].kind == "publish":
                    batch.append(self.items.popleft())
            await self.publisher.send(self.conn, batch)


class Publisher:
    """Publishes at the scenario's rates until ``stop()``; owns its pacer and lane tasks.

    ``population(elapsed)`` is how many users may be online (spending updates and
    notifications go to users below it).
    """

    def __init__(
        self,
        scenario: Scenario,
        run_id: str,
        meter: Meter,
        log: PublishLog,
        population: Callable[[float], int],
    ) -> None:
        self.scenario = scenario
        self.run_id = run_id
        self.meter = meter
        self.log = log
        self.population = population
        self.rng = random.Random(scenario.seed)
        self.headers = {
            "Authorization": f"Bearer {scenario.api_key}",
            "Content-Type": "application/json",
        }
        self.pad = "x" * max(scenario.payload_bytes - DATA_OVERHEAD, 0)
        self.lanes = [
            Lane(
                self,
                HttpConnection(scenario.host, scenario.port, timeout=scenario.request_timeout),
                scenario.publish_queue,
            )
            for _ in range(scenario.publish_lanes)
        ]
        self._lane_of: dict[str, Lane] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.started_at = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.started_at = time.time()
        self._tasks = [loop.create_task(lane.run()) for lane in self.lanes]
        self._tasks.append(loop.create_task(self._pace()))

    async def stop(self) -> float:
        """Stop sending; unsent items are dropped, answers in flight awaited. Returns the
        time publishing ended (every logged item was sent before it)."""
        pacer = self._tasks[-1] if self._tasks else None
        if pacer is not None:
            pacer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pacer
        ended = time.time()
        for lane in self.lanes:
            lane.stopping = True
            self.meter.counts["publish_unsent_at_stop"] += len(lane.items)
            lane.items.clear()
            lane.wake.set()
        lanes = self._tasks[:-1]
        if lanes:
            _, late = await asyncio.wait(lanes, timeout=self.scenario.request_timeout + 1.0)
            for task in late:
                task.cancel()
            await asyncio.gather(*lanes, return_exceptions=True)
        self._tasks = []
        for lane in self.lanes:
            await lane.conn.close()
        return ended

    # ------------------------------------------------------------ pacing

    async def _pace(self) -> None:
        credit = [0.0, 0.0, 0.0]
        last = time.time()
        while True:
            await asyncio.sleep(PACER_PERIOD)
            now = time.time()
            dt, last = now - last, now
            elapsed = now - self.started_at
            rates = (
                self.scenario.event_rate_at(elapsed),
                self.scenario.spending_rate,
                self.scenario.notification_rate,
            )
            for i, rate in enumerate(rates):
                credit[i] = min(credit[i] + rate * dt, max(rate, 1.0))
                while credit[i] >= 1.0:
                    credit[i] -= 1.0
                    item = self._make(i, elapsed)
                    if item is not None:
                        self._enqueue(item)

    def _make(self, stream: int, elapsed: float) -> Item | None:
        rng = self.rng
        if stream == 0:
            channel = artist_channel(self.run_id, rng.randrange(self.scenario.artist_channels))
            if rng.random() < self.scenario.premium_fraction:
                return Item(
                    "publish",
                    channel,
                    channel,
                    self.scenario.premium_prefix + "price",
                    premium=True,
                )
            return Item("publish", channel, channel, rng.choice(EVENT_TYPES))
        online = min(self.population(elapsed), self.scenario.peak_clients)
        if online <= 0:
            return None
        user = user_name(self.run_id, rng.randrange(online))
        if stream == 1:
            channel = user_channel(user)
            return Item("publish", channel, channel, SPENDING_EVENT)
        return Item("notify", notify_key(user), user, rng.choice(PRIORITIES))

    def _enqueue(self, item: Item) -> None:
        lane = self._lane_of.get(item.key)
        if lane is None:
            lane = self._lane_of[item.key] = self.lanes[len(self._lane_of) % len(self.lanes)]
        if not lane.put(item):
            self.meter.counts["publish_behind"] += 1

    # ------------------------------------------------------------ sending

    async def send(self, conn: HttpConnection, batch: list[Item]) -> None:
        sent_at = time.time()
        seqs = [self.log.append(item.key, sent_at, premium=item.premium) for item in batch]
        bodies = [self._body(item, seq, sent_at) for item, seq in zip(batch, seqs, strict=True)]
        path = "/v1/publish" if batch[0].kind == "publish" else "/v1/notifications"
        payload: Any = bodies[0] if len(bodies) == 1 else bodies
        self.meter.counts["ops"] += 1
        self.meter.counts["published"] += len(batch)
        answer = await conn.request(
            "POST", path, json.dumps(payload).encode(), headers=self.headers
        )
        self.meter.hists["publish"].record(int((time.time() - sent_at) * 1_000_000))
        accepted = not isinstance(answer, HttpFailure) and answer.status == 202
        for item, seq in zip(batch, seqs, strict=True):
            self.log.settle(item.key, seq, accepted=accepted)
        if accepted:
            self.meter.counts["publish_accepted"] += len(batch)
        elif isinstance(answer, HttpFailure):
            self.meter.error(f"http:{answer.kind}")
        else:
            self.meter.error(f"http:{answer.status}")
            self.meter.counts["publish_rejected"] += len(batch)

    def _body(self, item: Item, seq: int, sent_at: float) -> dict[str, Any]:
        data = {"seq": seq, "t": sent_at, "pad": self.pad}
        if item.kind == "publish":
            return {"channel": item.target, "event": item.event, "data": data}
        return {
            "user": item.target,
            "priority": item.event,
            "title": "loadtest",
            "body": f"notification {seq}",
            "data": data,
            "ttl": 60,
        }
