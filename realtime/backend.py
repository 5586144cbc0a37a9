"""What the failures of every backend have in common.

Each backend family raises its own subclass of ``BackendUnavailable`` when its
backend cannot answer: ``BrokerUnavailable`` (realtime/broker.py),
``HistoryUnavailable`` (history.py), ``PresenceUnavailable`` (presence.py)
and ``RateLimitUnavailable`` (ratelimit.py). A caller that can meet several of
them catches ``BackendUnavailable``.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable"]


class BackendUnavailable(Exception):
    """A backend (broker, history, presence registry, rate limiter) cannot answer now."""
