"""A LaunchVm client in a process of its own, for the orphan tests to SIGKILL at any step.

Usage: ``python launch_child.py TARGET MEM_SIZE_BYTES INIT_MEM_SIZE_BYTES {hold,start,quiet=N}``.
With ``hold`` it never answers `reserved` (its VM "is still starting"); with ``start`` it
answers `vm_started` at once; with ``quiet=N`` it opens N launches on one channel, each sending
`start` and nothing more (one is reserved, the others queue), printing ``reserved VM_ID`` for the
one that is reserved. It uses grpc.aio there, so its N streams cost it no N threads.
It prints one line per step it reaches, flushed, so the test can synchronise on them:
``calling``, ``progress ATTEMPT SHORTFALL_BYTES``, ``reserved VM_ID``, ``vm-started VM_ID``,
``launched VM_ID``, ``error CODE``. Then it waits (for the next event, or for its death).
"""

from __future__ import annotations

import asyncio
import queue
import sys
from collections.abc import Iterator

import grpc

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc


async def quiet_launches(target: str, start: pb.LaunchVmRequest.Start, count: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        calls = [stub.LaunchVm() for _ in range(count)]
        for call in calls:
            await call.write(pb.LaunchVmRequest(start=start))
        print("calling", flush=True)

        async def watch(call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
            async for response in call:
                if response.WhichOneof("event") == "reserved":
                    print("reserved", response.reserved.vm_id, flush=True)

        await asyncio.gather(*(watch(call) for call in calls), return_exceptions=True)


def main() -> int:
    target, mode = sys.argv[1], sys.argv[4]
    mem_size_bytes, init_mem_size_bytes = int(sys.argv[2]), int(sys.argv[3])
    if mode.startswith("quiet="):
        start = pb.LaunchVmRequest.Start(
            mem_size_bytes=mem_size_bytes, init_mem_size_bytes=init_mem_size_bytes
        )
        asyncio.run(quiet_launches(target, start, int(mode.removeprefix("quiet="))))
        return 0
    outbox: queue.Queue[pb.LaunchVmRequest] = queue.Queue()
    start = pb.LaunchVmRequest.Start(
        mem_size_bytes=mem_size_bytes, init_mem_size_bytes=init_mem_size_bytes
    )
    outbox.put(pb.LaunchVmRequest(start=start))

    def requests() -> Iterator[pb.LaunchVmRequest]:
        while True:
            yield outbox.get()

    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.MemoryServiceStub(channel).LaunchVm(requests())
        print("calling", flush=True)
        try:
            for response in call:
                event = response.WhichOneof("event")
                if event == "progress":
                    progress = response.progress
                    print("progress", progress.attempt, progress.shortfall_bytes, flush=True)
                elif event == "reserved":
                    vm_id = response.reserved.vm_id
                    print("reserved", vm_id, flush=True)
                    if mode == "start":
                        outbox.put(pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()))
                        print("vm-started", vm_id, flush=True)
                elif event == "launched":
                    print("launched", response.launched.vm_id, flush=True)
        except grpc.RpcError as error:
            print("error", error.code().name, flush=True)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
