"""The Redis client of the stores: where Redis is, client factory, error mapping, backoff.

``RedisTarget`` says where Redis is: one URL, a master found through Redis
Sentinel, or a Redis Cluster (seed nodes). ``make_client`` is the redis-py command
client of the presence registry, the rate limiter and channel presence;
``redis_client`` builds one with the caller's pool and options (the notification
store's). Under Sentinel, every new connection asks the sentinels for the master and
checks it is one; a connection to a demoted master (READONLY) or a dead one is
dropped, so the next command reaches the new master without a restart. On a cluster
the client is redis-py's ``RedisCluster``: each command goes to the master of its
keys' slot (keys of one script share a hash tag), following MOVED and ASK and
re-reading the slot map after a failover; ``eval_per_slot`` runs one script for many
keys of different slots (one call per slot, one round trip per master).
``redis_errors`` turns a Redis, cluster or socket error into the caller's
``BackendUnavailable`` subclass; ``backoff_delay`` paces
reconnects (``RedisBroker``'s); ``lua_script`` reads a script of realtime/lua/.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, cast

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from realtime.backend import BackendUnavailable

__all__ = [
    "RedisTarget",
    "backoff_delay",
    "eval_per_slot",
    "is_cluster_client",
    "lua_script",
    "make_client",
    "make_sentinel",
    "redis_client",
    "redis_errors",
]

_BACKOFF_BASE: Final = 0.05
#: Seconds to wait for one sentinel's answer before asking the next.
SENTINEL_TIMEOUT: Final = 1.0


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: ``url`` (one server), ``sentinels`` watching the master ``master``,
    or ``cluster``: seed nodes of a Redis Cluster (any reachable one tells the others).

    ``password`` is the Redis servers' (``AUTH``; a password in ``url`` is used for a URL);
    sentinels are asked without one.
    """

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    password: str | None = None
    cluster: tuple[tuple[str, int], ...] = ()

    @property
    def sentinel(self) -> bool:
        return bool(self.sentinels)

    @property
    def is_cluster(self) -> bool:
        return bool(self.cluster)

    def describe(self) -> str:
        """For logs: never the password."""
        if self.is_cluster:
            hosts = ",".join(f"{host}:{port}" for host, port in self.cluster)
            return f"redis cluster via {hosts}"
        if self.sentinel:
            hosts = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel master {self.master!r} via {hosts}"
        return "redis"


def as_target(where: str | RedisTarget) -> RedisTarget:
    return where if isinstance(where, RedisTarget) else RedisTarget(url=where)


def make_sentinel(target: RedisTarget) -> Sentinel:
    """A redis-py Sentinel manager for ``target`` (close it with ``aclose``)."""
    return Sentinel(
        list(target.sentinels),
        sentinel_kwargs={
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
        },
    )


class _BlockingSentinelPool(SentinelConnectionPool, aredis.BlockingConnectionPool):
    """A Sentinel-managed pool whose callers wait for a free connection (bounded)."""


class _SentinelRedis(aredis.Redis):
    """A client that also closes its Sentinel manager."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            await self.sentinel_manager.aclose()


def redis_client(where: str | RedisTarget, *, blocking: bool, **options: Any) -> aredis.Redis:
    """A client of the master at ``where`` with redis-py connection ``options``.

    ``blocking``: a caller beyond ``max_connections`` waits up to ``timeout`` for a connection.
    """
    target = as_target(where)
    if target.is_cluster:
        return cast(aredis.Redis, _cluster_client(target, blocking=blocking, **options))
    if target.url is not None:
        pool_class = aredis.BlockingConnectionPool if blocking else aredis.ConnectionPool
        if target.password is not None:
            options["password"] = target.password  # a password in the URL wins
        return aredis.Redis.from_pool(pool_class.from_url(target.url, **options))
    sentinel = make_sentinel(target)
    if not blocking:
        options.pop("timeout", None)
    sentinel_pool = _BlockingSentinelPool if blocking else SentinelConnectionPool
    master = target.master
    pool = sentinel_pool(master, sentinel, password=target.password, **options)  # type: ignore[no-untyped-call]
    client = _SentinelRedis(connection_pool=pool)
    client.auto_close_connection_pool = True  # as from_pool does: the client owns its pool
    client.sentinel_manager = sentinel
    return client


def _cluster_client(target: RedisTarget, *, blocking: bool, **options: Any) -> RedisCluster:
    """A ``RedisCluster`` of ``target.cluster`` with per-node pools of ``options``.

    MOVED and ASK are followed by redis-py; a connection error re-reads the slot map
    (a failover) on the next command. ``blocking`` pools are not offered per node by
    redis-py: a caller beyond ``max_connections`` of a node gets an error at once.
    """
    options.pop("timeout", None)
    options.pop("retry", None)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in target.cluster],
        password=target.password,
        require_full_coverage=False,
        # No command is retried (see make_client); a lost master costs one error and
        # the slot map is re-read before the next command.
        retry=Retry(NoBackoff(), 0),
        **options,
    )


def make_client(
    where: str | RedisTarget, *, timeout: float = 5.0, max_connections: int = 32
) -> aredis.Redis:
    """A command client for ``where``: bytes replies, no retries, bounded pool.

    No command is retried (a retried PUBLISH / SET NX / rate-limit hit could
    apply twice). At most ``max_connections`` commands are in flight; a caller
    beyond that waits up to ``timeout`` s for a connection, then gets a
    ``ConnectionError`` (mapped to the store's error by ``redis_errors``).
    """
    return redis_client(
        where,
        blocking=True,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=min(timeout, 2.0),
        retry=Retry(NoBackoff(), 0),
        decode_responses=False,
        protocol=2,
    )


def is_cluster_client(client: object) -> bool:
    """Whether ``client`` (as ``redis_client`` made it) is a Redis Cluster client."""
    return isinstance(client, RedisCluster)


#: One script call: its keys (all in one slot) and its ARGV.
ScriptCall = tuple[Sequence[str], Sequence[Any]]


async def eval_per_slot(
    client: aredis.Redis, script: AsyncScript, calls: Sequence[ScriptCall]
) -> list[Any]:
    """``script``'s reply to each of ``calls`` (each with at least one key) on a cluster
    client, in order; a call that failed has its exception in its place.

    The calls go in one ``ClusterPipeline`` per master holding their slots, all at once:
    one round trip per master, and a master that is down fails its calls alone. A master
    that lacks the script (a replica just promoted: the script cache is not replicated)
    answers NOSCRIPT without running it; the script is then loaded on every master and
    those calls alone are sent again.
    """
    cluster = cast(RedisCluster, client)
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for attempt in range(2):
        await cluster.initialize()  # the slot map: read once, then again when due
        by_node: dict[str, list[int]] = {}
        for i in todo:
            try:
                node = cluster.get_node_from_key(calls[i][0][0])
            except RedisClusterException as exc:  # the slot is served by no master
                replies[i] = exc
                continue
            by_node.setdefault("" if node is None else node.name, []).append(i)
        groups = list(by_node.values())
        sent = [_pipelined(cluster, script, [calls[i] for i in group]) for group in groups]
        results = await asyncio.gather(*sent, return_exceptions=True)
        for group, result in zip(groups, results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result
            for j, i in enumerate(group):
                replies[i] = result if isinstance(result, Exception) else result[j]
        todo = [i for i in todo if isinstance(replies[i], NoScriptError)]
        if not todo or attempt:
            break
        try:
            await cluster.script_load(script.script)
        except (RedisError, RedisClusterException):
            break  # a master is down: its calls keep their NOSCRIPT
    return replies


async def _pipelined(
    cluster: RedisCluster, script: AsyncScript, calls: Sequence[ScriptCall]
) -> list[Any]:
    async with cluster.pipeline(transaction=False) as pipe:
        for keys, args in calls:
            # Queues it: AsyncScript takes a ClusterPipeline, its annotation omits it.
            await script(keys=keys, args=args, client=pipe)  # type: ignore[arg-type]
        results: list[Any] = await pipe.execute(raise_on_error=False)
    return results


@contextmanager
def redis_errors(what: str, error_class: type[BackendUnavailable]) -> Iterator[None]:
    """Re-raise a Redis or socket error in the block as ``error_class``."""
    try:
        yield
    except (RedisError, RedisClusterException, OSError) as exc:
        raise error_class(f"redis {what} failed: {exc}") from exc


def backoff_delay(attempt: int, *, cap: float, base: float = _BACKOFF_BASE,
                  rand: Callable[[], float] = random.random) -> float:  # fmt: skip
    """Delay before reconnect attempt ``attempt`` (0-based): exponential, capped, jittered.

    ``d = min(cap, base * 2**attempt)``; the delay is uniform in ``[d/2, d]``, so
    nodes that lost Redis together do not reconnect in lock-step.
    """
    ceiling = min(cap, base * 2.0 ** min(attempt, 32))
    return ceiling / 2 + rand() * ceiling / 2


def lua_script(name: str) -> str:
    """The text of the Lua script ``realtime/lua/<name>`` (shipped as package data)."""
    return (resources.files("realtime") / "lua" / name).read_text(encoding="utf-8")
