"""CircuitBreaker: every transition, with plain data and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from notifications.breaker import CREDENTIALS_COOLDOWN, BreakerState, CircuitBreaker
from tests.fakes import ManualClock as Clock

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Transitions(list[tuple[str, BreakerState, BreakerState]]):
    """What on_transition reported, in order."""


def make(clock: Clock, transitions: Transitions | None = None, **kw: Any) -> CircuitBreaker:
    seen = transitions if transitions is not None else []
    return CircuitBreaker(name="apns", clock=clock, on_transition=lambda *t: seen.append(t), **kw)


def test_starts_closed_and_allows() -> None:
    b = make(Clock())
    assert b.state is CLOSED
    assert b.retry_at() is None
    assert all(b.allow() for _ in range(100))


def test_consecutive_failures_open_at_threshold() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=3, minimum_calls=1000)
    b.record_failure()
    b.record_failure()
    assert b.state is CLOSED
    b.record_failure()
    assert b.state is OPEN
    assert seen == [("apns", CLOSED, OPEN)]
    assert b.retry_at() == clock.now + 30.0
    assert not b.allow()


def test_success_resets_consecutive_count() -> None:
    b = make(Clock(), failure_threshold=3, minimum_calls=1000)
    for _ in range(5):
        b.record_failure()
        b.record_failure()
        b.record_success()
    assert b.state is CLOSED


def test_failure_rate_over_window_opens_with_minimum_calls() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=100, minimum_calls=10, failure_rate=0.5, window=30.0)
    # alternate: never 2 consecutive failures, but a 50 % failure rate
    for i in range(9):
        b.record_success() if i % 2 else b.record_failure()
    assert b.state is CLOSED  # 9 calls, 5 failures: under minimum_calls
    b.record_success()  # 10 calls, 5 failures: a success never opens
    assert b.state is CLOSED
    b.record_failure()  # 11 calls, 6 failures >= 50 %
    assert b.state is OPEN


def test_failure_rate_below_threshold_stays_closed() -> None:
    b = make(Clock(), failure_threshold=100, minimum_calls=10, failure_rate=0.5)
    for i in range(100):
        b.record_failure() if i % 3 == 0 else b.record_success()  # 34 % failures
    assert b.state is CLOSED


def test_old_calls_leave_the_window() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=100, minimum_calls=10, failure_rate=0.5, window=30.0)
    for i in range(9):
        b.record_failure() if i % 2 == 0 else b.record_success()  # 9 calls, 5 failures
    clock.now += 31.0  # all of them are now older than the window
    b.record_failure()  # counted with the old calls it would open (10 calls, 6 failures)
    assert b.state is CLOSED
    for _ in range(4):
        b.record_success()
        b.record_failure()
    assert b.state is CLOSED  # 9 calls, 5 failures in the window
    b.record_success()
    b.record_failure()  # 11 calls, 6 failures
    assert b.state is OPEN


def test_open_waits_for_cooldown_then_half_open_allows_one_probe() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=1, cooldown=10.0)
    b.record_failure()
    clock.now += 9.9
    assert not b.allow()
    assert b.state is OPEN
    clock.now += 0.1
    assert b.allow()
    assert b.state is HALF_OPEN
    assert b.retry_at() is None
    assert not b.allow()  # only one probe in flight
    assert seen == [("apns", CLOSED, OPEN), ("apns", OPEN, HALF_OPEN)]


def test_successful_probe_closes() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=1, cooldown=5.0)
    b.record_failure()
    clock.now += 5.0
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED
    assert seen[-1] == ("apns", HALF_OPEN, CLOSED)
    assert b.allow()


def test_failed_probe_reopens_with_a_new_cooldown() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=1, cooldown=5.0)
    b.record_failure()
    clock.now += 7.0
    assert b.allow()
    b.record_failure()
    assert b.state is OPEN
    assert b.retry_at() == clock.now + 5.0
    assert not b.allow()
    assert seen[-1] == ("apns", HALF_OPEN, OPEN)


def test_several_probes_must_all_succeed_to_close() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=1, cooldown=1.0, half_open_max_calls=3)
    b.record_failure()
    clock.now += 1.0
    assert [b.allow() for _ in range(4)] == [True, True, True, False]
    b.record_success()
    b.record_success()
    assert b.state is HALF_OPEN
    assert b.allow()  # a finished probe freed its slot
    b.record_success()
    assert b.state is CLOSED


def test_ignored_probe_frees_its_slot_without_closing() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=1, cooldown=1.0)
    b.record_failure()
    clock.now += 1.0
    assert b.allow()
    assert not b.allow()
    b.record_ignored()
    assert b.state is HALF_OPEN
    assert b.allow()


def test_ignored_calls_do_not_count_while_closed() -> None:
    b = make(Clock(), failure_threshold=2, minimum_calls=2, failure_rate=0.5)
    b.record_failure()
    for _ in range(10):
        b.record_ignored()
    assert b.state is CLOSED
    b.record_failure()  # still consecutive: ignored calls break nothing
    assert b.state is OPEN


def test_retry_after_lengthens_the_cooldown_but_never_shortens_it() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=1, cooldown=10.0)
    b.record_failure(retry_after=120.0)
    assert b.retry_at() == clock.now + 120.0
    clock.now += 119.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()

    b2 = make(clock, failure_threshold=1, cooldown=10.0)
    b2.record_failure(retry_after=1.0)
    assert b2.retry_at() == clock.now + 10.0


def test_failure_while_open_can_extend_retry_at() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=1, cooldown=10.0)
    b.record_failure()
    clock.now += 5.0
    b.record_failure(retry_after=60.0)  # a late answer from a call started before opening
    assert b.retry_at() == clock.now + 60.0
    b.record_success()  # late successes say nothing while open
    assert b.state is OPEN


def test_closing_starts_a_fresh_window() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=100, minimum_calls=4, failure_rate=0.5, cooldown=1.0)
    for _ in range(4):
        b.record_failure()
    assert b.state is OPEN
    clock.now += 1.0
    assert b.allow()
    b.record_success()
    assert b.state is CLOSED
    b.record_failure()  # the 4 old failures no longer count: 1 call < minimum_calls
    assert b.state is CLOSED


def test_bounded_memory_at_a_high_call_rate() -> None:
    clock = Clock()
    b = make(clock, failure_threshold=10**9, minimum_calls=10**9, window=30.0)
    for i in range(30_000):
        clock.now += 0.01
        b.record_failure() if i % 2 else b.record_success()
    assert len(b._buckets) <= 31


def test_invalid_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker(name="x", clock=Clock(), failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker(name="x", clock=Clock(), failure_rate=1.5)
    with pytest.raises(ValueError):
        CircuitBreaker(name="x", clock=Clock(), credentials_cooldown=-1.0)


def test_rejected_credentials_open_at_once_for_the_credentials_cooldown() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=5, minimum_calls=1000, credentials_cooldown=300.0)
    default = CircuitBreaker(name="x", clock=clock)
    default.record_credentials_rejected()
    assert default.retry_at() == clock.now + CREDENTIALS_COOLDOWN == clock.now + 300.0
    assert b.allow()
    assert b.record_credentials_rejected() is True  # one refusal, not five failures
    assert b.state is OPEN
    assert b.retry_at() == clock.now + 300.0
    assert seen == [("apns", CLOSED, OPEN)]
    clock.now += 299.0
    assert not b.allow()
    clock.now += 1.0
    assert b.allow()
    assert b.state is HALF_OPEN


def test_rejected_credentials_while_open_extend_without_reopening() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, failure_threshold=1, cooldown=30.0, credentials_cooldown=300.0)
    b.record_failure()  # opened by a 5xx for 30 s
    clock.now += 10.0
    assert b.record_credentials_rejected() is False  # a late answer: not a new opening
    assert b.retry_at() == clock.now + 300.0
    assert b.record_credentials_rejected() is False
    assert seen == [("apns", CLOSED, OPEN)]
    b.record_failure(retry_after=5.0)  # never shortens it
    assert b.retry_at() == clock.now + 300.0


def test_a_probe_refused_for_credentials_reopens_and_frees_its_slot() -> None:
    clock, seen = Clock(), Transitions()
    b = make(clock, seen, credentials_cooldown=60.0)
    assert b.record_credentials_rejected() is True
    clock.now += 60.0
    assert b.allow()
    assert not b.allow()  # one probe at a time
    assert b.record_credentials_rejected() is True
    assert b.state is OPEN
    assert b.retry_at() == clock.now + 60.0
    clock.now += 60.0
    assert b.allow()  # the refused probe's slot was freed
    b.record_success()
    assert b.state is CLOSED
    assert seen == [
        ("apns", CLOSED, OPEN), ("apns", OPEN, HALF_OPEN), ("apns", HALF_OPEN, OPEN),
        ("apns", OPEN, HALF_OPEN), ("apns", HALF_OPEN, CLOSED),
    ]  # fmt: skip
