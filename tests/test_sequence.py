"""A request's state machine and its phase clock."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler_svc.sequence import LEGAL_MOVES, IllegalTransition, Phase, PhaseClock, RequestState, Sequence
from svc_common.plan import Sampling

S = RequestState


def make(prompt_len: int = 4, arrival: float = 0.0) -> Sequence:
    return Sequence("r", list(range(1, prompt_len + 1)), Sampling(), max_tokens=4, arrival=arrival)


def test_every_state_has_its_moves_and_a_finished_request_never_moves_again() -> None:
    assert set(LEGAL_MOVES) == set(RequestState)
    assert LEGAL_MOVES[S.FINISHED] == frozenset()
    for state in RequestState:
        if state is not S.FINISHED:
            assert S.FINISHED in LEGAL_MOVES[state], f"a {state.value} request must be able to end"


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], S.SWAPPING_IN),  # a swap-in needs KV on the host
        ([S.RUNNING], S.SWAPPING_IN),
        ([S.RUNNING], S.AWAITING_KV),  # only a new turn waits for kept KV
        ([S.RUNNING, S.SWAPPING_OUT], S.RUNNING),  # not before its copy lands
        ([S.RUNNING, S.SWAPPING_OUT], S.SWAPPING_IN),
        ([S.SWAPPED, S.SWAPPING_IN], S.RUNNING),  # back to WAITING first, once the copy lands
        ([S.AWAITING_KV], S.RUNNING),
        ([S.FINISHED], S.WAITING),
    ],
)
def test_an_illegal_move_raises_and_leaves_the_state_as_it_was(path: list[RequestState], illegal: RequestState) -> None:
    seq = make()
    for state in path:
        seq.move_to(state)
    before = seq.state
    with pytest.raises(IllegalTransition, match=f"{before.value} -> {illegal.value}"):
        seq.move_to(illegal)
    assert seq.state is before


@given(st.lists(st.sampled_from(list(RequestState)), max_size=30))
def test_random_moves_succeed_exactly_when_the_table_allows_them(moves: list[RequestState]) -> None:
    seq = make()
    for target in moves:
        legal = target in LEGAL_MOVES[seq.state]
        before = seq.state
        if legal:
            seq.move_to(target)
            assert seq.state is target
        else:
            with pytest.raises(IllegalTransition):
                seq.move_to(target)
            assert seq.state is before


def test_only_requests_without_a_copy_in_flight_are_schedulable() -> None:
    schedulable = {s for s in RequestState if s.schedulable}
    assert schedulable == {S.WAITING, S.RUNNING, S.SWAPPED}


def test_the_phase_clock_adds_up_the_time_spent_in_each_phase() -> None:
    clock = PhaseClock(Phase.QUEUED, since=10.0)
    clock.enter(Phase.PREFILL, at=12.0)
    clock.enter(Phase.PREFILL, at=12.5)  # staying in a phase changes nothing
    clock.enter(Phase.DECODE, at=13.0)
    clock.enter(Phase.PREEMPTED, at=14.0)
    clock.enter(Phase.DECODE, at=17.0)
    assert clock.seconds(at=18.0) == {
        "queued": 2.0,
        "blocked": 0.0,
        "swap_in": 0.0,
        "prefill": 1.0,
        "preempted": 3.0,
        "decode": 2.0,
    }
    clock.enter(None, at=19.0)  # stopped: no more time accrues
    assert clock.seconds(at=100.0)["decode"] == 3.0


def test_a_requests_phases_follow_its_state_and_progress() -> None:
    seq = make(prompt_len=4, arrival=0.0)
    assert seq.phase() is Phase.QUEUED
    seq.set_blocked(True, at=1.0)
    assert seq.phase() is Phase.BLOCKED
    seq.move_to(S.RUNNING, at=2.0)  # a move clears the blocked mark
    assert seq.phase() is Phase.PREFILL
    seq.num_computed = 4
    seq.tokens.append(9)  # the first token: decoding from now on
    seq.update_phase(at=3.0)
    assert seq.phase() is Phase.DECODE
    seq.preemptions += 1
    seq.move_to(S.SWAPPING_OUT, at=4.0)
    assert seq.phase() is Phase.PREEMPTED
    seq.move_to(S.SWAPPED, at=5.0)
    seq.move_to(S.SWAPPING_IN, at=6.0)
    assert seq.phase() is Phase.SWAP_IN
    seq.move_to(S.WAITING, at=7.5)
    assert seq.phase() is Phase.PREEMPTED
    seq.move_to(S.RUNNING, at=8.0)
    seq.move_to(S.FINISHED, at=9.0)
    assert seq.phase() is None
    assert seq.phases.seconds(at=50.0) == {
        "queued": 1.0,
        "blocked": 1.0,
        "swap_in": 1.5,
        "prefill": 1.0,
        "preempted": 2.5,
        "decode": 2.0,
    }


def test_a_running_request_recomputing_its_history_is_in_prefill_until_it_decodes_again() -> None:
    seq = make(prompt_len=3)
    seq.tokens += [7, 8]  # generated before a recompute preemption dropped its KV
    seq.move_to(S.RUNNING)
    assert seq.phase() is Phase.PREFILL
    seq.num_computed = 4
    assert seq.phase() is Phase.DECODE
