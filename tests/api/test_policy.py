"""The balance-available policy on a real server and the simulator running a workload.

The simulator's workload runs on a ManualClock and the policy's period is an hour, so nothing
happens by itself: each step moves the workload on and runs one policy period (run_policy_tick).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format

from api.conftest import start_server
from api.event_helpers import recorded_events
from api.helpers import wait_until
from manatee_grpc import Client, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import DemandCurve, GuestMemory, ManualClock, Scenario, Simulator

GIB = 1024 * MIB
VM_MEM_BYTES = 2 * GIB
VM_INIT_BYTES = 1 * GIB
CROS_FLOOR_BYTES = 3 * GIB
SIBLING_CRITICAL_BYTES = 128 * MIB
POLICY_TOML = f"""
period_s = 3600  # the test runs each period itself
max_step_bytes = "256MiB"
[cros]
critical_bytes = "512MiB"
floor_bytes = {CROS_FLOOR_BYTES}
[siblings]
critical_bytes = {SIBLING_CRITICAL_BYTES}
floor_bytes = "256MiB"
"""


@dataclass
class Rig:
    clock: ManualClock
    sim: Simulator
    server: ManateeServer
    stub: pb_grpc.MemoryServiceStub

    def start_vm(self, mem_size_bytes: int = VM_MEM_BYTES) -> int:
        prepared = self.stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes, init_mem_size_bytes=VM_INIT_BYTES)
        )
        assert prepared.reserved
        self.stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id))
        return prepared.vm_id

    def memory(self, vm_id: int) -> GuestMemory:
        memory = self.sim.with_model(lambda model: model.guest_memory(vm_id))
        assert memory is not None
        return memory

    def rebalances(self) -> int:
        return self.sim.request_counts[MessageType.REBALANCE_MEMORY]


def _rig(tmp_path: Path, scenario: Scenario) -> Iterator[Rig]:
    clock = ManualClock()
    sim = Simulator(scenario, listen=f"unix://{tmp_path}/mms.sock", clock=clock).start()
    config = tmp_path / "policy.toml"
    config.write_text(POLICY_TOML)
    server = start_server(
        mms=str(sim.address), policy="balance-available", policy_config_path=str(config)
    )
    try:
        with grpc.insecure_channel(server.address) as channel:
            yield Rig(clock, sim, server, pb_grpc.MemoryServiceStub(channel))
    finally:
        server.stop(grace_s=1.0)
        sim.stop()


# VM 1's demand climbs from 200 MiB to 1.7 GiB over five minutes; VMs 2 and 3 idle at 100 MiB;
# the CrOS guest is busy too (about 700 MiB available once the three VMs run).
RISING = Scenario(
    cros_used_bytes=4300 * MIB,
    vm_demand={
        1: DemandCurve.of((0, 200 * MIB), (60, 200 * MIB), (360, 1700 * MIB)),
        2: DemandCurve.of((0, 100 * MIB)),
        3: DemandCurve.of((0, 100 * MIB)),
    },
)


@pytest.fixture
def rising(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, RISING)


def test_a_vm_under_rising_demand_gets_memory_from_idle_ones(rising: Rig) -> None:
    vm_ids = [rising.start_vm() for _ in range(3)]
    assert vm_ids == [1, 2, 3]
    acted = 0
    for _ in range(40):  # 400 s of workload, a period every 10 s
        rising.clock.advance(10)
        decision = rising.server.run_policy_tick()
        acted += decision.acted
        assert decision.error is None
    busy, idle = rising.memory(1), [rising.memory(2), rising.memory(3)]
    # It had 1 GiB; it needs 1.7 GiB and more than its margin beside it: it got it.
    assert busy.used_bytes == 1700 * MIB
    assert busy.total_bytes > 1700 * MIB + SIBLING_CRITICAL_BYTES
    assert busy.available_bytes >= SIBLING_CRITICAL_BYTES
    # The idle VMs gave memory: they hold less than the 1 GiB they started with.
    assert all(memory.total_bytes < VM_INIT_BYTES for memory in idle)
    assert acted == rising.rebalances() >= 3
    assert rising.sim.with_model(lambda model: model.conservation_error_bytes()) == 0
    assert rising.server.policy is not None
    state = rising.server.policy.state()
    assert state["rebalances_sent"] == acted and state["bytes_moved"] > 0


# The CrOS guest's own demand grows while two 3.5 GiB VMs want ever more, more than the CrOS
# guest can give above its floor: the floor must hold.
GREEDY = Scenario(
    cros_used_bytes=2 * GIB,
    vm_demand={
        0: DemandCurve.of((0, 2 * GIB), (300, 2560 * MIB)),
        1: DemandCurve.of((0, 300 * MIB), (300, 3400 * MIB)),
        2: DemandCurve.of((0, 300 * MIB), (300, 3400 * MIB)),
    },
)


@pytest.fixture
def greedy(tmp_path: Path) -> Iterator[Rig]:
    yield from _rig(tmp_path, GREEDY)


def test_the_cros_guest_never_goes_below_its_floor(greedy: Rig) -> None:
    greedy.start_vm(3584 * MIB)
    greedy.start_vm(3584 * MIB)
    lowest_cros_bytes = greedy.memory(0).total_bytes
    for _ in range(40):
        greedy.clock.advance(10)
        greedy.server.run_policy_tick()
        lowest_cros_bytes = min(lowest_cros_bytes, greedy.memory(0).total_bytes)
    assert greedy.rebalances() > 0, "the VMs asked for memory and got some"
    assert greedy.memory(1).total_bytes > VM_INIT_BYTES
    assert greedy.memory(1).available_bytes < SIBLING_CRITICAL_BYTES, "they wanted more"
    assert lowest_cros_bytes >= CROS_FLOOR_BYTES
    # And it gave what it could: it ended within one step of its floor.
    assert lowest_cros_bytes < CROS_FLOOR_BYTES + 256 * MIB


def test_nothing_moves_while_a_start_is_pending(rising: Rig) -> None:
    rising.start_vm()
    rising.start_vm()
    rising.clock.advance(400)  # VM 1 is far under its margin now
    prepared = rising.stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES)
    )
    for _ in range(3):
        rising.clock.advance(10)
        decision = rising.server.run_policy_tick()
        assert not decision.acted and decision.reason == "a VM start is pending"
    assert rising.rebalances() == 0
    rising.stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id))
    decision = rising.server.run_policy_tick()
    assert decision.acted, decision.reason
    assert decision.planned[1] < 0
    assert rising.rebalances() == 1


def test_the_policy_runs_by_itself_every_period_and_is_off_by_default(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text("period_s = 0.05\n")
    server = start_server(policy="balance-available", policy_config_path=str(config))
    try:
        assert server.policy is not None
        policy = server.policy
        wait_until(lambda: len(policy.recent()) >= 3, "three decisions taken by the loop task")
        assert policy.state()["decisions"] >= 3
    finally:
        server.stop(grace_s=1.0)
    # Shutdown ended the policy's task: no decision, and no rebalance, after it.
    assert policy._task is not None and policy._task.done()
    plain = start_server()
    try:
        assert plain.policy is None
        with pytest.raises(RuntimeError, match="no policy"):
            plain.run_policy_tick()
    finally:
        plain.stop(grace_s=1.0)


def test_each_policy_decision_is_one_event_with_its_inputs_and_outcome(rising: Rig) -> None:
    rising.start_vm()
    rising.start_vm()
    decisions = []
    for _ in range(4):
        rising.clock.advance(100)
        decisions.append(rising.server.run_policy_tick())
    assert any(decision.acted for decision in decisions)
    with Client(rising.server.address) as client:
        events = [e for e in recorded_events(client) if e.kind == pb.EVENT_KIND_POLICY_DECISION]
    assert len(events) == len(decisions)
    for event, decision in zip(events, decisions, strict=True):
        assert event.caller.origin == "policy"
        details = json_format.MessageToDict(event.details)
        assert details["inputs"]["policy_sequence"] == decision.sequence
        assert [vm["vm_id"] for vm in details["inputs"]["vms"]] == [vm.vm_id for vm in decision.vms]
        action = details["action"]
        assert (action["acted"], action["reason"]) == (decision.acted, decision.reason)
        assert {int(vm): d for vm, d in action["actual_deltas"].items()} == dict(decision.actual)
