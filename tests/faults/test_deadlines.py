"""Deadlines and departed callers against the simulator: nothing stale is sent, nothing is left.

mms serves one request at a time, so a request can wait in the server's queue behind a slow one.
If its caller's deadline passes there, it must never reach mms (the simulator counts what it
receives). A PrepareVm or LaunchVm whose caller has gone (deadline or cancel) by the time mms's
reservation comes back must be rolled back with a RemoveVm, leaving the books balanced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from api.conftest import start_server
from api.helpers import request_count, simulator, wait_until

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import MessageType, PrepareVmRequest, RemoveVmRequest

from .helpers import (
    CALL_TIMEOUT_S,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    LaunchStream,
    assert_conserved,
    assert_deadline_exceeded,
    cros_balloon_bytes,
    expect_rpc_error,
    listed_vm_ids,
    run_launch,
    start_vm,
)

SLOW_S = 0.8  # how long mms takes over the request everything else queues behind
RESERVE_S = 0.5  # how long mms takes to answer a reservation whose caller leaves first
DEADLINE_S = 0.2


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


def test_requests_whose_deadline_passed_in_the_queue_are_never_sent(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    vm_id = start_vm(stub)
    sent_before = {msg_type: request_count(server, msg_type) for msg_type in MessageType}
    sim.set_message_delay(MessageType.GET_BALLOON_STATS, SLOW_S)
    queued: list[Callable[[], object]] = [
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=DEADLINE_S),
        lambda: stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES), timeout=DEADLINE_S
        ),
        lambda: stub.RebalanceMemory(
            pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=-4096)]),
            timeout=DEADLINE_S,
        ),
    ]
    with ThreadPoolExecutor(max_workers=len(queued) + 1) as pool:
        slow = pool.submit(
            stub.GetBalloonStats, pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S
        )
        wait_until(
            lambda: (
                request_count(server, MessageType.GET_BALLOON_STATS)
                > sent_before[MessageType.GET_BALLOON_STATS]
            ),
            "the slow request is on the wire",
        )
        # All at once, so each waits in the queue behind the slow one until its deadline.
        errors = [pool.submit(expect_rpc_error, call) for call in queued]
        for error in (future.result(timeout=CALL_TIMEOUT_S) for future in errors):
            if assert_deadline_exceeded(error):
                assert isinstance(error, grpc.Call)
                assert "never sent" in str(error.details())
        assert not slow.done(), "the slow request must still be on the wire for this test"
        slow.result(timeout=CALL_TIMEOUT_S)
    sim.set_message_delay(MessageType.GET_BALLOON_STATS, 0.0)
    # Another call after them has been answered, so the queue they were in has drained.
    assert listed_vm_ids(stub) == [0, vm_id]
    cros_balloon_bytes(stub)
    for msg_type in (MessageType.REMOVE_VM, MessageType.PREPARE_VM, MessageType.REBALANCE_MEMORY):
        assert request_count(server, msg_type) == sent_before[msg_type], msg_type.name
    assert_conserved(stub)
    # The pending start they would have opened is free for the next caller.
    assert start_vm(stub) == vm_id + 1


@pytest.mark.parametrize("departure", ["deadline", "cancel"])
def test_a_prepare_whose_caller_left_is_rolled_back_when_its_reservation_comes(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, departure: str
) -> None:
    sim = simulator(server)
    cros_before = cros_balloon_bytes(stub)
    prepares, removes = (
        request_count(server, MessageType.PREPARE_VM),
        request_count(server, MessageType.REMOVE_VM),
    )
    sim.set_message_delay(MessageType.PREPARE_VM, RESERVE_S)
    request = pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES)
    if departure == "deadline":
        assert_deadline_exceeded(
            expect_rpc_error(lambda: stub.PrepareVm(request, timeout=DEADLINE_S))
        )
    else:
        call = stub.PrepareVm.future(request, timeout=CALL_TIMEOUT_S)
        wait_until(
            lambda: request_count(server, MessageType.PREPARE_VM) > prepares, "PrepareVm sent"
        )
        assert call.cancel()
    assert request_count(server, MessageType.PREPARE_VM) == prepares + 1
    # mms reserves after the caller left; the server removes exactly that VM.
    wait_until(lambda: request_count(server, MessageType.REMOVE_VM) == removes + 1, "the rollback")
    prepared, removed = [
        r for r in sim.requests if isinstance(r, PrepareVmRequest | RemoveVmRequest)
    ][-2:]
    assert isinstance(prepared, PrepareVmRequest) and isinstance(removed, RemoveVmRequest)
    sim.set_message_delay(MessageType.PREPARE_VM, 0.0)
    wait_until(lambda: listed_vm_ids(stub) == [0], "the reservation is gone from the books")
    assert cros_balloon_bytes(stub) == cros_before
    assert_conserved(stub)
    vm_id = start_vm(stub)  # the pending start is free again
    assert removed.vm_id == vm_id - 1


@pytest.mark.parametrize("departure", ["deadline", "cancel"])
def test_a_launch_whose_caller_left_while_reserving_is_rolled_back(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, departure: str
) -> None:
    sim = simulator(server)
    cros_before = cros_balloon_bytes(stub)
    prepares, removes = (
        request_count(server, MessageType.PREPARE_VM),
        request_count(server, MessageType.REMOVE_VM),
    )
    sim.set_message_delay(MessageType.PREPARE_VM, RESERVE_S)
    stream = LaunchStream(stub, timeout_s=DEADLINE_S if departure == "deadline" else None)
    try:
        stream.start()
        wait_until(
            lambda: request_count(server, MessageType.PREPARE_VM) > prepares, "PrepareVm sent"
        )
        if departure == "cancel":
            stream.close()
        events, error = stream.events_until_error()
    finally:
        stream.close()
    assert events == []
    expected = (
        grpc.StatusCode.DEADLINE_EXCEEDED if departure == "deadline" else grpc.StatusCode.CANCELLED
    )
    assert isinstance(error, grpc.Call) and error.code() == expected
    wait_until(lambda: request_count(server, MessageType.REMOVE_VM) == removes + 1, "the rollback")
    assert request_count(server, MessageType.PREPARE_VM) == prepares + 1
    sim.set_message_delay(MessageType.PREPARE_VM, 0.0)
    wait_until(lambda: listed_vm_ids(stub) == [0], "the reservation is gone from the books")
    assert cros_balloon_bytes(stub) == cros_before
    assert_conserved(stub)
    run_launch(stub)  # the pending start is free again
