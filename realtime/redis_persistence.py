"""Persistence told, not assumed: what a crash of this node's Redis would lose.

Queued notifications and registered devices live only in Redis. ``assess`` (sans-I/O)
turns Redis's persistence settings into a ``Persistence``: durable only with
``appendonly yes`` and ``appendfsync always``; anything else carries a warning
saying what a crash loses. ``PersistenceCheck`` asks Redis (``CONFIG GET``; where
CONFIG is renamed away or forbidden, ``INFO persistence``, which tells AOF on or off
only), logs a WARNING once per new finding, and serves the finding to ``/readyz``
as information: it never makes the node unready. On a Redis Cluster every master is
asked and the finding is the least durable master's (``node`` names it): a crash of
any master loses what its slots hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError, ResponseError

from realtime.redis_client import RedisTarget, make_client

__all__ = ["Persistence", "PersistenceCheck", "assess"]

log = logging.getLogger("realtime.redis")

#: Seconds a finding is served before /readyz asks Redis again (a failover may change it).
REFRESH_INTERVAL: Final = 60.0
#: Seconds /readyz waits for Redis's answer (under /readyz's own 0.8 s bound, so a slow
#: answer is an unknown finding, never a failed check).
READY_WAIT: Final = 0.5
_LOSES: Final = "queued notifications and registered devices"


@dataclass(frozen=True)
class Persistence:
    """Redis's persistence as far as it could be told; None fields are unknown."""

    source: Literal["config", "info", "unreachable"]
    aof: bool | None = None
    appendfsync: str | None = None
    save: str | None = None  # RDB snapshot rules ("" none)
    node: str | None = None  # on a cluster: the master ("host:port") this is about

    @property
    def durable(self) -> bool:
        """A crash of Redis loses nothing it acknowledged."""
        return self.aof is True and self.appendfsync == "always"

    @property
    def warning(self) -> str | None:
        """What a crash of Redis loses, in words; None when nothing."""
        warning = self._loss()
        if warning is None or self.node is None:
            return warning
        return f"{warning} (Redis Cluster master {self.node})"

    @property
    def severity(self) -> int:
        """How much a crash may lose, to compare masters: 0 nothing, up to 6 unknown."""
        if self.source == "unreachable":
            return 6
        if self.durable:
            return 0
        if self.aof is True:
            return 1 if self.appendfsync == "everysec" else 2
        return 3 if self.save else 4 if self.save is None else 5

    def _loss(self) -> str | None:
        if self.source == "unreachable":
            return f"Redis persistence unknown (unreachable): a crash may lose {_LOSES}"
        if self.durable:
            return None
        if self.aof is True and self.appendfsync == "everysec":
            return f"Redis appendfsync everysec: a crash loses up to 1 s of {_LOSES}"
        if self.aof is True:
            return (
                f"Redis appendfsync {self.appendfsync or 'unknown'}: a crash loses {_LOSES} "
                "not yet written to disk"
            )
        if self.save:
            return (
                f"Redis has no AOF, RDB snapshots only (save {self.save}): a crash loses "
                f"{_LOSES} changed since the last snapshot"
            )
        if self.save is None:
            return f"Redis has no AOF (snapshot rules unknown): a crash may lose all {_LOSES}"
        return f"Redis keeps nothing across a crash (no AOF, no RDB): a crash loses all {_LOSES}"

    def as_dict(self) -> dict[str, Any]:
        """The /readyz field: ``ok`` is always true (information, not a failure)."""
        return {
            "ok": True,
            "durable": self.durable,
            "aof": self.aof,
            "appendfsync": self.appendfsync,
            "save": self.save,
            "source": self.source,
            "node": self.node,
            "warning": self.warning,
        }


def assess(config: Mapping[str, str] | None, info: Mapping[str, Any] | None) -> Persistence:
    """The persistence ``CONFIG GET`` (``config``) or else ``INFO persistence`` (``info``) shows."""
    if config is not None:
        return Persistence(
            "config",
            aof=config.get("appendonly") == "yes",
            appendfsync=config.get("appendfsync"),
            save=config.get("save"),
        )
    if info is not None:
        return Persistence("info", aof=str(info.get("aof_enabled")) == "1")
    return Persistence("unreachable")


class PersistenceCheck:
    """Asks the Redis at ``target`` (the master under Sentinel, every master of a cluster)
    how it persists."""

    def __init__(
        self,
        target: str | RedisTarget,
        *,
        refresh: float = REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._client = make_client(target, timeout=2.0, max_connections=2)
        self._refresh = refresh
        self._clock = clock
        self._found: Persistence | None = None
        self._found_at = 0.0
        self._warned: str | None = None

    async def check(self) -> Persistence:
        """Ask Redis now; log a WARNING when the finding's warning is new (once)."""
        found = await self._find()
        self._found, self._found_at = found, self._clock()
        warning = found.warning
        if warning != self._warned:
            self._warned = warning
            if warning is not None:
                log.warning("%s; see docs/operations.md, Redis persistence", warning)
            else:
                log.info("Redis persistence: AOF with appendfsync always")
        return found

    async def _find(self) -> Persistence:
        """The finding of the one Redis, or of the least durable master of a cluster."""
        if not isinstance(self._client, RedisCluster):
            return assess(*await self._ask())
        cluster = self._client
        try:
            await cluster.initialize()  # no-op once the slot map is known
        except (RedisError, RedisClusterException):
            return Persistence("unreachable")
        primaries = cluster.get_primaries()
        if not primaries:
            return Persistence("unreachable")
        found = await asyncio.gather(*(self._ask(node) for node in primaries))
        by_node = [
            dataclasses.replace(assess(*answer), node=node.name)
            for node, answer in zip(primaries, found, strict=True)
        ]
        return max(by_node, key=lambda p: p.severity)

    async def _ask(
        self, node: ClusterNode | None = None
    ) -> tuple[dict[str, str] | None, dict[str, Any] | None]:
        """CONFIG GET (else INFO persistence) of the one Redis or of the cluster's ``node``."""
        client = self._client
        target: dict[str, Any] = {} if node is None else {"target_nodes": node}
        try:
            try:
                raw = await client.config_get("appendonly", "appendfsync", "save", **target)
            except ResponseError:  # CONFIG renamed away or forbidden by an ACL
                return None, dict(await client.info("persistence", **target))
        except (RedisError, RedisClusterException):
            return None, None
        return {_text(k): _text(v) for k, v in raw.items()}, None

    async def readiness(self) -> dict[str, Any]:
        """The last finding, asked again when older than ``refresh`` or unknown.

        Always ``ok``: Redis not answering within ``READY_WAIT`` leaves the last finding
        (or "unreachable") in place; the next call asks again.
        """
        found = self._found
        if (
            found is None
            or found.source == "unreachable"
            or (self._clock() - self._found_at >= self._refresh)
        ):
            try:
                async with asyncio.timeout(READY_WAIT):
                    found = await self.check()
            except TimeoutError:
                found = self._found or Persistence("unreachable")
        return found.as_dict()

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
