"""The reference: a minimal bridge of the same design, the bar the real bridge is measured against.

grpc.aio on one event loop, one connection thread that owns the mms socket, and GetBalloonStats
reads coalesced (callers arriving while a read is in flight share the next one); nothing else:
no validation, errors, metrics, deadlines or reconnects. It is written to be as fast as this
design allows, since a slow reference would make the targets that compare with it meaningless:
the next read goes out from the connection thread the moment the last answer is in, the answer
is decoded and its response serialized once per read while mms already works on the next, and
every caller of a read gets the same bytes. Run as ``bench._serve`` is: prints one JSON line
with its address, then serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import queue
import socket
import struct
import sys
import threading
import time
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from manatee_grpc import memory_service_pb2 as pb

METHOD = "GetBalloonStats"
SERVICE = "manatee.memory.v1.MemoryService"
HEADER = struct.Struct("<II")  # body length, message type: little-endian u32 each
GET_BALLOON_STATS, PREPARE_VM, FINISH_ADD_VM = 1, 3, 4
SESSION = "minimal-1"  # one connection for the process's life
BYTES = ("swap_in", "swap_out", "free_memory", "total_memory", "available_memory", "disk_caches")
API_NAMES = {name: f"{name}_bytes" for name in (*BYTES, "shared_memory", "unevictable_memory")}
API_NAMES |= {
    n: n for n in ("major_faults", "minor_faults", "hugetlb_allocations", "hugetlb_failures")
}
Waiters = list[tuple[tuple[int, ...], asyncio.Future[bytes]]]


class MinimalBridge:
    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop, vm_count: int) -> None:
        self._sock, self._loop = sock, loop
        self._all_ids = (0, *(self._start_vm() for _ in range(vm_count)))
        self._lock = threading.Lock()
        self._in_flight = False
        self._next: Waiters = []  # callers that arrived while a read was in flight
        self._idle: queue.SimpleQueue[Waiters] = queue.SimpleQueue()  # wakes the thread
        threading.Thread(target=self._serve_mms, daemon=True).start()

    async def get_balloon_stats(self, request: bytes, context: object) -> bytes:
        ids = tuple(pb.GetBalloonStatsRequest.FromString(request).vm_ids) if request else ()
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        with self._lock:
            joined = self._in_flight
            if joined:
                self._next.append((ids or self._all_ids, waiter))
            self._in_flight = True
        if not joined:
            self._idle.put([(ids or self._all_ids, waiter)])
        return await waiter

    def _serve_mms(self) -> None:
        """The connection thread: the socket's one owner, one read on the wire at a time."""
        batch = self._idle.get()
        self._send(batch)
        while True:
            body = self._receive()
            read_time_s = time.time()
            with self._lock:
                following, self._next = self._next, []
                self._in_flight = bool(following)
            if following:
                self._send(following)  # mms works on it while we answer this batch
            self._answer(batch, body, read_time_s)
            batch = following or self._idle.get()
            if not following:
                self._send(batch)

    def _send(self, batch: Waiters) -> None:
        ids = sorted({vm_id for vm_ids, _ in batch for vm_id in vm_ids})
        body = b'{"ids":[%s]}' % ",".join(map(str, ids)).encode()
        self._sock.sendall(HEADER.pack(len(body), GET_BALLOON_STATS) + body)

    def _receive(self) -> bytes:
        data = self._sock.recv(65536)
        while len(data) < HEADER.size or len(data) < HEADER.size + HEADER.unpack_from(data)[0]:
            data += self._sock.recv(65536)
        return data[HEADER.size :]

    def _answer(self, batch: Waiters, body: bytes, read_time_s: float) -> None:
        by_id = {entry["id"]: entry for entry in json.loads(body)["all_stats"]}
        seconds, nanos = divmod(int(read_time_s * 1e9), 1_000_000_000)
        encoded: dict[tuple[int, ...], bytes] = {}
        for vm_ids, _ in batch:
            if vm_ids not in encoded:
                encoded[vm_ids] = pb.GetBalloonStatsResponse(
                    stats=[_vm_stats(by_id[i]) for i in vm_ids if i in by_id],
                    missing_vm_ids=[i for i in vm_ids if i not in by_id],
                    read_time=Timestamp(seconds=seconds, nanos=nanos),
                    session=SESSION,
                ).SerializeToString()
        self._loop.call_soon_threadsafe(_wake, [(w, encoded[ids]) for ids, w in batch])

    def _start_vm(self) -> int:
        """Start one bench VM on the socket before serving (the thread does not run yet)."""
        prepared = self._call(PREPARE_VM, {"mem_size": 256 << 20, "init_mem_size": 256 << 20})
        self._call(FINISH_ADD_VM, {"id": prepared["id"]})
        return int(prepared["id"])

    def _call(self, msg_type: int, request: dict[str, int]) -> Any:
        body = json.dumps(request).encode()
        self._sock.sendall(HEADER.pack(len(body), msg_type) + body)
        return json.loads(self._receive())


def _vm_stats(entry: dict[str, Any]) -> pb.VmBalloonStats:
    present = {API_NAMES[k]: v for k, v in entry["stats"].items() if v is not None}
    return pb.VmBalloonStats(
        vm_id=entry["id"], balloon_actual_bytes=entry["balloon_actual"], **present
    )


def _wake(answers: list[tuple[asyncio.Future[bytes], bytes]]) -> None:
    for waiter, response in answers:
        if not waiter.done():  # its caller may have left
            waiter.set_result(response)


def _connect(address: str) -> socket.socket:
    if address.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address.removeprefix("unix://"))
        return sock
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


async def _serve(listen: str, mms: str, vm_count: int) -> None:
    loop = asyncio.get_running_loop()
    bridge = MinimalBridge(_connect(mms), loop, vm_count)
    server = grpc.aio.server()
    # No (de)serializers: the handler takes the request's bytes and returns the response's.
    methods: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
        METHOD: grpc.unary_unary_rpc_method_handler(bridge.get_balloon_stats)
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, methods)])
    port = server.add_insecure_port(listen)
    await server.start()
    address = listen if listen.startswith("unix:") else f"{listen.rpartition(':')[0]}:{port}"
    print(json.dumps({"address": address}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # the bench closes our stdin to stop us
    await server.stop(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._minimal")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--mms", required=True)
    parser.add_argument("--vms", type=int, default=8, help="VMs to start before serving")
    args = parser.parse_args()
    asyncio.run(_serve(args.listen, args.mms, args.vms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
