"""``realtime-loadtest``: drive a PiggyBong Realtime server as the app and the backend do.

Exit codes: 0 every threshold held; 99 a threshold was breached; 2 the scenario
is invalid (nothing was started); 1 the run could not start or a worker failed;
130 interrupted (results are still written).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

from loadtest.config import ConfigError, Scenario, load_scenario
from loadtest.recovery import FAULTS, is_recovery, recovery_html, recovery_text, run_recovery
from loadtest.report import render_html
from loadtest.results import summary_text
from loadtest.runner import EXIT_ABORTED, EXIT_CONFIG, Aborted, Outcome, run
from loadtest.sysstats import pin_cpus
from loadtest.thresholds import DEFAULT_EXPRESSIONS, METRICS
from loadtest.worker import run_event_loop


def _default(field: str) -> str:
    """``(default: <value>)`` of a Scenario field, escaped for argparse's % formatting."""
    value = Scenario.model_fields[field].default
    if isinstance(value, list):
        value = ",".join(map(str, value)) or "none"
    elif value is None:
        value = "none"
    return f"(default: {value})".replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    """The command line: every option has a help line ending with its default (the
    Scenario's, which a --config file changes; secrets are named, never shown)."""
    p = argparse.ArgumentParser(
        prog="realtime-loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        argument_default=None,
    )
    add = p.add_argument
    add(
        "--config",
        type=Path,
        help="scenario file (.toml, .json, .yaml); flags override it (default: none)",
    )
    add(
        "--scenario",
        choices=("mixed", "broadcast", *FAULTS),
        help="mixed: the app's traffic; broadcast: S subscribers on one artist "
        "channel, R messages/s; drops, node-kill, redis-freeze, redis-kill: reconnect "
        "scenarios on nodes and a Redis the harness starts (docs/loadtest.md) "
        + _default("scenario"),
    )
    add("--target", help="server base URL, 127.0.0.0/8 only " + _default("target"))
    g = p.add_argument_group("clients")
    g.add_argument(
        "--clients",
        "--subscribers",
        dest="clients",
        type=int,
        metavar="N",
        help="WebSocket clients " + _default("clients"),
    )
    g.add_argument(
        "--connect-rate",
        type=float,
        metavar="PER_S",
        help="new connections per second, at most " + _default("connect_rate"),
    )
    g.add_argument(
        "--connect-timeout",
        metavar="DURATION",
        help="time for one connect and its handshake, e.g. 10s " + _default("connect_timeout"),
    )
    g.add_argument(
        "--paid",
        dest="paid_fraction",
        type=float,
        metavar="FRACTION",
        help="share of paid-tier clients " + _default("paid_fraction"),
    )
    g.add_argument(
        "--msgpack",
        dest="msgpack_fraction",
        type=float,
        metavar="FRACTION",
        help="share of msgpack clients " + _default("msgpack_fraction"),
    )
    g.add_argument(
        "--artists", type=int, metavar="N", help="artist channels in play " + _default("artists")
    )
    g.add_argument(
        "--artists-per-client",
        type=int,
        metavar="N",
        help="artist channels each client subscribes " + _default("artists_per_client"),
    )
    g.add_argument(
        "--stage",
        dest="stages",
        action="append",
        metavar="DURATION:CLIENTS[:RATE]",
        help="ramp stage like k6's, e.g. 30s:1000 (repeat) " + _default("stages"),
    )
    g = p.add_argument_group("publishing")
    g.add_argument(
        "--event-rate",
        "--rate",
        dest="event_rate",
        type=float,
        metavar="PER_S",
        help="artist events per second " + _default("event_rate"),
    )
    g.add_argument(
        "--spending-rate",
        type=float,
        metavar="PER_S",
        help="spending events per second " + _default("spending_rate"),
    )
    g.add_argument(
        "--notification-rate",
        type=float,
        metavar="PER_S",
        help="notifications per second " + _default("notification_rate"),
    )
    g.add_argument(
        "--premium-fraction",
        type=float,
        metavar="FRACTION",
        help="share of premium-only (market.*) events " + _default("premium_fraction"),
    )
    g.add_argument(
        "--payload-bytes",
        type=int,
        metavar="N",
        help="approximate size of an event's data " + _default("payload_bytes"),
    )
    g.add_argument(
        "--publish-lanes",
        type=int,
        metavar="N",
        help="concurrent HTTP publish connections " + _default("publish_lanes"),
    )
    g.add_argument(
        "--publish-batch",
        type=int,
        metavar="N",
        help="events per POST at most " + _default("publish_batch"),
    )
    g.add_argument(
        "--duration",
        metavar="DURATION",
        help="publishing time when no stages are given " + _default("duration"),
    )
    g.add_argument(
        "--drain", metavar="DURATION", help="wait after the last publish " + _default("drain")
    )
    g = p.add_argument_group("reconnect scenarios")
    g.add_argument(
        "--fault-at", metavar="DURATION", help="fault time into publishing " + _default("fault_at")
    )
    g.add_argument(
        "--fault-length",
        metavar="DURATION",
        help="Redis freeze or downtime, node downtime (default: 8s freeze, 2s Redis, 3s node)",
    )
    g.add_argument(
        "--drops-per-s",
        type=float,
        metavar="PER_S",
        help="sockets dropped per second (drops) " + _default("drops_per_s"),
    )
    g.add_argument(
        "--backend",
        choices=("redis", "memory"),
        help="drops: two nodes on Redis, or one in-process node " + _default("backend"),
    )
    g = p.add_argument_group("processes and credentials")
    g.add_argument(
        "--workers",
        metavar="N|auto",
        help="client processes; 0: this process " + _default("workers"),
    )
    g.add_argument(
        "--source-ips",
        type=int,
        metavar="N",
        help="use 127.0.0.1 .. 127.0.0.N as source addresses (default: the kernel's choice)",
    )
    g.add_argument(
        "--source-address",
        dest="source_addresses",
        action="append",
        metavar="IP",
        help="a source address for client connections (repeat) " + _default("source_addresses"),
    )
    g.add_argument(
        "--cpus",
        metavar="LIST",
        help="pin the harness to CPUs, e.g. 1 or 0,1 (default: no pinning)",
    )
    g.add_argument(
        "--jwt-secret",
        default=os.environ.get("REALTIME_JWT_SECRET") or None,
        help="HS256 secret to mint client tokens (default: $REALTIME_JWT_SECRET, "
        "else the dev secret)",
    )
    g.add_argument(
        "--api-key",
        default=_first_key(os.environ.get("REALTIME_API_KEYS", "")),
        help="API key to publish with (default: the first of $REALTIME_API_KEYS, else the dev key)",
    )
    g.add_argument("--audience", help="aud claim of client tokens " + _default("audience"))
    g.add_argument("--seed", type=int, help="random seed of the run " + _default("seed"))
    g = p.add_argument_group("measurement and output")
    g.add_argument(
        "--threshold",
        dest="thresholds",
        action="append",
        metavar="EXPR",
        # argparse formats help with %: the defaults' "0.1%" must be escaped.
        help="e.g. 'p95<150' (repeat) (default: "
        + ", ".join(DEFAULT_EXPRESSIONS).replace("%", "%%")
        + ")",
    )
    g.add_argument(
        "--no-default-thresholds",
        dest="default_thresholds",
        action="store_const",
        const=False,
        help="drop the default thresholds, keep only --threshold's (default: kept)",
    )
    g.add_argument(
        "--server-pid",
        action="append",
        metavar="PID|auto",
        help="read the server's CPU and memory from /proc (repeat) " + _default("server_pid"),
    )
    g.add_argument(
        "--no-server-metrics",
        dest="server_metrics",
        action="store_const",
        const=False,
        help="do not scrape /metrics for process_* figures (default: scraped)",
    )
    g.add_argument(
        "--sample-interval",
        metavar="DURATION",
        help="time between samples of the server's figures " + _default("sample_interval"),
    )
    g.add_argument(
        "--out", type=Path, metavar="FILE", help="write results as JSON " + _default("out")
    )
    g.add_argument(
        "--html", type=Path, metavar="FILE", help="write an HTML report " + _default("html")
    )
    g.add_argument(
        "--progress",
        choices=("auto", "line", "off"),
        help="progress display; auto: a live line on a terminal " + _default("progress"),
    )
    g.add_argument("--quiet", action="store_true", help="no progress line (default: off)")
    g.add_argument(
        "--list-metrics",
        action="store_true",
        help="list threshold metrics and exit (default: off)",
    )
    return p


def _first_key(keys: str) -> str | None:
    return next((k.strip() for k in keys.split(",") if k.strip()), None)


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario fields from the flags that were given (None: not given)."""
    values = {k: v for k, v in vars(args).items() if k not in _NOT_FIELDS}
    if args.source_ips:
        values["source_addresses"] = [f"127.0.0.{i}" for i in range(1, args.source_ips + 1)]
    if args.quiet:
        values["progress"] = "off"
    pids = args.server_pid
    if pids:
        values["server_pid"] = "auto" if pids == ["auto"] else pids
    workers = args.workers
    if workers is not None and workers != "auto":
        values["workers"] = int(workers) if workers.isdigit() else workers
    return values


_NOT_FIELDS = frozenset({"config", "source_ips", "quiet", "list_metrics"})


def run_reconnect(scenario: Scenario) -> int:
    """A reconnect scenario: run it, write its outputs, print its summary; the exit code."""
    try:
        results = run_event_loop(run_recovery(scenario))
    except (RuntimeError, TimeoutError, OSError) as exc:  # servers or clients never came up
        print(f"realtime-loadtest: aborted: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_ABORTED
    if scenario.out is not None:
        scenario.out.write_text(json.dumps(results, indent=2) + "\n")
    if scenario.html is not None:
        scenario.html.write_text(recovery_html(results))
    print(recovery_text(results))
    code: int = results["exit_code"]
    return code


def write_outputs(scenario: Scenario, outcome: Outcome) -> None:
    if scenario.out is not None:
        scenario.out.write_text(json.dumps(outcome.results, indent=2) + "\n")
    if scenario.html is not None:
        scenario.html.write_text(render_html(outcome.results))


async def _run(scenario: Scenario) -> Outcome | Aborted:
    loop = asyncio.get_running_loop()
    interrupt = asyncio.Event()

    def on_sigint() -> None:
        sys.stderr.write("\nstopping: finishing the run (Ctrl-C again to abort)\n")
        interrupt.set()
        loop.remove_signal_handler(signal.SIGINT)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        return await run(scenario, interrupt=interrupt)
    finally:
        loop.remove_signal_handler(signal.SIGINT)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_metrics:
        for name, (kind, meaning) in sorted(METRICS.items()):
            print(f"{name:<24} {kind:<8} {meaning}")
        return 0
    scenario = load_scenario(args.config, overrides(args))
    if isinstance(scenario, ConfigError):
        print(f"realtime-loadtest: {scenario}", file=sys.stderr)
        return EXIT_CONFIG
    pin_cpus(scenario.cpus)  # worker processes pin themselves
    if is_recovery(scenario):
        return run_reconnect(scenario)
    outcome = run_event_loop(_run(scenario))
    if isinstance(outcome, Aborted):
        print(f"realtime-loadtest: aborted: {outcome.reason}", file=sys.stderr)
        return outcome.exit_code
    write_outputs(scenario, outcome)
    print(summary_text(outcome.results))
    return outcome.exit_code


if __name__ == "__main__":
    sys.exit(main())
