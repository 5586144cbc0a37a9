"""Pytest plugin: a real Redis Cluster (three masters, one replica each).

Every node is a ``redis-server --cluster-enabled yes`` process on a free 127.0.0.1
port whose cluster bus port (port + 10000) is free too; the cluster is made by
``redis-cli --cluster create`` and is ready when every node says ``cluster_state:ok``.

- ``redis_cluster`` (session): shared by the contract suites; never failed over.
- ``cluster_target`` (function): a ``RedisTarget`` of the shared cluster, every master
  flushed.
- ``RedisCluster.start()`` / ``running_cluster()``: a cluster of one's own, for a test
  that kills a master; ``eventually`` retries a call until the parts have followed it.

Nodes are tuned for tests: a master is failed over after 2 s without answers
(``cluster-node-timeout 2000``); a replica may take over however stale it is.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from redis.crc import key_slot

from realtime.redis_client import RedisTarget
from tests.redis_server import RedisServer, find_redis_server

__all__ = ["ClusterSet", "cluster_target", "eventually", "redis_cluster", "running_cluster"]

T = TypeVar("T")

_READY_TIMEOUT = 60.0
_BUS_OFFSET = 10_000
NODE_TIMEOUT_MS = 2000


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is free too."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port + _BUS_OFFSET <= 65535 and _free(port + _BUS_OFFSET):
            return port
        # Ports above 55535 have no bus port: ask for one in the lower range.
        for candidate in range(20_000 + port % 20_000, 45_000, 7):
            if _free(candidate) and _free(candidate + _BUS_OFFSET):
                return candidate
    raise RuntimeError("no free port pair for a cluster node")


class _Node(RedisServer):
    """One cluster node (``kill``/``pause``/``resume``/``restart`` as ``RedisServer``)."""

    @classmethod
    def start_node(cls, binary: str, directory: Path) -> _Node:
        last_error = ""
        for _ in range(5):
            port = _cluster_port()
            extra = [
                "--cluster-enabled", "yes",
                "--cluster-config-file", str(directory / f"nodes-{port}.conf"),
                "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-reads-when-down", "no",
                "--databases", "1",
            ]  # fmt: skip
            node = cls(binary, port, f"redis://127.0.0.1:{port}/0", external=False, extra=extra)
            try:
                node._spawn()
                return node
            except RuntimeError as exc:
                last_error = str(exc)
                node.stop()
        pytest.fail(f"could not start a cluster node: {last_error}", pytrace=False)


class ClusterSet:
    """Three masters, each with a replica; ``target`` / ``env`` point a node at it."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.dir = Path(tempfile.mkdtemp(prefix="realtime-test-cluster-"))
        self.nodes: list[_Node] = []

    @classmethod
    def start(cls, masters: int = 3, replicas: int = 1) -> ClusterSet:
        binary = find_redis_server()
        cli = shutil.which("redis-cli") or str(Path(binary or "").with_name("redis-cli"))
        if binary is None or not Path(cli).exists():
            pytest.fail(
                "redis-server and redis-cli are needed for the Redis Cluster tests "
                "(Debian/Ubuntu: apt-get install redis-server)",
                pytrace=False,
            )
        cset = cls(binary)
        try:
            cset.nodes = [
                _Node.start_node(binary, cset.dir) for _ in range(masters * (1 + replicas))
            ]
            subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"127.0.0.1:{node.port}" for node in cset.nodes),
                    "--cluster-replicas",
                    str(replicas),
                    "--cluster-yes",
                ],
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=60,
            )
            cset.wait_ready(masters, replicas)
        except BaseException:
            cset.stop()
            raise
        return cset

    @property
    def seeds(self) -> tuple[tuple[str, int], ...]:
        return tuple(("127.0.0.1", node.port) for node in self.nodes)

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(cluster=self.seeds)

    def env(self) -> dict[str, str]:
        """The settings of a server node on this cluster."""
        return {"REALTIME_REDIS_CLUSTER_NODES": ",".join(f"{h}:{p}" for h, p in self.seeds)}

    def client(self, port: int, *, decode_responses: bool = False) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=5.0, decode_responses=decode_responses)

    def _ask(self, *command: str) -> object:
        for node in self.nodes:
            if not node.running:
                continue
            client = self.client(node.port, decode_responses=True)
            try:
                return client.execute_command(*command)  # type: ignore[no-untyped-call]
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            finally:
                client.close()
        raise AssertionError("no cluster node answers")

    def masters(self) -> dict[int, tuple[int, int]]:
        """Each master's port and the slot range ``[first, last]`` it serves (one each)."""
        slots = self._ask("CLUSTER", "SLOTS")
        assert isinstance(slots, list)
        return {int(entry[2][1]): (int(entry[0]), int(entry[1])) for entry in slots}

    def master_of(self, key: str | bytes) -> int:
        """The port of the master serving ``key``'s slot."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for port, (first, last) in self.masters().items():
            if first <= slot <= last:
                return port
        raise AssertionError(f"no master serves slot {slot}")

    def replica_of(self, port: int) -> int:
        """The port of a replica of the master at ``port``."""
        slots = self._ask("CLUSTER", "SLOTS")
        assert isinstance(slots, list)
        entry = next(entry for entry in slots if int(entry[2][1]) == port)
        return int(entry[3][1])

    def node(self, port: int) -> _Node:
        return next(node for node in self.nodes if node.port == port)

    def _state_ok(self, node: _Node) -> bool:
        client = self.client(node.port, decode_responses=True)
        try:
            info = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            return "cluster_state:ok" in str(info)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        finally:
            client.close()

    def wait_ready(
        self, masters: int = 3, replicas: int = 1, timeout: float = _READY_TIMEOUT
    ) -> None:
        """Until every running node says ``cluster_state:ok`` and every master has its replicas."""
        deadline = time.monotonic() + timeout
        while True:
            up = [node for node in self.nodes if node.running]
            if all(self._state_ok(node) for node in up) and self._replicated(masters, replicas):
                return
            if time.monotonic() > deadline:
                raise AssertionError("the Redis Cluster did not settle")
            time.sleep(0.1)

    def _replicated(self, masters: int, replicas: int) -> bool:
        try:
            slots = self._ask("CLUSTER", "SLOTS")
        except AssertionError:
            return False
        assert isinstance(slots, list)
        return len(slots) == masters and all(len(entry) - 3 >= replicas for entry in slots)

    def kill_master_of(self, key: str | bytes) -> int:
        """SIGKILL the master serving ``key``; returns its port."""
        port = self.master_of(key)
        self.node(port).kill()
        return port

    def wait_failover(self, old_port: int, key: str | bytes, timeout: float = 30.0) -> int:
        """Until a replica serves ``key``'s slot in place of ``old_port``; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_of(key)
            except AssertionError:
                port = old_port
            if port != old_port and all(
                self._state_ok(node) for node in self.nodes if node.running
            ):
                return port
            time.sleep(0.1)
        raise AssertionError(f"no failover from port {old_port} within {timeout} s")

    def flush(self) -> None:
        for port in self.masters():
            client = self.client(port)
            try:
                client.flushall()
                client.script_flush()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def eventually(call: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """``call()``'s result once it stops raising (the parts reconnect on their own)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextmanager
def running_cluster(masters: int = 3, replicas: int = 1) -> Iterator[ClusterSet]:
    """A cluster for the block, stopped after it."""
    cset = ClusterSet.start(masters, replicas)
    try:
        yield cset
    finally:
        cset.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[ClusterSet]:
    with running_cluster() as cset:
        yield cset


@pytest.fixture
def cluster_target(redis_cluster: ClusterSet) -> RedisTarget:
    redis_cluster.flush()
    return redis_cluster.target
