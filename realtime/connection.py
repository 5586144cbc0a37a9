"""One client WebSocket session: the connect deadline, its commands, its subscriptions, its
spending batches and its closes.

Its output goes through its ``Writer`` (realtime/writer.py): ordered, coalesced, bounded
(4008). The hub sees a connection as a ``Subscriber`` (realtime/hub.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from realtime import protocol as p
from realtime.auth import Principal
from realtime.backend import BackendUnavailable
from realtime.batching import SpendingBatcher
from realtime.broker import BrokerUnavailable
from realtime.channel_presence import ChannelPresenceUnavailable, Member, SessionInfo
from realtime.door import Refusal, Why
from realtime.envelope import Delivery, new_event_id, now_ms, pack_event, unpack_message
from realtime.history import Entry, HistoryUnavailable, Page, Publication
from realtime.presence import DEFAULT_TTL as PRESENCE_TTL
from realtime.presence import PresenceUnavailable
from realtime.protocol import CloseCode, Codec, Error, ErrorCode, Op, ProtocolViolation
from realtime.ratelimit import MemoryRateLimiter
from realtime.tiers import Tier
from realtime.writer import Writer, direct_socket

if TYPE_CHECKING:
    from starlette.types import Message, Receive

    from realtime.node import Node
    from realtime.wsprotocol import RealtimeWSProtocol

log = logging.getLogger("realtime.connection")

#: Rejected commands within the minute after the first ``rate_limited`` that close with 4029.
STRIKES_BEFORE_CLOSE = 10
#: Error replies a connection gets before its connect succeeds; the next error closes it 4000.
ERRORS_BEFORE_LOGIN = 3
_OPS = frozenset(op.value for op in Op)


def _op_label(message: dict[str, Any]) -> str:
    op = message.get("op")
    return op if isinstance(op, str) and op in _OPS else "unknown"


_ADMIN_ONLY = Error(ErrorCode.FORBIDDEN, "admin:stats is for the dashboard's admin sessions")
_HISTORY_DOWN = Error(ErrorCode.UNAVAILABLE, "history unavailable; retry shortly", retry_after=1.0)


class Connection:
    """A client connection from its accepted handshake to its cleanup."""

    __slots__ = (
        "_errors_before_login",
        "_receive",
        "_strike_until",
        "_strikes",
        "admin",
        "batcher",
        "client_info",
        "codec",
        "conn_id",
        "connected_at",
        "expires_at",
        "loop",
        "node",
        "peer",
        "registered",
        "subscriptions",
        "tier",
        "user",
        "wire",
        "writer",
    )

    def __init__(
        self, node: Node, wire: RealtimeWSProtocol, receive: Receive, codec: Codec, peer: str
    ) -> None:
        self.node = node
        self.wire = wire
        self._receive = receive
        self.codec = codec
        self.peer = peer
        self.loop = asyncio.get_running_loop()
        self.conn_id = f"{node.node_id}:{os.urandom(6).hex()}"
        self.user = ""
        self.tier: Tier = node.policy.resolve(node.policy.default_tier)[0]
        self.expires_at = 0.0
        self.subscriptions: set[str] = set()
        self.registered = False
        #: an admin session (the dashboard's token): may subscribe to admin channels
        self.admin = False
        #: the connect's ``client`` map and when it connected (ms): its presence session info
        self.client_info: dict[str, Any] | None = None
        self.connected_at = 0
        self.batcher: SpendingBatcher[dict[str, Any]] | None = None
        self._strikes = 0
        self._strike_until = 0.0
        self._errors_before_login = 0
        transport = wire.transport
        fd = direct_socket(transport)  # (before ``paused`` is read: it may pause the wire)
        self.writer = Writer(
            transport.write,
            wire,
            node.flushes,
            node.outbox_limits,
            node.metrics,
            paused=wire.paused,
            codec_index=codec.index,
            fd=fd,
        )

    @property
    def closed(self) -> bool:
        """Closed, closing or cleaning up: nothing more is written."""
        return self.writer.closed

    # ------------------------------------------------------------------ output

    def send(self, message: dict[str, Any]) -> None:
        self.writer.write(self.codec.encode(message))

    def close(self, code: CloseCode, reason: str = "") -> None:
        """Close with ``code`` after what was already written; drop the outbox."""
        self.writer.close(code, reason)

    # WireListener: what the socket tells its connection.

    def on_pause(self) -> None:
        self.writer.pause()

    def on_resume(self) -> None:
        self.writer.resume()

    def on_shutdown(self) -> None:
        """The server drains: flush pending batches, then what is queued, then close 1001."""
        if self.closed:
            return
        self.flush_batches(everything=True)
        self.writer.drain(self.node.settings.drain_timeout, self.loop)

    def on_lost(self) -> None:
        self.writer.stop()

    def on_control(self, data: bytes) -> None:
        """A pong: written in order with everything else, within the outbox bound."""
        self.writer.write(data)

    def fail(self, exc: BaseException, where: str) -> None:
        """The fault boundary: an unexpected error in an action on this connection taken by
        shared machinery (batch timers, expiry, flushes, fan-out) closes this connection
        with 1011 and nothing else; logged once per interval per cause, counted."""
        node = self.node
        cause = f"{where}:{type(exc).__name__}"
        node.log_throttle.exception(
            cause, exc, "closing connection %s (1011): %s failed", self.conn_id, where
        )
        if node.door is not None:
            node.door.count(Why.CONNECTION_FAULT, "ws", self.peer, where, log=False)
        try:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        except Exception:  # the socket is beyond use: no more writes
            self.writer.stop()

    # ------------------------------------------------------------------ batching

    def add_spending(self, channel: str, item: dict[str, Any]) -> None:
        batcher = self.batcher
        if batcher is None or self.closed:
            return
        full = batcher.add(channel, item, self.loop.time())
        if full:
            self._send_batch(channel, full)
        self._arm_batch_timer()

    def flush_batches(self, *, everything: bool = False) -> None:
        batcher = self.batcher
        if batcher is None:
            return
        ready = batcher.drain() if everything else batcher.due(self.loop.time())
        for channel, items in ready:
            self._send_batch(channel, items)
        self._arm_batch_timer()

    def _send_batch(self, channel: str, items: list[dict[str, Any]]) -> None:
        self.send(p.batch_message(channel, now_ms(), items))
        metrics = self.node.metrics
        metrics.batches.inc()
        metrics.batch_items.observe(len(items))
        metrics.messages_out.labels("batch").inc()

    def _arm_batch_timer(self) -> None:
        deadline = self.batcher.deadline() if self.batcher is not None else None
        if deadline is None:
            self.node.batch_timers.cancel(self)
        else:
            self.node.batch_timers.schedule(self, deadline)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Serve the connection until it closes; always cleans up."""
        self.wire.listener = self
        self.node.connections.add(self)
        try:
            if await self._handshake():
                while not self.closed:
                    message = await self._receive()
                    if message["type"] != "websocket.receive":
                        break
                    decoded = self._decode(message)
                    if decoded is None:
                        break
                    # Not kept alive in this frame while the next receive waits (per-connection
                    # memory of an idle connection).
                    del message
                    await self._command(decoded)
                    del decoded
        except Exception as exc:
            self.fail(exc, "command")
        finally:
            await self._cleanup()

    async def _handshake(self) -> bool:
        """Wait for ``connect``: True once connected; False when closed instead."""
        settings = self.node.settings
        deadline = self.loop.time() + settings.connect_timeout
        while not self.closed:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await self._receive()
            except TimeoutError:
                self.close(CloseCode.UNAUTHORIZED, "no connect in time")
                return False
            if message["type"] != "websocket.receive":
                return False
            decoded = self._decode(message)
            if decoded is None:
                return False
            if p.unsendable(decoded) is not None:
                if self._error_before_login():
                    return False
                self._unsendable(decoded, p.message_id(decoded), _op_label(decoded))
                continue
            command = p.parse_command(decoded)
            if isinstance(command, p.CommandError):
                if command.known_op is Op.CONNECT:
                    if self._error_before_login():
                        return False
                    self._reply_error(command.id, Op.CONNECT, command.error)
                    continue
                self._violation("connect must be the first message")
                return False
            if not isinstance(command, p.Connect):
                self._violation("connect must be the first message")
                return False
            return await self._connect(command)
        return False

    def _error_before_login(self) -> bool:
        """Count an error before connect succeeded; True (closed 4000) past the allowance."""
        self._errors_before_login += 1
        if self._errors_before_login <= ERRORS_BEFORE_LOGIN:
            return False
        door = self.node.door
        if door is not None:
            door.count(Why.ERRORS_BEFORE_LOGIN, "ws", self.peer)
        self.node.metrics.bad_frames.inc()
        self.close(CloseCode.BAD_REQUEST, "too many errors before connect")
        return True

    async def _connect(self, command: p.Connect) -> bool:
        node = self.node
        principal = self._authenticate(command.token)
        if isinstance(principal, Error):
            self._reply_error(command.id, Op.CONNECT, principal)
            code = (
                CloseCode.FORBIDDEN
                if principal.code is ErrorCode.FORBIDDEN
                else CloseCode.UNAUTHORIZED
            )
            self.close(code, principal.message)
            return False
        door = node.door
        slot = door.begin_connect(self.peer) if door is not None else None
        if isinstance(slot, Refusal):
            self._reply_error(
                command.id,
                Op.CONNECT,
                Error(
                    ErrorCode.UNAVAILABLE,
                    "server busy: too many connects in progress; retry after retry_after",
                    retry_after=slot.retry_after,
                ),
            )
            self.close(CloseCode.INTERNAL_ERROR, "server busy")
            return False
        try:
            return await self._login(command, principal)
        finally:
            if slot is not None:
                slot.release()
            ticket = self.wire.ticket
            if ticket is not None:  # the login is answered: the next handshake's turn
                ticket.end_login()

    async def _login(self, command: p.Connect, principal: Principal) -> bool:
        """The work of an authenticated ``connect``: presence, tier, channels, the reply."""
        node = self.node
        self.user = principal.user
        self.admin = principal.admin
        self.client_info = command.client
        self.connected_at = now_ms()
        tier = self._resolve_tier(principal)
        try:
            count = await node.presence.add(self.user, self.conn_id)
            self.registered = True
            limit = node.settings.max_connections_per_user or tier.max_connections
            if count > limit:
                self._reply_error(
                    command.id,
                    Op.CONNECT,
                    Error(
                        ErrorCode.LIMIT_EXCEEDED,
                        f"at most {limit} connections per user",
                        # A crashed node's connections stop counting within this.
                        retry_after=PRESENCE_TTL,
                    ),
                )
                self.close(CloseCode.TOO_MANY, "too many connections")
                return False
            await node.presence.set_tier(self.user, tier.name)
        except BackendUnavailable:
            self._connect_unavailable(command.id)
            return False
        self._apply_tier(tier, initial=True)
        user_channel = f"user:{self.user}"
        wanted: dict[str, p.Since | None] = {user_channel: None}
        refused: dict[str, dict[str, Any]] = {}
        feed = node.stats_feed if self.admin else None
        stats_wanted = False
        for entry in command.channels:
            if isinstance(entry.channel, p.Channel) and entry.channel.namespace == "admin":
                if feed is not None and entry.name == "admin:stats":
                    stats_wanted = True
                else:
                    refused[entry.name] = _ADMIN_ONLY.to_map()
                continue
            error = self._refusal(entry.channel, len(wanted))
            if error is not None:
                refused[entry.name] = error.to_map()
            elif entry.name not in wanted or entry.name == user_channel:
                wanted[entry.name] = entry.since
        joined = await asyncio.gather(*(self._join(name, since) for name, since in wanted.items()))
        if isinstance(joined[0], Error):  # the user channel is the connection's own
            self._connect_unavailable(command.id)
            return False
        # From here to the reply, no await: held publications are settled in one block.
        results: dict[str, dict[str, Any]] = {}
        late: list[tuple[str, list[Delivery]]] = []
        for (name, since), page in zip(wanted.items(), joined, strict=True):
            if isinstance(page, Error):
                refused[name] = page.to_map()
                continue
            results[name], pending = self._settle(name, since, page)
            late.append((name, pending))
        if stats_wanted:
            results["admin:stats"] = {}
        self._set_expiry(principal.expires_at)
        result: dict[str, Any] = {
            "session": self.conn_id,
            "user": self.user,
            "tier": tier.name,
            "ping_interval": node.settings.ping_interval,
            "limits": tier.limits(node.settings.max_frame_bytes),
            "subscriptions": sorted(self.subscriptions),
            "channels": results,
        }
        if refused:
            result["refused"] = refused
        self._reply(command.id, Op.CONNECT, result)
        if stats_wanted and feed is not None:
            feed.add(self)
        for name, pending in late:
            self._deliver_late(name, pending)
        for name in results:
            await node.board.join(self._member(name))
        return True

    def _member(self, channel: str) -> Member:
        """This connection in ``channel``'s presence (its session info on its user channel)."""
        info = None
        if channel == f"user:{self.user}":
            info = SessionInfo(self.conn_id, self.tier.name, self.client_info, self.connected_at)
        return Member(channel, self.user, self.conn_id, info)

    def members(self) -> list[Member]:
        """This connection in each of its channels' presence (the node's heartbeat)."""
        return [self._member(channel) for channel in self.subscriptions]

    async def _leave(self, channel: str) -> None:
        """Unsubscribe ``channel``: the hub, its presence, its pushes."""
        self.subscriptions.discard(channel)
        node = self.node
        node.board.unwatch(self, channel)
        await node.hub.unsubscribe(self, channel)
        await node.board.leave(self._member(channel))

    def _connect_unavailable(self, cid: int) -> None:
        self._reply_error(
            cid,
            Op.CONNECT,
            Error(
                ErrorCode.UNAVAILABLE,
                "the server cannot reach its broker; retry shortly",
                retry_after=1.0,
            ),
        )
        self.close(CloseCode.INTERNAL_ERROR, "broker unavailable")

    # ------------------------------------------------------------------ joining channels

    def _refusal(self, channel: p.Channel | Error, held: int) -> Error | None:
        """Why this connection may not subscribe to ``channel`` now (None: it may)."""
        if isinstance(channel, Error):
            return channel
        denied = self._may_subscribe(channel)
        if denied is not None:
            return denied
        if channel.name not in self.subscriptions and held >= self.tier.max_subscriptions:
            return Error(
                ErrorCode.LIMIT_EXCEEDED,
                f"at most {self.tier.max_subscriptions} subscriptions per connection on the "
                f"{self.tier.name} tier",
            )
        return None

    async def _join(self, name: str, since: p.Since | None) -> Page | Error:
        """Subscribe ``name`` (held) and read its position, and with ``since`` its missed
        publications (one more than the tier recovers, to tell "too many")."""
        node = self.node
        self.subscriptions.add(name)
        try:
            await node.hub.subscribe(self, name)
        except BrokerUnavailable:
            self.subscriptions.discard(name)
            return Error(
                ErrorCode.UNAVAILABLE, "broker unavailable; retry shortly", retry_after=1.0
            )
        try:
            if since is None:
                return await node.history.read(name, None, 0)
            return await node.history.read(name, since.offset, self.tier.recovery_max + 1)
        except HistoryUnavailable:
            self.subscriptions.discard(name)
            await node.hub.unsubscribe(self, name)
            return Error(
                ErrorCode.UNAVAILABLE, "history unavailable; retry shortly", retry_after=1.0
            )

    def _settle(
        self, name: str, since: p.Since | None, page: Page
    ) -> tuple[dict[str, Any], list[Delivery]]:
        """The channel's entry of a subscribe or connect result, and the held publications
        newer than it (to send after the reply); the subscription goes live. Synchronous:
        nothing may reach the channel between the read's result and the reply."""
        position = page.position
        held = self.node.hub.take_held(self, name)
        late: list[Delivery] = []
        seen = position.offset
        for delivery in sorted(held, key=lambda d: d.offset):
            if delivery.offset > seen and delivery.epoch == position.epoch:
                late.append(delivery)
                seen = delivery.offset
        self.node.hub.go_live(self, name, seen, position.epoch)
        entry: dict[str, Any] = {"epoch": position.epoch, "offset": position.offset}
        if since is not None:
            publications = self._recovered(since, page)
            entry["recovered"] = publications is not None
            entry["publications"] = publications or []
        return entry, late

    def _recovered(self, since: p.Since, page: Page) -> list[dict[str, Any]] | None:
        """The missed publications this tier may see, oldest first; None when they cannot
        all be recovered (section 9)."""
        position, entries = page.position, page.entries
        if since.epoch != position.epoch or since.offset > position.offset:
            return None
        if since.offset == position.offset:
            return []
        tier = self.tier
        if (
            not entries
            or len(entries) > tier.recovery_max
            or entries[0].offset != since.offset + 1
            or entries[-1].offset != position.offset
        ):
            return None
        messages = self._messages(entries)
        if len(messages) != len(entries):
            return None  # an entry that cannot be read is a hole
        oldest = messages[0].get("ts")
        if not isinstance(oldest, int) or oldest < now_ms() - tier.recovery_window_s * 1000:
            return None
        return self._visible(messages)

    @staticmethod
    def _messages(entries: list[Entry]) -> list[dict[str, Any]]:
        out = []
        for entry in entries:
            message = unpack_message(entry.offset, entry.payload)
            if message is not None:
                out.append(message)
        return out

    def _visible(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``messages`` without the premium-only events this tier does not get."""
        if self.tier.premium_events:
            return messages
        premium = self.node.policy.is_premium_event
        return [m for m in messages if not premium(str(m.get("event")))]

    def _deliver_late(self, name: str, pending: list[Delivery]) -> None:
        hub = self.node.hub
        for delivery in pending:
            hub.dispatch(name, delivery, (self,))

    async def _cleanup(self) -> None:
        node = self.node
        # Finished: nothing more is written, even while the awaits below let events in.
        self.writer.stop()
        self.wire.listener = None
        node.connections.discard(self)
        node.batch_timers.cancel(self)
        node.expiry_timers.cancel(self)
        if self.batcher is not None:
            node.metrics.connections.labels(self.tier.name).dec()
        if node.stats_feed is not None:
            node.stats_feed.discard(self)
        for channel in list(self.subscriptions):
            await self._leave(channel)
        self.subscriptions.clear()
        if self.registered:
            try:
                await node.presence.remove(self.user, self.conn_id)
            except PresenceUnavailable:
                pass  # the entry expires with this node's heartbeat

    # ------------------------------------------------------------------ input

    def _decode(self, message: Message) -> dict[str, Any] | None:
        data = message.get("bytes")
        if data is None:  # an ASGI text message (not produced by RealtimeWSProtocol)
            data = (message.get("text") or "").encode()
            binary = False
        else:
            binary = message.get("text") is None
        try:
            decoded = self.codec.decode(data, binary=binary)
            p.message_id(decoded)
        except ProtocolViolation as exc:
            self._violation(str(exc))
            return None
        return decoded

    def _unsendable(self, message: dict[str, Any], cid: int, op: str) -> bool:
        """Refuse (bad_request) a message holding what could not be sent on in both
        encodings (section 11); whether it was refused."""
        why = p.unsendable(message)
        if why is None:
            return False
        door = self.node.door
        if door is not None:
            door.count(Why.UNSENDABLE_DATA, "ws", self.peer, why)
        self._reply_error(
            cid, op, Error(ErrorCode.BAD_REQUEST, f"the message holds {why}: it cannot be sent on")
        )
        return True

    def _violation(self, reason: str) -> None:
        self.node.metrics.bad_frames.inc()
        # One line per client address per interval, however many connections it opens.
        self.node.log_throttle.warning(
            self.peer, "closing a connection of %s (4000): %s", self.peer, reason
        )
        self.close(CloseCode.BAD_REQUEST, reason[:100])

    async def _command(self, message: dict[str, Any]) -> None:
        command = p.parse_command(message)
        op = command.known_op if isinstance(command, p.CommandError) else command.op
        op_label = op or "unknown"
        if isinstance(command, p.Subscribe) and self._joins_early(command, message):
            await self._resume(command)
            return
        decision = await self.node.limiter_hit(self.user, self.tier.commands_per_minute)
        if not decision.allowed:
            self._rate_limited(command.id, op_label, decision.retry_after)
            return
        if self._unsendable(message, command.id, op_label):
            return
        if isinstance(command, p.CommandError):
            self._reply_error(command.id, op_label, command.error)
            return
        if isinstance(command, p.Ping):
            self._reply(command.id, Op.PING, {})
        elif isinstance(command, p.Publish):
            await self._publish(command)
        elif isinstance(command, p.Subscribe):
            await self._subscribe(command)
        elif isinstance(command, p.Unsubscribe):
            if command.channel.namespace == "admin" and self.node.stats_feed is not None:
                self.node.stats_feed.discard(self)
            elif command.channel.name in self.subscriptions:
                await self._leave(command.channel.name)
            self._reply(command.id, Op.UNSUBSCRIBE, {})
        elif isinstance(command, p.History):
            await self._history(command)
        elif isinstance(command, p.Presence):
            await self._presence(command)
        elif isinstance(command, p.Refresh):
            await self._refresh(command)
        else:
            self._reply_error(
                command.id, Op.CONNECT, Error(ErrorCode.BAD_REQUEST, "already connected")
            )

    def _rate_limited(self, cid: int, op: str, retry_after: float) -> None:
        now = self.loop.time()
        if now >= self._strike_until:
            self._strikes = 0
            self._strike_until = now + 60.0
        else:
            self._strikes += 1
            if self._strikes >= STRIKES_BEFORE_CLOSE:
                self.node.metrics.commands.labels(op, "rate_limited").inc()
                self.close(CloseCode.TOO_MANY, "rate limit exceeded again and again")
                return
        self.node.metrics.rate_limited.labels(self.tier.name).inc()
        limit = self.tier.commands_per_minute
        self._reply_error(
            cid,
            op,
            Error(
                ErrorCode.RATE_LIMITED,
                f"{limit} commands per minute on the {self.tier.name} tier",
                retry_after=max(retry_after, 0.001),
            ),
        )

    async def _subscribe(self, command: p.Subscribe) -> None:
        channel = command.channel
        if channel.namespace == "admin":
            self._subscribe_admin(command)
            return
        if channel.name in self.subscriptions:  # held already: changes nothing
            try:
                page = await self.node.history.read(channel.name, None, 0)
            except HistoryUnavailable:
                self._reply_error(command.id, Op.SUBSCRIBE, _HISTORY_DOWN)
                return
            position = page.position
            self._reply(
                command.id, Op.SUBSCRIBE, {"epoch": position.epoch, "offset": position.offset}
            )
            return
        denied = self._refusal(channel, len(self.subscriptions))
        if denied is not None:
            self._reply_error(command.id, Op.SUBSCRIBE, denied)
            return
        await self._joined(command, await self._join(channel.name, command.since))

    async def _joined(self, command: p.Subscribe, joined: Page | Error) -> None:
        """The rest of a subscribe once its join returned: the reply, then what was held."""
        channel = command.channel
        if isinstance(joined, Error):
            self._reply_error(command.id, Op.SUBSCRIBE, joined)
            return
        if self.closed:  # closed while subscribing: cleanup may have run already
            self.subscriptions.discard(channel.name)
            await self.node.hub.unsubscribe(self, channel.name)
            return
        result, late = self._settle(channel.name, command.since, joined)
        self._reply(command.id, Op.SUBSCRIBE, result)
        self._deliver_late(channel.name, late)
        await self.node.board.join(self._member(channel.name))
        if command.presence:
            await self.node.board.watch(self, channel.name)

    def _joins_early(self, command: p.Subscribe, message: dict[str, Any]) -> bool:
        """Whether this subscribe is a resume whose join may run while a shared (remote)
        limiter decides: one that, allowed, would go straight to its join."""
        channel = command.channel
        return (
            command.since is not None
            and not isinstance(self.node.limiter, MemoryRateLimiter)
            and channel.namespace != "admin"
            and channel.name not in self.subscriptions
            and self._refusal(channel, len(self.subscriptions)) is None
            and p.unsendable(message) is None
        )

    async def _resume(self, command: p.Subscribe) -> None:
        """A subscribe with ``since`` (``_joins_early``): its join (a held subscription and a
        history read, nothing the client or anyone else sees) runs while the limiter
        decides, saving a round trip; a refusal undoes the join and answers
        ``rate_limited`` as it would have before any join. The hit's command is sent first
        (the join starts a loop turn later), so its answer precedes the read's: the read's
        answer wakes this task with the decision made, not for one more wake-up."""
        name = command.channel.name
        hit = asyncio.ensure_future(self.node.limiter_hit(self.user, self.tier.commands_per_minute))
        try:
            await asyncio.sleep(0)  # the hit's command goes out first
            joined = await self._join(name, command.since)
        except BaseException:
            hit.cancel()
            raise
        allowed = False
        try:
            decision = await hit
            allowed = decision.allowed
        finally:
            if not allowed and not isinstance(joined, Error):
                self.subscriptions.discard(name)
                await self.node.hub.unsubscribe(self, name)
        if not allowed:
            self._rate_limited(command.id, Op.SUBSCRIBE, decision.retry_after)
            return
        await self._joined(command, joined)

    async def _presence(self, command: p.Presence) -> None:
        channel = command.channel
        denied = self._may_subscribe(channel)
        if denied is not None:
            self._reply_error(command.id, Op.PRESENCE, denied)
            return
        presence = self.node.board.presence
        try:
            counts = await presence.counts(channel.name)
            result: dict[str, Any] = {"users": counts.users, "connections": counts.connections}
            if channel.name == f"user:{self.user}":
                result["sessions"] = await presence.sessions(channel.name)
        except ChannelPresenceUnavailable:
            self._reply_error(
                command.id,
                Op.PRESENCE,
                Error(
                    ErrorCode.UNAVAILABLE, "presence unavailable; retry shortly", retry_after=1.0
                ),
            )
            return
        self._reply(command.id, Op.PRESENCE, result)

    async def _history(self, command: p.History) -> None:
        channel = command.channel
        denied = self._may_subscribe(channel)
        if denied is not None:
            self._reply_error(command.id, Op.HISTORY, denied)
            return
        since = command.since
        try:
            page = await self.node.history.read(
                channel.name, since.offset if since else None, command.limit
            )
        except HistoryUnavailable:
            self._reply_error(command.id, Op.HISTORY, _HISTORY_DOWN)
            return
        position = page.position
        entries = page.entries if since is None or since.epoch == position.epoch else []
        self._reply(
            command.id,
            Op.HISTORY,
            {
                "epoch": position.epoch,
                "offset": position.offset,
                "publications": self._visible(self._messages(entries)),
            },
        )

    def _subscribe_admin(self, command: p.Subscribe) -> None:
        """``admin:stats`` for an admin session: the recent snapshots of every node, then
        each new one (no history, offsets or presence: the feed is the server's own)."""
        feed = self.node.stats_feed
        if not self.admin or feed is None or command.channel.name != "admin:stats":
            self._reply_error(command.id, Op.SUBSCRIBE, _ADMIN_ONLY)
            return
        self._reply(command.id, Op.SUBSCRIBE, {})
        feed.add(self)

    def _may_subscribe(self, channel: p.Channel) -> Error | None:
        if channel.namespace == "admin":
            return _ADMIN_ONLY
        if channel.namespace == "user" and channel.key != self.user:
            return Error(ErrorCode.FORBIDDEN, "a user channel is only for its own user")
        if channel.namespace == "premium" and not self.tier.premium_channels:
            return Error(
                ErrorCode.FORBIDDEN,
                f"premium channels are not available on the {self.tier.name} tier",
            )
        return None

    async def _publish(self, command: p.Publish) -> None:
        channel = command.channel
        if channel.namespace != "user" or channel.key != self.user:
            self._reply_error(
                command.id,
                Op.PUBLISH,
                Error(ErrorCode.FORBIDDEN, "clients may publish only to their own user channel"),
            )
            return
        eid = new_event_id()
        payload = pack_event(channel.name, command.event, eid, now_ms(), command.data)
        node = self.node
        limits = node.policy.history_of(channel.namespace)
        (outcome,) = await node.history.publish([Publication(channel.name, payload, limits)])
        if isinstance(outcome, HistoryUnavailable):
            self._reply_error(
                command.id,
                Op.PUBLISH,
                Error(ErrorCode.UNAVAILABLE, "broker unavailable; not published", retry_after=1.0),
            )
            return
        node.metrics.published.labels("ws").inc()
        self._reply(command.id, Op.PUBLISH, {"id": eid, "offset": outcome.offset})

    async def _refresh(self, command: p.Refresh) -> None:
        principal = self._authenticate(command.token)
        if isinstance(principal, Error):
            self._reply_error(command.id, Op.REFRESH, principal)
            return
        if principal.user != self.user or principal.admin != self.admin:
            self._reply_error(
                command.id,
                Op.REFRESH,
                Error(ErrorCode.FORBIDDEN, "the token belongs to another user"),
            )
            return
        tier = self._resolve_tier(principal)
        if tier is not self.tier:
            self._apply_tier(tier)
            if not tier.premium_channels:  # a downgrade: premium channels are paid tiers' only
                for channel in [c for c in self.subscriptions if c.startswith("premium:")]:
                    await self._leave(channel)
            try:
                await self.node.presence.set_tier(self.user, tier.name)
            except PresenceUnavailable:
                pass  # push rules use the last tier known; refreshed at the next connect
        self._set_expiry(principal.expires_at)
        self._reply(
            command.id,
            Op.REFRESH,
            {
                "expires_at": int(principal.expires_at),
                "tier": tier.name,
                "subscriptions": sorted(self.subscriptions),
            },
        )

    # ------------------------------------------------------------------ helpers

    def _authenticate(self, token: str) -> Principal | Error:
        """An admin session token's principal, else the user token's."""
        admin = self.node.admin_tokens
        principal = admin.authenticate(token) if admin is not None else None
        return self.node.auth.authenticate(token) if principal is None else principal

    def _resolve_tier(self, principal: Principal) -> Tier:
        tier, known = self.node.policy.resolve(principal.tier)
        if not known:
            self.node.metrics.unknown_tiers.inc()
        return tier

    def _apply_tier(self, tier: Tier, *, initial: bool = False) -> None:
        gauge = self.node.metrics.connections
        if not initial:
            gauge.labels(self.tier.name).dec()
        gauge.labels(tier.name).inc()
        self.tier = tier
        if self.batcher is None:
            self.batcher = SpendingBatcher(tier.batch_window, tier.batch_max_items)
        else:
            self.batcher.set_limits(tier.batch_window, tier.batch_max_items)

    def _set_expiry(self, expires_at: float) -> None:
        """Close with 4001 when the token expires (``exp`` plus the configured leeway).

        The node's expiry Timers hold the deadline (one armed handle per node, no
        reference from a timer back to the connection beyond the heap's key).
        """
        self.expires_at = expires_at
        self.node.expiry_timers.schedule(self, expires_at + self.node.settings.jwt_leeway)

    def expired(self) -> None:
        self.close(CloseCode.UNAUTHORIZED, "token expired")

    def _reply(self, cid: int, op: str, result: dict[str, Any]) -> None:
        self.node.metrics.commands.labels(op, "ok").inc()
        self.send(p.reply(cid, result))

    def _reply_error(self, cid: int, op: str, error: Error) -> None:
        self.node.metrics.commands.labels(op, error.code.value).inc()
        self.send(p.error_reply(cid, error))


def flush_due_batches(conns: list[Connection]) -> None:
    """The batch timers' callback: send the connections' due batches; one connection's
    failure closes that connection (1011), the others are flushed all the same."""
    for conn in conns:
        try:
            conn.flush_batches()
        except Exception as exc:
            conn.fail(exc, "batch flush")


def close_expired(conns: list[Connection]) -> None:
    """The expiry timers' callback: close the connections whose token expired (4001)."""
    for conn in conns:
        try:
            conn.expired()
        except Exception as exc:
            conn.fail(exc, "expiry")
