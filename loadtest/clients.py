"""The simulated app: clients that connect, subscribe and record what arrives.

A ``Fleet`` drives this process's share of the clients (global index ``i``
with ``i % workers == worker``) towards the scenario's target at the connect
rate, from one control task; each client is a ``WSClient`` protocol with no
task of its own. A ``Meter`` collects counts and interval histograms that
the owner takes (and resets) once per sample interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final

import jwt
import msgpack

from loadtest.accounting import Receipt, notify_key
from loadtest.config import WS_PATH, Scenario
from loadtest.stats import Histogram
from loadtest.wsclient import WSClient

JSON_SUBPROTOCOL: Final = "piggybong.v1.json"
MSGPACK_SUBPROTOCOL: Final = "piggybong.v1.msgpack"
#: Histogram categories: delivery latency by message kind, and connect time.
CATEGORIES: Final = (
    "event", "batch", "notification", "connect", "publish", "batch_free", "batch_paid",
)  # fmt: skip
DELIVERY_CATEGORIES: Final = ("event", "batch", "notification")
#: Batch items also by the receiving connection's tier (windows: 2 s free, 250 ms paid).
TIER_BATCH: Final = {False: "batch_free", True: "batch_paid"}
CONTROL_PERIOD: Final = 0.05
#: Seconds beyond the server's batch window that a batch may take to arrive.
BATCH_SLACK: Final = 1.0
json_decode = json.JSONDecoder().decode
unpack = msgpack.unpackb


def user_name(run_id: str, index: int) -> str:
    return f"lt{run_id}-{index}"


def artist_channel(run_id: str, k: int) -> str:
    return f"artist:lt{run_id}-{k}"


def user_channel(user: str) -> str:
    return f"user:{user}"


@dataclass(frozen=True, slots=True)
class Profile:
    """Who client ``index`` is: derived from the seed alone, the same in every process."""

    index: int
    user: str
    paid: bool
    msgpack: bool
    artists: tuple[str, ...]


def profile(scenario: Scenario, run_id: str, index: int) -> Profile:
    rng = random.Random(f"{scenario.seed}:{index}")
    paid = rng.random() < scenario.paid_fraction
    packed = rng.random() < scenario.msgpack_fraction
    count = min(scenario.artists_per_client, scenario.artist_channels)
    picks = sorted(rng.sample(range(scenario.artist_channels), count))
    return Profile(
        index,
        user_name(run_id, index),
        paid,
        packed,
        tuple(artist_channel(run_id, k) for k in picks),
    )


def mint_token(scenario: Scenario, user: str, *, paid: bool, now: float) -> str:
    claims: dict[str, Any] = {
        "sub": user,
        "tier": "paid" if paid else "free",
        "iat": int(now),
        "exp": int(now + scenario.effective_token_ttl),
    }
    if scenario.audience:
        claims["aud"] = scenario.audience
    return jwt.encode(claims, scenario.jwt_secret, algorithm="HS256")


class Meter:
    """Counts and interval histograms of one process; ``take()`` returns and resets them.

    Count keys: ``ops`` (connection attempts, commands, HTTP requests), ``errors``,
    ``error:<kind>``, ``close:<code>``, ``connects`` and others; histograms by
    ``CATEGORIES`` in microseconds.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.hists: dict[str, Histogram] = {c: Histogram() for c in CATEGORIES}

    def error(self, kind: str) -> None:
        self.counts["errors"] += 1
        self.counts["error:" + kind] += 1

    def take(self) -> dict[str, Any]:
        out = {
            "counts": dict(self.counts),
            "hists": {c: h.to_state() for c, h in self.hists.items() if h.count},
        }
        self.counts = Counter()
        self.hists = {c: Histogram() for c in CATEGORIES}
        return out


# client states
DIALING: Final = 0
UPGRADING: Final = 1
CONNECTING: Final = 2
READY: Final = 3
CLOSING: Final = 4
DONE: Final = 5


class AppClient(WSClient):
    """One simulated app connection: connect, subscribe, record deliveries."""

    def __init__(self, fleet: Fleet, prof: Profile, started: float) -> None:
        super().__init__(
            f"{fleet.scenario.host}:{fleet.scenario.port}",
            WS_PATH,
            MSGPACK_SUBPROTOCOL if prof.msgpack else JSON_SUBPROTOCOL,
        )
        self.fleet = fleet
        self.meter = fleet.meter
        self.profile = prof
        self.started = started
        self.phase = DIALING
        self.failed = False
        self.pending_subs = len(prof.artists)
        self.receipts: dict[str, Receipt] = {}

    # ------------------------------------------------------------ hooks

    def on_open(self, subprotocol: str | None) -> None:
        self.phase = CONNECTING
        token = mint_token(
            self.fleet.scenario, self.profile.user, paid=self.profile.paid, now=time.time()
        )
        self._command(
            {
                "id": 1,
                "op": "connect",
                "token": token,
                "client": {"app": "piggybong-loadtest", "version": "1"},
            }
        )

    def on_refused(self, reason: str) -> None:
        if self.phase in (CLOSING, DONE):  # we aborted it
            return
        self.meter.error("handshake:" + reason.split(":", maxsplit=1)[0])
        self.finish(failed=True)

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        # an event sent shortly before the end may still have been in flight (or in a batch)
        ended = time.time() - self.fleet.grace
        for receipt in self.receipts.values():
            receipt.closed = min(receipt.closed, ended)
        ours = self.phase in (CLOSING, DONE)
        if not ours:
            self.meter.counts[f"close:{code}"] += 1
            if not self.failed:
                self.meter.error(f"close:{code}")
        self.finish(failed=not ours)

    def on_message(self, payload: bytes, binary: bool) -> None:
        now = time.time()
        try:
            msg = unpack(payload, raw=False) if binary else json_decode(payload.decode())
            kind = msg.get("type")
            if kind == "event":
                self._delivery(msg["channel"], msg["data"], now, "event")
            elif kind == "batch":
                channel = msg["channel"]
                items = msg["items"]
                if not items:
                    self.meter.error("empty_batch")
                for item in items:
                    self._delivery(channel, item["data"], now, "batch")
            elif kind == "notification":
                self._delivery(notify_key(self.profile.user), msg["data"], now, "notification")
            elif "id" in msg:
                self._reply(msg, now)
            else:
                self.meter.counts["unknown_messages"] += 1
        except (ValueError, KeyError, TypeError, AttributeError, msgpack.UnpackException):
            self.meter.error("unreadable_message")

    # ------------------------------------------------------------ internals

    def _delivery(self, key: str, data: dict[str, Any], now: float, category: str) -> None:
        seq = data.get("seq")
        sent = data.get("t")
        if type(seq) is not int or not isinstance(sent, float | int):
            self.meter.counts["foreign_messages"] += 1
            return
        receipt = self.receipts.get(key)
        if receipt is None:  # arrived before the reply that entitles us: never owed
            receipt = self.receipts[key] = Receipt()
        receipt.seqs.append(seq)
        micros = int((now - sent) * 1_000_000)
        self.meter.hists[category].record(micros)
        if category == "batch":
            self.meter.hists[TIER_BATCH[self.profile.paid]].record(micros)

    def _reply(self, msg: dict[str, Any], now: float) -> None:
        cid = msg["id"]
        error = msg.get("error")
        if cid == 1:  # connect
            if error is not None:
                self.meter.error("connect:" + str(error.get("code")))
                self.failed = True
                return
            self.phase = READY
            limits = msg.get("result", {}).get("limits") or {}
            window = limits.get("batch_window_ms")
            if isinstance(window, int | float) and window > self.fleet.batch_window_ms:
                self.fleet.batch_window_ms = float(window)
            self.meter.hists["connect"].record(int((now - self.started) * 1_000_000))
            self.meter.counts["connects"] += 1
            self._entitle(user_channel(self.profile.user), now)
            self._entitle(notify_key(self.profile.user), now)
            for i, channel in enumerate(self.profile.artists):
                self._command({"id": i + 2, "op": "subscribe", "channel": channel})
            return
        index = cid - 2
        if not 0 <= index < len(self.profile.artists):
            self.meter.counts["unexpected_replies"] += 1
            return
        self.pending_subs -= 1
        if error is not None:
            self.meter.error("subscribe:" + str(error.get("code")))
        else:
            self._entitle(self.profile.artists[index], now)

    def _entitle(self, key: str, now: float) -> None:
        receipt = self.receipts.get(key)
        if receipt is None:
            receipt = self.receipts[key] = Receipt()
        receipt.opened = now

    def _command(self, message: dict[str, Any]) -> None:
        packed = self.profile.msgpack
        body = msgpack.packb(message, use_bin_type=True) if packed else json.dumps(message).encode()
        if self.send(body, binary=packed):
            self.meter.counts["ops"] += 1

    def finish(self, *, failed: bool) -> None:
        if self.phase == DONE:
            return
        self.failed = self.failed or failed
        self.phase = DONE
        self.fleet.on_done(self)

    def dial_failed(self, exc: BaseException) -> None:
        if self.phase in (CLOSING, DONE):
            return
        name = type(exc).__name__
        if isinstance(exc, OSError) and exc.errno is not None:
            name = errno.errorcode.get(exc.errno, name)
        self.meter.error("dial:" + name)
        self.finish(failed=True)

    def shut(self) -> None:
        """Close from our side (ramp-down or the end of the run)."""
        if self.phase in (DONE, CLOSING):
            return
        if self.phase in (DIALING, UPGRADING, CONNECTING):
            self.phase = CLOSING
            self.abort()
            self.finish(failed=False)
            return
        self.phase = CLOSING
        self.close(1000)


class Fleet:
    """This process's clients: opens and closes them to follow the target, and owns
    the dial tasks (cancelled and awaited by ``shutdown``)."""

    def __init__(self, scenario: Scenario, run_id: str, worker: int, workers: int) -> None:
        self.scenario = scenario
        self.run_id = run_id
        self.worker = worker
        self.workers = max(workers, 1)
        self.meter = Meter()
        self.active: dict[int, AppClient] = {}  # slot -> live client
        self.finished: list[AppClient] = []
        self.failed_slots: set[int] = set()
        self.max_lag = 0.0
        self.batch_window_ms = 0.0  # the longest spending window a connect reply announced
        self._dials: set[asyncio.Task[None]] = set()
        self._budget = 0.0
        self._free_from = 0  # no slot below this one is free to open
        self._high = 0  # no slot at or above this one is open
        self._opening = True
        self._control: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set whenever a client finishes

    # ------------------------------------------------------------ shares

    def my_target(self, total: int) -> int:
        """How many of the global indices < total belong to this worker."""
        if total <= self.worker:
            return 0
        return (total - self.worker + self.workers - 1) // self.workers

    def slot_index(self, slot: int) -> int:
        return slot * self.workers + self.worker

    @property
    def my_peak(self) -> int:
        return self.my_target(self.scenario.peak_clients)

    # ------------------------------------------------------------ callbacks

    def on_done(self, client: AppClient) -> None:
        slot = client.profile.index // self.workers
        if self.active.get(slot) is client:
            del self.active[slot]
            if client.failed:
                self.failed_slots.add(slot)
            else:
                self._free_from = min(self._free_from, slot)
        if client.receipts:
            self.finished.append(client)
        self._changed.set()

    # ------------------------------------------------------------ control

    def start(self, start_at: float) -> None:
        self._control = asyncio.get_running_loop().create_task(self._run(start_at))

    async def _run(self, start_at: float) -> None:
        loop = asyncio.get_running_loop()
        delay = start_at - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        rate = self.scenario.connect_rate / self.workers
        last = time.time()
        next_sweep = last + 1.0
        while True:
            expected = loop.time() + CONTROL_PERIOD
            await asyncio.sleep(CONTROL_PERIOD)
            self.max_lag = max(self.max_lag, loop.time() - expected)
            now = time.time()
            self._budget = min(self._budget + (now - last) * rate, max(rate, 1.0))
            last = now
            if self._opening:
                self._follow(self.my_target(self.scenario.target_at(now - start_at)), now)
            if now >= next_sweep:
                next_sweep = now + 1.0
                self._sweep(now)

    def _follow(self, target: int, now: float) -> None:
        if target < self._high:  # ramp down: close the highest slots
            for slot in [s for s in self.active if s >= target]:
                self.active[slot].shut()
            self._high = target
        room = self.scenario.max_handshakes - len(self._dials)
        slot = self._free_from
        while self._budget >= 1.0 and room > 0:
            while slot < target and (slot in self.active or slot in self.failed_slots):
                slot += 1
            if slot >= target:
                break
            self._open(slot, now)
            room -= 1
            self._budget -= 1.0
        self._free_from = slot

    def _open(self, slot: int, now: float) -> None:
        self._high = max(self._high, slot + 1)
        prof = profile(self.scenario, self.run_id, self.slot_index(slot))
        client = AppClient(self, prof, now)
        self.active[slot] = client
        self.meter.counts["ops"] += 1
        self.meter.counts["attempts"] += 1
        task = asyncio.get_running_loop().create_task(self._dial(client))
        self._dials.add(task)
        task.add_done_callback(self._dials.discard)

    async def _dial(self, client: AppClient) -> None:
        sources = self.scenario.source_addresses
        local = None
        if sources:
            local = (sources[(client.profile.index // self.workers) % len(sources)], 0)
        try:
            transport, _ = await asyncio.get_running_loop().create_connection(
                lambda: client, self.scenario.host, self.scenario.port, local_addr=local
            )
        except OSError as exc:
            client.dial_failed(exc)
            return
        if client.phase in (CLOSING, DONE):  # given up on while dialing
            transport.abort()
        elif client.phase == DIALING:
            client.phase = UPGRADING

    def _sweep(self, now: float) -> None:
        """Abort clients that have not completed ``connect`` within the timeout."""
        limit = now - self.scenario.connect_timeout
        for client in list(self.active.values()):
            if client.phase in (DIALING, UPGRADING, CONNECTING) and client.started < limit:
                self.meter.error("connect_timeout")
                client.failed = True
                client.abort()
                client.finish(failed=True)

    @property
    def grace(self) -> float:
        """How long before a close an event must have been sent to be owed."""
        return max(self.scenario.drain, self.batch_window_ms / 1000.0 + BATCH_SLACK)

    # ------------------------------------------------------------ gauges and results

    def gauges(self) -> dict[str, int]:
        live = self.active.values()
        return {
            "open": sum(1 for c in live if c.phase == READY),
            "connecting": sum(1 for c in live if c.phase in (DIALING, UPGRADING, CONNECTING)),
            "subscribed": sum(1 for c in live if c.phase == READY and c.pending_subs == 0),
            "failed": len(self.failed_slots),
            "batch_window_ms": round(self.batch_window_ms),
        }

    def receipts(self) -> Iterator[tuple[str, str, Receipt, bool]]:
        seen: set[int] = set()
        for client in [*self.finished, *self.active.values()]:
            if id(client) in seen:
                continue
            seen.add(id(client))
            for key, receipt in client.receipts.items():
                yield client.profile.user, key, receipt, client.profile.paid

    async def shutdown(self, *, close_timeout: float = 5.0) -> None:
        """Stop opening, close every client (1000) and wait for them; owns all tasks."""
        self._opening = False
        if self._control is not None:
            self._control.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control
            self._control = None
        for task in list(self._dials):
            task.cancel()
        if self._dials:
            await asyncio.gather(*self._dials, return_exceptions=True)
        for client in list(self.active.values()):
            client.shut()
        deadline = time.time() + close_timeout
        while any(c.phase == CLOSING for c in self.active.values()):
            remaining = deadline - time.time()
            if remaining <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)
        for client in list(self.active.values()):
            client.abort()
        await asyncio.sleep(0)
