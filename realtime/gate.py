"""The handshake gate: WebSocket logins in progress on a node, taken in arrival order.

A node that a crowd reconnects to (its neighbour died, a deploy) cannot finish 10,000
handshakes at once. Worked on all together, each one's share of the CPU shrinks until the
clients give up (their open timeout) and come back, and the node has spent its time on
answers nobody waits for. The gate keeps at most ``limit`` logins in progress — from the
upgrade request's complete head to the ``connect`` answered — and parks the rest, not
read, in arrival order: each one it lets in finishes quickly, the wait of the others costs
nothing, and the queue drains at the node's own pace. ``max_waiting`` bounds the queue;
beyond it a handshake is refused (503 ``Retry-After``) at once.

A pass that holds a place for longer than the lease (a client that never sends
``connect``) gives its place up and goes on outside the gate: a slow or idle socket delays
the queue by at most the lease, never blocks it.

Sans I/O: the gate counts and orders; the HTTP protocol pauses and resumes reading, the
connection releases its pass when its ``connect`` is answered, and the lease runs on the
protocol's loop (``GatePass.lease_timer``).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from enum import Enum


class PassState(Enum):
    WAITING = "waiting"
    ACTIVE = "active"
    DONE = "done"


class GatePass:
    """One handshake's place: waiting, then active, then done (``release``, idempotent)."""

    __slots__ = ("gate", "lease_timer", "on_admit", "state")

    def __init__(self, gate: HandshakeGate, state: PassState) -> None:
        self.gate = gate
        self.state = state
        #: called (once) when a waiting pass becomes active
        self.on_admit: Callable[[], None] | None = None
        #: the shell's lease timer, cancelled at release
        self.lease_timer: asyncio.TimerHandle | None = None

    @property
    def active(self) -> bool:
        return self.state is PassState.ACTIVE

    def release(self) -> None:
        """The login is answered, or the connection ended, or the lease ran out."""
        state = self.state
        if state is PassState.DONE:
            return
        self.state = PassState.DONE
        self.on_admit = None
        timer, self.lease_timer = self.lease_timer, None
        if timer is not None:
            timer.cancel()
        gate = self.gate
        if state is PassState.WAITING:
            gate.waiting_count -= 1
        else:
            gate.active -= 1
            gate.admit_next()


class HandshakeGate:
    """At most ``limit`` passes active; the rest wait in order, at most ``max_waiting``."""

    def __init__(self, limit: int, max_waiting: int, lease: float) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self.lease = lease
        self.active = 0
        #: waiting passes, in arrival order (a released one is skipped when its turn comes)
        self.queue: deque[GatePass] = deque()
        self.waiting_count = 0

    def enter(self) -> GatePass | None:
        """A pass, active at once or waiting; None when the queue is full (refuse)."""
        if self.active < self.limit and not self.waiting_count:
            self.active += 1
            return GatePass(self, PassState.ACTIVE)
        if self.waiting_count >= self.max_waiting:
            return None
        if len(self.queue) >= 2 * self.max_waiting:  # drop passes released while waiting
            self.queue = deque(p for p in self.queue if p.state is PassState.WAITING)
        gate_pass = GatePass(self, PassState.WAITING)
        self.queue.append(gate_pass)
        self.waiting_count += 1
        return gate_pass

    def admit_next(self) -> None:
        """Let waiting passes in while there is room (each one's ``on_admit`` is called)."""
        queue = self.queue
        while self.active < self.limit and queue:
            gate_pass = queue.popleft()
            if gate_pass.state is not PassState.WAITING:
                continue
            gate_pass.state = PassState.ACTIVE
            self.waiting_count -= 1
            self.active += 1
            on_admit, gate_pass.on_admit = gate_pass.on_admit, None
            if on_admit is not None:
                on_admit()
