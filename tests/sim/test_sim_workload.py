"""Workloads in the simulator: demand curves move each guest's use over (scaled) time, and the
stats a guest reports follow its demand and its balloon."""

from __future__ import annotations

from pathlib import Path

import pytest

from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    PrepareVmRequest,
    RebalanceMemoryRequest,
)
from manatee_grpc.sim import DemandCurve, ManualClock, MmsModel, Scenario, ScenarioError, Simulator
from manatee_grpc.sim._scenario import GIB


def test_a_curve_is_steps_ramps_and_spikes() -> None:
    curve = DemandCurve.of(
        (0, 100 * MIB),
        (10, 100 * MIB),
        (10, 300 * MIB),  # a step at 10 s
        (20, 500 * MIB),  # a ramp to 20 s
        (30, 500 * MIB),
        (30, 900 * MIB),  # a spike from 30 s to 32 s
        (32, 900 * MIB),
        (32, 500 * MIB),
    )
    assert curve.used_bytes_at(-1) == 100 * MIB
    assert curve.used_bytes_at(9.9) == 100 * MIB
    assert curve.used_bytes_at(10) == 300 * MIB
    assert curve.used_bytes_at(15) == 400 * MIB
    assert curve.used_bytes_at(31) == 900 * MIB
    assert curve.used_bytes_at(32) == 500 * MIB
    assert curve.used_bytes_at(1000) == 500 * MIB


def test_a_curve_must_not_go_back_in_time() -> None:
    with pytest.raises(ScenarioError, match="go back"):
        DemandCurve.of((10, 0), (5, 0))
    with pytest.raises(ScenarioError, match="at least one"):
        DemandCurve(())


def _started_model(scenario: Scenario, mem_size_bytes: int = 2 * GIB) -> MmsModel:
    model = MmsModel(scenario)
    init_bytes = 1 * GIB
    prepared = model.handle(PrepareVmRequest(mem_size_bytes, init_bytes))
    assert prepared.res == 0
    assert model.handle(FinishAddVmRequest(prepared.vm_id)).res == 0
    return model


def test_stats_follow_the_demand_and_the_balloon() -> None:
    scenario = Scenario(vm_demand={1: DemandCurve.of((0, 200 * MIB), (60, 800 * MIB))})
    model = _started_model(scenario)
    model.set_workload_time(0)
    memory = model.guest_memory(1)
    assert memory is not None
    # 2 GiB VM started with 1 GiB: total 1 GiB, 200 MiB in use.
    assert (memory.total_bytes, memory.available_bytes) == (1 * GIB, 824 * MIB)
    stats = model.handle(GetBalloonStatsRequest((1,))).all_stats[0].stats
    assert stats.free_memory is not None and stats.disk_caches is not None
    assert stats.free_memory + stats.disk_caches == 824 * MIB  # as concierge reads it
    model.set_workload_time(60)
    assert model.guest_memory(1) == type(memory)(1 * GIB, 224 * MIB, 800 * MIB)
    # Deflating its balloon by 256 MiB (from the CrOS guest) makes that much available.
    answer = model.handle(
        RebalanceMemoryRequest((BalloonDelta(1, -256 * MIB), BalloonDelta(0, 256 * MIB)))
    )
    assert {d.vm_id: d.delta_bytes for d in answer.actual_deltas} == {1: -256 * MIB, 0: 256 * MIB}
    assert model.guest_memory(1) == type(memory)(1280 * MIB, 480 * MIB, 800 * MIB)


def test_a_demand_above_the_memory_left_reads_as_nothing_available_and_stops_inflates() -> None:
    scenario = Scenario(
        vm_demand={1: DemandCurve.of((0, 200 * MIB), (1, 200 * MIB), (1, 1200 * MIB))}
    )
    model = _started_model(scenario)
    model.set_workload_time(1)
    memory = model.guest_memory(1)
    assert memory is not None and memory.available_bytes == 0
    answer = model.handle(
        RebalanceMemoryRequest((BalloonDelta(1, 64 * MIB), BalloonDelta(0, -64 * MIB)))
    )
    # The guest cannot give memory it uses: the inflate comes back empty.
    assert {d.vm_id: d.delta_bytes for d in answer.actual_deltas}.get(1, 0) == 0


def test_jitter_is_seeded_and_repeatable() -> None:
    curve = DemandCurve.of((0, 512 * MIB))
    one = Scenario(vm_demand={1: curve}, demand_jitter_bytes=32 * MIB, workload_seed=7)
    two = Scenario(vm_demand={1: curve}, demand_jitter_bytes=32 * MIB, workload_seed=7)
    other = Scenario(vm_demand={1: curve}, demand_jitter_bytes=32 * MIB, workload_seed=8)
    samples = [one.demand_bytes_at(1, t) for t in range(20)]
    assert samples == [two.demand_bytes_at(1, t) for t in range(20)]
    assert samples != [other.demand_bytes_at(1, t) for t in range(20)]
    assert all(s is not None and abs(s - 512 * MIB) <= 32 * MIB for s in samples)
    assert len(set(samples)) > 1


def test_a_workload_reads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "workload.toml"
    path.write_text(
        'workload_time_scale = 60\nworkload_seed = 3\ndemand_jitter_bytes = "4MiB"\n'
        '[vm_demand]\n0 = [[0, "2GiB"]]\n2 = [[0, "100MiB"], [30, "1GiB"]]\n'
    )
    scenario = Scenario.from_file(path)
    assert scenario.workload_time_scale == 60
    assert scenario.vm_demand[2] == DemandCurve.of((0, 100 * MIB), (30, 1 * GIB))
    assert scenario.vm_demand[0] == DemandCurve.of((0, 2 * GIB))


def test_the_simulator_runs_the_workload_on_its_clock_scaled() -> None:
    clock = ManualClock()
    scenario = Scenario(
        vm_demand={0: DemandCurve.of((0, 1 * GIB), (600, 3 * GIB))}, workload_time_scale=60
    )
    simulator = Simulator(scenario, clock=clock)
    assert simulator.with_model(lambda model: model.cros_used_bytes) == 1 * GIB
    clock.advance(5)  # 5 s of clock are 300 s of workload: half-way up the ramp
    assert simulator.with_model(lambda model: model.workload_time_s) == 300
    assert simulator.with_model(lambda model: model.cros_used_bytes) == 2 * GIB


def test_the_readme_workload_example_reads() -> None:
    import re
    import tomllib

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"```toml\n(workload_time_scale.*?)```", readme, re.S)
    assert block is not None
    scenario = Scenario.from_mapping(tomllib.loads(block.group(1)))
    assert scenario.vm_demand[2].used_bytes_at(35) == 1200 * MIB
    assert scenario.vm_demand[0].used_bytes_at(165) == 2816 * MIB
