"""The writer's send from C (realtime/sendfast.c): what one call does on a real socket, and a
``Writer`` on uvloop's real TCP transport sending from C and through the transport in turn,
every byte in order.

Runs where the compiled build is in use (``make test``'s second pass, and the first where
``REALTIME_NATIVE`` is not off); skipped where every write goes through the transport.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any, cast

import pytest
import uvloop
from prometheus_client import CollectorRegistry

from realtime.metrics import Metrics
from realtime.writer import SEND_NOW, FlushQueue, OutboxLimits, Writer, direct_socket

pytestmark = [
    pytest.mark.timeout(30),
    pytest.mark.skipif(SEND_NOW is None, reason="sendfast not in use (interpreted run)"),
]


def _send() -> Callable[[int, bytes], int]:
    assert SEND_NOW is not None
    return SEND_NOW


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(asyncio.wait_for(main(), 20))


def test_a_send_returns_what_the_socket_did_not_take() -> None:
    send = _send()
    a, b = socket.socketpair()
    with a, b:
        a.setblocking(False)
        assert send(a.fileno(), b"hello") == 0
        assert b.recv(5) == b"hello"
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = b"x" * 1_000_000
        left = send(a.fileno(), big)
        assert 0 < left < len(big)  # a part went, the rest is the caller's
        assert send(a.fileno(), b"y") == 1  # full: nothing taken, no exception
        b.close()
        assert send(a.fileno(), b"z") == -1  # the peer is gone: an error, no SIGPIPE
    assert send(1 << 20, b"z") == -1  # no such descriptor: an error, not an exception
    with pytest.raises(TypeError):
        send(0, "text")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        send(-1, b"x")


class _Wire(asyncio.Protocol):
    """The server side of one connection: hands its transport over, passes the transport's
    pause and resume to its writer (as RealtimeWSProtocol does)."""

    def __init__(self, made: asyncio.Future[asyncio.Transport]) -> None:
        self.made = made
        self.writer: Writer | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.made.set_result(cast(asyncio.Transport, transport))  # uvloop's: no subclass

    def pause_writing(self) -> None:
        if self.writer is not None:
            self.writer.pause()

    def resume_writing(self) -> None:
        if self.writer is not None:
            self.writer.resume()


class _NoClose:
    def close_with(self, code: int, reason: str, timeout: float) -> None:
        raise AssertionError("not closed in this test")


def test_a_writer_sends_from_c_and_through_its_transport_in_order() -> None:
    """8 MiB to a client that does not read yet: the first frames go from C, the rest wait in
    the transport once the socket is full (and in the outbox while it is paused); writes of
    the transport's own (a pong) keep their place. Read back, every byte is where it was
    written; once the transport is empty the writer sends from C again, and never past bytes
    someone else left in the transport."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.Transport] = loop.create_future()
        wire = _Wire(made)
        server = await loop.create_server(lambda: wire, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        client.setblocking(False)

        async def read_exactly(size: int) -> bytes:
            got = bytearray()
            while len(got) < size:
                chunk = await loop.sock_recv(client, min(size - len(got), 1 << 20))
                assert chunk, "closed early"
                got += chunk
            return bytes(got)

        transport = await made
        fd = direct_socket(transport)
        assert fd == transport.get_extra_info("socket").fileno()
        assert transport.get_write_buffer_limits() == (0, 0)  # paused: it holds a byte
        through_transport: list[int] = []

        def write(data: bytes) -> None:
            through_transport.append(len(data))
            transport.write(data)

        flushes = FlushQueue(loop, direct_max=1024)
        writer = Writer(
            write,
            _NoClose(),
            flushes,
            OutboxLimits(100_000, 1 << 30),
            Metrics(CollectorRegistry()),
            fd=fd,
        )
        wire.writer = writer
        expected = bytearray()
        frames = 8192
        for i in range(frames):
            data = f"{i:08d}".encode() * 128
            writer.write(data)
            expected += data
            if i % 500 == 0:
                writer.flush()
                if not writer.outbox:  # (a connection's own pongs go through its writer)
                    pong = b"PONG%04d" % (i // 500)
                    transport.write(pong)  # a write that is not the writer's
                    expected += pong
            if i % 64 == 0:
                await asyncio.sleep(0)  # the flush queue runs
        writer.flush()
        assert through_transport, "the socket filled: the rest went through the transport"
        taken = sum(through_transport)
        assert taken < len(expected), "the first frames went from C"
        got = await read_exactly(len(expected))
        assert got == bytes(expected)
        for _ in range(500):  # (the transport learns of its last write on a loop turn)
            if not transport.get_write_buffer_size():
                break
            await asyncio.sleep(0.01)
        assert not transport.get_write_buffer_size()
        before = len(through_transport)
        writer.write(b"late")
        writer.flush()
        assert len(through_transport) == before, "an empty transport: sent from C again"
        assert await read_exactly(4) == b"late"
        writer.write(b"after")  # pending: the flush queue's next turn
        other = b"Q" * (8 << 20)
        transport.write(other)  # not the writer's, and more than the socket takes now
        assert transport.get_write_buffer_size() > 0 and writer.paused
        client.setblocking(True)
        head = client.recv(1 << 20)  # the socket has room again; the loop has not run
        client.setblocking(False)
        writer.flush()
        assert len(through_transport) == before + 1, "behind the transport's bytes, not past"
        rest = await read_exactly(len(other) + 5 - len(head))
        assert head + rest == other + b"after"
        client.close()
        server.close()
        await server.wait_closed()

    _run(main)


def test_only_uvloops_plain_tcp_transport_is_sent_to_from_c() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        made: asyncio.Future[asyncio.Transport] = loop.create_future()
        server = await loop.create_server(lambda: _Wire(made), "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, client_writer = await asyncio.open_connection("127.0.0.1", port)
        assert direct_socket(await made) == -1  # asyncio's own transport: through it always
        client_writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 20))
