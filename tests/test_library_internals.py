"""The library internals this server reaches into, checked against the installed releases.

realtime/wsprotocol.py subclasses uvicorn's sans-I/O WebSocket protocol and replaces the
parser of websockets' ``ServerProtocol``; realtime/httpprotocol.py subclasses uvicorn's
httptools protocol. pyproject.toml caps both libraries below their next minor release;
when an upgrade moves one of these names, this test fails naming it, before production does.
"""

from __future__ import annotations

import ast
import inspect
import re
import tomllib
from pathlib import Path

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import Protocol as SansIOProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.version import version as websockets_version

from realtime.wsprotocol import RealtimeWSProtocol

ROOT = Path(__file__).resolve().parent.parent

#: Methods realtime/ overrides or calls, with the parameters it passes.
METHODS: list[tuple[type, str, list[str]]] = [
    (WebSocketsSansIOProtocol, "__init__", ["self", "config", "server_state", "app_state"]),
    (WebSocketsSansIOProtocol, "handle_connect", ["self", "event"]),
    (WebSocketsSansIOProtocol, "send", ["self", "message"]),
    (WebSocketsSansIOProtocol, "schedule_ping", ["self"]),
    (WebSocketsSansIOProtocol, "send_keepalive_ping", ["self"]),
    (WebSocketsSansIOProtocol, "stop_keepalive", ["self"]),
    (WebSocketsSansIOProtocol, "send_receive_event_to_app", ["self"]),
    (WebSocketsSansIOProtocol, "pause_writing", ["self"]),
    (WebSocketsSansIOProtocol, "resume_writing", ["self"]),
    (WebSocketsSansIOProtocol, "shutdown", ["self"]),
    (WebSocketsSansIOProtocol, "connection_lost", ["self", "exc"]),
    (WebSocketsSansIOProtocol, "on_task_complete", ["self", "task"]),
    (WebSocketsSansIOProtocol, "receive", ["self"]),
    (WebSocketsSansIOProtocol, "connection_made", ["self", "transport"]),
    (WebSocketsSansIOProtocol, "handle_ping", ["self"]),
    (HttpToolsProtocol, "handle_websocket_upgrade", ["self"]),
    (HttpToolsProtocol, "connection_made", ["self", "transport"]),
    (HttpToolsProtocol, "connection_lost", ["self", "exc"]),
    (HttpToolsProtocol, "data_received", ["self", "data"]),
    (HttpToolsProtocol, "on_message_begin", ["self"]),
    (HttpToolsProtocol, "on_headers_complete", ["self"]),
    (HttpToolsProtocol, "timeout_keep_alive_handler", ["self"]),
    (HttpToolsProtocol, "_unset_keepalive_if_required", ["self"]),
    (HttpToolsProtocol, "_should_upgrade", ["self"]),
    (HttpToolsProtocol, "_unsupported_upgrade_warning", ["self"]),
    (HttpToolsProtocol, "send_400_response", ["self", "msg"]),
    (SansIOProtocol, "parse", ["self"]),
    (SansIOProtocol, "send_close", ["self", "code", "reason"]),
    (SansIOProtocol, "data_to_send", ["self"]),
]

#: Instance attributes realtime/ reads or replaces, per class: each must still be set
#: somewhere in that class's own source (``self.<name> =``).
ATTRIBUTES: list[tuple[type, list[str]]] = [
    (
        WebSocketsSansIOProtocol,
        [
            "conn",
            "queue",
            "writable",
            "logger",
            "scope",
            "request",
            "response",
            "handshake_complete",
            "ping_interval",
            "last_ping_rtt",
            "frames",
            "curr_msg_data_type",
            "close_sent",
            "read_paused",
            "transport",
            "close_timer",
            "loop",
            "app_state",
            "client",
        ],
    ),
    (
        HttpToolsProtocol,
        [
            "parser",
            "app_state",
            "client",
            "cycle",
            "url",
            "headers",
            "scope",
            "transport",
            "timeout_keep_alive",
            "timeout_keep_alive_task",
            "ws_protocol_class",
            "config",
            "server_state",
            "connections",
            "logger",
            "loop",
        ],
    ),
    (SansIOProtocol, ["reader", "parser", "parser_exc", "state", "logger"]),
]


def _params(owner: type, name: str) -> list[str]:
    return list(inspect.signature(getattr(owner, name)).parameters)[:4]


@pytest.mark.parametrize(
    ("owner", "name", "params"), METHODS, ids=[f"{o.__name__}.{n}" for o, n, _ in METHODS]
)
def test_overridden_methods_are_where_we_left_them(
    owner: type, name: str, params: list[str]
) -> None:
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    assert hasattr(owner, name), (
        f"{where} is gone in this release of {owner.__module__.split('.')[0]}: "
        "realtime/wsprotocol.py or httpprotocol.py relies on it"
    )
    got = _params(owner, name)[: len(params)]
    assert got == params, f"{where} now takes {got}, realtime/ was written for {params}"


@pytest.mark.parametrize(("owner", "names"), ATTRIBUTES, ids=[o.__name__ for o, _ in ATTRIBUTES])
def test_instance_attributes_are_still_set(owner: type, names: list[str]) -> None:
    source = "".join(
        inspect.getsource(cls)
        for cls in owner.__mro__
        if cls.__module__.split(".")[0] in {"uvicorn", "websockets"}
    )
    missing = [n for n in names if not re.search(rf"self\.{n}\s*(:[^=]*)?=", source)]
    assert not missing, (
        f"{owner.__module__}.{owner.__qualname__} no longer sets {missing}: "
        "realtime/wsprotocol.py reads or replaces them"
    )


def _set_on_self(cls: type, *, init: bool) -> set[str]:
    """The names ``cls``'s ``__init__`` (``init``), or its other methods, assign to ``self``."""
    names: set[str] = set()
    for fn in ast.walk(ast.parse(inspect.getsource(cls))):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        if (fn.name == "__init__") != init:
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                targets = [node.target]
            else:
                continue
            for target in targets:
                for t in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(t, ast.Attribute) and ast.unparse(t.value) == "self":
                        names.add(t.attr)
    return names


def test_uvicorn_starting_values_are_all_provided() -> None:
    """RealtimeWSProtocol.__init__ replaces uvicorn's: every attribute uvicorn's sets is
    one the class provides (a server-wide ``_Share`` slot, a default, a property) or
    ours sets."""
    ours = _set_on_self(RealtimeWSProtocol, init=True)
    missing = {
        name
        for name in _set_on_self(WebSocketsSansIOProtocol, init=True)
        if name not in ours and not hasattr(RealtimeWSProtocol, name)
    }
    assert not missing, f"uvicorn's __init__ sets {sorted(missing)}; ours does not"


def test_a_connection_keeps_its_compact_attribute_storage() -> None:
    """CPython 3.11 keeps an instance's attributes in a compact array shared with its class's
    keys while the class's instances set at most 29 names between them; past that, each
    instance that sets another gets a dict of its own (1.6 KB per idle connection)."""
    names = _set_on_self(RealtimeWSProtocol, init=True)
    names |= _set_on_self(RealtimeWSProtocol, init=False)
    names |= _set_on_self(WebSocketsSansIOProtocol, init=False)
    names |= {"ticket", "client"}  # set by realtime/httpprotocol.py at the upgrade
    names.add("ping_bucket")  # set by the PingWheel
    assert len(names) <= 29, sorted(names)


def test_states_and_parser_class() -> None:
    assert {"CONNECTING", "OPEN", "CLOSING", "CLOSED"} <= set(State.__members__), (
        "websockets.protocol.State changed its members"
    )
    assert issubclass(ServerProtocol, SansIOProtocol), (
        "websockets.server.ServerProtocol no longer derives from websockets.protocol.Protocol"
    )


def _upper_bound(name: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(rf"{name}\b", d))
    found = re.search(r"<\s*([0-9.]+)", spec)
    assert found, f"pyproject.toml gives {name} no upper bound: {spec}"
    return tuple(int(p) for p in found.group(1).split("."))


@pytest.mark.parametrize(
    ("name", "version"), [("uvicorn", uvicorn.__version__), ("websockets", websockets_version)]
)
def test_installed_release_is_below_the_cap(name: str, version: str) -> None:
    installed = tuple(int(p) for p in re.findall(r"\d+", version)[:3])
    assert installed < _upper_bound(name), f"{name} {version} is above pyproject.toml's cap"
