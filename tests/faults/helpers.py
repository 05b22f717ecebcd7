"""What the fault tests share: a killable mms, health and launch streams, and public-API checks.

Everything here talks to the server through gRPC, as a caller would; the only things read from
the inside are the simulator's own counters (what mms received) and, where a step of a launch
cannot be seen from outside, the server's queue of waiting launches.
"""

from __future__ import annotations

import gc
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest
from api.helpers import error_info, health_status, retry_delay_s, wait_until
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.sim import Scenario, Simulator

# Bound for anything that should happen "at once": only a broken build waits it out.
WAIT_S = 10.0
# Deadline of calls that are expected to end early (by a fault) or quickly.
CALL_TIMEOUT_S = 10.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAME = "manatee.memory.v1.MemoryService"
VM_MEM_BYTES = 512 * MIB
VM_INIT_BYTES = 256 * MIB


def expect_rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Run ``call``, which must fail; returns the error."""
    with pytest.raises(grpc.RpcError) as caught:
        result = call()
        raise AssertionError(f"expected the call to fail, got {result}")
    return caught.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, reason: str) -> None:
    assert isinstance(error, grpc.Call)
    assert (error.code(), error_info(error).reason) == (code, reason), error.details()


def assert_deadline_exceeded(error: grpc.RpcError) -> bool:
    """DEADLINE_EXCEEDED; True if the server's own status (with ErrorInfo) won the race.

    The server answers a little before the caller's deadline so its status usually arrives; on a
    loaded machine the client's own timer may fire first, with no details: the same code.
    """
    assert isinstance(error, grpc.Call)
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED, error.details()
    if rpc_status.from_call(error) is None:
        return False
    assert error_info(error).reason == "DEADLINE_EXCEEDED"
    return True


def assert_unavailable(error: grpc.RpcError, reason: str) -> None:
    """UNAVAILABLE with the reason, and a RetryInfo telling the caller when to try again."""
    assert_status(error, grpc.StatusCode.UNAVAILABLE, reason)
    delay_s = retry_delay_s(error)
    assert delay_s is not None and delay_s > 0


# --- resources of this process ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resources:
    threads: int
    fds: int
    rss_bytes: int

    def __str__(self) -> str:
        return f"{self.threads} threads, {self.fds} fds, {self.rss_bytes / MIB:.1f} MiB RSS"


def resources() -> Resources:
    """Threads, open fds and resident memory of this process (test, server and mms alike)."""
    gc.collect()  # count what is still referenced, not what waits for the collector
    rss_bytes = 0
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss_bytes = int(line.split()[1]) * 1024
    return Resources(threading.active_count(), len(os.listdir("/proc/self/fd")), rss_bytes)


# --- an mms that can be killed and brought back ---------------------------------------------------


class KillableMms:
    """The simulator on a fixed unix socket path: ``kill()`` it, ``restart()`` a fresh one there.

    A kill is mms dying: its socket goes away, the server's stream ends, and the next mms on the
    path knows nothing of the old one's VMs (a fresh process, as on a device).
    """

    def __init__(self, scenario: Scenario | None = None) -> None:
        self._scenario = scenario
        # /tmp, not pytest's tmp_path: a unix socket path must fit in 108 bytes.
        self._dir = tempfile.mkdtemp(prefix="mms-kill-")
        self.address = f"unix://{self._dir}/mms.sock"
        self.sim = Simulator(scenario, listen=self.address).start()
        self.kills = 0

    def kill(self) -> None:
        self.sim.stop()
        self.kills += 1

    def restart(self) -> None:
        self.sim = Simulator(self._scenario, listen=self.address).start()

    def close(self) -> None:
        self.sim.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


# --- health as a caller sees it -------------------------------------------------------------------


def wait_health(channel: grpc.Channel, status: int) -> None:
    """Both the server ("") and the memory service reach ``status``."""
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    wait_until(
        lambda: health_status(channel) == status and health_status(channel, SERVICE_NAME) == status,
        f"health is {name}",
    )


class HealthWatch:
    """A grpc.health.v1 Watch stream, recorded with arrival times: every change, none missed.

    Polling Check could miss a NOT_SERVING that lasts a millisecond (a reset after which the
    server redials at once); the Watch stream delivers each status the server sets, in order.
    """

    def __init__(self, channel: grpc.Channel) -> None:
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        self._call = watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        self._changed = threading.Condition()
        self._events: list[tuple[float, int]] = []
        self._thread = threading.Thread(target=self._read, name="health-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._call:
                with self._changed:
                    self._events.append((time.monotonic(), int(response.status)))
                    self._changed.notify_all()
        except grpc.RpcError:
            pass  # cancelled by close()

    def statuses(self) -> list[int]:
        with self._changed:
            return [status for _, status in self._events]

    def times_of(self, status: int) -> list[float]:
        with self._changed:
            return [at for at, seen in self._events if seen == status]

    def wait_for(self, *sequence: int, timeout_s: float = WAIT_S) -> None:
        """Wait until the statuses recorded contain ``sequence`` in order (maybe with others)."""

        def seen() -> bool:
            remaining = iter(status for _, status in self._events)
            return all(any(status == wanted for status in remaining) for wanted in sequence)

        with self._changed:
            assert self._changed.wait_for(seen, timeout_s), f"health went {self._events}"

    def close(self) -> None:
        self._call.cancel()
        self._thread.join(WAIT_S)


# --- the device through the public API ------------------------------------------------------------


def start_vm(
    stub: pb_grpc.MemoryServiceStub, mem_bytes: int = VM_MEM_BYTES, init_bytes: int = VM_INIT_BYTES
) -> int:
    """A running sibling VM, started one step at a time; returns its id."""
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=mem_bytes, init_mem_size_bytes=init_bytes),
        timeout=CALL_TIMEOUT_S,
    )
    assert prepared.reserved, prepared
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=CALL_TIMEOUT_S)
    return prepared.vm_id


def session(stub: pb_grpc.MemoryServiceStub) -> int:
    """The number of the server's current mms session: 1 at the first connect, +1 per reset."""
    return session_number(stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S).session)


def session_number(session_id: str) -> int:
    """The connection's number inside an opaque session id (tests know the server's format;
    callers must not: they compare ids for equality only)."""
    return int(session_id.rsplit("-", 1)[1]) if session_id else 0


def watch_snapshots(stub: pb_grpc.MemoryServiceStub, count: int) -> list[pb.BalloonStatsSnapshot]:
    """The first ``count`` messages of a 100 ms watch of every VM, each asserted a snapshot."""
    interval = duration_pb2.Duration(nanos=100_000_000)
    call = stub.WatchBalloonStats(pb.WatchBalloonStatsRequest(interval=interval), timeout=60.0)
    snapshots = []
    try:
        for message in call:
            assert message.WhichOneof("event") == "snapshot", message
            snapshots.append(message.snapshot)
            if len(snapshots) == count:
                break
    finally:
        call.cancel()
    return snapshots


def listed_vm_ids(stub: pb_grpc.MemoryServiceStub) -> list[int]:
    return [vm.vm_id for vm in stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S).vms]


def cros_balloon_bytes(stub: pb_grpc.MemoryServiceStub) -> int:
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    assert [entry.vm_id for entry in response.stats] == [0]
    return response.stats[0].balloon_actual_bytes


def assert_conserved(stub: pb_grpc.MemoryServiceStub) -> None:
    """mms's books balance, seen only through ListVms and GetBalloonStats.

    With no start pending, everything the CrOS guest's balloon holds for siblings (the client's
    part of it) is what the running siblings hold outside their own balloons plus mms's overhead
    for each: ``cros_balloon == sum(mem - balloon + extra_bytes(mem))``. A leaked reservation
    shows up as a VM still STARTING, or as CrOS balloon that no sibling accounts for.
    """
    vms = stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S).vms
    assert [vm.vm_id for vm in vms if vm.state != pb.VM_STATE_RUNNING] == [], vms
    siblings = {vm.vm_id: vm for vm in vms if not vm.cros_guest}
    stats = stub.GetBalloonStats(
        pb.GetBalloonStatsRequest(vm_ids=[0, *siblings]), timeout=CALL_TIMEOUT_S
    )
    assert list(stats.missing_vm_ids) == []
    balloon_bytes = {entry.vm_id: entry.balloon_actual_bytes for entry in stats.stats}
    held_bytes = sum(
        vm.mem_size_bytes - balloon_bytes[vm_id] + extra_bytes(vm.mem_size_bytes)
        for vm_id, vm in siblings.items()
    )
    assert balloon_bytes[0] == held_bytes, (balloon_bytes, siblings)


def launches_waiting(server: ManateeServer) -> int:
    """Launches queued for mms's one pending start: invisible from outside, so read inside."""
    return server.bridge.slot.launches_waiting()


# --- a LaunchVm stream driven step by step -------------------------------------------------------


@dataclass
class LaunchStream:
    """One LaunchVm call whose requests the test sends only after it has seen what came back."""

    stub: pb_grpc.MemoryServiceStub
    timeout_s: float | None = CALL_TIMEOUT_S
    _requests: queue.Queue[pb.LaunchVmRequest | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        self.call = self.stub.LaunchVm(self._request_stream(), timeout=self.timeout_s)

    def _request_stream(self) -> Iterator[pb.LaunchVmRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def send(self, request: pb.LaunchVmRequest) -> None:
        self._requests.put(request)

    def start(self, mem_bytes: int = VM_MEM_BYTES, init_bytes: int = VM_INIT_BYTES) -> None:
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_bytes, init_mem_size_bytes=init_bytes)
        self.send(pb.LaunchVmRequest(start=start))

    def vm_started(self) -> None:
        self.send(pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()))

    def vm_start_failed(self) -> None:
        failed = pb.LaunchVmRequest.VmStartFailed(reason="the test said so")
        self.send(pb.LaunchVmRequest(vm_start_failed=failed))

    def next_event(self) -> pb.LaunchVmResponse:
        return next(self.call)

    def expect(self, kind: str) -> pb.LaunchVmResponse:
        response = self.next_event()
        assert response.WhichOneof("event") == kind, response
        return response

    def expect_reserved(self) -> int:
        """The first attempt reserves everything; returns the VM id."""
        return self.expect("reserved").reserved.vm_id

    def events_until_error(self) -> tuple[list[str], grpc.RpcError]:
        """The events still to come, then the error the stream ends with."""
        kinds: list[str] = []
        with pytest.raises(grpc.RpcError) as caught:
            for response in self.call:
                kinds.append(str(response.WhichOneof("event")))
        return kinds, caught.value

    def expect_ok_end(self) -> None:
        with pytest.raises(StopIteration):
            self.next_event()
        assert self.call.code() == grpc.StatusCode.OK

    def half_close(self) -> None:
        """End the client's side of the stream, as a client that has nothing more to say."""
        self._requests.put(None)

    def close(self) -> None:
        self.call.cancel()  # a no-op once the stream has ended
        self._requests.put(None)  # let gRPC's request-reading thread finish


def run_launch(stub: pb_grpc.MemoryServiceStub, mem_bytes: int = VM_MEM_BYTES) -> int:
    """A whole successful launch; returns the new VM's id."""
    stream = LaunchStream(stub)
    try:
        stream.start(mem_bytes)
        vm_id = stream.expect_reserved()
        stream.vm_started()
        assert stream.expect("launched").launched.vm_id == vm_id
        stream.expect_ok_end()
    finally:
        stream.close()
    return vm_id
