"""Each backend failure reaches the caller as its documented code and ErrorInfo reason."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from peers import ScriptedMms, WrongType

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType

from .conftest import start_server
from .helpers import error_info, health_status, retry_delay_s, session_id, wait_until


@pytest.fixture
def unreachable_server() -> Iterator[ManateeServer]:
    with tempfile.TemporaryDirectory() as tmp:
        server = ManateeServer_for(f"unix://{Path(tmp) / 'nobody-listens.sock'}")
        yield server
        server.stop(grace_s=0.5)


def ManateeServer_for(mms: str) -> ManateeServer:
    from manatee_grpc import ServerConfig

    return ManateeServer(
        ServerConfig(
            listen="127.0.0.1:0", mms=mms, mms_backoff_initial_s=0.01, mms_backoff_max_s=0.05
        )
    ).start()


def test_unreachable_mms_is_unavailable_with_retry_info(
    unreachable_server: ManateeServer,
) -> None:
    with grpc.insecure_channel(unreachable_server.address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert (
            health_status(channel, "manatee.memory.v1.MemoryService")
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "MMS_UNAVAILABLE"
    delay_s = retry_delay_s(caught.value)
    assert delay_s is not None and delay_s > 0


def test_vm_from_an_earlier_session_is_session_reset(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, channel: grpc.Channel
) -> None:
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=15)
    assert server.simulator is not None and server.connection is not None
    assert server.simulator.drop_connection()
    wait_until(lambda: server.connection is not None and server.connection.session == 2)
    assert server.connection.wait_connected(10)
    assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as caught:
        stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(caught.value)
    assert info.reason == "SESSION_RESET"
    assert info.metadata["vmSession"] == session_id(server, 1)
    assert info.metadata["session"] == session_id(server, 2)
    assert stub.ListVms(pb.ListVmsRequest(), timeout=5).session == session_id(server, 2)


def test_mms_breaking_the_protocol_is_internal() -> None:
    with ScriptedMms() as peer:
        server = ManateeServer_for(str(peer.address))
        try:
            assert server.connection is not None and server.connection.wait_connected(10)
            peer.script(WrongType())
            with grpc.insecure_channel(server.address) as channel:
                stub = pb_grpc.MemoryServiceStub(channel)
                with pytest.raises(grpc.RpcError) as caught:
                    stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
                assert caught.value.code() == grpc.StatusCode.INTERNAL
                assert error_info(caught.value).reason == "MMS_PROTOCOL_ERROR"
                # The stream was reset and the next call works on a new session.
                assert server.connection.wait_connected(10)
                wait_until(lambda: server.connection is not None and server.connection.session == 2)
                response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
                assert response.session == session_id(server, 2)
        finally:
            server.stop(grace_s=0.5)


# Long enough that the server's margin (a tenth of it) leaves its DEADLINE_EXCEEDED, with
# ErrorInfo, 300 ms to reach us before our own timer fires with a bare status.
SLOW_MMS_DEADLINE_S = 3.0


def test_deadline_while_mms_is_slow_is_deadline_exceeded() -> None:
    server = start_server()
    try:
        assert server.simulator is not None
        # mms answers only well after the caller's deadline.
        server.simulator.set_message_delay(MessageType.GET_BALLOON_STATS, 2 * SLOW_MMS_DEADLINE_S)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=SLOW_MMS_DEADLINE_S)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert error_info(caught.value).reason == "DEADLINE_EXCEEDED"
            # The connection was not reset by the caller giving up (this read waits behind
            # the slow one).
            server.simulator.set_message_delay(MessageType.GET_BALLOON_STATS, 0.0)
            response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=30)
            assert response.session == session_id(server, 1)
    finally:
        server.stop(grace_s=0.5)


def test_prepare_while_a_bare_start_is_pending_with_other_sizes_reaches_mms(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    """mms is authoritative on a size mismatch: -22 becomes FAILED_PRECONDITION MMS_EINVAL."""
    first = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=1024 * MIB), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "MMS_EINVAL"
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=first.vm_id), timeout=5)


def test_crosvm_that_never_connects_is_failed_precondition_eio(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    assert server.simulator is not None
    server.simulator.set_crosvm_connect_timeout(0.05)
    server.simulator.fail_crosvm_connect()
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
    with pytest.raises(grpc.RpcError) as caught:
        stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=5)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    assert info.reason == "MMS_EIO"
    assert info.metadata["errno"] == "-5"
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)


def test_a_rebalance_the_server_refuses_itself_is_not_an_mms_refusal(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    # A reserved VM whose start is not finished: its balloon is not mms's to move yet.
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
    assert server.simulator is not None
    sent = server.simulator.request_counts[MessageType.REBALANCE_MEMORY]
    with pytest.raises(grpc.RpcError) as caught:
        stub.RebalanceMemory(
            pb.RebalanceMemoryRequest(
                deltas=[pb.BalloonDelta(vm_id=prepared.vm_id, delta_bytes=-4096)]
            ),
            timeout=5,
        )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(caught.value)
    # Its own reason, not MMS_EINVAL: mms never saw it, and says nothing about the VM.
    assert info.reason == "VM_NOT_RUNNING"
    assert "errno" not in info.metadata
    assert (info.metadata["vmId"], info.metadata["state"]) == (str(prepared.vm_id), "starting")
    assert info.metadata["field"] == "deltas[0].vm_id"
    assert server.simulator.request_counts[MessageType.REBALANCE_MEMORY] == sent
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=15)
