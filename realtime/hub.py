"""The hub: which subscribers hold which channel on this node, and the fan-out.

The broker hands every payload to ``on_message`` synchronously. The hub
decodes it once, encodes it at most once per codec in use, and gives the same
frame bytes to each subscriber's writer, which writes them or queues them
(bounded). Nothing here awaits a subscriber. The hub knows a connection only
as a ``Subscriber``.

A subscription starts *held*: live publications for it are kept aside while
its connection reads the channel's position (and history) and are handed back
by ``take_held``; ``go_live`` then makes it live from an offset on, so that a
subscribe racing publications on other nodes misses nothing and gets nothing
twice (section 9).

The node fills its own gaps. It knows, per channel, the epoch and the highest
offset it delivered or told a subscriber of. A publication further on than
the next one (the broker lost some: a pub/sub reconnect, a buffer limit), a
broker reconnect, or a periodic position check that finds the history ahead
starts a *fill*: live publications of the channel are held at node level
while the missed ones are read from the history and delivered in order, then
the held ones. A publication of another epoch, or a gap the history no longer
holds, means the subscribers' positions are lost: they are closed with 1001,
and resume (``recovered: false`` tells them to resync).

With a ``linger``, the broker stays subscribed to a channel for that long after its
last local subscriber left: a client that comes back within it (a resume, a reconnect
to the same node) joins without waiting for the broker's subscribe round trip.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Hashable
from typing import TYPE_CHECKING, Any, Protocol, cast

from realtime.broker import Broker, BrokerUnavailable
from realtime.envelope import KIND_EVENT, KIND_PRESENCE, Delivery, unpack, unpack_entry
from realtime.history import History, HistoryUnavailable
from realtime.protocol import CloseCode, Codec, is_spending, spending_item
from realtime.writer import FrameSink, Writer, write_to_all, write_to_writers

if TYPE_CHECKING:
    from realtime.metrics import Metrics
    from realtime.tiers import Tier, TierPolicy
    from realtime.writer import FlushQueue


#: Publications read per history call while a node fills a gap.
FILL_PAGE = 1000
#: Seconds between checks of every local channel's position (a loss followed by silence).
POSITION_CHECK_INTERVAL = 15.0
#: Seconds a node on Redis stays subscribed to a channel after its last local subscriber.
BROKER_LINGER = 5.0

log = logging.getLogger("realtime.hub")


class Subscriber(Hashable, Protocol):
    """What the hub calls on a connection (``realtime.connection.Connection``).

    ``writer.write`` takes frames encoded with ``codec``; ``tier`` decides whether
    premium-only events reach it; ``add_spending`` takes a spending item of a
    channel it holds, to batch. None of them may block or raise.
    """

    @property
    def user(self) -> str: ...

    @property
    def codec(self) -> Codec: ...

    @property
    def tier(self) -> Tier: ...

    @property
    def writer(self) -> FrameSink: ...

    def add_spending(self, channel: str, item: dict[str, Any]) -> None: ...

    def fail(self, exc: BaseException, where: str, /) -> None:
        """The fault boundary: ``exc`` escaped an action on this subscriber; close it (1011)."""
        ...


#: A subscription's state in ``Hub.channels``: None live; a list of the publications held
#: for it while its subscribe reads the channel's position; an int, live for publications
#: with a higher offset (lower ones reached it through its subscribe reply).
SubState = None | list[Delivery] | int


class Hub:
    """Channel and user registries of one node, and the broker's message handler."""

    def __init__(
        self,
        broker: Broker,
        history: History,
        policy: TierPolicy,
        metrics: Metrics,
        *,
        check_interval: float | None = None,
        flushes: FlushQueue | None = None,
        linger: float = 0.0,
    ) -> None:
        self.broker = broker
        #: seconds the broker stays subscribed after a channel's last local subscriber left
        self.linger = linger
        #: channel -> the timer that unsubscribes the broker (no local subscriber since)
        self._lingering: dict[str, asyncio.TimerHandle] = {}
        #: the node's flush queue, told of each fan-out (None: every frame coalesces)
        self.flushes = flushes
        self.history = history
        self.policy = policy
        self.metrics = metrics
        #: seconds between position checks of every local channel (None: never; one node)
        self.check_interval = check_interval
        #: called with the channel when a node says its presence counts changed
        self.on_presence_change: Callable[[str], None] | None = None
        #: channel -> the epoch of what this node delivered or told of
        self.epochs: dict[str, str] = {}
        #: channel -> the highest offset delivered or told in a subscribe reply
        self._covered: dict[str, int] = {}
        #: channel -> publications held while the node fills the channel's gap
        self._filling: dict[str, list[Delivery]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._checker: asyncio.Task[None] | None = None
        #: channel -> its local subscribers, in subscription order, with their state
        self.channels: dict[str, dict[Subscriber, SubState]] = {}
        #: channel -> how many of its subscribers are not plainly live (held or with a floor)
        self._unsettled: dict[str, int] = {}
        #: channel -> its subscribers as the tuple a fan-out takes, and their writers (None
        #: unless every one is a ``Writer``), made again only after a subscriber came or went
        #: (not once per publication)
        self._targets: dict[str, tuple[tuple[Subscriber, ...], tuple[Writer, ...] | None]] = {}
        #: channel -> the offset of the last publication this node received on it
        self.last_offset: dict[str, int] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._events_out = metrics.messages_out.labels("event")
        self._notifications_out = metrics.messages_out.labels("notification")
        self._latency = metrics.latency

    # ------------------------------------------------------------------ registry

    async def subscribe(self, conn: Subscriber, channel: str) -> None:
        """Add ``conn`` to ``channel``, held (see the module docstring); on the node's first
        subscriber, subscribe the broker. Once it returns, every publication the broker
        receives on the channel reaches ``conn``'s held list; the caller reads the
        channel's position and calls ``take_held`` and ``go_live`` without an await between.

        Raises BrokerUnavailable (and leaves ``conn`` unsubscribed) when the broker
        could not subscribe. Cancelled, it leaves ``conn`` unsubscribed and re-raises
        the cancellation; other callers waiting on the same broker subscription get
        BrokerUnavailable.
        """
        subs = self.channels.get(channel)
        if subs is not None:
            self._set(channel, subs, conn, [])
            pending = self._subscribing.get(channel)
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except BaseException:
                    self._discard(conn, channel)
                    raise
            return
        self.channels[channel] = {}
        self._set(channel, self.channels[channel], conn, [])
        timer = self._lingering.pop(channel, None)
        if timer is not None:  # still subscribed on the broker: it returns at once
            timer.cancel()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscribing[channel] = future
        try:
            await self.broker.subscribe(channel)
        except BaseException as exc:
            self._drop_channel(channel)
            failure = (
                exc
                if isinstance(exc, BrokerUnavailable)
                else BrokerUnavailable(f"subscribing {channel} failed: {exc!r}")
            )
            future.set_exception(failure)
            future.exception()  # retrieved: waiters re-raise it through shield
            if isinstance(exc, Exception) and exc is not failure:
                raise failure from exc
            raise
        else:
            future.set_result(None)
        finally:
            if self._subscribing.get(channel) is future:
                del self._subscribing[channel]

    def _set(
        self, channel: str, subs: dict[Subscriber, SubState], conn: Subscriber, state: SubState
    ) -> None:
        """Set ``conn``'s state, keeping the count of unsettled subscribers true."""
        old = subs.get(conn)
        if conn not in subs:
            self._targets.pop(channel, None)
        was = old is not None
        subs[conn] = state
        now = state is not None
        if now and not was:
            self._unsettled[channel] = self._unsettled.get(channel, 0) + 1
        elif was and not now:
            self._settled(channel)

    def _settled(self, channel: str) -> None:
        left = self._unsettled[channel] - 1
        if left:
            self._unsettled[channel] = left
        else:
            del self._unsettled[channel]

    def _drop_channel(self, channel: str) -> None:
        self.channels.pop(channel, None)
        self._targets.pop(channel, None)
        self._unsettled.pop(channel, None)
        self.last_offset.pop(channel, None)
        self.epochs.pop(channel, None)
        self._covered.pop(channel, None)

    def _discard(self, conn: Subscriber, channel: str) -> bool:
        """Remove ``conn`` from ``channel``; True when the channel has no local subscriber left."""
        subs = self.channels.get(channel)
        if subs is None or conn not in subs:
            return False
        self._targets.pop(channel, None)
        if subs.pop(conn) is not None:
            self._settled(channel)
        if subs:
            return False
        self._drop_channel(channel)
        return True

    def take_held(self, conn: Subscriber, channel: str) -> list[Delivery]:
        """The publications held for ``conn``'s subscription since it began (it stays held
        until ``go_live``)."""
        state = self.channels.get(channel, {}).get(conn)
        if not isinstance(state, list):
            return []
        held = state[:]
        state.clear()
        return held

    def go_live(self, conn: Subscriber, channel: str, offset: int, epoch: str) -> None:
        """Make ``conn``'s subscription live for publications with an offset above ``offset``
        (the ones up to it reached the client in its subscribe reply, of ``epoch``)."""
        subs = self.channels.get(channel)
        if subs is None or conn not in subs:
            return
        if self.epochs.setdefault(channel, epoch) == epoch:
            self._covered[channel] = max(self._covered.get(channel, 0), offset)
        if self.last_offset.get(channel, 0) >= offset:
            self._set(channel, subs, conn, None)  # nothing older can still be on its way
        else:
            self._set(channel, subs, conn, offset)

    async def unsubscribe(self, conn: Subscriber, channel: str) -> None:
        """Remove ``conn``; after the node's last subscriber, unsubscribe the broker (after
        ``linger`` seconds, unless a subscriber came back meanwhile)."""
        if not self._discard(conn, channel):
            return
        if self.linger > 0:
            loop = asyncio.get_running_loop()
            self._lingering[channel] = loop.call_later(self.linger, self._linger_over, channel)
            return
        await self._unsubscribe_broker(channel)

    def _linger_over(self, channel: str) -> None:
        del self._lingering[channel]
        self._own(self._unsubscribe_broker(channel), f"unsubscribe {channel}")

    async def _unsubscribe_broker(self, channel: str) -> None:
        """Unsubscribe the broker from ``channel`` unless it has a local subscriber again.

        The check and the broker's forgetting of the channel happen in this one step (the
        broker takes its per-channel lock without waiting: no other call on the channel
        runs while it has no local subscriber), so a subscribe that comes later either
        finds the broker still subscribed or subscribes it again after this."""
        if channel in self.channels:
            return
        try:
            await self.broker.unsubscribe(channel)
        except BrokerUnavailable:
            pass  # the broker forgets the channel; it will not be re-subscribed

    # ------------------------------------------------------------------ fan-out

    def on_message(self, channel: str, payload: bytes) -> None:
        """The broker's handler: fan one payload out to this node's subscribers."""
        subs = self.channels.get(channel)
        if not subs:
            return
        delivery = unpack(payload)
        if delivery is None:
            return
        if delivery.kind == KIND_PRESENCE:
            if self.on_presence_change is not None:
                self.on_presence_change(channel)
            return
        if delivery.offset and not self._next_in_order(channel, delivery):
            return
        self._route(channel, subs, delivery)
        if delivery.accepted_at:
            self._latency.observe(max(0.0, time.time() - delivery.accepted_at))

    def _route(self, channel: str, subs: dict[Subscriber, SubState], delivery: Delivery) -> None:
        if delivery.offset:
            self.last_offset[channel] = delivery.offset
            self.epochs[channel] = delivery.epoch
        if channel in self._unsettled:
            self.dispatch(channel, delivery, self._settle_targets(channel, subs, delivery))
            return
        cached = self._targets.get(channel)
        if cached is None:
            targets = tuple(subs)
            writers = tuple(conn.writer for conn in targets)
            cached = self._targets[channel] = (
                targets,
                cast("tuple[Writer, ...]", writers)
                if all(type(w) is Writer for w in writers)
                else None,
            )
        self.dispatch(channel, delivery, cached[0], cached[1])

    # ------------------------------------------------------------------ gaps

    def _next_in_order(self, channel: str, delivery: Delivery) -> bool:
        """Whether a live publication goes out now; otherwise it is held (a fill runs or
        starts), dropped (already delivered) or shows the history was lost."""
        held = self._filling.get(channel)
        if held is not None:
            held.append(delivery)
            return False
        epoch = self.epochs.get(channel)
        if epoch is None:
            return True
        if delivery.epoch != epoch:
            self._history_lost(channel, f"epoch {epoch} became {delivery.epoch}")
            return False
        last = self.last_offset.get(channel, 0)
        if delivery.offset <= last:
            return False  # delivered already (by a fill)
        covered = max(last, self._covered.get(channel, 0))
        if covered and delivery.offset > covered + 1:
            self._start_fill(channel, [delivery])
            return False
        return True

    def _start_fill(self, channel: str, held: list[Delivery]) -> None:
        epoch = self.epochs.get(channel)
        if channel in self._filling or epoch is None:
            return
        self._filling[channel] = held
        # From what live subscribers last got (newer subscribers' floors skip the rest).
        since = self.last_offset.get(channel) or self._covered.get(channel, 0)
        self._own(self._fill(channel, epoch, since), f"fill {channel}")

    async def _fill(self, channel: str, epoch: str, since: int) -> None:
        """Deliver the channel's publications after ``since`` from the history, then the
        ones held meanwhile."""
        filled = 0
        try:
            while True:
                page = await self.history.read(channel, since, FILL_PAGE)
                position, entries = page.position, page.entries
                if position.epoch != epoch or (
                    since < position.offset and (not entries or entries[0].offset != since + 1)
                ):
                    self._history_lost(channel, "the history no longer holds the gap")
                    return
                subs = self.channels.get(channel)
                for entry in entries:
                    delivery = unpack_entry(entry.offset, epoch, entry.payload)
                    if subs and delivery is not None:
                        self._route(channel, subs, delivery)
                    since = entry.offset
                    filled += 1
                if not entries or since >= position.offset:
                    break
        except HistoryUnavailable as exc:
            log.warning("could not fill %s from history (%s): clients see a gap", channel, exc)
        finally:
            held = self._filling.pop(channel, [])
            subs = self.channels.get(channel)
            last = self.last_offset.get(channel, 0)
            for delivery in sorted(held, key=lambda d: d.offset):
                if subs and delivery.offset > last and delivery.epoch == epoch:
                    self._route(channel, subs, delivery)
                    last = delivery.offset
        if filled:
            self.metrics.gap_fills.inc(filled)
            log.info("filled %d missed publications of %s from history", filled, channel)

    def _history_lost(self, channel: str, why: str) -> None:
        """The subscribers' positions in ``channel`` mean nothing any more: close them 1001
        so they resume and learn ``recovered: false``."""
        subs = self.channels.get(channel)
        if not subs:
            return
        log.warning("%s: %s; closing its %d subscribers to resync", channel, why, len(subs))
        self.metrics.history_lost.inc()
        for conn in list(subs):
            conn.writer.close(CloseCode.GOING_AWAY, "history lost; resume to resync")
        self.epochs.pop(channel, None)
        self._covered.pop(channel, None)
        self.last_offset.pop(channel, None)

    def on_reconnect(self) -> None:
        """The broker re-subscribed after a loss: fill every channel's gap at once."""
        for channel in list(self.channels):
            self._start_fill(channel, [])

    async def _check_positions(self, interval: float) -> None:
        """Every ``interval`` s, read every local channel's position and fill the ones that
        are ahead of what this node delivered (a loss followed by silence)."""
        while True:
            await asyncio.sleep(interval)
            names = [c for c in self.channels if c in self.epochs and c not in self._filling]
            pages = await asyncio.gather(
                *(self.history.read(c, None, 0) for c in names), return_exceptions=True
            )
            for channel, page in zip(names, pages, strict=True):
                epoch = self.epochs.get(channel)
                if isinstance(page, BaseException) or epoch is None:
                    continue
                covered = max(self.last_offset.get(channel, 0), self._covered.get(channel, 0))
                if page.position.epoch != epoch:
                    self._history_lost(channel, f"epoch {epoch} became {page.position.epoch}")
                elif page.position.offset > covered:
                    self._start_fill(channel, [])

    def start(self) -> None:
        """Start the periodic position check (when the node has one)."""
        if self.check_interval is not None and self._checker is None:
            self._checker = asyncio.create_task(
                self._check_positions(self.check_interval), name="hub position check"
            )

    def _own(self, work: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel and await the position check and every fill."""
        for timer in self._lingering.values():
            timer.cancel()
        self._lingering.clear()
        tasks = [*self._tasks, *([self._checker] if self._checker else [])]
        self._checker = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _settle_targets(
        self, channel: str, subs: dict[Subscriber, SubState], delivery: Delivery
    ) -> tuple[Subscriber, ...]:
        """The subscribers a publication goes to now, when some are held or have a floor."""
        offset = delivery.offset
        targets = []
        for conn, state in list(subs.items()):
            if state is None:
                targets.append(conn)
            elif isinstance(state, list):
                if offset:
                    state.append(delivery)  # handed back by take_held
                else:
                    targets.append(conn)  # not a publication: no position to keep
            elif offset > state or not offset:
                targets.append(conn)
                if offset:
                    self._set(channel, subs, conn, None)
        return tuple(targets)

    def dispatch(
        self,
        channel: str,
        delivery: Delivery,
        targets: tuple[Subscriber, ...],
        writers: tuple[Writer, ...] | None = None,
    ) -> None:
        """Send one decoded payload to ``targets``: premium-only events to the tiers that get
        them, spending items to the batchers, the rest encoded once per codec. ``writers``:
        the targets' writers in the same order, where the caller keeps them."""
        message = delivery.message
        if delivery.kind != KIND_EVENT:
            self._fan_out(targets, message, self._notifications_out, writers)
            return
        event = message.get("event")
        if not isinstance(event, str):
            return
        if self.policy.is_premium_event(event):
            targets = self._premium_targets(targets)
            writers = None
        if is_spending(event):
            item = spending_item(message)
            for conn in targets:
                try:
                    conn.add_spending(channel, item)
                except Exception as exc:  # one connection's failure is its own
                    conn.fail(exc, "fan-out")
        else:
            self._fan_out(targets, message, self._events_out, writers)

    def _premium_targets(self, subs: tuple[Subscriber, ...]) -> tuple[Subscriber, ...]:
        targets = tuple(conn for conn in subs if conn.tier.premium_events)
        if len(targets) < len(subs):
            for conn in subs:
                if not conn.tier.premium_events:
                    self.metrics.filtered.labels(conn.tier.name).inc()
        return targets

    def _fan_out(
        self,
        targets: tuple[Subscriber, ...],
        message: dict[str, Any],
        counter: Any,
        writers: tuple[Writer, ...] | None,
    ) -> None:
        if writers is not None:
            write_to_writers(writers, message, self.flushes)
        else:
            write_to_all(targets, message, self.flushes)
        counter.inc(len(targets))
