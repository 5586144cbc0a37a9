def send(fd: int, data: bytes, /) -> int:
    """Bytes of ``data`` left unsent after one non-blocking send(2) on ``fd`` (0: all sent);
    -1 on a socket error other than would-block."""
