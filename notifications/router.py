"""The notification router: takes queued notifications, highest priority first, and delivers them.

One delivery *round* per lease: the notification goes once to ``deliver_in_app``, and, if
``push_allowed(user, priority)``, to each of the user's devices not yet done through the adapter
of its platform. Each target ends its round delivered, done for good (dead token, rejected,
attempts exhausted: dead-lettered), failed (retry later), or waiting for an open breaker. The
store then settles the lease in one step: done, or queued again at the round's ``retry_at`` with
the per-target progress (``DeliveryState``), so a retry never re-pushes to a device that got it.

Retries: exponential backoff with jitter (``Backoff``), never before a ``retry_after``. A target
whose breaker is open is not attempted and not counted: the notification waits in the delayed
queue until the breaker's ``retry_at()`` (or ``breaker_recheck`` seconds if that is unknown or
not in the router's clock). An adapter whose credentials the provider refused
(``Outcome.CREDENTIALS_REJECTED``) is unavailable, not the target: the push is not counted as an
attempt, the adapter's breaker opens for its credentials cool-down (one ERROR line per opening)
and the notification waits as for any open breaker. A notification whose ttl has passed is
dropped and counted as expired.
Delivery is at least once: a round cut short (crash, cancel, lost lease) is run again in full.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from notifications.breaker import BreakerState, CircuitBreaker
from notifications.metrics import NotificationMetrics
from notifications.models import (
    IN_APP,
    ROUTE,
    DeadLetter,
    DeliveryState,
    Device,
    Notification,
    Outcome,
    Platform,
    Priority,
    PushResult,
)
from notifications.push import PushAdapter
from notifications.store import Lease, NotificationStore, QueueUnavailable

log = logging.getLogger(__name__)


class Breaker(Protocol):
    """What the router needs of a circuit breaker (``notifications.breaker.CircuitBreaker``).

    ``allow()`` is asked before each push and, when True, is followed by exactly one
    ``record_*``. ``record_credentials_rejected()`` opens the breaker at once and says whether
    that call opened it. ``retry_at()`` is when an open breaker lets a probe through (None
    unless open); it is used only if it lies ahead in the router's clock.
    """

    name: str

    @property
    def state(self) -> str: ...

    def allow(self) -> bool: ...

    def record_success(self) -> None: ...

    def record_failure(self, retry_after: float | None = None) -> None: ...

    def record_credentials_rejected(self) -> bool: ...

    def record_ignored(self) -> None: ...

    def retry_at(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in
    ``[d/2, d)`` with ``d = min(cap, base * 2**(n-1))``, and never less than ``retry_after``."""

    base: float = 1.0
    cap: float = 300.0

    def delay(self, attempt: int, retry_after: float | None, rand: float) -> float:
        """``attempt`` >= 1 counts the failures so far; ``rand`` is uniform in [0, 1)."""
        ceiling = min(self.cap, self.base * 2.0 ** max(0, attempt - 1))
        jittered = ceiling / 2 + ceiling / 2 * rand
        return max(jittered, retry_after or 0.0)


def is_expired(notification: Notification, state: DeliveryState, now: float) -> bool:
    """Past ``created_at + ttl``. A ttl of 0 means "now or never": one round, no retry."""
    if notification.ttl == 0:
        return state.rounds > 0
    return now > notification.expires_at


@dataclass(slots=True)
class DeliveryRound:
    """Sans-I/O record of one round: feeds ``state`` and says when to come back.

    ``delivered``, ``retried`` and ``dead`` are (adapter, ...) facts for metrics and the store;
    ``dead_tokens`` are devices to remove from the registry.
    """

    notification: Notification
    state: DeliveryState
    max_attempts: int
    now: float
    delivered: list[str] = field(default_factory=list)
    retried: list[tuple[str, int, float | None]] = field(default_factory=list)
    waits: list[tuple[str, float]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dead_tokens: list[tuple[Device, str]] = field(default_factory=list)

    def succeeded(self, target: str, adapter: str) -> None:
        self.state.done[target] = "delivered"
        self.state.attempts.pop(target, None)
        self.delivered.append(adapter)

    def failed(
        self,
        target: str,
        adapter: str,
        reason: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        """A transient failure: retried later, dead-lettered once ``max_attempts`` are used."""
        attempts = self.state.attempts.get(target, 0) + 1
        self.state.attempts[target] = attempts
        if attempts >= self.max_attempts:
            self.state.done[target] = "failed"
            self.dead.append(
                DeadLetter(
                    self.notification,
                    target,
                    adapter,
                    f"gave up after {attempts} attempts: {reason}",
                    attempts,
                    self.now,
                    status,
                )
            )
        else:
            self.retried.append((adapter, attempts, retry_after))

    def rejected(self, target: str, adapter: str, reason: str, status: int | None = None) -> None:
        """A permanent failure for this target: dead-lettered now."""
        attempts = self.state.attempts.get(target, 0) + 1
        self.state.done[target] = "rejected"
        self.dead.append(
            DeadLetter(
                self.notification,
                target,
                adapter,
                f"rejected: {reason}",
                attempts,
                self.now,
                status,
            )
        )

    def pushed(self, device: Device, adapter: str, result: PushResult) -> None:
        """Records a push's result. ``CREDENTIALS_REJECTED`` says nothing of the target: the
        router does not pass it here but waits for the adapter (``wait_for_breaker``)."""
        key = device.key
        if result.outcome is Outcome.DELIVERED:
            self.succeeded(key, adapter)
        elif result.outcome is Outcome.DEAD_TOKEN:
            self.state.done[key] = "dead_token"
            self.dead_tokens.append((device, adapter))
        elif result.outcome is Outcome.REJECTED:
            self.rejected(key, adapter, result.reason or "rejected", result.status)
        else:
            reason = result.reason or "retry"
            self.failed(key, adapter, reason, retry_after=result.retry_after, status=result.status)

    def wait_for_breaker(self, adapter: str, until: float) -> None:
        self.waits.append((adapter, until))

    def retry_at(self, backoff: Backoff, rand: float) -> float | None:
        """None: every target is done. Else the time to run the next round: late enough for
        every retry's backoff and retry_after and for every open breaker."""
        times = [until for _, until in self.waits]
        if self.retried:
            attempt = max(a for _, a, _ in self.retried)
            retry_after = max((r for _, _, r in self.retried if r is not None), default=None)
            times.append(self.now + backoff.delay(attempt, retry_after, rand))
        return max(times) if times else None


class NotificationRouter:
    """Delivers queued notifications with ``concurrency`` rounds in flight.

    ``start()`` starts a dispatcher (claims a lease whenever a slot is free, the highest
    priority first) and a queue-depth sampler; ``close()`` stops claiming, lets rounds in
    flight finish for up to ``drain_timeout`` seconds, then cancels them. A cancelled round's
    lease stays with the store and is taken over by any router after the store's lease
    timeout; while a round runs its lease is touched every third of that timeout.
    The adapters are the caller's to close. ``clock`` is unix time, like ``created_at``.
    """

    def __init__(  # noqa: PLR0917 (the positional order is the documented wiring API)
        self,
        store: NotificationStore,
        adapters: Mapping[Platform, PushAdapter],
        breakers: Mapping[Platform, Breaker],
        deliver_in_app: Callable[[Notification], Awaitable[None]],
        push_allowed: Callable[[str, Priority], Awaitable[bool]],
        metrics: NotificationMetrics,
        *,
        concurrency: int = 16,
        max_attempts: int = 8,
        clock: Callable[[], float] = time.time,
        backoff: Backoff = Backoff(),
        breaker_recheck: float = 1.0,
        max_breaker_wait: float = 60.0,
        idle_wait: float = 1.0,
        drain_timeout: float = 5.0,
        depth_interval: float = 5.0,
        consumer: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if concurrency < 1 or max_attempts < 1:
            raise ValueError("concurrency and max_attempts must be >= 1")
        self._store = store
        self._adapters = dict(adapters)
        self._breakers = dict(breakers)
        self._deliver_in_app = deliver_in_app
        self._push_allowed = push_allowed
        self._metrics = metrics
        self._concurrency = concurrency
        self._max_attempts = max_attempts
        self._clock = clock
        self._backoff = backoff
        self._breaker_recheck = breaker_recheck
        self._max_breaker_wait = max_breaker_wait
        self._idle_wait = idle_wait
        self._drain_timeout = drain_timeout
        self._depth_interval = depth_interval
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._rng = rng or random.Random()
        self._closing = False
        self._slots = asyncio.Semaphore(concurrency)
        self._rounds: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        if self._background:
            raise RuntimeError("router already started")
        for breaker in self._breakers.values():
            self._metrics.set_breaker_state(breaker.name, breaker.state)
        self._background = [
            asyncio.create_task(self._dispatch(), name=f"notif-dispatch-{self.consumer}"),
            asyncio.create_task(self._sample_depth(), name=f"notif-depth-{self.consumer}"),
        ]

    async def close(self) -> None:
        self._closing = True
        background, self._background = self._background, []
        await _cancel_all(background)
        if self._rounds:
            _, pending = await asyncio.wait(set(self._rounds), timeout=self._drain_timeout)
            await _cancel_all(pending)

    async def _dispatch(self) -> None:
        """Claims and starts rounds until closed. A failing store (or a bug) pauses it with
        backoff: one WARNING when it starts failing, one INFO when it works again."""
        pause = 0.0
        while not self._closing:
            try:
                await self._claim_and_start()
            except Exception as exc:  # QueueUnavailable, or a bug: keep dispatching
                level = logging.DEBUG if pause else logging.WARNING
                pause = min(5.0, max(0.05, pause * 2))
                log.log(level, "notification dispatch failed (retrying in %.2fs): %r", pause, exc)
                await asyncio.sleep(pause)
            else:
                if pause:
                    log.info("notification dispatch resumed")
                pause = 0.0

    async def _claim_and_start(self) -> None:
        """Starts a round for the next lease once a slot is free, or waits for work."""
        await self._slots.acquire()
        try:
            lease = await self._store.claim(self.consumer, self._clock())
        except BaseException:
            self._slots.release()
            raise
        if lease is None:
            self._slots.release()
            await self._store.wait(self._idle_wait)
            return
        task = asyncio.create_task(self._run(lease), name=f"notif-{lease.notification.id}")
        self._rounds.add(task)
        task.add_done_callback(self._round_done)  # releases the slot

    def _round_done(self, task: asyncio.Task[None]) -> None:
        self._rounds.discard(task)
        self._slots.release()

    async def _sample_depth(self) -> None:
        while not self._closing:
            try:
                self._metrics.set_queue_depth(await self._store.depth())
            except QueueUnavailable as exc:
                log.debug("queue depth unavailable: %s", exc)
            await asyncio.sleep(self._depth_interval)

    async def _run(self, lease: Lease) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(lease))
        try:
            await self._round(lease)
        except QueueUnavailable as exc:
            log.warning("notification %s: store unavailable, left to be retaken: %s",
                        lease.notification.id, exc)  # fmt: skip
        except Exception:
            log.exception(
                "notification %s: round failed, left to be retaken", lease.notification.id
            )
        finally:
            await _cancel_all([heartbeat])

    async def _heartbeat(self, lease: Lease) -> None:
        interval = self._store.lease_timeout / 3
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                if not await self._store.touch(lease):
                    return
            except QueueUnavailable as exc:
                log.debug("touch of %s failed: %s", lease.ref, exc)

    async def _round(self, lease: Lease) -> None:
        n, state = lease.notification, lease.state
        priority = n.priority.value
        now = self._clock()
        if is_expired(n, state, now):
            if await self._settle(lease, state, None, ()):
                self._metrics.expired.labels(priority).inc()
            return
        state.rounds += 1
        rnd = DeliveryRound(n, state, self._max_attempts, now)
        if IN_APP not in state.done:
            try:
                await self._deliver_in_app(n)
            except Exception as exc:
                log.warning("notification %s: in-app delivery failed: %r", n.id, exc)
                rnd.failed(IN_APP, IN_APP, f"in-app delivery failed: {exc!r}")
            else:
                rnd.succeeded(IN_APP, IN_APP)
        devices = await self._devices(rnd)
        results = await asyncio.gather(*(self._push(n, device) for device in devices))
        for device, (adapter, result) in zip(devices, results, strict=True):
            if result is None or result.outcome is Outcome.CREDENTIALS_REJECTED:
                rnd.wait_for_breaker(adapter, self._breaker_wait(device.platform, now))
            else:
                rnd.pushed(device, adapter, result)
        for adapter in rnd.delivered:
            self._metrics.delivered.labels(priority, adapter).inc()
        for device, adapter in rnd.dead_tokens:
            self._metrics.dead_tokens.labels(adapter).inc()
            try:
                await self._store.remove_device(device.platform, device.token)
            except QueueUnavailable as exc:
                log.warning("could not remove dead device %s: %s", device.key, exc)
        rnd.now = self._clock()  # backoff and Retry-After count from the answers, not the start
        retry_at = rnd.retry_at(self._backoff, self._rng.random())
        if not await self._settle(lease, state, retry_at, rnd.dead):
            return
        for adapter, _, _ in rnd.retried:
            self._metrics.retried.labels(priority, adapter).inc()
        for adapter, _ in rnd.waits:
            self._metrics.waited.labels(adapter).inc()
        for dead in rnd.dead:
            self._metrics.dead_lettered.labels(priority, dead.adapter).inc()

    async def _settle(
        self,
        lease: Lease,
        state: DeliveryState,
        retry_at: float | None,
        dead: Sequence[DeadLetter],
    ) -> bool:
        owned = await self._store.settle(lease, state=state, retry_at=retry_at, dead_letters=dead)
        if not owned:
            self._metrics.lost_leases.inc()
            log.warning(
                "notification %s: lease %s was taken over", lease.notification.id, lease.ref
            )
        return owned

    async def _devices(self, rnd: DeliveryRound) -> list[Device]:
        """The devices still to push to this round (none if push is not allowed)."""
        n, state = rnd.notification, rnd.state
        if ROUTE in state.done:
            return []
        try:
            if not await self._push_allowed(n.user, n.priority):
                return []
            devices = await self._store.devices(n.user)
        except Exception as exc:
            log.warning("notification %s: cannot route push: %r", n.id, exc)
            rnd.failed(ROUTE, ROUTE, f"push routing failed: {exc!r}")
            return []
        return [d for d in devices if d.key not in state.done]

    async def _push(self, n: Notification, device: Device) -> tuple[str, PushResult | None]:
        """(adapter name, result); the result is None when the platform's breaker is open.

        A ``CREDENTIALS_REJECTED`` result opens the breaker (``_credentials_rejected``)."""
        adapter = self._adapters.get(device.platform)
        if adapter is None:
            reason = f"no push adapter for {device.platform.value}"
            return device.platform.value, PushResult(Outcome.REJECTED, reason=reason)
        breaker = self._breakers.get(device.platform)
        if breaker is not None and not breaker.allow():
            return adapter.name, None
        started = time.perf_counter()
        try:
            result = await adapter.send(n, device)
        except asyncio.CancelledError:
            if breaker is not None:
                breaker.record_ignored()
            raise
        except Exception as exc:  # the adapter broke its contract: treat as a provider failure
            result = PushResult(
                Outcome.RETRY, reason=f"adapter raised {exc!r}", breaker_failure=True
            )
        self._metrics.push_latency.labels(adapter.name).observe(time.perf_counter() - started)
        if result.outcome is Outcome.CREDENTIALS_REJECTED:
            self._credentials_rejected(adapter.name, breaker, result)
        elif breaker is not None:
            if result.breaker_failure:
                breaker.record_failure(result.retry_after)
            elif result.outcome is Outcome.DELIVERED:
                breaker.record_success()
            else:
                breaker.record_ignored()
        return adapter.name, result

    def _credentials_rejected(
        self, adapter: str, breaker: Breaker | None, result: PushResult
    ) -> None:
        """Opens the adapter's breaker; logs at ERROR when that opened it (without a breaker,
        every time: nothing else remembers it)."""
        if breaker is not None and not breaker.record_credentials_rejected():
            return
        retry_at = breaker.retry_at() if breaker is not None else None
        wait = self._max_breaker_wait if retry_at is None else retry_at - self._clock()
        log.error(
            "push adapter %s: the provider rejected our credentials (status %s: %s); "
            "no push through it for %.1f s, notifications wait",
            adapter, result.status, result.reason or "no reason given", wait,
        )  # fmt: skip

    def _breaker_wait(self, platform: Platform, now: float) -> float:
        """When to look again at a delivery held back by ``platform``'s open breaker, or, with no
        breaker, by its adapter's rejected credentials (``max_breaker_wait``)."""
        breaker = self._breakers.get(platform)
        jitter = self._rng.random() * self._breaker_recheck / 10
        if breaker is None:
            return now + self._max_breaker_wait + jitter
        retry_at = breaker.retry_at()
        if retry_at is not None and now < retry_at:
            return min(retry_at, now + self._max_breaker_wait) + jitter
        return now + self._breaker_recheck + jitter


def log_breaker_transition(
    breaker: CircuitBreaker, old: str, new: str, clock: Callable[[], float] = time.time
) -> None:
    """One log line per state change of a push adapter's breaker (its ``on_transition``).

    Opened by failures: WARNING; half-open and closed: INFO. An opening for rejected
    credentials is logged by the router at ERROR, with the provider's answer, so not here.
    ``clock`` is the breaker's (for the seconds until its probe)."""
    if new == BreakerState.OPEN:
        if breaker.opened_for_credentials:
            return
        retry_at = breaker.retry_at()
        wait = 0.0 if retry_at is None else max(0.0, retry_at - clock())
        log.warning(
            "push adapter %s: circuit breaker open (%s); no push through it for %.1f s, "
            "notifications wait",
            breaker.name,
            "its probe failed"
            if old == BreakerState.HALF_OPEN
            else "the provider is failing: errors, time-outs or 5xx answers",
            wait,
        )
    elif new == BreakerState.HALF_OPEN:
        log.info("push adapter %s: circuit breaker half-open, one probe goes through", breaker.name)
    else:
        log.info("push adapter %s: circuit breaker closed, pushes go through again", breaker.name)


async def _cancel_all(tasks: Collection[asyncio.Task[None]]) -> None:
    """Cancels the tasks and waits until they are done. The cancel is repeated: a library may
    turn a cancellation into an error that a loop handles (the loops also stop on ``_closing``).
    Our own cancellation is not swallowed: ``asyncio.wait`` raises it."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
