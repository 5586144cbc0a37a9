"""CPU time and memory of the server under test (and of this harness).

Two sources: ``/proc`` for given process ids (each with its descendants, so a
server with worker processes counts whole), or the server's ``/metrics``
endpoint (``process_cpu_seconds_total``, ``process_resident_memory_bytes``).
``find_listener`` finds the process listening on a local TCP port.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from loadtest.http import HttpConnection, HttpFailure

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
PROC: Final = Path("/proc")


@dataclass(frozen=True, slots=True)
class Usage:
    """Cumulative CPU seconds (user + system) and current resident bytes."""

    cpu_seconds: float
    rss_bytes: int


class Sampler(Protocol):
    """Reads the server's usage; None when it cannot (gone, unreadable, no metrics)."""

    source: str

    async def sample(self) -> Usage | None: ...


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after the last ')'
    return text[text.rfind(")") + 2 :].split()


def proc_usage(pid: int) -> Usage | None:
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # fields[0] is field 3 (state): utime is field 14, stime 15, rss 24
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return Usage(cpu, int(fields[21]) * PAGE_SIZE)


def descendants(roots: Iterable[int]) -> set[int]:
    """The roots and every process below them."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid not in out:
            out.add(pid)
            stack.extend(children.get(pid, ()))
    return out


class ProcSampler:
    """Usage of the given processes and their descendants, from /proc.

    CPU of a descendant that exited between samples is lost; the figure is a lower bound then.
    """

    source = "proc"

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids

    async def sample(self) -> Usage | None:
        usages = [u for u in map(proc_usage, sorted(descendants(self.pids))) if u is not None]
        if not usages:
            return None
        return Usage(sum(u.cpu_seconds for u in usages), sum(u.rss_bytes for u in usages))


_METRIC_LINE: Final = re.compile(
    r"^(process_cpu_seconds_total|process_resident_memory_bytes)(?:\{[^}]*\})?\s+(\S+)", re.M
)


def parse_process_metrics(text: str) -> Usage | None:
    """Sum of process_cpu_seconds_total and process_resident_memory_bytes series."""
    cpu = rss = 0.0
    found = set()
    for name, value in _METRIC_LINE.findall(text):
        found.add(name)
        if name == "process_cpu_seconds_total":
            cpu += float(value)
        else:
            rss += float(value)
    if "process_cpu_seconds_total" not in found:
        return None
    return Usage(cpu, int(rss))


class MetricsSampler:
    """Usage from the server's Prometheus endpoint (the process that answers it)."""

    source = "metrics"

    def __init__(self, host: str, port: int) -> None:
        self.conn = HttpConnection(host, port, timeout=5.0)

    async def sample(self) -> Usage | None:
        answer = await self.conn.request("GET", "/metrics")
        if isinstance(answer, HttpFailure) or answer.status != 200:
            return None
        return parse_process_metrics(answer.body.decode("utf-8", "replace"))

    async def close(self) -> None:
        await self.conn.close()


def find_listener(port: int) -> int | None:
    """The pid of a process with a socket listening on TCP ``port`` (IPv4 or IPv6)."""
    inodes: set[str] = set()
    for table in ("tcp", "tcp6"):
        try:
            lines = (PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{inode}]")
    if not inodes:
        return None
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    return int(entry.name)
        except OSError:
            continue
    return None


def own_rss_bytes() -> int:
    """This process's resident memory (0 where /proc is not readable)."""
    try:
        return int((PROC / "self" / "statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1_048_576)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def pin_cpus(cpus: list[int]) -> None:
    """Run this process on the given CPUs only (no-op for an empty list)."""
    if cpus:
        os.sched_setaffinity(0, cpus)


def ephemeral_ports() -> int:
    """How many local ports one source address can use for outgoing connections."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 28_000
    return high - low + 1
