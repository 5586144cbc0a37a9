"""The scale-out benchmark's own pure helpers (bench/scaleout.py): INFO commandstats read
right, call deltas, and the deliveries owed for round-robin publications. Nothing timed."""

from __future__ import annotations

from bench.scaleout import (
    PUBLISH_COMMANDS,
    SCRIPT_COMMANDS,
    calls_delta,
    command_calls,
    count,
    owed_deliveries,
)

# As redis-server 7.0 answers INFO commandstats (CRLF lines, sub-commands with "|").
INFO = (
    "# Commandstats\r\n"
    "cmdstat_evalsha:calls=3495,usec=210345,usec_per_call=60.19,rejected_calls=0,"
    "failed_calls=0\r\n"
    "cmdstat_publish:calls=2412,usec=0,usec_per_call=0.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_SPUBLISH:calls=7,usec=70,usec_per_call=10.00,rejected_calls=0,failed_calls=0\r\n"
    "cmdstat_script|exists:calls=2,usec=5,usec_per_call=2.50,rejected_calls=0,"
    "failed_calls=0\r\n"
)


def test_command_calls_reads_each_command_s_calls() -> None:
    assert command_calls(INFO) == {
        "evalsha": 3495,
        "publish": 2412,
        "spublish": 7,
        "script|exists": 2,
    }


def test_command_calls_reads_another_field() -> None:
    assert command_calls(INFO, "usec") == {
        "evalsha": 210345,
        "publish": 0,
        "spublish": 70,
        "script|exists": 5,
    }


def test_command_calls_ignores_other_sections_and_blank_lines() -> None:
    assert command_calls("# Server\r\nredis_version:7.0.15\r\n\r\n") == {}


def test_calls_delta_keeps_only_commands_called_in_between() -> None:
    before = {"evalsha": 10, "publish": 4, "ping": 1}
    after = {"evalsha": 25, "publish": 4, "ping": 1, "spublish": 3}
    delta = calls_delta(before, after)
    assert delta == {"evalsha": 15, "spublish": 3}
    assert count(delta, PUBLISH_COMMANDS) == 3
    assert count(delta, SCRIPT_COMMANDS) == 15


def test_owed_deliveries_round_robin_over_uneven_channels() -> None:
    # 7 publications over 3 channels (i % 3): 3, 2 and 2 of them
    assert owed_deliveries(7, [10, 20, 30]) == 3 * 10 + 2 * 20 + 2 * 30
    assert owed_deliveries(0, [5]) == 0
