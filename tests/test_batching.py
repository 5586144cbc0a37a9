"""realtime.batching: the spending batcher, with a fake clock and a property test."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.batching import SpendingBatcher


def test_window_opens_with_the_first_item() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=2.0, max_items=50)
    assert b.deadline() is None
    assert b.add("user:1", 1, now=10.0) is None
    assert b.deadline() == 12.0
    assert b.add("user:1", 2, now=11.5) is None
    assert b.deadline() == 12.0  # later items do not move the window
    assert b.due(11.999) == []
    assert len(b) == 2
    assert b.due(12.0) == [("user:1", [1, 2])]
    assert b.deadline() is None
    assert len(b) == 0
    # the next item opens a new window
    assert b.add("user:1", 3, now=12.5) is None
    assert b.deadline() == 14.5


def test_full_batch_is_returned_by_add() -> None:
    b: SpendingBatcher[str] = SpendingBatcher(window=2.0, max_items=3)
    assert b.add("c", "a", 0.0) is None
    assert b.add("c", "b", 0.1) is None
    assert b.add("c", "c", 0.2) == ["a", "b", "c"]
    assert b.deadline() is None
    assert b.due(100.0) == []
    assert b.add("c", "d", 0.3) is None
    assert b.deadline() == pytest.approx(2.3)


def test_max_items_one_sends_each_item_alone() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=5.0, max_items=1)
    assert b.add("c", 1, 0.0) == [1]
    assert b.add("c", 2, 0.0) == [2]
    assert b.deadline() is None


def test_channels_are_independent() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=1.0, max_items=2)
    b.add("user:1", 1, 0.0)
    b.add("artist:x", 2, 0.5)
    assert b.deadline() == 1.0
    assert b.add("artist:x", 3, 0.6) == [2, 3]
    assert b.deadline() == 1.0
    b.add("artist:x", 4, 0.7)
    assert b.due(1.0) == [("user:1", [1])]
    assert b.deadline() == pytest.approx(1.7)
    assert b.due(2.0) == [("artist:x", [4])]


def test_due_returns_earliest_first_and_drain_everything() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=1.0, max_items=10)
    b.add("b", 1, 0.2)
    b.add("a", 2, 0.1)
    b.add("c", 3, 0.3)
    assert b.due(1.25) == [("a", [2]), ("b", [1])]
    b.add("a", 4, 1.3)
    assert b.drain() == [("c", [3]), ("a", [4])]
    assert b.drain() == []
    assert b.deadline() is None


def test_zero_window_is_due_at_once() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=0.0, max_items=10)
    assert b.add("c", 1, 5.0) is None
    assert b.deadline() == 5.0
    assert b.due(5.0) == [("c", [1])]


def test_set_limits_applies_from_the_next_window() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=2.0, max_items=50)
    b.add("c", 1, 0.0)
    b.set_limits(0.25, 50)  # free -> paid
    assert b.deadline() == 2.0  # the open window keeps its end
    assert b.due(1.0) == []
    assert b.due(2.0) == [("c", [1])]
    b.add("c", 2, 3.0)
    assert b.deadline() == 3.25


def test_set_limits_raising_the_cap_keeps_the_open_batch_cap() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=2.0, max_items=2)
    b.add("c", 1, 0.0)
    b.set_limits(2.0, 10)
    assert b.add("c", 2, 0.1) == [1, 2]  # never past the cap it opened with
    for i in range(9):
        assert b.add("c", i, 0.2) is None
    assert b.add("c", 9, 0.2) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_set_limits_lowering_the_cap_makes_a_full_batch_due() -> None:
    b: SpendingBatcher[int] = SpendingBatcher(window=2.0, max_items=50)
    for i in range(5):
        b.add("c", i, 1.0)
    b.add("d", 9, 1.5)
    b.set_limits(2.0, 3)
    assert b.deadline() == 1.0  # due at once
    assert b.due(1.6) == [("c", [0, 1, 2, 3, 4])]
    assert b.deadline() == 3.5
    # or returned by the next add to its channel, that item included
    b.set_limits(2.0, 50)
    for i in range(4):
        assert b.add("e", i, 2.0) is None
    b.set_limits(2.0, 2)
    assert b.add("e", 4, 2.1) == [0, 1, 2, 3, 4]
    assert b.add("e", 5, 2.2) is None  # a new window with the new cap
    assert b.add("e", 6, 2.3) == [5, 6]


def test_bad_limits() -> None:
    with pytest.raises(ValueError):
        SpendingBatcher(window=-1.0, max_items=5)
    with pytest.raises(ValueError):
        SpendingBatcher(window=float("nan"), max_items=5)
    with pytest.raises(ValueError):
        SpendingBatcher(window=1.0, max_items=0)
    b: SpendingBatcher[int] = SpendingBatcher(window=1.0, max_items=5)
    with pytest.raises(ValueError):
        b.set_limits(1.0, 0)
    assert (b.window, b.max_items) == (1.0, 5)


# --------------------------------------------------------------------------- property

CHANNELS = ("user:1", "user:2", "artist:a", "broadcast")

add_op = st.tuples(st.just("add"), st.sampled_from(CHANNELS), st.floats(0, 1.0))
due_op = st.tuples(st.just("due"), st.just(""), st.floats(0, 3.0))
limits_op = st.tuples(
    st.just("limits"),
    st.sampled_from(["0.0/1", "0.25/2", "0.5/3", "2.0/5", "1.0/50"]),
    st.just(0.0),
)


@dataclass
class Held:
    """The model of one open batch."""

    opened: float
    end: float
    cap: int
    count: int = 0


@dataclass
class Run:
    """A batcher driven by a sequence of operations, checked against a model as it goes."""

    window: float
    max_items: int
    now: float = 0.0
    sent: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    given: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    held: dict[str, Held] = field(default_factory=dict)

    def take(self, channel: str, items: list[int], *, by: str) -> None:
        assert items, "an empty batch"
        held = self.held.pop(channel)
        assert len(items) == held.count
        assert len(items) <= held.cap, "a batch over the cap it opened with"
        if by == "due":
            lowered = len(items) >= self.max_items
            assert self.now >= held.end or lowered, "returned by due() before its window ended"
        elif by == "add":
            assert len(items) >= min(held.cap, self.max_items)
        self.sent[channel].extend(items)

    def expected_deadline(self) -> float | None:
        return min(
            (h.opened if h.count >= self.max_items else h.end for h in self.held.values()),
            default=None,
        )


def run(ops: list[tuple[str, str, float]], window: float, max_items: int) -> Run:
    batcher: SpendingBatcher[int] = SpendingBatcher(window, max_items)
    r = Run(window, max_items)
    for n, (op, arg, dt) in enumerate(ops):
        r.now += dt
        if op == "add":
            r.given[arg].append(n)
            r.held.setdefault(arg, Held(r.now, r.now + r.window, r.max_items)).count += 1
            full = batcher.add(arg, n, r.now)
            if full is not None:
                r.take(arg, full, by="add")
            else:  # a batch at its cap is handed back by the add that filled it
                assert r.held[arg].count < min(r.held[arg].cap, r.max_items)
        elif op == "due":
            for channel, items in batcher.due(r.now):
                r.take(channel, items, by="due")
            for channel, h in r.held.items():  # every batch that was due was handed back
                assert h.end > r.now and h.count < r.max_items, f"{channel} kept at {r.now}"
        else:
            w, m = arg.split("/")
            r.window, r.max_items = float(w), int(m)
            batcher.set_limits(r.window, r.max_items)
        assert batcher.deadline() == r.expected_deadline()
        assert len(batcher) == sum(h.count for h in r.held.values())
    for channel, items in batcher.drain():
        r.take(channel, items, by="drain")
    assert not r.held
    assert batcher.deadline() is None
    return r


Op = tuple[str, str, float]


@pytest.mark.parametrize(
    "op",
    [st.one_of(add_op, due_op), st.one_of(add_op, due_op, limits_op)],
    ids=["fixed-limits", "tier-changes"],
)
@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    window=st.sampled_from([0.0, 0.25, 1.0, 2.0]),
    max_items=st.integers(1, 6),
)
def test_property_nothing_lost_duplicated_or_reordered(
    op: st.SearchStrategy[Op], data: st.DataObject, window: float, max_items: int
) -> None:
    ops = data.draw(st.lists(op, max_size=120), label="ops")
    r = run(ops, window, max_items)
    assert dict(r.sent) == dict(r.given)
