"""Reconnect scenarios: faults while events flow, and an exactly-once ledger.

``run_recovery`` starts its own Redis and server nodes on free 127.0.0.1 ports (it must
be able to kill them), connects ``clients`` app clients of ``clients/python``
(``piggybong_client``: backoff with jitter, resume with ``since``, gap fill, resync),
publishes numbered events with ids over HTTP (a 503 or a lost answer is retried with
the same id, on the other node), injects one fault, and checks every client's
receipts against what was accepted:

- ``drops``: clients' sockets aborted at random (``drops_per_s``) while events flow;
- ``node-kill``: node 0 SIGKILLed at ``fault_at``; its clients are pointed at node 1
  (as a load balancer would) and resume there; node 0 restarts ``fault_length`` later;
- ``redis-freeze``: Redis SIGSTOPped for ``fault_length`` (8 s), then SIGCONTed;
- ``redis-kill``: Redis SIGKILLed and, ``fault_length`` later, restarted empty (its
  histories are lost: clients are told ``recovered: false`` and resync).

The ledger is per channel and per client: every accepted publication must be handled
once and in order (``missed``, ``duplicated``, ``out_of_order``; ``unexpected`` is one
handled that was never accepted). A resync excuses the publications between the last
one handled before it and the first one handled after it, and nothing else. The fleet
is back when every client has handled, on each of its channels, the first publication
sent after the fault ended; ``back_s`` is that moment minus the fault's start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from piggybong_client import Client

from loadtest.config import Scenario
from loadtest.http import HttpConnection, HttpFailure
from loadtest.results import SECRETS, _fmt
from loadtest.stats import exact_percentile
from realtime.auth import mint_token

FAULTS: Final = ("drops", "node-kill", "redis-freeze", "redis-kill")
#: How long each fault lasts when the scenario does not say.
DEFAULT_LENGTH: Final = {"drops": 0.0, "node-kill": 3.0, "redis-freeze": 8.0, "redis-kill": 2.0}
Outcome = Literal["accepted", "refused", "unknown"]
RESYNC: Final = -1  # a marker in a client's receipts: told recovered: false there
GIVE_UP_S: Final = 30.0  # a publication still refused after this long is given up
HOST: Final = "127.0.0.1"
EXIT_OK: Final = 0
EXIT_BROKEN: Final = 99  # something was missed, duplicated, out of order, or not back


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


async def _answers(port: int, probe: bytes, want: bytes, timeout: float) -> bool:
    """Whether something on ``port`` answers ``probe`` with bytes starting ``want``."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(HOST, port)
            try:
                writer.write(probe)
                return (await reader.read(64)).startswith(want)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False


def _spawn(
    args: list[str], env: dict[str, str] | None = None, log: Path | None = None
) -> subprocess.Popen[bytes]:
    if log is None:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, env=env)
    with log.open("ab") as out:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env)


@dataclass
class Cluster:
    """A Redis (unless ``redis`` is False) and ``nodes`` server processes on loopback,
    each stopped by its own pid. Logs go to ``workdir``."""

    nodes: int
    redis: bool
    jwt_secret: str
    api_key: str
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rt-recovery-")))
    redis_port: int = 0
    ports: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes] | None] = field(default_factory=list)
    redis_proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        if self.redis:
            self.redis_port = free_port()
            await self.start_redis()
        self.ports = [free_port() for _ in range(self.nodes)]
        self.procs = [None] * self.nodes
        for i in range(self.nodes):
            await self.start_node(i)

    async def start_redis(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        args = [binary, "--port", str(self.redis_port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir),
                "--logfile", str(self.workdir / "redis.log")]  # fmt: skip
        self.redis_proc = _spawn(args)
        await self._wait(self.redis_proc, self.redis_port, b"PING\r\n", b"+PONG", "redis")

    async def start_node(self, i: int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
        env.update(REALTIME_JWT_SECRET=self.jwt_secret, REALTIME_API_KEYS=self.api_key)
        # Every simulated app connects from this one machine's address: the door's
        # per-address caps (section 11) would refuse the fleet as one host.
        env.update(
            REALTIME_MAX_CONNECTIONS_PER_IP="10000000", REALTIME_CONNECT_RATE_PER_IP="10000000"
        )
        args = [sys.executable, "-m", "realtime", "serve", "--host", HOST,
                "--port", str(self.ports[i]), "--log-level", "warning"]  # fmt: skip
        if self.redis:
            args += ["--redis-url", f"redis://{HOST}:{self.redis_port}/0", "--node-id", f"n{i}"]
        proc = _spawn(args, env, self.workdir / f"node{i}.log")
        self.procs[i] = proc
        probe = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        await self._wait(proc, self.ports[i], probe, b"HTTP/1.1 200", f"node {i}")

    async def _wait(
        self, proc: subprocess.Popen[bytes], port: int, probe: bytes, want: bytes, name: str
    ) -> None:
        deadline = time.monotonic() + 30.0
        while not await _answers(port, probe, want, 1.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start")
            await asyncio.sleep(0.05)

    def url(self, i: int) -> str:
        return f"ws://{HOST}:{self.ports[i]}/v1/ws"

    def live(self) -> list[int]:
        return [self.ports[i] for i, p in enumerate(self.procs) if p and p.poll() is None]

    def kill_node(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    def signal_redis(self, sig: int) -> None:
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.redis_proc.wait()

    def log_tails(self, chars: int = 1500) -> str:
        """The end of each process's log, for a run that went wrong."""
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    def close(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.redis_proc is not None and self.redis_proc.poll() is None:
            self.redis_proc.send_signal(signal.SIGCONT)
            self.redis_proc.terminate()
            self.redis_proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)


# --------------------------------------------------------------------------- the ledger


@dataclass(slots=True)
class Tally:
    """One client's (or the fleet's) account of publications owed and handled."""

    owed: int = 0
    received: int = 0
    missed: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    excused: int = 0

    def add(self, other: Tally) -> None:
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def broken(self) -> int:
        return self.missed + self.duplicated + self.out_of_order + self.unexpected


def audit(accepted: Sequence[int], got: Sequence[int], unknown: Collection[int] = ()) -> Tally:
    """Receipts ``got`` (sequence numbers, ``RESYNC`` markers) against the ``accepted``
    sequence numbers of one channel, all of them owed; those in ``unknown`` (given up
    without an answer) may have been published: neither owed nor unexpected."""
    tally = Tally(owed=len(accepted))
    wanted = set(accepted)
    seen: set[int] = set()
    last = 0
    excused: set[int] = set()
    before = 0  # the highest handled before the current resync marker
    pending_resync = False
    for seq in got:
        if seq == RESYNC:
            pending_resync, before = True, last
            continue
        if pending_resync:
            excused.update(s for s in accepted if before < s < seq)
            pending_resync = False
        if seq in seen:
            tally.duplicated += 1
            continue
        seen.add(seq)
        if seq < last:
            tally.out_of_order += 1
        last = max(last, seq)
        if seq not in wanted and seq not in unknown:
            tally.unexpected += 1
    if pending_resync:
        excused.update(s for s in accepted if s > before)
    tally.received = len(seen & wanted)
    tally.excused = len(excused - seen)
    tally.missed = len(wanted - seen - excused)
    return tally


@dataclass
class ChannelPublications:
    """What the publisher got accepted on one channel, in order."""

    accepted: list[int] = field(default_factory=list)
    sent_at: dict[int, float] = field(default_factory=dict)  # first attempt of each
    given_up: int = 0  # refused every time: never published
    unknown: set[int] = field(default_factory=set)  # given up, some attempt unanswered


@dataclass
class Member:
    """One app client of the fleet and its receipts per channel."""

    index: int
    user: str
    paid: bool
    channels: tuple[str, ...]
    node: int
    client: Client | None = None
    got: dict[str, list[int]] = field(default_factory=dict)
    at: dict[str, list[float]] = field(default_factory=dict)

    def on_event(self, publication: dict[str, Any]) -> None:
        data = publication.get("data")
        channel = publication.get("channel")
        if isinstance(data, dict) and isinstance(data.get("seq"), int) and channel in self.got:
            self.got[channel].append(data["seq"])
            self.at[channel].append(time.time())

    def on_resync(self, channel: str) -> None:
        if channel in self.got:
            self.got[channel].append(RESYNC)
            self.at[channel].append(time.time())

    def handled_since(self, channel: str, seq: int) -> float | None:
        """When this member first handled ``seq`` or a later one on ``channel``."""
        return next(
            (t for s, t in zip(self.got[channel], self.at[channel], strict=True) if s >= seq),
            None,
        )


# --------------------------------------------------------------------------- publishing


class Publisher:
    """Numbered events with ids on each channel, one at a time per channel (so the
    order of sequence numbers is the order of offsets), retried until accepted."""

    def __init__(
        self, run_id: str, channels: Sequence[str], rate: float, api_key: str, cluster: Cluster
    ) -> None:
        self.run_id = run_id
        self.rate = rate
        self.cluster = cluster
        self.channels = {name: ChannelPublications() for name in channels}
        self.headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self.attempts = 0
        self.refusals: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._conns: dict[tuple[str, int], HttpConnection] = {}  # a connection per lane

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._lane(name)) for name in self.channels]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        for conn in self._conns.values():
            await conn.close()

    async def _lane(self, channel: str) -> None:
        interval = len(self.channels) / self.rate if self.rate > 0 else 3600.0
        log = self.channels[channel]
        next_at = time.monotonic() + random.random() * interval
        seq = 0
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(next_at - time.monotonic(), 0.0))
                return
            seq += 1
            log.sent_at[seq] = time.time()
            outcome = await self._send(channel, seq)
            if outcome == "accepted":
                log.accepted.append(seq)
            elif outcome == "unknown":
                log.unknown.add(seq)
            else:
                log.given_up += 1
            next_at = max(next_at + interval, time.monotonic())

    async def _send(self, channel: str, seq: int) -> Outcome:
        """Publish until a 202 (``accepted``), or give up after ``GIVE_UP_S`` or a 4xx:
        ``refused`` when every answer said it was not published (503, 4xx, a refused
        connection), ``unknown`` when an attempt got no answer (it may have been)."""
        body = json.dumps(
            [{"channel": channel, "event": "lt.seq", "id": f"{self.run_id}-{seq}",
              "data": {"seq": seq}}]
        ).encode()  # fmt: skip
        deadline = time.monotonic() + GIVE_UP_S
        turn = seq
        outcome: Outcome = "refused"
        while time.monotonic() < deadline:
            live = self.cluster.live()
            if live:
                port = live[turn % len(live)]
                turn += 1
                self.attempts += 1
                conn = self._conns.get((channel, port))
                if conn is None:
                    conn = self._conns[channel, port] = HttpConnection(HOST, port, timeout=6.0)
                answer = await conn.request("POST", "/v1/publish", body, headers=self.headers)
                if not isinstance(answer, HttpFailure) and answer.status == 202:
                    return "accepted"
                if isinstance(answer, HttpFailure) and answer.kind != "refused":
                    outcome = "unknown"
                kind = answer.kind if isinstance(answer, HttpFailure) else str(answer.status)
                self.refusals[kind] = self.refusals.get(kind, 0) + 1
                retry = isinstance(answer, HttpFailure) or answer.status in (429, 503)
                if not retry:
                    return outcome  # refused for good (4xx): not published, not owed
            await asyncio.sleep(0.2)
        return outcome

    def first_sent_after(self, t: float) -> dict[str, int]:
        """Per channel, the first accepted sequence number first sent at or after ``t``."""
        out = {}
        for name, log in self.channels.items():
            after = [s for s in log.accepted if log.sent_at[s] >= t]
            if after:
                out[name] = after[0]
        return out


# --------------------------------------------------------------------------- the run


@dataclass
class FaultTimes:
    started: float | None = None
    ended: float | None = None
    drops: list[float] = field(default_factory=list)  # seconds from a drop to the resume


class RecoveryRun:
    """One reconnect scenario; ``execute`` owns the cluster, clients and tasks it starts."""

    def __init__(self, scenario: Scenario, stream: TextIO) -> None:
        self.s = scenario
        self.stream = stream
        self.fault = scenario.scenario
        self.length = (
            scenario.fault_length
            if scenario.fault_length is not None
            else DEFAULT_LENGTH[self.fault]
        )
        self.run_id = f"{random.Random(time.time_ns()).getrandbits(24):06x}"
        self.rng = random.Random(scenario.seed)
        self.channels = [f"artist:lt-{self.run_id}-{k}" for k in range(scenario.artists)]
        on_redis = self.fault != "drops" or scenario.backend == "redis"
        self.cluster = Cluster(
            2 if on_redis else 1, on_redis, scenario.jwt_secret, scenario.api_key
        )
        self.members: list[Member] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.times = FaultTimes()
        self.restart: asyncio.Task[None] | None = None

    def note(self, text: str) -> None:
        if self.s.progress != "off":
            self.stream.write(f"[{self.fault}] {text}\n")
            self.stream.flush()

    async def execute(self) -> dict[str, Any]:
        s = self.s
        publisher: Publisher | None = None
        started = time.time()
        try:
            await self.cluster.start()
            self.note(f"{self.cluster.nodes} node(s), redis {self.cluster.redis}; "
                      f"{s.clients} clients on {len(self.channels)} channels")  # fmt: skip
            await self._connect_all()
            publisher = Publisher(self.run_id, self.channels, s.event_rate, s.api_key, self.cluster)
            publisher.start()
            publish_start = time.monotonic()
            await asyncio.sleep(s.fault_at)
            await self._inject()
            await asyncio.sleep(max(0.0, s.duration - (time.monotonic() - publish_start)))
            if self.restart is not None:
                await self.restart  # restarted under load: publishing goes on meanwhile
            await publisher.stop()
            drained = await self._drain(publisher)
            return self._results(publisher, started, drained)
        except (RuntimeError, TimeoutError, OSError):
            self.note("aborted; the servers' logs:\n" + self.cluster.log_tails())
            raise
        finally:
            if publisher is not None:
                await publisher.stop()
            for member in self.members:
                if member.client is not None:
                    await member.client.close()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.cluster.close()

    async def _connect_all(self) -> None:
        s = self.s
        for i in range(s.clients):
            picks = tuple(self.rng.sample(self.channels, s.artists_per_client))
            member = Member(
                i, f"lt-{self.run_id}-{i}", self.rng.random() < s.paid_fraction, picks,
                node=i % self.cluster.nodes,
                got={c: [] for c in picks}, at={c: [] for c in picks},
            )  # fmt: skip
            member.client = self._client(member)
            for channel in picks:
                await member.client.subscribe(channel)
            self.members.append(member)
            self.tasks.append(asyncio.create_task(member.client.run()))
            await asyncio.sleep(1.0 / s.connect_rate)
        async with asyncio.timeout(s.connect_timeout + s.clients / s.connect_rate):
            for member in self.members:
                assert member.client is not None
                while not (  # noqa: ASYNC110 - the connect reply settled every position
                    member.client.connected.is_set()
                    and all(member.client.position(c) for c in member.channels)
                ):
                    await asyncio.sleep(0.02)

    def _client(self, member: Member) -> Client:
        secret, audience, ttl = self.s.jwt_secret, self.s.audience, self.s.effective_token_ttl
        tier = "paid" if member.paid else None

        async def token() -> str:
            return mint_token(secret, member.user, tier=tier, ttl=ttl, audience=audience)

        return Client(
            self.cluster.url(member.node),
            token,
            member.on_event,
            on_resync=member.on_resync,
            binary=self.rng.random() < self.s.msgpack_fraction,
        )

    async def _inject(self) -> None:
        if self.fault == "drops":  # many small faults: each drop's time to resume counts
            self.note(f"dropping sockets at {self.s.drops_per_s:g}/s")
            self.tasks.append(asyncio.create_task(self._drops()))
            return
        self.times.started = time.time()
        if self.fault == "node-kill":
            self.cluster.kill_node(0)
            self.times.ended = time.time()
            moved = 0
            for member in self.members:  # the load balancer takes node 0 out
                if member.node == 0 and member.client is not None:
                    member.node, member.client.url = 1, self.cluster.url(1)
                    moved += 1
            self.note(f"node 0 killed (SIGKILL); {moved} clients move to node 1")
            self.restart = asyncio.create_task(self._restart_node_later())
            self.tasks.append(self.restart)
        elif self.fault == "redis-freeze":
            self.cluster.signal_redis(signal.SIGSTOP)
            self.note(f"redis frozen (SIGSTOP) for {self.length:g} s")
            await asyncio.sleep(self.length)
            self.cluster.signal_redis(signal.SIGCONT)
            self.times.ended = time.time()
            self.note("redis resumed (SIGCONT)")
        else:
            self.cluster.signal_redis(signal.SIGKILL)
            self.note(f"redis killed (SIGKILL); restarting in {self.length:g} s")
            await asyncio.sleep(self.length)
            await self.cluster.start_redis()
            self.times.ended = time.time()
            self.note("redis restarted (empty)")

    async def _restart_node_later(self) -> None:
        await asyncio.sleep(self.length)
        await self.cluster.start_node(0)
        self.note("node 0 restarted")

    async def _drops(self) -> None:
        watchers: set[asyncio.Task[None]] = set()
        try:
            while True:
                await asyncio.sleep(self.rng.expovariate(self.s.drops_per_s))
                member = self.rng.choice(self.members)
                client = member.client
                if client is None or client._ws is None or not client.connected.is_set():
                    continue
                before = client.stats.connects
                client._ws.transport.abort()  # the train goes underground
                task = asyncio.create_task(self._watch(client, before, time.monotonic()))
                watchers.add(task)
                task.add_done_callback(watchers.discard)
        finally:
            for task in list(watchers):
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)

    async def _watch(self, client: Client, before: int, dropped: float) -> None:
        while client.stats.connects == before:  # noqa: ASYNC110 - the client's own loop
            await asyncio.sleep(0.01)
        self.times.drops.append(time.monotonic() - dropped)

    async def _drain(self, publisher: Publisher) -> bool:
        """Wait until every member handled the last accepted publication of its channels."""
        last = {c: log.accepted[-1] for c, log in publisher.channels.items() if log.accepted}
        deadline = time.monotonic() + max(self.s.drain, 1.0) + 15.0
        while time.monotonic() < deadline:
            if all(
                m.got[c] and max(m.got[c]) >= last[c]
                for m in self.members
                for c in m.channels
                if c in last
            ):
                return True
            await asyncio.sleep(0.05)
        return False

    def _results(self, publisher: Publisher, started: float, drained: bool) -> dict[str, Any]:
        total, per_client_broken = Tally(), 0
        for member in self.members:
            mine = Tally()
            for channel in member.channels:
                log = publisher.channels[channel]
                mine.add(audit(log.accepted, member.got[channel], log.unknown))
            total.add(mine)
            per_client_broken += mine.broken > 0
        stats = [m.client.stats for m in self.members if m.client is not None]
        recovery = self._recovery(publisher)
        accepted = sum(len(log.accepted) for log in publisher.channels.values())
        broken = total.broken > 0 or not drained or recovery["clients_not_back"] > 0
        scenario = {k: v for k, v in self.s.model_dump(mode="json").items() if k not in SECRETS}
        return {
            "kind": "recovery",
            "run_id": self.run_id,
            "fault": self.fault,
            "fault_length_s": self.length,
            "nodes": self.cluster.nodes,
            "redis": self.cluster.redis,
            "clients": len(self.members),
            "channels": len(self.channels),
            "total_s": round(time.time() - started, 1),
            "publications": {
                "accepted": accepted,
                "given_up": sum(log.given_up for log in publisher.channels.values()),
                "unanswered": sum(len(log.unknown) for log in publisher.channels.values()),
                "attempts": publisher.attempts,
                "refusals": publisher.refusals,
            },
            "delivery": {
                "owed": total.owed,
                "received": total.received,
                "missed": total.missed,
                "duplicated": total.duplicated,
                "out_of_order": total.out_of_order,
                "unexpected": total.unexpected,
                "excused_by_resync": total.excused,
                "clients_with_problems": per_client_broken,
                "drained": drained,
            },
            "resumes": {
                "connects": sum(st.connects for st in stats),
                "reconnects": sum(max(st.connects - 1, 0) for st in stats),
                "recovered": sum(st.recovered for st in stats),
                "resynced": sum(st.resyncs for st in stats),
                "gaps_filled": sum(st.gaps_filled for st in stats),
                "duplicates_dropped_by_client": sum(st.duplicates_dropped for st in stats),
            },
            "recovery": recovery,
            "scenario": scenario,
            "passed": not broken,
            "exit_code": EXIT_BROKEN if broken else EXIT_OK,
        }

    def _recovery(self, publisher: Publisher) -> dict[str, Any]:
        out: dict[str, Any] = {"drops": len(self.times.drops)}
        if self.times.drops:
            ms = [round(d * 1000) for d in self.times.drops]
            out["drop_to_resume_ms"] = {
                "p50": exact_percentile(ms, 50), "p99": exact_percentile(ms, 99), "max": max(ms),
            }  # fmt: skip
        start, end = self.times.started, self.times.ended
        firsts = publisher.first_sent_after(end) if end is not None else {}
        backs: list[float] = []
        not_back = 0
        for member in self.members:
            times = [member.handled_since(c, firsts[c]) for c in member.channels if c in firsts]
            if any(t is None for t in times):
                not_back += 1
            elif times and start is not None:
                backs.append(max(t for t in times if t is not None) - start)
        out["clients_back"] = len(backs)
        out["clients_not_back"] = not_back
        if backs:
            out["fleet_back_s"] = round(max(backs), 2)
            out["median_back_s"] = round(sorted(backs)[len(backs) // 2], 2)
        return out


async def run_recovery(scenario: Scenario, stream: TextIO | None = None) -> dict[str, Any]:
    """Run a reconnect scenario (``scenario.scenario`` in ``FAULTS``); its results."""
    return await RecoveryRun(scenario, stream or sys.stderr).execute()


# --------------------------------------------------------------------------- reports


def recovery_rows(results: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The report's lines as (label, text), for the text summary and the HTML page."""
    pub, dlv, res, rec = (results[k] for k in ("publications", "delivery", "resumes", "recovery"))
    rows = [
        ("run", f"{results['run_id']}  fault {results['fault']} ({results['fault_length_s']:g} s)"
                f"  {results['nodes']} node(s), redis {results['redis']}  "
                f"total {results['total_s']:.1f}s"),
        ("clients", f"{results['clients']:,} on {results['channels']} channels"),
        ("publishing", f"{pub['accepted']:,} accepted, {pub['given_up']} given up, "
                       f"{pub['unanswered']} given up unanswered, "
                       f"{pub['attempts']:,} attempts; refused {pub['refusals'] or 'never'}"),
        ("delivery", f"{dlv['received']:,} of {dlv['owed']:,} owed: missed {dlv['missed']}, "
                     f"duplicated {dlv['duplicated']}, out of order {dlv['out_of_order']}, "
                     f"unexpected {dlv['unexpected']}; excused by resync "
                     f"{dlv['excused_by_resync']}; clients with problems "
                     f"{dlv['clients_with_problems']}"),
        ("resumes", f"{res['reconnects']:,} reconnects; channels recovered {res['recovered']:,}, "
                    f"resynced (recovered: false) {res['resynced']:,}; gaps filled "
                    f"{res['gaps_filled']:,}; duplicates dropped by the client "
                    f"{res['duplicates_dropped_by_client']:,}"),
    ]  # fmt: skip
    if rec["drops"]:
        d = rec["drop_to_resume_ms"]
        rows.append(("drops", f"{rec['drops']} sockets dropped; drop to resumed p50 {d['p50']} ms "
                              f"p99 {d['p99']} ms max {d['max']} ms"))  # fmt: skip
    if results["fault"] != "drops":
        rows.append(
            ("recovery", f"fleet back {_fmt(rec.get('fleet_back_s'), ' s', 2)} after the fault "
                         f"(median client {_fmt(rec.get('median_back_s'), ' s', 2)}); "
                         f"{rec['clients_back']:,} back, {rec['clients_not_back']} not back")
        )  # fmt: skip
    verdict = "PASSED" if results["passed"] else "BROKEN: lost, duplicated or not back"
    rows.append(("result", verdict + ("" if dlv["drained"] else " (drain timed out)")))
    return rows


def recovery_text(results: Mapping[str, Any]) -> str:
    return "\n".join(f"{label:<12} {text}" for label, text in recovery_rows(results))


def recovery_html(results: Mapping[str, Any]) -> str:
    from loadtest.report import _esc, _table

    scenario = list(results["scenario"].items())
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>PiggyBong recovery {_esc(results['run_id'])}</title>"
        "<style>body{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:860px}"
        "table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:3px 8px;"
        "text-align:left}</style></head><body>"
        f"<h1>Recovery scenario {_esc(results['fault'])} ({_esc(results['run_id'])})</h1>"
        + _table("Summary", recovery_rows(results))
        + _table("Scenario", scenario)
        + "</body></html>\n"
    )


def is_recovery(scenario: Scenario) -> bool:
    return scenario.scenario in FAULTS


__all__ = [
    "FAULTS",
    "RESYNC",
    "Cluster",
    "Member",
    "Publisher",
    "Tally",
    "audit",
    "is_recovery",
    "recovery_html",
    "recovery_text",
    "run_recovery",
]
