"""realtime/gate.py, sans I/O: logins in progress bounded, the rest let in by arrival."""

from __future__ import annotations

from realtime.door import Door, Ticket
from realtime.gate import GatePass, HandshakeGate, PassState


def entered(gate: HandshakeGate) -> GatePass:
    gate_pass = gate.enter()
    assert gate_pass is not None
    return gate_pass


def test_passes_beyond_the_limit_wait_and_go_in_by_arrival() -> None:
    gate = HandshakeGate(limit=2, max_waiting=10, lease=1.0)
    first, second = entered(gate), entered(gate)
    assert first.active and second.active
    admitted: list[str] = []
    waiting = [entered(gate) for _ in range(3)]
    for name, gate_pass in zip("abc", waiting, strict=True):
        gate_pass.on_admit = lambda name=name: admitted.append(name)
    assert [p.state for p in waiting] == [PassState.WAITING] * 3
    assert (gate.active, gate.waiting_count) == (2, 3)
    first.release()
    assert admitted == ["a"] and waiting[0].active
    first.release()  # idempotent: one place freed, once
    assert admitted == ["a"] and gate.active == 2
    waiting[0].release()
    second.release()
    assert admitted == ["a", "b", "c"]
    assert (gate.active, gate.waiting_count) == (2, 0)


def test_a_newcomer_does_not_overtake_the_queue() -> None:
    gate = HandshakeGate(limit=1, max_waiting=10, lease=1.0)
    first = entered(gate)
    queued = entered(gate)
    assert not queued.active
    queued_in: list[bool] = []
    queued.on_admit = lambda: queued_in.append(True)
    first.release()
    assert queued_in == [True]
    assert not entered(gate).active  # the queued one holds the place now


def test_a_pass_released_while_waiting_is_skipped_and_frees_its_queue_place() -> None:
    gate = HandshakeGate(limit=1, max_waiting=2, lease=1.0)
    holder = entered(gate)
    gone, next_one = entered(gate), entered(gate)
    assert gate.enter() is None  # the queue is full: refuse
    gone.release()  # its client left while it waited
    assert gate.waiting_count == 1
    late = entered(gate)  # its queue place is free again
    holder.release()
    assert next_one.active and not late.active and gone.state is PassState.DONE
    assert gate.active == 1


def test_the_queue_drops_released_passes_before_it_grows_past_twice_its_bound() -> None:
    gate = HandshakeGate(limit=1, max_waiting=4, lease=1.0)
    entered(gate)
    for _ in range(100):  # clients that come and leave while one login holds the place
        entered(gate).release()
    assert gate.waiting_count == 0
    assert len(gate.queue) <= 2 * gate.max_waiting


def test_a_tickets_release_gives_up_its_gate_place() -> None:
    gate = HandshakeGate(limit=1, max_waiting=10, lease=1.0)
    door = Door(max_connections_per_ip=10, connect_rate_per_ip=10, gate=gate)
    ticket = door.admit("10.0.0.1")
    assert isinstance(ticket, Ticket)
    ticket.gate_pass = entered(gate)
    waiting = entered(gate)
    ticket.end_login()  # the connect was answered
    assert waiting.active and ticket.gate_pass is None
    ticket.release()  # the connection ends later: nothing more to give up
    assert gate.active == 1 and door.open == {}
