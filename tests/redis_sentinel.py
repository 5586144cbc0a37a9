"""Pytest plugin: a real Redis Sentinel set (a master, a replica, three sentinels).

Every part is a ``redis-server`` process on free 127.0.0.1 ports, started here:

- ``sentinel_set`` (session): shared by the contract suites; never failed over.
- ``sentinel_target`` (function): a ``RedisTarget`` of the shared set, DB 0 flushed.
- ``SentinelSet.start()``: a set of one's own, for a test that kills its master.

Sentinels are tuned for tests: a master is down after 1 s without answers, and a
failover may retry after 5 s.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from realtime.redis_client import RedisTarget
from tests.redis_server import RedisServer, _free_port, find_redis_server

__all__ = ["SentinelSet", "running_set", "sentinel_set", "sentinel_target"]

MASTER_NAME = "rt-master"
_READY_TIMEOUT = 30.0


class _Sentinel:
    """One ``redis-server --sentinel`` process with a config file of its own."""

    def __init__(
        self, binary: str, master_port: int, directory: Path, password: str | None
    ) -> None:
        self.port = _free_port()
        self.dir = directory / f"sentinel-{self.port}"
        self.dir.mkdir()
        config = self.dir / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            "bind 127.0.0.1\n"
            f"dir {self.dir}\n"
            f"logfile {self.dir / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
            f"sentinel failover-timeout {MASTER_NAME} 5000\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
            + (f"sentinel auth-pass {MASTER_NAME} {password}\n" if password else "")
        )
        self.proc = subprocess.Popen(
            [binary, str(config), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2.0, decode_responses=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


class SentinelSet:
    """A master, one replica and three sentinels; ``target`` / ``env`` point a node at it."""

    def __init__(self, binary: str, password: str | None = None) -> None:
        self.binary = binary
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="realtime-test-sentinel-"))
        self.servers: list[RedisServer] = []
        self.sentinels: list[_Sentinel] = []

    @classmethod
    def start(cls, password: str | None = None) -> SentinelSet:
        """Master, replica and sentinels; ``password``: the servers' ``requirepass``."""
        binary = find_redis_server()
        if binary is None:
            pytest.fail("redis-server not found: the Sentinel tests need it", pytrace=False)
        sset = cls(binary, password)
        try:
            master = RedisServer.start_own(binary, password=password)
            sset.servers.append(master)
            follow = ["--replicaof", "127.0.0.1", str(master.port)]
            replica = RedisServer.start_own(binary, follow, password=password)
            sset.servers.append(replica)
            sset.sentinels = [_Sentinel(binary, master.port, sset.dir, password) for _ in range(3)]
            sset.wait_ready()
        except BaseException:
            sset.stop()
            raise
        return sset

    @property
    def target(self) -> RedisTarget:
        return RedisTarget(
            sentinels=tuple(("127.0.0.1", s.port) for s in self.sentinels),
            master=MASTER_NAME,
            password=self.password,
        )

    def env(self) -> dict[str, str]:
        """The settings of a node on this set."""
        return {
            "REALTIME_REDIS_SENTINELS": ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels),
            "REALTIME_REDIS_SENTINEL_MASTER": MASTER_NAME,
        }

    def ask(self, command: str, *args: str) -> object:
        """A sentinel command, from the first sentinel that answers."""
        for sentinel in self.sentinels:
            client = sentinel.client()
            try:
                return client.execute_command(command, *args)  # type: ignore[no-untyped-call]
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            finally:
                client.close()
        raise AssertionError("no sentinel answers")

    def master_port(self) -> int:
        """The master's port, as the sentinels name it."""
        reply = self.ask("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
        assert isinstance(reply, list | tuple)
        return int(reply[1])

    def client(self, port: int, *, decode_responses: bool = False) -> redis.Redis:
        """A client of the Redis server on ``port`` (with the set's password)."""
        return redis.Redis(
            port=port,
            password=self.password,
            socket_timeout=5.0,
            decode_responses=decode_responses,
        )

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    def master(self) -> RedisServer:
        return self.server(self.master_port())

    def wait_ready(self) -> None:
        """Until every sentinel knows the replica and the two other sentinels."""
        deadline = time.monotonic() + _READY_TIMEOUT
        while True:
            if all(self._sentinel_ready(s) for s in self.sentinels) and self._replica_synced():
                return
            if time.monotonic() > deadline:
                raise AssertionError("the Sentinel set did not settle")
            time.sleep(0.1)

    def _sentinel_ready(self, sentinel: _Sentinel) -> bool:
        client = sentinel.client()
        try:
            state = client.sentinel_master(MASTER_NAME)
            assert isinstance(state, dict)
            return (
                int(state["num-other-sentinels"]) == 2
                and int(state["num-slaves"]) >= 1
                and "s_down" not in str(state.get("flags", ""))
            )
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            return False
        finally:
            client.close()

    def _replica_synced(self) -> bool:
        master = self.master()
        client = self.client(master.port, decode_responses=True)
        try:
            info = client.info("replication")
            return int(info.get("connected_slaves", 0)) >= 1 and "online" in str(info["slave0"])
        except (redis.ConnectionError, redis.TimeoutError, KeyError):
            return False
        finally:
            client.close()

    def kill_master(self) -> int:
        """SIGKILL the master; returns its port."""
        port = self.master_port()
        server = self.server(port)
        assert server._proc is not None
        server._proc.send_signal(signal.SIGKILL)
        server._proc.wait(timeout=10)
        return port

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """Until the sentinels name a master other than ``old_port`` that says it is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.master_port()
            except AssertionError:
                port = old_port
            if port != old_port:
                client = self.client(port)
                try:
                    if client.execute_command("ROLE")[0] == b"master":  # type: ignore[no-untyped-call]
                        return port
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                finally:
                    client.close()
            time.sleep(0.1)
        raise AssertionError(f"no failover from port {old_port} within {timeout} s")

    def flush(self) -> None:
        client = self.client(self.master_port())
        try:
            client.flushall()
        finally:
            client.close()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in self.servers:
            server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextmanager
def running_set(password: str | None = None) -> Iterator[SentinelSet]:
    """A Sentinel set for the block, stopped after it."""
    sset = SentinelSet.start(password)
    try:
        yield sset
    finally:
        sset.stop()


@pytest.fixture(scope="session")
def sentinel_set() -> Iterator[SentinelSet]:
    with running_set() as sset:
        yield sset


@pytest.fixture
def sentinel_target(sentinel_set: SentinelSet) -> RedisTarget:
    sentinel_set.flush()
    return sentinel_set.target


def redis_where(kind: str, request: pytest.FixtureRequest) -> str | RedisTarget:
    """Where a Redis part of a contract suite connects: ``sentinel`` (the shared set, flushed),
    ``cluster`` (the shared Redis Cluster, flushed) or any other Redis kind (a flushed DB of
    the session's Redis)."""
    if kind == "cluster":
        cluster: RedisTarget = request.getfixturevalue("cluster_target")
        return cluster
    if kind == "sentinel":
        target: RedisTarget = request.getfixturevalue("sentinel_target")
        return target
    url: str = request.getfixturevalue("redis_url")
    return url


def data_url(where: str | RedisTarget, request: pytest.FixtureRequest) -> str:
    """A URL of the Redis holding ``where``'s data (under Sentinel: the master, DB 0)."""
    if isinstance(where, str):
        return where
    sset: SentinelSet = request.getfixturevalue("sentinel_set")
    return f"redis://127.0.0.1:{sset.master_port()}/0"
