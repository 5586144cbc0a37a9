"""The hub: which connections hold which channel on this node, and the fan-out.

The broker hands every payload to ``on_message`` synchronously. The hub
decodes it once, encodes it at most once per codec in use, and gives the same
frame bytes to each subscriber; a connection writes them straight to its
socket or queues them (bounded). Nothing here awaits a connection.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from realtime.broker import Broker, BrokerUnavailable
from realtime.envelope import KIND_EVENT, unpack
from realtime.protocol import CODECS, is_spending

#: Connections written per loop iteration by the flush (the loop reads its sockets between).
FLUSH_SLICE = 128

if TYPE_CHECKING:
    from realtime.connection import Connection
    from realtime.metrics import Metrics
    from realtime.tiers import TierPolicy


class Hub:
    """Channel and user registries of one node, and the broker's message handler."""

    def __init__(self, broker: Broker, policy: TierPolicy, metrics: Metrics) -> None:
        self.broker = broker
        self.policy = policy
        self.metrics = metrics
        #: channel -> its local subscribers, in subscription order
        self.channels: dict[str, dict[Connection, None]] = {}
        #: user -> that user's connections on this node
        self.users: dict[str, set[Connection]] = {}
        self._subscribing: dict[str, asyncio.Future[None]] = {}
        #: connections with pending frames, in the order they got them; flushed in slices
        self._pending: deque[Connection] = deque()
        self._flush_scheduled = False
        self._events_out = metrics.messages_out.labels("event")
        self._notifications_out = metrics.messages_out.labels("notification")
        self._latency = metrics.latency

    # ------------------------------------------------------------------ registry

    def add_user(self, conn: Connection) -> None:
        self.users.setdefault(conn.user, set()).add(conn)

    def remove_user(self, conn: Connection) -> None:
        conns = self.users.get(conn.user)
        if conns is not None:
            conns.discard(conn)
            if not conns:
                del self.users[conn.user]

    async def subscribe(self, conn: Connection, channel: str) -> None:
        """Add ``conn`` to ``channel``; on the node's first subscriber, subscribe the broker.

        Raises BrokerUnavailable (and leaves ``conn`` unsubscribed) when the broker
        could not subscribe.
        """
        subs = self.channels.get(channel)
        if subs is not None:
            subs[conn] = None
            pending = self._subscribing.get(channel)
            if pending is not None:
                try:
                    await asyncio.shield(pending)
                except BrokerUnavailable:
                    self._discard(conn, channel)
                    raise
            return
        self.channels[channel] = {conn: None}
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._subscribing[channel] = future
        try:
            await self.broker.subscribe(channel)
        except BaseException as exc:
            subs = self.channels.pop(channel, None)
            failure = exc if isinstance(exc, BrokerUnavailable) else BrokerUnavailable(str(exc))
            future.set_exception(failure)
            future.exception()  # retrieved: waiters re-raise it through shield
            raise failure from None
        else:
            future.set_result(None)
        finally:
            if self._subscribing.get(channel) is future:
                del self._subscribing[channel]

    def _discard(self, conn: Connection, channel: str) -> bool:
        """Remove ``conn`` from ``channel``; True when the channel has no local subscriber left."""
        subs = self.channels.get(channel)
        if subs is None or conn not in subs:
            return False
        del subs[conn]
        if subs:
            return False
        del self.channels[channel]
        return True

    async def unsubscribe(self, conn: Connection, channel: str) -> None:
        """Remove ``conn``; after the node's last subscriber, unsubscribe the broker."""
        if self._discard(conn, channel):
            try:
                await self.broker.unsubscribe(channel)
            except BrokerUnavailable:
                pass  # the broker forgets the channel; it will not be re-subscribed

    # ------------------------------------------------------------------ writes

    def mark_pending(self, conn: Connection) -> None:
        """``conn`` has a first pending frame: it is flushed with the others, in turn."""
        self._pending.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """One write per connection with pending frames, ``FLUSH_SLICE`` connections per
        loop iteration.

        Between slices the loop reads its sockets, so a message that arrives while a
        big fan-out is being written is fanned out at once: the connections not yet
        written take it in the same write as the frames they hold (fewer writes per
        delivery the busier the node is), the others are queued again. Each
        connection's frames stay in order: they are written only from its own list.
        """
        pending = self._pending
        count = len(pending)
        if count > FLUSH_SLICE:
            count = FLUSH_SLICE
            asyncio.get_running_loop().call_soon(self._flush)  # the rest, after the sockets
        else:
            self._flush_scheduled = False  # a connection marked from here on schedules anew
        popleft = pending.popleft
        try:
            for _ in range(count):
                popleft().flush()
        finally:
            if pending and not self._flush_scheduled:  # a flush raised: the rest still go
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)

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
                item = {
                    "event": event,
                    "id": message.get("id"),
                    "ts": message.get("ts"),
                    "data": message.get("data"),
                }
                for conn in targets:
                    conn.add_spending(channel, item)
            else:
                self._fan_out(targets, message, self._events_out)
        if delivery.accepted_at:
            self._latency.observe(max(0.0, time.time() - delivery.accepted_at))

    def _premium_targets(self, subs: dict[Connection, None]) -> tuple[Connection, ...]:
        targets = tuple(conn for conn in subs if conn.tier.premium_events)
        withheld = len(subs) - len(targets)
        if withheld:
            for conn in subs:
                if not conn.tier.premium_events:
                    self.metrics.filtered.labels(conn.tier.name).inc()
        return targets

    @staticmethod
    def _fan_out(targets: tuple[Connection, ...], message: dict[str, Any], counter: Any) -> None:
        frames: list[bytes | None] = [None, None]
        for conn in targets:
            index = conn.codec.index
            data = frames[index]
            if data is None:
                data = frames[index] = CODECS[index].encode(message)
            conn.write(data)
        counter.inc(len(targets))
