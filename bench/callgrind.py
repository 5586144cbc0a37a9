"""User-space instructions per delivery of this server, from callgrind: a figure the
machine's load does not move.

``python -m bench.callgrind [--small 100] [--large 300] [--messages 200]`` starts the
server under ``valgrind --tool=callgrind --instr-atstart=no`` twice (pings off), connects
``--small`` and then ``--large`` subscribers, switches instrumentation on
(``callgrind_control -i on``) only while ``--messages`` events are published at 20/s and
delivered, and prints the difference of the two totals over the difference of deliveries:
what one more delivery costs, the per-message work (HTTP, envelope, history) cancelled out.
The kernel is not counted. ``--keep DIR`` writes both outputs there
(``callgrind-S<subscribers>.out``, for ``callgrind_annotate``). ``REALTIME_NATIVE=off`` in
the environment measures the interpreted per-delivery path. Needs valgrind; takes 2-3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import uvloop

from bench import run
from bench.loadgen import publish

RATE = 20.0


def _total(out: Path) -> int:
    """PROGRAM TOTALS of a callgrind output file (``callgrind_annotate``)."""
    text = subprocess.run(
        ["callgrind_annotate", str(out)], capture_output=True, text=True, check=True
    ).stdout
    for line in text.splitlines():
        if "PROGRAM TOTALS" in line:
            return int(line.split()[0].replace(",", ""))
    raise RuntimeError(f"no totals in {out}")


def _start(port: int, out: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    """The server on ``port`` under callgrind, pinned to CPU 0, instrumentation off."""
    env = dict(os.environ, PYTHONPATH=str(run.ROOT), REALTIME_PING_INTERVAL="3600")
    cmd = ["taskset", "-c", "0", "valgrind", "--tool=callgrind", "--instr-atstart=no"]
    cmd += [f"--callgrind-out-file={out}", sys.executable, "-m", "realtime", "serve"]
    cmd += ["--port", str(port), "--log-level", "warning", *run.LOAD_DOOR]
    return subprocess.Popen(cmd, cwd=run.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)


def _instrument(pid: int, on: bool) -> None:
    subprocess.run(
        ["callgrind_control", "-i", "on" if on else "off", str(pid)],
        check=True,
        capture_output=True,
    )


async def instructions(subscribers: int, messages: int, folder: Path) -> tuple[int, int]:
    """Instructions counted while ``messages`` reach ``subscribers``, and the deliveries."""
    port = run.free_port()
    out = folder / f"callgrind-S{subscribers}.out"
    log = (folder / f"server-{port}.log").open("wb")
    proc = _start(port, out, log)
    try:
        run._wait_port(port, proc, timeout=180)
        await asyncio.sleep(2)
        fleets = await run.connect(
            [run.plan(port, subscribers, "artist:bench", connect_rate=200, in_flight=20)]
        )
        await asyncio.sleep(2)
        _instrument(proc.pid, True)
        await publish(run.HOST, port, "artist:bench", RATE, messages / RATE, lanes=1)
        await asyncio.sleep(4)
        _instrument(proc.pid, False)
        delivered = (await fleets[0].snap())["delivered"]
        await run.close_all(fleets)
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    return _total(out), int(delivered)


async def measure(small: int, large: int, messages: int, keep: Path | None = None) -> None:
    run.pin_self(1)
    with tempfile.TemporaryDirectory(prefix="piggybong-callgrind-") as tmp:
        folder = Path(tmp) if keep is None else keep
        a, da = await instructions(small, messages, folder)
        b, db = await instructions(large, messages, folder)
    per = (b - a) / max(1, db - da)
    print(
        f"S={small}: {a:,} instructions, {da:,} deliveries; S={large}: {b:,} instructions, "
        f"{db:,} deliveries; {per:,.0f} user-space instructions per delivery"
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.callgrind", description=__doc__)
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=300)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument(
        "--keep", type=Path, help="copy the two callgrind outputs here (callgrind_annotate)"
    )
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "callgrind_annotate"):
        if shutil.which(tool) is None:
            sys.exit(f"bench.callgrind: {tool} is not installed (apt-get install valgrind)")
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    uvloop.run(measure(args.small, args.large, args.messages, args.keep))


if __name__ == "__main__":
    main()
