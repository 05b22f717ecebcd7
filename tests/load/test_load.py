"""Load and soak: 64 clients of every RPC against a real server process, loopback only.

The run must end with no status outside ``EXPECTED``, every RPC kind exercised, memory conserved
(through the public API and in mms's own books), and the server's threads, fds and RSS as flat in
the last window as in the first. ``make test`` runs it for 5 s; ``make soak`` for 60 s.
"""

from __future__ import annotations

import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from manatee_grpc import Client, ServerConfig
from manatee_grpc.sim import Simulator

from ._driver import (
    EXPECTED,
    LOAD_SCENARIO,
    LoadConfig,
    LoadReport,
    fill_handler_threads,
    public_conservation,
    remove_all,
    run_load,
    settle,
)
from ._process import ResourceSampler, Sample, ServerProcess, WindowMedians, window_medians

MIB = 1024 * 1024
# Growth allowed from the first window's median to the last's. Every call waits on the server's
# event loop (no handler pool), so only gRPC's own threads may come and go. A leak of one thread,
# fd or KiB per launch, watch or bare start would exceed these.
THREADS_TOLERANCE = 8
# More calls parked at once than --max-workers once gave threads: they must leave none behind.
FILL_CALLS = ServerConfig().max_workers + 8
FDS_TOLERANCE = 2


@dataclass(frozen=True, slots=True)
class Shape:
    duration_s: float
    # The first window starts this late: the clients are still connecting before.
    warmup_s: float
    window_s: float
    sample_interval_s: float
    # CPython keeps the arenas it has used, so RSS creeps up a little before it levels off.
    rss_tolerance_bytes: int


SHORT = Shape(
    duration_s=5.0,
    warmup_s=0.5,
    window_s=1.5,
    sample_interval_s=0.1,
    rss_tolerance_bytes=4 * MIB,
)
SOAK = Shape(
    duration_s=60.0,
    warmup_s=0.5,
    window_s=10.0,
    sample_interval_s=1.0,
    rss_tolerance_bytes=8 * MIB,
)


def _resources_line(name: str, first: WindowMedians, last: WindowMedians) -> str:
    return (
        f"{name}: threads {first.threads:g} -> {last.threads:g}, fds {first.fds:g} -> "
        f"{last.fds:g}, RSS {first.rss_bytes / MIB:.1f} -> {last.rss_bytes / MIB:.1f} MiB "
        f"({first.samples} and {last.samples} samples)"
    )


def _check_statuses(report: LoadReport) -> None:
    assert report.unexpected() == {}, "\n".join(report.unexpected_examples + report.lines())
    calls = report.calls_by_rpc()
    # Every RPC kind ran, and each succeeded at least once: the mix really was mixed.
    assert set(calls) == set(EXPECTED), calls
    for rpc in EXPECTED:
        assert report.outcomes[(rpc, "OK", "")] > 0, f"{rpc} never succeeded"
    # Contention and faults really happened, or the expected list proves nothing.
    assert report.outcomes[("RemoveVm", "NOT_FOUND", "VM_NOT_FOUND")] > 0
    assert report.outcomes[("LaunchVm", "CLIENT_CANCELLED", "")] > 0
    assert report.outcomes[("LaunchVm", "FAILED_PRECONDITION", "VM_START_FAILED")] > 0
    # No more crosvm connect failures than were injected (each needs its stop_vm or RemoveVm).
    eio = sum(count for (_, code, reason), count in report.outcomes.items() if reason == "MMS_EIO")
    assert 0 < eio <= report.faults_armed
    assert (
        report.stop_vm_callbacks == report.outcomes[("LaunchVm", "FAILED_PRECONDITION", "MMS_EIO")]
    )


def _check_flat(samples: list[Sample], shape: Shape, summary: list[str]) -> None:
    first = window_medians(samples, shape.warmup_s, shape.warmup_s + shape.window_s)
    last = window_medians(samples, shape.duration_s - shape.window_s, shape.duration_s)
    line = _resources_line(f"server, first vs last {shape.window_s:g} s", first, last)
    summary.append(line)
    assert last.threads <= first.threads + THREADS_TOLERANCE, line
    assert last.fds <= first.fds + FDS_TOLERANCE, line
    assert last.rss_bytes <= first.rss_bytes + shape.rss_tolerance_bytes, line


def _check_conservation(
    client: Client, simulator: Simulator, cros_before_bytes: int, summary: list[str]
) -> None:
    settle(client, simulator)
    public = public_conservation(client)
    summary.append(
        f"conservation: {len(public.running_vm_ids)} VMs left, CrOS balloon "
        f"{public.cros_balloon_bytes / MIB:.1f} MiB, sibling footprints "
        f"{public.sibling_footprint_bytes / MIB:.1f} MiB"
    )
    assert public.error_bytes == 0, public
    assert simulator.with_model(lambda model: model.conservation_error_bytes()) == 0
    assert simulator.with_model(lambda model: model.unbalanced_bytes) == 0
    # The server's books and mms agree on which VMs exist.
    sim_vm_ids = simulator.with_model(lambda model: tuple(sorted(model.siblings())))
    assert public.running_vm_ids == sim_vm_ids
    # Removing what is left gives the CrOS guest back every byte it lent.
    remove_all(client, public.running_vm_ids)
    settle(client, simulator)
    assert [vm.vm_id for vm in client.list_vms().vms] == [0]
    assert client.get_balloon_stats([0]).stats[0].balloon_actual_bytes == cros_before_bytes
    assert simulator.with_model(lambda model: model.conservation_error_bytes()) == 0


def run_load_test(shape: Shape, summary: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="manatee-load-") as tmp:
        mms = f"unix://{Path(tmp) / 'mms.sock'}"
        with Simulator(LOAD_SCENARIO, listen=mms) as simulator, ServerProcess(mms) as server:
            with Client(server.address, timeout_s=20.0) as client:
                cros_before_bytes = client.get_balloon_stats([0]).stats[0].balloon_actual_bytes
                fill = fill_handler_threads(server.address, FILL_CALLS)
                assert set(fill) == {"DEADLINE_EXCEEDED"}, fill
                settle(client, simulator)
                sampler = ResourceSampler(server.pid, shape.sample_interval_s).start()
                try:
                    report = run_load(
                        server.address, LoadConfig(duration_s=shape.duration_s), simulator
                    )
                finally:
                    samples = sampler.stop()
                summary.extend(report.lines())
                _check_statuses(report)
                _check_flat(samples, shape, summary)
                _check_conservation(client, simulator, cros_before_bytes, summary)
            # After all that, the server still shuts down cleanly.
            server.send_signal(signal.SIGTERM)
            assert server.wait_exit(30.0) == 0, server.log()


def test_load_5s(load_summary: list[str]) -> None:
    run_load_test(SHORT, load_summary)


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_60s(load_summary: list[str]) -> None:
    run_load_test(SOAK, load_summary)
