"""One fan-out step of one target, with the server's user and system CPU per delivery.

``python -m bench.cpusplit memory [--subscribers 1000] [--rate 50] [--seconds 10]
[--rounds 3]`` starts the target as ``bench.run`` does (pinned to CPU 0, this process on
CPU 1), connects the subscribers, and runs ``bench.run.step`` once per round, printing
deliveries per server CPU-second, the server's user and system time per delivery
(``/proc/<pid>/stat``: tick-sampled, so only means over rounds mean much), write calls per
delivery and p99. ``--perf "perf record -o F"`` runs that command on the server for the
step (``-p PID`` is added). Targets: those of ``bench.run`` (``memory``, ``redis``,
``socketify``, ``picows``, ...); ``REALTIME_NATIVE=off`` in the environment runs this
server's per-delivery path interpreted.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import signal
import subprocess
from collections.abc import Sequence

import uvloop

from bench import run


def _user_system(pid: int) -> tuple[float, float]:
    """utime and stime of ``pid`` in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = 100.0  # USER_HZ
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def _start_tool(command: str, pid: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*shlex.split(command), "-p", str(pid)])


async def measure(
    name: str, *, subscribers: int, rate: float, seconds: float, rounds: int, perf: str | None
) -> None:
    run.pin_self(1)
    run.LOGS.mkdir(exist_ok=True)
    async with run.target(name, print) as (servers, extra):
        fleets = await run.connect([run.plan(servers.port, subscribers, "artist:bench")])
        await asyncio.sleep(1.0)
        pid = servers.pids[0]
        for _ in range(rounds):
            user0, system0 = _user_system(pid)
            tool = None
            if perf:
                tool = _start_tool(perf, pid)
            out = await run.step(fleets, servers, rate, seconds, extra_pids=extra)
            if tool is not None:
                tool.send_signal(signal.SIGINT)
                tool.wait()
            user1, system1 = _user_system(pid)
            done = max(1, out["delivered"])
            print(
                f"{name} S={subscribers} R={rate:g}: {out['deliveries_per_cpu_s']:,} deliveries "
                f"per CPU-s; user {(user1 - user0) / done * 1e6:.2f} µs, system "
                f"{(system1 - system0) / done * 1e6:.2f} µs per delivery; "
                f"{out['writes_per_delivery']} writes per delivery; "
                f"p99 {out['latency_ms']['p99']} ms; delivered {out['delivered_ratio']:.2%}",
                flush=True,
            )
        await run.close_all(fleets)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cpusplit", description=__doc__)
    parser.add_argument("target")
    parser.add_argument("--subscribers", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--perf", help='a command run on the server for each step, e.g. "perf stat"'
    )
    args = parser.parse_args(argv)
    uvloop.run(
        measure(
            args.target,
            subscribers=args.subscribers,
            rate=args.rate,
            seconds=args.seconds,
            rounds=args.rounds,
            perf=args.perf,
        )
    )


if __name__ == "__main__":
    main()
