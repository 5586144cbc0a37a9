"""realtime.timers: the deadline heap with a fake clock, and the loop shell on a real loop."""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.timers import COMPACT_SLACK, DeadlineHeap, Timers

# --------------------------------------------------------------------------- DeadlineHeap


def test_heap_orders_and_pops_due_keys() -> None:
    h: DeadlineHeap[str] = DeadlineHeap()
    assert h.next_deadline() is None
    assert h.pop_due(100.0) == []
    h.schedule("b", 2.0)
    h.schedule("a", 1.0)
    h.schedule("c", 3.0)
    assert len(h) == 3 and "a" in h
    assert h.next_deadline() == 1.0
    assert h.pop_due(0.5) == []
    assert h.pop_due(2.0) == ["a", "b"]
    assert h.next_deadline() == 3.0
    assert "a" not in h and len(h) == 1


def test_heap_schedule_replaces_the_deadline() -> None:
    h: DeadlineHeap[str] = DeadlineHeap()
    h.schedule("k", 5.0)
    h.schedule("k", 2.0)  # earlier
    assert h.deadline_of("k") == 2.0
    assert h.next_deadline() == 2.0
    h.schedule("k", 9.0)  # later: the old entries are dead
    assert h.next_deadline() == 9.0
    assert h.pop_due(8.0) == []
    assert h.pop_due(9.0) == ["k"]
    assert h.pop_due(100.0) == []  # never twice
    assert len(h) == 0


def test_heap_cancel() -> None:
    h: DeadlineHeap[int] = DeadlineHeap()
    h.schedule(1, 1.0)
    h.schedule(2, 2.0)
    assert h.cancel(1)
    assert not h.cancel(1)
    assert not h.cancel(3)
    assert h.next_deadline() == 2.0
    assert h.pop_due(10.0) == [2]
    assert h.deadline_of(1) is None


def test_heap_equal_deadlines_keep_schedule_order() -> None:
    h: DeadlineHeap[str] = DeadlineHeap()
    for key in ("x", "y", "z", "w"):
        h.schedule(key, 1.0)
    h.schedule("y", 1.0)  # same deadline again: unchanged, keeps its place
    assert h.pop_due(1.0) == ["x", "y", "z", "w"]


class _Key:
    """A hashable key that can be weakly referenced."""


def test_heap_releases_cancelled_and_replaced_keys_at_once() -> None:
    heap: DeadlineHeap[_Key] = DeadlineHeap()
    cancelled, replaced = _Key(), _Key()
    heap.schedule(cancelled, 5.0)
    heap.schedule(replaced, 6.0)
    refs = [weakref.ref(cancelled), weakref.ref(replaced)]
    heap.cancel(cancelled)
    heap.schedule(replaced, 7.0)
    heap.cancel(replaced)
    del cancelled, replaced
    # The stale entries are still in the heap (deleted lazily), but hold no key.
    assert [ref() for ref in refs] == [None, None]
    assert heap.next_deadline() is None


def test_heap_memory_is_bounded_by_live_keys() -> None:
    h: DeadlineHeap[int] = DeadlineHeap()
    for i in range(100_000):
        h.schedule(i % 10, float(i))  # every key rescheduled 10,000 times
        assert len(h._heap) <= 2 * len(h) + COMPACT_SLACK + 1
    for i in range(10):
        h.cancel(i)
    assert len(h) == 0
    assert len(h._heap) <= COMPACT_SLACK + 1
    assert h.next_deadline() is None


ops = st.lists(
    st.one_of(
        st.tuples(st.just("schedule"), st.integers(0, 7), st.floats(0, 20)),
        st.tuples(st.just("cancel"), st.integers(0, 7), st.just(0.0)),
        st.tuples(st.just("pop"), st.just(0), st.floats(0, 20)),
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_heap_matches_a_dict_model(ops: list[tuple[str, int, float]]) -> None:
    h: DeadlineHeap[int] = DeadlineHeap()
    model: dict[int, tuple[float, int]] = {}  # key -> (deadline, order scheduled)
    for n, (op, key, value) in enumerate(ops):
        if op == "schedule":
            if model.get(key, (None,))[0] != value:
                model[key] = (value, n)
            h.schedule(key, value)
        elif op == "cancel":
            assert h.cancel(key) == (model.pop(key, None) is not None)
        else:
            expected = sorted(
                (k for k, (w, _) in model.items() if w <= value), key=lambda k: model[k]
            )
            assert h.pop_due(value) == expected
            for k in expected:
                del model[k]
        assert len(h) == len(model)
        assert h.next_deadline() == min((w for w, _ in model.values()), default=None)
        assert len(h._heap) <= 2 * len(model) + COMPACT_SLACK + 1


# --------------------------------------------------------------------------- Timers (real loop)


class Recorder:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.calls: list[tuple[float, list[Any]]] = []
        self.event = asyncio.Event()

    def __call__(self, keys: list[Any]) -> None:
        self.calls.append((self.loop.time(), keys))
        self.event.set()

    async def wait(self, count: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within):
            while sum(len(keys) for _, keys in self.calls) < count:
                self.event.clear()
                await self.event.wait()


@pytest.mark.timeout(20)
async def test_timers_fire_in_order_and_not_early() -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder(loop)
    timers: Timers[str] = Timers(rec)
    try:
        start = loop.time()
        deadlines = {"c": start + 0.30, "a": start + 0.10, "b": start + 0.20}
        for key, when in deadlines.items():
            timers.schedule(key, when)
        timers.schedule("gone", start + 0.05)
        assert timers.cancel("gone")
        await rec.wait(3)
        fired = [(at, key) for at, keys in rec.calls for key in keys]
        assert [key for _, key in fired] == ["a", "b", "c"]
        for at, key in fired:
            assert at >= deadlines[key] - 0.005, (key, at - deadlines[key])
            assert at <= deadlines[key] + 1.0  # generous: a busy 2-core machine
        assert len(timers) == 0
    finally:
        timers.close()


@pytest.mark.timeout(20)
async def test_timers_one_handle_for_many_keys_and_rearm_earlier(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop = asyncio.get_running_loop()
    rec = Recorder(loop)
    timers: Timers[int] = Timers(rec, loop=loop)
    armed: list[asyncio.TimerHandle] = []
    real_call_at = loop.call_at

    def spy(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        handle = real_call_at(when, callback, *args, **kwargs)
        armed.append(handle)
        return handle

    monkeypatch.setattr(loop, "call_at", spy)
    try:
        start = loop.time()
        for i in range(10_000):  # never earlier than the armed one: one handle
            timers.schedule(i, start + 0.2 + (i // 1000) * 0.01)
        assert len(armed) == 1
        timers.schedule(-1, start + 0.1)  # earlier: re-armed, the old handle cancelled
        assert len(armed) == 2 and armed[0].cancelled()
        await rec.wait(10_001)
        keys = [key for _, batch in rec.calls for key in batch]
        assert keys == [-1, *range(10_000)]
        assert len(rec.calls) <= 11  # keys due together arrive in one call
        assert len(armed) <= 2 + len(rec.calls)  # one re-arm per wake-up at most
    finally:
        timers.close()


@pytest.mark.timeout(20)
async def test_timers_callback_can_reschedule_and_close_stops_everything() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    done = asyncio.Event()

    def on_due(keys: list[str]) -> None:
        fired.extend(keys)
        if keys == ["tick"] and fired.count("tick") < 3:
            timers.schedule("tick", loop.time() + 0.02)
        elif fired.count("tick") == 3:
            done.set()

    timers: Timers[str] = Timers(on_due)
    timers.schedule("tick", loop.time() + 0.02)
    async with asyncio.timeout(5):
        await done.wait()
    assert fired == ["tick", "tick", "tick"]
    timers.schedule("late", loop.time() + 0.05)
    timers.close()
    assert timers.closed
    timers.schedule("ignored", loop.time())
    await asyncio.sleep(0.2)
    assert fired == ["tick", "tick", "tick"]


@pytest.mark.timeout(20)
async def test_timers_with_another_clock_and_a_raising_callback() -> None:
    loop = asyncio.get_running_loop()
    offset = 1_764_057_600.0  # deadlines on a wall-clock-like time base
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    rec = Recorder(loop)
    calls = 0

    def on_due(keys: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        rec(keys)

    timers: Timers[str] = Timers(on_due, clock=lambda: loop.time() + offset)
    try:
        now = timers.now()
        assert abs(now - (loop.time() + offset)) < 0.01
        timers.schedule("first", now + 0.05)
        timers.schedule("second", now + 0.15)
        await rec.wait(1)
        assert rec.calls[0][1] == ["second"]
        assert rec.calls[0][0] + offset >= now + 0.15 - 0.005
        assert len(errors) == 1 and isinstance(errors[0]["exception"], RuntimeError)
    finally:
        timers.close()
        loop.set_exception_handler(None)
