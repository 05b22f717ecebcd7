"""Bare PrepareVm racing the end of the pending start: every start mms opens stays tracked.

mms answers in the order requests were sent, and a PrepareVm that reaches it after the pending
start ended opens a new start. These tests pause the simulator (``mms_paused``) so a request
waits on the wire for exactly as long as a test needs, then check what the server let through,
what mms ended up holding, and that the next LaunchVm still gets the one pending start.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest

from manatee_grpc import Client, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import MmsModel, Simulator, StartState

from .conftest import start_server
from .helpers import error_info, wait_until

A_MEM_BYTES, A_INIT_BYTES = 512 * MIB, 256 * MIB
B_MEM_BYTES, B_INIT_BYTES = 256 * MIB, 128 * MIB
RPC_TIMEOUT_S = 10.0
SHORT_LEASE_S = 0.3


# --- helpers -------------------------------------------------------------------------------------


def simulator(server: ManateeServer) -> Simulator:
    assert server.simulator is not None, "these tests need the embedded simulator"
    return server.simulator


def requests_sent(server: ManateeServer) -> int:
    assert server.connection is not None
    return server.connection.requests_sent


@contextmanager
def mms_paused(sim: Simulator) -> Iterator[None]:
    """mms answers nothing inside the block: what the server sends waits on the wire.

    A helper thread holds the simulator's lock (the one its introspection takes), so the
    simulator stops before it even counts the next request. Do not call the simulator inside.
    """
    holding, resume = threading.Event(), threading.Event()

    def hold(model: MmsModel) -> None:
        del model
        holding.set()
        resume.wait()

    thread = threading.Thread(target=sim.with_model, args=(hold,), name="mms-paused", daemon=True)
    thread.start()
    assert holding.wait(5.0), "could not pause the simulator"
    try:
        yield
    finally:
        resume.set()
        thread.join(5.0)


def on_the_wire(server: ManateeServer, sent_before: int, what: str) -> None:
    wait_until(lambda: requests_sent(server) == sent_before + 1, f"{what} is on the wire")


def prepare(
    stub: pb_grpc.MemoryServiceStub, mem_bytes: int, init_bytes: int
) -> pb.PrepareVmResponse:
    request = pb.PrepareVmRequest(mem_size_bytes=mem_bytes, init_mem_size_bytes=init_bytes)
    return stub.PrepareVm(request, timeout=RPC_TIMEOUT_S)


def vm_states(stub: pb_grpc.MemoryServiceStub) -> dict[int, int]:
    listed = stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).vms
    return {vm.vm_id: vm.state for vm in listed}


def launch(server: ManateeServer, mem_bytes: int, timeout_s: float = RPC_TIMEOUT_S) -> int:
    """A whole LaunchVm whose client starts its VM at once; returns the VM id."""
    with Client(server.address, timeout_s=RPC_TIMEOUT_S) as client:
        launched = client.launch_vm(
            mem_bytes,
            start_vm=lambda vm_id, balloon_control_path: True,
            stop_vm=lambda vm_id: None,
            timeout_s=timeout_s,
        )
    return launched.vm_id


def assert_no_start_pending(server: ManateeServer) -> None:
    """Neither mms nor the server holds a pending start."""
    wait_until(lambda: server.bridge.slot.claim is None, "the server's start slot is free")
    sim = simulator(server)
    assert sim.with_model(lambda model: model.pending_start()) is None
    assert sim.with_model(lambda model: model.start_state) is StartState.IDLE
    assert sim.with_model(lambda model: model.conservation_error_bytes()) == 0


@pytest.fixture
def short_lease_server() -> Iterator[ManateeServer]:
    server = start_server(prepare_lease_s=SHORT_LEASE_S)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def short_lease_stub(short_lease_server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(short_lease_server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


# --- a PrepareVm behind the end of the start it would join ---------------------------------------


@pytest.mark.parametrize(
    ("ending", "b_mem_bytes", "b_init_bytes"),
    [
        # The reported case: B asks for other sizes while A's FinishAddVm is on the wire.
        ("FinishAddVm", B_MEM_BYTES, B_INIT_BYTES),
        # The same sizes would have joined A's start, had they reached mms before it ended.
        ("FinishAddVm", A_MEM_BYTES, A_INIT_BYTES),
        ("RemoveVm", B_MEM_BYTES, B_INIT_BYTES),
    ],
)
def test_prepare_while_the_start_is_being_ended_is_refused_before_reaching_mms(
    server: ManateeServer,
    stub: pb_grpc.MemoryServiceStub,
    ending: str,
    b_mem_bytes: int,
    b_init_bytes: int,
) -> None:
    sim = simulator(server)
    vm_id = prepare(stub, A_MEM_BYTES, A_INIT_BYTES).vm_id
    prepares_before = sim.request_counts[MessageType.PREPARE_VM]
    with mms_paused(sim):
        sent_before = requests_sent(server)
        end: grpc.Future[Any]
        if ending == "FinishAddVm":
            end = stub.FinishAddVm.future(pb.FinishAddVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT_S)
        else:
            end = stub.RemoveVm.future(pb.RemoveVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT_S)
        on_the_wire(server, sent_before, ending)
        # Sent now, B's PrepareVm would reach mms after the start ended and open another
        # start; the server refuses it at once instead. mms stays paused, so one queued behind
        # the end would wait out its deadline (DEADLINE_EXCEEDED, failing this); half the end's
        # deadline bounds that failure without being a window a busy machine could miss.
        with pytest.raises(grpc.RpcError) as caught:
            stub.PrepareVm(
                pb.PrepareVmRequest(mem_size_bytes=b_mem_bytes, init_mem_size_bytes=b_init_bytes),
                timeout=RPC_TIMEOUT_S / 2,
            )
        assert caught.value.code() == grpc.StatusCode.ABORTED, caught.value
        info = error_info(caught.value)
        assert info.reason == "START_IN_PROGRESS"
        assert info.metadata["vmId"] == str(vm_id)
        assert requests_sent(server) == sent_before + 1  # nothing else went out
    end.result(timeout=RPC_TIMEOUT_S)
    assert sim.request_counts[MessageType.PREPARE_VM] == prepares_before
    expected = {0: pb.VM_STATE_RUNNING}
    if ending == "FinishAddVm":
        expected[vm_id] = pb.VM_STATE_RUNNING
    assert vm_states(stub) == expected
    assert_no_start_pending(server)

    # The next launch gets the pending start (the report: MMS_EINVAL, B's start left pending).
    assert launch(server, B_MEM_BYTES) == vm_id + 1
    # And B, retrying once the end was answered, opens and finishes its own start.
    retried = prepare(stub, b_mem_bytes, b_init_bytes)
    assert retried.reserved and retried.vm_id == vm_id + 2
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=retried.vm_id), timeout=RPC_TIMEOUT_S)
    assert_no_start_pending(server)


def test_prepare_sent_before_the_finish_tops_up_the_start_it_joined(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    first = prepare(stub, A_MEM_BYTES, A_INIT_BYTES)
    with mms_paused(sim):
        sent_before = requests_sent(server)
        joined = stub.PrepareVm.future(
            pb.PrepareVmRequest(mem_size_bytes=A_MEM_BYTES, init_mem_size_bytes=A_INIT_BYTES),
            timeout=RPC_TIMEOUT_S,
        )
        on_the_wire(server, sent_before, "the joining PrepareVm")
        # Queued behind the PrepareVm, the FinishAddVm is accepted: mms sees them in this order.
        finish = stub.FinishAddVm.future(
            pb.FinishAddVmRequest(vm_id=first.vm_id), timeout=RPC_TIMEOUT_S
        )
        wait_until(
            lambda: (claim := server.bridge.slot.claim) is not None and claim.ends_in_flight == 1,
            "the FinishAddVm is queued",
        )
    topped_up = joined.result(timeout=RPC_TIMEOUT_S)
    assert topped_up.vm_id == first.vm_id and topped_up.reserved
    assert finish.result(timeout=RPC_TIMEOUT_S).vm.state == pb.VM_STATE_RUNNING
    assert vm_states(stub) == {0: pb.VM_STATE_RUNNING, first.vm_id: pb.VM_STATE_RUNNING}
    assert_no_start_pending(server)
    assert launch(server, B_MEM_BYTES) == first.vm_id + 1


# --- who holds a start, whatever order the answers come in --------------------------------------


def test_a_start_opened_behind_a_prepare_mms_refused_is_leased_and_released(
    short_lease_server: ManateeServer, short_lease_stub: pb_grpc.MemoryServiceStub
) -> None:
    server, stub = short_lease_server, short_lease_stub
    sim = simulator(server)
    # mms refuses a VM as large as the CrOS guest (-22) and opens nothing for it.
    too_big_bytes = sim.with_model(lambda model: model.cros_mem_size_bytes)
    with mms_paused(sim):
        sent_before = requests_sent(server)
        refused = stub.PrepareVm.future(
            pb.PrepareVmRequest(mem_size_bytes=too_big_bytes, init_mem_size_bytes=A_INIT_BYTES),
            timeout=RPC_TIMEOUT_S,
        )
        on_the_wire(server, sent_before, "the PrepareVm mms will refuse")
        # B joins the claim while the first PrepareVm is unanswered; it reaches mms next, when
        # no start is pending, and opens one.
        opened = stub.PrepareVm.future(
            pb.PrepareVmRequest(mem_size_bytes=B_MEM_BYTES, init_mem_size_bytes=B_INIT_BYTES),
            timeout=RPC_TIMEOUT_S,
        )
        wait_until(
            lambda: (
                (claim := server.bridge.slot.claim) is not None and claim.prepares_in_flight == 2
            ),
            "both PrepareVm calls are under the claim",
        )
    with pytest.raises(grpc.RpcError) as caught:
        refused.result(timeout=RPC_TIMEOUT_S)
    # mms had no start pending: its one rule left is the size (INVALID_ARGUMENT, reached mms).
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "mem_size_bytes"
    reserved = opened.result(timeout=RPC_TIMEOUT_S)
    assert reserved.reserved and reserved.vm_id == 1
    # Nobody finishes B's start: its lease must release it, so the device is not blocked.
    wait_until(lambda: vm_states(stub) == {0: pb.VM_STATE_RUNNING}, "the lease removed VM 1")
    assert sim.request_counts[MessageType.REMOVE_VM] == 1
    assert_no_start_pending(server)
    assert launch(server, A_MEM_BYTES) == 2


def test_a_finish_whose_caller_left_on_the_wire_still_frees_the_start(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    sim = simulator(server)
    vm_id = prepare(stub, A_MEM_BYTES, A_INIT_BYTES).vm_id
    with mms_paused(sim):
        with pytest.raises(grpc.RpcError) as caught:
            stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=vm_id), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert requests_sent(server) > 0  # it was sent, so it completes
    wait_until(lambda: vm_states(stub).get(vm_id) == pb.VM_STATE_RUNNING, "VM 1 runs")
    # mms's start ended with that answer; a launch must not wait out the 60 s lease.
    assert_no_start_pending(server)
    assert launch(server, B_MEM_BYTES, timeout_s=5.0) == vm_id + 1
    assert sim.request_counts[MessageType.REMOVE_VM] == 0


def test_the_lease_never_removes_a_vm_whose_finish_was_on_the_wire(
    short_lease_server: ManateeServer, short_lease_stub: pb_grpc.MemoryServiceStub
) -> None:
    server, stub = short_lease_server, short_lease_stub
    sim = simulator(server)
    vm_id = prepare(stub, A_MEM_BYTES, A_INIT_BYTES).vm_id
    claim = server.bridge.slot.claim
    assert claim is not None and claim.lease_expire_unix_s is not None
    with mms_paused(sim):
        sent_before = requests_sent(server)
        finish = stub.FinishAddVm.future(pb.FinishAddVmRequest(vm_id=vm_id), timeout=RPC_TIMEOUT_S)
        on_the_wire(server, sent_before, "FinishAddVm")
        # The lease runs out while the FinishAddVm is unanswered.
        wait_until(lambda: claim.lease_ran_out, "the lease expired")
    assert finish.result(timeout=RPC_TIMEOUT_S).vm.state == pb.VM_STATE_RUNNING
    # A stats read goes to mms after anything the expiry queued, so once it is answered a
    # RemoveVm queued behind the FinishAddVm would have been answered too.
    stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=RPC_TIMEOUT_S)
    assert sim.request_counts[MessageType.REMOVE_VM] == 0
    assert vm_states(stub) == {0: pb.VM_STATE_RUNNING, vm_id: pb.VM_STATE_RUNNING}
    assert_no_start_pending(server)
