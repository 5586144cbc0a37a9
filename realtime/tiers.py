"""The tier policy as data (protocol-v1, section 5), and its file format.

A ``Tier`` holds one row of the table; a ``TierPolicy`` holds the table, maps
a token's tier claim to a row (unknown names count as the default tier,
"free") and says which event types are premium-only.

Policy file (``REALTIME_TIER_POLICY``): JSON (``.json``) or TOML (``.toml``),
validated at start-up; a bad file raises ``PolicyError`` naming the field::

    # all keys optional
    premium_event_patterns = ["market.*"]   # fnmatch patterns on the event type;
                                            # replaces the default list
    inherit_defaults = true                 # false: the file's tiers are the whole
                                            # table, and it must define "free"

    [tiers.paid]                # a tier that exists: only the fields given change
    batch_window_ms = 100

    [history.artist]            # per channel namespace (user, artist, premium, broadcast)
    size = 1000                 # publications kept (section 9)
    ttl_s = 86400               # kept this long after the channel's last publication

    [tiers.vip]                 # a new tier: every field, or `extends` a tier
    extends = "paid"            # (of the defaults or of this file) and change some
    commands_per_minute = 1000
    push_priorities = ["critical", "high", "normal", "low"]

The JSON form is the same map: ``{"tiers": {"paid": {"batch_window_ms": 100}}}``.
Tier fields: ``commands_per_minute``, ``max_subscriptions``, ``max_connections``,
``batch_window_ms``, ``batch_max_items`` (integers >= 1), ``premium_channels``
(may subscribe to ``premium:*``), ``premium_events`` (receives premium-only event
types) (booleans), ``push_priorities`` (a list of "critical", "high", "normal",
"low": the notification priorities pushed to the user's devices), ``recovery_window_s``
and ``recovery_max`` (integers >= 1, default 120 and 100: how old and how many missed
publications a resumed subscription recovers). Tier names are
1 to 64 of ``[A-Za-z0-9_.-]``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass
from pydantic_core import ErrorDetails

PushPriority = Literal["critical", "high", "normal", "low"]
TIER_NAME_PATTERN: Final = r"^[A-Za-z0-9_.\-]{1,64}$"
DEFAULT_TIER: Final = "free"
DEFAULT_PREMIUM_EVENT_PATTERNS: Final = ("market.*",)
#: Distinct event names remembered by ``is_premium_event``; the oldest is forgotten beyond.
PREMIUM_CACHE_SIZE: Final = 4096

Positive = Annotated[int, Field(gt=0)]


class PolicyError(ValueError):
    """A tier policy that cannot be used; the message names the file and the bad field."""


@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(strict=True, extra="forbid"))
class Tier:
    """One row of the tier table; validated on construction (pydantic, strict)."""

    name: Annotated[str, Field(pattern=TIER_NAME_PATTERN)]
    commands_per_minute: Positive
    max_subscriptions: Positive
    max_connections: Positive
    batch_window_ms: Positive
    batch_max_items: Positive
    premium_channels: bool
    premium_events: bool
    push_priorities: frozenset[PushPriority]
    #: how old the oldest missed publication may be for a recovery (section 9)
    recovery_window_s: Positive = 120
    #: how many missed publications a recovery returns at most (section 9)
    recovery_max: Positive = 100

    @property
    def batch_window(self) -> float:
        """The spending batch window in seconds."""
        return self.batch_window_ms / 1000.0

    def limits(self, max_frame_bytes: int) -> dict[str, int]:
        """The ``limits`` map of the connect result."""
        return {
            "commands_per_minute": self.commands_per_minute,
            "max_subscriptions": self.max_subscriptions,
            "max_connections": self.max_connections,
            "batch_window_ms": self.batch_window_ms,
            "batch_max_items": self.batch_max_items,
            "max_frame_bytes": max_frame_bytes,
            "recovery_window_s": self.recovery_window_s,
            "recovery_max": self.recovery_max,
        }


FREE: Final = Tier(
    name="free",
    commands_per_minute=60,
    max_subscriptions=20,
    max_connections=2,
    batch_window_ms=2000,
    batch_max_items=50,
    premium_channels=False,
    premium_events=False,
    push_priorities=frozenset({"critical", "high"}),
    recovery_window_s=120,
    recovery_max=100,
)
PAID: Final = Tier(
    name="paid",
    commands_per_minute=300,
    max_subscriptions=200,
    max_connections=5,
    batch_window_ms=250,
    batch_max_items=50,
    premium_channels=True,
    premium_events=True,
    push_priorities=frozenset({"critical", "high", "normal"}),
    recovery_window_s=86_400,
    recovery_max=1000,
)
DEFAULT_TIERS: Final[Mapping[str, Tier]] = {FREE.name: FREE, PAID.name: PAID}


@pydantic_dataclass(frozen=True, slots=True, config=ConfigDict(strict=True, extra="forbid"))
class HistoryLimits:
    """How much of a channel's history is kept (section 9): at most ``size`` publications,
    all dropped ``ttl_s`` seconds after the channel's last publication."""

    size: Annotated[int, Field(gt=0, le=100_000)]
    ttl_s: Annotated[int, Field(gt=0, le=30 * 86_400)]


#: History kept per channel namespace unless the policy file says otherwise.
DEFAULT_HISTORY: Final[Mapping[str, HistoryLimits]] = {
    "user": HistoryLimits(size=200, ttl_s=86_400),
    "artist": HistoryLimits(size=1000, ttl_s=86_400),
    "premium": HistoryLimits(size=1000, ttl_s=86_400),
    "broadcast": HistoryLimits(size=1000, ttl_s=86_400),
}


class TierPolicy:
    """The tier table and the premium-only event filter.

    ``tiers`` and ``premium_event_patterns`` are read-only after construction.
    ``is_premium_event`` caches its answer per event name; the cache holds at
    most ``cache_size`` names and forgets the oldest beyond (event names are
    client input, so the cache must not grow without bound).
    """

    def __init__(
        self,
        tiers: Mapping[str, Tier] = DEFAULT_TIERS,
        *,
        default_tier: str = DEFAULT_TIER,
        premium_event_patterns: Iterable[str] = DEFAULT_PREMIUM_EVENT_PATTERNS,
        cache_size: int = PREMIUM_CACHE_SIZE,
        history: Mapping[str, HistoryLimits] = DEFAULT_HISTORY,
    ) -> None:
        for key, tier in tiers.items():
            if key != tier.name:
                raise ValueError(f"tier {tier.name!r} listed under the name {key!r}")
        if default_tier not in tiers:
            raise ValueError(f"the default tier {default_tier!r} is not in the table")
        if cache_size < 1:
            raise ValueError("cache_size must be >= 1")
        self.tiers: dict[str, Tier] = dict(tiers)
        self.default_tier = default_tier
        self.premium_event_patterns: tuple[str, ...] = tuple(premium_event_patterns)
        translated = "|".join(fnmatch.translate(p) for p in self.premium_event_patterns)
        self._premium = re.compile(translated) if translated else None
        self._cache: dict[str, bool] = {}
        self._cache_size = cache_size
        self.history: dict[str, HistoryLimits] = {**DEFAULT_HISTORY, **history}

    def history_of(self, namespace: str) -> HistoryLimits:
        """The history limits of a channel namespace (``user``, ``artist``, ...)."""
        return self.history[namespace]

    def resolve(self, name: str) -> tuple[Tier, bool]:
        """The tier of that name, and whether the name was known (unknown: the default tier)."""
        tier = self.tiers.get(name)
        if tier is None:
            return self.tiers[self.default_tier], False
        return tier, True

    def is_premium_event(self, event: str) -> bool:
        """Whether the event type matches a premium-only pattern (case-sensitive fnmatch)."""
        cached = self._cache.get(event)
        if cached is not None:
            return cached
        premium = self._premium is not None and self._premium.match(event) is not None
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[event] = premium
        return premium


# --------------------------------------------------------------------------- policy files

_TIER_FIELDS: Final = frozenset(f.name for f in dataclasses.fields(Tier)) - {"name"}


def load_policy(path: Path | None) -> TierPolicy:
    """The default policy (``path`` None) or the defaults changed by a policy file."""
    if path is None:
        return TierPolicy()
    try:
        document = _read(path)
        return _build(document)
    except PolicyError as exc:
        raise PolicyError(f"tier policy {path}: {exc}") from None


def _read(path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".toml"):
        raise PolicyError("the file name must end in .json or .toml")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read: {exc}") from None
    try:
        return json.loads(text) if suffix == ".json" else tomllib.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"not valid {suffix[1:].upper()}: {exc}") from None


def _build(document: object) -> TierPolicy:
    if not isinstance(document, dict):
        raise PolicyError("the top level must be a map")
    unknown = sorted(
        set(document) - {"tiers", "premium_event_patterns", "inherit_defaults", "history"}
    )
    if unknown:
        raise PolicyError(f"{unknown[0]}: unknown field")
    inherit = document.get("inherit_defaults", True)
    if not isinstance(inherit, bool):
        raise PolicyError("inherit_defaults: must be true or false")
    patterns = document.get("premium_event_patterns", list(DEFAULT_PREMIUM_EVENT_PATTERNS))
    if not isinstance(patterns, list):
        raise PolicyError("premium_event_patterns: must be a list of strings")
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError(f"premium_event_patterns[{i}]: must be a non-empty string")
    entries = document.get("tiers", {})
    if not isinstance(entries, dict):
        raise PolicyError("tiers: must be a map of tier name to tier")
    base = dict(DEFAULT_TIERS) if inherit else {}
    tiers = _Resolver(base, entries).resolve_all()
    if DEFAULT_TIER not in tiers:
        raise PolicyError(f"tiers.{DEFAULT_TIER}: required (the default tier)")
    return TierPolicy(tiers, premium_event_patterns=patterns, history=_history(document))


def _history(document: dict[str, Any]) -> dict[str, HistoryLimits]:
    entries = document.get("history", {})
    if not isinstance(entries, dict):
        raise PolicyError("history: must be a map of channel namespace to {size, ttl_s}")
    out: dict[str, HistoryLimits] = {}
    for namespace, entry in entries.items():
        where = f"history.{namespace}"
        if namespace not in DEFAULT_HISTORY:
            known = ", ".join(DEFAULT_HISTORY)
            raise PolicyError(f"{where}: unknown namespace (known: {known})")
        if not isinstance(entry, dict):
            raise PolicyError(f"{where}: must be a map {{size, ttl_s}}")
        values = {
            "size": DEFAULT_HISTORY[namespace].size,
            "ttl_s": DEFAULT_HISTORY[namespace].ttl_s,
        }
        unknown = sorted(set(entry) - set(values))
        if unknown:
            raise PolicyError(f"{where}.{unknown[0]}: unknown field")
        values.update(entry)
        try:
            out[namespace] = HistoryLimits(**values)
        except ValidationError as exc:
            raise PolicyError(_describe(where, exc.errors(), new_tier=False)) from None
    return out


class _Resolver:
    """Applies the file's tier entries to the base table, following ``extends``."""

    def __init__(self, base: dict[str, Tier], entries: dict[str, Any]) -> None:
        self.base = base
        self.entries = entries
        self.done: dict[str, Tier] = {}
        self.visiting: list[str] = []

    def resolve_all(self) -> dict[str, Tier]:
        for name in self.base:
            if name not in self.entries:
                self.done[name] = self.base[name]
        for name in self.entries:
            self.resolve(name)
        return self.done

    def resolve(self, name: str) -> Tier:
        if name in self.done:
            return self.done[name]
        where = f"tiers.{name}"
        if name in self.visiting:
            cycle = " -> ".join([*self.visiting[self.visiting.index(name) :], name])
            raise PolicyError(f"{where}.extends: a cycle ({cycle})")
        entry = self.entries[name]
        if not isinstance(entry, dict):
            raise PolicyError(f"{where}: must be a map of fields")
        for key in entry:
            if key != "extends" and key not in _TIER_FIELDS:
                raise PolicyError(f"{where}.{key}: unknown field")
        values: dict[str, Any] = {}
        parent = entry.get("extends")
        if parent is not None:
            if not isinstance(parent, str):
                raise PolicyError(f"{where}.extends: must be a tier name")
            if parent not in self.entries and parent not in self.base:
                known = ", ".join(sorted({*self.base, *self.entries}))
                raise PolicyError(f"{where}.extends: unknown tier {parent!r} (known: {known})")
            self.visiting.append(name)
            values = _tier_values(self.resolve(parent))
            self.visiting.pop()
        elif name in self.base:
            values = _tier_values(self.base[name])
        values.update({k: v for k, v in entry.items() if k != "extends"})
        values["name"] = name
        priorities = values.get("push_priorities")
        if isinstance(priorities, list):
            if not all(isinstance(p, str) for p in priorities):
                raise PolicyError(f"{where}.push_priorities: must be a list of priority names")
            values["push_priorities"] = frozenset(priorities)
        try:
            tier = Tier(**values)
        except ValidationError as exc:
            new = parent is None and name not in self.base
            raise PolicyError(_describe(where, exc.errors(), new_tier=new)) from None
        self.done[name] = tier
        return tier


def _tier_values(tier: Tier) -> dict[str, Any]:
    return {name: getattr(tier, name) for name in _TIER_FIELDS}


def _describe(where: str, errors: list[ErrorDetails], *, new_tier: bool) -> str:
    """Pydantic's errors as ``tiers.<name>.<field>: <what is wrong>``, joined by '; '."""
    out = []
    for error in errors:
        # positions inside push_priorities (a set) mean nothing to the author: left out
        parts = [str(part) for part in error["loc"] if not isinstance(part, int)]
        field = where if parts == ["name"] else ".".join([where, *parts])
        out.append(f"{field}: {_what(error, new_tier=new_tier)}")
    return "; ".join(out)


def _what(error: ErrorDetails, *, new_tier: bool) -> str:
    kind = error["type"]
    ctx = error.get("ctx", {})
    if kind == "greater_than":
        return f"must be > {ctx['gt']}"
    if kind == "missing":
        return (
            "required (a new tier sets every field, or extends a tier)" if new_tier else "required"
        )
    if kind in ("int_type", "int_parsing"):
        return "must be an integer"
    if kind == "bool_type":
        return "must be true or false"
    if kind == "frozen_set_type":
        return "must be a list of priorities"
    if kind == "literal_error":
        return f"must be one of {ctx['expected']} (not {error['input']!r})"
    if kind == "string_pattern_mismatch":
        return "a tier name must be 1 to 64 of [A-Za-z0-9_.-]"
    return str(error["msg"])
