"""The unary RPCs end to end: real gRPC server, real simulator, real sockets."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable

import grpc
import pytest
from faults.helpers import KillableMms
from grpc_health.v1 import health_pb2

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.mms._messages import MessageType

from .conftest import start_server
from .helpers import (
    bad_request_fields,
    error_info,
    health_status,
    request_count,
    simulator,
    wait_until,
)

MEM_BYTES = 512 * MIB
INIT_BYTES = 256 * MIB


def cros_balloon_bytes(stub: pb_grpc.MemoryServiceStub) -> int:
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=5)
    assert [s.vm_id for s in response.stats] == [0]
    return response.stats[0].balloon_actual_bytes


def start_vm(stub: pb_grpc.MemoryServiceStub, mem: int = MEM_BYTES, init: int = INIT_BYTES) -> int:
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=mem, init_mem_size_bytes=init), timeout=5
    )
    assert prepared.reserved, prepared
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=15)
    return prepared.vm_id


def test_stats_of_every_known_vm_by_default(stub: pb_grpc.MemoryServiceStub) -> None:
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    assert [s.vm_id for s in response.stats] == [0]
    assert response.session == stub.ListVms(pb.ListVmsRequest(), timeout=5).session != ""
    assert response.read_time.seconds > 0
    cros = response.stats[0]
    assert cros.HasField("total_memory_bytes") and cros.total_memory_bytes > 0


def test_unknown_ids_are_listed_missing(stub: pb_grpc.MemoryServiceStub) -> None:
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0, 77]), timeout=5)
    assert [s.vm_id for s in response.stats] == [0]
    assert list(response.missing_vm_ids) == [77]


def test_whole_start_moves_memory_and_remove_gives_it_back(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    before = cros_balloon_bytes(stub)
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES, init_mem_size_bytes=INIT_BYTES), timeout=5
    )
    assert prepared.reserved and prepared.shortfall_bytes == 0
    assert prepared.vm_id == 1
    assert prepared.balloon_control_path == "/run/mms_control_1.sock"
    # The reservation is the VM's initial memory plus the hypervisor's overhead.
    assert cros_balloon_bytes(stub) - before == INIT_BYTES + extra_bytes(MEM_BYTES)

    finished = stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=15)
    assert finished.vm.state == pb.VM_STATE_RUNNING
    stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    by_id = {s.vm_id: s for s in stats.stats}
    assert set(by_id) == {0, 1}
    assert by_id[1].balloon_actual_bytes == MEM_BYTES - INIT_BYTES

    listed = stub.ListVms(pb.ListVmsRequest(), timeout=5)
    assert [(v.vm_id, v.state, v.cros_guest) for v in listed.vms] == [
        (0, pb.VM_STATE_RUNNING, True),
        (1, pb.VM_STATE_RUNNING, False),
    ]
    assert listed.vms[1].mem_size_bytes == MEM_BYTES

    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)
    assert cros_balloon_bytes(stub) == before
    assert [v.vm_id for v in stub.ListVms(pb.ListVmsRequest(), timeout=5).vms] == [0]


def test_init_size_defaults_to_concierge_rule(stub: pb_grpc.MemoryServiceStub) -> None:
    before = cros_balloon_bytes(stub)
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=2048 * MIB), timeout=5)
    assert prepared.reserved
    assert cros_balloon_bytes(stub) - before == 1000 * MIB + extra_bytes(2048 * MIB)
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)


def test_rebalance_moves_memory_and_reports_it(stub: pb_grpc.MemoryServiceStub) -> None:
    vm_id = start_vm(stub)
    response = stub.RebalanceMemory(
        pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=-16 * MIB - 1)]),
        timeout=5,
    )
    # -16 MiB - 1 aligns down (toward minus infinity) to -16 MiB - 4 KiB; the CrOS guest pays.
    aligned = -16 * MIB - 4096
    assert [(d.vm_id, d.delta_bytes) for d in response.requested_deltas] == [
        (vm_id, aligned),
        (0, -aligned),
    ]
    assert [(d.vm_id, d.delta_bytes) for d in response.actual_deltas] == [
        (vm_id, aligned),
        (0, -aligned),
    ]
    assert response.fully_applied


def test_rebalance_that_moves_nothing_is_not_fully_applied(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    vm_id = start_vm(stub)
    # The balloon is already at mem - init; it can grow by at most init minus the guest's use,
    # so a huge inflate is clamped and mms leaves the untouched CrOS side out or short.
    response = stub.RebalanceMemory(
        pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MEM_BYTES)]),
        timeout=5,
    )
    assert not response.fully_applied
    assert len(response.actual_deltas) == 2


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (
            pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=0, delta_bytes=4096)]),
            "deltas[0].vm_id",
        ),
        (
            pb.RebalanceMemoryRequest(
                deltas=[pb.BalloonDelta(vm_id=1, delta_bytes=4096), pb.BalloonDelta(vm_id=1)]
            ),
            "deltas[1].vm_id",
        ),
        (pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=2**32)]), "deltas[0].vm_id"),
        (
            pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=1, delta_bytes=2**53 + 1)]),
            "deltas[0].delta_bytes",
        ),
        (pb.RebalanceMemoryRequest(), "deltas"),
    ],
)
def test_bad_rebalance_is_invalid_argument_naming_the_field(
    server: ManateeServer,
    stub: pb_grpc.MemoryServiceStub,
    request_message: pb.RebalanceMemoryRequest,
    field: str,
) -> None:
    assert server.connection is not None
    sent_before = server.connection.requests_sent
    with pytest.raises(grpc.RpcError) as caught:
        stub.RebalanceMemory(request_message, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "INVALID_ARGUMENT"
    assert bad_request_fields(caught.value) == [field]
    assert server.connection.requests_sent == sent_before  # nothing reached mms


@pytest.mark.parametrize(
    ("mem", "init", "field"),
    [
        (0, None, "mem_size_bytes"),
        (-4096, None, "mem_size_bytes"),
        (4097, None, "mem_size_bytes"),
        (2**54, None, "mem_size_bytes"),
        (8192, 12288, "init_mem_size_bytes"),
        (8192, 100, "init_mem_size_bytes"),
    ],
)
def test_bad_prepare_is_invalid_argument(
    stub: pb_grpc.MemoryServiceStub, mem: int, init: int | None, field: str
) -> None:
    request = pb.PrepareVmRequest(mem_size_bytes=mem)
    if init is not None:
        request.init_mem_size_bytes = init
    with pytest.raises(grpc.RpcError) as caught:
        stub.PrepareVm(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == [field]


def test_remove_of_cros_guest_is_invalid(stub: pb_grpc.MemoryServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.RemoveVm(pb.RemoveVmRequest(vm_id=0), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["vm_id"]


def test_unknown_vm_is_not_found(stub: pb_grpc.MemoryServiceStub) -> None:
    for call in (
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=42), timeout=5),
        lambda: stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=42), timeout=5),
        lambda: stub.RebalanceMemory(
            pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=42, delta_bytes=4096)]),
            timeout=5,
        ),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(caught.value)
        assert info.reason == "VM_NOT_FOUND"
        assert info.domain == "manatee.memory.v1"
        assert info.metadata["vmId"] == "42"


def test_prepare_with_other_sizes_is_failed_precondition(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    first = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=2 * MEM_BYTES), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "MMS_EINVAL"
    assert info.metadata["errno"] == "-22"
    # The same sizes top the same start up, as mms does.
    again = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=5)
    assert again.vm_id == first.vm_id
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=first.vm_id), timeout=5)


def test_finish_before_reservation_complete_is_resource_exhausted(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    # Ask for more than the CrOS guest can give: the reservation comes back short.
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=7 * 1024 * MIB, init_mem_size_bytes=7 * 1024 * MIB),
        timeout=5,
    )
    assert not prepared.reserved and prepared.shortfall_bytes > 0
    with pytest.raises(grpc.RpcError) as caught:
        stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(caught.value).reason == "MMS_ENOMEM"
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)


def test_health_serving_while_connected(channel: grpc.Channel) -> None:
    for service in ("", "manatee.memory.v1.MemoryService"):
        assert health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING


def test_bare_prepare_lease_expires_and_releases_the_reservation() -> None:
    server = start_server(prepare_lease_s=0.2)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            before = cros_balloon_bytes(stub)
            prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=5)
            assert prepared.reserved and cros_balloon_bytes(stub) > before
            # Nobody finishes or removes it: the server removes it when the lease runs out.
            deadline = time.monotonic() + 10
            while len(stub.ListVms(pb.ListVmsRequest(), timeout=5).vms) > 1:
                assert time.monotonic() < deadline, "the lease never expired"
                time.sleep(0.02)
            assert cros_balloon_bytes(stub) == before
            # And the device can start a VM again.
            again = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=5)
            assert again.reserved and again.vm_id == prepared.vm_id + 1
    finally:
        server.stop(grace_s=0.5)


# --- sessions: a VM id means something only with its session (I2) ------------------------------


def _sent(mms: KillableMms) -> dict[MessageType, int]:
    return {msg_type: mms.sim.request_counts[msg_type] for msg_type in MessageType}


def test_an_id_from_an_earlier_session_never_acts_on_the_vm_that_has_it_now() -> None:
    mms = KillableMms()
    server = start_server(mms=mms.address)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            assert (start_vm(stub), start_vm(stub)) == (1, 2)
            old = stub.ListVms(pb.ListVmsRequest(), timeout=5).session
            # mms restarts: it drops every sibling, and numbers VMs from 1 again.
            mms.kill()
            mms.restart()
            wait_until(lambda: stub.ListVms(pb.ListVmsRequest(), timeout=5).session != old)
            assert start_vm(stub) == 1
            new = stub.ListVms(pb.ListVmsRequest(), timeout=5).session
            assert new not in ("", old)
            sent = _sent(mms)

            stale_calls: dict[str, Callable[[], object]] = {
                "RemoveVm": lambda: stub.RemoveVm(
                    pb.RemoveVmRequest(vm_id=1, session=old), timeout=5
                ),
                "FinishAddVm": lambda: stub.FinishAddVm(
                    pb.FinishAddVmRequest(vm_id=1, session=old), timeout=5
                ),
                "RebalanceMemory": lambda: stub.RebalanceMemory(
                    pb.RebalanceMemoryRequest(
                        deltas=[pb.BalloonDelta(vm_id=1, delta_bytes=4096)], session=old
                    ),
                    timeout=5,
                ),
                "GetBalloonStats": lambda: stub.GetBalloonStats(
                    pb.GetBalloonStatsRequest(vm_ids=[1], session=old), timeout=5
                ),
                "WatchBalloonStats": lambda: next(
                    stub.WatchBalloonStats(
                        pb.WatchBalloonStatsRequest(vm_ids=[1], session=old), timeout=5
                    )
                ),
            }
            for method, call in stale_calls.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call()
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND, method
                info = error_info(caught.value)
                assert info.reason == "SESSION_RESET", method
                assert (info.metadata["requestSession"], info.metadata["session"]) == (old, new)
            # Refused before mms: nothing was sent, and the new VM 1 is untouched.
            assert _sent(mms) == sent
            listed = stub.ListVms(pb.ListVmsRequest(), timeout=5)
            assert [(vm.vm_id, vm.state, vm.session) for vm in listed.vms] == [
                (0, pb.VM_STATE_RUNNING, new),
                (1, pb.VM_STATE_RUNNING, new),
            ]
            # With the session it was learnt in (or none: the current one), the id works.
            stub.RemoveVm(pb.RemoveVmRequest(vm_id=1, session=new), timeout=15)
            assert [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest(), timeout=5).vms] == [0]
    finally:
        server.stop(grace_s=1.0)
        mms.close()


def test_session_ids_differ_across_server_restarts_on_one_mms() -> None:
    mms = KillableMms()
    try:
        sessions: list[str] = []
        for _ in range(2):
            server = start_server(mms=mms.address)
            try:
                with grpc.insecure_channel(server.address) as channel:
                    stub = pb_grpc.MemoryServiceStub(channel)
                    # Both servers are in the first session of their own connection to mms.
                    assert server.connection is not None and server.connection.session == 1
                    if sessions:
                        # An id of the previous server's session is refused, not reinterpreted.
                        with pytest.raises(grpc.RpcError) as caught:
                            stub.RemoveVm(
                                pb.RemoveVmRequest(vm_id=1, session=sessions[-1]), timeout=5
                            )
                        assert error_info(caught.value).reason == "SESSION_RESET"
                    sessions.append(stub.ListVms(pb.ListVmsRequest(), timeout=5).session)
            finally:
                server.stop(grace_s=1.0)
        assert "" not in sessions and sessions[0] != sessions[1]
    finally:
        mms.close()


def test_every_answer_that_gives_a_vm_id_says_its_session(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    current = stub.ListVms(pb.ListVmsRequest(), timeout=5).session
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES), timeout=5)
    finished = stub.FinishAddVm(
        pb.FinishAddVmRequest(vm_id=prepared.vm_id, session=prepared.session), timeout=15
    )
    stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(session=current), timeout=5)
    assert current != ""
    assert prepared.session == finished.vm.session == stats.session == current
    listed = stub.ListVms(pb.ListVmsRequest(), timeout=5)
    assert {vm.session for vm in listed.vms} == {current}
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id, session=current), timeout=15)


def test_a_session_longer_than_any_server_gives_is_invalid_argument(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        stub.RemoveVm(pb.RemoveVmRequest(vm_id=1, session="x" * 65), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["session"]


# --- request ids: a retry is safe (I10) ----------------------------------------------------------


def _rebalance(vm_id: int, delta_bytes: int, request_id: str) -> pb.RebalanceMemoryRequest:
    return pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=delta_bytes)], request_id=request_id
    )


def test_a_repeated_rebalance_request_id_returns_the_first_answer_and_moves_nothing(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    vm_id = start_vm(stub)
    before = cros_balloon_bytes(stub)
    sent = request_count(server, MessageType.REBALANCE_MEMORY)
    request = _rebalance(vm_id, -64 * MIB, "5d0c6f4e-7a51-4e0b-9a43-0d6f2b1c9e77")

    first = stub.RebalanceMemory(request, timeout=5)
    repeat = stub.RebalanceMemory(request, timeout=5)

    assert repeat == first and first.fully_applied
    assert request_count(server, MessageType.REBALANCE_MEMORY) == sent + 1
    assert cros_balloon_bytes(stub) == before + 64 * MIB  # moved once, not twice

    # The same id for another request is the caller's mistake, refused before mms.
    with pytest.raises(grpc.RpcError) as caught:
        stub.RebalanceMemory(_rebalance(vm_id, -128 * MIB, request.request_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["request_id"]
    # Another id is another request.
    stub.RebalanceMemory(_rebalance(vm_id, -64 * MIB, "another"), timeout=5)
    assert request_count(server, MessageType.REBALANCE_MEMORY) == sent + 2


def test_a_repeat_while_the_first_is_in_flight_waits_for_its_answer(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    vm_id = start_vm(stub)
    sent = request_count(server, MessageType.REBALANCE_MEMORY)
    request = _rebalance(vm_id, -32 * MIB, "in-flight")
    simulator(server).set_message_delay(MessageType.REBALANCE_MEMORY, 2.0)
    try:
        first = stub.RebalanceMemory.future(request, timeout=10)
        wait_until(
            lambda: request_count(server, MessageType.REBALANCE_MEMORY) == sent + 1,
            "the first call is on the wire",
        )
        # Its caller gives up while mms works on it (as after a lost answer or a deadline)...
        first.cancel()
        # ... and its retry gets the answer of the one request mms received.
        repeat = stub.RebalanceMemory(request, timeout=10)
    finally:
        simulator(server).set_message_delay(MessageType.REBALANCE_MEMORY, 0.0)
    assert [(d.vm_id, d.delta_bytes) for d in repeat.actual_deltas] == [
        (vm_id, -32 * MIB),
        (0, 32 * MIB),
    ]
    assert request_count(server, MessageType.REBALANCE_MEMORY) == sent + 1


def test_a_repeated_prepare_request_id_returns_the_first_answer_and_sends_nothing(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    request = pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES, request_id="prepare-1")
    sent = request_count(server, MessageType.PREPARE_VM)
    first = stub.PrepareVm(request, timeout=5)
    repeat = stub.PrepareVm(request, timeout=5)
    assert repeat == first and first.reserved
    assert request_count(server, MessageType.PREPARE_VM) == sent + 1
    with pytest.raises(grpc.RpcError) as caught:
        stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=2 * MEM_BYTES, request_id="prepare-1"), timeout=5
        )
    assert bad_request_fields(caught.value) == ["request_id"]
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=first.vm_id, session=first.session), timeout=15)


def test_request_ids_are_forgotten_when_the_session_changes(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    request = pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES, request_id="across-a-reset")
    first = stub.PrepareVm(request, timeout=5)
    assert simulator(server).drop_connection()  # mms drops the start with the session
    wait_until(lambda: stub.ListVms(pb.ListVmsRequest(), timeout=5).session != first.session)
    again = stub.PrepareVm(request, timeout=5)
    assert again.session != first.session  # a new attempt in the new session, not a replay
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=again.vm_id), timeout=15)


@pytest.mark.parametrize("method", ["RebalanceMemory", "PrepareVm"])
def test_a_request_id_longer_than_64_characters_is_invalid_argument(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, method: str
) -> None:
    sent = sum(simulator(server).request_counts.values())
    with pytest.raises(grpc.RpcError) as caught:
        if method == "PrepareVm":
            stub.PrepareVm(
                pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES, request_id="r" * 65), timeout=5
            )
        else:
            stub.RebalanceMemory(_rebalance(1, 4096, "r" * 65), timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(caught.value) == ["request_id"]
    assert sum(simulator(server).request_counts.values()) == sent


def test_a_request_id_refused_before_mms_is_not_remembered(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=MEM_BYTES, init_mem_size_bytes=INIT_BYTES), timeout=5
    )
    request = _rebalance(prepared.vm_id, -4 * MIB, "too-early")  # room in its balloon
    sent = request_count(server, MessageType.REBALANCE_MEMORY)
    with pytest.raises(grpc.RpcError) as caught:
        stub.RebalanceMemory(request, timeout=5)
    assert error_info(caught.value).reason == "VM_NOT_RUNNING"
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=15)
    # Nothing reached mms the first time: the retry is the first real attempt.
    assert stub.RebalanceMemory(request, timeout=5).fully_applied
    assert request_count(server, MessageType.REBALANCE_MEMORY) == sent + 1


def test_a_launch_says_the_session_of_the_vm_it_reserved_and_launched(
    stub: pb_grpc.MemoryServiceStub,
) -> None:
    current = stub.ListVms(pb.ListVmsRequest(), timeout=5).session
    requests: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
    requests.put(pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=MEM_BYTES)))
    call = stub.LaunchVm(iter(requests.get, None), timeout=30)
    try:
        events = {}
        for response in call:
            kind = response.WhichOneof("event")
            events[kind] = response
            if kind == "reserved":
                requests.put(pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()))
        assert events["reserved"].reserved.session == current
        launched = events["launched"].launched
        assert launched.session == launched.vm.session == current
    finally:
        requests.put(None)
        call.cancel()
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=launched.vm_id, session=launched.session), timeout=15)
