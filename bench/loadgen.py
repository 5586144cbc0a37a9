"""Lean load for the benchmark: WebSocket subscribers that count, an HTTP publisher, a blaster.

The full harness (``loadtest``) decodes and accounts for every delivery, which
caps it near 60,000 deliveries/s per core. These clients are cheaper so that
the server, not the load, is what a benchmark step measures:

- only every ``probe_every``-th subscriber (a probe) is read by the event loop
  as data arrives and reads each event's send time for the latency histogram
  (the same events reach every subscriber, so probes spread over the fan-out
  order sample its latency); the others are read in bulk every
  ``LAZY_PERIOD`` (one ``recv`` per socket, frame headers walked and counted),
  which a real client far away would never cost the server either: on
  loopback a socket that a process waits on costs the sender a wake-up;
- the publisher is open-loop: event ``i`` is due at ``start + i / rate`` and
  carries that due time as ``data.t``, so a server that falls behind shows it
  as latency (no coordinated omission);
- the blaster keeps ``depth`` pipelined ``POST /v1/publish`` requests in flight
  on each connection and counts the answers.

Subscribers can live in this process (``Fleet``) or in child processes
(``RemoteFleet``, ``python -m bench.loadgen --child``) that answer ``snap``
and ``quit`` on stdin with one JSON line each; more than ~18,000 connections
need children (open-file limits) and several source addresses (ports).
Targets must be on 127.0.0.0/8.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, cast

from loadtest.sysstats import proc_usage, raise_nofile
from realtime.auth import mint_token
from realtime.settings import DEV_API_KEY, DEV_JWT_SECRET

_KEY = base64.b64encode(b"piggybong-bench!").decode()
_T_MARK = b'"t":'
#: Seconds between bulk reads of the subscribers that are not probes.
LAZY_PERIOD = 0.1
#: Lazy subscribers read per loop iteration of a sweep.
LAZY_SLICE = 50
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h
#: Tries per subscriber before it counts as failed, and seconds a handshake may take.
ATTEMPTS = 3
HANDSHAKE_TIMEOUT = 15.0
#: Histogram resolution: bucket = int(ln(latency_us) * _RES), about 1% wide.
_RES = 100


def ws_frame(payload: bytes) -> bytes:
    """A client text frame, masked with the all-zero key (so the payload stays as it is)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, 0x80 | n)) + b"\0\0\0\0" + payload
    return bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big") + b"\0\0\0\0" + payload


def _frame(opcode: int, payload: bytes) -> bytes:
    return bytes((0x80 | opcode, 0x80 | len(payload))) + b"\0\0\0\0" + payload


def check_loopback(host: str) -> None:
    if not host.startswith("127."):
        raise SystemExit(f"bench: refusing target {host!r}: only 127.0.0.0/8")


# --------------------------------------------------------------------------- histogram


class Histogram:
    """Log-bucketed latencies in microseconds (about 1% resolution); mergeable as a dict."""

    __slots__ = ("buckets", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0

    def record(self, seconds: float) -> None:
        us = seconds * 1e6
        b = int(math.log(us) * _RES) if us > 1.0 else 0
        self.buckets[b] = self.buckets.get(b, 0) + 1
        self.count += 1

    def merge(self, buckets: dict[int, int] | dict[str, int]) -> None:
        for b, n in buckets.items():
            key = int(b)
            self.buckets[key] = self.buckets.get(key, 0) + n
            self.count += n

    def percentile_ms(self, q: float) -> float | None:
        if not self.count:
            return None
        rank = q / 100.0 * self.count
        seen = 0
        for b in sorted(self.buckets):
            seen += self.buckets[b]
            if seen >= rank:
                return round(math.exp((b + 0.5) / _RES) / 1000.0, 3)
        return None

    def summary(self) -> dict[str, float | None]:
        return {
            "n": self.count,
            "p50": self.percentile_ms(50),
            "p90": self.percentile_ms(90),
            "p99": self.percentile_ms(99),
            "p999": self.percentile_ms(99.9),
            "max": self.percentile_ms(100),
        }


# --------------------------------------------------------------------------- subscribers


@dataclass
class FleetPlan:
    host: str
    port: int
    clients: int
    channel: str
    probe_every: int = 10
    connect_rate: float = 2000.0
    in_flight: int = 200
    source_ips: list[str] = field(default_factory=list)  # client i uses [i % len]
    secret: str = DEV_JWT_SECRET
    first: int = 0  # index of the first client (names are unique across workers)


@dataclass
class Counts:
    delivered: int = 0
    connected: int = 0
    failed: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    fail_reasons: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    hist: Histogram = field(default_factory=Histogram)


class Sub(asyncio.Protocol):
    """One subscriber: handshake, ``connect``, ``subscribe``, then count frames."""

    __slots__ = ("buf", "counts", "done", "fleet", "probe", "state", "token", "transport")

    def __init__(self, fleet: Fleet, token: str, probe: bool) -> None:
        self.fleet = fleet
        #: "ok" once subscribed, else why it failed (settled once)
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.counts = fleet.counts
        self.token = token
        self.probe = probe
        self.state = 0  # 0 handshake, 1 connecting, 2 subscribing, 3 ready, 4 gone
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        plan = self.fleet.plan
        transport.write(
            f"GET /v1/ws HTTP/1.1\r\nHost: {plan.host}:{plan.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {_KEY}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: piggybong.v1.json\r\n\r\n".encode()
        )

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        if self.state == 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self._fail("http:" + buf[9:12].decode(errors="replace"))
                return
            buf = buf[end + 4 :]
            self.state = 1
            assert self.transport is not None
            self.transport.write(
                ws_frame(json.dumps({"id": 1, "op": "connect", "token": self.token}).encode())
            )
        i, n, frames = 0, len(buf), 0
        probe = self.probe or self.state != 3
        while n - i >= 2:
            b1 = buf[i + 1]
            if b1 < 126:
                start, size = i + 2, b1
            elif b1 == 126:
                if n - i < 4:
                    break
                start, size = i + 4, (buf[i + 2] << 8) | buf[i + 3]
            else:
                if n - i < 10:
                    break
                start, size = i + 10, int.from_bytes(buf[i + 2 : i + 10], "big")
            end = start + size
            if end > n:
                break
            op = buf[i] & 0x0F
            if op > 2:
                self._control(op, buf[start:end])
            elif probe:
                self._read(buf[start:end])
            else:
                frames += 1
            i = end
        self.buf = buf[i:] if i < n else b""
        if frames:
            self.counts.delivered += frames

    def _read(self, payload: bytes) -> None:
        if self.state == 3:
            self.counts.delivered += 1
            at = payload.find(_T_MARK)
            if at >= 0:
                stop = at + 4
                while payload[stop] not in b",}":
                    stop += 1
                self.counts.hist.record(time.time() - float(payload[at + 4 : stop]))
            return
        reply = json.loads(payload)
        if reply.get("id") is None:  # an event before the subscribe reply: not counted
            return
        if "error" in reply:
            self._fail(
                ("connect:" if self.state == 1 else "subscribe:") + str(reply["error"].get("code"))
            )
        elif self.state == 1:
            self.state = 2
            assert self.transport is not None
            self.transport.write(
                ws_frame(
                    json.dumps(
                        {"id": 2, "op": "subscribe", "channel": self.fleet.plan.channel}
                    ).encode()
                )
            )
        elif self.state == 2:
            self.state = 3
            self._settle("ok")
            if not self.probe:
                self.fleet.go_lazy(self)

    def _control(self, op: int, payload: bytes) -> None:
        assert self.transport is not None
        if op == 9:
            self.transport.write(_frame(0xA, payload))
        elif op == 8:
            code = str(int.from_bytes(payload[:2], "big")) if len(payload) >= 2 else "1005"
            if not self.fleet.closing:
                self.counts.closed[code] = self.counts.closed.get(code, 0) + 1
            self.transport.close()

    def _settle(self, outcome: str) -> None:
        if not self.done.done():
            self.done.set_result(outcome)

    def _fail(self, reason: str) -> None:
        if self.state < 3:
            self.state = 4
            self._settle(reason)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state < 3:
            self.state = 4
            self._settle("lost")
        elif self.state == 3 and not self.fleet.closing:
            self.counts.closed["lost"] = self.counts.closed.get("lost", 0) + 1
        self.state = 4


def _factory(sub: Sub) -> Callable[[], Sub]:
    return lambda: sub


async def _dial_from(source: str, plan: FleetPlan) -> socket.socket:
    """A socket connected from ``source``; its port is chosen at connect time
    (IP_BIND_ADDRESS_NO_PORT), so ports are unique per peer, not per address."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (plan.host, plan.port))
    except BaseException:
        sock.close()
        raise
    return sock


class FleetLike(Protocol):
    """Subscribers somewhere: ``ready`` once all settled, ``snap`` resets the histogram."""

    async def start(self) -> None: ...

    async def ready(self) -> tuple[int, int]: ...

    async def snap(self) -> dict[str, Any]: ...

    async def close(self) -> None: ...


class Fleet:
    """Subscribers in this process; owns its dialer task."""

    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan
        self.counts = Counts()
        self.subs: list[Sub] = []
        self.closing = False
        self._all_settled = asyncio.Event()
        self._dialer: asyncio.Task[None] | None = None
        self.lazy: list[tuple[int, Sub]] = []
        self._lazy_reader: asyncio.Task[None] | None = None
        self._view = memoryview(bytearray(1 << 18))

    def go_lazy(self, sub: Sub) -> None:
        """Stop the loop reading ``sub``; ``_read_lazily`` reads its socket in bulk instead."""
        assert sub.transport is not None
        sock = sub.transport.get_extra_info("socket")
        if sock is None:
            return
        sub.transport.pause_reading()
        self.lazy.append((sock.fileno(), sub))  # the transport owns (and closes) the fd

    def _read_lazily(self, subs: list[tuple[int, Sub]], view: memoryview) -> list[tuple[int, Sub]]:
        """One bulk read of each of ``subs`` into ``view``; those still open."""
        keep = []
        size = len(view)
        for fd, sub in subs:
            transport = sub.transport
            if transport is None or transport.is_closing() or sub.state == 4:
                continue  # its fd may be another socket's by now
            lost = False
            while True:
                try:
                    n = os.readv(fd, [view])
                except BlockingIOError:
                    break
                except OSError:
                    n = 0
                if n == 0:
                    lost = True
                    break
                sub.data_received(bytes(view[:n]))
                if n < size or sub.state == 4:
                    break
            if lost or sub.state == 4:
                if lost and not self.closing:
                    self.counts.closed["lost"] = self.counts.closed.get("lost", 0) + 1
                sub.state = 4
                transport.abort()
                continue
            keep.append((fd, sub))
        return keep

    async def _lazy_loop(self) -> None:
        # Read in slices, handing the loop back between them, so that the probes' data
        # (read by the loop as it arrives) does not wait for a whole sweep: the sweep would
        # otherwise add its own length to the latency the probes measure.
        view = self._view
        while True:
            await asyncio.sleep(LAZY_PERIOD)
            sweep, self.lazy = self.lazy, []
            keep: list[tuple[int, Sub]] = []
            for start in range(0, len(sweep), LAZY_SLICE):
                keep += self._read_lazily(sweep[start : start + LAZY_SLICE], view)
                await asyncio.sleep(0)
            self.lazy = keep + self.lazy  # and those that went lazy meanwhile

    def settled(self, *, ok: bool, reason: str = "") -> None:
        if ok:
            self.counts.connected += 1
        else:
            self.counts.failed += 1
            self.counts.fail_reasons[reason] = self.counts.fail_reasons.get(reason, 0) + 1
        if self.counts.connected + self.counts.failed >= self.plan.clients:
            self._all_settled.set()

    async def start(self) -> None:
        self._dialer = asyncio.create_task(self._dial_all())
        self._lazy_reader = asyncio.create_task(self._lazy_loop())

    async def _dial_all(self) -> None:
        loop = asyncio.get_running_loop()
        plan = self.plan
        gate = asyncio.Semaphore(plan.in_flight)
        sources = plan.source_ips
        started = loop.time()
        now = time.time()

        async def dial(index: int) -> None:
            """Up to ``ATTEMPTS`` tries, as an app reconnects; the gate bounds handshakes."""
            token = mint_token(plan.secret, f"bench-{plan.first + index}", now=now, ttl=7200)
            outcome = ""
            for attempt in range(ATTEMPTS):
                if attempt:
                    self.counts.retries += 1
                    await asyncio.sleep(attempt + index % 100 / 100)  # backoff with spread
                    await gate.acquire()
                sub = Sub(self, token, probe=(plan.first + index) % plan.probe_every == 0)
                try:
                    if sources:
                        sock = await _dial_from(sources[index % len(sources)], plan)
                        await loop.create_connection(_factory(sub), sock=sock)
                    else:
                        await loop.create_connection(_factory(sub), plan.host, plan.port)
                    outcome = await asyncio.wait_for(sub.done, HANDSHAKE_TIMEOUT)
                except (OSError, TimeoutError) as exc:
                    outcome = f"{type(exc).__name__}:{getattr(exc, 'errno', '')}"
                    if sub.transport is not None:
                        sub.transport.abort()
                finally:
                    gate.release()
                if outcome == "ok":
                    self.subs.append(sub)
                    self.settled(ok=True)
                    return
            self.settled(ok=False, reason=outcome)

        dials: set[asyncio.Task[None]] = set()
        for index in range(plan.clients):
            await gate.acquire()
            due = started + index / plan.connect_rate
            if due > loop.time():
                await asyncio.sleep(due - loop.time())
            task = asyncio.create_task(dial(index))
            dials.add(task)
            task.add_done_callback(dials.discard)
        if dials:
            await asyncio.gather(*dials)

    async def ready(self) -> tuple[int, int]:
        await self._all_settled.wait()
        return self.counts.connected, self.counts.failed

    async def snap(self) -> dict[str, Any]:
        self.lazy = self._read_lazily(self.lazy, self._view)  # (a sweep reads the rest)
        c = self.counts
        out = {
            "delivered": c.delivered,
            "connected": c.connected,
            "failed": c.failed,
            "closed": dict(c.closed),
            "hist": c.hist.buckets,
            "retries": c.retries,
            "fail_reasons": dict(c.fail_reasons),
        }
        c.hist = Histogram()
        return out

    async def close(self) -> None:
        self.closing = True
        for task in (self._dialer, self._lazy_reader):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.lazy = []
        for sub in self.subs:
            if sub.transport is not None:
                sub.transport.abort()
        await asyncio.sleep(0)


class RemoteFleet:
    """Subscribers in a child process (``python -m bench.loadgen --child PLAN_JSON``)."""

    def __init__(self, plan: FleetPlan) -> None:
        self.plan = plan
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.loadgen",
            "--child",
            json.dumps(asdict(self.plan)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )

    async def _line(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("bench child exited early")
        result: dict[str, Any] = json.loads(line)
        return result

    async def ready(self) -> tuple[int, int]:
        first = await self._line()
        return int(first["connected"]), int(first["failed"])

    async def snap(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(b"snap\n")
        await self.proc.stdin.drain()
        return await self._line()

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self.proc.stdin.write(b"quit\n")
                await self.proc.stdin.drain()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def _child(plan: FleetPlan) -> None:
    raise_nofile()
    fleet = Fleet(plan)
    await fleet.start()
    connected, failed = await fleet.ready()
    print(json.dumps({"connected": connected, "failed": failed}), flush=True)
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while True:
        command = (await reader.readline()).strip()
        if command == b"snap":
            print(json.dumps(await fleet.snap()), flush=True)
        else:
            break
    await fleet.close()


def merge_snaps(snaps: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], Histogram]:
    total: dict[str, Any] = {
        "delivered": 0,
        "connected": 0,
        "failed": 0,
        "retries": 0,
        "closed": {},
        "fail_reasons": {},
    }
    hist = Histogram()
    for s in snaps:
        for key in ("delivered", "connected", "failed", "retries"):
            total[key] += s[key]
        for kind in ("closed", "fail_reasons"):
            for code, n in s[kind].items():
                total[kind][code] = total[kind].get(code, 0) + n
        hist.merge(s["hist"])
    return total, hist


# --------------------------------------------------------------------------- publisher


def http_request(host: str, port: int, path: str, body: bytes, api_key: str) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


@dataclass
class PublishResult:
    sent: int = 0
    accepted: int = 0
    rejected: int = 0
    late: int = 0  # sent more than 50 ms after it was due (the lanes were all busy)


async def publish(
    host: str,
    port: int,
    channel: str | Sequence[str],
    rate: float,
    duration: float,
    *,
    payload: int = 150,
    lanes: int = 8,
    batch: int = 1,
    api_key: str = DEV_API_KEY,
    ids: str = "",
) -> PublishResult:
    """Publish ``rate`` events/s for ``duration`` s, open loop; owns its lane tasks.
    Several channels: event ``i`` goes to ``channel[i % len]``. ``ids``: every event
    carries the id ``ids + str(i)`` (history and idempotency on)."""
    result = PublishResult()
    queue: asyncio.Queue[float] = asyncio.Queue()  # bounded by rate * duration items
    pad = "x" * payload
    channels = [channel] if isinstance(channel, str) else list(channel)
    numbers = itertools.count()

    def item(t: float) -> dict[str, Any]:
        i = next(numbers)
        event: dict[str, Any] = {
            "channel": channels[i % len(channels)],
            "event": "bench",
            "data": {"t": t, "pad": pad},
        }
        if ids:
            event["id"] = f"{ids}{i}"
        return event

    async def lane() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                due = [await queue.get()]
                while len(due) < batch and not queue.empty():
                    due.append(queue.get_nowait())
                items = [item(t) for t in due]
                body = json.dumps(items[0] if len(items) == 1 else items).encode()
                if time.time() - due[0] > 0.05:
                    result.late += len(due)
                writer.write(http_request(host, port, "/v1/publish", body, api_key))
                result.sent += len(due)
                status = await _read_response(reader)
                if status == 202:
                    result.accepted += len(due)
                else:
                    result.rejected += len(due)
                for _ in due:
                    queue.task_done()
        finally:
            writer.close()

    tasks = [asyncio.create_task(lane()) for _ in range(lanes)]
    try:
        start = time.time() + 0.01
        total = int(rate * duration)
        for i in range(total):
            due = start + i / rate
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(due)
        await asyncio.wait_for(queue.join(), timeout=30)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


# --------------------------------------------------------------------------- blaster


class _Blast(asyncio.Protocol):
    """Keeps ``depth`` pipelined requests in flight; counts status lines. With
    ``make_request`` every request is made anew (a publish id of its own)."""

    def __init__(
        self,
        request: bytes,
        depth: int,
        stats: dict[str, int],
        make_request: Callable[[], bytes] | None = None,
    ) -> None:
        self.make_request = make_request
        self.request = request
        self.depth = depth
        self.stats = stats
        self.tail = b""
        self.transport: asyncio.Transport | None = None
        self.stopped = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.write(self._requests(self.depth))

    def _requests(self, count: int) -> bytes:
        make = self.make_request
        if make is None:
            return self.request * count
        return b"".join(make() for _ in range(count))

    def data_received(self, data: bytes) -> None:
        chunk = self.tail + data
        answers = chunk.count(b"HTTP/1.1 ")
        accepted = chunk.count(b"HTTP/1.1 202")
        self.tail = chunk[-11:]
        # a status line cut by the chunk boundary is counted with the next chunk
        answers -= self.tail.count(b"HTTP/1.1 ")
        accepted -= self.tail.count(b"HTTP/1.1 202")
        self.stats["answers"] += answers
        self.stats["accepted"] += accepted
        if answers and not self.stopped and self.transport is not None:
            self.transport.write(self._requests(answers))


async def blast(
    targets: list[tuple[str, int]],
    *,
    connections: int,
    depth: int,
    duration: float,
    channel: str,
    api_key: str = DEV_API_KEY,
    ids: bool = False,
    path: str = "/v1/publish",
) -> dict[str, Any]:
    """Pipelined ``POST /v1/publish`` (or ``path``) for ``duration`` s; answers per second.
    ``ids``: every publish carries an id of its own (idempotent publishes)."""
    loop = asyncio.get_running_loop()
    stats = {"answers": 0, "accepted": 0}
    protocols: list[_Blast] = []
    body = json.dumps({"channel": channel, "event": "bench", "data": {"n": 1}}).encode()
    counter = itertools.count()
    for i in range(connections):
        host, port = targets[i % len(targets)]
        request = http_request(host, port, path, body, api_key)
        make = None
        if ids:

            def make(host: str = host, port: int = port) -> bytes:
                with_id = b'%s,"id":"b%d"}' % (body[:-1], next(counter))
                return http_request(host, port, path, with_id, api_key)

        proto = _Blast(request, depth, stats, make)
        await loop.create_connection(lambda p=proto: p, host, port)  # type: ignore[misc]
        protocols.append(proto)
    await asyncio.sleep(1.0)  # warm-up
    first, t0 = dict(stats), time.time()
    await asyncio.sleep(duration)
    last, t1 = dict(stats), time.time()
    for proto in protocols:
        proto.stopped = True
        if proto.transport is not None:
            proto.transport.close()
    span = t1 - t0
    return {
        "requests_per_s": round((last["answers"] - first["answers"]) / span),
        "accepted_per_s": round((last["accepted"] - first["accepted"]) / span),
        "connections": connections,
        "depth": depth,
        "ids": ids,
        "seconds": round(span, 2),
    }


# --------------------------------------------------------------------------- server stats


def proc_cpu_seconds(pids: Iterable[int]) -> float:
    """utime + stime of the live ``pids`` (loadtest.sysstats reads /proc)."""
    return sum(u.cpu_seconds for pid in pids if (u := proc_usage(pid)) is not None)


def proc_write_calls(pids: Iterable[int]) -> int:
    """write(2)-family system calls made so far by the live ``pids`` (``syscw`` of
    /proc/<pid>/io: write, writev and the like; not send(2)/sendto(2), which go around the
    file layer: this server's sends from C and socketify's are not counted); 0 where it
    cannot be read."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as io:
                for line in io:
                    if line.startswith("syscw:"):
                        total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total


def proc_rss_bytes(pids: Iterable[int]) -> int:
    """Resident memory of the live ``pids``."""
    return sum(u.rss_bytes for pid in pids if (u := proc_usage(pid)) is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description="bench load (used by bench.run)")
    parser.add_argument("--child", help="run a subscriber fleet from this plan (JSON)")
    args = parser.parse_args()
    if args.child:
        plan = FleetPlan(**json.loads(args.child))
        check_loopback(plan.host)
        import uvloop

        uvloop.run(_child(plan))


if __name__ == "__main__":
    main()
