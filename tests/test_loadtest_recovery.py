"""The harness's reconnect scenarios (loadtest/recovery.py): its ledger on plain data, and a
small run of each fault against real nodes and a real Redis it starts, SIGKILLs and
SIGSTOPs, with clients of clients/python: nothing lost, nothing twice, nothing out of order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import cli
from loadtest.config import ConfigError, Scenario, load_scenario
from loadtest.recovery import RESYNC, audit, recovery_text, run_recovery

pytestmark = pytest.mark.timeout(90)

SMALL = {
    "clients": 12,
    "artists": 3,
    "artists_per_client": 2,
    "event_rate": 30,
    "connect_rate": 200,
    "paid_fraction": 0.5,
    "msgpack_fraction": 0.5,
    "progress": "off",
}


def scenario(fault: str, **extra: Any) -> Scenario:
    made = load_scenario(overrides={**SMALL, "scenario": fault, **extra})
    assert not isinstance(made, ConfigError), made
    return made


def test_the_ledger_counts_what_went_wrong() -> None:
    accepted = [1, 2, 3, 4, 5, 6]
    whole = audit(accepted, [1, 2, 3, 4, 5, 6])
    assert (whole.owed, whole.received, whole.broken) == (6, 6, 0)
    bad = audit(accepted, [1, 3, 2, 3, 7, 6])
    assert (bad.missed, bad.duplicated, bad.out_of_order, bad.unexpected) == (
        2,
        1,
        2,
        1,
    )  # 2 after 3, 6 after 7
    # A resync excuses what lies between the receipts around it, and nothing else.
    told = audit(accepted, [1, RESYNC, 4, 6])
    assert (told.excused, told.missed, told.received) == (2, 1, 3)
    assert audit(accepted, [1, 2, RESYNC]).excused == 4  # nothing after it: the rest
    assert audit(accepted, []).missed == 6
    # A publication given up without an answer may have been published: not unexpected.
    assert audit(accepted, [*accepted, 7], unknown={7}).unexpected == 0


def test_drops_through_the_command_line(tmp_path: Path) -> None:
    """Clients drop their sockets at random while events flow (one in-process node):
    every publication arrives once and in order, each drop resumed with recovered: true."""
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    code = cli.main(
        ["--scenario", "drops", "--backend", "memory", "--clients", "12", "--artists", "3",
         "--artists-per-client", "2", "--event-rate", "30", "--duration", "3",
         "--fault-at", "0.2", "--drops-per-s", "8", "--quiet", "--out", str(out),
         "--html", str(html)]
    )  # fmt: skip
    results = json.loads(out.read_text())
    assert code == 0, recovery_text(results)
    assert (results["nodes"], results["redis"]) == (1, False)
    dlv = results["delivery"]
    assert dlv["owed"] > 100 and dlv["received"] == dlv["owed"]
    assert results["recovery"]["drops"] >= 5
    # Every drop is resumed; a reconnect more is a connect attempt that timed out on a busy
    # machine and was made again (the ledger above shows it cost nothing).
    assert results["resumes"]["reconnects"] >= results["recovery"]["drops"]
    assert results["resumes"]["recovered"] >= results["recovery"]["drops"]
    assert results["resumes"]["resynced"] == 0
    assert "drop to resumed" in html.read_text()
    assert "api_key" not in results["scenario"]


async def test_a_node_killed_under_load() -> None:
    results = await run_recovery(
        scenario("node-kill", duration=4, fault_at=1, fault_length=0.5), None
    )
    text = recovery_text(results)
    assert results["passed"], text
    assert results["delivery"]["missed"] == results["delivery"]["duplicated"] == 0, text
    # The killed node's six clients moved to the other node and resumed every channel.
    assert results["resumes"]["reconnects"] == 6, text
    assert results["resumes"]["recovered"] >= 6 * 3, text  # two artists and the user's
    assert results["resumes"]["resynced"] == 0, text
    assert results["recovery"]["clients_back"] == 12, text


async def test_redis_frozen_past_the_publish_deadline() -> None:
    """Redis SIGSTOPped for 5 s (past the 4.5 s publish deadline): the 503s are retried
    with the same ids, and nothing is lost or duplicated."""
    results = await run_recovery(
        scenario("redis-freeze", duration=7, fault_at=0.5, fault_length=5), None
    )
    text = recovery_text(results)
    assert results["passed"], text
    assert results["delivery"]["received"] == results["delivery"]["owed"], text
    assert sum(results["publications"]["refusals"].values()) > 0, text
    assert results["recovery"]["fleet_back_s"] >= 5, text


async def test_redis_killed_and_restarted_empty() -> None:
    """The histories are gone: every channel resyncs (recovered: false), and what follows
    arrives once and in order."""
    results = await run_recovery(
        scenario("redis-kill", duration=4, fault_at=0.5, fault_length=1), None
    )
    text = recovery_text(results)
    assert results["passed"], text
    assert results["resumes"]["resynced"] >= 12 * 2, text
    assert results["delivery"]["received"] > 0 and results["delivery"]["missed"] == 0, text
