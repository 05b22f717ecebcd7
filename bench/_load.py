"""Client load, run in worker processes (spawned, so no gRPC state crosses a fork).

Every function here is a top-level picklable entry point: unary load over grpc.aio, the direct
mms baseline over the project's own codec, a crowd of WatchBalloonStats streams, and a crowd
of quiet LaunchVm streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from typing import Any

import grpc
from grpc import aio

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms import _transport, _wire
from manatee_grpc.mms._messages import (
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    MmsRequest,
    PrepareVmRequest,
)

FLOOR_METHOD = "/bench.Floor/Noop"
MIB = 1 << 20
VM_MEM_BYTES = 256 * MIB
CALL_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class LoadResult:
    latencies_s: list[float]  # calls that started inside the window
    calls_total: int  # every call made, warm-up included
    errors: int


def _identity(data: bytes) -> bytes:
    return data


def run_unary(target: str, method: str, concurrency: int, start_at: float, end_at: float) -> Any:
    """``concurrency`` callers of ``method`` ("floor", "stats" or "rebalance": a delta of 0 for
    the first running sibling, which still goes to mms) until ``end_at`` (monotonic)."""
    return asyncio.run(_unary(target, method, concurrency, start_at, end_at))


async def _unary(
    target: str, method: str, concurrency: int, start_at: float, end_at: float
) -> LoadResult:
    latencies_s: list[float] = []
    counts = {"total": 0, "errors": 0}
    async with aio.insecure_channel(target) as channel:
        await channel.channel_ready()
        if method == "floor":
            floor = channel.unary_unary(
                FLOOR_METHOD, request_serializer=_identity, response_deserializer=_identity
            )

            async def call() -> None:
                await floor(b"", timeout=CALL_TIMEOUT_S)

        elif method == "rebalance":
            stub = pb_grpc.MemoryServiceStub(channel)
            listed = await stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
            sibling = next(
                vm.vm_id for vm in listed.vms if vm.state == pb.VM_STATE_RUNNING and vm.vm_id
            )
            rebalance = pb.RebalanceMemoryRequest(
                deltas=[pb.BalloonDelta(vm_id=sibling, delta_bytes=0)]
            )

            async def call() -> None:
                await stub.RebalanceMemory(rebalance, timeout=CALL_TIMEOUT_S)

        else:
            stub = pb_grpc.MemoryServiceStub(channel)
            request = pb.GetBalloonStatsRequest()

            async def call() -> None:
                await stub.GetBalloonStats(request, timeout=CALL_TIMEOUT_S)

        async def caller() -> None:
            while True:
                started = time.monotonic()
                if started >= end_at:
                    return
                try:
                    await call()
                except grpc.RpcError:
                    counts["errors"] += 1
                counts["total"] += 1
                if started >= start_at:
                    latencies_s.append(time.monotonic() - started)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
    return LoadResult(latencies_s, counts["total"], counts["errors"])


def _round_trip(sock: socket.socket, request: MmsRequest[Any]) -> Any:
    sock.sendall(_wire.encode_request(request))
    header = _wire.decode_header(_transport.recv_exactly(sock, _wire.HEADER_SIZE_BYTES))
    _wire.check_response_header(header, request.TYPE)
    return _wire.decode_response(request, _transport.recv_exactly(sock, header.body_len_bytes))


def run_direct(mms: str, vm_count: int, start_at: float, end_at: float) -> Any:
    """GetBalloonStats straight on the mms socket, one at a time, no gRPC: the backend floor."""
    sock = _transport.connect(_transport.parse_address(mms), 5.0)
    latencies_s: list[float] = []
    total = 0
    try:
        vm_ids = [0]
        for _ in range(vm_count):
            prepared = _round_trip(sock, PrepareVmRequest(VM_MEM_BYTES, VM_MEM_BYTES))
            _round_trip(sock, FinishAddVmRequest(prepared.vm_id))
            vm_ids.append(prepared.vm_id)
        request = GetBalloonStatsRequest(tuple(vm_ids))
        while (started := time.monotonic()) < end_at:
            _round_trip(sock, request)
            total += 1
            if started >= start_at:
                latencies_s.append(time.monotonic() - started)
    finally:
        sock.close()
    return LoadResult(latencies_s, total, 0)


def run_watchers(
    target: str, watchers: int, interval_s: float, commands: Queue[str], reports: Queue[Any]
) -> None:
    """Open ``watchers`` streams; report "ready" once each has a snapshot; stop on a command."""
    asyncio.run(_watchers(target, watchers, interval_s, commands, reports))


async def _watchers(
    target: str, watchers: int, interval_s: float, commands: Queue[str], reports: Queue[Any]
) -> None:
    per_channel = 100
    channels = [
        aio.insecure_channel(target) for _ in range((watchers + per_channel - 1) // per_channel)
    ]
    received = [0] * watchers
    dropped = [0] * watchers
    errors: list[str] = []
    firsts = [asyncio.Event() for _ in range(watchers)]
    request = pb.WatchBalloonStatsRequest()
    request.interval.FromNanoseconds(round(interval_s * 1e9))
    calls = [
        pb_grpc.MemoryServiceStub(channels[i // per_channel]).WatchBalloonStats(request)
        for i in range(watchers)
    ]

    async def consume(index: int) -> None:
        try:
            async for message in calls[index]:
                received[index] += 1
                dropped[index] += message.dropped_updates
                firsts[index].set()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                errors.append(f"{error.code().name}: {error.details()}")
        finally:
            firsts[index].set()

    tasks = [asyncio.create_task(consume(i)) for i in range(watchers)]
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in firsts)), 120.0)
    reports.put("ready" if not errors else f"error {errors[0]} ({len(errors)} streams)")
    await loop.run_in_executor(None, commands.get)  # "stop"
    counted = list(received)
    for call in calls:
        call.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for channel in channels:
        await channel.close()
    reports.put({"received": sum(counted), "dropped": sum(dropped), "errors": len(errors)})


def run_quiet_launches(
    target: str, launches: int, commands: Queue[str], reports: Queue[Any]
) -> None:
    """Open ``launches`` LaunchVm streams that send `start` and then nothing; report "ready"
    once one is reserved (the rest queue behind it); cancel them all on a command."""
    asyncio.run(_quiet_launches(target, launches, commands, reports))


async def _quiet_launches(
    target: str, launches: int, commands: Queue[str], reports: Queue[Any]
) -> None:
    start = pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=VM_MEM_BYTES))
    async with aio.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        calls = [stub.LaunchVm() for _ in range(launches)]
        for call in calls:
            await call.write(start)
        reserved = asyncio.Event()

        async def watch(call: Any) -> None:
            with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
                async for response in call:
                    if response.WhichOneof("event") == "reserved":
                        reserved.set()

        tasks = [asyncio.create_task(watch(call)) for call in calls]
        await asyncio.wait_for(reserved.wait(), 60.0)
        reports.put("ready")
        await asyncio.get_running_loop().run_in_executor(None, commands.get)  # "stop"
        for call in calls:
            call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    reports.put("stopped")
