"""An asyncio client of PiggyBong Realtime that does what a good app client does.

- Reconnects with exponential backoff and full jitter (``Backoff``); a close 1001
  (a server draining or restarting) reconnects at once; a refusal that says when to come
  back (a connect error's ``retry_after``, a handshake's ``Retry-After``) waits at least
  that long, plus up to as long again of jitter.
- Gets its token from a callback, at every connect and before ``exp`` (``refresh``).
- Keeps, per channel, the ``(epoch, offset)`` of the last publication it handled, and
  resumes every channel with ``since`` in one ``connect``.
- Hands each publication to ``on_event`` once and in offset order: a live event past
  the next offset makes it fetch the gap with ``history`` first; one at or below the
  last offset is dropped. ``recovered: false`` calls ``on_resync(channel)``: the app
  refetches that channel's state from its backend.

Section 9 of docs/protocol.md describes the same algorithm for other languages.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.proxy import get_proxy
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

log = logging.getLogger("piggybong_client")

#: A publication handed to the app: the ``event`` message (or a ``batch`` item with its
#: channel), with its ``offset``.
EventHandler = Callable[[dict[str, Any]], Awaitable[None] | None]
ChannelHandler = Callable[[str], Awaitable[None] | None]
TokenProvider = Callable[[], Awaitable[str]]

#: Seconds before ``exp`` at which the token is refreshed.
REFRESH_MARGIN = 60.0
#: Publications asked for per ``history`` call while filling a gap (the server's maximum).
HISTORY_PAGE = 100
#: Seconds a handshake may take before the client gives up and reconnects. A node lets a
#: reconnecting crowd in in arrival order (section 11 of docs/protocol.md), so a late
#: ``101`` is a place in its queue, and one given up is taken again at the back; a node
#: that is gone refuses or resets the TCP connect at once.
OPEN_TIMEOUT = 30.0
#: The longest wait a server's ``retry_after`` is taken for (longer: the backoff's own).
MAX_RETRY_AFTER = 300.0


class ClientError(Exception):
    """An error reply: ``code``, ``message`` and ``retry_after`` as the server sent them."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = str(error.get("code"))
        self.retry_after = error.get("retry_after")


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base*2^n))."""

    base: float = 0.5
    cap: float = 30.0
    rand: Callable[[], float] = random.random
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2.0 ** min(self.attempt, 32))
        self.attempt += 1
        return self.rand() * ceiling

    def reset(self) -> None:
        self.attempt = 0


def retry_after(exc: BaseException) -> float | None:
    """The seconds a refusal asked the client to wait: a connect error's ``retry_after``,
    or the ``Retry-After`` (seconds) of a refused handshake; None when it said nothing."""
    if isinstance(exc, ClientError):
        value: object = exc.retry_after
    elif isinstance(exc, InvalidStatus):
        value = exc.response.headers.get("Retry-After")
    else:
        return None
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return seconds if 0 < seconds <= MAX_RETRY_AFTER else None


@dataclass
class Position:
    """What the client last handled on a channel."""

    epoch: str
    offset: int


@dataclass
class Stats:
    """What happened, for tests and the load-test harness."""

    connects: int = 0
    #: ``time.time()`` of the last ``connect`` answered (0: none yet)
    connected_at: float = 0.0
    recovered: int = 0
    resyncs: int = 0
    gaps_filled: int = 0
    duplicates_dropped: int = 0
    refreshes: int = 0


@dataclass
class _Pending:
    future: asyncio.Future[dict[str, Any]]
    #: run by the reader with the result before any later frame is read
    on_result: Callable[[dict[str, Any]], Awaitable[None]] | None = None


@dataclass
class _Channel:
    """A followed channel: the last position handled; a buffer while a gap is fetched."""

    position: Position | None = None
    buffer: list[dict[str, Any]] | None = None


@dataclass
class Client:
    """See the module docstring. ``run()`` until ``close()``; subscribe at any time."""

    url: str
    token: TokenProvider
    on_event: EventHandler
    on_resync: ChannelHandler | None = None
    on_notification: EventHandler | None = None
    binary: bool = False
    backoff: Backoff = field(default_factory=Backoff)
    command_timeout: float = 10.0
    stats: Stats = field(default_factory=Stats)
    connected: asyncio.Event = field(default_factory=asyncio.Event)
    channels: dict[str, _Channel] = field(default_factory=dict)
    _ws: ClientConnection | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, _Pending] = field(default_factory=dict)
    _fills: set[asyncio.Task[None]] = field(default_factory=set)
    _closing: bool = False
    _proxy_of: tuple[str, str | None] | None = None

    # ------------------------------------------------------------------ the app's calls

    def position(self, channel: str) -> Position | None:
        state = self.channels.get(channel)
        return None if state is None else state.position

    async def subscribe(self, channel: str) -> None:
        """Follow ``channel`` from now on (and across reconnects)."""
        if channel in self.channels:
            return
        self.channels[channel] = _Channel()
        if self._ws is not None:

            async def settle(result: dict[str, Any]) -> None:
                await self._settle(channel, None, result)

            await self._command("subscribe", settle, channel=channel)

    async def publish(self, channel: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        return await self._command("publish", None, channel=channel, event=event, data=data)

    async def history(
        self, channel: str, since: Position | None = None, limit: int = HISTORY_PAGE
    ) -> dict[str, Any]:
        fields: dict[str, Any] = {"channel": channel, "limit": limit}
        if since is not None:
            fields["since"] = {"epoch": since.epoch, "offset": since.offset}
        return await self._command("history", None, **fields)

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None:
            await self._ws.close()

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Connect, serve, reconnect (backoff, jitter) until ``close()``; a refused
        handshake (an HTTP status from a load balancer or a busy node) is retried too."""
        while not self._closing:
            code: int | None = None
            told: float | None = None
            try:
                code = await self._session()
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError, ClientError) as exc:
                log.info("session ended: %s", exc)
                told = retry_after(exc)
            if self._closing:
                return
            if code == 1001:  # draining or restarting: somewhere else, now
                self.backoff.reset()
            delay = self.backoff.next_delay()
            if told is not None:  # when to come back, spread so a crowd does not return at once
                delay = max(delay, told * (1.0 + self.backoff.rand()))
            await asyncio.sleep(delay)

    async def _session(self) -> int | None:
        subprotocol = Subprotocol("piggybong.v1.msgpack" if self.binary else "piggybong.v1.json")
        async with connect(
            self.url,
            subprotocols=[subprotocol],
            compression=None,
            open_timeout=OPEN_TIMEOUT,
            proxy=self._proxy(),
        ) as ws:
            self._ws = ws
            reader = asyncio.create_task(self._read(ws))
            refresher: asyncio.Task[None] | None = None
            try:
                token = await self.token()
                wanted = {name: state.position for name, state in self.channels.items()}
                entries = [
                    {"channel": name, **({"since": vars(p)} if p is not None else {})}
                    for name, p in wanted.items()
                ]

                async def resume(result: dict[str, Any]) -> None:
                    for name, entry in result.get("channels", {}).items():
                        self.channels.setdefault(name, _Channel())
                        await self._settle(name, wanted.get(name), entry)

                await self._command("connect", resume, token=token, channels=entries)
                self.stats.connects += 1
                self.stats.connected_at = time.time()
                self.backoff.reset()
                refresher = asyncio.create_task(self._refresh_loop(token))
                self.connected.set()
                await reader
            finally:
                self.connected.clear()
                self._ws = None
                for task in (reader, refresher, *self._fills):
                    if task is not None:
                        task.cancel()
                        with contextlib.suppress(BaseException):
                            await task
                for pending in self._pending.values():
                    if not pending.future.done():
                        pending.future.set_exception(ConnectionError("connection lost"))
                self._pending.clear()
                for state in self.channels.values():
                    state.buffer = None  # resumed from its position at the next connect
            return ws.close_code

    def _proxy(self) -> str | None:
        """The proxy for ``url`` from the environment (``https_proxy``, ``no_proxy``…),
        read once per URL, not at every reconnect (websockets reads the whole environment
        each time)."""
        if self._proxy_of is None or self._proxy_of[0] != self.url:
            self._proxy_of = (self.url, get_proxy(parse_uri(self.url)))
        return self._proxy_of[1]

    async def _read(self, ws: ClientConnection) -> None:
        async for frame in ws:
            message = self._decode(frame)
            cid = message.get("id")
            if "type" not in message and isinstance(cid, int):
                pending = self._pending.pop(cid, None)
                if pending is None or pending.future.done():
                    continue
                if pending.on_result is not None and "result" in message:
                    await pending.on_result(message["result"])
                pending.future.set_result(message)
                continue
            kind = message.get("type")
            if kind == "event":
                await self._live(message["channel"], [message])
            elif kind == "batch":
                items = [{**item, "channel": message["channel"]} for item in message["items"]]
                await self._live(message["channel"], items)
            elif kind == "notification" and self.on_notification is not None:
                await _call(self.on_notification, message)

    # ------------------------------------------------------------------ positions

    async def _settle(self, channel: str, since: Position | None, result: dict[str, Any]) -> None:
        """A subscribe (or connect entry) result, before any later frame: the recovered
        publications, or a resync; then the position is the result's."""
        state = self.channels.setdefault(channel, _Channel())
        epoch, offset = result["epoch"], result["offset"]
        if since is not None and "recovered" in result:
            if result["recovered"]:
                self.stats.recovered += 1
                for publication in result.get("publications", []):
                    if publication["offset"] > since.offset:
                        await _call(self.on_event, publication)
            else:
                self.stats.resyncs += 1
                if self.on_resync is not None:
                    await _call(self.on_resync, channel)
        state.position = Position(epoch, offset)

    async def _live(self, channel: str, items: list[dict[str, Any]]) -> None:
        state = self.channels.get(channel)
        for item in items:
            if state is None or state.position is None or not isinstance(item.get("offset"), int):
                await _call(self.on_event, item)
                continue
            if state.buffer is not None:
                state.buffer.append(item)
                continue
            offset = item["offset"]
            if offset <= state.position.offset:
                self.stats.duplicates_dropped += 1
            elif offset > state.position.offset + 1:
                state.buffer = [item]  # held while the gap is fetched
                task = asyncio.create_task(self._fill(channel, state))
                self._fills.add(task)
                task.add_done_callback(self._fills.discard)
            else:
                await _call(self.on_event, item)
                state.position.offset = offset

    async def _fill(self, channel: str, state: _Channel) -> None:
        """Fetch the gap before the first held item with ``history``, hand it over, then
        the held items in order."""
        position = state.position
        assert position is not None and state.buffer
        until = state.buffer[0]["offset"]
        try:
            while position.offset + 1 < until:
                page = await self.history(channel, position)
                if page["epoch"] != position.epoch:
                    self.stats.resyncs += 1
                    if self.on_resync is not None:
                        await _call(self.on_resync, channel)
                    position.epoch = page["epoch"]
                    break
                publications = [p for p in page["publications"] if p["offset"] < until]
                for publication in publications:
                    await _call(self.on_event, publication)
                    position.offset = publication["offset"]
                    self.stats.gaps_filled += 1
                if len(page["publications"]) < HISTORY_PAGE or not publications:
                    break  # the rest are premium-only holes for this tier, or gone
        except (ClientError, ConnectionError, TimeoutError) as exc:
            log.warning("could not fill a gap in %s: %s", channel, exc)
        held, state.buffer = state.buffer or [], None
        for item in held:
            if item["offset"] > position.offset:
                await _call(self.on_event, item)
                position.offset = item["offset"]
            else:
                self.stats.duplicates_dropped += 1

    # ------------------------------------------------------------------ token refresh

    async def _refresh_loop(self, token: str) -> None:
        while True:
            exp = token_expiry(token)
            if exp is None:
                return
            await asyncio.sleep(max(1.0, exp - time.time() - REFRESH_MARGIN))
            token = await self.token()
            await self._command("refresh", None, token=token)
            self.stats.refreshes += 1

    # ------------------------------------------------------------------ wire

    async def _command(
        self,
        op: str,
        on_result: Callable[[dict[str, Any]], Awaitable[None]] | None,
        **fields: Any,
    ) -> dict[str, Any]:
        ws = self._ws
        if ws is None:
            raise ConnectionError("not connected")
        cid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[cid] = _Pending(future, on_result)
        await ws.send(self._encode({"id": cid, "op": op, **fields}))
        async with asyncio.timeout(self.command_timeout):
            reply = await future
        if "error" in reply:
            raise ClientError(reply["error"])
        result: dict[str, Any] = reply["result"]
        return result

    def _encode(self, message: dict[str, Any]) -> str | bytes:
        if self.binary:
            packed: bytes = msgpack.packb(message, use_bin_type=True)
            return packed
        return json.dumps(message)

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        value = msgpack.unpackb(frame, raw=False) if isinstance(frame, bytes) else json.loads(frame)
        assert isinstance(value, dict)
        return value


def token_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT (not verified: the server does that), or None."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError):
        return None


async def _call(handler: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
    result = handler(arg)
    if result is not None:
        await result
