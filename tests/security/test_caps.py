"""The message-size and concurrent-RPC caps: what a caller past them gets."""

from __future__ import annotations

import time

import grpc
from api.conftest import start_server
from google.protobuf import duration_pb2

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import U32_MAX

from .conftest import RPC_TIMEOUT_S, rpc_code, rpc_status

WATCH_INTERVAL = duration_pb2.Duration(nanos=100_000_000)


def _stats_code(stub: pb_grpc.MemoryServiceStub, vm_ids: list[int]) -> tuple[grpc.StatusCode, str]:
    try:
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=vm_ids), timeout=RPC_TIMEOUT_S)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def test_a_request_over_the_configured_size_cap_is_resource_exhausted() -> None:
    server = start_server(max_receive_message_bytes=1024)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            # 1000 ids is within the API's own limit of 1024, but ~1.9 KiB on the wire.
            code, details = _stats_code(stub, list(range(1000)))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "Received message larger than max" in details
            assert "vs. 1024" in details
            # Under the cap the same call is answered (ids mms does not know are reported
            # missing), and the channel is still good.
            assert _stats_code(stub, list(range(100)))[0] == grpc.StatusCode.OK
    finally:
        server.stop(grace_s=1.0)


def test_the_default_size_cap_is_one_mebibyte() -> None:
    server = start_server()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            # 220,000 five-byte varints: 1.05 MiB, just over 1 MiB.
            code, details = _stats_code(stub, [U32_MAX] * 220_000)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert f"vs. {1 << 20}" in details
    finally:
        server.stop(grace_s=1.0)


def test_rpcs_past_the_concurrency_cap_are_resource_exhausted() -> None:
    cap = 3
    server = start_server(max_concurrent_rpcs=cap, max_workers=8)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            watches = [
                stub.WatchBalloonStats(
                    pb.WatchBalloonStatsRequest(interval=WATCH_INTERVAL), timeout=30
                )
                for _ in range(cap)
            ]
            try:
                for watch in watches:
                    next(watch)  # its first snapshot: this RPC is in progress on the server
                assert rpc_status(channel) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    "Concurrent RPC limit exceeded!",
                )
                # Ending one watch frees its slot: a new call gets through again.
                watches[0].cancel()
                deadline = time.monotonic() + RPC_TIMEOUT_S
                while (code := rpc_code(channel)) != grpc.StatusCode.OK:
                    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the cancelled watch's slot never freed"
                    time.sleep(0.01)
            finally:
                for watch in watches:
                    watch.cancel()
    finally:
        server.stop(grace_s=1.0)
