"""A Redis Cluster for the benchmark: ``masters`` redis-server processes, no replicas.

Each node is ``redis-server --cluster-enabled yes`` on a 127.0.0.1 port whose cluster bus
port (port + 10000) is free too, pinned with ``taskset`` when a CPU is given, keeping
nothing on disk (no RDB, no AOF) but its nodes file in a temporary folder. The slots are
spread evenly by ``redis-cli --cluster create``; ``start_cluster`` returns once every node
says ``cluster_state:ok``. ``stop`` ends each process by its pid (``Servers.stop``) and
removes the folder.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.run import Servers

HOST = "127.0.0.1"
BUS_OFFSET = 10_000
READY_TIMEOUT = 30.0


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def node_port(taken: set[int]) -> int:
    """A free port below 55536 whose bus port is free, not in ``taken``."""
    for candidate in range(30_000 + time.monotonic_ns() % 20_000, 55_536, 13):
        if candidate not in taken and _bindable(candidate) and _bindable(candidate + BUS_OFFSET):
            return candidate
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


def redis_cli(port: int, *args: str, timeout: float = 30.0) -> str:
    """``redis-cli -p port args``'s output (raises when it fails)."""
    done = subprocess.run(
        ["redis-cli", "-h", HOST, "-p", str(port), *args],
        check=True,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    return done.stdout


@dataclass
class BenchCluster:
    """The nodes of one cluster (all masters)."""

    folder: Path
    nodes: Servers = field(default_factory=Servers)
    ports: list[int] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return self.nodes.pids

    @property
    def nodes_setting(self) -> str:
        """``REALTIME_REDIS_CLUSTER_NODES`` (``--redis-cluster-nodes``) for this cluster."""
        return ",".join(f"{HOST}:{port}" for port in self.ports)

    def stop(self) -> None:
        self.nodes.stop()
        shutil.rmtree(self.folder, ignore_errors=True)


def _ok(port: int) -> bool:
    try:
        return "cluster_state:ok" in redis_cli(port, "CLUSTER", "INFO", timeout=5)
    except (subprocess.SubprocessError, OSError):
        return False


def start_cluster(masters: int = 3, cpu: str | None = None) -> BenchCluster:
    """A running cluster of ``masters`` nodes (pinned to ``cpu`` if given)."""
    cluster = BenchCluster(Path(tempfile.mkdtemp(prefix="piggybong-bench-cluster-")))
    try:
        for _ in range(masters):
            port = node_port(set(cluster.ports))
            cmd = [
                "redis-server",
                "--port", str(port),
                "--bind", HOST,
                "--dir", str(cluster.folder),
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--save", "",
                "--appendonly", "no",
                "--maxclients", "10000",
                "--loglevel", "warning",
            ]  # fmt: skip
            if cpu is not None:
                cmd = ["taskset", "-c", cpu, *cmd]
            cluster.nodes.procs.append(
                subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
            cluster.ports.append(port)
        deadline = time.monotonic() + READY_TIMEOUT
        for port, proc in zip(cluster.ports, cluster.nodes.procs, strict=True):
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"redis-server on {port} exited with {proc.returncode}")
                try:
                    if redis_cli(port, "PING", timeout=5).strip() == "PONG":
                        break
                except subprocess.SubprocessError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server on {port} does not answer")
                time.sleep(0.1)
        subprocess.run(
            [
                "redis-cli", "--cluster", "create",
                *(f"{HOST}:{port}" for port in cluster.ports),
                "--cluster-replicas", "0", "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )  # fmt: skip
        while not all(_ok(port) for port in cluster.ports):
            if time.monotonic() > deadline:
                raise RuntimeError("the bench's Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.2)
    except BaseException:
        cluster.stop()
        raise
    return cluster
