"""The broker seam: moves payloads between server nodes by channel name.

``MemoryBroker`` is the embedded default (one node); ``RedisBroker``
(redis_broker.py) makes many nodes act as one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from realtime.backend import BackendUnavailable

#: Called by a broker for each payload on a channel this node is subscribed to.
MessageHandler = Callable[[str, bytes], None]


class BrokerUnavailable(BackendUnavailable):
    """The broker cannot take or deliver messages now (answer 503 / ``unavailable``)."""


class Broker(Protocol):
    """Fan-out between nodes, at most once.

    Contract (checked by tests/test_broker_contract.py against every implementation):

    - ``start(handler, on_reconnect)`` is called once before anything else. From then on the
      broker calls ``handler(channel, payload)`` synchronously, on the event loop,
      for every payload published (by any node, this one included) to a channel
      this node is subscribed to. Payloads of one publisher on one channel are
      handed over in the order they were published. The handler must not block
      and must not raise.
    - ``publish(channel, payload)`` returns once the broker has accepted the
      payload; if it cannot, it raises ``BrokerUnavailable`` and nothing was sent.
    - ``subscribe`` / ``unsubscribe`` are per node and idempotent: the caller
      reference-counts its local subscribers and calls them on the first join
      and after the last leave. Once ``subscribe`` returns, every payload
      published afterwards reaches the handler.
    - The broker survives the loss of its backend: it reconnects with backoff and
      re-subscribes every channel still wanted, without a restart, and then calls
      ``on_reconnect()`` (payloads may have been lost meanwhile). ``ready`` is
      False while it cannot publish.
    - ``close()`` stops all of its background work and awaits it.
    """

    async def start(
        self, handler: MessageHandler, on_reconnect: Callable[[], None] | None = None
    ) -> None: ...

    async def publish(self, channel: str, payload: bytes) -> None: ...

    async def subscribe(self, channel: str) -> None: ...

    async def unsubscribe(self, channel: str) -> None: ...

    @property
    def ready(self) -> bool: ...

    async def close(self) -> None: ...


class MemoryBroker:
    """The in-process broker: one node, delivery is a direct synchronous call."""

    def __init__(self) -> None:
        self._handler: MessageHandler | None = None
        self._channels: set[str] = set()
        self._closed = False

    async def start(
        self, handler: MessageHandler, on_reconnect: Callable[[], None] | None = None
    ) -> None:
        self._handler = handler  # one node, nothing to lose: on_reconnect is never called

    async def publish(self, channel: str, payload: bytes) -> None:
        if self._closed:
            raise BrokerUnavailable("broker closed")
        self.deliver(channel, payload)

    def deliver(self, channel: str, payload: bytes) -> None:
        """``publish`` without an await: the handler runs now (the memory history's fan-out)."""
        handler = self._handler
        if handler is not None and channel in self._channels and not self._closed:
            handler(channel, payload)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    @property
    def ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True
        self._channels.clear()
