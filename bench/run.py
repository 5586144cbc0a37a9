"""``make bench``: the fan-out benchmark, side by side, with ratios to the naive baseline.

Targets (each started fresh, pinned to CPU 0; the load runs in this process on CPU 1):

- ``memory``: this server, one process, in-memory broker;
- ``redis``: this server, one process, on Redis;
- ``redis2``: two processes of this server on one Redis (SO_REUSEPORT, both on CPU 0);
- ``baseline``: bench/baseline_server.py (Starlette + uvicorn, a set of sockets, a send loop);
- ``node-ws``: bench/peers/node_ws/server.js (Node's ``ws``, serialize once, loop ``send``), the
  peers table's fastest server measured in the same run; skipped, with a note, without ``node``
  and ``npm``;
- ``socketify``: bench/peers/socketify/server.py (µWebSockets' C++ pub/sub on its native libuv
  loop) and ``picows``: bench/peers/picows/server.py (picows' Cython protocol on uvloop,
  serialize once, loop ``send``), from their own venv (the ``bench-peers`` group of uv.lock,
  installed into bench/peers/.venv on first use); skipped, with a note, where that fails.

Per target: deliveries per second of server CPU (S=1000, R=50 msg/s), a ramp of
R at S=1000 and at S=5000 (a step passes when >= 99% of the deliveries owed
arrive and p99 <= 250 ms; the ramp stops at the first failure), p50/p99 at
S=1000 for R=20 and R=100, and server memory per idle connection. Then, for
this server only: one vs two processes on Redis with a core each, HTTP publish
requests per second across two processes, and connections held by several
processes on Redis (100,000 in the full run), each answering a broadcast.

Results go to bench/results/<date>-<mode>.json and .md. ``--quick`` takes about 3 minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen import (
    Fleet,
    FleetLike,
    FleetPlan,
    Histogram,
    RemoteFleet,
    blast,
    check_loopback,
    merge_snaps,
    proc_cpu_seconds,
    proc_rss_bytes,
    proc_write_calls,
    publish,
)
from bench.resume import fleet_resume, resume_latency
from loadtest.sysstats import raise_nofile

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOGS = Path(tempfile.gettempdir()) / "piggybong-bench"
NODE_WS = ROOT / "bench" / "peers" / "node_ws"
#: The Python peers' venv: the ``bench-peers`` dependency group alone, never in .venv.
PEERS_VENV = ROOT / "bench" / "peers" / ".venv"
PY_PEERS = ("socketify", "picows")
#: Every peer, in report order; ratios to each are reported.
PEERS = ("node-ws", *PY_PEERS)
PASS_P99_MS = 250.0
PASS_DELIVERED = 0.99


#: Every load connection comes from 127.0.0.1: the door's per-address limits (section 11)
#: are for the internet, not for one load generator.
LOAD_DOOR = ("--max-connections-per-ip", "10000000", "--connect-rate-per-ip", "10000000")
#: The hostile mix: the door's defaults, except room for the 1,000 subscribers and the
#: publisher that all come from 127.0.0.1 (the attackers come from 127.0.0.2 and .3).
HOSTILE_DOOR = ("--max-connections-per-ip", "1100", "--connect-rate-per-ip", "200")
#: Memory the node may grow by under the hostile mix, over the same run without attackers.
HOSTILE_RSS_BOUND_MIB = 64


@dataclass(frozen=True)
class Mode:
    name: str
    step_s: float
    cpu_step_s: float
    ramp_1000: tuple[int, ...]
    ramp_5000: tuple[int, ...]
    idle: int
    held: int
    held_procs: int
    blast_s: float
    hostile_s: float = 10
    fleet: int = 10_000
    targets: tuple[str, ...] = (
        "memory",
        "redis",
        "redis2",
        "baseline",
        "node-ws",
        "socketify",
        "picows",
    )


FULL = Mode(
    "full",
    step_s=6,
    cpu_step_s=10,
    ramp_1000=(20, 50, 100, 200, 300, 500, 700),
    ramp_5000=(4, 10, 20, 40, 60, 80),
    idle=5000,
    held=100_000,
    held_procs=7,
    blast_s=8,
    hostile_s=30,
)
QUICK = Mode(
    "quick",
    step_s=3,
    cpu_step_s=5,
    ramp_1000=(20, 100, 200, 300),
    ramp_5000=(10, 20, 40, 60),
    idle=5000,
    held=10_000,
    held_procs=2,
    blast_s=4,
    fleet=2_000,
)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port} after {timeout} s")


@dataclass
class Servers:
    """Processes started for one target; ``stop`` ends each by its pid."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    port: int = 0
    #: where ``POST /v1/publish`` is served when not on ``port`` (the picows peer)
    publish_port: int = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def start_redis(cpu: str | None) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        "redis-server",
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--maxclients",
        "10000",
        "--loglevel",
        "warning",
    ]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_port(port, proc)
    return proc, f"redis://{HOST}:{port}/0"


def start_servers(
    kind: str,
    *,
    procs: int = 1,
    redis_url: str | None = None,
    cpus: Sequence[str | None] = ("0",),
    door_limits: Sequence[str] = LOAD_DOOR,
) -> Servers:
    """``procs`` server processes of ``kind`` ("realtime", "baseline", or a peer) on one port."""
    port = free_port()
    servers = Servers(port=port)
    if kind == "picows":
        servers.publish_port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for i in range(procs):
        if kind == "baseline":
            cmd = [sys.executable, "-m", "bench.baseline_server", "--port", str(port)]
        elif kind == "node-ws":
            cmd = ["node", str(NODE_WS / "server.js"), "--port", str(port)]
        elif kind in PY_PEERS:
            cmd = [str(PEERS_VENV / "bin" / "python"), "-m", f"bench.peers.{kind}.server"]
            cmd += ["--port", str(port)]
            if servers.publish_port:
                cmd += ["--http-port", str(servers.publish_port)]
        else:
            cmd = [
                sys.executable,
                "-m",
                "realtime",
                "serve",
                "--reuse-port",
                "--port",
                str(port),
                "--log-level",
                "warning",
                "--outbox-max-messages",
                "1000",
                *door_limits,
            ]
            if redis_url:
                cmd += ["--redis-url", redis_url, "--node-id", f"bench-{port}-{i}"]
        cpu = cpus[i % len(cpus)]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        log = LOGS / f"{kind}-{port}-{i}.log"
        with log.open("wb") as err:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        servers.procs.append(proc)
        servers.logs.append(log)
    for proc in servers.procs:
        _wait_port(port, proc)
        if servers.publish_port:
            _wait_port(servers.publish_port, proc)
    time.sleep(0.5 if procs == 1 else 1.5)  # every process listening and subscribed
    return servers


def gc_pauses(port: int) -> dict[str, Any] | None:
    """This server's full (generation-2) collections so far, from its /metrics:
    how many, their total seconds, and the bucket bound under which all of them fell."""
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return None
    prefix = "piggybong_realtime_gc_pause_seconds_"
    buckets: list[tuple[float, float]] = []
    count = total = 0.0
    for line in text.splitlines():
        if not line.startswith(prefix) or 'generation="2"' not in line:
            continue
        name, value = line.rsplit(" ", 1)
        if name.startswith(prefix + "count"):
            count = float(value)
        elif name.startswith(prefix + "sum"):
            total = float(value)
        elif name.startswith(prefix + "bucket") and 'le="+Inf"' not in name:
            buckets.append((float(name.split('le="')[1].split('"')[0]), float(value)))
    worst = next((le for le, n in sorted(buckets) if n >= count), None)
    return {"collections": int(count), "seconds": round(total, 3), "all_under_s": worst}


def pin_self(cpu: int | None) -> None:
    cpus = {cpu} if cpu is not None else set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, cpus)


def node_ws_missing() -> str | None:
    """Why the ``node-ws`` peer cannot run here, or None once its ``ws`` is installed."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node and npm are not installed"
    if not (NODE_WS / "node_modules" / "ws").is_dir():
        done = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--silent"],
            cwd=NODE_WS,
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return "npm ci failed: " + _last_line(done.stderr)
    return None


def py_peer_missing(name: str) -> str | None:
    """Why the Python peer ``name`` cannot run here, or None: its venv is made on first use
    from uv.lock (the ``bench-peers`` group alone, pinned with hashes), then imported."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists():
        uv = Path(sys.executable).parent / "uv"
        done = subprocess.run(
            [
                str(uv if uv.exists() else shutil.which("uv") or "uv"),
                "sync",
                "--locked",
                "--only-group",
                "bench-peers",
                "--no-install-project",
                "--quiet",
                "--python",
                sys.executable,
            ],
            cwd=ROOT,
            env=dict(
                os.environ, UV_PROJECT_ENVIRONMENT=str(PEERS_VENV), UV_PYTHON_DOWNLOADS="never"
            ),
            check=False,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            return "uv sync --only-group bench-peers failed: " + _last_line(done.stderr)
    done = subprocess.run(
        [str(python), "-c", f"import {name}"], check=False, capture_output=True, text=True
    )
    if done.returncode != 0:
        return f"import {name} failed: " + _last_line(done.stderr)
    return None


def _last_line(text: str) -> str:
    return (text.strip().splitlines() or ["?"])[-1]


def peer_missing(name: str) -> str | None:
    """Why the peer ``name`` cannot run here (None: it can; so can every non-peer)."""
    if name == "node-ws":
        return node_ws_missing()
    return py_peer_missing(name) if name in PY_PEERS else None


# --------------------------------------------------------------------------- steps


async def connect(plans: list[FleetPlan], *, remote: bool = False) -> list[FleetLike]:
    fleets: list[FleetLike] = [RemoteFleet(p) if remote else Fleet(p) for p in plans]
    for fleet in fleets:
        await fleet.start()
    for fleet in fleets:
        await fleet.ready()
    return fleets


async def step(
    fleets: list[FleetLike],
    servers: Servers,
    rate: float,
    duration: float,
    *,
    channel: str = "artist:bench",
    extra_pids: Sequence[int] = (),
    lanes: int = 16,
    batch: int = 20,
) -> dict[str, Any]:
    """Publish ``rate`` msg/s for ``duration`` s; deliveries, latency and server CPU."""
    before, _ = merge_snaps([await f.snap() for f in fleets])
    subscribers = before["connected"] - sum(before["closed"].values())
    pids = [*servers.pids, *extra_pids]
    cpu0, t0, own0 = proc_cpu_seconds(servers.pids), time.time(), time.process_time()
    writes0 = proc_write_calls(servers.pids)
    extra0 = proc_cpu_seconds(extra_pids)
    at = servers.publish_port or servers.port
    sent = await publish(HOST, at, channel, rate, duration, lanes=lanes, batch=batch)
    owed = sent.accepted * subscribers
    deadline = time.time() + 3.0
    hist = Histogram()  # each snap hands over (and resets) the latencies since the last
    while True:  # drain: until everything owed arrived, or 3 s
        after, part = merge_snaps([await f.snap() for f in fleets])
        hist.merge(part.buckets)
        if after["delivered"] - before["delivered"] >= owed or time.time() > deadline:
            break
        await asyncio.sleep(0.1)
    cpu1, t1, own1 = proc_cpu_seconds(servers.pids), time.time(), time.process_time()
    writes = proc_write_calls(servers.pids) - writes0
    delivered = after["delivered"] - before["delivered"]
    cpu = cpu1 - cpu0
    lat = hist.summary()
    closed = {
        k: v - before["closed"].get(k, 0)
        for k, v in after["closed"].items()
        if v != before["closed"].get(k, 0)
    }
    ratio = delivered / owed if owed else 0.0
    return {
        "rate": rate,
        "subscribers": subscribers,
        "published": sent.accepted,
        "rejected": sent.rejected,
        "late_publishes": sent.late,
        "owed": owed,
        "delivered": delivered,
        "delivered_ratio": round(ratio, 4),
        "deliveries_per_s": round(delivered / duration),
        "server_cpu_s": round(cpu, 3),
        "server_cpu_percent": round(100 * cpu / (t1 - t0), 1),
        "deliveries_per_cpu_s": round(delivered / cpu) if cpu > 0 else None,
        # write(2)-family calls of the server per delivery (HTTP answers to the publisher
        # included; send(2) is not counted: see proc_write_calls)
        "writes_per_delivery": round(writes / delivered, 3) if delivered else None,
        "load_cpu_percent": round(100 * (own1 - own0) / (t1 - t0), 1),
        "other_cpu_s": round(proc_cpu_seconds(extra_pids) - extra0, 3) if extra_pids else None,
        "server_rss_mib": round(proc_rss_bytes(pids) / 2**20, 1),
        "latency_ms": lat,
        "closed": closed,
        "passed": ratio >= PASS_DELIVERED and (lat["p99"] or 1e9) <= PASS_P99_MS,
    }


async def ramp(
    fleets: list[FleetLike],
    servers: Servers,
    rates: Sequence[int],
    duration: float,
    log: Any,
    **kw: Any,
) -> list[dict[str, Any]]:
    steps = []
    for rate in rates:
        result = await step(fleets, servers, rate, duration, **kw)
        steps.append(result)
        log(
            f"    R={rate:<4} S={result['subscribers']:<6} {result['deliveries_per_s']:>8,}/s "
            f"p50 {result['latency_ms']['p50']} p99 {result['latency_ms']['p99']} ms "
            f"cpu {result['server_cpu_percent']}% load {result['load_cpu_percent']}% "
            f"{'pass' if result['passed'] else 'FAIL'} {result['closed'] or ''}"
        )
        if not result["passed"]:
            break
    return steps


def best(steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    passing = [s for s in steps if s["passed"]]
    return max(passing, key=lambda s: s["deliveries_per_s"]) if passing else None


async def close_all(fleets: list[FleetLike]) -> None:
    for fleet in fleets:
        await fleet.close()


def plan(port: int, clients: int, channel: str, first: int = 0, **kw: Any) -> FleetPlan:
    return FleetPlan(host=HOST, port=port, clients=clients, channel=channel, first=first, **kw)


# --------------------------------------------------------------------------- a target


@contextlib.asynccontextmanager
async def target(name: str, log: Any) -> AsyncIterator[tuple[Servers, list[int]]]:
    """Servers for ``name``, pinned to CPU 0, with Redis's pid when there is one."""
    redis_proc = None
    try:
        if name == "baseline" or name in PEERS:
            servers = start_servers(name)
        elif name == "memory":
            servers = start_servers("realtime")
        else:
            redis_proc, url = start_redis("0")
            servers = start_servers("realtime", procs=2 if name == "redis2" else 1, redis_url=url)
        try:
            yield servers, [redis_proc.pid] if redis_proc else []
        finally:
            servers.stop()
            for path in servers.logs:
                text = path.read_text(errors="replace")
                if "Traceback" in text:
                    log(f"  {path}: {text[-2000:]}")
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()


async def idle_connections(
    servers: Servers, clients: int, channel: str
) -> tuple[list[FleetLike], list[FleetLike], dict[str, Any]]:
    """100 warm-up connections, then ``clients`` idle ones on ``channel``: the fleets
    (warm, idle) and the server memory the idle ones added, per connection."""
    warm = await connect([plan(servers.port, 100, "artist:warm", first=900_000)])
    await asyncio.sleep(1.0)
    rss0 = proc_rss_bytes(servers.pids)
    fleets = await connect([plan(servers.port, clients, channel)])
    await asyncio.sleep(2.0)
    rss1 = proc_rss_bytes(servers.pids)
    connected = (await fleets[0].snap())["connected"]
    return (
        warm,
        fleets,
        {
            "connections": connected,
            "kib_per_connection": round((rss1 - rss0) / 1024 / max(connected, 1), 1),
            "rss_mib": round(rss1 / 2**20, 1),
        },
    )


async def side_by_side(name: str, mode: Mode, log: Any) -> dict[str, Any]:
    log(f"== {name}")
    out: dict[str, Any] = {}
    async with target(name, log) as (servers, extra):
        warm, fleets, out["idle"] = await idle_connections(servers, mode.idle, "artist:bench")
        connected = out["idle"]["connections"]
        log(f"  idle: {connected} connections, {out['idle']['kib_per_connection']} KiB each")
        if name in ("memory", "redis"):  # one process: /metrics is that process's
            out["gc_while_connecting"] = gc_pauses(servers.port)
            log(f"  full collections while connecting: {out['gc_while_connecting']}")
        log(f"  ramp S={mode.idle}")
        out["ramp_5000"] = await ramp(
            fleets, servers, mode.ramp_5000, mode.step_s, log, extra_pids=extra
        )
        await close_all([*warm, *fleets])
    async with target(name, log) as (servers, extra):
        fleets = await connect([plan(servers.port, 1000, "artist:bench")])
        await asyncio.sleep(1.0)
        out["cpu"] = await step(fleets, servers, 50, mode.cpu_step_s, extra_pids=extra)
        log(
            f"  S=1000 R=50: {out['cpu']['deliveries_per_cpu_s']:,} deliveries per CPU-second "
            f"(cpu {out['cpu']['server_cpu_percent']}%, "
            f"{out['cpu']['writes_per_delivery']} write calls per delivery)"
        )
        log("  ramp S=1000")
        out["ramp_1000"] = await ramp(
            fleets, servers, mode.ramp_1000, mode.step_s, log, extra_pids=extra
        )
        for rate in (20, 100):
            found = next((s for s in out["ramp_1000"] if s["rate"] == rate), None)
            if found is None:
                found = await step(fleets, servers, rate, mode.step_s, extra_pids=extra)
            out[f"latency_r{rate}"] = found
        await close_all(fleets)
    return out


# --------------------------------------------------------------------------- this server only


async def scaling(mode: Mode, log: Any) -> dict[str, Any]:
    """One vs two processes on Redis, each with a core; the load is not pinned."""
    log("== scaling: one vs two processes on Redis, a core each (load unpinned)")
    pin_self(None)
    out: dict[str, Any] = {}
    rates = mode.ramp_5000 + ((100, 120, 160, 200, 250) if mode.name == "full" else (80, 100))
    try:
        for procs in (1, 2):
            redis_proc, url = start_redis(None)
            servers = start_servers("realtime", procs=procs, redis_url=url, cpus=("0", "1")[:procs])
            try:
                fleets = await connect([plan(servers.port, mode.idle, "artist:bench")])
                steps = await ramp(
                    fleets, servers, rates, mode.step_s, log, extra_pids=[redis_proc.pid]
                )
                await close_all(fleets)
            finally:
                servers.stop()
                redis_proc.terminate()
                redis_proc.wait()
            top = best(steps)
            out[f"procs_{procs}"] = {
                "steps": steps,
                "max_deliveries_per_s": top["deliveries_per_s"] if top else None,
            }
        one, two = out["procs_1"]["max_deliveries_per_s"], out["procs_2"]["max_deliveries_per_s"]
        out["ratio"] = round(two / one, 2) if one and two else None
    finally:
        pin_self(1)
    return out


async def http_publish(mode: Mode, log: Any) -> dict[str, Any]:
    log("== HTTP publish: two processes on Redis (SO_REUSEPORT), pipelined clients")
    pin_self(None)
    redis_proc, url = start_redis(None)
    servers = start_servers("realtime", procs=2, redis_url=url, cpus=(None,))
    try:
        result = await blast(
            [(HOST, servers.port)],
            connections=16,
            depth=16,
            duration=mode.blast_s,
            channel="artist:blast",
        )
    finally:
        servers.stop()
        redis_proc.terminate()
        redis_proc.wait()
        pin_self(1)
    log(f"  {result['accepted_per_s']:,} accepted publishes/s")
    return result


async def http_ids(mode: Mode, log: Any) -> dict[str, Any]:
    """One server process on CPU 0, the load on CPU 1: idempotent publishes (an id each,
    history on) on Redis and in-process, against a bare Starlette POST endpoint (bearer
    check, JSON parse, 202) on the same core."""
    log("== HTTP publish with ids: one process, pinned; ratios to a bare Starlette endpoint")
    out: dict[str, Any] = {}
    redis_proc, url = start_redis("1")
    try:
        for name, kind, redis_url, path in (
            ("bare", "baseline", None, "/bare/publish"),
            ("memory", "realtime", None, "/v1/publish"),
            ("redis", "realtime", url, "/v1/publish"),
        ):
            servers = start_servers(kind, redis_url=redis_url)
            try:
                cpu0 = proc_cpu_seconds(servers.pids)
                result = await blast(
                    [(HOST, servers.port)],
                    connections=32,
                    depth=1,
                    duration=mode.blast_s,
                    channel="artist:blast",
                    ids=True,
                    path=path,
                )
                cpu = proc_cpu_seconds(servers.pids) - cpu0  # warm-up included
            finally:
                servers.stop()
            answered = result["accepted_per_s"] * (result["seconds"] + 1.0)
            result["server_cpu_us_per_publish"] = round(1e6 * cpu / max(1.0, answered), 1)
            out[name] = result
            log(
                f"  {name}: {result['accepted_per_s']:,} accepted publishes/s, "
                f"{result['server_cpu_us_per_publish']} server CPU-µs each"
            )
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    bare = out["bare"]["accepted_per_s"] or 1
    out["ratios"] = {k: round(out[k]["accepted_per_s"] / bare, 2) for k in ("memory", "redis")}
    # The same ratio by server CPU per publish: not bounded by the load generator's core.
    cost = out["bare"]["server_cpu_us_per_publish"] or 1.0
    out["cpu_ratios"] = {
        k: round(cost / (out[k]["server_cpu_us_per_publish"] or cost), 2)
        for k in ("memory", "redis")
    }
    log(f"  ratios to bare: {out['ratios']}, by CPU per publish: {out['cpu_ratios']}")
    return out


async def held(mode: Mode, log: Any) -> dict[str, Any]:
    """``mode.held`` connections across ``mode.held_procs`` processes; one broadcast."""
    log(f"== held: {mode.held:,} connections, {mode.held_procs} processes on Redis")
    pin_self(None)
    redis_proc, url = start_redis(None)
    servers = start_servers("realtime", procs=mode.held_procs, redis_url=url, cpus=(None,))
    per_child = 16_000
    children = -(-mode.held // per_child)
    plans = [
        plan(
            servers.port,
            min(per_child, mode.held - i * per_child),
            "broadcast",
            first=i * per_child,
            source_ips=[f"127.0.0.{2 + 2 * i}", f"127.0.0.{3 + 2 * i}"],
            connect_rate=1200 / children,
            in_flight=100,
            probe_every=1000,
        )
        for i in range(children)
    ]
    out: dict[str, Any] = {}
    fleets: list[FleetLike] = []
    try:
        t0 = time.time()
        fleets = await connect(plans, remote=True)
        snap, _ = merge_snaps([await f.snap() for f in fleets])
        out["connect_seconds"] = round(time.time() - t0, 1)
        out["connected"], out["failed"] = snap["connected"], snap["failed"]
        out["retries"], out["fail_reasons"] = snap["retries"], snap["fail_reasons"]
        log(
            f"  connected {snap['connected']:,} (failed {snap['failed']} "
            f"{snap['fail_reasons'] or ''}, retries {snap['retries']}) "
            f"in {out['connect_seconds']} s"
        )
        rss = [proc_rss_bytes([pid]) for pid in servers.pids]
        out["server_rss_mib"] = [round(r / 2**20, 1) for r in rss]
        broadcast = await step(fleets, servers, 1, 3.0, channel="broadcast", lanes=1)
        out["broadcast"] = broadcast
        out["per_process"] = _per_process_connections(servers)
        log(
            f"  broadcast: {broadcast['delivered']:,} of {broadcast['owed']:,} delivered, "
            f"p99 {broadcast['latency_ms']['p99']} ms; per process {out['per_process']}"
        )
    finally:
        await close_all(fleets)
        servers.stop()
        redis_proc.terminate()
        redis_proc.wait()
        pin_self(1)
    return out


async def idle_history(mode: Mode, log: Any) -> dict[str, Any]:
    """KiB per idle connection, in-process and on Redis (one process on CPU 0), each
    connection subscribed to an artist channel whose history is full (1,000 publications),
    and the baseline server's in the same run."""
    log(f"== idle: KiB per idle connection, {mode.idle:,} connections, history full")
    out: dict[str, Any] = {}
    for name in ("memory", "redis", "baseline"):
        async with target(name, log) as (servers, _):
            if name != "baseline":
                sent = await publish(HOST, servers.port, "artist:idle", 500, 2.0, batch=100)
                assert sent.accepted == 1000, sent
            warm, fleets, out[name] = await idle_connections(servers, mode.idle, "artist:idle")
            await close_all([*warm, *fleets])
        log(f"  {name}: {out[name]['connections']} connections, "
            f"{out[name]['kib_per_connection']} KiB each")  # fmt: skip
    return out


def _per_process_connections(servers: Servers) -> list[int]:
    """Established TCP sockets to the server port per server process (from /proc)."""
    inodes: set[str] = set()
    port = f"{servers.port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(":" + port) and fields[3] == "01":  # local port, ESTABLISHED
                inodes.add(f"socket:[{fields[9]}]")
    counts = []
    for pid in servers.pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            counts.append(sum(1 for fd in fds if _readlink(f"/proc/{pid}/fd/{fd}") in inodes))
        except OSError:
            counts.append(-1)
    return counts


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    redis_version = subprocess.run(
        ["redis-server", "--version"], check=False, capture_output=True, text=True
    ).stdout.strip()
    versions = {
        name: _version(name)
        for name in (
            "uvicorn",
            "websockets",
            "starlette",
            "uvloop",
            "redis",
            "hiredis",
            "msgpack",
            "h11",
            "httptools",
        )
    }
    versions["redis-py"] = versions.pop("redis")
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis-server": redis_version,
        "node": _node_version(),
        **versions,
    }


def _node_version() -> str:
    try:
        return (
            subprocess.run(
                ["node", "--version"], check=False, capture_output=True, text=True
            ).stdout.strip()
            or "not installed"
        )
    except OSError:
        return "not installed"


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def ratios(results: dict[str, Any], to: str = "baseline") -> dict[str, dict[str, float | None]]:
    """Each target's figures over those of target ``to`` in the same run ({} without it)."""
    base = results["targets"].get(to)
    out: dict[str, dict[str, float | None]] = {}
    if not base:
        return out
    for name, res in results["targets"].items():
        out[name] = {
            "deliveries_per_cpu_s": _div(
                res["cpu"]["deliveries_per_cpu_s"], base["cpu"]["deliveries_per_cpu_s"]
            ),
            "max_1000": _div(_max(res["ramp_1000"]), _max(base["ramp_1000"])),
            "max_5000": _div(_max(res["ramp_5000"]), _max(base["ramp_5000"])),
            "kib_per_idle": _div(
                res["idle"]["kib_per_connection"], base["idle"]["kib_per_connection"]
            ),
            "cpu_5000_r40": _div(_cpu_at(res["ramp_5000"], 40), _cpu_at(base["ramp_5000"], 40)),
        }
    return out


def _at(steps: list[dict[str, Any]], rate: int) -> dict[str, Any] | None:
    return next((s for s in steps if s["rate"] == rate), None)


def _cpu_at(steps: list[dict[str, Any]], rate: int) -> int | None:
    found = _at(steps, rate)
    return found["deliveries_per_cpu_s"] if found else None


def _max(steps: list[dict[str, Any]]) -> int | None:
    top = best(steps)
    return top["deliveries_per_s"] if top else None


def _max_text(steps: list[dict[str, Any]]) -> str:
    """The max passing figure; ">=" when the last step of the ramp passed (not found)."""
    top = _max(steps)
    if top is None:
        return "-"
    return (">= " if steps and steps[-1]["passed"] else "") + f"{top:,}"


def _top_efficiency(steps: list[dict[str, Any]]) -> str:
    top = best(steps)
    if top is None or top["deliveries_per_cpu_s"] is None:
        return "-"
    return f"{top['deliveries_per_cpu_s']:,} (R={top['rate']})"


def _div(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Fan-out benchmark, {results['date']} ({results['mode']})",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items()),
        "",
        "| target | deliveries per server CPU-second (S=1000, R=50) | max deliveries/s "
        "passing, S=1000 | max, S=5000 | p50 / p99 ms, S=1000 R=20 | p50 / p99 ms, "
        "S=1000 R=100 | KiB per idle connection | deliveries per server CPU-second at the "
        "highest passing step, S=1000 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rat = results.get("ratios", {})
    for name, res in results["targets"].items():
        r = rat.get(name, {})

        def with_ratio(
            value: Any, key: str, r: dict[str, Any] = r, name: str = name, text: str | None = None
        ) -> str:
            if value is None:
                return "-"
            text = text or f"{value:,}"
            return f"{text} ({r[key]}x)" if r.get(key) and name != "baseline" else text

        l20, l100 = res["latency_r20"]["latency_ms"], res["latency_r100"]["latency_ms"]
        lines.append(
            f"| {name} | {with_ratio(res['cpu']['deliveries_per_cpu_s'], 'deliveries_per_cpu_s')}"
            f" | {with_ratio(_max(res['ramp_1000']), 'max_1000', text=_max_text(res['ramp_1000']))}"
            f" | {with_ratio(_max(res['ramp_5000']), 'max_5000', text=_max_text(res['ramp_5000']))}"
            f" | {l20['p50']} / {l20['p99']} | {l100['p50']} / {l100['p99']}"
            f" | {with_ratio(res['idle']['kib_per_connection'], 'kib_per_idle')}"
            f" | {_top_efficiency(res['ramp_1000'])} |"
        )
    at_40 = {name: _at(res["ramp_5000"], 40) for name, res in results["targets"].items()}
    if any(at_40.values()):
        lines += [
            "",
            "S=5000, R=40 (200,000 deliveries/s owed): deliveries per server CPU-second, "
            "p99 ms, pass: "
            + "; ".join(
                f"{name} {s['deliveries_per_cpu_s']:,}, {s['latency_ms']['p99']}, "
                f"{'pass' if s['passed'] else 'FAIL'}"
                for name, s in at_40.items()
                if s and s["deliveries_per_cpu_s"]
            ),
        ]
    for peer in PEERS:
        to_peer = {
            name: r
            for name, r in results.get(f"ratios_to_{peer.replace('-', '_')}", {}).items()
            if name not in (*PEERS, "baseline")
        }
        if to_peer:
            lines += [
                "",
                f"Ratios to `{peer}` in the same run (deliveries per CPU-second at S=1000 R=50, "
                "max passing S=1000, max passing S=5000, KiB per idle connection, deliveries "
                "per CPU-second at S=5000 R=40): "
                + "; ".join(
                    f"{name} "
                    + ", ".join(
                        "-" if r.get(key) is None else f"{r[key]}x"
                        for key in (
                            "deliveries_per_cpu_s",
                            "max_1000",
                            "max_5000",
                            "kib_per_idle",
                            "cpu_5000_r40",
                        )
                    )
                    for name, r in to_peer.items()
                ),
            ]
    gcs = {
        name: res["gc_while_connecting"]
        for name, res in results["targets"].items()
        if res.get("gc_while_connecting")
    }
    if gcs:
        lines += [
            "",
            f"Full garbage collections while the {results['targets_idle']:,} idle "
            "connections opened (count, seconds in all, every one under): "
            + "; ".join(
                f"{name} {g['collections']}, {g['seconds']} s, {g['all_under_s']} s"
                for name, g in gcs.items()
            ),
        ]
    if "skipped" in results:
        lines += ["", "Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items())]
    if "scaling" in results:
        s = results["scaling"]
        lines += [
            "",
            f"One vs two processes on Redis (a core each, load unpinned): "
            f"{s['procs_1']['max_deliveries_per_s']} vs "
            f"{s['procs_2']['max_deliveries_per_s']} deliveries/s max passing at "
            f"S={results['targets_idle']}: {s['ratio']}x",
        ]
    if "http" in results:
        h = results["http"]
        lines += [
            "",
            f"HTTP publish, two processes on Redis: {h['accepted_per_s']:,} accepted "
            f"requests/s ({h['connections']} connections x {h['depth']} pipelined)",
        ]
    if "held" in results:
        h = results["held"]
        b = h.get("broadcast", {})
        lines += [
            "",
            f"Connections held: {h.get('connected', 0):,} (failed "
            f"{h.get('failed', 0)}) over {len(h.get('server_rss_mib', []))} processes "
            f"on Redis, RSS MiB {h.get('server_rss_mib')}; one broadcast delivered "
            f"{b.get('delivered', 0):,} of {b.get('owed', 0):,}, p99 "
            f"{b.get('latency_ms', {}).get('p99')} ms",
        ]
    lines += _recovery_lines(results)
    if "scaleout" in results:
        from bench.scaleout import scaleout_lines

        lines += scaleout_lines(results["scaleout"])
    return "\n".join(lines) + "\n"


def start_attackers(port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """bench/hostile.py against ``port``, unpinned, its lines to ``log_path``."""
    with log_path.open("wb") as sink:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.hostile",
                "--port",
                str(port),
                # e.g. "--ping-floods 0" to see one attack alone
                *os.environ.get("BENCH_HOSTILE_ARGS", "").split(),
            ],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


async def sample_rss(pids: list[int], into: list[int]) -> None:
    """Append the processes' RSS to ``into`` every half second, until cancelled."""
    while True:
        await asyncio.sleep(0.5)
        into.append(proc_rss_bytes(pids))


async def hostile(mode: Mode, log: Any) -> dict[str, Any]:
    """1,000 subscribers of one channel, 20 events/s from the HTTP API, p99 and memory: once
    quiet, once while bench/hostile.py holds 1,000 slow heads and 10 ping floods."""
    log("== hostile")
    out: dict[str, Any] = {"rss_bound_mib": HOSTILE_RSS_BOUND_MIB}
    for name in ("quiet", "attacked"):
        servers = start_servers("realtime", door_limits=HOSTILE_DOOR)
        attackers: subprocess.Popen[bytes] | None = None
        attack_log = LOGS / f"hostile-{servers.port}.log"
        try:
            fleets = await connect([plan(servers.port, 1000, "artist:bench")])
            await asyncio.sleep(1.0)
            rss0 = proc_rss_bytes(servers.pids)
            if name == "attacked":
                attackers = start_attackers(servers.port, attack_log)
                await asyncio.sleep(12.0)  # past one head timeout: the slow heads reconnect
            peak = [proc_rss_bytes(servers.pids)]
            sampler = asyncio.create_task(sample_rss(servers.pids, peak))
            try:
                result = await step(fleets, servers, 20, mode.hostile_s)
            finally:
                sampler.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler
            result["rss_start_mib"] = round(rss0 / 2**20, 1)
            result["rss_peak_mib"] = round(max(peak) / 2**20, 1)
            if attackers is not None:
                lines = attack_log.read_text(errors="replace").strip().splitlines()
                result["attackers"] = json.loads(lines[-1]) if lines else None
            out[name] = result
            lat = result["latency_ms"]
            log(
                f"  {name}: {result['delivered']:,} of {result['owed']:,} delivered, "
                f"p50 {lat['p50']} p99 {lat['p99']} ms, RSS {result['rss_start_mib']} -> "
                f"peak {result['rss_peak_mib']} MiB"
                + (f", attackers {result['attackers']}" if attackers is not None else "")
            )
            await close_all(fleets)
        finally:
            if attackers is not None:
                attackers.kill()
                attackers.wait()
            servers.stop()
    quiet, attacked = out["quiet"], out["attacked"]
    out["p99_ratio"] = _div(attacked["latency_ms"]["p99"], quiet["latency_ms"]["p99"])
    out["rss_growth_mib"] = round(attacked["rss_peak_mib"] - quiet["rss_peak_mib"], 1)
    log(
        f"  p99 attacked/quiet: {out['p99_ratio']:.2f} (target <= 1.5); peak RSS "
        f"{out['rss_growth_mib']:+} MiB over quiet (bound {HOSTILE_RSS_BOUND_MIB} MiB)"
    )
    return out


def _recovery_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    if "idle_history" in results:
        idle = results["idle_history"]
        lines += [
            "",
            "KiB per idle connection, its artist channel's history full (1,000): "
            + "; ".join(f"{k} {v['kib_per_connection']}" for k, v in idle.items())
            + " (before history: 9.9 in-process, bench/README.md)",
        ]
    for name, r in results.get("resume_latency", {}).items():
        lines += [
            "",
            f"Resume latency ({name}): a paid client that missed 1,000 publications, "
            f"{r['resumes']} resumes while 1,000 others get 50 events/s: p50 {r['p50_ms']} ms, "
            f"p99 {r['p99_ms']} ms, max {r['max_ms']} ms; {r['not_recovered_whole']} not "
            "recovered whole",
        ]
    for key in ("fleet_resume", "fleet_resume_spread"):
        if key not in results:
            continue
        f = results[key]
        ledger = f["ledger"]
        lines += [
            "",
            f"Fleet resume (first reconnect within {f.get('first_reconnect_within_s', 0.5)} s): "
            f"{f['subscribed']:,} clients on a node of two on Redis, the node "
            f"SIGKILLed: {f['back']:,} back, the last {f['fleet_back_s']} s after the kill "
            f"(median {f['back_p50_s']} s); every channel recovered for "
            f"{f['clients_all_recovered']:,}; resynced {f['channels_resynced']}; missed "
            f"{ledger['missed']}, duplicated {ledger['duplicated']}, out of order "
            f"{ledger['out_of_order']} of {ledger['owed']:,} owed; CPU % while resuming "
            f"{f.get('cpu_percent_while_resuming')}; kernel {f.get('kernel_while_resuming')}",
        ]
    return lines


async def main_async(mode: Mode, only: list[str] | None, log: Any) -> dict[str, Any]:
    results: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "mode": mode.name,
        "machine": machine(),
        "targets": {},
        "targets_idle": mode.idle,
        "pass_rule": f">= {PASS_DELIVERED:.0%} delivered and p99 <= {PASS_P99_MS} ms",
    }
    pin_self(1)
    started = time.time()
    for name in mode.targets:
        if only and name not in only:
            continue
        if why := peer_missing(name):
            log(f"== {name} skipped: {why}")
            results.setdefault("skipped", {})[name] = why
            continue
        results["targets"][name] = await side_by_side(name, mode, log)
    results["ratios"] = ratios(results)
    for peer in PEERS:
        results[f"ratios_to_{peer.replace('-', '_')}"] = ratios(results, peer)
    if not only or "scaling" in only:
        results["scaling"] = await scaling(mode, log)
    if not only or "http" in only:
        results["http"] = await http_publish(mode, log)
    if not only or "held" in only:
        results["held"] = await held(mode, log)
    if not only or "http-ids" in only:
        results["http_ids"] = await http_ids(mode, log)
    if not only or "hostile" in only:
        results["hostile"] = await hostile(mode, log)
    if not only or "idle" in only:
        results["idle_history"] = await idle_history(mode, log)
    if not only or "resume-latency" in only:
        pin_self(None)
        results["resume_latency"] = {
            name: await resume_latency(name == "redis", 100, log) for name in ("memory", "redis")
        }
        pin_self(1)
    if not only or "fleet-resume" in only:
        pin_self(None)  # nothing pinned: the children inherit this
        results["fleet_resume"] = await fleet_resume(mode.fleet, log)
        # the same herd spread over 5 s: what the listen queue makes of 0.5 s
        results["fleet_resume_spread"] = await fleet_resume(mode.fleet, log, backoff_base=5.0)
        pin_self(1)
    if not only or "scaleout" in only:
        from bench.scaleout import scaleout  # it imports this module

        results["scaleout"] = await scaleout(mode, log)
    results["seconds"] = round(time.time() - started)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short steps (~3 minutes)")
    parser.add_argument(
        "--only",
        action="append",
        help="memory, redis, redis2, baseline, node-ws, socketify, picows, scaling, http, held, "
        "http-ids, idle, resume-latency, fleet-resume, hostile, scaleout (repeat)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument(
        "--render", type=Path, metavar="JSON", help="only rewrite the .md beside a results .json"
    )
    args = parser.parse_args(argv)
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return 0
    check_loopback(HOST)
    if (os.cpu_count() or 1) < 2:
        print("bench: needs 2 cores (server on CPU 0, load on CPU 1)", file=sys.stderr)
        return 1
    raise_nofile()
    LOGS.mkdir(exist_ok=True)
    mode = QUICK if args.quick else FULL

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    import uvloop

    results = uvloop.run(main_async(mode, args.only, log))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{results['date'][:10]}-{mode.name}" + ("-" + "-".join(args.only) if args.only else "")
    base, n = stem, 2
    while (args.out / f"{stem}.json").exists():  # never overwrite an earlier run's results
        stem, n = f"{base}-{n}", n + 1
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    report = markdown(results)
    (args.out / f"{stem}.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
