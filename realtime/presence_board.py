"""This node's side of channel presence (section 10).

The board joins and leaves its connections' channel memberships in the shared
``ChannelPresence``, refreshes them every ``PRESENCE_REFRESH`` seconds, and
pushes ``presence`` messages to the connections that subscribed with
``presence: true``: once after their reply, then whenever the counts change,
at most once a second per channel (the latest counts win). A join or leave
that changes a channel's counts publishes a small control frame on the
channel, so every node watching it recounts within a second; every
``RECOUNT_INTERVAL`` seconds the watched channels are recounted anyway (a dead
node's members expire without telling anyone).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING, Final, Protocol

from realtime.channel_presence import (
    PRESENCE_REFRESH,
    ChannelPresence,
    ChannelPresenceUnavailable,
    Counts,
    Member,
)
from realtime.envelope import pack_presence_change
from realtime.protocol import presence_message
from realtime.writer import Recipient, write_to_all

if TYPE_CHECKING:
    from realtime.broker import Broker

log = logging.getLogger("realtime.presence")

#: Seconds between pushes of one channel's counts, at the most.
PUSH_INTERVAL: Final = 1.0
#: Seconds between recounts of every watched channel.
RECOUNT_INTERVAL: Final = 5.0


class Watcher(Recipient, Hashable, Protocol):
    """A connection that asked for presence pushes."""


class PresenceBoard:
    """See the module docstring. ``start()`` runs its one task; ``close()`` ends it."""

    def __init__(
        self, presence: ChannelPresence, broker: Broker, members: Callable[[], list[Member]]
    ) -> None:
        self.presence = presence
        self.broker = broker
        #: this node's live memberships (derived from its connections when needed)
        self.members = members
        self.watchers: dict[str, set[Watcher]] = {}
        self._last: dict[str, Counts] = {}
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def join(self, member: Member) -> None:
        """Add ``member``; tell the other nodes if the counts changed. Never raises: a
        member the backend did not take is added by the next heartbeat."""
        await self._change(self.presence.join, member)

    async def leave(self, member: Member) -> None:
        """Remove ``member`` (it expires by itself if the backend is down). Never raises."""
        await self._change(self.presence.leave, member)

    async def _change(self, change: Callable[[Member], Awaitable[bool]], member: Member) -> None:
        try:
            changed = await change(member)
        except ChannelPresenceUnavailable as exc:
            log.debug("presence change left to the heartbeat or expiry: %s", exc)
            return
        if changed:
            await self._announce(member.channel)

    async def _announce(self, channel: str) -> None:
        self._dirty.add(channel)
        with contextlib.suppress(Exception):  # the others recount within RECOUNT_INTERVAL
            await self.broker.publish(channel, pack_presence_change())

    def changed(self, channel: str) -> None:
        """Another node said the channel's counts changed (the hub's control frame)."""
        if channel in self.watchers:
            self._dirty.add(channel)

    async def watch(self, conn: Watcher, channel: str) -> None:
        """Push ``channel``'s counts to ``conn`` now and whenever they change."""
        self.watchers.setdefault(channel, set()).add(conn)
        try:
            counts = await self.presence.counts(channel)
        except ChannelPresenceUnavailable:
            self._dirty.add(channel)
            return
        self._last[channel] = counts
        self._push((conn,), channel, counts)

    def unwatch(self, conn: Watcher, channel: str) -> None:
        watchers = self.watchers.get(channel)
        if watchers is not None:
            watchers.discard(conn)
            if not watchers:
                del self.watchers[channel]
                self._last.pop(channel, None)
                self._dirty.discard(channel)

    @staticmethod
    def _push(targets: tuple[Watcher, ...], channel: str, counts: Counts) -> None:
        now = int(time.time() * 1000)
        write_to_all(targets, presence_message(channel, counts.users, counts.connections, now))

    async def _recount(self, channels: set[str]) -> None:
        for channel in channels:
            watchers = self.watchers.get(channel)
            if not watchers:
                continue
            try:
                counts = await self.presence.counts(channel)
            except ChannelPresenceUnavailable:
                self._dirty.add(channel)
                continue
            if counts != self._last.get(channel) and channel in self.watchers:
                self._last[channel] = counts
                self._push(tuple(self.watchers[channel]), channel, counts)

    async def _run(self) -> None:
        ticks = 0
        refresh_every = max(1, round(PRESENCE_REFRESH / PUSH_INTERVAL))
        recount_every = max(1, round(RECOUNT_INTERVAL / PUSH_INTERVAL))
        while True:
            await asyncio.sleep(PUSH_INTERVAL)
            ticks += 1
            dirty, self._dirty = self._dirty, set()
            if ticks % recount_every == 0:
                dirty |= set(self.watchers)
            await self._recount(dirty)
            members = self.members() if ticks % refresh_every == 0 else []
            if members:
                try:
                    await self.presence.refresh(members)
                except ChannelPresenceUnavailable as exc:
                    log.warning("presence refresh failed: %s", exc)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="presence board")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
