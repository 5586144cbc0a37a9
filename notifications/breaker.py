"""A sans-I/O circuit breaker (closed / open / half-open) with an injected clock.

The caller asks ``allow()`` before a call and reports how it ended with exactly
one of ``record_success()``, ``record_failure()``, ``record_credentials_rejected()``
or ``record_ignored()``.
Results are attributed to the state the breaker is in when they are recorded.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from enum import StrEnum

#: The sliding window is kept as this many time buckets (bounded memory at any call rate).
WINDOW_BUCKETS = 30
#: Default seconds a breaker stays open after the provider refused our credentials. Nothing
#: queued can succeed until someone changes them, and the usual fix (a new key or account)
#: comes with a restart, which starts closed; so this only bounds the delay after a fix made
#: outside the process (a role granted back, an account re-enabled, a clock resynced), while
#: each node sends one probe and logs one ERROR line per period: 12 an hour, not one request
#: per notification per retry.
CREDENTIALS_COOLDOWN = 300.0


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


Transition = Callable[[str, BreakerState, BreakerState], None]


class CircuitBreaker:
    """Stops calls to an unwell dependency and probes it again after a cooldown.

    - Closed: every call is allowed. It opens on ``failure_threshold``
      consecutive failures, or when, over the last ``window`` seconds (kept in
      ``WINDOW_BUCKETS`` buckets, so to 1/30 of the window), at least
      ``minimum_calls`` calls were recorded and the share of failures is
      ``>= failure_rate``.
    - Open: no call is allowed until ``retry_at()``, which is ``cooldown``
      seconds after opening, or later if a failure carried a longer
      ``retry_after``. The first ``allow()`` at or after it moves to half-open.
    - ``record_credentials_rejected()`` opens it from any state, at once, for
      ``credentials_cooldown`` seconds (an open one stays open at least that long).
    - Half-open: at most ``half_open_max_calls`` probes are in flight. A failed
      probe reopens; ``half_open_max_calls`` successful probes close (with a
      fresh window); an ignored probe frees its slot.

    ``on_transition(name, old, new)`` is called synchronously on every change.
    """

    def __init__(
        self,
        *,
        name: str,
        clock: Callable[[], float],
        failure_threshold: int = 5,
        window: float = 30.0,
        failure_rate: float = 0.5,
        minimum_calls: int = 10,
        cooldown: float = 30.0,
        credentials_cooldown: float = CREDENTIALS_COOLDOWN,
        half_open_max_calls: int = 1,
        on_transition: Transition | None = None,
    ) -> None:
        if failure_threshold < 1 or minimum_calls < 1 or half_open_max_calls < 1:
            raise ValueError("failure_threshold, minimum_calls, half_open_max_calls must be >= 1")
        if window <= 0 or min(cooldown, credentials_cooldown) < 0 or not 0 < failure_rate <= 1:
            raise ValueError("window must be > 0, cooldowns >= 0, 0 < failure_rate <= 1")
        self.name = name
        self._clock = clock
        self._failure_threshold = failure_threshold
        self._window = window
        self._bucket_width = window / WINDOW_BUCKETS
        self._failure_rate = failure_rate
        self._minimum_calls = minimum_calls
        self._cooldown = cooldown
        self._credentials_cooldown = credentials_cooldown
        self._half_open_max_calls = half_open_max_calls
        self._on_transition = on_transition

        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        # [bucket index, calls, failures], oldest first; at most WINDOW_BUCKETS + 1 entries.
        self._buckets: deque[list[int]] = deque()
        self._retry_at: float | None = None
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._opened_for_credentials = False

    @property
    def state(self) -> BreakerState:
        """The current state; an open breaker turns half-open only in ``allow()``."""
        return self._state

    @property
    def opened_for_credentials(self) -> bool:
        """Whether the last opening was ``record_credentials_rejected()``'s (else failures')."""
        return self._opened_for_credentials

    def retry_at(self) -> float | None:
        """When an open breaker will let a probe through; None unless open."""
        return self._retry_at if self._state is BreakerState.OPEN else None

    def allow(self) -> bool:
        """Whether a call may start now; a True in half-open takes a probe slot."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            assert self._retry_at is not None
            if self._clock() < self._retry_at:
                return False
            self._probes_in_flight = 0
            self._probe_successes = 0
            self._move(BreakerState.HALF_OPEN)
        if self._probes_in_flight >= self._half_open_max_calls:
            return False
        self._probes_in_flight += 1
        return True

    def record_success(self) -> None:
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._count(failed=False)
        elif self._state is BreakerState.HALF_OPEN:
            self._release_probe()
            self._probe_successes += 1
            if self._probe_successes >= self._half_open_max_calls:
                self._consecutive_failures = 0
                self._buckets.clear()
                self._move(BreakerState.CLOSED)
        # Open: a late answer to a call started before opening says nothing new.

    def record_failure(self, retry_after: float | None = None) -> None:
        """A call failed; ``retry_after`` (seconds) lengthens the cooldown if it opens."""
        if self._state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            calls, failures = self._count(failed=True)
            if self._consecutive_failures >= self._failure_threshold or (
                calls >= self._minimum_calls and failures >= self._failure_rate * calls
            ):
                self._open(retry_after)
        elif self._state is BreakerState.HALF_OPEN:
            self._release_probe()
            self._open(retry_after)
        else:
            self._extend(retry_after)

    def record_credentials_rejected(self) -> bool:
        """The provider refused our credentials: no call can succeed until they change.

        Opens now whatever the counts, for ``credentials_cooldown`` seconds (a half-open probe
        reopens); an open breaker's ``retry_at`` moves to at least that far ahead. Returns
        whether this call opened it (a caller logs once per opening, not once per call).
        """
        if self._state is BreakerState.OPEN:
            self._extend(self._credentials_cooldown)
            return False
        if self._state is BreakerState.HALF_OPEN:
            self._release_probe()
        self._retry_at = self._clock() + self._credentials_cooldown
        self._opened_for_credentials = True
        self._move(BreakerState.OPEN)
        return True

    def record_ignored(self) -> None:
        """A call whose result says nothing about health: it only frees a half-open slot."""
        if self._state is BreakerState.HALF_OPEN:
            self._release_probe()

    def _release_probe(self) -> None:
        self._probes_in_flight = max(0, self._probes_in_flight - 1)

    def _open(self, retry_after: float | None) -> None:
        self._retry_at = self._clock() + self._cooldown
        self._extend(retry_after)
        self._opened_for_credentials = False
        self._move(BreakerState.OPEN)

    def _extend(self, retry_after: float | None) -> None:
        if retry_after is not None and self._retry_at is not None:
            self._retry_at = max(self._retry_at, self._clock() + retry_after)

    def _count(self, *, failed: bool) -> tuple[int, int]:
        """Adds one call to the sliding window; returns (calls, failures) within it."""
        buckets = self._buckets
        index = math.floor(self._clock() / self._bucket_width)
        if buckets:  # a clock that steps back counts into the newest bucket
            index = max(index, buckets[-1][0])
        while buckets and buckets[0][0] <= index - WINDOW_BUCKETS:
            buckets.popleft()
        if not buckets or buckets[-1][0] != index:
            buckets.append([index, 0, 0])
        buckets[-1][1] += 1
        buckets[-1][2] += int(failed)
        return sum(b[1] for b in buckets), sum(b[2] for b in buckets)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        if new is not BreakerState.OPEN:
            self._retry_at = None
        if self._on_transition is not None and old is not new:
            self._on_transition(self.name, old, new)
