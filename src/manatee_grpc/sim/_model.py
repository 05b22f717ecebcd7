"""A pure model of mms: the VM start state machine, the balloon arithmetic and the guests behind it.

It follows sirenia's ``manatee_memory_service.rs`` (the last version before removal) step by step,
so every answer matches mms number for number, its bugs included: the CrOS guest's balloon record
holds mms's internal allocation and may be deflated into it (down to 0), memory trimming loses
track of is only logged, and ``balloon_actual`` is a u64 subtraction that wraps as it did in a
release build. Where a value is a Rust u64 or i64, the arithmetic wraps or casts as Rust's does.
The guests behind it may follow a workload (the scenario's demand curves): Simulator tells the
model the workload time before each request. The rebalance arithmetic itself is
``mms/_rebalance.py``, which the server's preview runs too. No sockets, threads or clocks:
Simulator wraps it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TypeVar, cast

from manatee_grpc.mms._memory_math import (
    MIB,
    PAGE_SIZE_BYTES,
    align_down_page,
    extra_bytes,
    is_page_aligned,
)
from manatee_grpc.mms._messages import (
    CROS_GUEST_VM_ID,
    RES_EINVAL,
    RES_EIO,
    RES_ENOMEM,
    RES_OK,
    U32_MAX,
    BalloonStats,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
    VmBalloonStats,
)
from manatee_grpc.mms._rebalance import (
    I64_MAX,
    I64_MIN,
    BalloonBounds,
    RebalancePlan,
    adjust_balloon,
    guest_balloon_reached,
    plan_rebalance,
    rebalance,
)
from manatee_grpc.mms._rebalance import as_i64 as _as_i64
from manatee_grpc.mms._rebalance import as_u64 as _as_u64
from manatee_grpc.sim._scenario import Scenario

__all__ = [
    "BalloonBounds",
    "GuestMemory",
    "MmsModel",
    "PendingStartView",
    "RebalancePlan",
    "SiblingView",
    "StartState",
    "plan_rebalance",
]

_R = TypeVar("_R", bound=Response)

# Guest counters advance on every stats read, faster when the guest is short of free memory.
_MINOR_FAULTS_PER_READ = 4096
_MAJOR_FAULTS_PER_READ = 2
_MAJOR_FAULTS_PER_PRESSURED_READ = 64
_SWAP_IN_BYTES_PER_READ = PAGE_SIZE_BYTES
_SWAP_OUT_BYTES_PER_READ = 2 * PAGE_SIZE_BYTES
_SWAP_IN_BYTES_PER_PRESSURED_READ = 16 * PAGE_SIZE_BYTES
_SWAP_OUT_BYTES_PER_PRESSURED_READ = 64 * PAGE_SIZE_BYTES


class StartState(enum.Enum):
    """mms's state machine for the one VM being started."""

    IDLE = "idle"
    PENDING = "pending"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SiblingView:
    vm_id: int
    mem_size_bytes: int
    balloon_bytes: int
    used_bytes: int


@dataclass(frozen=True, slots=True)
class GuestMemory:
    """What a guest has, as its balloon driver would report it (read without side effects)."""

    total_bytes: int  # its memory less its balloon
    available_bytes: int  # free + cached: total - used, floored at 0
    used_bytes: int  # in use (the workload's demand): the balloon cannot take it


@dataclass(frozen=True, slots=True)
class PendingStartView:
    vm_id: int
    mem_size_bytes: int
    init_mem_size_bytes: int
    reserved_bytes: int
    required_bytes: int
    state: StartState
    crosvm_connected: bool


@dataclass(slots=True)
class _Guest:
    """One VM: what mms believes of its balloon, and what its guest and crosvm really have."""

    vm_id: int
    mem_size_bytes: int
    used_bytes: int
    # mms's CrosVmClient.balloon_size; for the CrOS guest it includes the internal allocation.
    balloon_bytes: int = 0
    # crosvm's balloon; differs from balloon_bytes only after a failed adjust.
    guest_balloon_bytes: int = 0
    # mms's internal_balloon_allocation (CrOS guest only), kept signed here: a release build
    # would hold it modulo 2^64, and it is reported that way (see _get_balloon_stats).
    internal_allocation_bytes: int = 0
    minor_faults: int = 0
    major_faults: int = 0
    swap_in_bytes: int = 0
    swap_out_bytes: int = 0

    def bounds(self) -> BalloonBounds:
        # mms clamps on its own record, allocation included: the client can deflate into it.
        return BalloonBounds(self.balloon_bytes, self.mem_size_bytes)

    def crosvm_set_balloon(self, target_bytes: int) -> int:
        """crosvm's Adjust: the guest gives up at most ``mem - used``; deflating always works."""
        self.guest_balloon_bytes = guest_balloon_reached(
            self.guest_balloon_bytes,
            target_bytes,
            align_down_page(self.mem_size_bytes - self.used_bytes),
        )
        return self.guest_balloon_bytes

    def memory(self) -> GuestMemory:
        total_bytes = max(0, self.mem_size_bytes - self.guest_balloon_bytes)
        # A demand above what the balloon left is memory the guest does not have: it is under
        # pressure (swapping, killing), and nothing is available.
        available_bytes = max(0, total_bytes - self.used_bytes)
        return GuestMemory(total_bytes, available_bytes, self.used_bytes)

    def read_stats(self) -> BalloonStats:
        """What the guest's virtio-balloon driver reports, derived from its size and use."""
        memory = self.memory()
        total_bytes = memory.total_bytes
        reclaimable_bytes = memory.available_bytes
        disk_caches_bytes = align_down_page(reclaimable_bytes // 4)
        free_bytes = reclaimable_bytes - disk_caches_bytes
        pressured = free_bytes < total_bytes // 16
        self.minor_faults += _MINOR_FAULTS_PER_READ + self.used_bytes // MIB
        if pressured:
            self.major_faults += _MAJOR_FAULTS_PER_PRESSURED_READ
            self.swap_in_bytes += _SWAP_IN_BYTES_PER_PRESSURED_READ
            self.swap_out_bytes += _SWAP_OUT_BYTES_PER_PRESSURED_READ
        else:
            self.major_faults += _MAJOR_FAULTS_PER_READ
            self.swap_in_bytes += _SWAP_IN_BYTES_PER_READ
            self.swap_out_bytes += _SWAP_OUT_BYTES_PER_READ
        return BalloonStats(
            swap_in=self.swap_in_bytes,
            swap_out=self.swap_out_bytes,
            major_faults=self.major_faults,
            minor_faults=self.minor_faults,
            free_memory=free_bytes,
            total_memory=total_bytes,
            available_memory=free_bytes + disk_caches_bytes,
            disk_caches=disk_caches_bytes,
            # A Linux guest reports hugetlb counters (0 without hugetlbfs); the two crosvm
            # extensions (shared, unevictable) are left unreported.
            hugetlb_allocations=0,
            hugetlb_failures=0,
            shared_memory=None,
            unevictable_memory=None,
        )


@dataclass(slots=True)
class _PendingStart:
    vm_id: int
    mem_size_bytes: int
    init_mem_size_bytes: int
    required_bytes: int
    reserved_bytes: int = 0
    failed: bool = False
    # The new VM's crosvm connected but its balloon fell short: mms waits for it on removal.
    crosvm_connected: bool = False


@dataclass(slots=True)
class _Faults:
    """Failures to inject, changed at runtime through the model's setters."""

    crosvm_connect_fail_vm_ids: set[int] = field(default_factory=set)
    crosvm_connect_fail_count: int = 0
    control_socket_fail_count: int = 0
    stats_fail_vm_ids: set[int] = field(default_factory=set)
    balloon_adjust_fail_vm_ids: set[int] = field(default_factory=set)


class MmsModel:
    """mms's state and its answers to the five requests; call from one thread at a time.

    Introspection reads mms's own bookkeeping: ``conservation_error_bytes()`` compares the CrOS
    balloon the client sees with what the siblings and the pending start hold, and always equals
    ``unbalanced_bytes``, the memory mms itself lost track of (0 unless a documented mms corner
    case was hit, see ``unbalanced_bytes``). After a loss the CrOS balloon the client sees can be
    negative (mms's record is below its own allocation): ``balloon_actual`` then wraps.
    """

    def __init__(self, scenario: Scenario | None = None) -> None:
        self._scenario = scenario if scenario is not None else Scenario()
        scenario = self._scenario
        self._used_bytes_by_vm_id = dict(scenario.vm_used_bytes)
        # VMs whose used bytes were set at runtime: that replaces their demand curve.
        self._pinned_used_vm_ids: set[int] = set()
        self._workload_time_s = 0.0
        self._faults = _Faults(
            crosvm_connect_fail_vm_ids=set(scenario.crosvm_connect_fail_vm_ids),
            crosvm_connect_fail_count=scenario.crosvm_connect_fail_count,
            control_socket_fail_count=scenario.control_socket_fail_count,
            stats_fail_vm_ids=set(scenario.stats_fail_vm_ids),
            balloon_adjust_fail_vm_ids=set(scenario.balloon_adjust_fail_vm_ids),
        )
        self._cros = _Guest(
            vm_id=CROS_GUEST_VM_ID,
            mem_size_bytes=scenario.cros_mem_size_bytes,
            used_bytes=self._used_bytes_for(CROS_GUEST_VM_ID),
        )
        self._siblings: dict[int, _Guest] = {}
        self._start: _PendingStart | None = None
        self._next_vm_id = CROS_GUEST_VM_ID + 1
        self._unbalanced_bytes = 0
        # mms's first act (main): put its internal allocation in the CrOS balloon; exits if short.
        internal_bytes = scenario.cros_internal_allocation_bytes
        if self._adjust_balloon(self._cros, internal_bytes) != internal_bytes:
            raise ValueError("the CrOS guest cannot hold mms's internal allocation")
        self._cros.internal_allocation_bytes = internal_bytes

    # --- the protocol -----------------------------------------------------------------------

    def handle(self, request: MmsRequest[_R]) -> _R:
        """mms's answer to ``request``, typed as that request's response."""
        response: Response
        if isinstance(request, GetBalloonStatsRequest):
            response = self._get_balloon_stats(request)
        elif isinstance(request, RebalanceMemoryRequest):
            response = self._rebalance_memory(request)
        elif isinstance(request, PrepareVmRequest):
            response = self._prepare_vm(request)
        elif isinstance(request, FinishAddVmRequest):
            response = self._finish_add_vm(request)
        elif isinstance(request, RemoveVmRequest):
            response = self._remove_vm(request)
        else:
            raise TypeError(f"not an mms request: {request!r}")
        # Each request's type parameter is the response class its branch just built.
        return cast(_R, response)

    def connection_lost(self) -> None:
        """mms's ``on_hangup``: drop every sibling and any pending start, one release to CrOS."""
        # An i64 sum of the siblings' footprints and the reservation, each cast from u64.
        released_bytes = sum(
            _as_i64(self._sibling_footprint_bytes(g)) for g in self._siblings.values()
        )
        self._siblings.clear()
        if self._start is not None:
            released_bytes += _as_i64(self._start.reserved_bytes)
            self._start = None
        self._release_to_cros(_as_i64(released_bytes))

    def _get_balloon_stats(self, request: GetBalloonStatsRequest) -> GetBalloonStatsResponse:
        all_stats = []
        for vm_id in request.vm_ids:
            guest = self._guest(vm_id)
            # Unknown VMs and failed stats requests are only logged by mms, never answered.
            if guest is None or vm_id in self._faults.stats_fail_vm_ids:
                continue
            stats = guest.read_stats()
            # handle_balloon_stats: crosvm's balloon minus what mms holds in it for itself, a
            # u64 subtraction that wraps (2^64 - x) once the balloon is below the allocation.
            balloon_actual_bytes = _as_u64(
                guest.guest_balloon_bytes - guest.internal_allocation_bytes
            )
            all_stats.append(VmBalloonStats(vm_id, stats, balloon_actual_bytes))
        return GetBalloonStatsResponse(all_stats=tuple(all_stats))

    def _rebalance_memory(self, request: RebalanceMemoryRequest) -> RebalanceMemoryResponse:
        bounds = {vm_id: guest.bounds() for vm_id, guest in self._all_guests().items()}
        actual_deltas, slack_bytes = rebalance(bounds, request.deltas, self._adjust_client_balloon)
        # mms only logs "non-zero slack remaining": that memory is now unaccounted for.
        self._unbalanced_bytes += slack_bytes
        return RebalanceMemoryResponse(actual_deltas=actual_deltas)

    def _prepare_vm(self, request: PrepareVmRequest) -> PrepareVmResponse:
        start = self._start
        if start is not None:
            if (
                start.mem_size_bytes != request.mem_size_bytes
                or start.init_mem_size_bytes != request.init_mem_size_bytes
                or start.failed
            ):
                return PrepareVmResponse(res=RES_EINVAL, vm_id=0, shortfall_bytes=0)
        else:
            if (
                not is_page_aligned(request.mem_size_bytes)
                or not is_page_aligned(request.init_mem_size_bytes)
                or request.init_mem_size_bytes > request.mem_size_bytes
                or request.mem_size_bytes >= self._cros.mem_size_bytes
            ):
                return PrepareVmResponse(res=RES_EINVAL, vm_id=0, shortfall_bytes=0)
            vm_id = self._next_vm_id
            if vm_id > U32_MAX:
                raise RuntimeError("mms ran out of u32 VM ids (it panics here)")
            # The id is spent even if its control socket cannot be created.
            self._next_vm_id += 1
            if self._faults.control_socket_fail_count > 0:
                self._faults.control_socket_fail_count -= 1
                return PrepareVmResponse(res=RES_EIO, vm_id=0, shortfall_bytes=0)
            start = _PendingStart(
                vm_id=vm_id,
                mem_size_bytes=request.mem_size_bytes,
                init_mem_size_bytes=request.init_mem_size_bytes,
                required_bytes=self._required_bytes(
                    request.mem_size_bytes, request.init_mem_size_bytes
                ),
            )
            self._start = start
        # Reservations accumulate: each call asks the CrOS balloon only for what is missing.
        # All three are u64 in mms (the ask cast to i64, the answer back to u64), so a
        # reservation that ever passed what is required wraps instead of going negative.
        missing_bytes = _as_i64(start.required_bytes - start.reserved_bytes)
        reserved_now_bytes = self._adjust_balloon(self._cros, missing_bytes)
        start.reserved_bytes = _as_u64(start.reserved_bytes + reserved_now_bytes)
        return PrepareVmResponse(
            res=RES_OK if start.reserved_bytes == start.required_bytes else RES_ENOMEM,
            vm_id=start.vm_id,
            shortfall_bytes=_as_u64(start.required_bytes - start.reserved_bytes),
        )

    def _finish_add_vm(self, request: FinishAddVmRequest) -> FinishAddVmResponse:
        start = self._start
        if start is None or start.failed or start.vm_id != request.vm_id:
            return FinishAddVmResponse(res=RES_EINVAL)
        if start.reserved_bytes != start.required_bytes:
            start.failed = True
            return FinishAddVmResponse(res=RES_ENOMEM)
        if self._take_connect_failure(start.vm_id):
            start.failed = True
            return FinishAddVmResponse(res=RES_EIO)
        start.crosvm_connected = True
        guest = _Guest(
            vm_id=start.vm_id,
            mem_size_bytes=start.mem_size_bytes,
            used_bytes=self._used_bytes_for(start.vm_id),
        )
        balloon_bytes = start.mem_size_bytes - start.init_mem_size_bytes
        if self._adjust_balloon(guest, balloon_bytes) != balloon_bytes:
            start.failed = True
            return FinishAddVmResponse(res=RES_ENOMEM)
        self._siblings[start.vm_id] = guest
        self._start = None
        return FinishAddVmResponse(res=RES_OK)

    def _remove_vm(self, request: RemoveVmRequest) -> RemoveVmResponse:
        vm_id = request.vm_id
        if vm_id == CROS_GUEST_VM_ID:
            return RemoveVmResponse(res=RES_EINVAL)
        guest = self._siblings.pop(vm_id, None)
        if guest is not None:
            released_bytes = self._sibling_footprint_bytes(guest)
        elif self._start is not None and self._start.vm_id == vm_id:
            released_bytes = self._start.reserved_bytes
            self._start = None
        else:
            return RemoveVmResponse(res=RES_EINVAL)
        # The release is `-(released as i64)`.
        self._release_to_cros(_as_i64(released_bytes))
        return RemoveVmResponse(res=RES_OK)

    # --- balloon mechanics ------------------------------------------------------------------

    def _adjust_client_balloon(self, vm_id: int, delta_bytes: int) -> int:
        return self._adjust_balloon(self._all_guests()[vm_id], delta_bytes)

    def _adjust_balloon(self, guest: _Guest, delta_bytes: int) -> int:
        """mms's ``adjust_balloon`` on ``guest``, its crosvm failing where a fault says so.

        A deflate saturates at 0 for every VM: the CrOS guest's record, allocation included, can
        go below the allocation (and its reported balloon_actual then wraps).
        """
        failing = guest.vm_id in self._faults.balloon_adjust_fail_vm_ids
        done = adjust_balloon(
            guest.balloon_bytes, delta_bytes, None if failing else guest.crosvm_set_balloon
        )
        if failing and delta_bytes <= 0:
            # A deflate past 0 reports more than the balloon moved: mms loses the rest.
            self._unbalanced_bytes += (done.balloon_bytes - guest.balloon_bytes) - delta_bytes
        guest.balloon_bytes = done.balloon_bytes
        return done.actual_delta_bytes

    def _release_to_cros(self, released_bytes: int) -> None:
        actual_bytes = self._adjust_balloon(self._cros, -released_bytes)
        # mms logs "Failed to release sibling memory back to CrOS guest" and moves on.
        self._unbalanced_bytes += actual_bytes + released_bytes

    def _take_connect_failure(self, vm_id: int) -> bool:
        if vm_id in self._faults.crosvm_connect_fail_vm_ids:
            self._faults.crosvm_connect_fail_vm_ids.discard(vm_id)
            return True
        if self._faults.crosvm_connect_fail_count > 0:
            self._faults.crosvm_connect_fail_count -= 1
            return True
        return False

    def _required_bytes(self, mem_size_bytes: int, init_mem_size_bytes: int) -> int:
        return init_mem_size_bytes + extra_bytes(mem_size_bytes, self._scenario.extra_bytes_formula)

    def _sibling_footprint_bytes(self, guest: _Guest) -> int:
        """What a running sibling holds of CrOS memory: outside its balloon, plus overhead."""
        return (
            guest.mem_size_bytes
            - guest.balloon_bytes
            + extra_bytes(guest.mem_size_bytes, self._scenario.extra_bytes_formula)
        )

    def _used_bytes_for(self, vm_id: int) -> int:
        if vm_id not in self._pinned_used_vm_ids:
            demand_bytes = self._scenario.demand_bytes_at(vm_id, self._workload_time_s)
            if demand_bytes is not None:
                return demand_bytes
        if vm_id in self._used_bytes_by_vm_id:
            return self._used_bytes_by_vm_id[vm_id]
        return self._scenario.used_bytes_for(vm_id)

    def _guest(self, vm_id: int) -> _Guest | None:
        return self._cros if vm_id == CROS_GUEST_VM_ID else self._siblings.get(vm_id)

    def _all_guests(self) -> dict[int, _Guest]:
        return {CROS_GUEST_VM_ID: self._cros, **self._siblings}

    # --- runtime settings -------------------------------------------------------------------

    def set_vm_used_bytes(self, vm_id: int, used_bytes: int) -> None:
        """Guest memory in use that the balloon cannot take; also for ids not started yet."""
        if used_bytes < 0:
            raise ValueError(f"used_bytes must not be negative, got {used_bytes}")
        self._used_bytes_by_vm_id[vm_id] = used_bytes
        self._pinned_used_vm_ids.add(vm_id)
        guest = self._guest(vm_id)
        if guest is not None:
            guest.used_bytes = used_bytes

    def set_workload_time(self, workload_time_s: float) -> None:
        """Move the workload to ``workload_time_s``: each guest's use follows its demand curve."""
        self._workload_time_s = workload_time_s
        if not self._scenario.vm_demand:
            return
        for vm_id, guest in self._all_guests().items():
            guest.used_bytes = self._used_bytes_for(vm_id)

    @property
    def workload_time_s(self) -> float:
        return self._workload_time_s

    def fail_crosvm_connect(self, vm_id: int | None = None, count: int = 1) -> None:
        """Make FinishAddVm answer -5: for ``vm_id``'s start, or else for the next ``count``."""
        if vm_id is not None:
            self._faults.crosvm_connect_fail_vm_ids.add(vm_id)
        else:
            self._faults.crosvm_connect_fail_count += count

    def fail_control_socket(self, count: int = 1) -> None:
        """Make the next ``count`` new PrepareVm fail to create their control socket (-5)."""
        self._faults.control_socket_fail_count += count

    def fail_stats(self, vm_id: int, failing: bool = True) -> None:
        _toggle(self._faults.stats_fail_vm_ids, vm_id, failing)

    def fail_balloon_adjust(self, vm_id: int, failing: bool = True) -> None:
        _toggle(self._faults.balloon_adjust_fail_vm_ids, vm_id, failing)

    def change_internal_allocation(self, delta_bytes: int) -> int:
        """mms's ``on_allocation_change`` (memcg watcher): returns the actual delta.

        It adjusts the CrOS balloon by ``delta_bytes`` and moves the allocation by what the
        balloon really moved: an inflate that came back short grows it by less, and a deflate
        saturates at an empty balloon. The allocation may end up below 0 (a wrapped u64 in mms).
        """
        if not I64_MIN <= delta_bytes <= I64_MAX:
            raise ValueError(f"delta_bytes is an i64, got {delta_bytes}")
        actual_bytes = self._adjust_balloon(self._cros, delta_bytes)
        self._cros.internal_allocation_bytes += actual_bytes
        return actual_bytes

    # --- introspection ----------------------------------------------------------------------

    @property
    def scenario(self) -> Scenario:
        return self._scenario

    @property
    def cros_mem_size_bytes(self) -> int:
        return self._cros.mem_size_bytes

    @property
    def cros_balloon_bytes(self) -> int:
        """The CrOS balloon as the client sees it (mms's bookkeeping, without its allocation).

        Signed: it goes below 0 where mms's record falls below the allocation, which mms then
        reports as a wrapped u64 ``balloon_actual``.
        """
        return self._cros.balloon_bytes - self._cros.internal_allocation_bytes

    @property
    def cros_internal_allocation_bytes(self) -> int:
        return self._cros.internal_allocation_bytes

    @property
    def cros_used_bytes(self) -> int:
        return self._cros.used_bytes

    @property
    def next_vm_id(self) -> int:
        return self._next_vm_id

    @property
    def unbalanced_bytes(self) -> int:
        """Memory mms itself lost track of: positive when stranded, negative when overcommitted.

        Each path that changes it is one real mms logs as an error and moves on from: slack left
        after a rebalance (trimming turned an inflate into a deflate, then a later inflate came
        back short), a release larger than the whole CrOS balloon (only after an earlier loss),
        and a failed deflate past the bottom of a balloon. Without failed adjusts, rebalances
        that never ask a balloon below empty keep it at 0.
        """
        return self._unbalanced_bytes

    def conservation_error_bytes(self) -> int:
        """CrOS client-visible balloon - (sum of sibling footprints + pending reservation)."""
        held_bytes = sum(self._sibling_footprint_bytes(g) for g in self._siblings.values())
        if self._start is not None:
            held_bytes += self._start.reserved_bytes
        return self.cros_balloon_bytes - held_bytes

    def siblings(self) -> dict[int, SiblingView]:
        return {
            vm_id: SiblingView(vm_id, g.mem_size_bytes, g.balloon_bytes, g.used_bytes)
            for vm_id, g in self._siblings.items()
        }

    def balloon_bytes(self, vm_id: int) -> int:
        """mms's view of a VM's balloon (for the CrOS guest, including the internal allocation)."""
        return self._all_guests()[vm_id].balloon_bytes

    def guest_balloon_bytes(self, vm_id: int) -> int:
        """crosvm's view of the balloon; differs from mms's only after a failed adjust."""
        return self._all_guests()[vm_id].guest_balloon_bytes

    def used_bytes(self, vm_id: int) -> int:
        return self._used_bytes_for(vm_id)

    def guest_memory(self, vm_id: int) -> GuestMemory | None:
        """A running VM's memory as its guest sees it (no counters move), or None."""
        guest = self._guest(vm_id)
        return None if guest is None else guest.memory()

    @property
    def start_state(self) -> StartState:
        if self._start is None:
            return StartState.IDLE
        return StartState.FAILED if self._start.failed else StartState.PENDING

    def pending_start(self) -> PendingStartView | None:
        start = self._start
        if start is None:
            return None
        return PendingStartView(
            vm_id=start.vm_id,
            mem_size_bytes=start.mem_size_bytes,
            init_mem_size_bytes=start.init_mem_size_bytes,
            reserved_bytes=start.reserved_bytes,
            required_bytes=start.required_bytes,
            state=self.start_state,
            crosvm_connected=start.crosvm_connected,
        )

    def remove_would_wait(self, vm_id: int) -> bool:
        """True if RemoveVm(vm_id) would block on a crosvm exiting (a running or connected VM)."""
        if vm_id in self._siblings:
            return True
        return (
            self._start is not None and self._start.vm_id == vm_id and self._start.crosvm_connected
        )

    def has_vms_to_wait_for(self) -> bool:
        """True if a lost connection would make mms wait for crosvm processes to exit."""
        return bool(self._siblings) or (self._start is not None and self._start.crosvm_connected)


def _toggle(vm_ids: set[int], vm_id: int, present: bool) -> None:
    if present:
        vm_ids.add(vm_id)
    else:
        vm_ids.discard(vm_id)
