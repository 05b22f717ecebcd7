"""The balance-available policy's decision, with small fakes: pure logic, no sockets, no sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from manatee_grpc.core._bridge import RebalanceResult
from manatee_grpc.core._policy import (
    BalancePolicy,
    PolicyConfigError,
    PolicyDecision,
    PolicyRunner,
    PolicySettings,
    VmInput,
    VmLimits,
    plan_moves,
)
from manatee_grpc.core._stats import StatsSnapshot
from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES
from manatee_grpc.mms._messages import BalloonDelta, BalloonStats, VmBalloonStats

GIB = 1024 * MIB
SETTINGS = PolicySettings(
    cros=VmLimits(critical_bytes=512 * MIB, floor_bytes=2 * GIB),
    siblings=VmLimits(critical_bytes=128 * MIB, floor_bytes=256 * MIB),
    max_step_bytes=256 * MIB,
)


def vm(
    vm_id: int,
    available_mib: int,
    *,
    balloon_mib: int = 1024,
    total_mib: int = 1024,
    critical_mib: int | None = None,
    floor_mib: int | None = None,
    ceiling_mib: int | None = None,
) -> VmInput:
    limits = SETTINGS.limits_for(vm_id)
    return VmInput(
        vm_id=vm_id,
        balloon_bytes=balloon_mib * MIB,
        total_bytes=total_mib * MIB,
        available_bytes=available_mib * MIB,
        critical_bytes=limits.critical_bytes if critical_mib is None else critical_mib * MIB,
        floor_bytes=limits.floor_bytes if floor_mib is None else floor_mib * MIB,
        ceiling_bytes=limits.ceiling_bytes if ceiling_mib is None else ceiling_mib * MIB,
    )


def cros(available_mib: int, total_mib: int = 4096, balloon_mib: int = 4096) -> VmInput:
    return vm(0, available_mib, total_mib=total_mib, balloon_mib=balloon_mib)


def _check_deltas(deltas: Mapping[int, int]) -> None:
    assert sum(deltas.values()) == 0, "mms conserves the total: the deltas sum to zero"
    assert all(delta % PAGE_SIZE_BYTES == 0 for delta in deltas.values())


def test_rising_demand_gets_memory_from_idle_vms() -> None:
    # VM 1 is under its margin; VMs 2 and 3 idle with plenty; the CrOS guest is comfortable.
    deltas, reason = plan_moves([cros(1500), vm(1, 40), vm(2, 900), vm(3, 700)], SETTINGS)
    _check_deltas(deltas)
    assert deltas[1] < 0, "the VM under pressure gets memory (its balloon deflates)"
    assert deltas[2] > 0 and deltas[3] > 0
    assert deltas[2] > deltas[3], "the idler VM gives more"
    assert "margin" in reason


def test_every_delta_sums_to_zero_on_many_states() -> None:
    for seed in range(200):
        availables = [(seed * 37 + i * 101) % 1500 for i in range(5)]
        vms = [cros(availables[0] + 400)] + [
            vm(i, availables[i], balloon_mib=(seed * 13 + i * 7) % 1024) for i in range(1, 5)
        ]
        deltas, _ = plan_moves(vms, SETTINGS)
        _check_deltas(deltas)
        assert sum(d for d in deltas.values() if d > 0) <= SETTINGS.max_step_bytes


def test_the_step_is_capped() -> None:
    deltas, _ = plan_moves([cros(3000), vm(1, 0, balloon_mib=2048)], SETTINGS)
    _check_deltas(deltas)
    assert deltas == {0: 256 * MIB, 1: -256 * MIB}


def test_floors_hold_the_cros_guest_and_siblings() -> None:
    # The CrOS guest has lots available but is at its 2 GiB floor: it gives nothing.
    deltas, _ = plan_moves([cros(1800, total_mib=2048), vm(1, 0)], SETTINGS)
    assert deltas == {}
    # A sibling at its floor gives nothing either, however idle.
    deltas, _ = plan_moves([cros(0), vm(1, 250, total_mib=256)], SETTINGS)
    assert deltas == {}
    # Above the floor, only what keeps it there: 100 MiB of the CrOS guest's 2148.
    deltas, _ = plan_moves([cros(1800, total_mib=2148), vm(1, 0)], SETTINGS)
    assert deltas == {0: 100 * MIB, 1: -100 * MIB}


def test_a_ceiling_limits_what_a_vm_receives() -> None:
    deltas, _ = plan_moves([cros(3000), vm(1, 0, total_mib=1000, ceiling_mib=1064)], SETTINGS)
    assert deltas == {0: 64 * MIB, 1: -64 * MIB}


def test_a_vm_is_taken_at_most_ten_mib_past_its_margin_under_pressure() -> None:
    # Everybody is short: the mean is below every margin. VM 2 has 50 MiB above its margin and
    # may give at most 60 (10 MiB past it), not the 200 the mean would take.
    deltas, _ = plan_moves([cros(100), vm(1, 0), vm(2, 178)], SETTINGS)
    _check_deltas(deltas)
    assert deltas[2] == 60 * MIB


def test_hysteresis_holds_small_imbalances() -> None:
    # 4 MiB apart above their margins: no VM is near its margin and the move is tiny.
    deltas, reason = plan_moves([cros(900), vm(1, 500), vm(2, 504)], SETTINGS)
    assert deltas == {}
    assert "hysteresis" in reason
    # The same small move is made when the receiver is at its margin.
    deltas, _ = plan_moves(
        [cros(512 + 6, balloon_mib=10), vm(1, 128, balloon_mib=10)],
        PolicySettings(max_step_bytes=1 * GIB),
    )
    assert deltas == {0: 3 * MIB, 1: -3 * MIB}


def test_a_balloon_cannot_deflate_below_empty() -> None:
    deltas, _ = plan_moves([cros(3000), vm(1, 0, balloon_mib=8)], SETTINGS)
    assert deltas == {0: 8 * MIB, 1: -8 * MIB}


def _stats(vm_id: int, available_mib: int, balloon_mib: int, total_mib: int) -> VmBalloonStats:
    return VmBalloonStats(
        vm_id,
        BalloonStats(
            free_memory=available_mib * MIB // 2,
            disk_caches=available_mib * MIB - available_mib * MIB // 2,
            total_memory=total_mib * MIB,
        ),
        balloon_mib * MIB,
    )


def test_a_vm_whose_balloon_does_not_move_is_backed_off_doubling() -> None:
    policy = BalancePolicy(PolicySettings(backoff_periods=2, max_backoff_periods=4))
    reading = [_stats(0, 600, 3000, 4096), _stats(1, 900, 100, 1024)]
    vms, left_out = policy.inputs(reading)
    assert [v.vm_id for v in vms] == [0, 1] and not left_out
    policy.settle({1: 64 * MIB, 0: -64 * MIB}, {1: 0, 0: 0})  # the inflate did not move
    out_for = []
    for _ in range(12):
        vms, left_out = policy.inputs(reading)
        out_for.append(1 in left_out)
        if not left_out and len(out_for) < 6:
            policy.settle({1: 64 * MIB, 0: -64 * MIB}, {1: 4096, 0: -4096})  # short again
    # Out 2 periods, back for one (short again), out 4 (doubled), then it stays in.
    assert out_for[:8] == [True, True, False, True, True, True, True, False]
    assert "did not move" in policy.inputs(reading)[1].get(1, "did not move")
    # A full move clears the strikes.
    policy.settle({1: 64 * MIB}, {1: 64 * MIB})
    assert policy.state()["backed_off_until"] == {}


def test_a_vm_under_its_margin_twice_with_its_balloon_not_full_has_its_margin_lowered() -> None:
    policy = BalancePolicy(PolicySettings())
    policy.inputs([_stats(0, 2000, 3000, 4096), _stats(1, 500, 800, 1024)])  # balloon max 800
    policy.inputs([_stats(0, 2000, 3000, 4096), _stats(1, 100, 200, 1600)])  # under, 25 % full
    vms, _ = policy.inputs([_stats(0, 2000, 3000, 4096), _stats(1, 90, 100, 1700)])
    assert {v.vm_id: v.critical_bytes for v in vms} == {0: 512 * MIB, 1: 100 * MIB}
    # Never below half the configured margin, and never for the CrOS guest.
    vms, _ = policy.inputs([_stats(0, 10, 3000, 4096), _stats(1, 10, 100, 1700)])
    vms, _ = policy.inputs([_stats(0, 10, 3000, 4096), _stats(1, 10, 100, 1700)])
    assert {v.vm_id: v.critical_bytes for v in vms} == {0: 512 * MIB, 1: 64 * MIB}


def test_settings_read_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        'period_s = 2\nmax_step_bytes = "128MiB"\nadapt_critical = false\n'
        '[cros]\ncritical_bytes = "1GiB"\nfloor_bytes = "3GiB"\n'
        '[vm.2]\nceiling_bytes = "1.5GiB"\n'
        '[siblings]\ncritical_bytes = "64MiB"\n'
    )
    settings = PolicySettings.from_file(path)
    assert settings.period_s == 2.0
    assert settings.max_step_bytes == 128 * MIB
    assert settings.adapt_critical is False
    assert settings.limits_for(0) == VmLimits(1 * GIB, 3 * GIB, None)
    assert settings.limits_for(1) == VmLimits(64 * MIB, 256 * MIB, None)
    assert settings.limits_for(2) == VmLimits(64 * MIB, 256 * MIB, 1536 * MIB)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("perod_s = 1\n", "unknown key"),
        ("period_s = 0\n", "positive"),
        ('max_step_bytes = "lots"\n', "max_step_bytes"),
        ("[cros]\ncritical = 1\n", "cros"),
        ("history = 0\n", "history"),
        ("period_s = [", "policy.toml: Invalid value"),
        # The CrOS guest's limits are [cros]: a [vm.0] would drop its floor to [siblings]'.
        ('[cros]\nfloor_bytes = "3GiB"\n[vm.0]\nceiling_bytes = "6GiB"\n', r"vm\.0: .*\[cros\]"),
    ],
)
def test_a_bad_settings_file_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PolicyConfigError, match=message):
        PolicySettings.from_file(path)


# --- the runner, on fakes --------------------------------------------------------------------


@dataclass
class _Books:
    session: int = 1
    session_id: str = "s1"
    vm_ids: tuple[int, ...] = (0, 1, 2)

    def running_vm_ids(self) -> tuple[int, ...]:
        return self.vm_ids

    def public_session_id(self, session: int) -> str:
        return f"s{session}"


@dataclass
class _Slot:
    claim: object | None = None
    waiting: int = 0

    def launches_waiting(self) -> int:
        return self.waiting


@dataclass
class _Connection:
    usable: bool = True


@dataclass
class _FakeBridge:
    """The bridge as the runner uses it: stats to hand out, rebalances recorded."""

    stats: list[VmBalloonStats]
    books: _Books = field(default_factory=_Books)
    slot: _Slot = field(default_factory=_Slot)
    connection: _Connection = field(default_factory=_Connection)
    rebalances: list[dict[int, int]] = field(default_factory=list)
    shortfall_vm_ids: set[int] = field(default_factory=set)

    async def get_balloon_stats_async(
        self, vm_ids: tuple[int, ...], timeout_s: float | None, session_id: str = ""
    ) -> StatsSnapshot:
        return StatsSnapshot(self.books.session, 0.0, tuple(self.stats), ())

    async def rebalance(
        self, deltas: Mapping[int, int], timeout_s: float | None, session_id: str = ""
    ) -> RebalanceResult:
        assert session_id == self.books.public_session_id(self.books.session)
        self.rebalances.append(dict(deltas))
        requested = (
            *(BalloonDelta(v, d) for v, d in deltas.items()),
            BalloonDelta(0, -sum(deltas.values())),
        )
        actual = tuple(
            BalloonDelta(d.vm_id, 0 if d.vm_id in self.shortfall_vm_ids else d.delta_bytes)
            for d in requested
        )
        return RebalanceResult(requested, actual, actual == requested)


def _runner(bridge: _FakeBridge, decisions: list[PolicyDecision]) -> PolicyRunner:
    fake: Any = bridge
    return PolicyRunner(fake, SETTINGS, on_decision=decisions.append, clock=lambda: 1.0)


SKEWED = [_stats(0, 1500, 3000, 4096), _stats(1, 40, 500, 600), _stats(2, 900, 100, 1024)]


def test_the_runner_sends_one_rebalance_of_siblings_with_its_inputs_recorded() -> None:
    bridge = _FakeBridge(list(SKEWED))
    decisions: list[PolicyDecision] = []
    runner = _runner(bridge, decisions)
    decision = asyncio.run(runner.tick())
    assert decision.acted and decision.fully_applied
    assert len(bridge.rebalances) == 1
    sent = bridge.rebalances[0]
    assert 0 not in sent, "the bridge adds the CrOS guest's delta"
    assert sent[1] < 0 < sent[2]
    assert decision.planned[0] == -sum(sent.values())
    assert [v.vm_id for v in decision.vms] == [0, 1, 2]
    assert decisions == [decision] and runner.recent() == [decision]
    assert runner.state()["rebalances_sent"] == 1
    assert runner.state()["bytes_moved"] == decision.moved_bytes > 0


@pytest.mark.parametrize(
    ("block", "reason"),
    [
        ("claim", "start is pending"),
        ("queued", "start is pending"),
        ("unusable", "not usable"),
    ],
)
def test_nothing_moves_while_a_start_is_pending_or_mms_is_not_usable(
    block: str, reason: str
) -> None:
    bridge = _FakeBridge(list(SKEWED))
    if block == "claim":
        bridge.slot.claim = object()
    elif block == "queued":
        bridge.slot.waiting = 1
    else:
        bridge.connection.usable = False
    decisions: list[PolicyDecision] = []
    decision = asyncio.run(_runner(bridge, decisions).tick())
    assert not decision.acted and reason in decision.reason
    assert bridge.rebalances == []
    assert decisions == [decision]


def test_a_rebalance_refused_before_mms_is_recorded_as_not_sent() -> None:
    from manatee_grpc.core._errors import VmNotRunningError

    bridge = _FakeBridge(list(SKEWED))

    async def refuse(*args: object, **kwargs: object) -> RebalanceResult:
        raise VmNotRunningError("VM 2 is starting", reached_mms=False)

    bridge.rebalance = refuse  # type: ignore[method-assign]
    runner = _runner(bridge, [])
    decision = asyncio.run(runner.tick())
    assert not decision.acted and decision.error == "VM 2 is starting"
    assert decision.planned, "the plan is recorded with the refusal"
    assert runner.state()["rebalances_sent"] == 0


def test_the_runner_backs_off_a_vm_whose_balloon_did_not_move() -> None:
    bridge = _FakeBridge(list(SKEWED), shortfall_vm_ids={2})
    decisions: list[PolicyDecision] = []
    runner = _runner(bridge, decisions)

    async def three() -> list[PolicyDecision]:
        return [await runner.tick() for _ in range(3)]

    first, second, _ = asyncio.run(three())
    assert first.acted and first.fully_applied is False
    assert 2 in second.left_out and "did not move" in second.left_out[2]
    assert all(2 not in sent for sent in bridge.rebalances[1:])


def test_the_readme_example_and_table_name_every_setting() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Balancing memory: the policy") :]
    example = re.search(r"```toml\n(.*?)```", section, re.S)
    assert example is not None
    settings = PolicySettings.from_mapping(tomllib.loads(example.group(1)))
    assert settings.limits_for(3).ceiling_bytes == 1536 * MIB
    documented = set(re.findall(r"^\| `(\w+)`", section, re.M))
    expected = {
        f for f in PolicySettings.__dataclass_fields__ if f not in ("cros", "siblings", "vms")
    }
    assert documented == expected


def test_a_new_sessions_vm_with_a_backed_off_id_is_not_backed_off() -> None:
    """VM ids repeat across sessions: VM 2 of a new session is not the VM that did not move."""
    bridge = _FakeBridge(list(SKEWED), shortfall_vm_ids={2})
    runner = _runner(bridge, [])

    async def periods() -> tuple[PolicyDecision, PolicyDecision]:
        await runner.tick()  # VM 2's inflate comes back short: backed off
        backed_off = await runner.tick()
        bridge.books.session, bridge.books.session_id = 2, "s2"  # mms reset; a new VM 2
        bridge.shortfall_vm_ids.clear()
        return backed_off, await runner.tick()

    backed_off, fresh = asyncio.run(periods())
    assert 2 in backed_off.left_out
    assert 2 not in fresh.left_out and 2 in fresh.planned, fresh
    assert fresh.session == "s2"
    assert runner.state()["backed_off_until"] == {}


def test_a_removed_vm_is_forgotten_so_the_policys_state_stays_small() -> None:
    bridge = _FakeBridge(list(SKEWED), shortfall_vm_ids={2})
    runner = _runner(bridge, [])

    async def periods() -> None:
        await runner.tick()  # VM 2 backed off
        assert 2 in runner.state()["backed_off_until"]
        bridge.books.vm_ids = (0, 1)  # VM 2 removed (its id is never used again this session)
        bridge.stats = [entry for entry in bridge.stats if entry.vm_id != 2]
        await runner.tick()

    asyncio.run(periods())
    assert set(runner.state()["critical_bytes"]) == {0, 1}
    assert runner.state()["backed_off_until"] == {}


@pytest.mark.parametrize("refusal", ["removed", "session_reset", "deadline_sent"])
def test_a_rebalance_refused_by_the_books_is_not_counted_as_sent(refusal: str) -> None:
    """A VM removed (or the session reset) during the stats read: the books refuse the
    rebalance before mms, with no reached_mms; the decision did not act."""
    from manatee_grpc.core._errors import DeadlineExceededError, SessionResetError, VmNotFoundError

    bridge = _FakeBridge(list(SKEWED))
    errors = {
        "removed": VmNotFoundError("no VM 2 in mms session s1", vmId=2),
        "session_reset": SessionResetError("VM 2 belonged to mms session s1", vmId=2),
        "deadline_sent": DeadlineExceededError("deadline passed", reached_mms=True),
    }

    async def refuse(*args: object, **kwargs: object) -> RebalanceResult:
        raise errors[refusal]

    bridge.rebalance = refuse  # type: ignore[method-assign]
    runner = _runner(bridge, [])
    decision = asyncio.run(runner.tick())
    sent = refusal == "deadline_sent"
    assert decision.acted is sent and decision.error is not None
    assert runner.state()["rebalances_sent"] == int(sent)


def test_the_policys_deltas_get_a_callers_field_checks_before_the_bridge() -> None:
    """Sizes no JSON number holds exactly (a hostile mms's, a huge max_step_bytes): refused as
    a caller's RebalanceMemory would be, nothing sent, and the decision says why."""
    huge_mib = 1 << 40  # 2^60 bytes
    bridge = _FakeBridge(
        [
            _stats(0, 1500, 3000, 4096),
            _stats(1, huge_mib, 10, huge_mib),
            _stats(2, 40, huge_mib, 1024),
        ]
    )
    fake: Any = bridge
    runner = PolicyRunner(fake, replace(SETTINGS, max_step_bytes=1 << 62), clock=lambda: 1.0)
    decision = asyncio.run(runner.tick())
    assert decision.planned and max(abs(d) for d in decision.planned.values()) > 2**53
    assert bridge.rebalances == []
    assert not decision.acted and decision.error is not None and "policy deltas" in decision.error


def test_what_is_learnt_belongs_to_the_session_it_was_read_in() -> None:
    """The session changes on the connection thread between the policy's two looks at the
    books: the period's read is the old session's, so the old VM 2's back-off still holds."""
    bridge = _FakeBridge(list(SKEWED), shortfall_vm_ids={2})
    runner = _runner(bridge, [])

    async def periods() -> PolicyDecision:
        await runner.tick()  # VM 2's inflate comes back short: backed off in session 1
        bridge.books.session_id = "s2"  # the reset lands between the two reads of the books
        return await runner.tick()  # ... and this period's stats are session 1's

    decision = asyncio.run(periods())
    assert 2 in decision.left_out, decision
    assert decision.session == "s1", "its VM ids are session 1's"
