"""realtime/door.py, sans I/O: client addresses behind proxies, admission, origins."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from realtime.door import MAX_ADDRESS_CHARS, Door, Refusal, Ticket, Why
from realtime.metrics import Metrics
from realtime.wsprotocol import close_reason


def door(**kw: object) -> Door:
    options: dict[str, object] = {"max_connections_per_ip": 2, "connect_rate_per_ip": 1.0}
    options.update(kw)
    return Door(**options)  # type: ignore[arg-type]


def test_the_client_is_the_right_most_untrusted_hop() -> None:
    d = door(trusted_proxies=["10.0.0.0/8", "192.0.2.1"])
    assert d.client_address("203.0.113.9", ["1.2.3.4"]) == "203.0.113.9"  # peer not trusted
    assert d.client_address("10.1.1.1", ["6.6.6.6, 198.51.100.7, 192.0.2.1"]) == "198.51.100.7"
    assert d.client_address("10.1.1.1", ["6.6.6.6", "198.51.100.7"]) == "198.51.100.7"
    assert d.client_address("10.1.1.1", ["10.2.2.2, 10.3.3.3"]) == "10.2.2.2"  # all trusted
    assert d.client_address("10.1.1.1", []) == "10.1.1.1"
    assert d.client_address("10.1.1.1", ["x" * 500]) == "x" * MAX_ADDRESS_CHARS


def test_connections_are_counted_until_released() -> None:
    d = door()
    first, second = d.admit("a"), d.admit("a")
    assert isinstance(first, Ticket) and isinstance(second, Ticket)
    refused = d.admit("a")
    assert isinstance(refused, Refusal) and refused.why is Why.CONNECTIONS_PER_IP
    first.release()
    first.release()  # idempotent
    assert d.open == {"a": 1}
    second.release()
    assert d.open == {}


def test_new_connections_have_a_burst_of_ten_times_the_rate() -> None:
    now = [100.0]
    metrics = Metrics(CollectorRegistry())
    d = door(max_connections_per_ip=1000, clock=lambda: now[0], metrics=metrics)
    tickets = [d.admit("b") for _ in range(10)]
    assert all(isinstance(t, Ticket) for t in tickets)
    refused = d.admit("b")
    assert isinstance(refused, Refusal) and refused.why is Why.CONNECT_RATE_PER_IP
    assert 0.9 < refused.retry_after <= 1.0
    assert isinstance(d.admit("c"), Ticket)  # another address has its own bucket
    now[0] += 1.0
    assert isinstance(d.admit("b"), Ticket)
    sample = metrics.registry.get_sample_value(
        "piggybong_realtime_door_refusals_total",
        {"what": "http", "why": "connect_rate_per_ip"},
    )
    assert sample == 1.0


def test_origins_match_with_wildcards_and_no_origin_passes() -> None:
    assert door().origin_allowed("https://anything.example")
    d = door(allowed_origins=["https://*.piggybong.app", "capacitor://localhost"])
    assert d.origin_allowed(None)
    assert d.origin_allowed("https://Web.PiggyBong.app")
    assert d.origin_allowed("capacitor://localhost")
    assert not d.origin_allowed("https://piggybong.app.evil.example")


def test_close_reasons_are_cut_to_123_bytes_on_a_character_boundary() -> None:
    assert close_reason("short") == "short"
    cut = close_reason("é" * 100)  # 200 bytes
    assert cut == "é" * 61 and len(cut.encode()) == 122
    assert close_reason("\ud800x") == "?x"


def test_connects_in_progress_are_bounded_per_node_and_freed_once() -> None:
    door = Door(max_connections_per_ip=100, connect_rate_per_ip=100, max_connects_in_progress=2)
    first, second = door.begin_connect("10.0.0.1"), door.begin_connect("10.0.0.2")
    assert not isinstance(first, Refusal) and not isinstance(second, Refusal)
    refused = door.begin_connect("10.0.0.3")
    assert isinstance(refused, Refusal) and refused.why is Why.BUSY
    assert refused.retry_after == 1.0
    first.release()
    first.release()  # idempotent: frees one place, once
    third = door.begin_connect("10.0.0.3")
    assert not isinstance(third, Refusal)
    assert isinstance(door.begin_connect("10.0.0.4"), Refusal)
    unbounded = Door(max_connections_per_ip=1, connect_rate_per_ip=1)
    assert all(not isinstance(unbounded.begin_connect("a"), Refusal) for _ in range(1000))
