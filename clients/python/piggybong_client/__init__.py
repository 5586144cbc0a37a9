"""PiggyBong Realtime's asyncio client: reconnect, refresh, resume, gap fill."""

from piggybong_client.client import (
    Backoff,
    Client,
    ClientError,
    Position,
    Stats,
    retry_after,
    token_expiry,
)

__all__ = ["Backoff", "Client", "ClientError", "Position", "Stats", "retry_after", "token_expiry"]
