"""The history seam: each channel's offsets, epoch and kept publications (section 9).

A channel publication goes *through* its history: ``publish`` checks the caller's
idempotency key, gives the publication the channel's next offset, keeps it and
hands it to the broker's fan-out, all in one atomic step. ``MemoryHistory`` is
the embedded default (one node); ``RedisHistory`` (redis_history.py) does the
step in one Lua script, so that every node sees the same offsets.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from realtime.backend import BackendUnavailable
from realtime.envelope import frame
from realtime.tiers import HistoryLimits

#: How long a duplicate publish is recognised by default (the idempotency window).
DEFAULT_RESULT_TTL: Final = 600.0
#: Idempotency results the memory history remembers at most (the oldest are forgotten first).
MEMORY_MAX_RESULTS: Final = 1_000_000
#: Channels the memory history keeps at most; beyond, the least recently used loses its
#: history (and so its epoch).
MEMORY_MAX_CHANNELS: Final = 100_000
#: How long a channel that was only read keeps its epoch (seconds).
READ_EPOCH_TTL: Final = 86_400.0


class HistoryUnavailable(BackendUnavailable):
    """The history cannot publish or read now: nothing was published (answer 503)."""


#: Epochs made ahead (one ``os.urandom`` system call makes ``_EPOCHS_AHEAD``); none is
#: handed out twice: deque operations are atomic, and a forked child starts empty.
_epochs: deque[str] = deque()
_EPOCH_HEX: Final = 12
_EPOCHS_AHEAD: Final = 256
os.register_at_fork(after_in_child=_epochs.clear)


def new_epoch() -> str:
    """A fresh epoch: opaque, random (``os.urandom``), short (12 hex digits)."""
    try:
        return _epochs.popleft()
    except IndexError:
        made = os.urandom(_EPOCH_HEX // 2 * _EPOCHS_AHEAD).hex()
        _epochs.extend(made[i : i + _EPOCH_HEX] for i in range(_EPOCH_HEX, len(made), _EPOCH_HEX))
        return made[:_EPOCH_HEX]


@dataclass(frozen=True, slots=True)
class Position:
    """Where a channel's history stands: its epoch and its latest offset (0: none yet)."""

    epoch: str
    offset: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A kept publication: its offset and the payload it was published with."""

    offset: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Page:
    """A history read: the channel's position when read, and entries in offset order."""

    position: Position
    entries: list[Entry]


@dataclass(frozen=True, slots=True)
class Published:
    """The outcome of one publish: the offset it got (for a duplicate, its first one)."""

    offset: int
    epoch: str
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class Publication:
    """One publish request: ``payload`` is the envelope (realtime/envelope.py)."""

    channel: str
    payload: bytes
    limits: HistoryLimits
    #: the caller's idempotency key (its event id), or None
    key: str | None = None


class History(Protocol):
    """Offsets, epochs and kept publications of every channel, shared by all nodes.

    Contract (tests/test_history_contract.py runs it against every implementation):

    - ``publish(items)`` handles each item atomically and in list order: if its key
      was published on that channel within ``result_ttl``, the outcome is the first
      publication's offset and epoch with ``duplicate`` set, and nothing else
      happens. Otherwise the channel's offset grows by one (1 for the first
      publication of an epoch), the payload is kept (at most ``limits.size`` per
      channel, all dropped ``limits.ttl_s`` after the channel's last publication)
      and handed to the broker framed with its offset and epoch
      (``envelope.frame``). An item that could not be handled has
      ``HistoryUnavailable`` as its outcome and had no effect; the others keep theirs.
    - ``read(channel, since, limit)``: the position and, oldest first, at most
      ``limit`` entries: those with an offset above ``since``, or (``since`` None)
      the latest. ``limit`` 0 reads the position only. A channel never published
      (or whose history was lost) gets an epoch at its first read, so the position
      is always valid. Raises ``HistoryUnavailable``.
    - The epoch changes exactly when offsets restart (the history was lost or
      expired); offsets of one epoch are never reused.
    - ``close()`` releases connections; nothing works after it.
    """

    async def publish(
        self, items: Sequence[Publication]
    ) -> list[Published | HistoryUnavailable]: ...

    async def read(self, channel: str, since: int | None, limit: int) -> Page: ...

    @property
    def ready(self) -> bool: ...

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Channel:
    epoch: str
    expires_at: float
    offset: int = 0
    #: None until the first publication (a channel only read costs no list)
    entries: list[Entry] | None = None


class MemoryHistory:
    """The in-process history: one node; nothing survives a restart (new epochs).

    A channel's whole state (epoch included) is dropped ``ttl_s`` after its last
    publication, and the least recently used channel beyond ``max_channels`` is
    dropped too: memory stays bounded, and a dropped channel starts a new epoch.
    """

    def __init__(
        self,
        deliver: Callable[[str, bytes], None],
        *,
        result_ttl: float = DEFAULT_RESULT_TTL,
        clock: Callable[[], float] = time.monotonic,
        max_results: int = MEMORY_MAX_RESULTS,
        max_channels: int = MEMORY_MAX_CHANNELS,
    ) -> None:
        self._deliver = deliver
        self._result_ttl = result_ttl
        self._clock = clock
        self._max_results = max_results
        self._max_channels = max_channels
        #: channel -> its state, least recently used first
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        #: (channel, key) -> (expires at, outcome), oldest first
        self._results: OrderedDict[tuple[str, str], tuple[float, Published]] = OrderedDict()
        self._closed = False

    def _channel(self, name: str, now: float, ttl: float) -> _Channel:
        """The channel's state, new (a new epoch) if it had none or it expired."""
        channels = self._channels
        channel = channels.get(name)
        if channel is None or channel.expires_at <= now:
            channel = channels[name] = _Channel(new_epoch(), now + ttl)
            if len(channels) > self._max_channels:
                channels.popitem(last=False)
        channels.move_to_end(name)
        return channel

    async def publish(self, items: Sequence[Publication]) -> list[Published | HistoryUnavailable]:
        if self._closed:
            return [HistoryUnavailable("history closed") for _ in items]
        now = self._clock()
        self._forget_results(now)
        out: list[Published | HistoryUnavailable] = []
        for item in items:
            result_key = (item.channel, item.key) if item.key is not None else None
            if result_key is not None:
                known = self._results.get(result_key)
                if known is not None:
                    out.append(Published(known[1].offset, known[1].epoch, duplicate=True))
                    continue
            channel = self._channel(item.channel, now, item.limits.ttl_s)
            channel.offset += 1
            channel.expires_at = now + item.limits.ttl_s
            entries = channel.entries
            if entries is None:
                entries = channel.entries = []
            entries.append(Entry(channel.offset, item.payload))
            if len(entries) > item.limits.size:
                del entries[: len(entries) - item.limits.size]
            published = Published(channel.offset, channel.epoch)
            if result_key is not None:
                self._results[result_key] = (now + self._result_ttl, published)
            self._deliver(item.channel, frame(published.offset, published.epoch, item.payload))
            out.append(published)
        return out

    def _forget_results(self, now: float) -> None:
        results = self._results
        while results and (
            next(iter(results.values()))[0] <= now or len(results) > self._max_results
        ):
            results.popitem(last=False)

    async def read(self, channel: str, since: int | None, limit: int) -> Page:
        if self._closed:
            raise HistoryUnavailable("history closed")
        now = self._clock()
        state = self._channel(channel, now, READ_EPOCH_TTL)
        position = Position(state.epoch, state.offset)
        kept = state.entries
        if limit <= 0 or not kept:
            return Page(position, [])
        if since is None:
            entries = kept[-limit:]
        else:
            first = kept[0].offset  # offsets in the list are consecutive
            start = max(0, since + 1 - first)
            entries = kept[start : start + limit]
        return Page(position, entries)

    @property
    def ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        self._channels.clear()
        self._results.clear()
