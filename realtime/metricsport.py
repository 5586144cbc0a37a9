"""``/metrics`` on a port of this process's own.

Several processes sharing the API port (``--reuse-port``, or uvicorn's workers) each
keep their own metrics, and a scrape of the shared port reaches one of them at random.
With ``REALTIME_METRICS_PORT`` each process also answers ``GET /metrics`` on a port of its
own, which Prometheus can scrape one by one. It runs on the node's event loop (the
metrics read the node's state, which only that loop may touch). Minimal HTTP/1.1: one
request per connection, a request head of at most 8 KiB read within 5 s; ``GET /metrics``
is answered 200, anything else 404; then the connection closes.
"""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

#: Largest request head read, and how long a client may take to send it.
MAX_HEAD = 8 * 1024
HEAD_TIMEOUT = 5.0


class MetricsPort:
    """Serves ``registry`` on ``host:port``; ``start()`` binds (raising OSError if it
    cannot), ``close()`` stops listening and waits for the server to close."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port,
                                                  limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            method, target, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
            if method == b"GET" and target.split(b"?", 1)[0] == b"/metrics":
                status, body, kind = b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
            else:
                status, body, kind = b"404 Not Found", b"not found\n", "text/plain"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind.encode()
                         + b"\r\nContent-Length: " + str(len(body)).encode()
                         + b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that sent no request in time, or went away: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
