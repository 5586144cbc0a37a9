"""clients/js: its own tests (Node's test runner) against the real server, run from pytest."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.server import ROOT

JS = ROOT / "clients" / "js"
NODE = shutil.which("node")

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(NODE is None, reason="node is not installed (.ci/run installs nodejs)"),
]


def node_flags() -> list[str]:
    """``--experimental-websocket`` where WebSocket is not global yet (Node 20 and 21);
    an older Node runs the tests on the ``ws`` package (a dev dependency)."""
    assert NODE is not None
    probe = "process.exit(typeof WebSocket === 'function' ? 0 : 1)"
    for flags in ([], ["--experimental-websocket"]):
        if subprocess.run([NODE, *flags, "-e", probe], check=False).returncode == 0:
            return flags
    return []


def test_the_js_client_passes_its_node_tests() -> None:
    assert NODE is not None
    if not (JS / "node_modules" / "ws").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install clients/js's locked dependencies"
        subprocess.run(
            [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"], cwd=JS, check=True
        )
    env = {**os.environ, "PIGGYBONG_PYTHON": sys.executable}
    result = subprocess.run(
        [NODE, *node_flags(), "--test", "test/"],
        cwd=JS,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    assert "# fail 0" in result.stdout and "# pass " in result.stdout


def test_the_dashboard_ships_the_js_client_unchanged() -> None:
    """realtime/dashboard_static/piggybong-client.js is a copy of clients/js/src/index.js
    (the server's package cannot reach outside itself): copy it again when it changes."""
    shipped = ROOT / "realtime" / "dashboard_static" / "piggybong-client.js"
    assert shipped.read_bytes() == (JS / "src" / "index.js").read_bytes()
