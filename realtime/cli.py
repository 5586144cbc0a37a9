"""``realtime serve`` and ``realtime token``.

Every setting is a flag of ``serve`` (``--redis-url`` for ``REALTIME_REDIS_URL``);
a flag wins over the environment. Flags are handed to the server processes as
``REALTIME_*`` variables, so Settings stays the only reader of configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError
from pydantic_settings import SettingsError
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from realtime import logs
from realtime.logs import LogFormat
from realtime.settings import DEV_API_KEY, DEV_JWT_SECRET, Settings

BANNER = """\
================================================================================
 DEV MODE: {what} not configured. Using the documented dev credentials:
   API key:    {api_key}
   JWT secret: {secret}
 Mint a token:  realtime token <user> [--tier paid]   (from a clone: .venv/bin/realtime)
 Publish:       curl -H 'Authorization: Bearer {api_key}' -d '{{"channel":"broadcast",\
"event":"hello","data":{{}}}}' http://{host}:{port}/v1/publish
 Dashboard:     http://{host}:{port}/dashboard   (any user name, password: {admin})
 Never use dev mode in production; it is refused on any host but loopback.
================================================================================"""

#: Pending connections the kernel queues for accept(); it caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="run the server",
        description="Run the server. Each flag overrides REALTIME_<NAME>.",
    )
    for name, field in Settings.model_fields.items():
        env = f"REALTIME_{name.upper()}"
        default = field.default if field.default is not None else "unset"
        help_text = f"{field.description or ''} (env {env}; default {default})"
        if field.annotation is bool:  # --reuse-port / --no-reuse-port
            serve.add_argument(
                _flag(name),
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            serve.add_argument(
                _flag(name), dest=name, default=None, metavar="VALUE", help=help_text
            )


def _apply_flags(args: argparse.Namespace) -> None:
    for name in Settings.model_fields:
        value = getattr(args, name, None)
        if value is not None:
            os.environ[f"REALTIME_{name.upper()}"] = str(value)


def refusal_lines(exc: ValidationError) -> list[str]:
    """One ``realtime: REALTIME_<NAME>: <why>`` line per error, without the value given (a
    secret, a key or a Redis password must not reach a log) nor pydantic's boilerplate."""
    lines = []
    for error in exc.errors(include_url=False, include_context=False, include_input=False):
        why = error["msg"].removeprefix("Value error, ")
        setting = f"REALTIME_{str(error['loc'][0]).upper()}: " if error["loc"] else ""
        lines.append(f"realtime: {setting}{why}")
    return lines


def load_settings() -> Settings | int:
    """The settings, or exit status 2 once the refusal is printed (one line per setting)."""
    try:
        return Settings()
    except ValidationError as exc:
        print("\n".join(refusal_lines(exc)), file=sys.stderr)
    except SettingsError as exc:  # a value pydantic-settings could not decode; not quoted
        print(f"realtime: {str(exc).split(' from source')[0]}", file=sys.stderr)
    return 2


def serve(args: argparse.Namespace) -> int:
    _apply_flags(args)
    settings = load_settings()
    if isinstance(settings, int):
        return settings
    raise_open_files_limit()
    if settings.dev_mode:
        what = " and ".join(
            part
            for part, on in (("JWT secret", settings.dev_jwt), ("API keys", settings.dev_api))
            if on
        )
        print(
            BANNER.format(
                what=what,
                api_key=settings.effective_api_keys[0] if settings.dev_api else "(configured)",
                secret=DEV_JWT_SECRET if settings.dev_jwt else "(configured)",
                admin="(configured)" if settings.admin_token else settings.effective_admin_token,
                host=settings.host,
                port=settings.port,
            ),
            file=sys.stderr,
            flush=True,
        )
    try:
        from realtime.tiers import PolicyError, load_policy

        load_policy(settings.tier_policy)
    except PolicyError as exc:
        print(f"realtime: invalid tier policy: {exc}", file=sys.stderr)
        return 2
    config = uvicorn_config(settings)
    if settings.workers > 1:
        # Each worker drains on the SIGTERM the supervisor forwards; the supervisor exits 0.
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    elif settings.reuse_port:
        if not settings.uses_redis:
            print(
                "realtime: --reuse-port without REALTIME_REDIS_URL: each process sharing the "
                "port is a node of its own (publishes reach only its clients)",
                file=sys.stderr,
                flush=True,
            )
        try:
            sock = reuse_port_socket(settings.host, settings.port)
        except OSError as exc:
            print(
                f"realtime: cannot listen on {settings.host}:{settings.port} with SO_REUSEPORT: "
                f"{exc} (every process sharing a port needs --reuse-port and the same user)",
                file=sys.stderr,
            )
            return STARTUP_FAILURE
        logging.getLogger("realtime").info(
            "will listen on %s:%d with SO_REUSEPORT once started",
            settings.host,
            sock.getsockname()[1],
        )
        DrainingServer(config).run(sockets=[sock])
    else:
        DrainingServer(config).run()
    return 0


def raise_open_files_limit() -> int:
    """Raise the soft open-files limit to the hard one (as Go's runtime does): each
    connection is a file, and the usual soft default of 1,024 would refuse connections
    long before memory runs out. Returns the soft limit in force."""
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft >= hard:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft
    return hard


def _http_protocol() -> str:
    """Our httptools protocol where httptools is installed (a dependency), else uvicorn's h11."""
    try:
        import httptools  # noqa: F401
    except ImportError:
        return "h11"
    return "realtime.httpprotocol:RealtimeHttpToolsProtocol"


class RealtimeConfig(uvicorn.Config):
    """uvicorn's Config, except that logging is ``realtime.logs.configure``'s: uvicorn calls
    ``configure_logging`` when the config is made and again in each worker process."""

    def __init__(self, app: str, *, log_format: LogFormat = "text", **options: Any) -> None:
        self.log_format: LogFormat = log_format
        super().__init__(app, **options)

    def configure_logging(self) -> None:
        level = self.log_level if isinstance(self.log_level, str) else "info"
        logs.configure(level, self.log_format)


def uvicorn_config(settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for ``settings`` (``overrides`` for an embedding, e.g. loop).

    Making it configures logging (``realtime.logs``) in this process, at once."""
    options: dict[str, Any] = dict(
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop" if _has_uvloop() else "asyncio",
        http=_http_protocol(),
        ws="realtime.wsprotocol:RealtimeWSProtocol",
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.ping_interval,
        ws_ping_timeout=settings.ping_interval,
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=int(settings.drain_timeout + settings.close_timeout) + 1,
        log_level=settings.log_level,
        log_format=settings.log_format,
        log_config=None,
        backlog=LISTEN_BACKLOG,
        access_log=settings.log_level == "debug",
        server_header=False,
        h11_max_incomplete_event_size=settings.max_head_bytes,
        timeout_keep_alive=settings.keepalive_timeout,
        # The client address is the door's (REALTIME_TRUSTED_PROXIES), not uvicorn's.
        proxy_headers=False,
    )
    options.update(overrides)
    return RealtimeConfig("realtime.app:create_app", **options)


def reuse_port_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` with SO_REUSEADDR and SO_REUSEPORT.

    Every process that binds the same address this way gets a listening socket of
    its own; Linux spreads new connections over them by a hash of the 4-tuple. The
    socket is not listening yet: uvicorn listens (``LISTEN_BACKLOG``) once the app
    has started, so no connection waits in the queue of a process still starting.
    Raises ``OSError`` when the address is taken by a socket without SO_REUSEPORT
    (or of another user).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, except that a SIGTERM ends in exit status 0 after the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal after its shutdown; the contract says exit 0.
            self._captured_signals = [
                sig for sig in self._captured_signals if sig != signal.SIGTERM
            ]


def _has_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def token(args: argparse.Namespace) -> int:
    from realtime.auth import mint_token

    settings = Settings.model_construct()
    secret = os.environ.get("REALTIME_JWT_SECRET") or DEV_JWT_SECRET
    if os.environ.get("REALTIME_JWT_PUBLIC_KEY") and not os.environ.get("REALTIME_JWT_SECRET"):
        print(
            "realtime: the server verifies RS256/ES256 tokens; mint them with your issuer",
            file=sys.stderr,
        )
        return 2
    if not (math.isfinite(args.ttl) and args.ttl > 0):
        print("realtime: --ttl: must be a positive number of seconds", file=sys.stderr)
        return 2
    if args.tier is not None:
        from realtime.tiers import PolicyError, load_policy

        path = os.environ.get("REALTIME_TIER_POLICY")
        try:
            policy = load_policy(Path(path) if path else None)
        except PolicyError as exc:
            print(f"realtime: invalid tier policy: {exc}", file=sys.stderr)
            return 2
        if args.tier not in policy.tiers:
            known = ", ".join(sorted(policy.tiers))
            print(f"realtime: --tier: unknown tier {args.tier!r} (known: {known})", file=sys.stderr)
            return 2
    audiences = os.environ.get("REALTIME_JWT_AUDIENCES")
    audience = audiences.split(",")[0].strip() if audiences else settings.jwt_audiences[0]
    print(mint_token(secret, args.user, tier=args.tier, ttl=args.ttl, audience=audience))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="realtime", description="PiggyBong Realtime server")
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    tok = sub.add_parser("token", help="mint a JWT with the configured (or dev) secret")
    tok.add_argument("user")
    tok.add_argument(
        "--tier",
        default=None,
        help="tier claim, one the tier policy (REALTIME_TIER_POLICY) knows, e.g. paid "
        "(default: none = free)",
    )
    tok.add_argument("--ttl", type=float, default=3600.0, help="seconds until expiry (> 0)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args)
    return token(args)


__all__ = ["DEV_API_KEY", "main"]
