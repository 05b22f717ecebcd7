"""LaunchVm end to end: a real server and simulator, driven step by step through the stub.

Each test feeds the request stream from a queue, so it answers only after it has seen what the
server sent (``reserved``, ``stop_vm``), the way a real launcher would. Whatever way a launch
ends, the reservation must not outlive it: the tests check the CrOS balloon, ListVms, the
simulator's start state, and that the next launch still gets the one pending start.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from manatee_grpc import SERVICE_NAME, Client, ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.client import DEFAULT_LAUNCH_TIMEOUT_S
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.mms._messages import FinishAddVmRequest, MessageType, PrepareVmRequest
from manatee_grpc.sim import StartState

from .conftest import start_server
from .helpers import (
    bad_request_fields,
    error_info,
    request_count,
    retry_delay_s,
    session_id,
    simulator,
    wait_until,
)
from .test_grpcurl import GRPCURL

# 2 GiB starts with concierge's default of 1000 MiB; the rest begins inside the VM's balloon.
MEM_BYTES = 2048 * MIB
DEFAULT_INIT_BYTES = 1000 * MIB
SMALL_MEM_BYTES = 512 * MIB
SMALL_INIT_BYTES = 256 * MIB
# Close to the CrOS guest's 8 GiB, all of it initial memory: the CrOS guest (2 GiB in use)
# cannot give that much, however often the server asks.
HUGE_BYTES = 7 * 1024 * MIB
RPC_TIMEOUT_S = 10.0
LAUNCH_TIMEOUT_S = 30.0


# --- helpers -------------------------------------------------------------------------------------


def cros_balloon_bytes(stub: pb_grpc.MemoryServiceStub) -> int:
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=RPC_TIMEOUT_S)
    assert [s.vm_id for s in response.stats] == [0]
    return response.stats[0].balloon_actual_bytes


def listed_vm_ids(stub: pb_grpc.MemoryServiceStub) -> list[int]:
    return [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).vms]


def wait_released(server: ManateeServer, stub: pb_grpc.MemoryServiceStub, cros_before: int) -> None:
    """The launch left nothing behind: no VM but the CrOS guest, its balloon as before, the
    pending start free in mms and in the server. Release may finish after the stream ended."""
    wait_until(
        lambda: (
            listed_vm_ids(stub) == [0]
            and cros_balloon_bytes(stub) == cros_before
            and server.bridge.slot.claim is None
        ),
        "the launch's reservation is released",
    )
    sim = simulator(server)
    assert sim.with_model(lambda model: model.start_state) is StartState.IDLE
    assert sim.with_model(lambda model: model.conservation_error_bytes()) == 0


class LaunchClient:
    """One LaunchVm stream; requests go through a queue so the test answers what it has seen."""

    def __init__(self, stub: pb_grpc.MemoryServiceStub, timeout_s: float | None) -> None:
        self._requests: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
        self.call = stub.LaunchVm(self._request_stream(), timeout=timeout_s)

    def _request_stream(self) -> Iterator[pb.LaunchVmRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: pb.LaunchVmRequest) -> None:
        self._requests.put(request)

    def start(self, mem_size_bytes: int, init_mem_size_bytes: int | None = None) -> None:
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes)
        if init_mem_size_bytes is not None:
            start.init_mem_size_bytes = init_mem_size_bytes
        self.send(pb.LaunchVmRequest(start=start))

    def vm_started(self) -> None:
        self.send(pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()))

    def close(self) -> None:
        """Half-close the client's side of the stream."""
        self._requests.put(None)

    def expect(self, kind: str) -> pb.LaunchVmResponse:
        response = next(self.call)
        assert response.WhichOneof("event") == kind, response
        return response

    def expect_reserved(self) -> pb.LaunchVmResponse.Reserved:
        """A first attempt that reserves everything: `reserved` at once, no `progress`."""
        return self.expect("reserved").reserved

    def expect_ok_end(self) -> None:
        with pytest.raises(StopIteration):
            next(self.call)
        assert self.call.code() == grpc.StatusCode.OK

    def expect_error(self) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            response = next(self.call)
            raise AssertionError(f"expected the stream to fail, got {response}")
        return caught.value


@contextmanager
def launch(
    stub: pb_grpc.MemoryServiceStub, timeout_s: float | None = LAUNCH_TIMEOUT_S
) -> Iterator[LaunchClient]:
    client = LaunchClient(stub, timeout_s)
    try:
        yield client
    finally:
        client.call.cancel()  # a no-op once the stream has ended
        client.close()  # let gRPC's request-reading thread finish


def run_launch(
    stub: pb_grpc.MemoryServiceStub,
    mem_size_bytes: int = MEM_BYTES,
    init_mem_size_bytes: int | None = None,
) -> int:
    """A whole successful launch; returns the new VM's id."""
    with launch(stub) as client:
        client.start(mem_size_bytes, init_mem_size_bytes)
        reserved = client.expect_reserved()
        client.vm_started()
        launched = client.expect("launched").launched
        client.expect_ok_end()
    assert launched.vm_id == reserved.vm_id
    assert launched.vm.state == pb.VM_STATE_RUNNING
    return launched.vm_id


@pytest.fixture
def slow_retry_server() -> Iterator[ManateeServer]:
    """A server whose launches wait a minute between reservation attempts."""
    server = start_server(launch_attempt_delays_s=(0.0, 60.0, 60.0, 60.0, 60.0))
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def slow_retry_stub(slow_retry_server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(slow_retry_server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


# --- success -------------------------------------------------------------------------------------


def test_launch_reserves_then_launches_once_the_client_started_the_vm(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    # No deadline, as a launcher holding the stream for a VM's lifetime start would have.
    with launch(stub, timeout_s=None) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        assert reserved.vm_id == 1
        assert reserved.balloon_control_path == "/run/mms_control_1.sock"
        # Reserved, not started: the CrOS guest gave the initial memory plus mms's overhead.
        assert cros_balloon_bytes(stub) - cros_before == DEFAULT_INIT_BYTES + extra_bytes(MEM_BYTES)
        starting = stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).vms
        assert [(vm.vm_id, vm.state) for vm in starting] == [
            (0, pb.VM_STATE_RUNNING),
            (1, pb.VM_STATE_STARTING),
        ]
        assert request_count(server, MessageType.FINISH_ADD_VM) == 0  # waits for the client

        client.vm_started()
        launched = client.expect("launched").launched
        client.expect_ok_end()

    assert launched.vm_id == 1
    assert (launched.vm.vm_id, launched.vm.state) == (1, pb.VM_STATE_RUNNING)
    assert launched.vm.mem_size_bytes == MEM_BYTES
    assert launched.vm.init_mem_size_bytes == DEFAULT_INIT_BYTES
    listed = stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S)
    assert [(vm.vm_id, vm.state, vm.cros_guest) for vm in listed.vms] == [
        (0, pb.VM_STATE_RUNNING, True),
        (1, pb.VM_STATE_RUNNING, False),
    ]
    assert cros_balloon_bytes(stub) - cros_before == DEFAULT_INIT_BYTES + extra_bytes(MEM_BYTES)
    stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[1]), timeout=RPC_TIMEOUT_S)
    assert stats.stats[0].balloon_actual_bytes == MEM_BYTES - DEFAULT_INIT_BYTES
    assert simulator(server).with_model(lambda model: sorted(model.siblings())) == [1]


# --- failures that release the reservation -------------------------------------------------------


def test_launch_that_cannot_reserve_is_resource_exhausted_and_leaves_nothing(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    scenario = simulator(server).with_model(lambda model: model.scenario)
    # The CrOS balloon can grow until only its used memory is left in the guest.
    reservable_bytes = (
        scenario.cros_mem_size_bytes
        - scenario.cros_used_bytes
        - scenario.cros_internal_allocation_bytes
    )
    expected_shortfall_bytes = HUGE_BYTES + extra_bytes(HUGE_BYTES) - reservable_bytes
    with launch(stub) as client:
        client.start(HUGE_BYTES, HUGE_BYTES)
        progress = [client.expect("progress").progress for _ in range(5)]
        error = client.expect_error()

    assert [p.attempt for p in progress] == [1, 2, 3, 4, 5]
    assert [p.shortfall_bytes for p in progress] == [expected_shortfall_bytes] * 5
    assert [p.HasField("next_attempt_delay") for p in progress] == [True] * 4 + [False]
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert (info.reason, info.domain) == ("MMS_ENOMEM", "manatee.memory.v1")
    assert info.metadata["shortfallBytes"] == str(expected_shortfall_bytes)
    assert info.metadata["vmId"] == "1"
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.PREPARE_VM) == 5
    assert request_count(server, MessageType.REMOVE_VM) == 1
    assert request_count(server, MessageType.FINISH_ADD_VM) == 0

    # The pending start is free again: a launch that fits succeeds (ids are never reused).
    assert run_launch(stub) == 2


def test_vm_start_failed_is_failed_precondition_and_releases(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        assert cros_balloon_bytes(stub) > cros_before
        client.send(
            pb.LaunchVmRequest(
                vm_start_failed=pb.LaunchVmRequest.VmStartFailed(reason="crosvm: no kernel")
            )
        )
        error = client.expect_error()

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "VM_START_FAILED"
    assert info.metadata["vmId"] == str(reserved.vm_id)
    assert "crosvm: no kernel" in (error.details() or "")
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.FINISH_ADD_VM) == 0
    assert request_count(server, MessageType.REMOVE_VM) == 1
    assert run_launch(stub) == reserved.vm_id + 1


def test_finish_add_vm_failure_asks_the_client_to_stop_then_removes_the_vm(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    sim.set_crosvm_connect_timeout(0.05)  # mms's 10 s wait for crosvm, shortened
    sim.fail_crosvm_connect(count=1)
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        client.vm_started()
        stop = client.expect("stop_vm").stop_vm
        assert stop.vm_id == reserved.vm_id
        assert "FinishAddVm" in stop.reason
        # The client's crosvm may still run: nothing is removed before it says it stopped.
        assert request_count(server, MessageType.REMOVE_VM) == 0
        assert listed_vm_ids(stub) == [0, reserved.vm_id]
        client.send(pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped()))
        error = client.expect_error()

    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(error)
    assert info.reason == "MMS_EIO"
    assert info.metadata["errno"] == "-5"
    assert info.metadata["vmId"] == str(reserved.vm_id)
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.REMOVE_VM) == 1
    assert run_launch(stub) == reserved.vm_id + 1


# --- the client goes away ------------------------------------------------------------------------


def test_cancel_while_retrying_releases_the_partial_reservation(
    slow_retry_server: ManateeServer, slow_retry_stub: pb_grpc.MemoryServiceStub
) -> None:
    server, stub = slow_retry_server, slow_retry_stub
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(HUGE_BYTES, HUGE_BYTES)
        progress = client.expect("progress").progress
        assert progress.attempt == 1 and progress.shortfall_bytes > 0
        assert progress.next_attempt_delay.ToTimedelta().total_seconds() == 60.0
        # The server now waits a minute before attempt 2, holding what attempt 1 reserved.
        assert cros_balloon_bytes(stub) > cros_before
        assert client.call.cancel()
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.CANCELLED

    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.PREPARE_VM) == 1  # no attempt after the client left
    assert request_count(server, MessageType.REMOVE_VM) == 1
    assert run_launch(stub) == 2


def test_cancel_after_reserved_releases_the_reservation(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        assert cros_balloon_bytes(stub) - cros_before == DEFAULT_INIT_BYTES + extra_bytes(MEM_BYTES)
        assert client.call.cancel()
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.CANCELLED

    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.FINISH_ADD_VM) == 0
    assert request_count(server, MessageType.REMOVE_VM) == 1
    assert run_launch(stub) == reserved.vm_id + 1


def test_cancel_after_vm_started_removes_the_vm(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    # mms takes a second to answer FinishAddVm, so the cancel lands while it is on the wire.
    sim.set_message_delay(MessageType.FINISH_ADD_VM, 1.0)
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        client.vm_started()
        assert sim.wait_until(lambda: sim.request_counts[MessageType.FINISH_ADD_VM] == 1)
        assert client.call.cancel()
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.CANCELLED

    # FinishAddVm cannot be taken back: it completes, then the server removes the VM.
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.REMOVE_VM) == 1
    finish_then_remove = [
        type(r).__name__
        for r in sim.requests
        if r.TYPE in (MessageType.FINISH_ADD_VM, MessageType.REMOVE_VM)
    ]
    assert finish_then_remove == ["FinishAddVmRequest", "RemoveVmRequest"]
    sim.set_message_delay(MessageType.FINISH_ADD_VM, 0.0)
    assert run_launch(stub) == reserved.vm_id + 1


def test_cancel_while_queued_behind_another_launch_reserves_nothing(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    with launch(stub) as first:
        first.start(MEM_BYTES)
        first_vm_id = first.expect_reserved().vm_id
        prepares_before = request_count(server, MessageType.PREPARE_VM)
        with launch(stub) as queued:
            queued.start(SMALL_MEM_BYTES)
            assert queued.expect("queued").queued.position == 1
            assert server.bridge.slot.launches_waiting() == 1
            assert queued.call.cancel()
            assert queued.expect_error().code() == grpc.StatusCode.CANCELLED
        wait_until(lambda: server.bridge.slot.launches_waiting() == 0, "the queue empties")
        first.vm_started()
        first.expect("launched")
        first.expect_ok_end()
    assert request_count(server, MessageType.PREPARE_VM) == prepares_before  # it never reached mms
    assert listed_vm_ids(stub) == [0, first_vm_id]
    assert run_launch(stub) == first_vm_id + 1


def test_deadline_while_waiting_for_the_client_releases_the_reservation(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    # The deadline must outlast the way to `reserved` on a busy machine (1 s once left too
    # little): it is what ends the wait here, whenever it comes.
    with launch(stub, timeout_s=5.0) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        # The client never answers `reserved`.
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_released(server, stub, cros_before)
    assert run_launch(stub) == reserved.vm_id + 1


def test_half_close_after_reserved_is_aborted_and_releases(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        client.close()
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.ABORTED
    assert error_info(error).reason == "LAUNCH_ABORTED"
    wait_released(server, stub, cros_before)
    assert run_launch(stub) == reserved.vm_id + 1


def test_message_out_of_turn_is_invalid_argument_and_releases(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        client.expect_reserved()
        client.start(MEM_BYTES)  # a second `start` instead of `vm_started`
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_ARGUMENT"
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.FINISH_ADD_VM) == 0


# --- sharing the device --------------------------------------------------------------------------


def test_two_launches_are_served_one_after_the_other(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    events: list[str] = []
    lock = threading.Lock()

    def record(event: str) -> None:
        with lock:
            events.append(event)

    def recorded() -> list[str]:
        with lock:
            return list(events)

    def second_launch() -> int:
        with launch(stub) as client:
            client.start(SMALL_MEM_BYTES)
            assert client.expect("queued").queued.position == 1
            record("B queued")
            reserved = client.expect("reserved").reserved
            record("B reserved")
            client.vm_started()
            client.expect("launched")
            record("B launched")
            client.expect_ok_end()
        return reserved.vm_id

    with launch(stub) as first, ThreadPoolExecutor(max_workers=1) as pool:
        first.start(MEM_BYTES)
        first_vm_id = first.expect_reserved().vm_id
        record("A reserved")
        second = pool.submit(second_launch)
        # B's start reached the server and waits for the one pending start that A holds.
        wait_until(lambda: "B queued" in recorded(), "B is told it queues behind A")
        assert server.bridge.slot.launches_waiting() == 1
        assert recorded() == ["A reserved", "B queued"]
        record("A vm_started")
        first.vm_started()
        first.expect("launched")
        record("A launched")
        first.expect_ok_end()
        second_vm_id = second.result(timeout=LAUNCH_TIMEOUT_S)

    order = recorded()
    assert order[:3] == ["A reserved", "B queued", "A vm_started"]
    assert sorted(order[3:]) == ["A launched", "B launched", "B reserved"]
    assert order.index("B reserved") < order.index("B launched")
    assert first_vm_id != second_vm_id
    # mms saw A's start finish before B's reservation began.
    starts = [
        (type(r).__name__, r.vm_id if isinstance(r, FinishAddVmRequest) else None)
        for r in simulator(server).requests
        if isinstance(r, PrepareVmRequest | FinishAddVmRequest)
    ]
    assert starts == [
        ("PrepareVmRequest", None),
        ("FinishAddVmRequest", first_vm_id),
        ("PrepareVmRequest", None),
        ("FinishAddVmRequest", second_vm_id),
    ]
    assert listed_vm_ids(stub) == [0, first_vm_id, second_vm_id]


def test_queued_launches_are_told_their_place_and_each_move_up(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    with launch(stub) as a, launch(stub) as b, launch(stub) as c:
        a.start(SMALL_MEM_BYTES)
        a_vm_id = a.expect_reserved().vm_id  # A holds the device's one pending start
        b.start(SMALL_MEM_BYTES)
        assert b.expect("queued").queued.position == 1
        c.start(SMALL_MEM_BYTES)
        assert c.expect("queued").queued.position == 2
        # Queued launches hold nothing: mms saw one PrepareVm, A's.
        assert request_count(server, MessageType.PREPARE_VM) == 1
        a.vm_started()
        a.expect("launched")
        a.expect_ok_end()
        # A is done: B takes the start (no more `queued` for it) and C moves up to 1.
        b_vm_id = b.expect_reserved().vm_id
        assert c.expect("queued").queued.position == 1
        b.vm_started()
        b.expect("launched")
        b.expect_ok_end()
        c_vm_id = c.expect_reserved().vm_id
        c.vm_started()
        c.expect("launched")
        c.expect_ok_end()
    assert [a_vm_id, b_vm_id, c_vm_id] == [a_vm_id, a_vm_id + 1, a_vm_id + 2]
    assert listed_vm_ids(stub) == [0, a_vm_id, b_vm_id, c_vm_id]


def test_a_launch_behind_one_that_leaves_moves_up(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    with launch(stub) as a, launch(stub) as b, launch(stub) as c:
        a.start(SMALL_MEM_BYTES)
        a.expect_reserved()
        b.start(SMALL_MEM_BYTES)
        assert b.expect("queued").queued.position == 1
        c.start(SMALL_MEM_BYTES)
        assert c.expect("queued").queued.position == 2
        assert b.call.cancel()  # B's caller leaves the queue
        assert c.expect("queued").queued.position == 1
        a.vm_started()
        a.expect("launched")
        c.expect_reserved()
        c.vm_started()
        c.expect("launched")
        c.expect_ok_end()
    assert server.bridge.slot.launches_waiting() == 0


def test_stats_and_rebalance_are_served_while_a_launch_waits_for_its_client(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    running_vm_id = run_launch(stub, SMALL_MEM_BYTES, SMALL_INIT_BYTES)
    order: list[str] = []
    with launch(stub) as client:
        client.start(MEM_BYTES)
        launching_vm_id = client.expect_reserved().vm_id
        order.append("reserved")

        stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=RPC_TIMEOUT_S)
        order.append("stats")
        # Every running VM; the one still starting is not among them.
        assert [s.vm_id for s in stats.stats] == [0, running_vm_id]
        rebalanced = stub.RebalanceMemory(
            pb.RebalanceMemoryRequest(
                deltas=[pb.BalloonDelta(vm_id=running_vm_id, delta_bytes=-16 * MIB)]
            ),
            timeout=RPC_TIMEOUT_S,
        )
        order.append("rebalance")
        assert rebalanced.fully_applied
        assert [(d.vm_id, d.delta_bytes) for d in rebalanced.actual_deltas] == [
            (running_vm_id, -16 * MIB),
            (0, 16 * MIB),
        ]
        # Both went to mms while the launch still held its start, its VM not yet finished.
        assert request_count(server, MessageType.FINISH_ADD_VM) == 1  # the first VM's only
        assert request_count(server, MessageType.REBALANCE_MEMORY) == 1
        assert server.bridge.slot.claim is not None
        assert server.bridge.slot.claim.vm_id == launching_vm_id

        client.vm_started()
        client.expect("launched")
        order.append("launched")
        client.expect_ok_end()

    assert order == ["reserved", "stats", "rebalance", "launched"]
    assert listed_vm_ids(stub) == [0, running_vm_id, launching_vm_id]


def test_prepare_vm_is_refused_while_a_launch_holds_the_pending_start(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        prepares_before = request_count(server, MessageType.PREPARE_VM)

        with pytest.raises(grpc.RpcError) as caught:
            # The same sizes: mms itself would happily top up (and hand over) the launch's start.
            stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=RPC_TIMEOUT_S)
        # ABORTED + RetryInfo: the condition clears by itself (gRPC's retry guidance).
        assert caught.value.code() == grpc.StatusCode.ABORTED
        info = error_info(caught.value)
        assert info.reason == "START_IN_PROGRESS"
        assert info.metadata["vmId"] == str(reserved.vm_id)
        assert retry_delay_s(caught.value) == 1.0  # worth retrying once that start settles
        assert request_count(server, MessageType.PREPARE_VM) == prepares_before

        # Nor may anyone else finish or remove the VM the launch is starting.
        for call in (
            lambda: stub.FinishAddVm(
                pb.FinishAddVmRequest(vm_id=reserved.vm_id), timeout=RPC_TIMEOUT_S
            ),
            lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=reserved.vm_id), timeout=RPC_TIMEOUT_S),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.ABORTED
            assert error_info(caught.value).reason == "START_IN_PROGRESS"
        assert request_count(server, MessageType.FINISH_ADD_VM) == 0
        assert request_count(server, MessageType.REMOVE_VM) == 0

        client.vm_started()
        assert client.expect("launched").launched.vm_id == reserved.vm_id
        client.expect_ok_end()


# --- malformed streams ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "first",
    [
        pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()),
        pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped()),
        pb.LaunchVmRequest(vm_start_failed=pb.LaunchVmRequest.VmStartFailed(reason="x")),
        pb.LaunchVmRequest(),
        None,  # the client closes without sending anything
    ],
    ids=["vm_started", "vm_stopped", "vm_start_failed", "empty_message", "no_message"],
)
def test_first_message_must_be_start(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, first: pb.LaunchVmRequest | None
) -> None:
    assert server.connection is not None
    sent_before = server.connection.requests_sent
    with launch(stub) as client:
        if first is None:
            client.close()
        else:
            client.send(first)
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert bad_request_fields(error) == ["start"]
    assert server.connection.requests_sent == sent_before  # nothing reached mms


@pytest.mark.parametrize(
    ("mem", "init", "field"),
    [
        (0, None, "start.mem_size_bytes"),
        (-4096, None, "start.mem_size_bytes"),
        (4097, None, "start.mem_size_bytes"),
        (2**54, None, "start.mem_size_bytes"),
        (8192, 12288, "start.init_mem_size_bytes"),
        (8192, 100, "start.init_mem_size_bytes"),
    ],
)
def test_bad_sizes_in_start_are_invalid_argument(
    server: ManateeServer,
    stub: pb_grpc.MemoryServiceStub,
    mem: int,
    init: int | None,
    field: str,
) -> None:
    assert server.connection is not None
    sent_before = server.connection.requests_sent
    with launch(stub) as client:
        client.start(mem, init)
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == [field]
    assert server.connection.requests_sent == sent_before
    assert listed_vm_ids(stub) == [0]


# --- the mms session resets ----------------------------------------------------------------------


def test_session_reset_during_a_launch_stops_the_vm_and_ends_unavailable(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        # mms hangs up: it drops every sibling and the pending start, and the session ends.
        assert simulator(server).drop_connection()
        stop = client.expect("stop_vm").stop_vm
        assert stop.vm_id == reserved.vm_id
        error = client.expect_error()

    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert info.reason == "MMS_CONNECTION_LOST"
    assert info.metadata["vmId"] == str(reserved.vm_id)
    assert retry_delay_s(error) is not None
    wait_until(
        lambda: (
            stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).session
            == session_id(server, 2)
        ),
        "the server reconnected to mms",
    )
    for call in (
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=reserved.vm_id), timeout=RPC_TIMEOUT_S),
        lambda: stub.FinishAddVm(
            pb.FinishAddVmRequest(vm_id=reserved.vm_id), timeout=RPC_TIMEOUT_S
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(caught.value)
        assert info.reason == "SESSION_RESET"
        assert info.metadata["vmSession"] == session_id(server, 1)
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.REMOVE_VM) == 0  # mms forgot the VM by itself
    assert run_launch(stub) == reserved.vm_id + 1


# --- safety: starts always move (I1) -------------------------------------------------------------

LEASE_S = 1.0


@pytest.fixture
def short_lease_server() -> Iterator[ManateeServer]:
    """A server whose start lease (and the time a client gets to stop its VM) is one second."""
    server = start_server(prepare_lease_s=LEASE_S, launch_stop_timeout_s=LEASE_S)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def short_lease_stub(short_lease_server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(short_lease_server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


def test_a_quiet_launch_loses_the_start_when_its_lease_runs_out(
    short_lease_server: ManateeServer, short_lease_stub: pb_grpc.MemoryServiceStub
) -> None:
    server, stub = short_lease_server, short_lease_stub
    cros_before = cros_balloon_bytes(stub)
    # Alive, connected, no deadline, and silent after `reserved`: it must not hold the start.
    with launch(stub, timeout_s=None) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        stop = client.expect("stop_vm").stop_vm  # its VM may be running: it is asked to stop it
        assert stop.vm_id == reserved.vm_id
        assert "lease" in stop.reason
        error = client.expect_error()  # it never answers: removed after the stop timeout
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info = error_info(error)
    assert (info.reason, info.metadata["vmId"]) == ("LEASE_EXPIRED", str(reserved.vm_id))
    wait_released(server, stub, cros_before)
    assert request_count(server, MessageType.FINISH_ADD_VM) == 0
    assert run_launch(stub) == reserved.vm_id + 1


def test_a_quiet_launch_that_answers_stop_vm_is_removed_once_it_stopped() -> None:
    # A stop timeout far longer than the test: the removal can only follow `vm_stopped`.
    server = start_server(prepare_lease_s=LEASE_S, launch_stop_timeout_s=600.0)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            cros_before = cros_balloon_bytes(stub)
            with launch(stub, timeout_s=None) as client:
                client.start(MEM_BYTES)
                reserved = client.expect_reserved()
                client.expect("stop_vm")
                assert request_count(server, MessageType.REMOVE_VM) == 0  # its VM may still run
                client.send(pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped()))
                error = client.expect_error()
            assert error_info(error).reason == "LEASE_EXPIRED"
            wait_released(server, stub, cros_before)
            assert request_count(server, MessageType.REMOVE_VM) == 1
            assert run_launch(stub) == reserved.vm_id + 1
    finally:
        server.stop(grace_s=1.0)


def _unix_s(timestamp: object) -> float:
    from google.protobuf import timestamp_pb2

    assert isinstance(timestamp, timestamp_pb2.Timestamp)
    return timestamp.seconds + timestamp.nanos / 1e9


def test_reserved_and_prepare_vm_carry_the_lease_expiry(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    lease_s = server.config.prepare_lease_s
    before_s = time.time()
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        after_s = time.time()
        assert reserved.HasField("lease_expire_time")
        assert before_s + lease_s <= _unix_s(reserved.lease_expire_time) <= after_s + lease_s
        client.vm_started()
        client.expect("launched")
        client.expect_ok_end()

    before_s = time.time()
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=SMALL_MEM_BYTES), timeout=RPC_TIMEOUT_S
    )
    after_s = time.time()
    assert prepared.HasField("lease_expire_time")
    assert before_s + lease_s <= _unix_s(prepared.lease_expire_time) <= after_s + lease_s
    # A top-up of the same start keeps its lease: the start is not extended by retrying.
    again = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=SMALL_MEM_BYTES), timeout=RPC_TIMEOUT_S
    )
    assert again.vm_id == prepared.vm_id
    assert again.lease_expire_time == prepared.lease_expire_time
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=RPC_TIMEOUT_S)


class FreezableProxy:
    """A TCP proxy that can stop forwarding without closing anything: to each end, the other
    one has vanished (a host that lost power or network sends no FIN and no RST)."""

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.frozen = threading.Event()
        self._closing = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        self._pumps: list[threading.Thread] = []
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self._target_port))
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                pump = threading.Thread(
                    target=self._pump, args=(source, sink), name="proxy-pump", daemon=True
                )
                self._pumps.append(pump)
                pump.start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while not self._closing.is_set():
                ready, _, _ = select.select([source], [], [], 0.05)
                if not ready or self.frozen.is_set():
                    continue  # frozen: read nothing, send nothing, close nothing
                data = source.recv(65536)
                if not data:
                    return
                sink.sendall(data)
        except (OSError, ValueError):
            return  # the proxy is closing (a closed socket has fd -1)

    def close(self) -> None:
        self._closing.set()
        for sock in self._sockets:
            sock.close()
        for pump in self._pumps:
            pump.join(5.0)


def test_a_client_whose_host_vanished_is_noticed_by_keepalive_and_its_launch_released() -> None:
    # Keepalive shortened from 20 s + 10 s; the lease stays long, so only keepalive can act.
    server = start_server(keepalive_time_s=0.5, keepalive_timeout_s=0.5, prepare_lease_s=600.0)
    assert server.config.listen.startswith("127.0.0.1")
    proxy = FreezableProxy(server.port)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            cros_before = cros_balloon_bytes(stub)
            with grpc.insecure_channel(f"127.0.0.1:{proxy.port}") as far_channel:
                far_stub = pb_grpc.MemoryServiceStub(far_channel)
                with launch(far_stub, timeout_s=None) as client:
                    client.start(MEM_BYTES)
                    client.expect_reserved()
                    proxy.frozen.set()  # the client's host is gone, its socket still open
                    # The server's pings go unanswered: it drops the connection and the launch.
                    wait_released(server, stub, cros_before)
            assert request_count(server, MessageType.REMOVE_VM) == 1
    finally:
        proxy.close()
        server.stop(grace_s=1.0)


def test_the_client_and_the_cli_give_a_launch_a_deadline_by_default(tmp_path: Path) -> None:
    """A fake LaunchVm service records the deadline each launch arrives with."""
    seen_remaining_s: list[float | None] = []

    def launch_vm(requests: Iterator[object], context: grpc.ServicerContext) -> Iterator[bytes]:
        seen_remaining_s.append(context.time_remaining())
        context.abort(grpc.StatusCode.UNAVAILABLE, "the fake only records the deadline")
        yield b""

    fake = grpc.server(ThreadPoolExecutor(max_workers=2))
    handler: grpc.RpcMethodHandler[object, bytes] = grpc.stream_stream_rpc_method_handler(launch_vm)
    fake.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(SERVICE_NAME, {"LaunchVm": handler})]
    )
    port = fake.add_insecure_port("127.0.0.1:0")
    fake.start()
    try:
        with Client(f"127.0.0.1:{port}") as client, pytest.raises(ManateeRpcError):
            client.launch_vm(MEM_BYTES, start_vm=lambda vm_id, path: True, stop_vm=lambda _: None)
        result = subprocess.run(
            [sys.executable, "-m", "manatee_grpc", "launch", "512MiB", "--start-cmd", "true",
             "--server", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode != 0
    finally:
        fake.stop(None)
    assert len(seen_remaining_s) == 2
    # A deadline of a few minutes, not none (gRPC reports no deadline as ~1e18 s or None). The
    # server's clock reads the deadline a little differently from the client's, so the upper
    # bound is a minute above the default: far below "none", and no timing window.
    assert all(
        r is not None and 60 < r <= DEFAULT_LAUNCH_TIMEOUT_S + 60 for r in seen_remaining_s
    ), seen_remaining_s


# --- safety: the start slot forgets, and a caller who left costs nothing (I6) --------------------


def slot_is_empty(server: ManateeServer) -> bool:
    """The slot remembers nothing: no claim, and every collection it owns is empty."""
    slot = server.bridge.slot
    held = [value for value in vars(slot).values() if isinstance(value, set | list | dict | deque)]
    return slot.claim is None and all(len(value) == 0 for value in held)


def test_the_start_slot_forgets_every_finished_launch(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    # Launches that end every way: launched, start failed, half-closed, cancelled while queued.
    vm_ids = [run_launch(stub, SMALL_MEM_BYTES, SMALL_INIT_BYTES) for _ in range(3)]
    with launch(stub) as client:
        client.start(SMALL_MEM_BYTES)
        client.expect_reserved()
        client.send(pb.LaunchVmRequest(vm_start_failed=pb.LaunchVmRequest.VmStartFailed()))
        client.expect_error()
    with launch(stub) as client:
        client.start(SMALL_MEM_BYTES)
        client.expect_reserved()
        client.close()
        client.expect_error()
    with launch(stub) as holder:
        holder.start(SMALL_MEM_BYTES)
        holder.expect_reserved()
        with launch(stub) as queued:
            queued.start(SMALL_MEM_BYTES)
            wait_until(lambda: server.bridge.slot.launches_waiting() == 1, "the launch queues")
            queued.call.cancel()
        holder.vm_started()
        holder.expect("launched")
        holder.expect_ok_end()
    wait_until(lambda: slot_is_empty(server), "the start slot holds nothing")
    assert len(set(vm_ids)) == 3


@pytest.fixture
def one_worker_server() -> Iterator[ManateeServer]:
    """A server configured with one worker (a deprecated setting: there is no handler pool)."""
    server = start_server(max_workers=1)
    yield server
    server.stop(grace_s=1.0)


def test_a_launch_whose_caller_left_before_it_queued_sends_nothing_to_mms(
    one_worker_server: ManateeServer,
) -> None:
    server = one_worker_server
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        with launch(stub) as holder:
            holder.start(SMALL_MEM_BYTES)
            holder.expect_reserved()
            counts_before = dict(simulator(server).request_counts)
            with launch(stub) as gone:
                gone.start(SMALL_MEM_BYTES)
                # The server has its start: it is queued for the slot.
                wait_until(
                    lambda: server.bridge.slot.launches_waiting() == 1,
                    "the server has the second launch",
                )
                assert gone.call.cancel()
            holder.vm_started()
            holder.expect("launched")
            holder.expect_ok_end()
        # One more launch after both: behind anything the departed launch could still send.
        next_vm_id = run_launch(stub, SMALL_MEM_BYTES, SMALL_INIT_BYTES)
    counts = simulator(server).request_counts
    # Only the holder's FinishAddVm and the last launch reached mms; nothing for the one that left.
    assert counts[MessageType.PREPARE_VM] == counts_before[MessageType.PREPARE_VM] + 1
    assert counts[MessageType.REMOVE_VM] == counts_before[MessageType.REMOVE_VM]
    assert next_vm_id == 2


# --- safety: LaunchVm is a deterministic protocol (I7) -------------------------------------------


def _start_message(mem_size_bytes: int = SMALL_MEM_BYTES) -> pb.LaunchVmRequest:
    return pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes))


VM_STARTED = pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted())


def test_start_vm_started_and_half_close_sent_at_once_always_launch(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    outcomes: list[tuple[str, tuple[str | None, ...]]] = []
    for _ in range(20):
        # A list as the request stream: both messages, then the half-close, as fast as gRPC can.
        call = stub.LaunchVm(iter([_start_message(), VM_STARTED]), timeout=LAUNCH_TIMEOUT_S)
        try:
            events: list[str | None] = [response.WhichOneof("event") for response in call]
            outcome: tuple[str, tuple[str | None, ...]] = (call.code().name, tuple(events))
        except grpc.RpcError as error:
            outcome = (error.code().name, (error.details(),))
        outcomes.append(outcome)
        if outcome[0] == "OK":
            vm_id = stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).vms[-1].vm_id
            stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT_S)
    assert outcomes == [("OK", ("reserved", "launched"))] * 20
    assert request_count(server, MessageType.FINISH_ADD_VM) == 20


def test_a_second_start_is_invalid_argument_whenever_it_arrives(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_before = cros_balloon_bytes(stub)
    call = stub.LaunchVm(iter([_start_message(), _start_message()]), timeout=LAUNCH_TIMEOUT_S)
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start" in (caught.value.details() or "")
    wait_released(server, stub, cros_before)


def test_a_first_attempt_that_reserves_sends_no_progress(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    with launch(stub) as client:
        client.start(MEM_BYTES)
        first = next(client.call)
        assert first.WhichOneof("event") == "reserved"  # progress means an attempt fell short
        client.vm_started()
        client.expect("launched")
        client.expect_ok_end()


def test_grpcurl_launches_with_one_d_holding_start_and_vm_started(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    data = json.dumps({"start": {"mem_size_bytes": SMALL_MEM_BYTES}}) + " " + '{"vm_started":{}}'
    result = subprocess.run(
        [str(GRPCURL), "-plaintext", "-d", data, server.address,
         "manatee.memory.v1.MemoryService/LaunchVm"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    events, text = [], result.stdout.strip()
    while text:
        message, end = decoder.raw_decode(text)
        events.append(message)
        text = text[end:].strip()
    assert [next(iter(event)) for event in events] == ["reserved", "launched"]
    assert events[1]["launched"]["vm"]["state"] == "VM_STATE_RUNNING"
    assert listed_vm_ids(stub) == [0, int(events[0]["reserved"]["vm_id"])]


# --- safety: each failure names its own cause (I8) -----------------------------------------------


def test_a_failed_start_has_its_own_state(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    sim.set_crosvm_connect_timeout(0.05)
    sim.fail_crosvm_connect(count=1)
    with launch(stub) as client:
        client.start(MEM_BYTES)
        reserved = client.expect_reserved()
        client.vm_started()
        client.expect("stop_vm")
        # FinishAddVm failed; mms holds the VM until it is removed: not "starting" any more.
        states = {vm.vm_id: vm.state for vm in stub.ListVms(pb.ListVmsRequest()).vms}
        assert states[reserved.vm_id] == pb.VM_STATE_START_FAILED
        client.send(pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped()))
        client.expect_error()


def test_a_start_larger_than_the_cros_guest_is_invalid_argument(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    cros_bytes = simulator(server).with_model(lambda model: model.scenario.cros_mem_size_bytes)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=cros_bytes), timeout=RPC_TIMEOUT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["mem_size_bytes"]
    assert "CrOS guest" in (caught.value.details() or "")
    with launch(stub) as client:
        client.start(cros_bytes)
        error = client.expect_error()
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(error) == ["start.mem_size_bytes"]
    assert server.bridge.slot.claim is None
