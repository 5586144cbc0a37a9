"""What an idle connection holds: tracemalloc and a type census of one server process.

``python -m bench.memprobe [--clients N] [--frames F] [--redis]`` starts one server
process (``python -m bench.memprobe --serve ...``: ``realtime serve`` with tracemalloc
on and a SIGUSR1 handler that writes a snapshot and a census), opens 100 warm-up
connections, snapshots, opens N idle ones (connected, subscribed to an artist channel
whose history holds 1,000 publications, as ``bench.run``'s ``idle``), snapshots again, and
prints per connection: the allocations that grew, grouped by their innermost frame in
this project or its libraries and by the line that made them, and the objects that grew,
by type (``sys.getsizeof``, each object counted once, containers and their contents).

tracemalloc's own bookkeeping inflates the process's RSS: use ``bench.run``'s figure for
RSS (this prints RSS too, for what it is worth).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pickle
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Frames under these paths are "ours or our libraries'"; the innermost one names a block.
_KEEP = ("/realtime/", "/uvicorn/", "/websockets/", "/starlette/", "/asyncio/", "/uvloop/")


def _census() -> dict[str, list[int]]:
    """type name -> [objects, bytes] of every object the collector tracks and of the
    untracked ones they refer to (strings, bytes, numbers), each object once."""
    gc.unfreeze()  # the node freezes what lives long (realtime/gcfreeze.py); see it all
    gc.collect()
    seen: set[int] = set()
    out: dict[str, list[int]] = {}
    tracked = gc.get_objects()
    for obj in tracked:
        seen.add(id(obj))
    todo = list(tracked)
    for obj in todo:
        name = type(obj).__qualname__
        row = out.setdefault(name, [0, 0])
        row[0] += 1
        row[1] += sys.getsizeof(obj)
    for obj in tracked:
        for ref in gc.get_referents(obj):
            if id(ref) in seen or gc.is_tracked(ref):
                continue
            seen.add(id(ref))
            name = type(ref).__qualname__
            row = out.setdefault(name, [0, 0])
            row[0] += 1
            row[1] += sys.getsizeof(ref)
    return out


def _coro_self(coro: Any) -> Any:
    frame = getattr(coro, "cr_frame", None)
    return frame.f_locals.get("self") if frame is not None else None


def _anatomy() -> dict[str, Any]:
    """The parts of one idle connection, with their own sizes (``sys.getsizeof``)."""
    from realtime.connection import Connection

    conns = [o for o in gc.get_objects() if type(o) is Connection and o.subscriptions]
    if not conns:
        return {}
    c = conns[-1]
    wire = c.wire
    size = sys.getsizeof
    out: dict[str, Any] = {
        "Connection": size(c),
        "Connection.subscriptions": size(c.subscriptions),
        "Connection.conn_id": size(c.conn_id),
        "Connection.batcher": size(c.batcher) + size(getattr(c.batcher, "_batches", None)),
        "Writer": size(c.writer),
        "Writer.pending": size(c.writer.pending),
        "wire": size(wire),
        "wire attributes": sorted(vars(wire)),
        "wire.__dict__": size(vars(wire)),
        "wire.conn": size(wire.conn),
        "wire.conn attributes": sorted(vars(wire.conn)),
        "wire.conn.__dict__": size(vars(wire.conn)),
        "wire.conn.reader": size(wire.conn.reader)
        + size(vars(wire.conn.reader))
        + size(wire.conn.reader.buffer),
        "wire.conn.parser": size(wire.conn.parser),
        "wire.scope": {k: size(v) for k, v in wire.scope.items()} | {"(dict)": size(wire.scope)},
        "wire.queue": size(wire.queue),
        "wire.writable": size(wire.writable),
        "wire.frames": size(wire.frames),
        "wire.transport": size(wire.transport),
    }
    tasks = [t for t in wire.tasks if _coro_self(t.get_coro()) is wire]
    if tasks:
        chain = []
        coro: Any = tasks[0].get_coro()
        while coro is not None and hasattr(coro, "cr_frame"):
            chain.append((coro.__qualname__, size(coro)))
            coro = coro.cr_await
        chain.append((type(coro).__name__, size(coro)))
        out["task"] = size(tasks[0])
        out["coroutines"] = chain
    return out


def _dump(signum: int, frame: Any) -> None:
    base = os.environ["MEMPROBE_OUT"]
    n = int(os.environ.get("MEMPROBE_N", "0")) + 1
    os.environ["MEMPROBE_N"] = str(n)
    census = _census()
    Path(f"{base}.{n}.anatomy").write_text(json.dumps(_anatomy(), indent=1))
    tracemalloc.take_snapshot().dump(f"{base}.{n}.snap")
    with open(f"{base}.{n}.census", "wb") as f:
        pickle.dump(census, f)
    Path(f"{base}.{n}.done").touch()


def serve(argv: list[str]) -> None:
    frames = int(os.environ.get("MEMPROBE_FRAMES", "30"))
    signal.signal(signal.SIGUSR2, lambda signum, frame: tracemalloc.start(frames))
    signal.signal(signal.SIGUSR1, _dump)
    from realtime.cli import main

    sys.argv = ["realtime", "serve", *argv]
    sys.exit(main())


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _where(tb: tracemalloc.Traceback) -> tuple[str, str]:
    """(innermost frame of ours or a library's, the allocating line)."""
    alloc = f"{tb[-1].filename.rsplit('/', 2)[-1]}:{tb[-1].lineno}"
    for fr in reversed(tb):  # most recent first
        if any(k in fr.filename for k in _KEEP):
            name = fr.filename.split("/site-packages/")[-1].split(str(ROOT) + "/")[-1]
            return f"{name}:{fr.lineno}", alloc
    return "?", alloc


async def probe(clients: int, frames: int, redis: bool, top: int) -> dict[str, Any]:
    from bench.loadgen import RemoteFleet, publish
    from bench.run import HOST, LOAD_DOOR, free_port, plan, start_redis

    port = free_port()
    out_base = tempfile.mktemp(prefix="memprobe-")
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEMPROBE_OUT=out_base, MEMPROBE_FRAMES=str(frames))
    args = ["--port", str(port), "--log-level", "warning", "--outbox-max-messages", "1000",
            *LOAD_DOOR]  # fmt: skip
    redis_proc = None
    if redis:
        redis_proc, url = start_redis(None)
        args += ["--redis-url", url]
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.memprobe", "--serve", *args, cwd=ROOT, env=env
    )
    try:
        for _ in range(200):
            try:
                _, w = await asyncio.open_connection(HOST, port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        sent = await publish(HOST, port, "artist:idle", 500, 2.0, batch=100)
        assert sent.accepted == 1000, sent
        server.send_signal(signal.SIGUSR2)  # tracing from here on (slow)
        warm = RemoteFleet(plan(port, 100, "artist:warm", first=900_000))
        await warm.start()
        await warm.ready()
        await asyncio.sleep(1.0)

        def snap(n: int) -> tuple[tracemalloc.Snapshot, dict[str, list[int]], int]:
            rss = _rss(server.pid)
            server.send_signal(signal.SIGUSR1)
            while not Path(f"{out_base}.{n}.done").exists():
                time.sleep(0.2)
            with open(f"{out_base}.{n}.census", "rb") as f:
                census = pickle.load(f)
            print(Path(f"{out_base}.{n}.anatomy").read_text())
            return tracemalloc.Snapshot.load(f"{out_base}.{n}.snap"), census, rss

        s0, c0, rss0 = await asyncio.to_thread(snap, 1)
        idle = RemoteFleet(plan(port, clients, "artist:idle"))
        await idle.start()
        connected, failed = await idle.ready()
        await asyncio.sleep(2.0)
        s1, c1, rss1 = await asyncio.to_thread(snap, 2)
        await idle.close()
        await warm.close()
    finally:
        server.terminate()
        await server.wait()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait()
        for p in Path(out_base).parent.glob(Path(out_base).name + ".*"):
            p.unlink()
    n = max(connected, 1)
    by_site: Counter[tuple[str, str]] = Counter()
    by_count: Counter[tuple[str, str]] = Counter()
    for stat in s1.compare_to(s0, "traceback"):
        key = _where(stat.traceback)
        by_site[key] += stat.size_diff
        by_count[key] += stat.count_diff
    types = {
        name: (c1[name][0] - c0.get(name, [0, 0])[0], c1[name][1] - c0.get(name, [0, 0])[1])
        for name in c1
    }
    return {
        "connected": connected,
        "failed": failed,
        "rss_kib_per_connection": round((rss1 - rss0) / 1024 / n, 2),
        "traced_bytes_per_connection": round(sum(by_site.values()) / n, 1),
        "sites": [
            (site, alloc, round(size / n, 1), round(by_count[(site, alloc)] / n, 2))
            for (site, alloc), size in by_site.most_common(top)
        ],
        "types": sorted(
            ((name, round(c / n, 2), round(b / n, 1)) for name, (c, b) in types.items() if b),
            key=lambda r: -r[2],
        )[:top],
        "census_bytes_per_connection": round(sum(b for _, b in types.values()) / n, 1),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--redis", action="store_true")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--json", help="also write the result to this file")
    a = ap.parse_args()
    t0 = time.time()
    res = asyncio.run(probe(a.clients, a.frames, a.redis, a.top))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print(f"{res['connected']} idle connections ({res['failed']} failed), {time.time() - t0:.0f} s")
    print(f"RSS (tracemalloc on): {res['rss_kib_per_connection']} KiB per connection")
    print(f"traced: {res['traced_bytes_per_connection']} B per connection; census "
          f"{res['census_bytes_per_connection']} B")  # fmt: skip
    print("\nbytes  blocks  where (innermost frame of ours/libraries)  <- allocating line")
    for site, alloc, size, count in res["sites"]:
        print(f"{size:7.1f} {count:6.2f}  {site}  <- {alloc}")
    print("\nobjects  bytes  type")
    for name, count, size in res["types"]:
        print(f"{count:7.2f} {size:7.1f}  {name}")


if __name__ == "__main__":
    main()
