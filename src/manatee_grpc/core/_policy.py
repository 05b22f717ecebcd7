"""The ``balance-available`` policy: every period one stats read and at most one RebalanceMemory
that moves memory between all running siblings and the CrOS guest together.

Modelled on ChromeOS concierge's balloon policy, which balanced one VM against the host: a
guest's *available* memory is free + cached; each side keeps a critical margin; the balloon moves
by the difference between the two sides' memory above their margins; under pressure a step takes
at most 10 MiB beyond a margin; it acts only when the move is over 1 % of the guest's memory or a
side is within 1 MiB of its margin; and a guest seen under its margin twice with its balloon not
full has its margin lowered to what it had (its own baseline is lower). Here every participant
(the CrOS guest is one) is moved towards the *mean* memory above margin at once, so one request
serves all of them; mms conserves the total, so the deltas sum to zero. Per-VM floors and
ceilings bound the memory a VM may have, a step is capped, and a VM whose balloon did not move
when asked is left out for a while (doubling each time, up to a bound).

``plan_moves`` is pure (inputs in, deltas and a reason out); ``BalancePolicy`` keeps the state
between periods (adapted margins, back-offs); ``PolicyRunner`` is the loop task that reads stats
and sends the rebalance through the bridge, so validation, metrics and errors are those of any
caller. It never acts while a start is pending or while the mms stream is not usable.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import time
import tomllib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manatee_grpc.core import _validation as validate
from manatee_grpc.core._errors import ManateeError
from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES
from manatee_grpc.mms._messages import CROS_GUEST_VM_ID, VmBalloonStats

if TYPE_CHECKING:
    from manatee_grpc.core._bridge import MemoryBridge, RebalanceResult

__all__ = [
    "POLICY_NAMES",
    "BalancePolicy",
    "PolicyConfigError",
    "PolicyDecision",
    "PolicyRunner",
    "PolicySettings",
    "VmInput",
    "VmLimits",
    "plan_moves",
]

logger = logging.getLogger(__name__)

GIB = 1024 * MIB
POLICY_NAMES = ("balance-available",)


class PolicyConfigError(ValueError):
    """A policy settings file that cannot be read or holds a bad value (named by key)."""


@dataclass(frozen=True, slots=True)
class VmLimits:
    """One VM's margins: the available memory it should keep, and the memory it may have."""

    # Available memory (free + cached) below which the guest is under pressure.
    critical_bytes: int
    # The policy never leaves the VM with less memory than this (its total, balloon excluded)...
    floor_bytes: int = 0
    # ... nor gives it more than this (None: up to its whole memory).
    ceiling_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """Every setting of the policy; ``from_file`` reads them from TOML (README lists the keys)."""

    # Seconds between two decisions (one stats read each).
    period_s: float = 5.0
    # The CrOS guest (the host side of concierge's policy) and the default for every sibling.
    cros: VmLimits = VmLimits(critical_bytes=512 * MIB, floor_bytes=2 * GIB)
    siblings: VmLimits = VmLimits(critical_bytes=128 * MIB, floor_bytes=256 * MIB)
    # Per-VM overrides by id (ids are per mms session: they apply to whichever VM has the id).
    vms: Mapping[int, VmLimits] = field(default_factory=dict)
    # At most this many bytes change hands in one step.
    max_step_bytes: int = 256 * MIB
    # Act only when some VM's move is above this share of its memory and ``min_move_bytes``...
    hysteresis_percent: float = 1.0
    min_move_bytes: int = 4 * MIB
    # ... or a VM that would receive memory is within this of its critical margin (or below it).
    critical_proximity_bytes: int = 1 * MIB
    # Under pressure, take a VM at most this far below its critical margin.
    pressure_step_bytes: int = 10 * MIB
    # Lower a sibling's margin to what it had when seen under it twice with its balloon less
    # than ``balloon_full_percent`` of the largest seen (concierge); never below
    # ``adapt_min_percent`` of the configured margin.
    adapt_critical: bool = True
    balloon_full_percent: float = 95.0
    adapt_min_percent: float = 50.0
    # A VM whose inflate moved less than ``short_move_percent`` of what was asked sits out
    # ``backoff_periods`` periods, doubling on each repeat up to ``max_backoff_periods``.
    short_move_percent: float = 50.0
    backoff_periods: int = 2
    max_backoff_periods: int = 32
    # Decisions kept for ``recent()`` (and the server's view of the policy).
    history: int = 100
    # The deadline of the policy's own stats read and rebalance.
    timeout_s: float = 10.0

    def limits_for(self, vm_id: int) -> VmLimits:
        if vm_id in self.vms:
            return self.vms[vm_id]
        return self.cros if vm_id == CROS_GUEST_VM_ID else self.siblings

    @classmethod
    def from_file(cls, path: str | Path) -> PolicySettings:
        try:
            with Path(path).open("rb") as toml_file:
                data = tomllib.load(toml_file)
        except OSError as error:  # its strerror: the message would repeat the path
            raise PolicyConfigError(f"{path}: {error.strerror or error}") from error
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise PolicyConfigError(f"{path}: {error}") from error
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "policy config") -> PolicySettings:
        known = {f.name for f in fields(cls)} - {"vms"} | {"vm"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PolicyConfigError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        defaults = cls()
        kwargs: dict[str, Any] = {}
        # [vm.ID] tables start from the [siblings] values, wherever they are in the file.
        for key, raw in sorted(data.items(), key=lambda item: item[0] == "vm"):
            where = f"{source}: {key}"
            if key in ("cros", "siblings"):
                kwargs[key] = _limits(raw, getattr(defaults, key), where)
            elif key == "vm":
                if not isinstance(raw, dict):
                    raise PolicyConfigError(f"{where}: expected tables [vm.ID]")
                vms = {}
                for vm_key, table in raw.items():
                    if not (isinstance(vm_key, str) and vm_key.isascii() and vm_key.isdigit()):
                        raise PolicyConfigError(f"{where}.{vm_key}: a VM id is a number")
                    vm_id = int(vm_key)
                    if vm_id == CROS_GUEST_VM_ID:
                        # Its limits (the floor above all) are [cros]'s, never [siblings]'.
                        raise PolicyConfigError(
                            f"{where}.{vm_key}: VM {vm_id} is the CrOS guest; set its limits "
                            "in [cros]"
                        )
                    base = kwargs.get("siblings", defaults.siblings)
                    vms[vm_id] = _limits(table, base, f"{where}.{vm_key}")
                kwargs["vms"] = vms
            elif key.endswith("_bytes"):
                kwargs[key] = _size(raw, where)
            elif key == "adapt_critical":
                if not isinstance(raw, bool):
                    raise PolicyConfigError(f"{where}: expected true or false")
                kwargs[key] = raw
            elif key in ("backoff_periods", "max_backoff_periods", "history"):
                if type(raw) is not int or raw < 1:
                    raise PolicyConfigError(f"{where}: expected a positive integer, got {raw!r}")
                kwargs[key] = raw
            else:
                kwargs[key] = _number(raw, where)
        settings = cls(**kwargs)
        if settings.period_s <= 0 or settings.timeout_s <= 0:
            raise PolicyConfigError(f"{source}: period_s and timeout_s must be positive")
        if settings.max_step_bytes < PAGE_SIZE_BYTES:
            raise PolicyConfigError(f"{source}: max_step_bytes must be at least one page")
        return settings


_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(B|KiB|MiB|GiB|TiB)?\s*", re.ASCII)
_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB, "TiB": 1024 * GIB}


def _size(raw: object, where: str) -> int:
    if type(raw) is int and raw >= 0:
        return raw
    if isinstance(raw, str) and (match := _SIZE_RE.fullmatch(raw)):
        return int(float(match.group(1)) * _UNITS[match.group(2)])
    raise PolicyConfigError(f"{where}: expected bytes or a size like '512MiB', got {raw!r}")


def _number(raw: object, where: str) -> float:
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        number = float(raw)
        if math.isfinite(number) and number >= 0:
            return number
    raise PolicyConfigError(f"{where}: expected a number >= 0, got {raw!r}")


def _limits(raw: object, base: VmLimits, where: str) -> VmLimits:
    if not isinstance(raw, dict):
        raise PolicyConfigError(f"{where}: expected a table")
    unknown = sorted(set(raw) - {"critical_bytes", "floor_bytes", "ceiling_bytes"})
    if unknown:
        raise PolicyConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return replace(base, **{key: _size(value, f"{where}.{key}") for key, value in raw.items()})


# --- the decision --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmInput:
    """What the policy saw of one VM and the limits it applied to it."""

    vm_id: int
    balloon_bytes: int
    total_bytes: int  # the guest's memory (its balloon excluded)
    available_bytes: int  # free + cached, as concierge read it
    critical_bytes: int  # the margin in effect (adapted, if it was lowered)
    floor_bytes: int
    ceiling_bytes: int | None

    @property
    def above_critical_bytes(self) -> int:
        return self.available_bytes - self.critical_bytes


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """One period: the inputs, what was planned and why, and what mms did with it."""

    sequence: int
    time_unix_s: float
    session: str
    acted: bool  # a RebalanceMemory was sent
    reason: str
    vms: tuple[VmInput, ...] = ()
    # VMs left out of this period, and why (backed off, stats missing or unreadable).
    left_out: Mapping[int, str] = field(default_factory=dict)
    # Balloon deltas planned (positive takes memory from the VM), the CrOS guest's included.
    planned: Mapping[int, int] = field(default_factory=dict)
    # After the rebalance: what mms really moved, per VM, and whether all of it.
    actual: Mapping[int, int] = field(default_factory=dict)
    fully_applied: bool | None = None
    error: str | None = None

    @property
    def moved_bytes(self) -> int:
        """Bytes that changed hands (the sum of the balloons that really grew)."""
        return sum(delta for delta in self.actual.values() if delta > 0)

    def summary(self) -> str:
        moves = ", ".join(f"{vm}:{d // MIB:+d}MiB" for vm, d in sorted(self.planned.items()))
        text = f"policy #{self.sequence} {'acted' if self.acted else 'held'}: {self.reason}"
        if moves:
            text += f" [{moves}]"
        if self.acted:
            text += f" moved {self.moved_bytes // MIB} MiB, fully_applied={self.fully_applied}"
        return text


def plan_moves(vms: Sequence[VmInput], settings: PolicySettings) -> tuple[dict[int, int], str]:
    """Balloon deltas (page multiples summing to 0; empty to hold) and the reason.

    Each VM is moved towards the mean memory above margin of all ``vms``; a VM gives at most
    what keeps it above its floor and no more than ``pressure_step_bytes`` under its margin; it
    receives at most what its balloon holds and its ceiling allows; the step is capped.
    """
    if len(vms) < 2:
        return {}, "fewer than two VMs to balance"
    mean_above = sum(vm.above_critical_bytes for vm in vms) / len(vms)
    takes: dict[int, int] = {}
    gives: dict[int, int] = {}
    for vm in vms:
        want = vm.above_critical_bytes - mean_above  # > 0: it has more than its share
        if want > 0:
            limit = min(
                max(0, vm.above_critical_bytes + settings.pressure_step_bytes),
                max(0, vm.total_bytes - vm.floor_bytes),
                vm.available_bytes,
            )
            if (amount := int(min(want, limit))) > 0:
                takes[vm.vm_id] = amount
        else:
            limit = vm.balloon_bytes
            if vm.ceiling_bytes is not None:
                limit = min(limit, max(0, vm.ceiling_bytes - vm.total_bytes))
            if (amount := int(min(-want, limit))) > 0:
                gives[vm.vm_id] = amount
    total_pages = min(sum(takes.values()), sum(gives.values()), settings.max_step_bytes)
    total_pages //= PAGE_SIZE_BYTES
    if total_pages == 0:
        return {}, "balanced: nothing can move within the margins, floors and ceilings"
    deltas = {vm_id: pages * PAGE_SIZE_BYTES for vm_id, pages in _share(takes, total_pages).items()}
    for vm_id, pages in _share(gives, total_pages).items():
        deltas[vm_id] = -pages * PAGE_SIZE_BYTES
    deltas = {vm_id: delta for vm_id, delta in deltas.items() if delta}
    # Hysteresis on what would really move: some VM's move is large enough for it, or a VM that
    # receives memory is at (or near, or under) its critical margin.
    by_id = {vm.vm_id: vm for vm in vms}
    urgent = any(
        delta < 0 and by_id[vm_id].above_critical_bytes < settings.critical_proximity_bytes
        for vm_id, delta in deltas.items()
    )
    significant = any(
        abs(delta)
        > max(settings.min_move_bytes, by_id[vm_id].total_bytes * settings.hysteresis_percent / 100)
        for vm_id, delta in deltas.items()
    )
    if urgent:
        return deltas, "a VM is at or near its critical margin"
    if significant:
        return deltas, "imbalance above hysteresis"
    return {}, "within hysteresis: no move is large enough and no VM is near its margin"


def _share(amounts: Mapping[int, int], total_pages: int) -> dict[int, int]:
    """``total_pages`` split in proportion to ``amounts`` (largest remainder: exact sum)."""
    whole = sum(amounts.values())
    exact = {vm_id: amount * total_pages / whole for vm_id, amount in amounts.items()}
    pages = {vm_id: math.floor(value) for vm_id, value in exact.items()}
    left = total_pages - sum(pages.values())
    for vm_id in sorted(exact, key=lambda v: pages[v] - exact[v])[:left]:
        pages[vm_id] += 1
    return pages


@dataclass(slots=True)
class _VmState:
    critical_bytes: int  # the margin in effect
    max_balloon_bytes: int = 0
    previous_available_bytes: int | None = None
    previous_full_percent: float = 100.0
    strikes: int = 0
    backed_off_until: int = 0  # the period from which it takes part again


class BalancePolicy:
    """The decision between periods: adapted margins and back-offs, per VM of one session."""

    def __init__(self, settings: PolicySettings) -> None:
        self.settings = settings
        self.period = 0
        self._session = ""
        self._vms: dict[int, _VmState] = {}

    def observe_session(self, session: str) -> None:
        """A new mms session numbers VMs afresh: forget what was learnt of the old ids."""
        if session != self._session:
            self._session = session
            self._vms.clear()

    def keep_only(self, vm_ids: Collection[int]) -> None:
        """Forget removed VMs (ids are not reused within a session), so the state stays as
        small as the device: what ``state()`` shows, and each decision's event carries."""
        for vm_id in self._vms.keys() - set(vm_ids):
            del self._vms[vm_id]

    def inputs(self, stats: Sequence[VmBalloonStats]) -> tuple[list[VmInput], dict[int, str]]:
        """This period's inputs from one stats read: VMs taking part, and those left out."""
        self.period += 1
        vms: list[VmInput] = []
        left_out: dict[int, str] = {}
        for entry in stats:
            state = self._state(entry.vm_id)
            free, cached = entry.stats.free_memory, entry.stats.disk_caches
            total = entry.stats.total_memory
            if free is None or cached is None or total is None:
                left_out[entry.vm_id] = "stats lack free_memory, disk_caches or total_memory"
                continue
            available = free + cached
            self._adapt(entry.vm_id, state, available, entry.balloon_actual_bytes)
            if state.backed_off_until > self.period:
                left_out[entry.vm_id] = (
                    f"backed off until period {state.backed_off_until}: its balloon did not move"
                )
                continue
            limits = self.settings.limits_for(entry.vm_id)
            vms.append(
                VmInput(
                    vm_id=entry.vm_id,
                    balloon_bytes=entry.balloon_actual_bytes,
                    total_bytes=total,
                    available_bytes=available,
                    critical_bytes=state.critical_bytes,
                    floor_bytes=limits.floor_bytes,
                    ceiling_bytes=limits.ceiling_bytes,
                )
            )
        return vms, left_out

    def _state(self, vm_id: int) -> _VmState:
        state = self._vms.get(vm_id)
        if state is None:
            critical = self.settings.limits_for(vm_id).critical_bytes
            state = self._vms[vm_id] = _VmState(critical_bytes=critical)
        return state

    def _adapt(self, vm_id: int, state: _VmState, available: int, balloon: int) -> None:
        """Concierge's lowering of a guest's margin; never for the CrOS guest (the host)."""
        state.max_balloon_bytes = max(state.max_balloon_bytes, balloon)
        full_percent = (
            balloon * 100 / state.max_balloon_bytes if state.max_balloon_bytes > 0 else 0.0
        )
        settings = self.settings
        if (
            settings.adapt_critical
            and vm_id != CROS_GUEST_VM_ID
            and available < state.critical_bytes
            and full_percent < settings.balloon_full_percent
            and state.previous_available_bytes is not None
            and state.previous_available_bytes < state.critical_bytes
            and state.previous_full_percent < settings.balloon_full_percent
        ):
            lowest = int(
                settings.limits_for(vm_id).critical_bytes * settings.adapt_min_percent / 100
            )
            state.critical_bytes = max(lowest, state.previous_available_bytes)
        state.previous_available_bytes = available
        state.previous_full_percent = full_percent

    def settle(self, planned: Mapping[int, int], actual: Mapping[int, int]) -> None:
        """After a rebalance: back off each VM whose inflate came back short; clear the rest."""
        settings = self.settings
        for vm_id, asked in planned.items():
            if asked <= 0:
                continue  # deflates always work; a short one is the slack of a short inflate
            state = self._state(vm_id)
            if actual.get(vm_id, 0) * 100 < asked * settings.short_move_percent:
                state.strikes += 1
                periods = min(
                    settings.max_backoff_periods, settings.backoff_periods << (state.strikes - 1)
                )
                state.backed_off_until = self.period + periods + 1
            else:
                state.strikes = 0

    def state(self) -> dict[str, Any]:
        return {
            "period": self.period,
            "session": self._session,
            "critical_bytes": {vm: s.critical_bytes for vm, s in sorted(self._vms.items())},
            "backed_off_until": {
                vm: s.backed_off_until
                for vm, s in sorted(self._vms.items())
                if s.backed_off_until > self.period
            },
        }


# --- the loop task -------------------------------------------------------------------------------


class PolicyRunner:
    """Runs the policy every ``period_s`` on the server's loop, through the bridge.

    ``tick()`` is one period (tests and the benchmark call it directly instead of waiting);
    ``on_decision`` gets every decision, on the loop; ``recent()`` and ``state()`` show them.
    """

    def __init__(
        self,
        bridge: MemoryBridge,
        settings: PolicySettings,
        on_decision: Callable[[PolicyDecision], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.policy = BalancePolicy(settings)
        self._bridge = bridge
        self._on_decision = on_decision
        self._clock = clock
        self._recent: collections.deque[PolicyDecision] = collections.deque(maxlen=settings.history)
        self._sequence = 0
        self.rebalances_sent = 0
        self.bytes_moved = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def start(self) -> None:
        """Start the periodic task on the running loop (the first decision after one period)."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="policy")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.period_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the policy for good: log, go on
                logger.exception("policy period failed")

    async def tick(self) -> PolicyDecision:
        """One period: read, decide, maybe rebalance; returns the decision (also delivered)."""
        async with self._lock:  # a tick asked for while the task ticks waits its turn
            decision = await self._decide()
        self._recent.append(decision)
        if decision.acted:
            self.rebalances_sent += 1
            self.bytes_moved += decision.moved_bytes
        if self._on_decision is not None:
            self._on_decision(decision)
        return decision

    def _hold(self, reason: str, session: str | None = None, **values: Any) -> PolicyDecision:
        """A period that sent nothing; ``session``: the one its inputs were read in."""
        self._sequence += 1
        if session is None:
            session = self._bridge.books.session_id
        return PolicyDecision(self._sequence, self._clock(), session, False, reason, **values)

    def _why_not_now(self) -> str | None:
        bridge = self._bridge
        if not bridge.connection.usable:
            return "mms is not usable (not connected, hung or out of step)"
        if bridge.slot.claim is not None or bridge.slot.launches_waiting():
            return "a VM start is pending"
        return None

    async def _decide(self) -> PolicyDecision:
        bridge = self._bridge
        why = self._why_not_now()
        if why is not None:
            return self._hold(why)
        session = bridge.books.session
        # Named from ``session`` itself: the session may change on the connection thread at
        # any moment, and what is learnt from this read belongs to the session it was read in.
        read_in = bridge.books.public_session_id(session)
        self.policy.observe_session(read_in)
        vm_ids = bridge.books.running_vm_ids() or (CROS_GUEST_VM_ID,)
        self.policy.keep_only(vm_ids)
        try:
            snapshot = await bridge.get_balloon_stats_async(vm_ids, self.settings.timeout_s)
        except ManateeError as error:
            return self._hold("stats could not be read", error=str(error))
        if snapshot.session != session:
            return self._hold("the mms session changed during the stats read")
        vms, left_out = self.policy.inputs(snapshot.stats)
        for vm_id in snapshot.missing_vm_ids:
            left_out[vm_id] = "no stats from mms (missing or unreadable)"
        if CROS_GUEST_VM_ID in left_out or not any(v.vm_id == CROS_GUEST_VM_ID for v in vms):
            return self._hold(
                "the CrOS guest's stats are not usable",
                session=read_in,
                vms=tuple(vms),
                left_out=left_out,
            )
        planned, reason = plan_moves(vms, self.settings)
        inputs: dict[str, Any] = {
            "session": read_in,
            "vms": tuple(vms),
            "left_out": left_out,
            "planned": planned,
        }
        if not planned:
            return self._hold(reason, **inputs)
        # Checked again with nothing awaited before the request is queued: a start may have
        # begun during the read, and mms reserves a start's memory from the CrOS balloon.
        why = self._why_not_now()
        if why is not None:
            return self._hold(why, **inputs)
        siblings = {vm_id: d for vm_id, d in planned.items() if vm_id != CROS_GUEST_VM_ID}
        self._sequence += 1
        decision = PolicyDecision(
            self._sequence, self._clock(), acted=True, reason=reason, **inputs
        )
        try:
            # The field checks a caller's RebalanceMemory gets (ids, JSON-exact sizes and sum),
            # then the bridge's: the VMs running, the session the stats were read in.
            validate.balloon_deltas(list(siblings.items()), field="policy deltas")
            result: RebalanceResult = await bridge.rebalance(
                siblings,
                self.settings.timeout_s,
                session_id=read_in,
            )
        except ManateeError as error:
            # Sent only if the error says so: the connection's errors always say whether the
            # request reached mms, while the books' own refusals (a VM removed, or the session
            # reset, since the read: VmNotFoundError, SessionResetError) say nothing (None).
            return replace(decision, acted=error.reached_mms is True, error=str(error))
        actual = {delta.vm_id: delta.delta_bytes for delta in result.actual}
        self.policy.settle(planned, actual)
        return replace(decision, actual=actual, fully_applied=result.fully_applied)

    def recent(self) -> list[PolicyDecision]:
        """The last ``history`` decisions, oldest first."""
        return list(self._recent)

    def state(self) -> dict[str, Any]:
        """What the policy is doing: its settings' period, counts, margins and back-offs."""
        last = self._recent[-1] if self._recent else None
        return {
            "policy": POLICY_NAMES[0],
            "period_s": self.settings.period_s,
            "decisions": self._sequence,
            "rebalances_sent": self.rebalances_sent,
            "bytes_moved": self.bytes_moved,
            "last": None if last is None else last.summary(),
            **self.policy.state(),
        }
