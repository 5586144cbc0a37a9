"""One timer mechanism per node: a deadline heap and one armed loop timer.

Thousands of connections each want a wake-up (batch windows, token expiry,
connect deadlines); a sleeping task or a loop timer per wait costs memory and
timer churn. ``DeadlineHeap`` is the sans-I/O core (one deadline per key);
``Timers`` is its shell, holding a single ``loop.call_at`` handle for the
earliest deadline and handing due keys to a synchronous callback.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)

#: Stale heap entries tolerated beyond twice the live keys before a rebuild.
COMPACT_SLACK: Final = 64


class DeadlineHeap(Generic[K]):
    """At most one deadline per key, earliest first; sans I/O.

    ``schedule`` replaces the key's deadline, ``cancel`` forgets it; both are
    O(log n). Replaced and cancelled entries are deleted lazily and compacted
    when they outnumber the live ones, so memory stays O(live keys); a stale
    entry holds no reference to its key (a cancelled key is released at once).
    Keys with equal deadlines come out in the order they were scheduled.
    """

    __slots__ = ("_heap", "_keys", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []
        self._live: dict[K, tuple[float, int]] = {}
        #: sequence number of each live entry -> its key
        self._keys: dict[int, K] = {}
        self._seq = 0

    def __len__(self) -> int:
        """The number of keys with a deadline."""
        return len(self._live)

    def __contains__(self, key: object) -> bool:
        return key in self._live

    def deadline_of(self, key: K) -> float | None:
        entry = self._live.get(key)
        return None if entry is None else entry[0]

    def schedule(self, key: K, when: float) -> None:
        """Set the key's deadline to ``when``, replacing any it had."""
        entry = self._live.get(key)
        if entry is not None:
            if entry[0] == when:
                return
            del self._keys[entry[1]]
        self._seq += 1
        seq = self._seq
        self._live[key] = (when, seq)
        self._keys[seq] = key
        heapq.heappush(self._heap, (when, seq))
        self._compact_if_sparse()

    def cancel(self, key: K) -> bool:
        """Forget the key's deadline; whether it had one."""
        entry = self._live.pop(key, None)
        if entry is None:
            return False
        del self._keys[entry[1]]
        self._compact_if_sparse()
        return True

    def next_deadline(self) -> float | None:
        """The earliest deadline (None: no keys)."""
        heap, keys = self._heap, self._keys
        while heap and heap[0][1] not in keys:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: float) -> list[K]:
        """Remove and return the keys whose deadline is ``<= now``, earliest first."""
        heap, keys = self._heap, self._keys
        due: list[K] = []
        while heap and heap[0][0] <= now:
            key = keys.pop(heapq.heappop(heap)[1], None)
            if key is not None:
                del self._live[key]
                due.append(key)
        return due

    def _compact_if_sparse(self) -> None:
        if len(self._heap) > 2 * len(self._live) + COMPACT_SLACK:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)


class Timers(Generic[K]):
    """A ``DeadlineHeap`` driven by one ``loop.call_at`` handle for its earliest deadline.

    Deadlines are in the time of ``clock`` (default: the loop's own clock,
    ``loop.time()``); another clock is mapped onto the loop's at arming time.
    When deadlines pass, ``on_due(keys)`` is called on the loop, synchronously,
    once per wake-up with every due key, earliest first. It may schedule and
    cancel keys. If it raises, the loop's exception handler reports it and the
    timers keep running. The loop is the running one at the first ``schedule``
    unless given. ``close()`` cancels the armed handle; after it nothing fires
    and ``schedule`` is ignored.
    """

    __slots__ = ("_armed_at", "_clock", "_closed", "_handle", "_heap", "_loop", "_on_due")

    def __init__(
        self,
        on_due: Callable[[list[K]], None],
        *,
        clock: Callable[[], float] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._on_due = on_due
        self._clock = clock
        self._loop = loop
        self._heap: DeadlineHeap[K] = DeadlineHeap()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = 0.0
        self._closed = False

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, key: object) -> bool:
        return key in self._heap

    @property
    def closed(self) -> bool:
        return self._closed

    def now(self) -> float:
        """The current time on the deadlines' clock."""
        if self._clock is not None:
            return self._clock()
        return self._get_loop().time()

    def next_deadline(self) -> float | None:
        return self._heap.next_deadline()

    def schedule(self, key: K, when: float) -> None:
        """Call back with ``key`` once ``when`` has passed (replacing its earlier deadline)."""
        if self._closed:
            return
        self._heap.schedule(key, when)
        if self._handle is None or when < self._armed_at:
            self._arm()

    def cancel(self, key: K) -> bool:
        """Forget the key's deadline; whether it had one."""
        found = self._heap.cancel(key)
        if found and not self._heap and self._handle is not None:
            self._handle.cancel()
            self._handle = None
        return found

    def close(self) -> None:
        """Cancel the armed wake-up; nothing fires afterwards."""
        self._closed = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _get_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _arm(self) -> None:
        """Point the one handle at the earliest deadline (or at nothing)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        deadline = self._heap.next_deadline()
        if deadline is None or self._closed:
            return
        loop = self._get_loop()
        at = deadline if self._clock is None else loop.time() + (deadline - self._clock())
        self._armed_at = deadline
        self._handle = loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._handle = None
        # the loop fired for _armed_at: that deadline counts as reached even if the
        # clock reads a hair earlier (coarse loop clocks), so the heap always progresses
        due = self._heap.pop_due(max(self.now(), self._armed_at))
        self._arm()
        if due:
            self._on_due(due)
