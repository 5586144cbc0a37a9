"""The ChannelPresence contract (realtime/channel_presence.py), on memory and on Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from realtime.channel_presence import (
    ChannelPresence,
    ChannelPresenceUnavailable,
    Counts,
    Member,
    MemoryChannelPresence,
    SessionInfo,
)
from realtime.redis_channel_presence import RedisChannelPresence
from tests.redis_sentinel import redis_where
from tests.redis_server import RedisServer

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(params=["memory", "redis", "sentinel", "cluster"])
async def presence(request: pytest.FixtureRequest) -> AsyncIterator[ChannelPresence]:
    made: ChannelPresence = (
        MemoryChannelPresence(ttl=0.6)
        if request.param == "memory"
        else RedisChannelPresence(redis_where(request.param, request), ttl=0.6)
    )
    yield made
    await made.close()


def m(user: str, session: str, channel: str = "artist:x", app: str | None = None) -> Member:
    info = SessionInfo(session, "paid", {"app": app}, 1) if app is not None else None
    return Member(channel, user, session, info)


async def test_counts_users_and_connections(presence: ChannelPresence) -> None:
    assert await presence.counts("artist:x") == Counts(0, 0)
    assert await presence.join(m("u1", "s1")) is True
    assert await presence.join(m("u1", "s2")) is True  # a second device: connections change
    assert await presence.join(m("u2", "s3")) is True
    assert await presence.join(m("u2", "s3")) is False  # re-armed, nothing changed
    assert await presence.counts("artist:x") == Counts(2, 3)
    assert await presence.members("artist:x", 10) == ["u1", "u2"]
    assert await presence.members("artist:x", 1) is None  # over the limit
    assert await presence.leave(m("u1", "s1")) is True
    assert await presence.leave(m("u1", "s1")) is False
    assert await presence.counts("artist:x") == Counts(2, 2)
    assert await presence.leave(m("u1", "s2")) is True
    assert await presence.counts("artist:x") == Counts(1, 1)
    assert await presence.counts("artist:other") == Counts(0, 0)


async def test_sessions_are_listed_with_their_info(presence: ChannelPresence) -> None:
    await presence.join(m("42", "a", "user:42", app="ios"))
    await presence.join(m("42", "b", "user:42", app="ipad"))
    sessions = await presence.sessions("user:42")
    assert sorted((s["session"], s["client"]["app"]) for s in sessions) == [
        ("a", "ios"),
        ("b", "ipad"),
    ]
    assert {(s["tier"], s["connected_at"]) for s in sessions} == {("paid", 1)}


async def test_unrefreshed_members_expire_and_refreshed_ones_stay(
    presence: ChannelPresence,
) -> None:
    await presence.join(m("dead", "d1"))
    await presence.join(m("live", "l1"))
    for _ in range(4):
        await asyncio.sleep(0.25)
        await presence.refresh([m("live", "l1")])
    assert await presence.counts("artist:x") == Counts(1, 1)
    assert await presence.members("artist:x", 10) == ["live"]
    # An expired member re-joining counts again (its expiry was booked as a leave).
    assert await presence.join(m("dead", "d1")) is True
    assert await presence.counts("artist:x") == Counts(2, 2)


async def test_redis_down_is_presence_unavailable(redis_server: RedisServer) -> None:
    presence = RedisChannelPresence("redis://127.0.0.1:1/0", timeout=0.5)
    with pytest.raises(ChannelPresenceUnavailable):
        await presence.counts("artist:x")
    await presence.close()
