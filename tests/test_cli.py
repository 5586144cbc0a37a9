"""The command line as operators use it: help, token minting, dev mode, bad settings."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import jwt
import pytest
from pydantic import ValidationError

from realtime.settings import DEV_JWT_SECRET, Settings
from tests.server import ROOT, free_port, running_server, server_env, ws_client


def realtime(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("REALTIME_")}
    return subprocess.run(
        [sys.executable, "-m", "realtime", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**base, **(env or {})},
        check=False,
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
    assert result.returncode == 2 and "REALTIME_PORT: " in result.stderr
    result = realtime("serve", env={"REALTIME_JWT_SECRET": "short"})
    assert result.returncode == 2 and "32 bytes" in result.stderr


async def test_dev_mode_says_so_loudly() -> None:
    env = {"REALTIME_JWT_SECRET": "", "REALTIME_API_KEYS": ""}
    async with running_server(env) as server:
        log = server.log()
        assert "DEV MODE" in log and "dev-api-key" in log and DEV_JWT_SECRET in log


def test_reuse_port_is_refused_with_workers_and_where_the_platform_lacks_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = realtime(
        "serve", "--reuse-port", "--workers", "2", "--redis-url", "redis://127.0.0.1:1/0"
    )
    assert result.returncode == 2
    assert "REALTIME_REUSE_PORT" in result.stderr and "several" in result.stderr
    monkeypatch.delattr(socket, "SO_REUSEPORT")
    with pytest.raises(ValidationError, match="REALTIME_REUSE_PORT: this platform has no"):
        Settings(reuse_port=True)


@pytest.mark.timeout(60)
async def test_reuse_port_processes_share_a_port_and_both_get_connections() -> None:
    port = free_port()
    env = {"REALTIME_REUSE_PORT": "true"}
    async with (
        running_server({**env, "REALTIME_NODE_ID": "node-a"}, port) as a,
        running_server({**env, "REALTIME_NODE_ID": "node-b"}, port),
    ):
        # node-a answered start_server's /healthz for node-b too: wait until node-b serves
        async with asyncio.timeout(20):
            while True:
                if await _healthz_node(a.url) == "node-b":
                    break
                await asyncio.sleep(0.05)
        nodes: Counter[str] = Counter()
        for i in range(40):  # a new TCP connection each: the kernel picks a socket by 4-tuple
            async with ws_client(a) as client:
                reply = await client.command("connect", token=a.token(f"user{i}"))
                nodes[reply["result"]["session"].split(":")[0]] += 1
        assert set(nodes) == {"node-a", "node-b"}, nodes


async def _healthz_node(url: str) -> str:
    """The ``node`` of whichever process answers ``/healthz`` on a new TCP connection."""
    async with httpx.AsyncClient(timeout=2) as client:
        node: str = (await client.get(f"{url}/healthz")).json()["node"]
        return node


@pytest.mark.timeout(60)
async def test_a_taken_port_stops_a_second_server_with_a_clear_error() -> None:
    port = free_port()
    env = {**server_env(), "REALTIME_PORT": str(port)}
    async with running_server(port=port):
        plain, reuse = await asyncio.gather(
            asyncio.to_thread(realtime, "serve", env=env),
            asyncio.to_thread(realtime, "serve", "--reuse-port", env=env),
        )
    assert plain.returncode == 3 and "address already in use" in plain.stderr, plain.stderr
    assert reuse.returncode == 3, reuse.stderr
    assert f"cannot listen on 127.0.0.1:{port} with SO_REUSEPORT" in reuse.stderr
    assert "every process sharing a port needs --reuse-port" in reuse.stderr


def test_serve_raises_the_soft_open_files_limit_to_the_hard_one() -> None:
    import resource

    from realtime.cli import raise_open_files_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard < 2:
        pytest.skip("no finite hard limit to raise to")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, hard // 2), hard))
        assert raise_open_files_limit() == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_push_credentials_cooldown_is_at_least_a_second() -> None:
    # The breaker refuses a cool-down under 1 s at the settings level already.
    with pytest.raises(ValidationError, match="push_credentials_cooldown"):
        Settings(push_credentials_cooldown=0.5)
    assert Settings(push_credentials_cooldown=42).push_credentials_cooldown == 42


SECRET = "s3cret-TAIL-do-not-echo-7f1e"


def assert_one_clean_line(result: subprocess.CompletedProcess[str], setting: str) -> None:
    """Exit 2, one ``realtime: ...`` line naming ``setting``, nothing of pydantic's or a trace."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"realtime: {setting}"), lines
    for noise in ("Traceback", "errors.pydantic.dev", "input_value", "For further information"):
        assert noise not in result.stderr


def test_refusals_are_one_line_naming_the_setting_and_never_echo_secrets() -> None:
    secrets = {
        "REALTIME_JWT_SECRET": SECRET + "-jwt-0123456789",
        "REALTIME_API_KEYS": f"{SECRET}-key-a,{SECRET}-key-b",
        "REALTIME_REDIS_URL": f"redis://default:{SECRET}@127.0.0.1:6379/0",
    }
    # A model-level refusal used to print every input value, secrets included.
    result = realtime("serve", "--workers", "2", "--metrics-port", "9100", env=secrets)
    assert_one_clean_line(result, "REALTIME_METRICS_PORT: needs REALTIME_WORKERS=1")
    result = realtime("serve", env={**secrets, "REALTIME_JWT_SECRET": SECRET})
    assert_one_clean_line(result, "REALTIME_JWT_SECRET: must be at least 32 bytes")
    bad_url = {**secrets, "REALTIME_REDIS_URL": f"redis://u:{SECRET}@127.0.0.1:notaport/0"}
    assert_one_clean_line(realtime("serve", env=bad_url), "REALTIME_REDIS_URL: not a valid")
    result = realtime("serve", "--redis-url", "127.0.0.1:6379")
    assert_one_clean_line(
        result, "REALTIME_REDIS_URL: must start with redis:// , rediss:// or unix://"
    )
    result = realtime("serve", "--log-format", "xml", env=secrets)
    assert_one_clean_line(result, "REALTIME_LOG_FORMAT: Input should be 'text' or 'json'")
    for result in (
        realtime("serve", "--workers", "2", "--metrics-port", "9100", env=secrets),
        realtime("serve", "--host", "0.0.0.0", env={"REALTIME_API_KEYS": SECRET}),
    ):
        assert SECRET not in result.stderr + result.stdout


def test_token_refuses_an_unknown_tier_and_a_bad_ttl(tmp_path: Path) -> None:
    result = realtime("token", "42", "--tier", "gold")
    assert_one_clean_line(result, "--tier: unknown tier 'gold' (known: free, paid)")
    for ttl in ("-5", "0", "nan"):
        assert_one_clean_line(realtime("token", "42", f"--ttl={ttl}"), "--ttl: must be")
    policy = tmp_path / "tiers.toml"
    policy.write_text('[tiers.gold]\nextends = "paid"\n')
    env = {"REALTIME_TIER_POLICY": str(policy)}
    token = realtime("token", "42", "--tier", "gold", env=env).stdout.strip()
    assert jwt.decode(token, options={"verify_signature": False})["tier"] == "gold"
    free = (
        "commands_per_minute = 60\nmax_subscriptions = 20\nmax_connections = 2\n"
        "batch_window_ms = 2000\nbatch_max_items = 50\npremium_channels = false\n"
        'premium_events = false\npush_priorities = ["critical"]\n'
    )
    policy.write_text(f"inherit_defaults = false\n[tiers.free]\n{free}")
    result = realtime("token", "42", "--tier", "paid", env=env)
    assert_one_clean_line(result, "--tier: unknown tier 'paid' (known: free)")


def test_loadtest_help_describes_every_option_with_its_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "loadtest", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "REALTIME_JWT_SECRET": SECRET + "-jwt", "REALTIME_API_KEYS": SECRET},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout
    # Each option's entry: its "  --flag ..." line and the deeper-indented lines after it.
    entries: dict[str, str] = {}
    option = None
    for line in result.stdout.splitlines():
        if line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")
            option = invocation.split()[0].rstrip(",")
            entries[option] = text.strip()
        elif option is not None and line.startswith("    "):
            entries[option] += " " + line.strip()
        else:
            option = None
    assert len(entries) > 30, entries
    for option, text in entries.items():
        if option == "-h":
            continue
        assert text, f"{option} has no help"
        assert "(default: " in " ".join(text.split()), f"{option}: {text}"
