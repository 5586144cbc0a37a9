"""The push adapter seam and the adapters that need no provider: webhook and log."""

from __future__ import annotations

from typing import Protocol

from notifications.models import Device, Notification, PushResult


class PushAdapter(Protocol):
    """Sends one notification to one device of its platform.

    Contract: ``send`` never raises for a provider's answer or a transport
    failure; it returns a ``PushResult`` saying what happened (see Outcome).
    It may be called concurrently. ``close`` releases connections.
    """

    name: str

    async def send(self, notification: Notification, device: Device) -> PushResult: ...

    async def close(self) -> None: ...
