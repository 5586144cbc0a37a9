"""``RedisChannelPresence``: channel presence (channel_presence.py) shared by every node.

Per channel ``<ch>`` (hash tag ``{<ch>}``, so each script stays in one slot):
``rt:p:{<ch>}:c`` a ZSET of members ``<user>\\x1f<session>`` scored by expiry (Redis's
clock), ``rt:p:{<ch>}:u`` a HASH of user -> live members, ``rt:p:{<ch>}:s`` a HASH of
session -> info (user channels). Every read and join first removes expired members
with the leave's bookkeeping (lua/channel_presence_*.lua), so counts never drift.
``refresh`` sends one join per channel in one pipeline (on a cluster: one round trip
per master holding the channels).
"""

from __future__ import annotations

import json
from typing import Any

from realtime.channel_presence import (
    PRESENCE_TTL,
    ChannelPresenceUnavailable,
    Counts,
    Member,
)
from realtime.redis_client import (
    RedisTarget,
    ScriptCall,
    eval_per_slot,
    is_cluster_client,
    lua_script,
    make_client,
    redis_errors,
)

# Join and read start by removing expired members (one prune, written once).
_PRUNE = lua_script("channel_presence_prune.lua")
_JOIN = _PRUNE + lua_script("channel_presence_join.lua")
_LEAVE = lua_script("channel_presence_leave.lua")
_READ = _PRUNE + lua_script("channel_presence_read.lua")


def _keys(channel: str) -> list[str]:
    base = f"rt:p:{{{channel}}}"
    return [f"{base}:c", f"{base}:u", f"{base}:s"]


def _info(member: Member) -> str:
    if member.info is None:
        return ""
    return json.dumps(member.info.as_map(), separators=(",", ":"))


class RedisChannelPresence:
    """The ChannelPresence seam over Redis; see the module docstring."""

    def __init__(
        self, url: str | RedisTarget, *, ttl: float = PRESENCE_TTL, timeout: float = 5.0
    ) -> None:
        self.ttl = ttl
        self._ttl_ms = max(1, round(ttl * 1000))
        self._client = make_client(url, timeout=timeout)
        self._cluster = is_cluster_client(self._client)
        self._join = self._client.register_script(_JOIN)
        self._leave = self._client.register_script(_LEAVE)
        self._read = self._client.register_script(_READ)

    async def join(self, member: Member) -> bool:
        with redis_errors("presence join", ChannelPresenceUnavailable):
            args: list[str | int] = [self._ttl_ms, member.user, member.session, _info(member)]
            return bool(await self._join(keys=_keys(member.channel), args=args))

    async def leave(self, member: Member) -> bool:
        with redis_errors("presence leave", ChannelPresenceUnavailable):
            args = [member.user, member.session]
            return bool(await self._leave(keys=_keys(member.channel), args=args))

    async def refresh(self, members: list[Member]) -> None:
        by_channel: dict[str, list[Member]] = {}
        for member in members:
            by_channel.setdefault(member.channel, []).append(member)
        calls: list[ScriptCall] = []
        for channel, group in by_channel.items():
            args: list[str | int] = [self._ttl_ms]
            for member in group:
                args += [member.user, member.session, _info(member)]
            calls.append((_keys(channel), args))
        with redis_errors("presence refresh", ChannelPresenceUnavailable):
            if self._cluster:
                replies = await eval_per_slot(self._client, self._join, calls)
                failed = next((r for r in replies if isinstance(r, Exception)), None)
                if failed is not None:
                    raise failed
                return
            async with self._client.pipeline(transaction=False) as pipe:
                for keys, call_args in calls:
                    await self._join(keys=keys, args=call_args, client=pipe)
                await pipe.execute()

    async def _read_as(self, channel: str, what: str) -> Any:
        with redis_errors("presence read", ChannelPresenceUnavailable):
            return await self._read(keys=_keys(channel), args=[what])

    async def counts(self, channel: str) -> Counts:
        users, connections = await self._read_as(channel, "counts")
        return Counts(int(users), int(connections))

    async def sessions(self, channel: str) -> list[dict[str, Any]]:
        out = []
        for raw in await self._read_as(channel, "sessions"):
            value = json.loads(raw)
            if isinstance(value, dict):
                out.append(value)
        return out

    async def members(self, channel: str, limit: int) -> list[str] | None:
        users = sorted(u.decode() if isinstance(u, bytes) else str(u)
                       for u in await self._read_as(channel, "members"))  # fmt: skip
        return None if len(users) > limit else users

    async def close(self) -> None:
        await self._client.aclose()
