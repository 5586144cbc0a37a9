"""The history seam (realtime/history.py) on Redis: one Lua script per publication.

Per channel ``<ch>``: a stream ``rt:h:{<ch>}`` whose entry ids are the offsets
(``<offset>-0``, field ``d`` the envelope), a meta hash ``rt:m:{<ch>}`` (``e`` the
epoch, ``s`` the latest offset), and per idempotency key a result hash
``rt:r:{<ch>}:<key>`` (the first publication's epoch and offset). All keys of a
channel share its hash tag, so a script stays atomic on a cluster too.

``lua/history_publish.lua`` checks the key, takes the next offset, appends
(exact ``MAXLEN``), refreshes the stream's TTL and PUBLISHes the framed
envelope, in one atomic step. It refuses to run past a deadline: a script
that Redis reaches only after the node gave up (a stalled Redis resumed) does
nothing, so an answer of 503 means "not published". The node waits
``DEADLINE_MARGIN`` beyond the deadline before it gives up, which assumes the
node's and Redis's clocks agree within that margin (NTP).

Scripts run by EVALSHA on the broker's pipelined command connection, so
concurrent publishes share round trips; NOSCRIPT (Redis restarted) falls back
to EVAL once. On a Redis Cluster the broker (realtime/redis_cluster_broker.py) sends
each script to the master of its keys' slot and the script SPUBLISHes to the shard
channel ``rt:{<ch>}``, in that same slot.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Final, Protocol

from realtime.broker import BrokerUnavailable
from realtime.history import (
    DEFAULT_RESULT_TTL,
    Entry,
    HistoryUnavailable,
    Page,
    Position,
    Publication,
    Published,
    new_epoch,
)

log = logging.getLogger("realtime.history")

#: Seconds a channel keeps its epoch and offset after its last publication or read: much
#: longer than any history, so that offsets never restart under a client's position.
META_TTL: Final = 30 * 86_400
#: Seconds the node waits beyond a script's deadline before it answers "not published".
DEADLINE_MARGIN: Final = 0.5
#: Seconds a publish script may start after it was sent.
DEFAULT_TIMEOUT: Final = 4.5

_LUA = Path(__file__).parent / "lua"
_META_TTL: Final = b"%d" % META_TTL
#: Channels whose Redis key names are kept made (all are dropped beyond).
_KEYS_KEPT: Final = 10_000
_STATUS_DUPLICATE: Final = 1
_STATUS_LATE: Final = 2


class ScriptBroker(Protocol):
    """What the history needs of the Redis broker it shares connections with."""

    #: PUBLISH, or SPUBLISH (sharded pub/sub on a Redis Cluster)
    publish_command: bytes

    def channel_key(self, channel: str) -> bytes:
        """The Redis (shard) channel of ``channel``."""
        ...

    async def command(
        self, *args: bytes, timeout: float | None = None, replid_at: int | None = None
    ) -> object:
        """One command on a pipelined connection, its reply; raises BrokerUnavailable (no
        answer in time) or an error reply. ``replid_at``: that argument becomes the
        replication id of the server it runs on."""
        ...

    async def pipeline(
        self, commands: Sequence[tuple[tuple[bytes, ...], int | None]], *, timeout: float
    ) -> list[object]:
        """``commands`` (each with its ``replid_at``) sent in one write in this order, on
        one connection (one master on a cluster: keys of one slot); each one's reply or
        error reply in its place. Raises BrokerUnavailable (no answer in time)."""
        ...


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, name: str, prelude: str | None = None) -> None:
        head = (_LUA / prelude).read_bytes() if prelude else b""
        self.source = head + (_LUA / name).read_bytes()
        self.sha = hashlib.sha1(self.source).hexdigest().encode()


_PUBLISH = _Script("history_publish.lua", "history_epoch.lua")
_READ = _Script("history_read.lua", "history_epoch.lua")


def stream_key(channel: str) -> bytes:
    return b"rt:h:{%s}" % channel.encode()


def meta_key(channel: str) -> bytes:
    return b"rt:m:{%s}" % channel.encode()


def result_key(channel: str, key: str) -> bytes:
    return b"rt:r:{%s}:%s" % (channel.encode(), key.encode())


class RedisHistory:
    """The History seam over Redis; see the module docstring and ``History``'s contract."""

    def __init__(
        self,
        broker: ScriptBroker,
        *,
        result_ttl: float = DEFAULT_RESULT_TTL,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self._command = broker.command
        self._pipeline = broker.pipeline
        self._channel_key = broker.channel_key
        self._publish_command = broker.publish_command
        self._result_ttl_ms = b"%d" % int(result_ttl * 1000)
        self._timeout = timeout
        self._closed = False
        #: channel -> its stream, its meta, its result keys' prefix, its pub/sub channel
        self._keys: dict[str, tuple[bytes, bytes, bytes, bytes]] = {}

    def _channel_keys(self, channel: str) -> tuple[bytes, bytes, bytes, bytes]:
        keys = self._keys.get(channel)
        if keys is None:
            if len(self._keys) >= _KEYS_KEPT:
                self._keys.clear()
            keys = (
                stream_key(channel),
                meta_key(channel),
                result_key(channel, ""),
                self._channel_key(channel),
            )
            self._keys[channel] = keys
        return keys

    def _call(self, script: _Script, head: Sequence[bytes], *, source: bool) -> Awaitable[object]:
        """EVALSHA (EVAL with ``source``) of ``script`` with ``head``: the number of keys,
        the keys, the arguments; the last argument becomes the server's replication id
        (the broker's ``replid_at``)."""
        wait = self._timeout + DEADLINE_MARGIN
        at = 2 + len(head) - 1
        if source:
            return self._command(b"EVAL", script.source, *head, timeout=wait, replid_at=at)
        return self._command(b"EVALSHA", script.sha, *head, timeout=wait, replid_at=at)

    async def publish(self, items: Sequence[Publication]) -> list[Published | HistoryUnavailable]:
        if self._closed:
            return [HistoryUnavailable("history closed") for _ in items]
        deadline = b"%d" % int((time.time() + self._timeout) * 1000)
        if len(items) == 1:  # the common case: no task to gather
            return [await self._publish_one(items[0], deadline)]
        # Started in list order in one tick: one pipelined write, a channel's items in order.
        return list(await asyncio.gather(*(self._publish_one(item, deadline) for item in items)))

    async def _publish_one(
        self, item: Publication, deadline: bytes
    ) -> Published | HistoryUnavailable:
        channel = item.channel
        stream, meta, results, pubsub = self._channel_keys(channel)
        limits = item.limits
        args = (
            item.payload,
            b"%d" % limits.size,
            b"%d" % limits.ttl_s,
            pubsub,
            _META_TTL,
            new_epoch().encode(),
            self._result_ttl_ms,
            deadline,
            self._publish_command,
            b"",  # the replication id
        )
        if item.key is None:
            head: tuple[bytes, ...] = (b"2", stream, meta, *args)
        else:
            head = (b"3", stream, meta, results + item.key.encode(), *args)
        try:
            try:
                reply = await self._call(_PUBLISH, head, source=False)
            except BrokerUnavailable:
                raise
            except Exception as exc:  # an error reply
                if not _noscript(exc):
                    raise
                # A restarted Redis lost the script: EVAL it (it was not run).
                reply = await self._call(_PUBLISH, head, source=True)
        except BrokerUnavailable as exc:
            return HistoryUnavailable(f"not published: {exc}")
        except Exception as exc:
            log.error("history publish script failed on %s: %s", channel, exc)
            return HistoryUnavailable(f"not published: {exc}")
        offset, epoch, status = _triple(reply)
        if status == _STATUS_LATE:
            return HistoryUnavailable("not published: redis did not run it in time")
        return Published(offset, epoch, duplicate=status == _STATUS_DUPLICATE)

    async def read(self, channel: str, since: int | None, limit: int) -> Page:
        if self._closed:
            raise HistoryUnavailable("history closed")
        head = (b"1", meta_key(channel), new_epoch().encode(), _META_TTL, b"")
        at = 2 + len(head) - 1  # the replication id: the script's last argument
        commands: list[tuple[tuple[bytes, ...], int | None]]
        commands = [((b"EVALSHA", _READ.sha, *head), at)]
        if limit > 0:
            stream, count = stream_key(channel), b"%d" % limit
            if since is None:
                read = (b"XREVRANGE", stream, b"+", b"-", b"COUNT", count)
            else:
                read = (b"XRANGE", stream, b"%d-0" % (since + 1), b"+", b"COUNT", count)
            commands.append((read, None))
        wait = self._timeout + DEADLINE_MARGIN
        for source in (False, True):
            if source:  # NOSCRIPT: EVAL, and the entries again (they were read before it)
                commands[0] = ((b"EVAL", _READ.source, *head), at)
            # One write, in this order: the XRANGE runs right after the script on the same
            # connection (the same master on a cluster: one slot).
            try:
                replies = await self._pipeline(commands, timeout=wait)
            except BrokerUnavailable as exc:
                raise HistoryUnavailable(f"history read failed: {exc}") from exc
            if not source and _noscript(replies[0]):
                continue
            for failed in replies:
                if isinstance(failed, Exception):
                    raise HistoryUnavailable(f"history read failed: {failed}") from failed
            break
        reply, raw = replies[0], (replies[1] if len(replies) > 1 else [])
        if not isinstance(reply, list) or len(reply) != 2:
            raise HistoryUnavailable(f"unexpected history reply {reply!r:.100}")
        epoch, top = reply[0], int(reply[1])
        entries = [_entry(item) for item in raw] if isinstance(raw, list) else []
        if since is None:
            entries.reverse()
        # A publication that landed between the two commands is past the position: left out.
        return Page(
            Position(_text(epoch), top), [e for e in entries if e is not None and e.offset <= top]
        )

    @property
    def ready(self) -> bool:
        return not self._closed

    async def close(self) -> None:
        self._closed = True


def _noscript(reply: object) -> bool:
    return (
        isinstance(reply, Exception)
        and not isinstance(reply, BrokerUnavailable)
        and str(reply).startswith("NOSCRIPT")
    )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _triple(reply: object) -> tuple[int, str, int]:
    if not isinstance(reply, list) or len(reply) != 3:
        raise HistoryUnavailable(f"unexpected publish reply {reply!r:.100}")
    return int(reply[0]), _text(reply[1]), int(reply[2])


def _entry(item: object) -> Entry | None:
    """One XRANGE entry ``[b"<offset>-0", [b"d", payload]]`` as an Entry."""
    if not isinstance(item, list) or len(item) != 2 or not isinstance(item[0], bytes):
        return None
    fields = item[1]
    if not isinstance(fields, list) or len(fields) < 2 or not isinstance(fields[1], bytes):
        return None
    return Entry(int(item[0].split(b"-", 1)[0]), fields[1])
