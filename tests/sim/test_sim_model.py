"""Pure tests of the mms model: rebalance vectors, every start transition, stats and hangups.

No sockets. Expected numbers come from the spec and from sirenia's manatee_memory_service.rs
(whose own unit tests are the three rebalance vectors).
"""

from __future__ import annotations

import dataclasses

import pytest

from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES, extra_bytes
from manatee_grpc.mms._messages import (
    RES_EINVAL,
    RES_EIO,
    RES_ENOMEM,
    RES_OK,
    BalloonDelta,
    BalloonStats,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    VmBalloonStats,
)
from manatee_grpc.sim import MmsModel, Scenario, StartState
from manatee_grpc.sim._model import BalloonBounds, plan_rebalance
from manatee_grpc.sim._scenario import GIB

MEM_1G = 1024 * MIB
INIT_1G = 1000 * MIB
REQUIRED_1G = INIT_1G + extra_bytes(MEM_1G)


def prepare(
    model: MmsModel, mem_bytes: int = MEM_1G, init_bytes: int = INIT_1G
) -> PrepareVmResponse:
    response = model.handle(PrepareVmRequest(mem_bytes, init_bytes))
    assert isinstance(response, PrepareVmResponse)
    return response


def finish(model: MmsModel, vm_id: int) -> int:
    response = model.handle(FinishAddVmRequest(vm_id))
    assert isinstance(response, FinishAddVmResponse)
    return response.res


def remove(model: MmsModel, vm_id: int) -> int:
    response = model.handle(RemoveVmRequest(vm_id))
    assert isinstance(response, RemoveVmResponse)
    return response.res


def rebalance(model: MmsModel, *deltas: tuple[int, int]) -> list[tuple[int, int]]:
    request = RebalanceMemoryRequest(tuple(BalloonDelta(i, d) for i, d in deltas))
    response = model.handle(request)
    assert isinstance(response, RebalanceMemoryResponse)
    return [(d.vm_id, d.delta_bytes) for d in response.actual_deltas]


def stats(model: MmsModel, *vm_ids: int) -> dict[int, VmBalloonStats]:
    response = model.handle(GetBalloonStatsRequest(vm_ids))
    assert isinstance(response, GetBalloonStatsResponse)
    return {entry.vm_id: entry for entry in response.all_stats}


def start_vm(model: MmsModel, mem_bytes: int = MEM_1G, init_bytes: int = INIT_1G) -> int:
    response = prepare(model, mem_bytes, init_bytes)
    assert response.res == RES_OK
    assert finish(model, response.vm_id) == RES_OK
    return response.vm_id


# --- rebalance: mms's own unit tests, sizes in MiB ------------------------------------------------


@pytest.mark.parametrize(
    ("mem_mib", "balloon_mib", "deltas_mib", "inflates_mib", "deflates_mib"),
    [
        ([5, 10], [3, 9], [-3, 3], [(1, 1)], [(0, -1)]),
        ([5, 10], [1, 5], [-2, 2], [(1, 1)], [(0, -1)]),
        ([5, 5, 5, 10], [4, 5, 1, 9], [2, 2, 3, -7], [(0, 1), (2, 3)], [(3, -4)]),
    ],
    ids=["overinflate", "underinflate", "overinflate_multiple"],
)
def test_rebalance_plan_reproduces_the_spec_vectors(
    mem_mib: list[int],
    balloon_mib: list[int],
    deltas_mib: list[int],
    inflates_mib: list[tuple[int, int]],
    deflates_mib: list[tuple[int, int]],
) -> None:
    bounds = {
        vm_id: BalloonBounds(balloon_bytes=b * MIB, mem_size_bytes=m * MIB)
        for vm_id, (m, b) in enumerate(zip(mem_mib, balloon_mib, strict=True))
    }
    plan = plan_rebalance(bounds, [BalloonDelta(i, d * MIB) for i, d in enumerate(deltas_mib)])

    assert plan is not None
    assert [(d.vm_id, d.delta_bytes) for d in plan.inflates] == [
        (i, d * MIB) for i, d in inflates_mib
    ]
    assert [(d.vm_id, d.delta_bytes) for d in plan.deflates] == [
        (i, d * MIB) for i, d in deflates_mib
    ]


@pytest.mark.parametrize(
    "deltas",
    [
        [BalloonDelta(0, 4096), BalloonDelta(1, -4095)],  # not a page multiple
        [BalloonDelta(1, 4096), BalloonDelta(1, -4096)],  # duplicate id
        [BalloonDelta(0, 4096), BalloonDelta(9, -4096)],  # unknown id
    ],
    ids=["unaligned", "duplicate", "unknown"],
)
def test_rebalance_plan_refuses_invalid_requests(deltas: list[BalloonDelta]) -> None:
    bounds = {0: BalloonBounds(MIB, 8 * MIB), 1: BalloonBounds(MIB, 8 * MIB)}
    assert plan_rebalance(bounds, deltas) is None


def test_rebalance_through_the_model_moves_memory_and_keeps_the_books() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    cros_before = model.cros_balloon_bytes
    sibling_before = model.siblings()[vm_id].balloon_bytes

    # Concierge's shape: deflate the sibling by 8 MiB, the CrOS guest inflates by as much.
    answer = rebalance(model, (vm_id, -8 * MIB), (0, 8 * MIB))

    # Inflates are answered first, then deflates.
    assert answer == [(0, 8 * MIB), (vm_id, -8 * MIB)]
    assert model.cros_balloon_bytes == cros_before + 8 * MIB
    assert model.siblings()[vm_id].balloon_bytes == sibling_before - 8 * MIB
    assert model.conservation_error_bytes() == 0


def test_rebalance_inflate_short_of_guest_use_limits_the_deflates() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    balloon = model.siblings()[vm_id].balloon_bytes
    # The sibling can give at most 4 MiB more: the rest is in use.
    model.set_vm_used_bytes(vm_id, MEM_1G - balloon - 4 * MIB)

    answer = rebalance(model, (vm_id, 16 * MIB), (0, -16 * MIB))

    assert answer == [(vm_id, 4 * MIB), (0, -4 * MIB)]
    assert model.conservation_error_bytes() == 0


def test_rebalance_leaves_out_a_vm_whose_clamped_delta_is_zero() -> None:
    model = MmsModel()
    # init == mem: the new sibling's balloon is empty, so it cannot deflate at all.
    vm_id = start_vm(model, 512 * MIB, 512 * MIB)
    assert model.siblings()[vm_id].balloon_bytes == 0

    # The sibling clamps to 0 (in neither list); trimming then cuts the CrOS inflate to 0.
    assert rebalance(model, (vm_id, -4 * MIB), (0, 4 * MIB)) == [(0, 0)]
    # Alone, nothing is answered at all: concierge would call this rebalance "full".
    assert rebalance(model, (vm_id, -4 * MIB)) == []
    assert rebalance(model) == []
    assert model.conservation_error_bytes() == 0


def test_rebalance_invalid_answers_zero_for_every_requested_id_and_applies_nothing() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    pending = prepare(model).vm_id
    before = (model.cros_balloon_bytes, model.siblings())

    assert rebalance(model, (vm_id, 4096), (0, -4095)) == [(vm_id, 0), (0, 0)]
    assert rebalance(model, (vm_id, 4096), (vm_id, -4096)) == [(vm_id, 0), (vm_id, 0)]
    # The pending VM is not a known balloon yet.
    assert rebalance(model, (pending, 4096), (0, -4096)) == [(pending, 0), (0, 0)]
    assert (model.cros_balloon_bytes, model.siblings()) == before


def test_rebalance_trimming_can_unbalance_mms_as_the_real_one_did() -> None:
    """mms trims with the VM's full range, so an inflate can become a deflate (kept in the list).

    If a later inflate then comes back short, the slack goes negative, the deflate list turns
    into inflates, and when those are short too mms logs "non-zero slack remaining": memory was
    handed out that nobody gave up. The model reproduces it and reports it in unbalanced_bytes.
    """
    model = MmsModel(Scenario(cros_internal_allocation_bytes=0))
    first = start_vm(model)
    second = start_vm(model)
    assert model.siblings()[first].balloon_bytes == 24 * MIB
    # Neither the CrOS guest nor the second sibling can inflate any further.
    model.set_vm_used_bytes(0, model.cros_mem_size_bytes - model.guest_balloon_bytes(0))
    model.set_vm_used_bytes(second, MEM_1G - 24 * MIB)

    # Clamped: +4, +100, -24 (total +80): trimming turns the first inflate into -24.
    answer = rebalance(model, (first, 4 * MIB), (0, 100 * MIB), (second, -500 * MIB))

    assert answer == [(first, -24 * MIB), (0, 0), (second, 0)]
    assert model.unbalanced_bytes == -24 * MIB
    assert model.conservation_error_bytes() == model.unbalanced_bytes


# --- extra_bytes and reservations ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("mem_mib", "current_bytes", "older_bytes"),
    [
        (512, 20_553_728, 11_378_688),
        (1024, 34_816_000, 16_465_920),
        (2048, 63_336_448, 26_636_288),
        (4000, 117_702_656, 46_022_656),
    ],
)
def test_prepare_reserves_init_plus_extra_bytes_of_the_selected_formula(
    mem_mib: int, current_bytes: int, older_bytes: int
) -> None:
    init_bytes = min(1000, mem_mib) * MIB
    for formula, extra in (("current", current_bytes), ("older", older_bytes)):
        model = MmsModel(Scenario(extra_bytes_formula=formula))  # type: ignore[arg-type]
        response = prepare(model, mem_mib * MIB, init_bytes)

        assert response == PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
        assert model.cros_balloon_bytes == init_bytes + extra
        view = model.pending_start()
        assert view is not None
        assert view.required_bytes == view.reserved_bytes == init_bytes + extra


def test_prepare_short_answers_enomem_with_shortfall_and_retries_accumulate() -> None:
    model = MmsModel()
    cros_guest_balloon = model.guest_balloon_bytes(0)
    # The CrOS guest can give only 300 MiB now.
    model.set_vm_used_bytes(0, model.cros_mem_size_bytes - cros_guest_balloon - 300 * MIB)

    first = prepare(model)
    assert first == PrepareVmResponse(RES_ENOMEM, 1, REQUIRED_1G - 300 * MIB)
    assert model.start_state is StartState.PENDING
    # Nothing more to give: a retry reserves nothing and reports the same shortfall.
    assert prepare(model) == first

    model.set_vm_used_bytes(0, model.cros_used_bytes - 500 * MIB)
    second = prepare(model)
    assert second == PrepareVmResponse(RES_ENOMEM, 1, REQUIRED_1G - 800 * MIB)

    model.set_vm_used_bytes(0, 0)
    assert prepare(model) == PrepareVmResponse(RES_OK, 1, 0)
    # Every call asked only for what was still missing.
    assert model.cros_balloon_bytes == REQUIRED_1G
    assert prepare(model) == PrepareVmResponse(RES_OK, 1, 0)
    assert model.cros_balloon_bytes == REQUIRED_1G
    assert model.conservation_error_bytes() == 0


# --- the start state machine ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mem_bytes", "init_bytes"),
    [
        (MEM_1G + 1, INIT_1G),  # mem not a page multiple
        (MEM_1G, INIT_1G + 1),  # init not a page multiple
        (MEM_1G, MEM_1G + 4096),  # init above mem
        (8 * GIB, INIT_1G),  # not smaller than the CrOS guest
    ],
    ids=["mem_unaligned", "init_unaligned", "init_above_mem", "as_big_as_cros"],
)
def test_prepare_in_idle_refuses_bad_sizes_without_spending_an_id(
    mem_bytes: int, init_bytes: int
) -> None:
    model = MmsModel()
    assert prepare(model, mem_bytes, init_bytes) == PrepareVmResponse(RES_EINVAL, 0, 0)
    assert model.start_state is StartState.IDLE
    assert model.next_vm_id == 1
    assert prepare(model).vm_id == 1


def test_prepare_in_pending_refuses_other_sizes() -> None:
    model = MmsModel()
    assert prepare(model).res == RES_OK
    assert prepare(model, 2 * MEM_1G, INIT_1G) == PrepareVmResponse(RES_EINVAL, 0, 0)
    view = model.pending_start()
    assert view is not None
    assert (view.vm_id, view.mem_size_bytes, view.state) == (1, MEM_1G, StartState.PENDING)


def test_finish_success_makes_a_sibling_with_its_balloon_at_mem_minus_init() -> None:
    model = MmsModel()
    vm_id = prepare(model).vm_id
    assert finish(model, vm_id) == RES_OK
    assert model.start_state is StartState.IDLE
    sibling = model.siblings()[vm_id]
    assert sibling.balloon_bytes == MEM_1G - INIT_1G
    assert sibling.used_bytes == 64 * MIB
    assert model.conservation_error_bytes() == 0


def test_finish_refuses_unknown_ids_and_idle() -> None:
    model = MmsModel()
    assert finish(model, 1) == RES_EINVAL
    vm_id = prepare(model).vm_id
    assert finish(model, vm_id + 1) == RES_EINVAL
    assert finish(model, 0) == RES_EINVAL
    assert model.start_state is StartState.PENDING


def test_finish_with_incomplete_reservation_fails_and_failed_refuses_everything_but_remove() -> (
    None
):
    model = MmsModel()
    model.set_vm_used_bytes(0, model.cros_mem_size_bytes - model.guest_balloon_bytes(0) - MIB)
    vm_id = prepare(model).vm_id
    assert finish(model, vm_id) == RES_ENOMEM
    assert model.start_state is StartState.FAILED

    model.set_vm_used_bytes(0, 0)
    assert prepare(model) == PrepareVmResponse(RES_EINVAL, 0, 0)
    assert finish(model, vm_id) == RES_EINVAL
    assert remove(model, vm_id) == RES_OK
    assert model.pending_start() is None
    assert model.cros_balloon_bytes == 0
    assert model.conservation_error_bytes() == 0


def test_finish_when_crosvm_never_connects_answers_eio() -> None:
    model = MmsModel(Scenario(crosvm_connect_fail_count=1))
    vm_id = prepare(model).vm_id
    assert finish(model, vm_id) == RES_EIO
    view = model.pending_start()
    assert view is not None
    assert (view.state, view.crosvm_connected) == (StartState.FAILED, False)
    assert not model.remove_would_wait(vm_id)
    assert remove(model, vm_id) == RES_OK
    # The failure was for one start only.
    assert start_vm(model) == vm_id + 1


def test_connect_failure_by_vm_id() -> None:
    model = MmsModel(Scenario(crosvm_connect_fail_vm_ids=frozenset({2})))
    assert start_vm(model) == 1
    assert finish(model, prepare(model).vm_id) == RES_EIO


def test_finish_when_the_new_balloon_falls_short_answers_enomem() -> None:
    model = MmsModel(Scenario(vm_used_bytes={1: INIT_1G + MIB}))
    vm_id = prepare(model).vm_id
    assert finish(model, vm_id) == RES_ENOMEM
    view = model.pending_start()
    assert view is not None
    assert (view.state, view.crosvm_connected) == (StartState.FAILED, True)
    # mms waits for the connected crosvm to exit before releasing the reservation.
    assert model.remove_would_wait(vm_id)
    assert remove(model, vm_id) == RES_OK
    assert model.cros_balloon_bytes == 0


def test_prepare_control_socket_failure_answers_eio_and_spends_the_id() -> None:
    model = MmsModel(Scenario(control_socket_fail_count=1))
    assert prepare(model) == PrepareVmResponse(RES_EIO, 0, 0)
    assert model.start_state is StartState.IDLE
    assert model.cros_balloon_bytes == 0
    assert prepare(model).vm_id == 2


def test_remove_refuses_the_cros_guest_and_unknown_ids() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    assert remove(model, 0) == RES_EINVAL
    assert remove(model, vm_id + 5) == RES_EINVAL
    assert vm_id in model.siblings()


def test_remove_running_sibling_gives_back_outside_balloon_plus_extra() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    rebalance(model, (vm_id, -64 * MIB), (0, 64 * MIB))
    balloon = model.siblings()[vm_id].balloon_bytes
    cros_before = model.cros_balloon_bytes

    assert remove(model, vm_id) == RES_OK

    assert model.cros_balloon_bytes == cros_before - (MEM_1G - balloon + extra_bytes(MEM_1G))
    assert model.cros_balloon_bytes == 0
    assert remove(model, vm_id) == RES_EINVAL


def test_remove_pending_gives_back_what_was_reserved() -> None:
    model = MmsModel()
    model.set_vm_used_bytes(0, model.cros_mem_size_bytes - model.guest_balloon_bytes(0) - 256 * MIB)
    vm_id = prepare(model).vm_id
    assert model.cros_balloon_bytes == 256 * MIB
    assert remove(model, vm_id) == RES_OK
    assert model.cros_balloon_bytes == 0
    assert model.start_state is StartState.IDLE


def test_vm_ids_start_at_one_and_never_repeat() -> None:
    model = MmsModel()
    first = start_vm(model)
    assert remove(model, first) == RES_OK
    second = start_vm(model)
    model.connection_lost()
    third = prepare(model).vm_id
    assert (first, second, third) == (1, 2, 3)


# --- stats ---------------------------------------------------------------------------------------


def test_stats_leave_out_unknown_pending_and_failing_vms() -> None:
    model = MmsModel()
    running = start_vm(model)
    failing = start_vm(model)
    pending = prepare(model).vm_id
    model.fail_stats(failing)

    entries = stats(model, 0, running, failing, pending, 99)
    assert list(entries) == [0, running]

    model.fail_stats(failing, failing=False)
    assert list(stats(model, failing, failing)) == [failing]


def test_stats_repeat_a_vm_asked_twice() -> None:
    model = MmsModel()
    response = model.handle(GetBalloonStatsRequest((0, 0)))
    assert isinstance(response, GetBalloonStatsResponse)
    assert [entry.vm_id for entry in response.all_stats] == [0, 0]


def test_stats_are_derived_from_guest_size_balloon_and_use() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    entry = stats(model, vm_id)[vm_id]
    fields = entry.stats
    balloon = model.siblings()[vm_id].balloon_bytes

    assert entry.balloon_actual_bytes == balloon
    assert fields.total_memory == MEM_1G - balloon
    assert fields.free_memory is not None and fields.disk_caches is not None
    assert fields.free_memory + fields.disk_caches == MEM_1G - balloon - 64 * MIB
    assert fields.available_memory == fields.free_memory + fields.disk_caches
    assert (fields.hugetlb_allocations, fields.hugetlb_failures) == (0, 0)
    assert fields.shared_memory is None
    assert fields.unevictable_memory is None

    again = stats(model, vm_id)[vm_id].stats
    for name in ("swap_in", "swap_out", "major_faults", "minor_faults"):
        assert getattr(again, name) > getattr(fields, name), name
    # A guest with no free memory left reports faster-moving counters.
    model.set_vm_used_bytes(vm_id, MEM_1G - balloon)
    pressured = stats(model, vm_id)[vm_id].stats
    assert pressured.free_memory == pressured.available_memory == 0
    calm_step = _counter(again, "major_faults") - _counter(fields, "major_faults")
    pressured_step = _counter(pressured, "major_faults") - _counter(again, "major_faults")
    assert pressured_step > calm_step


def _counter(fields: BalloonStats, name: str) -> int:
    value = getattr(fields, name)
    assert isinstance(value, int)
    return value


def test_cros_stats_report_the_balloon_minus_mms_internal_allocation() -> None:
    model = MmsModel(Scenario(cros_internal_allocation_bytes=256 * MIB))
    assert model.guest_balloon_bytes(0) == 256 * MIB
    entry = stats(model, 0)[0]
    assert entry.balloon_actual_bytes == 0
    # The guest itself has lost the internal allocation too.
    assert entry.stats.total_memory == 8 * GIB - 256 * MIB

    vm_id = start_vm(model)
    assert stats(model, 0)[0].balloon_actual_bytes == REQUIRED_1G
    # mms's memcg watcher grows its own allocation: invisible to the client.
    assert model.change_internal_allocation(64 * MIB) == 64 * MIB
    assert stats(model, 0)[0].balloon_actual_bytes == REQUIRED_1G
    assert model.cros_balloon_bytes == REQUIRED_1G
    assert remove(model, vm_id) == RES_OK
    assert stats(model, 0)[0].balloon_actual_bytes == 0
    assert model.conservation_error_bytes() == 0


def test_cros_clamping_is_on_mms_whole_record_allocation_included() -> None:
    """mms clamps the CrOS guest on its own record of the balloon, allocation included, at 0.

    The simulator used to floor the CrOS guest at its internal allocation; upstream's
    clamp_balloon_delta and adjust_balloon saturate every balloon at 0 (issue 11).
    """
    cros = BalloonBounds(balloon_bytes=300 * MIB, mem_size_bytes=1000 * MIB)
    assert cros.clamp_delta(-1000 * MIB) == -300 * MIB
    assert cros.clamp_delta(1000 * MIB) == 700 * MIB
    # On a fresh device the client's part is 0, yet the deflate clamps to a non-zero delta (into
    # the allocation), so id 0 is in the deflate list, trimmed to 0 and answered.
    fresh = MmsModel(Scenario(cros_internal_allocation_bytes=256 * MIB))
    assert rebalance(fresh, (0, -PAGE_SIZE_BYTES)) == [(0, 0)]
    assert fresh.balloon_bytes(0) == 256 * MIB

    model = MmsModel(Scenario(cros_internal_allocation_bytes=256 * MIB))
    vm_id = start_vm(model)
    visible = model.cros_balloon_bytes
    # The CrOS delta asks for twice its visible balloon: it is clamped, then trimmed to match
    # what the sibling can take.
    answer = dict(rebalance(model, (vm_id, MEM_1G), (0, -2 * MEM_1G)))
    assert answer[0] == -answer[vm_id]
    assert 0 < model.cros_balloon_bytes < visible
    assert model.balloon_bytes(0) == 256 * MIB + model.cros_balloon_bytes
    assert model.conservation_error_bytes() == 0


def test_internal_allocation_change_moves_by_what_the_balloon_moved_as_upstream() -> None:
    """on_allocation_change: adjust the CrOS balloon, move the allocation by the actual delta.

    The simulator used to refuse shrinking the allocation by more than it held; upstream has no
    such check: the balloon saturates at 0 and the allocation may end up below 0 (issue 11).
    """
    model = MmsModel(Scenario(cros_internal_allocation_bytes=32 * MIB))
    vm_id = start_vm(model)
    # Shrinking by more than the allocation takes the rest out of the client's part of the record;
    # the allocation goes negative and the client-visible balloon is unchanged.
    assert model.change_internal_allocation(-64 * MIB) == -64 * MIB
    assert model.cros_internal_allocation_bytes == -32 * MIB
    assert model.cros_balloon_bytes == REQUIRED_1G
    assert stats(model, 0)[0].balloon_actual_bytes == REQUIRED_1G
    # On an empty balloon a deflate saturates at 0 and the allocation moves only that much.
    assert remove(model, vm_id) == RES_OK
    assert model.balloon_bytes(0) == 0
    assert model.change_internal_allocation(-16 * MIB) == 0
    assert model.cros_internal_allocation_bytes == -32 * MIB


# --- failed balloon adjusts are pessimistic ------------------------------------------------------


def test_failed_adjust_counts_inflate_as_nothing_and_deflate_as_done() -> None:
    model = MmsModel()
    vm_id = start_vm(model)
    guest_balloon = model.guest_balloon_bytes(vm_id)
    model.fail_balloon_adjust(vm_id)

    assert rebalance(model, (vm_id, 8 * MIB), (0, -8 * MIB)) == [(vm_id, 0), (0, 0)]
    # mms believes the deflate happened; crosvm's balloon did not move.
    assert rebalance(model, (vm_id, -8 * MIB), (0, 8 * MIB)) == [(0, 8 * MIB), (vm_id, -8 * MIB)]
    assert model.balloon_bytes(vm_id) == guest_balloon - 8 * MIB
    assert model.guest_balloon_bytes(vm_id) == guest_balloon
    assert stats(model, vm_id)[vm_id].balloon_actual_bytes == guest_balloon
    assert model.conservation_error_bytes() == 0

    # The next successful adjust sets an absolute size, so crosvm catches up.
    model.fail_balloon_adjust(vm_id, failing=False)
    assert rebalance(model, (vm_id, 4 * MIB), (0, -4 * MIB)) == [(vm_id, 4 * MIB), (0, -4 * MIB)]
    assert model.guest_balloon_bytes(vm_id) == model.balloon_bytes(vm_id)


# --- connection loss -----------------------------------------------------------------------------


def test_connection_lost_drops_every_sibling_and_the_pending_start() -> None:
    model = MmsModel()
    start_vm(model)
    start_vm(model, 2 * MEM_1G)
    prepare(model, 512 * MIB, 512 * MIB)
    assert model.cros_balloon_bytes > 0

    model.connection_lost()

    assert model.siblings() == {}
    assert model.start_state is StartState.IDLE
    assert model.cros_balloon_bytes == 0
    assert model.conservation_error_bytes() == 0
    assert list(stats(model, 0, 1, 2, 3)) == [0]


def test_scenario_is_not_mutated_by_runtime_settings() -> None:
    scenario = Scenario()
    model = MmsModel(scenario)
    model.set_vm_used_bytes(0, 0)
    model.fail_stats(0)
    assert scenario == dataclasses.replace(scenario)
    assert scenario.cros_used_bytes == 2 * GIB
    assert scenario.stats_fail_vm_ids == frozenset()
