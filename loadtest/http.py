"""A minimal keep-alive HTTP/1.1 client for the backend's side of the load.

Far cheaper per request than a general client, which matters when one process
publishes hundreds of requests a second next to thousands of sockets. One
``HttpConnection`` carries one request at a time; it reconnects when the
server closed it. Failures are values (``HttpFailure``), not exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any, Final

MAX_HEADER_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True, slots=True)
class HttpFailure:
    """No answer: ``kind`` is ``timeout``, ``refused``, ``reset``, ``protocol`` or ``io``."""

    kind: str
    detail: str


class HttpConnection:
    """Requests to one ``host:port`` over one reused connection; concurrent callers
    take turns."""

    def __init__(self, host: str, port: int, *, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._turn = asyncio.Lock()  # one request at a time on the one connection

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        headers: dict[str, str] | None = None,
    ) -> HttpResponse | HttpFailure:
        async with self._turn:
            return await self._request(method, path, body, headers)

    async def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> HttpResponse | HttpFailure:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that
            # arrives as the exchange completes, and a cancelled caller then runs on forever.
            async with asyncio.timeout(self.timeout):
                return await self._exchange(method, path, body, headers or {})
        except TimeoutError:
            await self.close()
            return HttpFailure("timeout", f"no answer within {self.timeout:g} s")
        except ConnectionRefusedError as exc:
            await self.close()
            return HttpFailure("refused", str(exc))
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as exc:
            await self.close()
            return HttpFailure("reset", str(exc) or type(exc).__name__)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            await self.close()
            return HttpFailure("protocol", str(exc))
        except OSError as exc:
            await self.close()
            return HttpFailure("io", str(exc))

    async def _exchange(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> HttpResponse:
        fresh = self._writer is None
        if self._writer is None or self._reader is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None:
            lines.append(f"Content-Length: {len(body)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            if fresh:
                raise
            # the server closed the idle keep-alive connection: retry once on a new one
            await self.close()
            return await self._exchange(method, path, body, headers)
        status, response_headers = _parse_head(head)
        if response_headers.get("transfer-encoding", "").lower() == "chunked":
            payload = await _read_chunked(reader)
        else:
            payload = await reader.readexactly(int(response_headers.get("content-length", "0")))
        if response_headers.get("connection", "").lower() == "close":
            await self.close()
        return HttpResponse(status, payload)

    async def close(self) -> None:
        writer = self._writer
        self._reader = self._writer = None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected
            return b"".join(chunks)
        chunks.append(await reader.readexactly(size))
        await reader.readexactly(2)
