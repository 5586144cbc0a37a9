"""``realtime serve`` on a listening socket of its own with SO_REUSEPORT.

Several of these on one port share it through the kernel's SO_REUSEPORT
hashing (each process accepts on its own socket), which spreads connections
evenly, unlike one inherited socket. Everything else is ``realtime serve``:
the same flags and the same uvicorn configuration from ``realtime.cli``.

Run: ``python -m bench.serve --port 8000 --redis-url redis://127.0.0.1:6390/0``.
"""

from __future__ import annotations

import socket
import sys

import uvicorn

from bench.loadgen import raise_nofile
from realtime import cli
from realtime.settings import Settings


def _reuseport_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def main() -> int:
    original = cli.DrainingServer.run

    def run(self: uvicorn.Server, sockets: list[socket.socket] | None = None) -> None:
        settings = Settings()
        original(self, sockets=sockets or [_reuseport_socket(settings.host, settings.port)])

    raise_nofile()
    cli.DrainingServer.run = run  # type: ignore[method-assign]
    return cli.main(["serve", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
