"""Spending batches of one connection, sans I/O (protocol-v1, section 4).

Items are coalesced per channel. A channel's window opens with the first item
into its empty batch; the batch is due when the window has passed or it holds
``max_items``, whichever comes first. Items keep their order; none is lost or
duplicated; no batch is empty. The caller owns the clock (``now`` in seconds,
non-decreasing) and the timer: after each call it arms one wake-up for
``deadline()`` and calls ``due(now)`` then.

Bound: at most ``max_items`` items per channel (a full batch is handed back by
``add`` at once); the number of channels is bounded by the caller's
subscriptions.
"""

from __future__ import annotations

import math
from typing import Generic, TypeVar

T = TypeVar("T")


class _Batch(Generic[T]):
    __slots__ = ("end", "items", "max_items", "opened")

    def __init__(self, opened: float, window: float, max_items: int) -> None:
        self.opened = opened
        self.end = opened + window
        self.max_items = max_items
        self.items: list[T] = []

    def deadline(self, cap: int) -> float:
        """Its window's end; its opening (due at once) if it holds the current ``cap``."""
        return self.opened if len(self.items) >= cap else self.end


def _check(window: float, max_items: int) -> None:
    if not (math.isfinite(window) and window >= 0):
        raise ValueError(f"window must be a finite number >= 0, not {window!r}")
    if max_items < 1:
        raise ValueError(f"max_items must be >= 1, not {max_items!r}")


class SpendingBatcher(Generic[T]):
    """Per-channel batches with a time window and a size cap.

    ``set_limits`` (a tier change) applies from each channel's next window: a
    batch already open keeps its deadline and never grows past the cap it
    opened with; one that already holds the new, lower cap is due at once
    (returned by the next ``add`` to its channel or the next ``due``).
    """

    __slots__ = ("_batches", "_max_items", "_window")

    def __init__(self, window: float, max_items: int) -> None:
        _check(window, max_items)
        self._window = window
        self._max_items = max_items
        self._batches: dict[str, _Batch[T]] = {}

    @property
    def window(self) -> float:
        return self._window

    @property
    def max_items(self) -> int:
        return self._max_items

    def __len__(self) -> int:
        """The number of items held."""
        return sum(len(batch.items) for batch in self._batches.values())

    def add(self, channel: str, item: T, now: float) -> list[T] | None:
        """Append ``item``; the channel's batch when that made it full (send it now), else None."""
        batch = self._batches.get(channel)
        if batch is None:
            batch = self._batches[channel] = _Batch(now, self._window, self._max_items)
        batch.items.append(item)
        if len(batch.items) >= min(batch.max_items, self._max_items):
            del self._batches[channel]
            return batch.items
        return None

    def deadline(self) -> float | None:
        """When the earliest open window ends (None: nothing held)."""
        cap = self._max_items
        return min((batch.deadline(cap) for batch in self._batches.values()), default=None)

    def due(self, now: float) -> list[tuple[str, list[T]]]:
        """Remove and return the batches whose window has passed, earliest first."""
        cap = self._max_items
        ready = [
            (batch.deadline(cap), channel, batch.items)
            for channel, batch in self._batches.items()
            if batch.deadline(cap) <= now
        ]
        ready.sort(key=lambda entry: entry[0])
        for _, channel, _ in ready:
            del self._batches[channel]
        return [(channel, items) for _, channel, items in ready]

    def drain(self) -> list[tuple[str, list[T]]]:
        """Remove and return every batch, oldest first (for close and shutdown)."""
        ready = sorted(self._batches.items(), key=lambda pair: pair[1].opened)
        self._batches.clear()
        return [(channel, batch.items) for channel, batch in ready]

    def set_limits(self, window: float, max_items: int) -> None:
        """New window and cap for the next windows; see the class docstring."""
        _check(window, max_items)
        self._window = window
        self._max_items = max_items
