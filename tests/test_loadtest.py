"""The load-test harness: its pieces with plain data, its client against a real
WebSocket server, and short runs against the real server."""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from loadtest import cli
from loadtest.accounting import PublishLog, Receipt, account, notify_key
from loadtest.clients import Fleet, profile
from loadtest.config import ConfigError, Scenario, auto_workers, load_scenario, parse_duration
from loadtest.http import HttpConnection, HttpFailure, HttpResponse
from loadtest.report import latency_curves, percentile_from_pairs, render_html, tier_batch_rows
from loadtest.results import MAIN, Aggregate, Phases, build_results, metrics, summary_text
from loadtest.runner import Outcome, plan_sources, run
from loadtest.stats import Histogram, bucket_bounds, bucket_index, exact_percentile, summarize
from loadtest.sysstats import Usage, parse_process_metrics
from loadtest.thresholds import (
    Threshold,
    ThresholdSyntaxError,
    effective,
    evaluate,
    parse_threshold,
)
from loadtest.wsclient import ABNORMAL, OP_BINARY, OP_TEXT, WSClient, accept_key
from tests.server import ROOT, ServerProcess, free_port, running_server

# ------------------------------------------------------------------ statistics


def test_every_value_falls_inside_its_bucket() -> None:
    rng = random.Random(7)
    values = list(range(300)) + [rng.randrange(1, 10**9) for _ in range(5000)]
    for value in values:
        low, high = bucket_bounds(bucket_index(value))
        assert low <= value <= high
        assert high - low <= max(value // 128, 0)  # <= 1/128 relative width


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_percentiles_are_within_one_percent_of_the_exact_ones(seed: int) -> None:
    rng = random.Random(seed)
    values = [int(rng.lognormvariate(8, 1.5)) for _ in range(20_000)]
    hist = Histogram()
    for v in values:
        hist.record(v)
    for p in (1, 50, 90, 95, 99, 99.9, 100):
        exact = exact_percentile(values, p)
        got = hist.percentile(p)
        assert got is not None
        assert abs(got - exact) <= max(exact * 0.01, 1), (p, got, exact)
    assert hist.percentile(100) == max(values)
    assert hist.count == len(values)
    assert hist.min == min(values)


def test_merged_histograms_equal_one_histogram_of_everything() -> None:
    rng = random.Random(11)
    parts = [[rng.randrange(0, 5_000_000) for _ in range(1000)] for _ in range(4)]
    whole = Histogram()
    merged = Histogram()
    for part in parts:
        h = Histogram()
        for v in part:
            h.record(v)
            whole.record(v)
        merged.merge(Histogram.from_state(json.loads(json.dumps(h.to_state()))))
    assert merged.buckets == whole.buckets
    assert (merged.count, merged.min, merged.max, merged.total) == (
        whole.count,
        whole.min,
        whole.max,
        whole.total,
    )


def test_empty_histogram_has_no_percentiles_and_bad_percentiles_are_refused() -> None:
    hist = Histogram()
    assert hist.percentile(50) is None
    assert summarize(hist).p95 is None
    with pytest.raises(ValueError):
        hist.percentile(0)
    hist.record(1500)
    assert summarize(hist).p50 == pytest.approx(1.5, rel=0.01)


# ------------------------------------------------------------------ thresholds


@pytest.mark.parametrize(
    ("text", "metric", "op", "value"),
    [
        ("p95<150", "p95", "<", 150.0),
        ("p(99) <= 250ms", "p99", "<=", 250.0),
        ("p(99.9)<1s", "p999", "<", 1000.0),
        ("event_p95<200", "p95", "<", 200.0),
        ("batch_p95 < 2.5s", "batch_p95", "<", 2500.0),
        ("avg<10", "mean", "<", 10.0),
        ("connect_p99<500us", "connect_p99", "<", 0.5),
        ("error_rate<0.1%", "error_rate", "<", 0.001),
        ("error_rate<0.01", "error_rate", "<", 0.01),
        ("lost==0", "lost", "==", 0.0),
        ("deliveries_per_s>=50000", "deliveries_per_s", ">=", 50000.0),
    ],
)
def test_threshold_parsing(text: str, metric: str, op: str, value: float) -> None:
    parsed = parse_threshold(text)
    assert isinstance(parsed, Threshold), parsed
    assert (parsed.metric, parsed.op) == (metric, op)
    assert parsed.value == pytest.approx(value)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("p95", "expected"),
        ("p95 = 3", "expected"),
        ("latency<3", "unknown metric"),
        ("lost<5ms", "unit"),
        ("p95<5%", "unit"),
        ("error_rate<150%", "fraction"),
    ],
)
def test_bad_thresholds_say_why(text: str, reason: str) -> None:
    parsed = parse_threshold(text)
    assert isinstance(parsed, ThresholdSyntaxError)
    assert reason in parsed.reason


def _thresholds(*texts: str) -> list[Threshold]:
    out = [parse_threshold(t) for t in texts]
    assert all(isinstance(t, Threshold) for t in out)
    return [t for t in out if isinstance(t, Threshold)]


def test_user_thresholds_replace_the_default_of_the_same_metric() -> None:
    chosen = effective(_thresholds("p95<150", "p99<300"))
    by_metric = {t.metric: t.value for t in chosen}
    assert by_metric == {"p95": 150.0, "p99": 300.0, "error_rate": 0.001, "lost": 0.0}
    assert effective(_thresholds("p99<300"), use_defaults=False) == _thresholds("p99<300")


def test_threshold_evaluation() -> None:
    rules = _thresholds("p95<200", "lost==0", "error_rate<0.1%", "batch_p95<3s")
    verdicts = evaluate(rules, {"p95": 199.9, "lost": 3, "error_rate": 0.0, "batch_p95": None})
    assert [v.status for v in verdicts] == ["pass", "fail", "pass", "no data"]
    assert [v.breached for v in verdicts] == [False, True, False, False]


# ------------------------------------------------------------------ loss accounting


def _log_of(key: str, times: list[float], premium: set[int], rejected: set[int]) -> PublishLog:
    log = PublishLog()
    for i, t in enumerate(times, start=1):
        seq = log.append(key, t, premium=i in premium)
        log.settle(key, seq, accepted=i not in rejected)
    return log


def _receipt(opened: float, seqs: list[int], closed: float = math.inf) -> Receipt:
    receipt = Receipt()
    receipt.opened = opened
    receipt.closed = closed
    receipt.seqs.extend(seqs)
    return receipt


def test_owed_events_follow_window_tier_and_acceptance() -> None:
    # events 1..10 sent at t = 1..10; 4 and 8 premium; 6 rejected by the server
    log = _log_of("artist:a", [float(t) for t in range(1, 11)], premium={4, 8}, rejected={6})
    paid = _receipt(2.5, [3, 4, 5, 7, 8, 9, 10])  # owed 3,4,5,7,8,9,10 (6 rejected)
    free = _receipt(2.5, [3, 5, 7, 9])  # owed 3,5,7,9,10 (not 4, 8): 10 is lost
    loss = account(
        log,
        [("u1", "artist:a", paid, True), ("u2", "artist:a", free, False)],
        published_until=100.0,
    )
    assert (loss.expected, loss.delivered, loss.lost) == (7 + 5, 7 + 4, 1)
    assert [(m.client, m.seq) for m in loss.samples] == [("u2", 10)]
    assert loss.premium_leaks == loss.duplicates == loss.out_of_order == 0


def test_early_arrivals_duplicates_disorder_leaks_and_strangers() -> None:
    log = _log_of("artist:a", [1.0, 2.0, 3.0, 4.0, 5.0], premium={5}, rejected=set())
    # free client entitled from t=2.5 (owed 3, 4); got 2 early, 4 twice, 3 after 4,
    # premium 5 (a leak) and 9 (never sent)
    receipt = _receipt(2.5, [2, 4, 4, 3, 5, 9])
    loss = account(log, [("u", "artist:a", receipt, False)], published_until=100.0)
    assert (loss.expected, loss.delivered, loss.lost) == (2, 2, 0)
    assert loss.extra == 1  # seq 2: sent before the subscription was confirmed
    assert loss.duplicates == 1
    assert loss.out_of_order == 1  # 3 after 4 (4 after 4 is a duplicate)
    assert loss.premium_leaks == 1
    assert loss.unknown == 1


def test_the_window_ends_at_the_close_or_at_the_end_of_publishing() -> None:
    log = _log_of("user:u", [1.0, 2.0, 3.0, 4.0], premium=set(), rejected=set())
    closed = _receipt(0.0, [1, 2], closed=2.0)
    still_open = _receipt(0.0, [1, 2, 3])
    loss = account(
        log,
        [("a", "user:u", closed, True), ("b", "user:u", still_open, True)],
        published_until=3.0,
    )
    assert (loss.expected, loss.delivered, loss.lost) == (2 + 3, 5, 0)


def test_notifications_are_not_checked_for_order_and_unknown_keys_are_strangers() -> None:
    key = notify_key("u")
    log = _log_of(key, [1.0, 2.0, 3.0], premium=set(), rejected=set())
    loss = account(
        log,
        [("u", key, _receipt(0.0, [3, 1, 2]), False), ("u", "artist:zz", _receipt(0.0, [1]), True)],
        published_until=10.0,
    )
    assert (loss.expected, loss.delivered, loss.out_of_order, loss.unknown) == (3, 3, 0, 1)


def test_a_client_never_entitled_is_owed_nothing() -> None:
    log = _log_of("artist:a", [1.0, 2.0], premium=set(), rejected=set())
    loss = account(log, [("u", "artist:a", _receipt(math.inf, [1]), True)], published_until=9.0)
    assert (loss.expected, loss.delivered, loss.extra) == (0, 0, 1)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        ("http://10.0.0.1:8000", "only 127.0.0.0/8"),
        ("http://example.com", "only 127.0.0.0/8"),
        ("http://[::1]:8000", "only 127.0.0.0/8"),
        ("http://0.0.0.0:8000", "only 127.0.0.0/8"),
        ("https://127.0.0.1:8443", "scheme"),
        ("http://127.0.0.1:8000/v1/ws", "without a path"),
    ],
)
def test_targets_outside_loopback_are_refused(target: str, problem: str) -> None:
    result = load_scenario(overrides={"target": target})
    assert isinstance(result, ConfigError)
    assert problem in str(result)


def test_loopback_targets_are_normalized() -> None:
    for given, want in [
        ("localhost:9000", "http://localhost:9000"),
        ("ws://127.0.0.5:81", "http://127.0.0.5:81"),
        ("http://127.0.0.1", "http://127.0.0.1:80"),
    ]:
        scenario = load_scenario(overrides={"target": given})
        assert isinstance(scenario, Scenario), scenario
        assert scenario.target == want
    scenario = load_scenario(overrides={"target": "localhost:9000"})
    assert isinstance(scenario, Scenario)
    assert scenario.ws_url == "ws://localhost:9000/v1/ws"


def test_every_problem_is_listed_at_once() -> None:
    result = load_scenario(
        overrides={
            "clients": 0,
            "paid_fraction": 1.5,
            "thresholds": ["p95<1", "nonsense<1"],
            "source_addresses": ["192.168.1.2"],
            "colour": "blue",
        }
    )
    assert isinstance(result, ConfigError)
    text = str(result)
    for fragment in ("clients", "paid_fraction", "nonsense", "192.168.1.2", "colour"):
        assert fragment in text, text


def test_stages_and_durations() -> None:
    scenario = load_scenario(
        overrides={"stages": ["10s:100", {"duration": "1m", "clients": 300, "event_rate": 50}]}
    )
    assert isinstance(scenario, Scenario), scenario
    assert scenario.peak_clients == 300
    assert scenario.stage_seconds == 70.0
    assert [scenario.target_at(t) for t in (0, 5, 10, 40, 70, 99)] == [0, 50, 100, 200, 300, 300]
    assert scenario.event_rate_at(40) == pytest.approx(20 + 30 / 2)
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2h") == 7200.0
    bad = load_scenario(overrides={"stages": ["soon:10"]})
    assert isinstance(bad, ConfigError)
    assert "duration" in str(bad)
    peak = load_scenario(overrides={"stages": ["5s:100"], "clients": 10})
    assert isinstance(peak, ConfigError)
    assert "below the stages' peak" in str(peak)


def test_scenario_files(tmp_path: Path) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text(
        'scenario = "broadcast"\nclients = 40\nevent_rate = 7\n'
        '[thresholds]\np95 = "<150"\nerror_rate = "<1%"\n'
    )
    scenario = load_scenario(toml, {"clients": 41})
    assert isinstance(scenario, Scenario), scenario
    assert (scenario.clients, scenario.event_rate, scenario.artists) == (41, 7.0, 1)
    assert (scenario.spending_rate, scenario.notification_rate) == (0.0, 0.0)
    assert sorted(t.metric for t in scenario.threshold_list) == ["error_rate", "p95"]
    broken = tmp_path / "s.json"
    broken.write_text('{"clients": 10,')
    assert isinstance(load_scenario(broken), ConfigError)
    listy = tmp_path / "l.json"
    listy.write_text("[1, 2]")
    assert "top level" in str(load_scenario(listy))
    clash = tmp_path / "c.json"
    clash.write_text('{"scenario": "broadcast", "artists": 5}')
    assert "broadcast scenario uses artists=1" in str(load_scenario(clash))
    missing = load_scenario(tmp_path / "nope.toml")
    assert isinstance(missing, ConfigError)


def test_workers_and_source_addresses_are_planned() -> None:
    small = Scenario(clients=500)
    assert auto_workers(small) == 0
    assert auto_workers(Scenario(clients=25_000)) == 3
    assert auto_workers(Scenario(clients=25_000, workers=1)) == 1
    planned = plan_sources(Scenario(clients=60_000), ports=28_000)
    assert isinstance(planned, Scenario)
    assert planned.source_addresses == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    refused = plan_sources(Scenario(clients=60_000, source_addresses=["127.0.0.1"]), 28_000)
    assert not isinstance(refused, Scenario)
    assert "source addresses" in refused.reason


def test_worker_shares_cover_every_client_once() -> None:
    scenario = Scenario(clients=1003)
    for workers in (1, 2, 3, 7):
        fleets = [Fleet(scenario, "r", w, workers) for w in range(workers)]
        for total in (0, 1, 2, 6, 7, 500, 1003):
            assert sum(f.my_target(total) for f in fleets) == total
        indices = sorted(f.slot_index(slot) for f in fleets for slot in range(f.my_peak))
        assert indices == list(range(1003))


def test_profiles_follow_the_seed_and_the_mix() -> None:
    scenario = Scenario(clients=4000, paid_fraction=0.25, msgpack_fraction=0.5, seed=3)
    profiles = [profile(scenario, "r", i) for i in range(4000)]
    assert profiles == [profile(scenario, "r", i) for i in range(4000)]  # any process agrees
    assert sum(p.paid for p in profiles) / 4000 == pytest.approx(0.25, abs=0.03)
    assert sum(p.msgpack for p in profiles) / 4000 == pytest.approx(0.5, abs=0.03)
    assert all(len(set(p.artists)) == 3 for p in profiles)
    assert len({a for p in profiles for a in p.artists}) == scenario.artists
    other_seed = [profile(scenario.model_copy(update={"seed": 4}), "r", i) for i in range(50)]
    assert other_seed != profiles[:50]


def test_cli_refuses_bad_configuration_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code = cli.main(["--target", "http://192.0.2.1:8000", "--threshold", "p95<<3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "192.0.2.1" in err
    assert "p95<<3" in err


def test_cli_lists_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--list-metrics"]) == 0
    out = capsys.readouterr().out
    assert "batch_p99" in out
    assert "error_rate" in out


# ------------------------------------------------------------------ results and report


def _tick(t: float, **counts: int) -> dict[str, Any]:
    hist = Histogram()
    for ms in (2, 3, 4, 250):
        hist.record(ms * 1000)
    return {
        "t": t,
        "counts": {"deliveries": 0, **counts},
        "hists": {"event": hist.to_state()},
        "gauges": {"open": 10, "subscribed": 10, "failed": 0},
        "cpu": t - 999.0,
        "lag": 0.001,
    }


def test_results_document_summary_and_report() -> None:
    agg = Aggregate(1000.0)
    agg.add(0, _tick(1000.5, ops=20, connects=10, attempts=10))
    agg.add(0, _tick(1001.5, ops=5, errors=1, **{"error:close:4008": 1, "close:4008": 1}))
    agg.add(MAIN, {"t": 1001.6, "counts": {"published": 4, "publish_accepted": 4, "ops": 4}})
    agg.add_server(1000.2, Usage(10.0, 50 * 2**20))
    agg.add_server(1002.2, Usage(10.5, 60 * 2**20))
    from loadtest.accounting import Loss

    loss = Loss(expected=8, delivered=8)
    phases = Phases(1000.0, 1000.2, 1002.0, 1002.2, 1000.1)
    flat = metrics(agg, loss, phases)
    assert flat["error_rate"] == pytest.approx(1 / 29)
    assert flat["deliveries_per_s"] == pytest.approx(8 / 1.8)
    assert flat["p99"] == pytest.approx(250, rel=0.01)
    assert flat["server_cpu_percent"] == pytest.approx(25.0)
    verdicts = evaluate(effective([]), flat)
    results = build_results(
        Scenario(clients=10),
        "abc123",
        agg,
        loss=loss,
        phases=phases,
        verdicts=verdicts,
        workers=0,
        server_source="proc",
        exit_code=99,
    )
    text = json.dumps(results)
    assert "dev-api-key" not in text  # credentials stay out of results
    assert results["passed"] is False
    assert results["connections"]["closed_by_server"] == {"4008": 1}
    assert results["server"]["deliveries_per_cpu_second"] == 16
    assert [row["t"] for row in results["timeseries"]] == [0, 1, 2]
    summary = summary_text(results)
    assert "THRESHOLDS BREACHED" in summary
    assert "FAIL error_rate<0.1%" in summary
    page = render_html(results)
    assert page.count("<svg") >= 5
    assert "error_rate&lt;0.1%" in page
    for fetched in ("<script", "<link", "src=", "url("):  # self-contained: nothing fetched
        assert fetched not in page
    assert percentile_from_pairs(results["histograms"]["event"], 50) == pytest.approx(3.0, 0.01)
    assert 'width="100%"' in page  # the charts use the page's width


def test_the_report_shows_batch_latency_by_tier() -> None:
    """The free tier's 2 s window does not hide the paid tier's 250 ms: one row and one curve
    per tier."""
    results = {
        "histograms": {
            "event": [[3000, 10]],
            "batch": [[250_000, 9], [2_000_000, 9]],
            "batch_paid": [[250_000, 9]],
            "batch_free": [[2_000_000, 9]],
        }
    }
    chart = latency_curves(results)
    assert "batch, paid tier" in chart and "batch, free tier" in chart
    assert ">batch<" not in chart  # the combined curve is left out when the split exists
    rows = tier_batch_rows(results["histograms"])
    assert rows["batch, paid tier"]["p95"] == 250.0
    assert rows["batch, free tier"]["p95"] == 2000.0
    assert "batch<" in latency_curves({"histograms": {"batch": [[250_000, 1]]}})


def test_process_metrics_parsing() -> None:
    text = (
        "# HELP process_cpu_seconds_total Total user and system CPU time.\n"
        "# TYPE process_cpu_seconds_total counter\n"
        "process_cpu_seconds_total 12.5\n"
        "process_resident_memory_bytes 1.048576e+08\n"
        'realtime_x{pid="1"} 3\n'
    )
    usage = parse_process_metrics(text)
    assert usage == Usage(12.5, 104857600)
    assert parse_process_metrics("realtime_up 1\n") is None


# ------------------------------------------------------------------ the HTTP client


@pytest.mark.timeout(20)
async def test_http_connection_takes_turns_and_reads_chunked_bodies() -> None:
    """Concurrent callers share one keep-alive connection without mixing answers."""
    connections = 0

    async def serve_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                path = head.split(b" ")[1].decode()
                await asyncio.sleep(0.01)  # slow enough for callers to overlap
                if path == "/chunked":
                    body = b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
                else:
                    answer = path.encode()
                    writer.write(
                        b"HTTP/1.1 202 Accepted\r\nContent-Length: %d\r\n\r\n" % len(answer)
                    )
                    writer.write(answer)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed its side
        finally:
            writer.close()

    server = await asyncio.start_server(serve_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = HttpConnection("127.0.0.1", port, timeout=5.0)
    try:
        answers = await asyncio.gather(*(conn.request("GET", f"/{i}") for i in range(8)))
        chunked = await conn.request("GET", "/chunked")
    finally:
        await conn.close()
        server.close()
        await server.wait_closed()
    assert [(a.status, a.body) for a in answers if isinstance(a, HttpResponse)] == [
        (202, f"/{i}".encode()) for i in range(8)
    ]
    assert isinstance(chunked, HttpResponse)
    assert chunked.body == b"abcde"
    assert connections == 1
    refused = await HttpConnection("127.0.0.1", free_port(), timeout=2.0).request("GET", "/")
    assert isinstance(refused, HttpFailure)
    assert refused.kind == "refused"


# ------------------------------------------------------------------ the WebSocket client


def test_accept_key_is_rfc_6455s() -> None:
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


class _Recorder(WSClient):
    def __init__(self, subprotocol: str | None) -> None:
        super().__init__("127.0.0.1", "/v1/ws", subprotocol)
        self.messages: list[tuple[bytes, bool]] = []
        self.opened: str | None = None
        self.refused: str | None = None
        self.closed: tuple[int, str, bool] | None = None
        self.done = asyncio.Event()
        self.is_open = asyncio.Event()

    def on_open(self, subprotocol: str | None) -> None:
        self.opened = subprotocol or "(none)"
        self.is_open.set()

    def on_message(self, payload: bytes, binary: bool) -> None:
        self.messages.append((payload, binary))

    def on_refused(self, reason: str) -> None:
        self.refused = reason
        self.done.set()

    def on_closed(self, code: int, reason: str, by_server: bool) -> None:
        self.closed = (code, reason, by_server)
        self.done.set()


def _server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    head = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        return struct.pack("!BB", head, n) + payload
    if n < 65536:
        return struct.pack("!BBH", head, 126, n) + payload
    return struct.pack("!BBQ", head, 127, n) + payload


async def _ws_server(handler: Any) -> Any:
    return await serve(
        handler,
        "127.0.0.1",
        0,
        subprotocols=["piggybong.v1.json", "piggybong.v1.msgpack"],  # type: ignore[list-item]
        compression=None,
        ping_interval=None,
    )


@pytest.mark.timeout(20)
async def test_client_reads_every_frame_shape_from_a_real_server() -> None:
    big = bytes(range(256)) * 300  # 76,800 bytes: a 64-bit length
    mid = b"m" * 1000  # a 16-bit length

    async def handler(ws: ServerConnection) -> None:
        await ws.send("hello")
        await ws.send(mid)
        await ws.send(big)
        await ws.send(["frag", "mented"])  # one message in fragments
        await ws.ping(b"are you there")
        await ws.recv()  # the client's message, once it answered the ping
        await ws.close(4008, "slow consumer")

    async with await _ws_server(handler) as server:
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        client = _Recorder("piggybong.v1.json")
        await loop.create_connection(lambda: client, "127.0.0.1", port)
        async with asyncio.timeout(10):
            await client.is_open.wait()
            client.send(b'{"id": 1}', binary=False)
            await client.done.wait()
    assert client.opened == "piggybong.v1.json"
    assert client.messages == [
        (b"hello", False),
        (mid, True),
        (big, True),
        (b"fragmented", False),
    ]
    assert client.closed == (4008, "slow consumer", True)


@pytest.mark.timeout(20)
async def test_client_reports_refused_upgrades_and_a_dropped_connection() -> None:
    async def handler(ws: ServerConnection) -> None:
        ws.transport.abort()  # no close frame at all

    loop = asyncio.get_running_loop()
    async with await _ws_server(handler) as server:
        port = server.sockets[0].getsockname()[1]
        wrong = _Recorder("chat.v2")  # a subprotocol the server does not speak
        await loop.create_connection(lambda: wrong, "127.0.0.1", port)
        dropped = _Recorder("piggybong.v1.msgpack")
        await loop.create_connection(lambda: dropped, "127.0.0.1", port)
        async with asyncio.timeout(10):
            await wrong.done.wait()
            await dropped.done.wait()
    # a server that ignores subprotocols: the client asked for one and got none
    async with await serve(handler, "127.0.0.1", 0, compression=None) as plain:
        unanswered = _Recorder("piggybong.v1.json")
        port = plain.sockets[0].getsockname()[1]
        await loop.create_connection(lambda: unanswered, "127.0.0.1", port)
        async with asyncio.timeout(10):
            await unanswered.done.wait()
    assert wrong.refused == "http 400"
    assert wrong.opened is None
    assert dropped.closed == (ABNORMAL, "", False)
    assert unanswered.refused == "subprotocol None answered for 'piggybong.v1.json'"


def test_frames_split_at_every_byte_boundary_are_read_whole() -> None:
    stream = (
        _server_frame(OP_TEXT, b"a" * 200)
        + _server_frame(OP_BINARY, b"b" * 70_000)
        + _server_frame(OP_TEXT, b"par", fin=False)
        + _server_frame(0x9, b"ping")
        + _server_frame(0x0, b"t", fin=True)
    )

    class Sink:
        def __init__(self) -> None:
            self.written: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.written.append(data)

    for cut in (1, 2, 3, 7, 126, 1000, 70_005):
        client = _Recorder(None)
        sink = Sink()
        client.transport = sink  # type: ignore[assignment]
        client.state = 1  # OPEN: the upgrade is tested against a real server above
        client._opened = True
        for i in range(0, len(stream), cut):
            client.data_received(stream[i : i + cut])
        assert client.messages == [(b"a" * 200, False), (b"b" * 70_000, True), (b"part", False)]
        assert len(sink.written) == 1  # the pong, sent between the fragments
        assert sink.written[0][0] == 0x8A  # FIN + pong
        assert sink.written[0][1] & 0x80  # masked, as a client must


# ------------------------------------------------------------------ against the real server


def _short_run(server: ServerProcess, **values: Any) -> Scenario:
    scenario = load_scenario(
        overrides={
            "target": server.url,
            "jwt_secret": server.jwt_secret,
            "api_key": server.api_key,
            "clients": 50,
            "connect_rate": 250,
            "paid_fraction": 0.4,
            "msgpack_fraction": 0.5,
            "artists": 5,
            "artists_per_client": 2,
            "event_rate": 30,
            "premium_fraction": 0.3,
            "spending_rate": 10,
            "notification_rate": 4,
            "duration": 3,
            "drain": 3,  # longer than the free tier's 2 s spending window
            "progress": "off",
            **values,
        }
    )
    assert isinstance(scenario, Scenario), scenario
    return scenario


@pytest.mark.timeout(120)
async def test_a_short_run_against_the_real_server_gets_every_owed_message() -> None:
    async with running_server() as server:
        scenario = _short_run(
            server, workers=0, default_thresholds=False, thresholds=["lost==0", "p95<5s"]
        )
        outcome = await run(scenario, stream=io.StringIO())
    assert isinstance(outcome, Outcome), outcome
    results = outcome.results
    assert results["connections"]["connected"] == 50
    assert results["errors"]["by_kind"] == {}
    delivery = results["delivery"]
    # 30 events/s to 5 channels x 2 of them per client x 50 clients, for 3 s: ~1,000 owed
    assert delivery["expected"] > 300
    assert delivery["delivered"] == delivery["expected"]
    assert delivery["lost"] == 0
    assert delivery["duplicates"] == delivery["out_of_order"] == delivery["premium_leaks"] == 0
    latency = results["latency_ms"]
    assert latency["event"]["count"] >= delivery["expected"] * 0.9
    assert latency["batch"]["count"] > 0  # spending updates came in batches
    by_tier = [results["histograms"].get(k, []) for k in ("batch_free", "batch_paid")]
    assert sum(n for pairs in by_tier for _, n in pairs) == latency["batch"]["count"]
    assert latency["notification"]["count"] > 0
    assert results["publishing"]["accepted"] == results["publishing"]["sent"] > 0
    assert outcome.exit_code == 0
    assert results["passed"] is True


@pytest.mark.timeout(180)
async def test_the_cli_with_workers_exits_99_on_a_breached_threshold(tmp_path: Path) -> None:
    async with running_server() as server:
        out, html = tmp_path / "results.json", tmp_path / "report.html"
        args = [
            *("--target", server.url, "--jwt-secret", server.jwt_secret),
            *("--api-key", server.api_key, "--workers", "2", "--clients", "40"),
            *("--duration", "2s", "--drain", "3s", "--quiet", "--server-pid", "auto"),
            *("--threshold", "p95<0.001ms", "--out", str(out), "--html", str(html)),
        ]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "loadtest",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=str(ROOT),
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 150)
    summary = stdout.decode()
    assert proc.returncode == 99, stderr.decode()[-3000:]
    assert "FAIL p95<0.001ms" in summary
    results = json.loads(out.read_text())
    assert results["workers"] == 2
    assert results["exit_code"] == 99
    assert results["connections"]["connected"] == 40
    assert results["delivery"]["lost"] == 0
    assert results["delivery"]["delivered"] == results["delivery"]["expected"] > 0
    assert results["server"]["source"] == "proc"
    assert results["server"]["cpu_seconds"] > 0
    assert "<svg" in html.read_text()


@pytest.mark.timeout(60)
async def test_an_unreachable_target_aborts_with_exit_1() -> None:
    port = free_port()  # nothing listens there
    outcome = await run(Scenario(target=f"http://127.0.0.1:{port}", progress="off"))
    assert not isinstance(outcome, Outcome)
    assert outcome.exit_code == 1
    assert "not reachable" in outcome.reason


def test_the_cli_help_prints() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "error_rate<0.1%" in result.stdout
