"""realtime.tiers: the default table, resolution, the premium filter, policy files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from realtime.tiers import (
    DEFAULT_TIERS,
    FREE,
    PAID,
    PolicyError,
    Tier,
    TierPolicy,
    load_policy,
)


def tier(name: str = "x", **overrides: Any) -> Tier:
    values: dict[str, Any] = {
        "commands_per_minute": 10,
        "max_subscriptions": 5,
        "max_connections": 1,
        "batch_window_ms": 100,
        "batch_max_items": 10,
        "premium_channels": False,
        "premium_events": False,
        "push_priorities": frozenset({"critical"}),
    }
    values.update(overrides)
    return Tier(name=name, **values)


# --------------------------------------------------------------------------- defaults


def test_defaults_are_section_5() -> None:
    policy = TierPolicy()
    assert policy.default_tier == "free"
    assert policy.premium_event_patterns == ("market.*",)
    assert set(policy.tiers) == {"free", "paid"}
    free, paid = policy.tiers["free"], policy.tiers["paid"]
    assert (free.commands_per_minute, free.max_subscriptions, free.max_connections) == (60, 20, 2)
    assert (free.batch_window_ms, free.batch_max_items) == (2000, 50)
    assert free.batch_window == 2.0
    assert not free.premium_channels and not free.premium_events
    assert free.push_priorities == {"critical", "high"}
    assert (paid.commands_per_minute, paid.max_subscriptions, paid.max_connections) == (300, 200, 5)
    assert (paid.batch_window_ms, paid.batch_max_items) == (250, 50)
    assert paid.batch_window == 0.25
    assert paid.premium_channels and paid.premium_events
    assert paid.push_priorities == {"critical", "high", "normal"}


def test_limits_is_the_connect_result_map() -> None:
    assert PAID.limits(65536) == {
        "commands_per_minute": 300,
        "max_subscriptions": 200,
        "max_connections": 5,
        "batch_window_ms": 250,
        "batch_max_items": 50,
        "max_frame_bytes": 65536,
        "recovery_window_s": 86_400,
        "recovery_max": 1000,
    }
    assert FREE.limits(1024)["max_frame_bytes"] == 1024


def test_resolve_known_and_unknown() -> None:
    policy = TierPolicy()
    assert policy.resolve("paid") == (PAID, True)
    assert policy.resolve("free") == (FREE, True)
    resolved, known = policy.resolve("platinum")
    assert resolved is policy.tiers["free"] and not known
    assert policy.resolve("PAID") == (FREE, False)  # names are case-sensitive
    # the same object for the same name (connections compare tiers by identity)
    assert policy.resolve("paid")[0] is policy.resolve("paid")[0]


def test_tier_is_validated_on_construction() -> None:
    with pytest.raises(ValidationError):
        tier(commands_per_minute=0)
    with pytest.raises(ValidationError):
        tier(push_priorities=frozenset({"urgent"}))
    with pytest.raises(ValidationError):
        tier(name="bad name")
    with pytest.raises(ValidationError):
        tier(batch_window_ms=True)


def test_policy_construction_checks() -> None:
    with pytest.raises(ValueError, match="default tier"):
        TierPolicy({"paid": PAID})
    with pytest.raises(ValueError, match="listed under"):
        TierPolicy({"free": FREE, "gold": PAID})


# --------------------------------------------------------------------------- premium events


@pytest.mark.parametrize(
    ("event", "premium"),
    [
        ("market.open", True),
        ("market.price.changed", True),
        ("market.", True),
        ("market", False),
        ("marketing.sent", False),
        ("spending.created", False),
        ("x.market.open", False),
        ("Market.open", False),
    ],
)
def test_premium_event_default_pattern(event: str, premium: bool) -> None:
    policy = TierPolicy()
    assert policy.is_premium_event(event) is premium
    assert policy.is_premium_event(event) is premium  # cached answer is the same


def test_premium_patterns_configurable() -> None:
    policy = TierPolicy(premium_event_patterns=["stock.*", "*.vip", "exact"])
    assert policy.is_premium_event("stock.tick")
    assert policy.is_premium_event("comeback.vip")
    assert policy.is_premium_event("exact")
    assert not policy.is_premium_event("exact.not")
    assert not policy.is_premium_event("market.open")
    none = TierPolicy(premium_event_patterns=[])
    assert not none.is_premium_event("market.open")


def test_premium_cache_is_bounded() -> None:
    policy = TierPolicy(cache_size=8)
    for i in range(100):
        assert policy.is_premium_event(f"market.{i}")
        assert not policy.is_premium_event(f"other.{i}")
    assert len(policy._cache) <= 8
    # answers stay right after eviction
    assert policy.is_premium_event("market.0")
    assert not policy.is_premium_event("other.0")


# --------------------------------------------------------------------------- policy files


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load_json(tmp_path: Path, document: Any) -> TierPolicy:
    return load_policy(write(tmp_path, "policy.json", json.dumps(document)))


def json_error(tmp_path: Path, document: Any) -> str:
    with pytest.raises(PolicyError) as info:
        load_json(tmp_path, document)
    return str(info.value)


def test_no_file_is_the_defaults() -> None:
    policy = load_policy(None)
    assert policy.tiers == dict(DEFAULT_TIERS)
    assert policy.premium_event_patterns == ("market.*",)


def test_toml_partial_override_and_new_tier(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "policy.toml",
        """
premium_event_patterns = ["market.*", "stock.*"]

[tiers.paid]
batch_window_ms = 100

[tiers.vip]
extends = "paid"
commands_per_minute = 1000
push_priorities = ["critical", "high", "normal", "low"]

[tiers.basic]
commands_per_minute = 30
max_subscriptions = 10
max_connections = 1
batch_window_ms = 5000
batch_max_items = 20
premium_channels = false
premium_events = false
push_priorities = []
""",
    )
    policy = load_policy(path)
    assert set(policy.tiers) == {"free", "paid", "vip", "basic"}
    assert policy.tiers["free"] == FREE
    paid = policy.tiers["paid"]
    assert paid.batch_window_ms == 100
    assert paid.commands_per_minute == 300  # untouched fields keep the default
    vip = policy.tiers["vip"]
    assert vip.name == "vip"
    assert vip.batch_window_ms == 100  # extends the paid tier as this file changed it
    assert vip.commands_per_minute == 1000
    assert vip.push_priorities == {"critical", "high", "normal", "low"}
    assert policy.tiers["basic"].push_priorities == frozenset()
    assert policy.is_premium_event("stock.tick")
    assert policy.resolve("vip") == (vip, True)


def test_json_override(tmp_path: Path) -> None:
    policy = load_json(tmp_path, {"tiers": {"free": {"commands_per_minute": 30}}})
    assert policy.tiers["free"].commands_per_minute == 30
    assert policy.tiers["free"].max_subscriptions == 20
    assert policy.tiers["paid"] == PAID


def test_replace_table(tmp_path: Path) -> None:
    basic = {
        "commands_per_minute": 5,
        "max_subscriptions": 3,
        "max_connections": 1,
        "batch_window_ms": 1000,
        "batch_max_items": 5,
        "premium_channels": False,
        "premium_events": False,
        "push_priorities": ["critical"],
    }
    only_free = {"inherit_defaults": False, "tiers": {"free": {"extends": "basic"}, "basic": basic}}
    policy = load_json(tmp_path, only_free)
    assert set(policy.tiers) == {"free", "basic"}
    assert policy.resolve("paid") == (policy.tiers["free"], False)
    assert policy.tiers["free"].commands_per_minute == 5
    message = json_error(tmp_path, {"inherit_defaults": False, "tiers": {}})
    assert "tiers.free: required" in message


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"tiers": {"paid": {"batch_window_ms": 0}}}, "tiers.paid.batch_window_ms: must be > 0"),
        ({"tiers": {"paid": {"batch_window_ms": -5}}}, "tiers.paid.batch_window_ms: must be > 0"),
        ({"tiers": {"free": {"max_subscriptions": "20"}}}, "tiers.free.max_subscriptions: must be"),
        ({"tiers": {"free": {"batch_max_items": 2.5}}}, "tiers.free.batch_max_items: must be an"),
        ({"tiers": {"free": {"premium_events": 1}}}, "tiers.free.premium_events: must be true"),
        ({"tiers": {"free": {"batch_windw_ms": 5}}}, "tiers.free.batch_windw_ms: unknown field"),
        ({"tiers": {"free": {"name": "x"}}}, "tiers.free.name: unknown field"),
        (
            {"tiers": {"paid": {"push_priorities": ["high", "urgent"]}}},
            "tiers.paid.push_priorities: must be one of 'critical', 'high', 'normal' or 'low' "
            "(not 'urgent')",
        ),
        ({"tiers": {"paid": {"push_priorities": "high"}}}, "tiers.paid.push_priorities: must be"),
        ({"tiers": {"paid": {"push_priorities": [["high"]]}}}, "tiers.paid.push_priorities: must"),
        ({"tiers": {"vip": {"commands_per_minute": 9}}}, "tiers.vip.max_subscriptions: required"),
        ({"tiers": {"vip": {"extends": "gold"}}}, "tiers.vip.extends: unknown tier 'gold'"),
        ({"tiers": {"vip": {"extends": 3}}}, "tiers.vip.extends: must be a tier name"),
        (
            {"tiers": {"a": {"extends": "b"}, "b": {"extends": "a"}}},
            "tiers.a.extends: a cycle (a -> b -> a)",
        ),
        ({"tiers": {"bad name": {"extends": "free"}}}, "tiers.bad name: a tier name must be"),
        ({"tiers": {"paid": 5}}, "tiers.paid: must be a map"),
        ({"tiers": []}, "tiers: must be a map"),
        ({"tier": {}}, "tier: unknown field"),
        ({"inherit_defaults": "no"}, "inherit_defaults: must be true or false"),
        ({"premium_event_patterns": "market.*"}, "premium_event_patterns: must be a list"),
        ({"premium_event_patterns": ["a", ""]}, "premium_event_patterns[1]: must be"),
        ([], "the top level must be a map"),
    ],
)
def test_bad_file_names_the_field(tmp_path: Path, document: Any, expected: str) -> None:
    message = json_error(tmp_path, document)
    assert expected in message
    assert str(tmp_path / "policy.json") in message


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"\.json or \.toml"):
        load_policy(write(tmp_path, "policy.yaml", "tiers: {}"))
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(write(tmp_path, "broken.toml", "[tiers.paid\n"))
    with pytest.raises(PolicyError, match="not valid JSON"):
        load_policy(write(tmp_path, "broken.json", "{"))
    with pytest.raises(PolicyError, match=r"tiers\.paid\.batch_window_ms: must be > 0"):
        load_policy(write(tmp_path, "zero.toml", "[tiers.paid]\nbatch_window_ms = 0\n"))
