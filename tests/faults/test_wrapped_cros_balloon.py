"""Issue 11, end to end: the real simulator wraps VM 0's balloon, and the gRPC API survives it.

The simulator follows upstream mms: after the issue's five requests (case 2, sent over a raw mms
connection by ``wrapped_cros``, since the server cannot send their unbalanced deltas) and a
hang-up, every stats answer reports VM 0's ``balloon_actual`` as a wrapped u64. Only then does
the gRPC server dial the same simulator. Through gRPC: VM 0 is unreadable (WRAPPED), a sibling
launched through the server is served, the connection is the one the server dialled, health
stays SERVING, a metric counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import health_status
from metrics.conftest import scrape_until

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.sim import Simulator

from .helpers import CALL_TIMEOUT_S, SERVICE_NAME, SERVING, start_vm, watch_snapshots
from .wrapped_cros import (
    ALLOCATION_BYTES,
    ISSUE_DEVICE,
    WRAPPED_AFTER_HANG_UP,
    wrap_the_cros_balloon,
)

# A sibling small enough that its reservation leaves the CrOS balloon below the allocation (so
# VM 0 stays wrapped while the sibling runs): 64 MiB, 4 MiB of it at start.
SIBLING_MEM_BYTES = 64 * MIB
SIBLING_INIT_BYTES = 4 * MIB
SIBLING_RESERVED_BYTES = SIBLING_INIT_BYTES + extra_bytes(SIBLING_MEM_BYTES)
WRAPPED_WITH_SIBLING = 2**64 - (ALLOCATION_BYTES - SIBLING_RESERVED_BYTES)


@dataclass
class Device:
    sim: Simulator
    server: ManateeServer
    channel: grpc.Channel
    stub: pb_grpc.MemoryServiceStub
    session: str
    sibling_id: int

    def assert_untouched(self) -> None:
        """Still the stream the server dialled: no reset, no redial, VM 0 and the sibling kept."""
        assert self.sim.connections_accepted == 2  # the raw client's, then the server's
        assert self.sim.connections_closed == 1  # only the raw client's
        listed = self.stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
        assert listed.session == self.session
        assert [vm.vm_id for vm in listed.vms] == [0, self.sibling_id]
        assert health_status(self.channel, SERVICE_NAME) == SERVING


@pytest.fixture
def device() -> Iterator[Device]:
    with Simulator(ISSUE_DEVICE) as sim:
        wrap_the_cros_balloon(sim)
        server = start_server(mms=str(sim.address), metrics_listen="127.0.0.1:0")
        try:
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.MemoryServiceStub(channel)
                session = stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S).session
                # Only VM 0 is left after the hang-up, and its balloon is wrapped already.
                alone = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
                assert list(alone.stats) == []
                assert [(u.vm_id, u.reason, u.mms_value) for u in alone.unreadable_vms] == [
                    (0, pb.UNREADABLE_REASON_WRAPPED, str(WRAPPED_AFTER_HANG_UP))
                ]
                # A sibling, launched through the server on the same stream.
                sibling_id = start_vm(stub, SIBLING_MEM_BYTES, SIBLING_INIT_BYTES)
                assert sibling_id == 2
                yield Device(sim, server, channel, stub, session, sibling_id)
        finally:
            server.stop(grace_s=1.0)


def test_the_simulators_wrapped_cros_balloon_through_grpc(device: Device) -> None:
    expected_unreadable = [
        pb.UnreadableVm(
            vm_id=0,
            reason=pb.UNREADABLE_REASON_WRAPPED,
            mms_field="balloon_actual",
            mms_value=str(WRAPPED_WITH_SIBLING),
        )
    ]
    # The simulator's own record agrees: crosvm's CrOS balloon is below the allocation.
    assert device.sim.with_model(lambda m: m.cros_balloon_bytes) == (
        SIBLING_RESERVED_BYTES - ALLOCATION_BYTES
    )

    for request in (
        pb.GetBalloonStatsRequest(vm_ids=[0, device.sibling_id]),
        pb.GetBalloonStatsRequest(),  # every VM the server knows
    ):
        response = device.stub.GetBalloonStats(request, timeout=CALL_TIMEOUT_S)
        # The sibling's stats are served, read from the simulator's guest.
        assert [entry.vm_id for entry in response.stats] == [device.sibling_id]
        sibling = response.stats[0]
        assert sibling.balloon_actual_bytes == SIBLING_MEM_BYTES - SIBLING_INIT_BYTES
        assert sibling.total_memory_bytes > 0
        assert list(response.missing_vm_ids) == [0]
        assert list(response.unreadable_vms) == expected_unreadable
        assert response.session == device.session

    device.assert_untouched()
    # The alone read in the fixture and the two reads here: three wrapped VM 0 entries.
    assert device.server.metrics_address is not None
    scrape_until(
        device.server.metrics_address,
        lambda s: s.value("manatee_mms_unreadable_vm_stats_total", reason="wrapped") == 3,
        "3 wrapped entries counted",
    )
    # And the stream still carries a rebalance (sibling inflates 1 MiB, CrOS guest deflates).
    rebalanced = device.stub.RebalanceMemory(
        pb.RebalanceMemoryRequest(
            deltas=[pb.BalloonDelta(vm_id=device.sibling_id, delta_bytes=MIB)]
        ),
        timeout=CALL_TIMEOUT_S,
    )
    assert [(d.vm_id, d.delta_bytes) for d in rebalanced.actual_deltas] == [
        (device.sibling_id, MIB),
        (0, -MIB),
    ]
    assert rebalanced.fully_applied
    device.assert_untouched()


def test_a_watch_on_the_simulators_wrapped_cros_balloon(device: Device) -> None:
    for snapshot in watch_snapshots(device.stub, 3):
        assert [entry.vm_id for entry in snapshot.stats] == [device.sibling_id]
        assert list(snapshot.missing_vm_ids) == [0]
        assert [(u.vm_id, u.reason, u.mms_value) for u in snapshot.unreadable_vms] == [
            (0, pb.UNREADABLE_REASON_WRAPPED, str(WRAPPED_WITH_SIBLING))
        ]
        assert snapshot.session == device.session
    device.assert_untouched()
