"""A client in its own process (so the test counts only the server's threads): it opens the
load the thread test asks for and keeps it open until its stdin closes.

argv: TARGET. Starts the PrepareVm calls and prints ``prepares``; on a line from stdin, starts
the rest and prints ``open`` (the launches must queue behind the start the PrepareVm calls opened,
not take it first).
- 20 bare PrepareVm calls (they wait together on mms's one start and its lease);
- 12 LaunchVm streams that send `start` and then nothing (queued for the pending start);
- 30 WatchBalloonStats streams with 30 distinct intervals (0.1 s .. 3.0 s).
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from google.protobuf import duration_pb2

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc

MIB = 1024 * 1024
PREPARES = 20
LAUNCHES = 12
WATCHERS = 30


async def main(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        calls: list[object] = []
        for _ in range(PREPARES):
            request = pb.PrepareVmRequest(mem_size_bytes=512 * MIB, init_mem_size_bytes=256 * MIB)
            calls.append(asyncio.ensure_future(stub.PrepareVm(request)))
        print("prepares", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.readline)
        for _ in range(LAUNCHES):
            launch = stub.LaunchVm()
            start = pb.LaunchVmRequest()
            start.start.mem_size_bytes = 512 * MIB
            start.start.init_mem_size_bytes = 256 * MIB
            await launch.write(start)
            calls.append(launch)
        for index in range(WATCHERS):
            interval = duration_pb2.Duration()
            interval.FromMilliseconds(100 * (index + 1))
            watch = stub.WatchBalloonStats(pb.WatchBalloonStatsRequest(interval=interval))
            calls.append(watch)
        print("open", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
