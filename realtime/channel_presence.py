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
class SessionInfo:
    """What ``sessions`` lists of one of a user's connections."""

    session: str
    tier: str
    client: dict[str, Any] | None
    connected_at: int

    def as_map(self) -> dict[str, Any]:
        return {
            "session": self.session,
            "tier": self.tier,
            "client": self.client,
            "connected_at": self.connected_at,
        }


@dataclass(frozen=True, slots=True)
class Member:
    """One connection in a channel."""

    channel: str
    user: str
    session: str
    #: kept on ``user:`` channels only: what ``sessions`` lists
    info: SessionInfo | None = None


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


class _Held:
    """One member in the memory presence."""

    __slots__ = ("expires", "info", "session", "user")

    def __init__(self, member: Member, expires: float) -> None:
        self.session = member.session
        self.user = member.user
        self.info = member.info
        self.expires = expires


class MemoryChannelPresence:
    """In-process presence (one node). Bounded by the live members: expired ones are
    dropped whenever their channel is read or written, and by ``refresh``. A channel
    with one member (every connection's user channel) holds it without a map."""

    def __init__(
        self, *, ttl: float = PRESENCE_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        #: channel -> its one member, or session -> member
        self._channels: dict[str, _Held | dict[str, _Held]] = {}

    def _live(self, channel: str) -> list[_Held]:
        held = self._channels.get(channel)
        if held is None:
            return []
        now = self._clock()
        if isinstance(held, _Held):
            if held.expires > now:
                return [held]
            del self._channels[channel]
            return []
        for session in [s for s, h in held.items() if h.expires <= now]:
            del held[session]
        if len(held) > 1:
            return list(held.values())
        if held:
            (self._channels[channel],) = held.values()  # back to one member, no map
            return list(held.values())
        del self._channels[channel]
        return []

    def _counts(self, channel: str) -> Counts:
        members = self._live(channel)
        return Counts(len({h.user for h in members}), len(members))

    def _put(self, member: Member, expires: float) -> None:
        channel = member.channel
        held = self._channels.get(channel)
        if held is None or (isinstance(held, _Held) and held.session == member.session):
            self._channels[channel] = _Held(member, expires)
        elif isinstance(held, _Held):
            self._channels[channel] = {held.session: held, member.session: _Held(member, expires)}
        else:
            held[member.session] = _Held(member, expires)

    async def join(self, member: Member) -> bool:
        before = self._counts(member.channel)
        self._put(member, self._clock() + self.ttl)
        return self._counts(member.channel) != before

    async def leave(self, member: Member) -> bool:
        before = self._counts(member.channel)
        held = self._channels.get(member.channel)
        if isinstance(held, _Held):
            if held.session == member.session:
                del self._channels[member.channel]
        elif held is not None:
            held.pop(member.session, None)
            self._live(member.channel)
        return self._counts(member.channel) != before

    async def refresh(self, members: list[Member]) -> None:
        expires = self._clock() + self.ttl
        for member in members:
            self._put(member, expires)
        for channel in list(self._channels):
            self._live(channel)

    async def counts(self, channel: str) -> Counts:
        return self._counts(channel)

    async def sessions(self, channel: str) -> list[dict[str, Any]]:
        return [h.info.as_map() for h in self._live(channel) if h.info is not None]

    async def members(self, channel: str, limit: int) -> list[str] | None:
        users = sorted({h.user for h in self._live(channel)})
        return None if len(users) > limit else users

    async def close(self) -> None:
        self._channels.clear()
