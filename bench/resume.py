"""Recovery benchmarks (section 9): a fleet resuming after its node is killed, and the
latency of one paid client's resume of 1,000 missed publications under load.

``fleet_resume``: two nodes on one Redis (``loadtest.recovery.Cluster``); ``clients`` app
clients of clients/python, all on node 0, spread over child processes (``python -m
bench.resume --child SPEC``, JSON lines on stdin/stdout, like bench.loadgen's), each
following one of ``CHANNELS`` artist channels with history while the backend publishes
numbered events with ids. The children point their clients' next connect at node 1 (the
load balancer's part), then node 0 is SIGKILLed and each client resumes on node 1 with
``since`` on its own backoff. The simulated apps run at nice 10 (``BENCH_LOAD_NICE``):
phones bring their own CPUs. Nothing is pinned.
Reported: clients back, channels ``recovered: true`` / ``false``, the ledger of
``loadtest.recovery`` (missed, duplicated, out of order) once every client has its
channel's last publication (or 30 s), and the time from the kill to the last client's
resumed session.

``resume_latency``: one node (in-process and on Redis); 1,000 subscribers of bench.loadgen
(in a child process) on another channel receive 50 events/s; a paid client misses 1,000
publications, then subscribes with ``since``; the time from sending the subscribe to the
decoded reply with the 1,000 publications, over ``resumes`` resumes. This process's heap
is frozen (``gc.freeze``) while it times them: a gen-2 collection of the harness's own
objects inside a reply's ``json.loads`` (12-51 ms in traced runs, in 2-3 of 100 resumes)
set the p99 before.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from piggybong_client import Backoff, Client
from websockets.asyncio.client import connect

from bench.loadgen import FleetPlan, RemoteFleet, merge_snaps, proc_cpu_seconds, publish
from loadtest.http import HttpConnection, HttpFailure
from loadtest.recovery import Cluster, Member, Publisher, Tally, audit
from loadtest.stats import exact_percentile
from loadtest.sysstats import raise_nofile
from realtime.auth import mint_token
from realtime.settings import DEV_API_KEY, DEV_JWT_SECRET

HOST = "127.0.0.1"
CHANNELS = 20
PER_CHILD = 2500
#: How often a child looks for clients back (when each came back is the client's own
#: ``stats.connected_at``).
SWEEP_S = 0.25
#: Niceness of the simulated apps' processes: phones bring their own CPUs, so the load
#: generator yields the two cores it shares with the nodes (0: compete as equals).
LOAD_NICE = int(os.environ.get("BENCH_LOAD_NICE", "10"))


# --------------------------------------------------------------------------- fleet: a child


class EndCounter(logging.Handler):
    """Counts the library's "session ended: <why>" lines by their reason."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reasons: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "session ended: %s" and record.args:
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            why = f"{type(args[0]).__name__}: {args[0]}"[:80]
            self.reasons[why] = self.reasons.get(why, 0) + 1


class FleetChild:
    """Clients ``first`` .. ``first + count - 1`` of the fleet in this process."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.members: list[Member] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.back: dict[int, float] = {}  # member index -> when its session resumed
        self.sweeper: asyncio.Task[None] | None = None
        self.unready: set[int] = set()
        self.ends = EndCounter()
        library_log = logging.getLogger("piggybong_client")
        library_log.setLevel(logging.INFO)
        library_log.addHandler(self.ends)

    async def start(self) -> int:
        spec, now = self.spec, time.time()
        for i in range(spec["first"], spec["first"] + spec["count"]):
            channel = spec["channels"][i % len(spec["channels"])]
            member = Member(i, f"fleet-{spec['run']}-{i}", True, (channel,), node=0,
                            got={channel: []}, at={channel: []})  # fmt: skip
            token = mint_token(DEV_JWT_SECRET, member.user, tier="paid", ttl=3600, now=now)

            async def provide(token: str = token) -> str:
                return token

            member.client = Client(
                spec["urls"][0], provide, member.on_event, on_resync=member.on_resync,
                backoff=Backoff(base=spec["backoff_base"]),
            )  # fmt: skip
            await member.client.subscribe(channel)
            self.members.append(member)
            self.tasks.append(asyncio.create_task(member.client.run()))
            await asyncio.sleep(1.0 / spec["connect_rate"])
        waiting = list(self.members)
        deadline = time.monotonic() + 60
        while waiting and time.monotonic() < deadline:
            waiting = [m for m in waiting if not _settled(m)]
            await asyncio.sleep(0.1)
        # Not subscribed when publishing began: no position to resume from, so nothing
        # published before its first subscribe is owed to it (left out of the ledger).
        self.unready = {m.index for m in waiting}
        return len(self.members) - len(waiting)

    def move(self) -> None:
        """Node 0 is gone: every client's next connect goes to node 1."""
        before = {m.index: m.client.stats.connects for m in self.members if m.client}
        for member in self.members:
            assert member.client is not None
            member.client.url = self.spec["urls"][1]
        self.sweeper = asyncio.create_task(self._sweep(before))

    async def _sweep(self, before: dict[int, int]) -> None:
        pending = [m for m in self.members if m.index not in self.unready]
        while pending:
            await asyncio.sleep(SWEEP_S)
            still = []
            for member in pending:
                client = member.client
                if client is not None and client.stats.connects > before[member.index]:
                    self.back[member.index] = client.stats.connected_at
                else:
                    still.append(member)
            pending = still

    def caught_up(self, last: dict[str, int]) -> int:
        """Members that handled the last accepted publication of their channels."""
        return sum(
            all(m.got[c] and max(m.got[c]) >= last[c] for c in m.channels if c in last)
            for m in self.members
        )

    def report(
        self, accepted: dict[str, list[int]], unknown: dict[str, list[int]], killed: float
    ) -> dict[str, Any]:
        total = Tally()
        whole = 0
        # missed by a client that has its channel's last publication (a hole: a loss) or by
        # one that has not caught up when the drain ended (late, maybe not lost)
        holes = late = 0
        samples: list[dict[str, Any]] = []
        for member in self.members:
            assert member.client is not None
            if member.index in self.unready:
                continue
            for channel in member.channels:
                owed = accepted.get(channel, [])
                tally = audit(owed, member.got[channel], unknown.get(channel, []))
                total.add(tally)
                if not tally.missed:
                    continue
                got = member.got[channel]
                if owed and got and max(got) >= owed[-1]:
                    holes += tally.missed
                    if len(samples) < 5:
                        missing = sorted(set(owed) - set(got))
                        sample = {"client": member.index, "channel": channel}
                        samples.append({**sample, "missing": missing[:20], "tail": got[-20:]})
                else:
                    late += tally.missed
            stats = member.client.stats
            whole += stats.resyncs == 0 and stats.recovered >= len(member.client.channels)
        stats_all = [m.client.stats for m in self.members if m.client is not None]
        died: dict[str, int] = {}
        for task in self.tasks:  # a client's run() must never end on its own
            if task.done() and not task.cancelled() and task.exception() is not None:
                kind = repr(task.exception())[:120]
                died[kind] = died.get(kind, 0) + 1
        return {
            "client_loops_ended": died,
            "sessions_ended": self.ends.reasons,
            "back_s": [round(t - killed, 3) for t in self.back.values()],
            "clients_all_recovered": whole,
            "recovered": sum(s.recovered for s in stats_all),
            "resynced": sum(s.resyncs for s in stats_all),
            "gaps_filled": sum(s.gaps_filled for s in stats_all),
            "tally": {k: getattr(total, k) for k in Tally.__slots__},
            "missed_holes": holes,
            "missed_late": late,
            "hole_samples": samples,
        }

    async def close(self) -> None:
        for member in self.members:
            if member.client is not None:
                await member.client.close()
        for task in [*self.tasks, *([self.sweeper] if self.sweeper else [])]:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _settled(member: Member) -> bool:
    client = member.client
    return (
        client is not None
        and client.connected.is_set()
        and all(client.position(c) is not None for c in member.channels)
    )


async def _child(spec: dict[str, Any]) -> None:
    raise_nofile()
    child = FleetChild(spec)
    ready = await child.start()
    print(json.dumps({"ready": ready}), flush=True)
    reader = asyncio.StreamReader(limit=1 << 26)
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        line = await reader.readline()
        command: dict[str, Any] = json.loads(line) if line.strip() else {"op": "quit"}
        if command["op"] == "move":
            child.move()
            print(json.dumps({"ok": True}), flush=True)
        elif command["op"] == "caught_up":
            print(json.dumps({"caught_up": child.caught_up(command["last"])}), flush=True)
        elif command["op"] == "status":
            print(json.dumps({"back": len(child.back)}), flush=True)
        elif command["op"] == "report":
            answer = child.report(command["accepted"], command["unknown"], command["killed"])
            print(json.dumps(answer), flush=True)
        else:
            break
    await child.close()


class ChildFleet:
    """The parent's end of one child (``python -m bench.resume --child SPEC``)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.resume", "--child", json.dumps(self.spec),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=1 << 26,
        )  # fmt: skip
        if LOAD_NICE:
            os.setpriority(os.PRIO_PROCESS, self.proc.pid, LOAD_NICE)

    async def ask(self, command: dict[str, Any] | None = None) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        if command is not None:
            self.proc.stdin.write(json.dumps(command).encode() + b"\n")
            await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench.resume child exited early")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        self.proc.stdin.write(b'{"op": "quit"}\n')
        try:
            await self.proc.stdin.drain()
            await asyncio.wait_for(self.proc.wait(), 30)
        except (TimeoutError, ConnectionError):
            self.proc.kill()
            await self.proc.wait()


# --------------------------------------------------------------------------- fleet: the run


def listen_drops() -> dict[str, int]:
    """The kernel's count of connections dropped by full listen queues, and of SYNs
    sent again (``/proc/net/netstat``; all namespaces' sockets on this host)."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    counters = dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))
    return {k: counters.get(k, 0) for k in ("ListenOverflows", "TCPSynRetrans")}


async def fleet_resume(
    clients: int, log: Any, *, rate: float = 10.0, backoff_base: float = Backoff.base
) -> dict[str, Any]:
    """Kill the node that holds ``clients`` resuming clients; see the module docstring.
    ``backoff_base``: the clients' first reconnect waits uniform(0, base) seconds."""
    log(
        f"== fleet resume: {clients:,} clients on node 0 of two on Redis; node 0 SIGKILLed; "
        f"first reconnect within {backoff_base:g} s"
    )
    # Nothing pinned: the survivor takes whichever core is free (pinned, it shared CPU 0
    # with other work on this machine and took 2-5x longer).
    cluster = Cluster(2, True, DEV_JWT_SECRET, DEV_API_KEY)
    children: list[ChildFleet] = []
    publisher: Publisher | None = None
    run = f"{int(time.time()) % 100000:05d}"
    channels = [f"artist:fleet-{run}-{k}" for k in range(CHANNELS)]
    try:
        await cluster.start()
        procs = max(1, math.ceil(clients / PER_CHILD))
        for p in range(procs):
            first, count = p * clients // procs, (p + 1) * clients // procs - p * clients // procs
            urls = [cluster.url(0), cluster.url(1)]
            spec = {"run": run, "first": first, "count": count, "channels": channels,
                    "urls": urls, "connect_rate": 800 / procs,
                    "backoff_base": backoff_base}  # fmt: skip
            children.append(ChildFleet(spec))
        t0 = time.time()
        for child in children:
            await child.start()
        ready = sum([(await child.ask())["ready"] for child in children])
        log(f"  {ready:,} of {clients:,} subscribed in {time.time() - t0:.1f} s")
        publisher = Publisher(run, channels, rate, DEV_API_KEY, cluster)
        publisher.start()
        await asyncio.sleep(3.0)
        drops0 = listen_drops()
        # The load balancer's part first: a reconnect goes to node 1, as through a balancer
        # that tries the other node when one refuses (each child's loop is busy with 2,500
        # dropped sockets just after the kill, and would take the news late).
        for child in children:
            await child.ask({"op": "move"})
        cluster.kill_node(0)
        killed = time.time()
        survivor = [p.pid for p in cluster.procs[1:] if p is not None]
        loaders = [c.proc.pid for c in children if c.proc is not None]
        redis_pid = [cluster.redis_proc.pid] if cluster.redis_proc else []
        cpu0 = [proc_cpu_seconds(pids) for pids in (survivor, loaders, redis_pid)]
        back = 0
        while back < ready and time.time() - killed < 60:
            await asyncio.sleep(0.25)
            back = sum([(await child.ask({"op": "status"}))["back"] for child in children])
        waited = time.time() - killed
        drops = {k: v - drops0[k] for k, v in listen_drops().items()}
        cpu = [
            round(100 * (proc_cpu_seconds(pids) - c) / waited)
            for pids, c in zip((survivor, loaders, redis_pid), cpu0, strict=True)
        ]
        await asyncio.sleep(3.0)  # publishing goes on: live events after the resume
        await publisher.stop()
        accepted = {c: log_.accepted for c, log_ in publisher.channels.items()}
        unknown = {c: sorted(log_.unknown) for c, log_ in publisher.channels.items()}
        last = {c: seqs[-1] for c, seqs in accepted.items() if seqs}
        drain_started = time.time()
        deadline = drain_started + 30  # drain: every client has its channel's last publication
        while True:
            answers = [await child.ask({"op": "caught_up", "last": last}) for child in children]
            caught_up = sum(a["caught_up"] for a in answers)
            if caught_up >= ready or time.time() >= deadline:
                break
            await asyncio.sleep(0.5)
        drained_s = round(time.time() - drain_started, 1)
        parts = [
            await child.ask(
                {"op": "report", "accepted": accepted, "unknown": unknown, "killed": killed}
            )
            for child in children
        ]
    finally:
        if publisher is not None:
            await publisher.stop()
        for child in children:
            await child.close()
        cluster.close()
    backs = sorted(t for part in parts for t in part["back_s"])
    tally = {k: sum(part["tally"][k] for part in parts) for k in Tally.__slots__}
    out = {
        "clients": clients,
        "subscribed": ready,
        "child_processes": len(children),
        "events_per_s": rate,
        "channels": CHANNELS,
        "back": len(backs),
        "fleet_back_s": backs[-1] if backs else None,
        "back_p50_s": backs[len(backs) // 2] if backs else None,
        "back_deciles_s": [backs[len(backs) * k // 10] for k in range(10)] if backs else [],
        "waited_s": round(waited, 1),
        "clients_all_recovered": sum(part["clients_all_recovered"] for part in parts),
        "channels_recovered": sum(part["recovered"] for part in parts),
        "channels_resynced": sum(part["resynced"] for part in parts),
        "gaps_filled": sum(part["gaps_filled"] for part in parts),
        "publications_accepted": sum(len(v) for v in accepted.values()),
        "publications_unanswered": sum(len(v) for v in unknown.values()),
        "ledger": tally,
        # of the ledger's missed: by clients that had their channel's last publication (holes)
        # and by clients that had not caught up when the drain ended
        "missed_holes": sum(part["missed_holes"] for part in parts),
        "missed_late": sum(part["missed_late"] for part in parts),
        "hole_samples": [s for part in parts for s in part["hole_samples"]][:5],
        "caught_up_after_drain": caught_up,
        "drained_s": drained_s,
        "cpu_percent_while_resuming": dict(zip(("survivor", "load", "redis"), cpu, strict=True)),
        "client_loops_ended": _merge(part["client_loops_ended"] for part in parts),
        "sessions_ended": _merge(part["sessions_ended"] for part in parts),
        "first_reconnect_within_s": backoff_base,
        "kernel_while_resuming": drops,
    }
    log(
        f"  back {out['back']:,} of {ready:,}, the last {out['fleet_back_s']} s after the kill "
        f"(median {out['back_p50_s']} s); all channels recovered for "
        f"{out['clients_all_recovered']:,}; resynced {out['channels_resynced']}; ledger {tally} "
        f"(missed: {out['missed_holes']} holes, {out['missed_late']} late; {caught_up:,} caught "
        f"up after a {drained_s} s drain); "
        f"cpu % {out['cpu_percent_while_resuming']}; loops ended {out['client_loops_ended']}; "
        f"kernel {drops}; sessions ended {out['sessions_ended']}"
    )
    return out


def _merge(parts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


# --------------------------------------------------------------------------- resume latency


async def resume_latency(redis: bool, resumes: int, log: Any) -> dict[str, Any]:
    """A paid client misses 1,000 publications and resumes, ``resumes`` times, while
    1,000 subscribers get 50 events/s on another channel of the same node."""
    name = "redis" if redis else "memory"
    log(f"== resume latency ({name}): 1,000 missed, {resumes} resumes, 1,000 others at 50/s")
    cluster = Cluster(1, redis, DEV_JWT_SECRET, DEV_API_KEY)
    fleet: RemoteFleet | None = None
    background: asyncio.Task[Any] | None = None
    http = None
    try:
        await cluster.start()
        port = cluster.ports[0]
        # the 1,000 others in a child process: this one times the resumes
        fleet = RemoteFleet(FleetPlan(host=HOST, port=port, clients=1000, channel="artist:bg"))
        await fleet.start()
        await fleet.ready()
        before, _ = merge_snaps([await fleet.snap()])
        began = time.time()
        http = HttpConnection(HOST, port, timeout=10.0)
        headers = {"Authorization": f"Bearer {DEV_API_KEY}", "Content-Type": "application/json"}
        background = asyncio.create_task(publish(HOST, port, "artist:bg", 50, 3600, lanes=2))
        token = mint_token(DEV_JWT_SECRET, "resumer", tier="paid", ttl=3600)
        took: list[float] = []
        failures = 0
        async with connect(cluster.url(0), subprotocols=["piggybong.v1.json"],  # type: ignore[list-item]
                           compression=None, max_size=2**24) as ws:  # fmt: skip
            ids = iter(range(1, 10**6))

            async def command(op: str, **fields: Any) -> dict[str, Any]:
                cid = next(ids)
                await ws.send(json.dumps({"id": cid, "op": op, **fields}))
                while True:
                    message = json.loads(await ws.recv())
                    if message.get("id") == cid and "type" not in message:
                        reply: dict[str, Any] = message
                        return reply

            await command("connect", token=token)
            position = (await command("subscribe", channel="artist:resume"))["result"]
            # This process's own heap (the harness's modules and plumbing, ~43,000 objects:
            # a full collection takes 10-15 ms here) is not the resuming client's: frozen,
            # as the node freezes its own (realtime/gcfreeze.py), so that a collection set
            # off by decoding a reply does not time the harness's objects too.
            gc.collect()
            gc.freeze()
            for n in range(resumes):
                await command("unsubscribe", channel="artist:resume")
                body = [
                    {"channel": "artist:resume", "event": "missed", "data": {"n": n, "i": i}}
                    for i in range(1000)
                ]
                answer = await http.request(
                    "POST", "/v1/publish", json.dumps(body).encode(), headers=headers
                )
                assert not isinstance(answer, HttpFailure) and answer.status == 202, answer
                since = {"epoch": position["epoch"], "offset": position["offset"]}
                started = time.perf_counter()
                reply = await command("subscribe", channel="artist:resume", since=since)
                took.append(time.perf_counter() - started)
                result = reply["result"]
                offsets = [p["offset"] for p in result["publications"]]
                if not result["recovered"] or offsets != list(
                    range(since["offset"] + 1, since["offset"] + 1001)
                ):
                    failures += 1
                position = result
        after, _ = merge_snaps([await fleet.snap()])
        elapsed = time.time() - began
    finally:
        gc.unfreeze()
        if background is not None:
            background.cancel()
            await asyncio.gather(background, return_exceptions=True)
        if http is not None:
            await http.close()
        if fleet is not None:
            await fleet.close()
        cluster.close()
    us = [round(t * 1e6) for t in took]
    out = {
        "resumes": resumes,
        "missed_each": 1000,
        "not_recovered_whole": failures,
        "p50_ms": exact_percentile(us, 50) / 1000,
        "p99_ms": exact_percentile(us, 99) / 1000,
        "max_ms": max(us) / 1000,
        "background_subscribers": 1000,
        "background_deliveries_per_s": round((after["delivered"] - before["delivered"]) / elapsed),
    }
    log(
        f"  p50 {out['p50_ms']} ms, p99 {out['p99_ms']} ms, max {out['max_ms']} ms; "
        f"{failures} not recovered whole; "
        f"{out['background_deliveries_per_s']:,} background deliveries/s"
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="bench.resume child (used by bench.run)")
    parser.add_argument("--child", required=True, help="the child's spec (JSON)")
    args = parser.parse_args()
    import uvloop

    uvloop.run(_child(json.loads(args.child)))


if __name__ == "__main__":
    main()
