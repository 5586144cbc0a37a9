"""Loss accounting, sans I/O: what each client was owed against what it got.

The publisher numbers the events of each *key* (a channel, or ``notify:<user>``
for a user's notifications) 1, 2, 3 ... in the order it sends them and logs
each one's send time and flags. A client keeps, per key, the time it became
entitled (the ``subscribe`` or ``connect`` reply arrived), the time it stopped
(it closed), and the sequence numbers it received.

An event is owed to a client when it was accepted (HTTP 202), was sent while
the client was entitled (and before publishing ended), and is not a premium-only
event for a free client. Sending after the reply has arrived means the server
held the subscription when it took the event, so nothing owed is ambiguous.
"""

from __future__ import annotations

import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import accumulate, pairwise
from typing import Any, Final

ACCEPTED: Final = 1
PREMIUM: Final = 2
NOTIFY_PREFIX: Final = "notify:"
MAX_SAMPLES: Final = 20


def notify_key(user: str) -> str:
    return NOTIFY_PREFIX + user


class KeyLog:
    """The events of one key: send time (unix s) and flags of sequence number i + 1."""

    __slots__ = ("_prefix", "flags", "times")

    def __init__(self) -> None:
        self.times = array("d")
        self.flags = array("B")
        self._prefix: tuple[list[int], list[int]] | None = None

    def __len__(self) -> int:
        return len(self.times)

    def append(self, sent_at: float, *, premium: bool) -> int:
        """Log an event about to be sent; returns its sequence number."""
        self.times.append(sent_at)
        self.flags.append(PREMIUM if premium else 0)
        self._prefix = None
        return len(self.times)

    def settle(self, seq: int, *, accepted: bool) -> None:
        if accepted:
            self.flags[seq - 1] |= ACCEPTED
        else:
            self.flags[seq - 1] &= ~ACCEPTED & 0xFF
        self._prefix = None

    def owed_prefix(self, paid: bool) -> list[int]:
        """prefix[i]: events among 1..i owed to a client entitled throughout."""
        if self._prefix is None:
            owed_paid = [1 if f & ACCEPTED else 0 for f in self.flags]
            owed_free = [1 if f == ACCEPTED else 0 for f in self.flags]
            self._prefix = (
                list(accumulate(owed_paid, initial=0)),
                list(accumulate(owed_free, initial=0)),
            )
        return self._prefix[0] if paid else self._prefix[1]

    def __getstate__(self) -> tuple[array[float], array[int]]:
        return self.times, self.flags

    def __setstate__(self, state: tuple[array[float], array[int]]) -> None:
        self.times, self.flags = state
        self._prefix = None


class PublishLog:
    """Every event the publishers sent, by key."""

    def __init__(self) -> None:
        self.keys: dict[str, KeyLog] = {}

    def append(self, key: str, sent_at: float, *, premium: bool = False) -> int:
        log = self.keys.get(key)
        if log is None:
            log = self.keys[key] = KeyLog()
        return log.append(sent_at, premium=premium)

    def settle(self, key: str, seq: int, *, accepted: bool) -> None:
        self.keys[key].settle(seq, accepted=accepted)

    def sent(self) -> int:
        return sum(len(log) for log in self.keys.values())

    def accepted(self) -> int:
        return sum(sum(f & ACCEPTED for f in log.flags) for log in self.keys.values())


class Receipt:
    """What one client received on one key, and when it was entitled to it."""

    __slots__ = ("closed", "opened", "seqs")

    def __init__(self) -> None:
        self.opened = math.inf  # set when the subscribe/connect reply arrives
        self.closed = math.inf  # set when the connection ends
        self.seqs = array("I")


@dataclass(frozen=True, slots=True)
class Missing:
    """One owed event that did not arrive."""

    client: str
    key: str
    seq: int
    sent_at: float


@dataclass(slots=True)
class Loss:
    """Totals of an accounting; ``delivered + lost == expected``."""

    expected: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    premium_leaks: int = 0
    extra: int = 0  # arrived but not owed: sent before the reply, or not accepted
    unknown: int = 0  # a sequence number the publisher never sent
    samples: list[Missing] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.expected - self.delivered

    def merge(self, other: Loss) -> None:
        self.expected += other.expected
        self.delivered += other.delivered
        self.duplicates += other.duplicates
        self.out_of_order += other.out_of_order
        self.premium_leaks += other.premium_leaks
        self.extra += other.extra
        self.unknown += other.unknown
        room = MAX_SAMPLES - len(self.samples)
        self.samples.extend(other.samples[: max(room, 0)])

    def to_json(self) -> dict[str, Any]:
        return {
            "expected": self.expected,
            "delivered": self.delivered,
            "lost": self.lost,
            "loss_rate": (self.lost / self.expected) if self.expected else None,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "premium_leaks": self.premium_leaks,
            "extra": self.extra,
            "unknown": self.unknown,
            "lost_samples": [
                {"client": m.client, "key": m.key, "seq": m.seq, "sent_at": m.sent_at}
                for m in self.samples
            ],
        }


def account(
    log: PublishLog,
    receipts: Iterable[tuple[str, str, Receipt, bool]],
    *,
    published_until: float,
) -> Loss:
    """Check ``(client, key, receipt, paid)`` entries against the publish log.

    ``published_until`` is when publishing ended; a receipt still open then is
    entitled up to it. Order is checked on every key but notifications.
    """
    loss = Loss()
    for entry in receipts:
        _check(loss, log.keys.get(entry[1]), entry, published_until=published_until)
    return loss


def _check(
    loss: Loss,
    klog: KeyLog | None,
    entry: tuple[str, str, Receipt, bool],
    *,
    published_until: float,
) -> None:
    client, key, receipt, paid = entry
    seqs = receipt.seqs
    if not key.startswith(NOTIFY_PREFIX):
        loss.out_of_order += sum(1 for a, b in pairwise(seqs) if b < a)
    unique = set(seqs)
    loss.duplicates += len(seqs) - len(unique)
    if klog is None:
        loss.unknown += len(unique)
        return
    times, flags = klog.times, klog.flags
    # owed window, as sequence numbers lo < seq <= hi
    lo = bisect_left(times, receipt.opened)
    hi = bisect_right(times, min(receipt.closed, published_until))
    hi = max(hi, lo)
    prefix = klog.owed_prefix(paid)
    expected = prefix[hi] - prefix[lo]
    delivered = 0
    n = len(times)
    for seq in unique:
        if not 1 <= seq <= n:
            loss.unknown += 1
            continue
        flag = flags[seq - 1]
        if flag & PREMIUM and not paid:
            loss.premium_leaks += 1
        elif lo < seq <= hi and flag & ACCEPTED:
            delivered += 1
        else:
            loss.extra += 1
    loss.expected += expected
    loss.delivered += delivered
    if delivered < expected and len(loss.samples) < MAX_SAMPLES:
        owed_flag = ACCEPTED if not paid else None
        for seq in range(lo + 1, hi + 1):
            flag = flags[seq - 1]
            owed = flag == owed_flag if owed_flag is not None else bool(flag & ACCEPTED)
            if owed and seq not in unique:
                loss.samples.append(Missing(client, key, seq, times[seq - 1]))
                if len(loss.samples) >= MAX_SAMPLES:
                    break
