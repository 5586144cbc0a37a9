"""The command line as operators use it: help, token minting, dev mode, bad settings."""

from __future__ import annotations

import os
import subprocess
import sys

import jwt

from realtime.settings import DEV_JWT_SECRET, Settings
from tests.server import ROOT, running_server


def realtime(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    return subprocess.run(
        [sys.executable, "-m", "realtime", *args], capture_output=True, text=True, timeout=30,
        cwd=ROOT, env={**base, **(env or {})}, check=False,
    )


def test_help_lists_every_setting() -> None:
    result = realtime("serve", "--help")
    assert result.returncode == 0
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout, name
        assert f"REALTIME_{name.upper()}" in result.stdout, name


def test_token_is_minted_with_the_dev_or_configured_secret() -> None:
    token = realtime("token", "42", "--tier", "paid", "--ttl", "120").stdout.strip()
    claims = jwt.decode(token, DEV_JWT_SECRET, algorithms=["HS256"], audience="authenticated")
    assert (claims["sub"], claims["tier"]) == ("42", "paid")
    assert 100 < claims["exp"] - claims["iat"] <= 121
    secret = "x" * 40
    token = realtime("token", "7", env={"REALTIME_JWT_SECRET": secret}).stdout.strip()
    assert jwt.decode(token, secret, algorithms=["HS256"], audience="authenticated")["sub"] == "7"


def test_dev_mode_is_refused_off_loopback_and_bad_settings_exit_2() -> None:
    result = realtime("serve", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "dev mode" in result.stderr
    result = realtime("serve", "--port", "not-a-port")
    assert result.returncode == 2 and "port" in result.stderr
    result = realtime("serve", env={"REALTIME_JWT_SECRET": "short"})
    assert result.returncode == 2 and "32 bytes" in result.stderr


async def test_dev_mode_says_so_loudly() -> None:
    env = {"REALTIME_JWT_SECRET": "", "REALTIME_API_KEYS": ""}
    async with running_server(env) as server:
        log = server.log()
        assert "DEV MODE" in log and "dev-api-key" in log and DEV_JWT_SECRET in log
