"""A small MemoryService client written against the generated stubs; mypy --strict accepts it.

tests/test_typing.py checks this file and its misspelt twin, bad_client.py.txt: together they
prove the generated .pyi stubs carry real types rather than Any.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from google.protobuf.duration_pb2 import Duration

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc

MiB = 1024 * 1024


def balloon_sizes(channel: grpc.Channel, vm_ids: list[int]) -> dict[int, int]:
    """Balloon size in bytes of each VM mms answered for."""
    stub = pb_grpc.MemoryServiceStub(channel)
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=vm_ids), timeout=5.0)
    return {stats.vm_id: stats.balloon_actual_bytes for stats in response.stats}


def free_memory_bytes(stats: pb.VmBalloonStats) -> int | None:
    # Guest statistics are optional: a field the guest did not report is absent, not 0.
    return stats.free_memory_bytes if stats.HasField("free_memory_bytes") else None


def give_memory(channel: grpc.Channel, vm_id: int, size_bytes: int) -> bool:
    """Deflate ``vm_id``'s balloon by ``size_bytes``; True if mms moved all of it."""
    stub = pb_grpc.MemoryServiceStub(channel)
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=-size_bytes)]
    )
    return stub.RebalanceMemory(request).fully_applied


def reserve(channel: grpc.Channel, mem_size_bytes: int) -> pb.PrepareVmResponse:
    stub = pb_grpc.MemoryServiceStub(channel)
    request = pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes, init_mem_size_bytes=512 * MiB)
    return stub.PrepareVm(request)


def watch_sessions(channel: grpc.Channel) -> Iterator[str]:
    """The mms session of every snapshot, once a second."""
    stub = pb_grpc.MemoryServiceStub(channel)
    request = pb.WatchBalloonStatsRequest(interval=Duration(seconds=1))
    for event in stub.WatchBalloonStats(request):
        if event.WhichOneof("event") == "snapshot":
            yield event.snapshot.session


def launch(channel: grpc.Channel, requests: Iterator[pb.LaunchVmRequest]) -> pb.VmInfo | None:
    """Run a LaunchVm stream to its end; the launched VM, or None if the server stopped it."""
    stub = pb_grpc.MemoryServiceStub(channel)
    for response in stub.LaunchVm(requests):
        match response.WhichOneof("event"):
            case "launched":
                return response.launched.vm
            case "stop_vm":
                return None
            case "progress" | "reserved" | None:
                continue
    return None


def start_request(mem_size_bytes: int) -> pb.LaunchVmRequest:
    return pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes))


def running(vms: pb.ListVmsResponse) -> list[int]:
    return [vm.vm_id for vm in vms.vms if vm.state == pb.VM_STATE_RUNNING and not vm.cros_guest]
