"""Property tests of the mms model's books over random sessions (hypothesis state machines).

After every step: the CrOS balloon the client sees equals what the siblings and the pending start
hold (conservation) up to what mms itself lost track of, every balloon (mms's record, for the CrOS
guest including its internal allocation) stays within [0, mem], and VM ids only grow.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES
from manatee_grpc.mms._messages import (
    CROS_GUEST_VM_ID,
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RemoveVmRequest,
)
from manatee_grpc.sim import MmsModel, Scenario

MACHINE_SETTINGS = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Sizes a client asks for, including ones mms refuses (unaligned, as big as the CrOS guest).
MEM_SIZES_BYTES = st.sampled_from(
    [256 * MIB, 512 * MIB, 1024 * MIB, 2048 * MIB, 3000 * MIB, 512 * MIB + 1, 8192 * MIB]
)
INIT_FRACTIONS = st.sampled_from([1.0, 0.9, 0.5, 0.0, 1.5])
# Small moves, and moves far beyond any balloon's range (mms clamps them).
DELTA_PAGES = st.one_of(
    st.integers(min_value=-16 * 256, max_value=16 * 256),
    st.integers(min_value=-(3 * 256 * 1024), max_value=3 * 256 * 1024),
)


def _page_floor(size_bytes: float) -> int:
    return int(size_bytes) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES


class _MmsSession(RuleBasedStateMachine):
    """The operations both machines share: starts, removals, stats, hangups, guest usage."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MmsModel(Scenario(cros_internal_allocation_bytes=64 * MIB))
        self.highest_vm_id_seen = 0

    def _known_vm_ids(self) -> list[int]:
        ids = [CROS_GUEST_VM_ID, *self.model.siblings()]
        pending = self.model.pending_start()
        if pending is not None:
            ids.append(pending.vm_id)
        return ids

    def _prepare(self, mem_bytes: int, init_bytes: int) -> PrepareVmResponse:
        pending = self.model.pending_start()
        response = self.model.handle(PrepareVmRequest(mem_bytes, init_bytes))
        assert isinstance(response, PrepareVmResponse)
        if response.vm_id:
            if pending is None:
                assert response.vm_id > self.highest_vm_id_seen
            else:
                assert response.vm_id == pending.vm_id
            self.highest_vm_id_seen = max(self.highest_vm_id_seen, response.vm_id)
        return response

    @rule(mem_bytes=MEM_SIZES_BYTES, init_fraction=INIT_FRACTIONS)
    def prepare(self, mem_bytes: int, init_fraction: float) -> None:
        self._prepare(mem_bytes, _page_floor(mem_bytes * init_fraction))

    @precondition(lambda self: self.model.pending_start() is not None)
    @rule()
    def retry_prepare(self) -> None:
        pending = self.model.pending_start()
        assert pending is not None
        self._prepare(pending.mem_size_bytes, pending.init_mem_size_bytes)

    @initialize(mem_sizes=st.lists(st.sampled_from([512 * MIB, 1024 * MIB]), max_size=3))
    def start_some_vms(self, mem_sizes: list[int]) -> None:
        for mem_bytes in mem_sizes:
            response = self._prepare(mem_bytes, min(mem_bytes, 1000 * MIB))
            self.model.handle(FinishAddVmRequest(response.vm_id))

    @precondition(lambda self: self.model.pending_start() is None)
    @rule(mem_bytes=MEM_SIZES_BYTES, init_fraction=INIT_FRACTIONS)
    def start_vm(self, mem_bytes: int, init_fraction: float) -> None:
        """Concierge's launch: PrepareVm, then FinishAddVm for the id it got."""
        response = self._prepare(mem_bytes, _page_floor(mem_bytes * init_fraction))
        if response.res == 0:
            self.model.handle(FinishAddVmRequest(response.vm_id))

    @precondition(lambda self: self.model.pending_start() is not None)
    @rule()
    def finish_pending(self) -> None:
        pending = self.model.pending_start()
        assert pending is not None
        self.model.handle(FinishAddVmRequest(pending.vm_id))

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        vm_id = data.draw(st.sampled_from([*self._known_vm_ids(), self.highest_vm_id_seen + 1]))
        self.model.handle(FinishAddVmRequest(vm_id))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        vm_id = data.draw(st.sampled_from([*self._known_vm_ids(), self.highest_vm_id_seen + 1]))
        self.model.handle(RemoveVmRequest(vm_id))

    @rule(data=st.data())
    def stats(self, data: st.DataObject) -> None:
        vm_ids = data.draw(st.lists(st.sampled_from([*self._known_vm_ids(), 99]), max_size=4))
        self.model.handle(GetBalloonStatsRequest(tuple(vm_ids)))

    @rule()
    def connection_lost(self) -> None:
        self.model.connection_lost()
        assert self.model.siblings() == {}
        assert self.model.pending_start() is None

    @rule(data=st.data(), used_fraction=st.sampled_from([0.0, 0.05, 0.3, 0.6, 0.95, 1.0]))
    def change_guest_usage(self, data: st.DataObject, used_fraction: float) -> None:
        vm_id = data.draw(st.sampled_from([*self._known_vm_ids(), self.highest_vm_id_seen + 1]))
        if vm_id == CROS_GUEST_VM_ID:
            mem_bytes = self.model.cros_mem_size_bytes
        elif vm_id in self.model.siblings():
            mem_bytes = self.model.siblings()[vm_id].mem_size_bytes
        else:
            mem_bytes = 1024 * MIB
        self.model.set_vm_used_bytes(vm_id, _page_floor(mem_bytes * used_fraction))

    @rule(fault=st.sampled_from(["connect", "control_socket"]))
    def inject_start_fault(self, fault: str) -> None:
        if fault == "connect":
            self.model.fail_crosvm_connect()
        else:
            self.model.fail_control_socket()

    @rule(delta_pages=st.integers(min_value=-64 * 256, max_value=64 * 256))
    def change_internal_allocation(self, delta_pages: int) -> None:
        delta_bytes = max(delta_pages * PAGE_SIZE_BYTES, -self.model.cros_internal_allocation_bytes)
        self.model.change_internal_allocation(delta_bytes)

    @invariant()
    def balloons_stay_in_range(self) -> None:
        model = self.model
        # mms's record of the CrOS balloon includes its internal allocation and its floor is 0,
        # not the allocation (after memory is lost track of, the client-visible part is
        # negative and balloon_actual wraps), so the range is [0, mem] as for any VM.
        assert 0 <= model.balloon_bytes(CROS_GUEST_VM_ID) <= model.cros_mem_size_bytes
        assert 0 <= model.guest_balloon_bytes(CROS_GUEST_VM_ID) <= model.cros_mem_size_bytes
        for vm_id, sibling in model.siblings().items():
            assert 0 <= sibling.balloon_bytes <= sibling.mem_size_bytes
            assert 0 <= model.guest_balloon_bytes(vm_id) <= sibling.mem_size_bytes
        pending = model.pending_start()
        if pending is not None:
            assert 0 <= pending.reserved_bytes <= pending.required_bytes
            assert pending.vm_id <= self.highest_vm_id_seen


class FaithfulMmsMachine(_MmsSession):
    """Anything a client can send, failed balloon adjusts included.

    mms itself can lose track of memory in documented corners (see
    MmsModel.unbalanced_bytes); conservation must hold up to exactly that amount.
    """

    @rule(data=st.data(), flaw=st.sampled_from([None] * 6 + ["unaligned", "duplicate", "unknown"]))
    def rebalance(self, data: st.DataObject, flaw: str | None) -> None:
        """Deltas for any subset of the VMs, any sign, up to beyond their balloons' range."""
        balloon_vm_ids = [CROS_GUEST_VM_ID, *self.model.siblings()]
        vm_ids = data.draw(
            st.lists(
                st.sampled_from(balloon_vm_ids),
                unique=True,
                min_size=min(2, len(balloon_vm_ids)),
            )
        )
        deltas = [BalloonDelta(vm_id, data.draw(DELTA_PAGES) * PAGE_SIZE_BYTES) for vm_id in vm_ids]
        if flaw == "unaligned" and deltas:
            deltas[0] = BalloonDelta(deltas[0].vm_id, deltas[0].delta_bytes + 512)
        elif flaw == "duplicate" and deltas:
            deltas.append(deltas[0])
        elif flaw == "unknown":
            # The pending VM has no balloon yet, so mms does not know it either.
            unknown = self.model.pending_start() or self.highest_vm_id_seen + 1
            unknown_vm_id = unknown if isinstance(unknown, int) else unknown.vm_id
            deltas.append(BalloonDelta(unknown_vm_id, PAGE_SIZE_BYTES))
        response = self.model.handle(RebalanceMemoryRequest(tuple(deltas)))
        if flaw is not None and deltas:
            assert all(d.delta_bytes == 0 for d in response.actual_deltas)

    @rule(data=st.data(), failing=st.booleans())
    def toggle_adjust_failure(self, data: st.DataObject, failing: bool) -> None:
        vm_id = data.draw(st.sampled_from(self._known_vm_ids()))
        self.model.fail_balloon_adjust(vm_id, failing)

    @invariant()
    def books_balance_up_to_what_mms_itself_lost(self) -> None:
        assert self.model.conservation_error_bytes() == self.model.unbalanced_bytes


class ConciergeShapedMachine(_MmsSession):
    """Rebalances shaped like concierge's (the CrOS guest takes -sum) and never asking a
    balloon below empty, without failed adjusts: then mms loses nothing, exactly."""

    @precondition(lambda self: bool(self.model.siblings()))
    @rule(data=st.data())
    def rebalance(self, data: st.DataObject) -> None:
        deltas = []
        for vm_id, sibling in self.model.siblings().items():
            if not data.draw(st.booleans()):
                continue
            # Anything from emptying the balloon to filling the whole VM (clamped by mms).
            low_pages = -(sibling.balloon_bytes // PAGE_SIZE_BYTES)
            high_pages = (sibling.mem_size_bytes - sibling.balloon_bytes) // PAGE_SIZE_BYTES
            pages = data.draw(st.integers(min_value=low_pages, max_value=high_pages))
            deltas.append(BalloonDelta(vm_id, pages * PAGE_SIZE_BYTES))
        cros_delta_bytes = -sum(d.delta_bytes for d in deltas)
        deltas.append(BalloonDelta(CROS_GUEST_VM_ID, cros_delta_bytes))
        response = self.model.handle(RebalanceMemoryRequest(tuple(deltas)))
        assert sum(d.delta_bytes for d in response.actual_deltas) == 0

    @invariant()
    def books_balance_exactly(self) -> None:
        assert self.model.unbalanced_bytes == 0
        assert self.model.conservation_error_bytes() == 0


FaithfulMmsMachine.TestCase.settings = MACHINE_SETTINGS
ConciergeShapedMachine.TestCase.settings = MACHINE_SETTINGS
TestFaithfulMms = FaithfulMmsMachine.TestCase
TestConciergeShaped = ConciergeShapedMachine.TestCase
