"""Channel presence (section 10): who holds a channel, counted across nodes.

A connection that subscribes joins the channel's presence; it leaves when it
unsubscribes or closes. Each node refreshes its members every
``PRESENCE_REFRESH`` seconds; a member not refreshed for ``PRESENCE_TTL``
seconds (a dead node's) no longer counts, and is removed with the same
bookkeeping as a leave, so counts never drift. ``MemoryChannelPresence`` is the
embedded default; ``RedisChannelPresence`` (redis_channel_presence.py) is
shared by every node.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from realtime.backend import BackendUnavailable

#: Seconds a member counts without a refresh (a dead node's stop counting within this).
PRESENCE_TTL: Final = 20.0
#: Seconds between a node's refreshes of its members.
PRESENCE_REFRESH: Final = 6.0
#: ``user_ids`` returned at most by ``GET /v1/presence/{channel}?members=1`` (422 beyond).
MAX_MEMBERS: Final = 10_000


class ChannelPresenceUnavailable(BackendUnavailable):
    """Presence cannot be read or written now."""


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in a channel."""

    channel: str
    user: str
    session: str
    #: kept on ``user:`` channels only: what ``sessions`` lists (tier, client, connected_at)
    info: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Counts:
    users: int
    connections: int


class ChannelPresence(Protocol):
    """Members of every channel, shared by the nodes that share it.

    Contract (tests/test_channel_presence.py, against every implementation):

    - ``join(member)`` adds (or re-arms) the member; ``leave(member)`` removes it. Both
      return whether the channel's counts changed.
    - ``refresh(members)``: a node's heartbeat for its live members (re-adding any
      that expired); a member neither joined nor refreshed for the TTL no longer counts.
    - ``counts(channel)``: distinct users and connections of the live members.
    - ``sessions(channel)``: the ``info`` of the live members that have one.
    - ``members(channel, limit)``: the distinct live users, or None when there are more
      than ``limit``.
    - Raises ``ChannelPresenceUnavailable`` when the backend cannot answer; ``close()``.
    """

    async def join(self, member: Member) -> bool: ...

    async def leave(self, member: Member) -> bool: ...

    async def refresh(self, members: list[Member]) -> None: ...

    async def counts(self, channel: str) -> Counts: ...

    async def sessions(self, channel: str) -> list[dict[str, Any]]: ...

    async def members(self, channel: str, limit: int) -> list[str] | None: ...

    async def close(self) -> None: ...


class MemoryChannelPresence:
    """In-process presence (one node). Bounded by the live members: expired ones are
    dropped whenever their channel is read or written, and by ``refresh``."""

    def __init__(
        self, *, ttl: float = PRESENCE_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        #: channel -> session -> (user, expires at, info)
        self._channels: dict[str, dict[str, tuple[str, float, dict[str, Any] | None]]] = {}

    def _live(self, channel: str) -> dict[str, tuple[str, float, dict[str, Any] | None]]:
        members = self._channels.get(channel)
        if members is None:
            return {}
        now = self._clock()
        expired = [s for s, (_, expires, _) in members.items() if expires <= now]
        for session in expired:
            del members[session]
        if not members:
            del self._channels[channel]
            return {}
        return members

    def _counts(self, channel: str) -> Counts:
        members = self._live(channel)
        return Counts(len({user for user, _, _ in members.values()}), len(members))

    async def join(self, member: Member) -> bool:
        before = self._counts(member.channel)
        members = self._channels.setdefault(member.channel, {})
        members[member.session] = (member.user, self._clock() + self.ttl, member.info)
        return self._counts(member.channel) != before

    async def leave(self, member: Member) -> bool:
        before = self._counts(member.channel)
        self._live(member.channel).pop(member.session, None)
        return self._counts(member.channel) != before

    async def refresh(self, members: list[Member]) -> None:
        expires = self._clock() + self.ttl
        for member in members:
            entries = self._channels.setdefault(member.channel, {})
            entries[member.session] = (member.user, expires, member.info)
        for channel in list(self._channels):
            self._live(channel)

    async def counts(self, channel: str) -> Counts:
        return self._counts(channel)

    async def sessions(self, channel: str) -> list[dict[str, Any]]:
        return [info for _, _, info in self._live(channel).values() if info is not None]

    async def members(self, channel: str, limit: int) -> list[str] | None:
        users = sorted({user for user, _, _ in self._live(channel).values()})
        return None if len(users) > limit else users

    async def close(self) -> None:
        self._channels.clear()
