"""The hub: which subscribers hold which channel on this node, and the fan-out.

The broker hands every payload to ``on_message`` synchronously. The hub
decodes it once, encodes it at most once per codec in use, and gives the same
frame bytes to each subscriber's writer, which writes them or queues them
(bounded). Nothing here awaits a subscriber. The hub knows a connection only
as a ``Subscriber``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Protocol

from realtime.broker import Broker, BrokerUnavailable
from realtime.envelope import KIND_EVENT, unpack
from realtime.protocol import CODECS, Codec, is_spending, spending_item

if TYPE_CHECKING:
    from realtime.metrics import Metrics
    from realtime.tiers import Tier, TierPolicy


class FrameSink(Protocol):
    """Where the hub puts a subscriber's frames (``realtime.writer.Writer``)."""

    def write(self, data: bytes, /) -> None:
        """Take one complete frame; never blocks, never raises."""
        ...


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


class Hub:
    """Channel and user registries of one node, and the broker's message handler."""

    def __init__(self, broker: Broker, policy: TierPolicy, metrics: Metrics) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = metrics
        #: channel -> its local subscribers, in subscription order
        self.channels: dict[str, dict[Subscriber, None]] = {}
        #: user -> that user's subscribers on this node
        self.users: dict[str, set[Subscriber]] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        self._events_out = metrics.messages_out.labels("event")
        self._notifications_out = metrics.messages_out.labels("notification")
        self._latency = metrics.latency

    # ------------------------------------------------------------------ registry

    def add_user(self, conn: Subscriber) -> None:
        self.users.setdefault(conn.user, set()).add(conn)

    def remove_user(self, conn: Subscriber) -> None:
        conns = self.users.get(conn.user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.users[conn.user]

    async def subscribe(self, conn: Subscriber, channel: str) -> None:
        """Add ``conn`` to ``channel``; on the node's first subscriber, subscribe the broker.

        Raises BrokerUnavailable (and leaves ``conn`` unsubscribed) when the broker
        could not subscribe. Cancelled, it leaves ``conn`` unsubscribed and re-raises
        the cancellation; other callers waiting on the same broker subscription get
        BrokerUnavailable.
        """
        subs = self.channels.get(channel)
        if subs is not None:
            subs[conn] = None
            pending = self._subscribing.get(channel)
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except BaseException:
                    self._discard(conn, channel)
                    raise
            return
        self.channels[channel] = {conn: None}
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscribing[channel] = future
        try:
            await self.broker.subscribe(channel)
        except BaseException as exc:
            self.channels.pop(channel, None)
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

    def _discard(self, conn: Subscriber, channel: str) -> bool:
        """Remove ``conn`` from ``channel``; True when the channel has no local subscriber left."""
        subs = self.channels.get(channel)
        if subs is None or conn not in subs:
            return False
        del subs[conn]
        if subs:
            return False
        del self.channels[channel]
        return True

    async def unsubscribe(self, conn: Subscriber, channel: str) -> None:
        """Remove ``conn``; after the node's last subscriber, unsubscribe the broker."""
        if self._discard(conn, channel):
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
        message = delivery.message
        if delivery.kind != KIND_EVENT:
            self._fan_out(tuple(subs), message, self._notifications_out)
        else:
            event = message.get("event")
            if not isinstance(event, str):
                return
            if self.policy.is_premium_event(event):
                targets = self._premium_targets(subs)
            else:
                targets = tuple(subs)
            if is_spending(event):
                item = spending_item(message)
                for conn in targets:
                    conn.add_spending(channel, item)
            else:
                self._fan_out(targets, message, self._events_out)
        if delivery.accepted_at:
            self._latency.observe(max(0.0, time.time() - delivery.accepted_at))

    def _premium_targets(self, subs: dict[Subscriber, None]) -> tuple[Subscriber, ...]:
        targets = tuple(conn for conn in subs if conn.tier.premium_events)
        if len(targets) < len(subs):
            for conn in subs:
                if not conn.tier.premium_events:
                    self.metrics.filtered.labels(conn.tier.name).inc()
        return targets

    @staticmethod
    def _fan_out(targets: tuple[Subscriber, ...], message: dict[str, Any], counter: Any) -> None:
        """Encode ``message`` at most once per codec and give the frame to every target."""
        frames: list[bytes | None] = [None, None]
        for conn in targets:
            index = conn.codec.index
            data = frames[index]
            if data is None:
                data = frames[index] = CODECS[index].encode(message)
            conn.writer.write(data)
        counter.inc(len(targets))
