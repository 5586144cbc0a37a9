"""Pytest plugin: a real Redis for the test session.

Fixtures:

- ``redis_server`` (session): a ``redis-server`` this plugin starts on a free
  127.0.0.1 port (``--save "" --appendonly no``) and stops at session end, with
  ``kill()`` (SIGKILL), ``restart()`` (same port), ``pause()`` / ``resume()``
  (SIGSTOP / SIGCONT). If ``REALTIME_TEST_REDIS_URL`` is set, that server is used
  instead and those methods skip the calling test.
- ``redis_url`` (function): a URL to a logical DB flushed before the test. A
  server killed by an earlier test is restarted first.

No ``redis-server`` binary and no ``REALTIME_TEST_REDIS_URL`` is a test
failure with install instructions, never a silent skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

__all__ = ["RedisServer", "command", "redis_server", "redis_url"]

ENV_URL = "REALTIME_TEST_REDIS_URL"
_SEARCH_DIRS = ("/usr/bin", "/usr/local/bin", "/usr/sbin")
_DATABASES = 16
_START_TIMEOUT = 15.0


def find_redis_server() -> str | None:
    """The path of a ``redis-server`` binary on PATH or in the usual dirs, else None."""
    found = shutil.which("redis-server")
    if found:
        return found
    for directory in _SEARCH_DIRS:
        candidate = Path(directory) / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return bool(client.ping())
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False
    finally:
        client.close()


class RedisServer:
    """A Redis for tests: ``url``, ``port``, ``kill()``, ``restart()``, ``pause()``, ``resume()``.

    ``external`` servers (from ``REALTIME_TEST_REDIS_URL``) are never touched:
    ``kill()`` / ``restart()`` skip the calling test.
    """

    def __init__(
        self,
        binary: str | None,
        port: int,
        url: str,
        *,
        external: bool,
        extra: Sequence[str] = (),
    ) -> None:
        self.binary = binary
        self.extra = list(extra)
        self.port = port
        self.url = url
        self.external = external
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="realtime-test-redis-")) if binary else None
        self._next_db = 0

    @classmethod
    def start_own(
        cls, binary: str, extra: Sequence[str] = (), password: str | None = None
    ) -> RedisServer:
        """A server of our own; ``extra`` arguments follow (and override) the defaults.

        ``password``: ``requirepass`` (and ``masterauth``), and in ``url``."""
        last_error = ""
        if password is not None:
            extra = [*extra, "--requirepass", password, "--masterauth", password]
        auth = "" if password is None else f":{password}@"
        for _ in range(5):  # a free port can be taken between probe and bind: retry
            port = _free_port()
            url = f"redis://{auth}127.0.0.1:{port}/0"
            server = cls(binary, port, url, external=False, extra=extra)
            try:
                server._spawn()
                return server
            except RuntimeError as exc:
                last_error = str(exc)
                server.stop()
        pytest.fail(f"could not start redis-server: {last_error}", pytrace=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _spawn(self) -> None:
        assert self.binary is not None and self._dir is not None
        log = self._dir / "redis.log"
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--databases", str(_DATABASES),
            "--dir", str(self._dir),
            "--logfile", str(log),
            *self.extra,
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {tail}")
            if _pings(self.url):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def kill(self) -> None:
        """SIGKILL the server and wait until it is gone (skips the test if external)."""
        if self.external:
            pytest.skip(f"{ENV_URL} is set: the test needs to kill Redis, which it does not own")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP the server: connections stay open, nothing is answered (skips if external)."""
        if self.external:
            pytest.skip(f"{ENV_URL} is set: the test needs to pause Redis, which it does not own")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Start the server again on the same port; returns once it answers PING."""
        if self.external:
            pytest.skip(f"{ENV_URL} is set: the test needs to restart Redis, which it does not own")
        self.kill()
        try:
            self._spawn()
        except RuntimeError as exc:
            pytest.fail(f"could not restart redis-server: {exc}", pytrace=False)

    def ensure_up(self) -> None:
        """Restart a server an earlier test killed; fail if an external one does not answer."""
        if self.external:
            if not _pings(self.url):
                pytest.fail(f"{ENV_URL}={self.url} does not answer PING", pytrace=False)
            return
        self.resume()  # a test that failed while it was paused
        if not self.running or not _pings(self.url):
            self.restart()

    def fresh_db_url(self) -> str:
        """A URL to a flushed logical DB (own server: a different DB than the previous test)."""
        if self.external:
            url = self.url
        else:
            db = self._next_db
            self._next_db = (db + 1) % _DATABASES
            url = f"redis://127.0.0.1:{self.port}/{db}"
        client = redis.Redis.from_url(url, socket_timeout=5.0)
        try:
            client.flushdb()
        finally:
            client.close()
        return url

    def stop(self) -> None:
        """Terminate an own server and remove its directory."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def command(port: int, *args: str) -> Any:
    """One command to the Redis server on 127.0.0.1:``port`` (no password), its reply."""
    client = redis.Redis(port=port, socket_timeout=5.0)
    try:
        return client.execute_command(*args)  # type: ignore[no-untyped-call]
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    external = os.environ.get(ENV_URL)
    if external:
        server = RedisServer(None, urlsplit(external).port or 6379, external, external=True)
        server.ensure_up()
        yield server
        return
    binary = find_redis_server()
    if binary is None:
        pytest.fail(
            "redis-server not found (looked on PATH and in " + ", ".join(_SEARCH_DIRS) + "). "
            "The tests need a real Redis: install it (Debian/Ubuntu: `apt-get install "
            "redis-server`; macOS: `brew install redis`) or set "
            f"{ENV_URL}=redis://host:port/db to use a running server.",
            pytrace=False,
        )
    server = RedisServer.start_own(binary)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    redis_server.ensure_up()
    return redis_server.fresh_db_url()
