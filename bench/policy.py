"""``python -m bench.policy`` (``make demo``, also run by ``make bench``): does the policy earn
its place?

One scripted workload (four VMs with phased demand and a busy CrOS guest, six simulated minutes)
is run three ways on a real server and the simulator: **no balancing** (each VM keeps the 1 GiB
it started with), a **fixed split** (the CrOS guest's memory above its floor shared out evenly
once, at the start) and **the policy** (``serve --policy balance-available``). For each: the share
of time each VM spent below its critical margin, the bytes moved and the mms rebalances sent.

The workload runs on a ManualClock: every simulated second the clock moves on and each guest's
available memory is sampled (from the simulator's model, so sampling sends nothing to mms); every
policy period the policy runs once (``run_policy_tick``). Six minutes take a few seconds and every
run gives the same numbers. Writes the table to stdout and a plot to ``docs/policy.png``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import tomllib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from manatee_grpc import ManateeServer, ServerConfig
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.core._policy import PolicySettings
from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES
from manatee_grpc.mms._messages import CROS_GUEST_VM_ID, MessageType
from manatee_grpc.sim import DemandCurve, ManualClock, Scenario, Simulator

GIB = 1024 * MIB
PLOT_PATH = Path(__file__).resolve().parents[1] / "docs" / "policy.png"
DURATION_S = 360
SAMPLE_S = 1.0
VM_MEM_BYTES = 2 * GIB
VM_INIT_BYTES = 1 * GIB
VM_COUNT = 4
MODES = ("no balancing", "fixed split", "policy")

# The policy's settings for the run: the defaults, with the CrOS floor of this device.
POLICY_TOML = """
period_s = 5
max_step_bytes = "256MiB"
[cros]
critical_bytes = "512MiB"
floor_bytes = "2.75GiB"
[siblings]
critical_bytes = "128MiB"
floor_bytes = "256MiB"
"""
SETTINGS = PolicySettings.from_mapping(tomllib.loads(POLICY_TOML), source="bench policy")


def _phase(
    idle_bytes: int, busy_bytes: int, rise_s: float, top_s: float, fall_s: float
) -> DemandCurve:
    """Idle, a ramp up to ``busy_bytes`` from ``rise_s`` to ``top_s``, a drop at ``fall_s``."""
    return DemandCurve.of(
        (0, idle_bytes),
        (rise_s, idle_bytes),
        (top_s, busy_bytes),
        (fall_s, busy_bytes),
        (fall_s + 15, idle_bytes),
    )


# Each VM has its busy phase in turn; VM 4 also spikes; the CrOS guest is busy in the middle.
WORKLOAD = Scenario(
    cros_used_bytes=2560 * MIB,
    vm_demand={
        CROS_GUEST_VM_ID: _phase(2560 * MIB, 3072 * MIB, 150, 180, 250),
        1: _phase(250 * MIB, 1700 * MIB, 10, 60, 110),
        2: _phase(300 * MIB, 1800 * MIB, 100, 150, 200),
        3: _phase(250 * MIB, 1650 * MIB, 210, 250, 310),
        4: DemandCurve.of(
            (0, 600 * MIB),
            (140, 600 * MIB),
            (140, 1300 * MIB),
            (165, 1300 * MIB),
            (165, 600 * MIB),
        ),
    },
    demand_jitter_bytes=16 * MIB,
    workload_seed=15,
)


@dataclass
class Run:
    mode: str
    times_s: list[float] = field(default_factory=list)
    # vm_id -> available bytes at each sample
    available: dict[int, list[int]] = field(default_factory=dict)
    below: dict[int, int] = field(default_factory=dict)
    move_times_s: list[float] = field(default_factory=list)
    bytes_moved: int = 0
    rebalances: int = 0

    def below_share(self, vm_id: int) -> float:
        return self.below.get(vm_id, 0) / max(1, len(self.times_s))

    @property
    def worst_share(self) -> float:
        return max(self.below_share(vm_id) for vm_id in self.available)

    @property
    def mean_share(self) -> float:
        return sum(self.below_share(v) for v in self.available) / max(1, len(self.available))


@contextmanager
def _rig(workdir: Path, mode: str) -> Iterator[tuple[ManualClock, Simulator, ManateeServer]]:
    clock = ManualClock()
    sim = Simulator(WORKLOAD, listen=f"unix://{workdir}/{mode.replace(' ', '-')}.sock", clock=clock)
    sim.start()
    config_path = workdir / "policy.toml"
    config_path.write_text(POLICY_TOML)
    server = ManateeServer(
        ServerConfig(
            listen="127.0.0.1:0",
            mms=str(sim.address),
            policy="balance-available" if mode == "policy" else None,
            policy_config_path=str(config_path) if mode == "policy" else None,
        )
    ).start()
    try:
        assert server.connection is not None and server.connection.wait_connected(10.0)
        yield clock, sim, server
    finally:
        server.stop(grace_s=1.0)
        sim.stop()


def _start_vms(stub: pb_grpc.MemoryServiceStub) -> list[int]:
    vm_ids = []
    for _ in range(VM_COUNT):
        prepared = stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES)
        )
        stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id))
        vm_ids.append(prepared.vm_id)
    return vm_ids


def _fixed_split(stub: pb_grpc.MemoryServiceStub, sim: Simulator, vm_ids: list[int]) -> int:
    """Once: the CrOS guest keeps its peak demand and its margin, the VMs share the rest evenly.

    The best static split that keeps the CrOS guest healthy; what it leaves the VMs is all a
    split fixed in advance can give them, since their peaks (at different times) add up to more
    than the device has.
    """
    cros = sim.with_model(lambda model: model.guest_memory(CROS_GUEST_VM_ID))
    assert cros is not None
    cros_peak_bytes = max(b for _, b in WORKLOAD.vm_demand[CROS_GUEST_VM_ID].points)
    keep_bytes = max(
        SETTINGS.cros.floor_bytes,
        cros_peak_bytes + WORKLOAD.demand_jitter_bytes + SETTINGS.cros.critical_bytes,
    )
    spare_bytes = max(0, cros.total_bytes - keep_bytes)
    share_bytes = spare_bytes // len(vm_ids) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES
    answer = stub.RebalanceMemory(
        pb.RebalanceMemoryRequest(
            deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=-share_bytes) for vm_id in vm_ids]
        )
    )
    return sum(delta.delta_bytes for delta in answer.actual_deltas if delta.delta_bytes > 0)


def run(mode: str, workdir: Path) -> Run:
    result = Run(mode)
    with (
        _rig(workdir, mode) as (clock, sim, server),
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.MemoryServiceStub(channel)
        vm_ids = [CROS_GUEST_VM_ID, *_start_vms(stub)]
        if mode == "fixed split":
            result.bytes_moved = _fixed_split(stub, sim, vm_ids[1:])
        period_samples = round(SETTINGS.period_s / SAMPLE_S)
        for step in range(round(DURATION_S / SAMPLE_S)):
            clock.advance(SAMPLE_S)
            now_s = (step + 1) * SAMPLE_S
            if mode == "policy" and (step + 1) % period_samples == 0:
                decision = server.run_policy_tick()
                if decision.acted:
                    result.move_times_s.append(now_s)
            result.times_s.append(now_s)
            memories = sim.with_model(lambda model: [model.guest_memory(v) for v in vm_ids])
            for vm_id, memory in zip(vm_ids, memories, strict=True):
                assert memory is not None
                result.available.setdefault(vm_id, []).append(memory.available_bytes)
                critical = SETTINGS.limits_for(vm_id).critical_bytes
                if memory.available_bytes < critical:
                    result.below[vm_id] = result.below.get(vm_id, 0) + 1
        result.rebalances = sim.request_counts[MessageType.REBALANCE_MEMORY]
        if server.policy is not None:
            result.bytes_moved = server.policy.bytes_moved
    return result


def _name(vm_id: int) -> str:
    return "CrOS" if vm_id == CROS_GUEST_VM_ID else f"VM {vm_id}"


def table(runs: Mapping[str, Run]) -> str:
    vm_ids = sorted(next(iter(runs.values())).available)
    header = ["how", *(f"{_name(v)} below" for v in vm_ids), "worst", "bytes moved", "rebalances"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run_ in runs.values():
        cells = [
            run_.mode,
            *(f"{run_.below_share(v):.0%}" for v in vm_ids),
            f"{run_.worst_share:.0%}",
            f"{run_.bytes_moved / MIB:,.0f} MiB",
            str(run_.rebalances),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(runs: Mapping[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True)
    for axis, run_ in zip(axes, runs.values(), strict=True):
        for vm_id, series in sorted(run_.available.items()):
            axis.plot(run_.times_s, [b / MIB for b in series], label=_name(vm_id), linewidth=1.2)
        axis.axhline(SETTINGS.siblings.critical_bytes / MIB, color="grey", linestyle="--")
        axis.axhline(SETTINGS.cros.critical_bytes / MIB, color="grey", linestyle=":")
        for move_s in run_.move_times_s:
            axis.axvline(move_s, color="tab:red", alpha=0.15, linewidth=1)
        title = f"{run_.mode}: worst VM below its margin {run_.worst_share:.0%} of the time"
        if run_.move_times_s:
            title += f"; {len(run_.move_times_s)} policy moves (red)"
        axis.set_title(title, fontsize=10)
        axis.set_ylabel("available MiB")
        axis.set_ylim(bottom=0)
    axes[0].legend(loc="upper right", ncol=5, fontsize=8)
    axes[-1].set_xlabel(
        "simulated seconds (dashed: sibling critical margin, dotted: CrOS critical margin)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run_all() -> dict[str, Run]:
    with tempfile.TemporaryDirectory(prefix="manatee-policy-bench-") as workdir:
        return {mode: run(mode, Path(workdir)) for mode in MODES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy", description=__doc__)
    parser.add_argument("--plot", type=Path, default=PLOT_PATH, help="where to write the PNG")
    parser.add_argument("--no-plot", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)  # the servers stopping after each run say so
    runs = run_all()
    print(
        f"policy benchmark: {VM_COUNT} VMs of {VM_MEM_BYTES // MIB} MiB "
        f"({VM_INIT_BYTES // MIB} MiB at start), {DURATION_S} simulated s, "
        f"policy every {SETTINGS.period_s:g} s; share of time below the critical margin"
    )
    print(table(runs))
    policy, others = runs["policy"], [runs[m] for m in MODES if m != "policy"]
    beats = all(
        policy.worst_share < o.worst_share and policy.mean_share < o.mean_share for o in others
    )
    print(
        f"policy beats both baselines on time below critical: {'PASS' if beats else 'FAIL'} "
        f"(moved {policy.bytes_moved / MIB:,.0f} MiB in {policy.rebalances} rebalances)"
    )
    if not args.no_plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")
    return 0 if beats else 1


if __name__ == "__main__":
    sys.exit(main())
