"""Property-based fuzzing (hypothesis) of what a hostile client controls: the codecs, the
command parser, WebSocket frames and HTTP bodies against the real server.

Every input gets a contract answer (a reply with its id, a close code of section 1, an HTTP
status of section 6); none raises out of its handler (no 1011, no 500, no traceback).
``REALTIME_FUZZ_EXAMPLES`` sets the examples per property (default 40 here; CI nights run
more, e.g. ``REALTIME_FUZZ_EXAMPLES=2000 make test``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from realtime import protocol as p
from realtime.auth import mint_token
from realtime.protocol import CODECS, JSON, MSGPACK, ProtocolViolation
from tests.server import API_KEY, JWT_SECRET, ROOT, free_port, server_env

EXAMPLES = int(os.environ.get("REALTIME_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize="REALTIME_FUZZ_SEED" not in os.environ,
)
pytestmark = pytest.mark.timeout(max(120, EXAMPLES * 2))

#: Close codes a hostile frame may get (section 1); 1011 (internal error) is never one.
CONTRACT_CLOSES = {1000, 1009, 4000, 4001, 4029}

# ------------------------------------------------------------------------------ strategies

lone_surrogates = st.sampled_from(["\ud800", "x\udfff", "\udbff\udc00\ud800"])
texts = st.text(max_size=12) | lone_surrogates
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | texts
    | st.binary(max_size=8)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
)
keys = texts | st.integers(-3, 3) | st.booleans()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=16,
)
ops = st.sampled_from([op.value for op in p.Op] + ["nope", ""]) | values
channels = st.sampled_from(["broadcast", "user:fuzz", "artist:x", "premium:y", "nope:", ""])
commands = st.fixed_dictionaries(
    {"id": st.integers(min_value=1, max_value=2**63 - 1), "op": ops},
    optional={
        "token": texts | values,
        "channel": channels | values,
        "event": st.sampled_from(["e", "spending.x", "presence", ""]) | values,
        "data": values,
        "since": st.fixed_dictionaries({"epoch": texts, "offset": values}) | values,
        "channels": st.lists(st.fixed_dictionaries({"channel": channels}), max_size=3) | values,
        "client": values,
        "limit": values,
        "presence": values,
    },
)


# ------------------------------------------------------------------------------ sans I/O


@FUZZ
@given(value=values)
def test_what_unsendable_lets_through_encodes_in_both_codecs(value: Any) -> None:
    message = {"type": "event", "data": {"v": value}}
    if p.unsendable(message) is None:
        for codec in CODECS:
            assert codec.encode(message)
        assert json.loads(JSON.dumps(message)) is not None


@FUZZ
@given(data=st.binary(max_size=64), binary=st.booleans())
def test_decoding_any_bytes_is_a_map_or_a_violation(data: bytes, binary: bool) -> None:
    for codec in CODECS:
        try:
            assert isinstance(codec.decode(data, binary=binary), dict)
        except ProtocolViolation:
            pass


@FUZZ
@given(message=commands)
def test_every_map_parses_to_a_command_or_an_error(message: dict[str, Any]) -> None:
    parsed = p.parse_command(message)
    assert isinstance(parsed, (p.CommandError, *typing.get_args(p.Command)))
    if isinstance(parsed, p.CommandError):
        assert parsed.error.code in set(p.ErrorCode)


def test_unsendable_names_each_kind() -> None:
    assert p.unsendable({"a": [1, 2.5, "x", None, True, {"b": -(2**63)}, 2**64 - 1]}) is None
    for bad in (math.nan, math.inf, 2**64, -(2**63) - 1, "\ud800", b"x", msgpack.ExtType(1, b"")):
        assert p.unsendable({"v": [bad]}) is not None, bad
    assert p.unsendable({1: "x"}) == "a map key that is not a string"
    assert p.unsendable([[[[]]]] * 3) is None
    deep: Any = []
    for _ in range(100_000):  # iterative: no RecursionError
        deep = [deep]
    assert p.unsendable(deep) is None


# ------------------------------------------------------------------------------ real server


class SyncServer:
    """``python -m realtime serve`` for a module of synchronous (hypothesis) tests."""

    def __init__(self) -> None:
        self.port = free_port()
        env = server_env({"REALTIME_PORT": str(self.port)})
        fd, name = tempfile.mkstemp(prefix="realtime-fuzz-", suffix=".log")
        self.log_path = Path(name)
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "realtime", "serve"],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            assert self.proc.wait(20) == 0, self.log()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server() -> Iterator[SyncServer]:
    running = SyncServer()
    yield running
    assert "Traceback" not in running.log(), running.log()
    running.stop()


def _frame(message: dict[str, Any], binary: bool) -> str | bytes | None:
    """The message in one codec, or None when the codec cannot carry it."""
    try:
        if binary:
            return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]
        return json.dumps(message)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError):
        return None


def _answer(ws: Any, cid: int) -> dict[str, Any] | int:
    """The reply to ``cid`` (pushed messages skipped), or the close code."""
    try:
        while True:
            raw = ws.recv(timeout=5)
            reply = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
            if reply.get("id") == cid and "type" not in reply:
                return reply  # type: ignore[no-any-return]
    except ConnectionClosed:
        return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else 1006


@FUZZ
@given(message=commands, binary=st.booleans(), login=st.booleans())
def test_every_frame_gets_a_contract_answer(
    server: SyncServer, message: dict[str, Any], binary: bool, login: bool
) -> None:
    frame = _frame(message, binary)
    if frame is None:
        return
    subprotocol = "piggybong.v1.msgpack" if binary else "piggybong.v1.json"
    with connect(f"ws://127.0.0.1:{server.port}/v1/ws", subprotocols=[subprotocol]) as ws:  # type: ignore[list-item]
        if login:
            user = uuid.uuid4().hex
            token = mint_token(JWT_SECRET, user, tier="paid")
            hello = {"id": 1, "op": "connect", "token": token}
            ws.send(msgpack.packb(hello) if binary else json.dumps(hello))
            assert "result" in _answer(ws, 1)  # type: ignore[operator]
        ws.send(frame)
        answer = _answer(ws, message["id"])
        if isinstance(answer, int):
            assert answer in CONTRACT_CLOSES, (answer, message)
        else:
            assert ("result" in answer) != ("error" in answer), answer
            if "error" in answer:
                assert answer["error"]["code"] != "internal", answer


http_bodies = (
    st.binary(max_size=64)
    | values.map(lambda v: json.dumps(v, default=repr).encode())
    | st.fixed_dictionaries(
        {"channel": channels | values, "event": st.just("e") | values},
        optional={"data": values, "id": texts | values},
    ).map(lambda v: json.dumps(v, default=repr).encode("utf-8", "surrogatepass"))
    | st.lists(st.fixed_dictionaries({"channel": channels, "event": st.just("e")}), max_size=3)
    .map(json.dumps)
    .map(str.encode)
    | st.sampled_from(
        [
            b'{"channel": "broadcast", "event": "e", "data": {"v": NaN}}',
            b'{"channel": "broadcast", "event": "e", "data": {"v": 1e999}}',
            b'{"channel": "broadcast", "event": "e", "id": "\\ud800"}',
            b'{"channel": "broadcast", "event": "e", "data": {"v": 99999999999999999999999}}',
            b"[" * 100_000,
        ]
    )
)


@FUZZ
@given(
    path=st.sampled_from(["/v1/publish", "/v1/notifications", "/v1/devices"]),
    body=http_bodies,
)
def test_every_http_body_gets_a_contract_status(server: SyncServer, path: str, body: bytes) -> None:
    answer = httpx.post(
        f"{server.url}{path}",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"},
        timeout=10,
    )
    assert answer.status_code in {202, 204, 400, 413, 422}, (answer.status_code, answer.text)
    if answer.status_code >= 400:
        assert answer.json()["error"]["code"], answer.text


def test_msgpack_codec_refuses_nothing_it_can_read() -> None:
    """A msgpack frame holding bin data decodes (the refusal is a bad_request, not a 4000)."""
    decoded = MSGPACK.decode(msgpack.packb({"id": 1, "data": b"x"}, use_bin_type=True), binary=True)
    assert p.unsendable(decoded) is not None
