"""Validated request bodies of ``POST /v1/notifications`` and ``POST /v1/devices``.

Unknown fields are refused (422), so a misspelt optional field is not silently ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from notifications.models import DEFAULT_TTL, MAX_TTL, Device, Notification, Platform, Priority

MAX_ID_CHARS = 128
MAX_USER_CHARS = 128
MAX_COLLAPSE_ID_BYTES = 64
MAX_TOKEN_CHARS = 4096


class NotificationRequest(BaseModel):
    """A notification as a backend service sends it (protocol-v1, sections 6 and 7)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS)
    user: str = Field(min_length=1, max_length=MAX_USER_CHARS)
    priority: Priority
    title: str
    body: str
    data: dict[str, Any] | None = None
    collapse_id: str | None = None
    ttl: int = Field(DEFAULT_TTL, ge=0, le=MAX_TTL, strict=True)

    @field_validator("collapse_id")
    @classmethod
    def _collapse_id_bytes(cls, value: str | None) -> str | None:
        if value is not None and len(value.encode("utf-8")) > MAX_COLLAPSE_ID_BYTES:
            raise ValueError(f"collapse_id is at most {MAX_COLLAPSE_ID_BYTES} bytes of UTF-8")
        return value

    def to_notification(self, *, id: str, created_at: float) -> Notification:
        """The accepted notification: ``id`` is the caller's or one the server made."""
        return Notification(
            id=id,
            user=self.user,
            priority=self.priority,
            title=self.title,
            body=self.body,
            data=dict(self.data or {}),
            collapse_id=self.collapse_id,
            ttl=self.ttl,
            created_at=created_at,
        )


class DeviceRequest(BaseModel):
    """A device registration: the push token of one app install of ``user``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str = Field(min_length=1, max_length=MAX_USER_CHARS)
    platform: Platform
    token: str = Field(min_length=1, max_length=MAX_TOKEN_CHARS)

    def to_device(self) -> Device:
        return Device(user=self.user, platform=self.platform, token=self.token)
