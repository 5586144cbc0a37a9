"""``/metrics`` on a port of this process's own.

Several processes sharing the API port (``--reuse-port``, or uvicorn's workers) each
keep their own metrics, and a scrape of the shared port reaches one of them at random.
With ``REALTIME_METRICS_PORT`` each process also answers ``GET /metrics`` on a port of its
own, which Prometheus can scrape one by one. It runs on the node's event loop (the
metrics read the node's state, which only that loop may touch). Minimal HTTP/1.1: one
request per connection, a request head of at most 8 KiB, the whole exchange within 5 s;
``GET /metrics`` is answered 200, anything else 404; then the connection closes.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

#: Largest request head read; how long one exchange (request and answer) may take.
MAX_HEAD = 8 * 1024
EXCHANGE_TIMEOUT = 5.0
#: Exchanges served at once; a connection beyond them is closed at once.
MAX_CLIENTS = 16


class MetricsPort:
    """Serves ``registry`` on ``host:port``; ``start()`` binds (raising OSError if it
    cannot), ``close()`` stops listening and cancels the exchanges in progress.

    Bounded: at most ``MAX_CLIENTS`` exchanges at once (more are closed unanswered),
    each aborted after ``EXCHANGE_TIMEOUT`` seconds whatever it is waiting for.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._exchanges: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self.port, limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._exchanges) >= MAX_CLIENTS:
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._exchanges.add(task)
        task.add_done_callback(self._exchanges.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(EXCHANGE_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, *_ = [*head.split(b"\r\n", 1)[0].split(b" "), b"", b""]
                if method == b"GET" and target.split(b"?", 1)[0] == b"/metrics":
                    status, body = b"200 OK", generate_latest(self.registry)
                    kind = CONTENT_TYPE_LATEST
                else:
                    status, body, kind = b"404 Not Found", b"not found\n", "text/plain"
                writer.write(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: "
                    + kind.encode()
                    + b"\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\nConnection: close\r\n\r\n"
                    + body
                )
                await writer.drain()
            writer.close()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
        ):
            writer.transport.abort()  # no request in time, too big, or a reader that stalled
        except asyncio.CancelledError:
            writer.transport.abort()
            raise

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._exchanges):
                task.cancel()
            await asyncio.gather(*self._exchanges, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
