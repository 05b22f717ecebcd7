"""mms's RebalanceMemory arithmetic, pure: the plan, the balloon adjustments and the slack.

Upstream's ``calculate_target_deltas``, ``clamp_balloon_delta``, ``adjust_balloon`` and the
inflate-then-deflate walk of ``handle_rebalance_memory``, step by step and with Rust's u64/i64
wrapping. The one thing mms does not decide, how far crosvm really moved a balloon, is a callback:
the simulator's guest answers it, and the server's preview (``preview_rebalance``) predicts it from
the stats (see ``VmBalloonState``). Both run this code, so a preview follows the rules the
simulator's fidelity tests hold against upstream.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from manatee_grpc.mms._memory_math import PAGE_SIZE_BYTES, align_down_page
from manatee_grpc.mms._messages import BalloonDelta, VmBalloonStats

__all__ = [
    "BalloonAdjust",
    "BalloonBounds",
    "RebalancePlan",
    "RebalancePreview",
    "StatsGapError",
    "VmBalloonState",
    "adjust_balloon",
    "as_i64",
    "as_u64",
    "guest_balloon_reached",
    "plan_rebalance",
    "preview_from_stats",
    "preview_rebalance",
    "rebalance",
    "state_from_stats",
]

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
_U64_MODULUS = 2**64


def as_u64(value: int) -> int:
    """Rust's ``as u64`` (and u64 arithmetic in a release build): wrap modulo 2^64."""
    return value % _U64_MODULUS


def as_i64(value: int) -> int:
    """Rust's ``as i64`` of a u64 (or i64 arithmetic in a release build): two's complement."""
    value %= _U64_MODULUS
    return value - _U64_MODULUS if value > I64_MAX else value


def _saturate_i64(value: int) -> int:
    return max(I64_MIN, min(I64_MAX, value))


@dataclass(frozen=True, slots=True)
class BalloonBounds:
    """What the rebalance plan needs of one VM: mms's record of its balloon, and its memory.

    For the CrOS guest the record includes mms's internal allocation, and the floor is still 0.
    """

    balloon_bytes: int
    mem_size_bytes: int

    def clamp_delta(self, delta_bytes: int) -> int:
        """mms's ``clamp_balloon_delta``: the part of the delta that keeps the balloon in range.

        The range is ``[0, mem_size]`` for every VM (a saturating add capped at mem_size, or a
        saturating subtract of ``|delta|`` at 0), the result an i64 difference of the two sizes.
        """
        if delta_bytes > 0:
            new_size_bytes = min(self.balloon_bytes + delta_bytes, self.mem_size_bytes)
        else:
            # i64::saturating_abs: |i64::MIN| stops at i64::MAX.
            new_size_bytes = max(self.balloon_bytes - min(-delta_bytes, I64_MAX), 0)
        return as_i64(new_size_bytes) - as_i64(self.balloon_bytes)


@dataclass(frozen=True, slots=True)
class RebalancePlan:
    """The deltas mms will apply: inflates first, then deflates, each in request order."""

    inflates: tuple[BalloonDelta, ...]
    deflates: tuple[BalloonDelta, ...]


def plan_rebalance(
    bounds_by_vm_id: Mapping[int, BalloonBounds], deltas: Sequence[BalloonDelta]
) -> RebalancePlan | None:
    """mms's ``calculate_target_deltas``: validate, clamp, trim to a zero sum; None if invalid.

    The lists are built from the *clamped* deltas (a clamped 0 is in neither), then trimmed: with
    ``total`` the sum, mms walks the inflates if ``total > 0`` (else the deflates), replacing each
    ``d`` with ``clamp(d - total)`` in that VM's full range. That clamp can carry a delta past 0
    (an inflate trimmed into a deflate); mms keeps it in its list, and so does this plan.
    """
    seen_vm_ids: set[int] = set()
    total_bytes = 0
    inflates: list[BalloonDelta] = []
    deflates: list[BalloonDelta] = []
    for delta in deltas:
        if delta.delta_bytes % PAGE_SIZE_BYTES != 0 or delta.vm_id in seen_vm_ids:
            return None
        seen_vm_ids.add(delta.vm_id)
        bounds = bounds_by_vm_id.get(delta.vm_id)
        if bounds is None:
            return None
        clamped_bytes = bounds.clamp_delta(delta.delta_bytes)
        total_bytes += clamped_bytes
        if clamped_bytes > 0:
            inflates.append(BalloonDelta(delta.vm_id, clamped_bytes))
        elif clamped_bytes < 0:
            deflates.append(BalloonDelta(delta.vm_id, clamped_bytes))
    if total_bytes != 0:
        trimmed = inflates if total_bytes > 0 else deflates
        for index, delta in enumerate(trimmed):
            bounds = bounds_by_vm_id[delta.vm_id]
            new_bytes = bounds.clamp_delta(_saturate_i64(delta.delta_bytes - total_bytes))
            total_bytes += new_bytes - delta.delta_bytes
            trimmed[index] = BalloonDelta(delta.vm_id, new_bytes)
    return RebalancePlan(inflates=tuple(inflates), deflates=tuple(deflates))


@dataclass(frozen=True, slots=True)
class BalloonAdjust:
    """One ``adjust_balloon``: mms's new record of the balloon, and the delta it reports."""

    balloon_bytes: int
    actual_delta_bytes: int


def adjust_balloon(
    balloon_bytes: int, delta_bytes: int, set_balloon: Callable[[int], int] | None
) -> BalloonAdjust:
    """mms's ``adjust_balloon``: ask crosvm for a size, learn the size reached.

    ``set_balloon(target_bytes)`` is crosvm's answer (the size reached); None means the request
    failed, and mms is pessimistic: an inflate gained nothing, a deflate released all it asked
    (the record then follows the target even where the balloon did not). An inflate's target is
    a u64 sum; a deflate saturates at 0 for every VM, the CrOS guest's allocation included.
    """
    if delta_bytes > 0:
        target_bytes = as_u64(balloon_bytes + delta_bytes)
    else:
        target_bytes = max(balloon_bytes - abs(delta_bytes), 0)
    if set_balloon is None:
        if delta_bytes > 0:
            return BalloonAdjust(balloon_bytes, 0)
        return BalloonAdjust(target_bytes, delta_bytes)
    reached_bytes = set_balloon(target_bytes)
    return BalloonAdjust(reached_bytes, as_i64(reached_bytes) - as_i64(balloon_bytes))


def rebalance(
    bounds_by_vm_id: Mapping[int, BalloonBounds],
    deltas: Sequence[BalloonDelta],
    adjust: Callable[[int, int], int],
) -> tuple[tuple[BalloonDelta, ...], int]:
    """mms's ``handle_rebalance_memory``: (the ``actual_deltas`` it answers, the slack left).

    ``adjust(vm_id, delta_bytes)`` is ``adjust_balloon`` on that VM, returning the actual delta
    (and updating the caller's record). An invalid request moves nothing and answers every
    requested id with 0. Otherwise inflates go first; what really inflated (the slack) is all
    the deflates may hand out, each ``-min(|d|, slack)``. A trimmed "deflate" may be positive,
    and with a negative slack this asks for an inflate: both as in mms. mms only logs a slack
    left over ("non-zero slack remaining"): that memory is unaccounted for.
    """
    plan = plan_rebalance(bounds_by_vm_id, deltas)
    if plan is None:
        return tuple(BalloonDelta(d.vm_id, 0) for d in deltas), 0
    slack_bytes = 0
    actual_deltas: list[BalloonDelta] = []
    for delta in plan.inflates:
        actual_bytes = adjust(delta.vm_id, delta.delta_bytes)
        slack_bytes += actual_bytes
        actual_deltas.append(BalloonDelta(delta.vm_id, actual_bytes))
    for delta in plan.deflates:
        actual_bytes = adjust(delta.vm_id, -min(abs(delta.delta_bytes), slack_bytes))
        slack_bytes += actual_bytes
        actual_deltas.append(BalloonDelta(delta.vm_id, actual_bytes))
    return tuple(actual_deltas), slack_bytes


def guest_balloon_reached(
    guest_balloon_bytes: int, target_bytes: int, inflate_limit_bytes: int
) -> int:
    """crosvm's Adjust, as the simulator's guests answer it and the preview assumes.

    crosvm counts whole pages; a guest gives its balloon memory up to ``inflate_limit_bytes`` (a
    balloon already past it stays where it is) and always takes memory back.
    """
    target_bytes = align_down_page(target_bytes)
    if target_bytes > guest_balloon_bytes:
        return min(target_bytes, max(guest_balloon_bytes, inflate_limit_bytes))
    return target_bytes


@dataclass(frozen=True, slots=True)
class VmBalloonState:
    """One VM as a preview sees it: the balloon mms records, its memory, and its guest's room.

    ``balloon_bytes`` is mms's record, which is crosvm's balloon unless an adjust failed (then
    mms follows the target). ``available_bytes`` is what the guest would give up to its balloon
    (its stats' ``available_memory``): an inflate reaches at most ``balloon +
    align_down(available)``. ``hidden_floor``: mms's record may hold more than
    ``balloon_bytes`` (the CrOS guest's internal allocation, which the protocol does not show),
    so the balloon's floor of 0 is somewhere at or below ``-balloon_bytes`` from here.
    """

    balloon_bytes: int
    mem_size_bytes: int
    available_bytes: int
    hidden_floor: bool = False

    @property
    def room_bytes(self) -> int:
        """How far the clamp lets this balloon inflate."""
        return self.mem_size_bytes - self.balloon_bytes

    def bounds(self) -> BalloonBounds:
        return BalloonBounds(self.balloon_bytes, self.mem_size_bytes)

    def set_balloon(self, target_bytes: int) -> int:
        limit_bytes = self.balloon_bytes + align_down_page(max(self.available_bytes, 0))
        return guest_balloon_reached(self.balloon_bytes, target_bytes, limit_bytes)


@dataclass(frozen=True, slots=True)
class _WatchedBounds(BalloonBounds):
    """Bounds whose floor is not known: notes every clamp that would reach it."""

    reached: list[int] = field(default_factory=list)

    def clamp_delta(self, delta_bytes: int) -> int:
        if delta_bytes < 0 and -delta_bytes > self.balloon_bytes:
            self.reached.append(delta_bytes)
        return BalloonBounds.clamp_delta(self, delta_bytes)


@dataclass(frozen=True, slots=True)
class RebalancePreview:
    """What mms would answer, and whether that is certain (see ``preview_rebalance``)."""

    actual_deltas: tuple[BalloonDelta, ...]
    # False: the answer depends on a hidden floor (mms's internal allocation) that was reached.
    exact: bool


def preview_rebalance(
    states_by_vm_id: Mapping[int, VmBalloonState], deltas: Sequence[BalloonDelta]
) -> RebalancePreview:
    """The ``actual_deltas`` mms would answer to ``deltas`` now; nothing is sent or changed.

    Exactly mms's answer when the states are mms's and each crosvm answers as
    ``guest_balloon_reached`` with the state's ``available_bytes`` (the simulator's guests do),
    with one more condition for a state with a ``hidden_floor`` (the CrOS guest): every step on
    that balloon (a clamp, a trim, an adjust) depends on the unknown part of its record only where
    it would take the balloon below ``balloon_bytes``. If no step does, the answer is the same
    for any hidden amount; if one does but that balloon covers the room of every other VM named
    (``balloon_bytes >= sum(room_bytes)``, true while mms has lost track of no memory, since the
    CrOS balloon then holds each sibling's whole footprint), the trim gives every other deflate
    its whole room and the hidden VM the negated sum, again the same for any hidden amount.
    Otherwise ``exact`` is False: mms's answer depends on what the protocol does not show.
    """
    balloons_bytes = {vm_id: state.balloon_bytes for vm_id, state in states_by_vm_id.items()}
    reached: list[int] = []

    def adjust(vm_id: int, delta_bytes: int) -> int:
        state = states_by_vm_id[vm_id]
        balloon_bytes = balloons_bytes[vm_id]
        if state.hidden_floor and delta_bytes < 0 and -delta_bytes > balloon_bytes:
            reached.append(delta_bytes)
        # Each VM is adjusted at most once per rebalance, from the state read before it.
        done = adjust_balloon(balloon_bytes, delta_bytes, state.set_balloon)
        balloons_bytes[vm_id] = done.balloon_bytes
        return done.actual_delta_bytes

    bounds: dict[int, BalloonBounds] = {
        vm_id: (
            _WatchedBounds(state.balloon_bytes, state.mem_size_bytes, reached)
            if state.hidden_floor
            else state.bounds()
        )
        for vm_id, state in states_by_vm_id.items()
    }
    actual_deltas, _ = rebalance(bounds, deltas, adjust)
    exact = True
    if reached:
        named = {delta.vm_id for delta in deltas}
        for vm_id, state in states_by_vm_id.items():
            if state.hidden_floor and vm_id in named:
                others_room_bytes = sum(
                    other.room_bytes
                    for other_id, other in states_by_vm_id.items()
                    if other_id != vm_id and other_id in named
                )
                exact = exact and state.balloon_bytes >= others_room_bytes
    return RebalancePreview(actual_deltas, exact)


class StatsGapError(ValueError):
    """A VM's stats lack a figure the preview needs (``field``: mms's name for it)."""

    def __init__(self, vm_id: int, field: str) -> None:
        super().__init__(f"VM {vm_id}'s stats have no {field}")
        self.vm_id = vm_id
        self.field = field


def state_from_stats(stats: VmBalloonStats, mem_size_bytes: int | None) -> VmBalloonState:
    """A VM's state as a GetBalloonStats answer shows it; ``mem_size_bytes`` None: the CrOS guest.

    The balloon is ``balloon_actual``: crosvm's balloon, mms's record unless an adjust failed.
    For the CrOS guest that is the record *less* mms's internal allocation, which the protocol
    does not show (a ``hidden_floor``), and its memory size is mms's alone: its state gets
    ``balloon + total_memory``, so that the room the clamp allows is the guest's own
    ``total_memory`` (its memory outside the balloon).
    """
    available_bytes = stats.stats.available_memory
    if available_bytes is None:
        raise StatsGapError(stats.vm_id, "stats.available_memory")
    if mem_size_bytes is not None:
        return VmBalloonState(stats.balloon_actual_bytes, mem_size_bytes, available_bytes)
    total_bytes = stats.stats.total_memory
    if total_bytes is None:
        raise StatsGapError(stats.vm_id, "stats.total_memory")
    return VmBalloonState(
        stats.balloon_actual_bytes,
        stats.balloon_actual_bytes + total_bytes,
        available_bytes,
        hidden_floor=True,
    )


def preview_from_stats(
    stats_by_vm_id: Mapping[int, VmBalloonStats],
    mem_sizes_bytes: Mapping[int, int],
    deltas: Sequence[BalloonDelta],
) -> RebalancePreview:
    """``preview_rebalance`` from one GetBalloonStats answer and the sibling memory sizes.

    Every VM in ``deltas`` needs an entry in ``stats_by_vm_id`` (else StatsGapError, field
    "balloon_actual"); a VM without one in ``mem_sizes_bytes`` is the CrOS guest.
    """
    states: dict[int, VmBalloonState] = {}
    for delta in deltas:
        entry = stats_by_vm_id.get(delta.vm_id)
        if entry is None:
            raise StatsGapError(delta.vm_id, "balloon_actual")
        states[delta.vm_id] = state_from_stats(entry, mem_sizes_bytes.get(delta.vm_id))
    return preview_rebalance(states, deltas)
