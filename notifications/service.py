"""What the HTTP handlers call: accept notifications, register and remove devices.

``accept`` returns once the notification is stored (answer 202 with the id); it raises
``QueueUnavailable`` (answer 503) when the store cannot take it: unreachable, or its priority's
queue at its bound (nothing queued is ever dropped to make room).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from notifications.metrics import NotificationMetrics
from notifications.models import DeadLetter, Platform
from notifications.requests import DeviceRequest, NotificationRequest
from notifications.store import NotificationStore, QueueUnavailable

__all__ = ["NotificationService", "QueueUnavailable"]

DEFAULT_IDEMPOTENCY_WINDOW = 600.0


def new_notification_id() -> str:
    return uuid.uuid4().hex


class NotificationService:
    """The accepting side of the pipeline (the router delivers).

    A caller-given id is idempotent for ``idempotency_window`` seconds: accepted again, it is
    not queued again and the same id is returned (the first body wins). Without an id the
    server makes one (``new_id``). ``clock`` stamps ``created_at`` (unix seconds).
    """

    def __init__(
        self,
        store: NotificationStore,
        *,
        metrics: NotificationMetrics | None = None,
        idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW,
        clock: Callable[[], float] = time.time,
        new_id: Callable[[], str] = new_notification_id,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._window = idempotency_window
        self._clock = clock
        self._new_id = new_id

    async def accept(self, req: NotificationRequest) -> str:
        """Stores the notification; returns its id. Raises ``QueueUnavailable``."""
        notification = req.to_notification(id=req.id or self._new_id(), created_at=self._clock())
        window = self._window if req.id is not None else None
        try:
            result = await self._store.enqueue(notification, idempotency_window=window)
        except QueueUnavailable as exc:
            if self._metrics is not None:
                self._metrics.refused.labels(exc.reason).inc()
            raise
        if self._metrics is not None:
            counter = self._metrics.accepted if result.created else self._metrics.duplicates
            counter.labels(notification.priority.value).inc()
        return result.id

    async def register_device(self, req: DeviceRequest) -> None:
        """Adds (or refreshes) the device. Raises ``QueueUnavailable``."""
        await self._store.add_device(req.to_device())

    async def remove_device(self, platform: Platform, token: str) -> None:
        """Removes the device; an unknown one is no error. Raises ``QueueUnavailable``."""
        await self._store.remove_device(platform, token)

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """The newest dead letters first, for an operator. Raises ``QueueUnavailable``."""
        return await self._store.dead_letters(limit)

    async def ready(self) -> bool:
        """Whether the store answers (for /readyz)."""
        return await self._store.ping()
