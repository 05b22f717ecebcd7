"""GetBalloonStats coalescing: concurrent callers share one mms read, but never a stale one.

Each caller must get exactly the ids it asked for, read by an mms round trip that started after
its request arrived; N concurrent callers must cost far fewer than N round trips.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import GetBalloonStatsRequest, MessageType
from manatee_grpc.sim import Simulator

from .conftest import start_server
from .helpers import wait_until as _wait_until

MIB = 1 << 20
CALL_TIMEOUT_S = 10.0


def _sim(server: ManateeServer) -> Simulator:
    assert server.simulator is not None
    return server.simulator


def _stats_reads(server: ManateeServer) -> int:
    return _sim(server).request_counts[MessageType.GET_BALLOON_STATS]


def _start_vms(stub: pb_grpc.MemoryServiceStub, count: int) -> list[int]:
    vm_ids: list[int] = []
    for _ in range(count):
        prepared = stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=256 * MIB), timeout=CALL_TIMEOUT_S
        )
        assert prepared.reserved
        stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=CALL_TIMEOUT_S)
        vm_ids.append(prepared.vm_id)
    return vm_ids


@pytest.fixture
def coalescing_server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def coalescing_stub(coalescing_server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(coalescing_server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


def test_concurrent_callers_each_get_exactly_their_ids(
    coalescing_server: ManateeServer, coalescing_stub: pb_grpc.MemoryServiceStub
) -> None:
    vm_a, vm_b, vm_c = _start_vms(coalescing_stub, 3)
    _sim(coalescing_server).set_latency(0.05)
    unknown = 4000
    asks: list[list[int]] = [
        [0],
        [vm_a],
        [vm_c, vm_a],
        [vm_b, unknown],
        [unknown],
        [0, vm_a, vm_b, vm_c],
    ] * 4
    calls = [
        coalescing_stub.GetBalloonStats.future(
            pb.GetBalloonStatsRequest(vm_ids=ids), timeout=CALL_TIMEOUT_S
        )
        for ids in asks
    ]
    for ids, call in zip(asks, calls, strict=True):
        response = call.result()
        assert [entry.vm_id for entry in response.stats] == [i for i in ids if i != unknown]
        assert list(response.missing_vm_ids) == [i for i in ids if i == unknown]
    # Shared reads, yet fewer than one per caller.
    assert _stats_reads(coalescing_server) < len(asks)


def test_caller_arriving_during_a_read_is_served_by_the_next_read(
    coalescing_server: ManateeServer, coalescing_stub: pb_grpc.MemoryServiceStub
) -> None:
    (vm_a,) = _start_vms(coalescing_stub, 1)
    sim = _sim(coalescing_server)
    sim.set_latency(0.3)
    reads_before = _stats_reads(coalescing_server)

    first = coalescing_stub.GetBalloonStats.future(
        pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S
    )
    # The first read is now on the wire (mms counts requests on arrival, before its latency).
    _wait_until(lambda: _stats_reads(coalescing_server) == reads_before + 1)
    second_sent_unix_s = time.time()
    second = coalescing_stub.GetBalloonStats.future(
        pb.GetBalloonStatsRequest(vm_ids=[vm_a]), timeout=CALL_TIMEOUT_S
    )
    first_response = first.result()
    second_response = second.result()

    assert _stats_reads(coalescing_server) == reads_before + 2
    stats_requests = [r for r in sim.requests if isinstance(r, GetBalloonStatsRequest)]
    # The in-flight read was not widened after it was sent; the second caller got its own.
    assert stats_requests[-2].vm_ids == (0,)
    assert stats_requests[-1].vm_ids == (vm_a,)
    assert [entry.vm_id for entry in first_response.stats] == [0]
    assert [entry.vm_id for entry in second_response.stats] == [vm_a]
    assert second_response.read_time.ToDatetime().timestamp() >= second_sent_unix_s
    assert second_response.read_time.ToNanoseconds() > first_response.read_time.ToNanoseconds()


def _concurrent_reads(server: ManateeServer, callers: int) -> int:
    """mms GetBalloonStats round trips caused by ``callers`` concurrent RPCs."""
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)  # channel connected
        before = _stats_reads(server)
        calls = [
            stub.GetBalloonStats.future(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
            for _ in range(callers)
        ]
        for call in calls:
            assert [entry.vm_id for entry in call.result().stats] == [0]
        return _stats_reads(server) - before


def test_concurrent_callers_cause_far_fewer_mms_reads() -> None:
    callers = 32
    server = start_server()
    try:
        _sim(server).set_latency(0.05)
        reads = _concurrent_reads(server, callers)
    finally:
        server.stop(grace_s=1.0)
    assert 1 <= reads <= callers // 4


def test_without_coalescing_every_caller_reads() -> None:
    callers = 16
    server = start_server(coalesce_stats=False)
    try:
        _sim(server).set_latency(0.01)
        reads = _concurrent_reads(server, callers)
    finally:
        server.stop(grace_s=1.0)
    assert reads == callers
