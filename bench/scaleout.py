"""``--only scaleout``: the same fan-out load on one Redis and on a three-master Redis Cluster.

Per topology, fresh: the Redis processes and two ``realtime serve --reuse-port`` processes
on one port (the kernel spreads connections over both nodes), all pinned to CPU 0; the
load in this process on CPU 1. ``channels`` artist channels with ``per_channel``
subscribers each; an open-loop HTTP publisher sends ``rate`` publications/s round-robin
over the channels, every one with an id (history and idempotency on, the default policy),
its connections spread over both nodes by the kernel too.

Measured over one step, per Redis process: CPU-seconds (utime + stime from /proc), the
commands it ran (INFO commandstats deltas; commands a script calls count as well), hence
the publications it carried (PUBLISH + SPUBLISH: the history script runs one per
publication) and its CPU per publication and per delivery; its CPU while idle (cluster
bus upkeep) over ``idle_s`` before the step. Then the largest share of all publications
carried by one Redis process, and the busiest Redis core's CPU per 1,000 publications/s:
the publish rate a topology sustains before its busiest Redis core is full grows as the
inverse of that figure (a ratio of CPU per shard, not a speed-up measured on 2 cores).
One Redis is measured twice, at the cluster's total rate and at a third of it (the traffic
one shard of three gets): a Redis's CPU per publication falls as its rate grows (longer
pipelines from each node), so the first ratio understates the growth and the second, equal
traffic per Redis process, is what each shard costs.
Deliveries received vs owed, and their p50/p99 latency (probes as in bench/loadgen.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from bench.cluster import BenchCluster, redis_cli, start_cluster
from bench.loadgen import FleetLike, merge_snaps, proc_cpu_seconds, publish
from bench.run import (
    HOST,
    LOAD_DOOR,
    Servers,
    _per_process_connections,
    close_all,
    connect,
    plan,
    start_redis,
    start_servers,
)

if TYPE_CHECKING:
    from bench.run import Mode

#: Commands that publish one message to a channel's subscribers.
PUBLISH_COMMANDS = ("publish", "spublish")
#: Commands that run a script (the history publish script among them).
SCRIPT_COMMANDS = ("evalsha", "eval")


@dataclass(frozen=True)
class ScalePlan:
    channels: int
    per_channel: int
    rate: float
    seconds: float
    idle_s: float


#: Few subscribers per channel: a publication costs Redis the same whatever their number
#: (one message per node's pub/sub connection), and the servers share CPU 0 with Redis.
QUICK = ScalePlan(channels=40, per_channel=15, rate=600, seconds=8, idle_s=6)
FULL = ScalePlan(channels=60, per_channel=20, rate=800, seconds=20, idle_s=10)


# --------------------------------------------------------------------------- pure helpers


def command_calls(info: str, field: str = "calls") -> dict[str, int]:
    """``field`` (``calls``, or ``usec``: microseconds spent in it, a script's including
    the commands it called) per command from the text of ``INFO commandstats``
    (``cmdstat_evalsha:calls=12,usec=340,...``); names lower-cased."""
    calls: dict[str, int] = {}
    for line in info.splitlines():
        name, sep, fields = line.strip().partition(":")
        if not sep or not name.startswith("cmdstat_"):
            continue
        for item in fields.split(","):
            key, _, value = item.partition("=")
            if key == field:
                calls[name.removeprefix("cmdstat_").lower()] = int(value)
    return calls


def calls_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """Calls made between two ``command_calls`` readings (commands not called: left out)."""
    return {
        name: n - before.get(name, 0) for name, n in sorted(after.items()) if n != before.get(name)
    }


def count(calls: Mapping[str, int], names: Iterable[str]) -> int:
    return sum(calls.get(name, 0) for name in names)


def owed_deliveries(accepted: int, subscribers: list[int]) -> int:
    """Deliveries owed for ``accepted`` publications sent round-robin over channels with
    ``subscribers[c]`` subscribers each (publication ``i`` to channel ``i % len``)."""
    rounds, rest = divmod(accepted, len(subscribers))
    return rounds * sum(subscribers) + sum(subscribers[:rest])


def _per_1000(value: float, of: float) -> float | None:
    return round(1000 * value / of, 4) if of else None


# --------------------------------------------------------------------------- one topology


def _redis_stats(ports: list[int]) -> list[tuple[dict[str, int], dict[str, int]]]:
    """Per Redis: calls and usec per command so far."""
    infos = [redis_cli(port, "INFO", "commandstats") for port in ports]
    return [(command_calls(info), command_calls(info, "usec")) for info in infos]


async def _drain(fleets: list[FleetLike], before: int, owed: int) -> tuple[dict[str, Any], Any]:
    """Snapshots until the deliveries owed since ``before`` arrived, or 3 s."""
    deadline = time.time() + 3.0
    total, hist = merge_snaps([await f.snap() for f in fleets])
    while total["delivered"] - before < owed and time.time() < deadline:
        await asyncio.sleep(0.1)
        total, part = merge_snaps([await f.snap() for f in fleets])
        hist.merge(part.buckets)
    return total, hist


async def measure(
    name: str, redis: tuple[list[int], list[int]], servers: Servers, sp: ScalePlan, log: Any
) -> dict[str, Any]:
    """The load on ``servers``, whose Redis processes listen on ``redis[0]`` (pids ``redis[1]``)."""
    ports, pids = redis
    channels = [f"artist:scale-{c}" for c in range(sp.channels)]
    fleets: list[FleetLike] = []
    try:
        fleets = await connect([
            plan(servers.port, sp.per_channel, ch, first=c * sp.per_channel, probe_every=5)
            for c, ch in enumerate(channels)
        ])  # fmt: skip
        subscribers = [(await f.snap())["connected"] for f in fleets]
        per_node = _per_process_connections(servers)
        tag = f"s{time.time_ns()}-"
        # warm-up: scripts loaded, every node subscribed on every shard
        await publish(HOST, servers.port, channels, 100, 1.0, lanes=8, ids=tag + "w")
        await asyncio.sleep(1.0)
        idle0 = [proc_cpu_seconds([pid]) for pid in pids]
        await asyncio.sleep(sp.idle_s)
        idle = [proc_cpu_seconds([pid]) - c for pid, c in zip(pids, idle0, strict=True)]
        before, _ = merge_snaps([await f.snap() for f in fleets])
        calls0 = _redis_stats(ports)
        cpu0 = [proc_cpu_seconds([pid]) for pid in pids]
        server0, t0 = proc_cpu_seconds(servers.pids), time.time()
        sent = await publish(HOST, servers.port, channels, sp.rate, sp.seconds, lanes=16, ids=tag)
        owed = owed_deliveries(sent.accepted, subscribers)
        after, hist = await _drain(fleets, before["delivered"], owed)
        cpu = [proc_cpu_seconds([pid]) - c for pid, c in zip(pids, cpu0, strict=True)]
        server_cpu, wall = proc_cpu_seconds(servers.pids) - server0, time.time() - t0
        calls1 = _redis_stats(ports)
        calls = [calls_delta(a[0], b[0]) for a, b in zip(calls0, calls1, strict=True)]
        usec = [calls_delta(a[1], b[1]) for a, b in zip(calls0, calls1, strict=True)]
    finally:
        await close_all(fleets)
    delivered = after["delivered"] - before["delivered"]
    pubs = [count(c, PUBLISH_COMMANDS) for c in calls]
    total_pubs = sum(pubs)
    # CPU beyond the idle upkeep (presence refreshes, cluster bus), at the idle rate
    net = [max(0.0, c - i * wall / sp.idle_s) for c, i in zip(cpu, idle, strict=True)]
    per_redis: list[dict[str, Any]] = [
        {
            "port": port,
            "cpu_s": round(cpu_s, 3),
            "cpu_percent": round(100 * cpu_s / wall, 1),
            "idle_cpu_percent": round(100 * idle_s / sp.idle_s, 2),
            "net_cpu_s": round(net_s, 3),
            "net_cpu_us_per_publication": round(1e6 * net_s / n, 1) if n else None,
            "publications": n,
            "scripts": count(c, SCRIPT_COMMANDS),
            # time inside scripts (their commands included) per script run: the work a
            # script does, without the event loop and I/O around it
            "us_per_script": round(count(u, SCRIPT_COMMANDS) / count(c, SCRIPT_COMMANDS), 1)
            if count(c, SCRIPT_COMMANDS)
            else None,
            "share": round(n / total_pubs, 3) if total_pubs else None,
            "cpu_us_per_publication": round(1e6 * cpu_s / n, 1) if n else None,
            "cpu_us_per_delivery": round(1e6 * cpu_s / delivered, 2) if delivered else None,
            "calls": c,
            "usec": u,
        }
        for port, cpu_s, idle_s, net_s, n, c, u in zip(
            ports, cpu, idle, net, pubs, calls, usec, strict=True
        )
    ]
    busiest = max(per_redis, key=lambda r: r["cpu_s"])
    busiest_net = max(r["net_cpu_s"] for r in per_redis)
    lat = hist.summary()
    out = {
        "topology": name,
        "redis": per_redis,
        "channels": sp.channels,
        "subscribers": sum(subscribers),
        "connections_per_node": per_node,
        "rate": sp.rate,
        "seconds": sp.seconds,
        "published": sent.accepted,
        "rejected": sent.rejected,
        "late_publishes": sent.late,
        "publications_in_redis": total_pubs,
        "largest_share": max((r["share"] or 0.0) for r in per_redis),
        "owed": owed,
        "delivered": delivered,
        "delivered_ratio": round(delivered / owed, 4) if owed else None,
        "closed": after["closed"],
        "latency_ms": lat,
        "redis_cpu_s": round(sum(cpu), 3),
        "redis_cpu_us_per_publication": round(1e6 * sum(cpu) / total_pubs, 1)
        if total_pubs
        else None,
        "busiest_redis_cpu_s": busiest["cpu_s"],
        # core-seconds per second, per 1,000 publications/s (wall time cancels out)
        "busiest_core_per_1000_publications_per_s": _per_1000(busiest["cpu_s"], total_pubs),
        "busiest_net_core_per_1000_publications_per_s": _per_1000(busiest_net, total_pubs),
        "server_cpu_s": round(server_cpu, 3),
        "measured_wall_s": round(wall, 2),
    }
    log(
        f"  {name}: {sent.accepted:,} published ({sent.rejected} rejected), delivered "
        f"{delivered:,} of {owed:,}, p50 {lat['p50']} p99 {lat['p99']} ms; nodes {per_node}"
    )
    for r in per_redis:
        log(
            f"    redis :{r['port']} cpu {r['cpu_s']} s ({r['cpu_percent']}%, idle "
            f"{r['idle_cpu_percent']}%), {r['publications']:,} publications ({r['share']}), "
            f"{r['scripts']:,} scripts ({r['us_per_script']} µs inside each), "
            f"{r['cpu_us_per_publication']} µs/publication, "
            f"{r['cpu_us_per_delivery']} µs/delivery"
        )
    return out


async def scaleout(mode: Mode, log: Any) -> dict[str, Any]:
    """Both topologies, one after the other, each started fresh."""
    sp = QUICK if mode.name == "quick" else FULL
    log(
        f"== scaleout: one Redis vs a three-master cluster; {sp.channels} channels x "
        f"{sp.per_channel} subscribers, {sp.rate:g} publications/s with ids, two nodes; "
        "servers and Redis on CPU 0, load on CPU 1"
    )
    out: dict[str, Any] = {"plan": sp.__dict__}
    redis_proc, url = start_redis("0")
    try:
        servers = start_servers("realtime", procs=2, redis_url=url, cpus=("0",))
        try:
            one = ([int(url.rsplit(":", 1)[1].split("/")[0])], [redis_proc.pid])
            out["one"] = await measure("one Redis", one, servers, sp, log)
            # the traffic one shard of three gets: the same pipelining per Redis process
            third = replace(sp, rate=sp.rate / 3)
            out["one_third"] = await measure(
                "one Redis, a third of the rate", one, servers, third, log
            )
        finally:
            servers.stop()
    finally:
        redis_proc.terminate()
        redis_proc.wait()
    cluster: BenchCluster = start_cluster(3, cpu="0")
    try:
        servers = start_servers(
            "realtime",
            procs=2,
            cpus=("0",),
            door_limits=(*LOAD_DOOR, "--redis-cluster-nodes", cluster.nodes_setting),
        )
        try:
            out["cluster"] = await measure(
                "three-master cluster", (cluster.ports, cluster.pids), servers, sp, log
            )
        finally:
            servers.stop()
    finally:
        cluster.stop()
    for key, base, figure in (
        ("publish_rate_growth", "one", "busiest_core_per_1000_publications_per_s"),
        ("publish_rate_growth_net", "one", "busiest_net_core_per_1000_publications_per_s"),
        ("publish_rate_growth_per_shard", "one_third", "busiest_core_per_1000_publications_per_s"),
    ):
        one, three = out[base][figure], out["cluster"][figure]
        out[key] = round(one / three, 2) if one and three else None
        log(
            f"  {key}: {figure} {base} {one}, cluster {three}: the publish rate the busiest "
            f"Redis core allows, cluster over one Redis: x{out[key]}"
        )
    return out


def scaleout_lines(s: dict[str, Any]) -> list[str]:
    """The report's section on the two topologies."""
    lines = [
        "",
        f"Scale-out: one Redis vs a three-master cluster ({s['plan']['channels']} channels x "
        f"{s['plan']['per_channel']} subscribers over two nodes, "
        f"{s['plan']['rate']:g} publications/s with ids for {s['plan']['seconds']:g} s; "
        "servers and Redis on CPU 0, load on CPU 1)",
        "",
        "| topology | Redis | CPU-s | idle CPU % | publications | share | scripts "
        "| µs inside a script | CPU-µs per publication | CPU-µs per delivery "
        "| CPU-µs per publication beyond idle |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    topologies = [key for key in ("one", "one_third", "cluster") if key in s]
    for key in topologies:
        t = s[key]
        lines += [
            f"| {t['topology']} | :{r['port']} | {r['cpu_s']} | {r['idle_cpu_percent']} "
            f"| {r['publications']:,} | {r['share']} | {r['scripts']:,} | {r['us_per_script']} "
            f"| {r['cpu_us_per_publication']} | {r['cpu_us_per_delivery']} "
            f"| {r['net_cpu_us_per_publication']} |"
            for r in t["redis"]
        ]
    lines.append("")
    for key in topologies:
        t = s[key]
        lat = t["latency_ms"]
        lines.append(
            f"- {t['topology']} ({t['rate']:g} publications/s): largest share "
            f"{t['largest_share']}; busiest Redis core "
            f"{t['busiest_core_per_1000_publications_per_s']} of a core per 1,000 "
            f"publications/s ({t['busiest_net_core_per_1000_publications_per_s']} beyond "
            "idle); Redis CPU-µs per publication (all processes) "
            f"{t['redis_cpu_us_per_publication']}; delivered {t['delivered']:,} of "
            f"{t['owed']:,} (rejected {t['rejected']}); p50 {lat['p50']} / p99 {lat['p99']} ms; "
            f"connections per node {t['connections_per_node']}; server CPU-s {t['server_cpu_s']}"
        )
    lines.append(
        f"- publish rate before the busiest Redis core is full, cluster over one Redis: "
        f"x{s['publish_rate_growth']} at the same total rate "
        f"(x{s['publish_rate_growth_net']} beyond idle upkeep); "
        f"x{s.get('publish_rate_growth_per_shard')} against one Redis at a third of the rate "
        "(the same traffic per Redis process)"
    )
    return lines
