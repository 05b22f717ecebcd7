"""mms's rebalance arithmetic (mms/_rebalance) and the preview built on it, without sockets.

The simulator runs the same functions for its answers (tests/sim holds them to upstream); here
each rule gets a direct case, and the preview is held to the model on random states.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rebalance_states import Device, request, running, step

from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES, align_down_page
from manatee_grpc.mms._messages import (
    CROS_GUEST_VM_ID,
    RES_OK,
    BalloonDelta,
    BalloonStats,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    PrepareVmRequest,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    VmBalloonStats,
)
from manatee_grpc.mms._rebalance import (
    BalloonBounds,
    StatsGapError,
    VmBalloonState,
    adjust_balloon,
    guest_balloon_reached,
    preview_from_stats,
    preview_rebalance,
    rebalance,
    state_from_stats,
)
from manatee_grpc.sim import MmsModel, Scenario

PAGE = PAGE_SIZE_BYTES


def deltas(*pairs: tuple[int, int]) -> list[BalloonDelta]:
    return [BalloonDelta(vm_id, delta_bytes) for vm_id, delta_bytes in pairs]


# --- the rules, one by one ------------------------------------------------------------------


def test_clamp_keeps_each_balloon_within_zero_and_its_memory() -> None:
    bounds = BalloonBounds(balloon_bytes=3 * MIB, mem_size_bytes=5 * MIB)
    assert bounds.clamp_delta(MIB) == MIB
    assert bounds.clamp_delta(9 * MIB) == 2 * MIB
    assert bounds.clamp_delta(-9 * MIB) == -3 * MIB
    assert bounds.clamp_delta(-(2**63)) == -3 * MIB  # i64::MIN saturates, no overflow


def test_adjust_balloon_learns_the_size_reached_and_is_pessimistic_on_failure() -> None:
    assert adjust_balloon(4 * MIB, 2 * MIB, lambda target: target).actual_delta_bytes == 2 * MIB
    short = adjust_balloon(4 * MIB, 2 * MIB, lambda target: 5 * MIB)
    assert (short.balloon_bytes, short.actual_delta_bytes) == (5 * MIB, MIB)
    # A deflate saturates at an empty balloon.
    drained = adjust_balloon(4 * MIB, -9 * MIB, lambda target: target)
    assert (drained.balloon_bytes, drained.actual_delta_bytes) == (0, -4 * MIB)
    # crosvm failed: an inflate gained nothing, a deflate "released" all it asked.
    assert adjust_balloon(4 * MIB, 2 * MIB, None).actual_delta_bytes == 0
    failed = adjust_balloon(4 * MIB, -9 * MIB, None)
    assert (failed.balloon_bytes, failed.actual_delta_bytes) == (0, -9 * MIB)


def test_an_invalid_request_moves_nothing_and_answers_every_id_with_zero() -> None:
    bounds = {0: BalloonBounds(MIB, 8 * MIB), 1: BalloonBounds(MIB, 8 * MIB)}
    moved: list[tuple[int, int]] = []

    def adjust(vm_id: int, delta_bytes: int) -> int:
        moved.append((vm_id, delta_bytes))
        return delta_bytes

    for invalid in (deltas((1, 100), (0, -100)), deltas((1, PAGE), (1, -PAGE)), deltas((7, 0))):
        answer, slack = rebalance(bounds, invalid, adjust)
        assert answer == tuple(BalloonDelta(d.vm_id, 0) for d in invalid)
        assert slack == 0
    assert moved == []


def test_the_slack_of_a_short_inflate_limits_the_deflates() -> None:
    """VM 1's guest gives only 1 MiB of the 4 MiB asked: the CrOS guest gets 1 MiB back."""
    states = {
        0: VmBalloonState(balloon_bytes=64 * MIB, mem_size_bytes=1024 * MIB, available_bytes=0),
        1: VmBalloonState(balloon_bytes=0, mem_size_bytes=64 * MIB, available_bytes=MIB + 100),
    }
    preview = preview_rebalance(states, deltas((1, 4 * MIB), (0, -4 * MIB)))
    assert preview.actual_deltas == (BalloonDelta(1, MIB), BalloonDelta(0, -MIB))
    assert preview.exact


def test_a_clamped_zero_is_left_out_of_mms_answer() -> None:
    states = {
        0: VmBalloonState(64 * MIB, 1024 * MIB, 512 * MIB, hidden_floor=True),
        1: VmBalloonState(64 * MIB, 64 * MIB, 0),  # already full: +8 MiB clamps to 0
        2: VmBalloonState(0, 64 * MIB, 64 * MIB),
    }
    preview = preview_rebalance(states, deltas((1, 8 * MIB), (2, 8 * MIB), (0, -16 * MIB)))
    assert preview.actual_deltas == (BalloonDelta(2, 8 * MIB), BalloonDelta(0, -8 * MIB))


def test_guest_balloon_reached_counts_pages_and_stops_at_the_limit() -> None:
    assert guest_balloon_reached(0, 3 * PAGE + 7, 10 * PAGE) == 3 * PAGE
    assert guest_balloon_reached(2 * PAGE, 9 * PAGE, 5 * PAGE) == 5 * PAGE
    assert guest_balloon_reached(6 * PAGE, 9 * PAGE, 5 * PAGE) == 6 * PAGE  # past it: stays
    assert guest_balloon_reached(6 * PAGE, PAGE, 0) == PAGE  # deflating always works


def _stats(
    vm_id: int, balloon_bytes: int, total: int | None, available: int | None
) -> VmBalloonStats:
    return VmBalloonStats(
        vm_id, BalloonStats(total_memory=total, available_memory=available), balloon_bytes
    )


def test_state_from_stats_gives_the_cros_guest_its_room_and_a_hidden_floor() -> None:
    cros = state_from_stats(_stats(0, 300 * MIB, 700 * MIB, 200 * MIB), None)
    assert cros == VmBalloonState(300 * MIB, 1000 * MIB, 200 * MIB, hidden_floor=True)
    assert cros.room_bytes == 700 * MIB
    sibling = state_from_stats(_stats(1, 100 * MIB, 400 * MIB, 50 * MIB), 512 * MIB)
    assert sibling == VmBalloonState(100 * MIB, 512 * MIB, 50 * MIB)


def test_a_missing_figure_is_named() -> None:
    with pytest.raises(StatsGapError) as caught:
        state_from_stats(_stats(1, 0, 10 * MIB, None), 64 * MIB)
    assert (caught.value.vm_id, caught.value.field) == (1, "stats.available_memory")
    with pytest.raises(StatsGapError) as caught:
        state_from_stats(_stats(0, 0, None, MIB), None)
    assert caught.value.field == "stats.total_memory"
    with pytest.raises(StatsGapError) as caught:
        preview_from_stats({0: _stats(0, 0, MIB, MIB)}, {2: 64 * MIB}, deltas((2, 0), (0, 0)))
    assert (caught.value.vm_id, caught.value.field) == (2, "balloon_actual")


def test_a_preview_that_the_hidden_allocation_decides_is_not_exact() -> None:
    """The CrOS balloon (10 MiB visible) is below VM 1's room (64 MiB): only after mms lost
    track of memory. Clamped at the visible balloon, VM 1's trim depends on the hidden part."""
    states = {
        0: VmBalloonState(10 * MIB, 1024 * MIB, 512 * MIB, hidden_floor=True),
        1: VmBalloonState(0, 64 * MIB, 64 * MIB),
        2: VmBalloonState(32 * MIB, 64 * MIB, 0),
    }
    request = deltas((1, 64 * MIB), (2, -4 * MIB), (0, -60 * MIB))
    assert not preview_rebalance(states, request).exact
    # Within the visible balloon the hidden part plays no role.
    assert preview_rebalance(states, deltas((1, 8 * MIB), (0, -8 * MIB))).exact


@st.composite
def hidden_floor_cases(
    draw: st.DrawFn,
) -> tuple[dict[int, VmBalloonState], list[BalloonDelta], int]:
    pages = st.integers(0, 4096).map(lambda n: n * 64 * 1024)
    siblings = draw(st.integers(1, 4))
    states: dict[int, VmBalloonState] = {}
    for vm_id in range(1, siblings + 1):
        mem = draw(pages.filter(lambda n: n > 0))
        states[vm_id] = VmBalloonState(draw(st.integers(0, mem // PAGE)) * PAGE, mem, draw(pages))
    visible = draw(pages)
    states[0] = VmBalloonState(visible, visible + draw(pages), draw(pages), hidden_floor=True)
    moves = [
        BalloonDelta(vm_id, align_down_page(draw(st.integers(-(2**32), 2**32))))
        for vm_id in range(1, siblings + 1)
    ]
    moves.append(BalloonDelta(0, -sum(d.delta_bytes for d in moves)))
    return states, moves, draw(pages)


@settings(max_examples=600, deadline=None)
@given(hidden_floor_cases())
def test_an_exact_preview_holds_for_any_hidden_allocation(
    case: tuple[dict[int, VmBalloonState], list[BalloonDelta], int],
) -> None:
    """Whatever mms keeps in the CrOS balloon, an exact preview is what mms would answer."""
    states, request, hidden_bytes = case
    preview = preview_rebalance(states, request)
    cros = states[0]
    truth = dict(states)
    truth[0] = VmBalloonState(
        cros.balloon_bytes + hidden_bytes, cros.mem_size_bytes + hidden_bytes, cros.available_bytes
    )
    if preview.exact:
        assert preview.actual_deltas == preview_rebalance(truth, request).actual_deltas


# --- the preview against the model, on random states -----------------------------------------


class ModelDevice(Device):
    def __init__(self, model: MmsModel) -> None:
        self.model = model

    def start_vm(self, mem_size_bytes: int, init_mem_size_bytes: int) -> int | None:
        prepared = self.model.handle(PrepareVmRequest(mem_size_bytes, init_mem_size_bytes))
        finished = prepared.res == RES_OK and (
            self.model.handle(FinishAddVmRequest(prepared.vm_id)).res == RES_OK
        )
        if finished:
            return prepared.vm_id
        if prepared.vm_id:
            self.model.handle(RemoveVmRequest(prepared.vm_id))
        return None

    def prepare_vm(self, mem_size_bytes: int, init_mem_size_bytes: int) -> int:
        return self.model.handle(PrepareVmRequest(mem_size_bytes, init_mem_size_bytes)).vm_id

    def remove_vm(self, vm_id: int) -> None:
        self.model.handle(RemoveVmRequest(vm_id))

    def rebalance(self, deltas: dict[int, int]) -> None:
        self.model.handle(RebalanceMemoryRequest(mms_deltas(deltas)))

    def set_used_bytes(self, vm_id: int, used_bytes: int) -> None:
        self.model.set_vm_used_bytes(vm_id, used_bytes)

    def change_internal_allocation(self, delta_bytes: int) -> None:
        self.model.change_internal_allocation(delta_bytes)

    def internal_allocation_bytes(self) -> int:
        return self.model.cros_internal_allocation_bytes

    def balloon_bytes(self, vm_id: int) -> int:
        return self.model.balloon_bytes(vm_id)


def mms_deltas(deltas: dict[int, int]) -> tuple[BalloonDelta, ...]:
    """What the server sends: page-aligned sibling deltas, then the CrOS guest's opposite."""
    aligned = [BalloonDelta(vm_id, align_down_page(d)) for vm_id, d in deltas.items()]
    return (*aligned, BalloonDelta(CROS_GUEST_VM_ID, -sum(d.delta_bytes for d in aligned)))


MODEL_STATES = 1000


def test_the_preview_is_mms_answer_on_random_states() -> None:
    """Random sessions on the bare model: the preview from one stats read is mms's answer.

    Each state is previewed from a GetBalloonStats answer (as the server does), then the same
    request goes to the model. A preview may only be refused (not exact) once mms has lost
    track of memory (its books overcommitted); every preview it gives is mms's answer.
    """
    rng = random.Random(20261130)
    counts = {"exact": 0, "refused": 0, "short": 0, "clamped": 0, "pending": 0}
    while counts["exact"] + counts["refused"] < MODEL_STATES:
        model = MmsModel(Scenario(cros_used_bytes=rng.randrange(0, 6 * 1024) * MIB))
        device = ModelDevice(model)
        siblings: dict[int, int] = {}
        for _ in range(rng.randrange(1, 30)):
            step(rng, device, siblings)
        if not running(siblings):
            continue
        sent = mms_deltas(request(rng, device, siblings))
        answer = model.handle(GetBalloonStatsRequest(tuple(sorted(d.vm_id for d in sent))))
        stats = {entry.vm_id: entry for entry in answer.all_stats}
        mem_sizes = {vm_id: view.mem_size_bytes for vm_id, view in model.siblings().items()}
        counts["pending"] += model.pending_start() is not None
        unbalanced_bytes = model.unbalanced_bytes
        preview = preview_from_stats(stats, mem_sizes, sent)
        actual = model.handle(RebalanceMemoryRequest(sent)).actual_deltas
        if preview.exact:
            assert preview.actual_deltas == actual, (sent, preview, actual)
            counts["exact"] += 1
        else:
            assert unbalanced_bytes < 0, "refused while mms's books were whole"
            counts["refused"] += 1
        answered = {d.vm_id: d.delta_bytes for d in actual}
        counts["short"] += any(0 < answered.get(d.vm_id, 0) < d.delta_bytes for d in sent)
        counts["clamped"] += len(answered) < len(sent)
    assert counts["refused"] <= MODEL_STATES // 50, counts
    assert min(counts["short"], counts["clamped"], counts["pending"]) >= 50, counts
