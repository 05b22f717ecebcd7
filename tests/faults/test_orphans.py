"""Orphan safety: a LaunchVm client process SIGKILLed at any step leaves no reservation behind.

The client is a real process (launch_child.py) that prints each step it reaches; the test waits
for that line (or for mms to have received the step's request) and kills it with SIGKILL: no
goodbye, its socket just dies. Steps: queued behind another launch, while mms reserves, in the
back-off between reservation attempts, after `reserved` while "starting" its VM, and after
`vm_started` while FinishAddVm is on the wire. Afterwards, through the public API only: no VM is
left but what the test itself holds, the CrOS balloon is back, the books balance (ListVms and
GetBalloonStats, see helpers.assert_conserved), and the next launch succeeds.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api.conftest import start_server
from api.helpers import request_count, simulator, wait_until

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType

from .helpers import (
    CALL_TIMEOUT_S,
    VM_MEM_BYTES,
    WAIT_S,
    LaunchStream,
    assert_conserved,
    cros_balloon_bytes,
    launches_waiting,
    listed_vm_ids,
    run_launch,
)

CHILD = Path(__file__).with_name("launch_child.py")
# Close to the CrOS guest's 8 GiB, all of it initial memory: the CrOS guest (2 GiB in use)
# cannot give that much, so every attempt falls short and the launch backs off.
HUGE_BYTES = 7 * 1024 * MIB
# Long enough that the kill lands while mms is still working on the request.
SLOW_S = 0.5
STEPS = ["queued", "reserving", "backing-off", "reserved", "vm-started"]


class Child:
    """launch_child.py in its own process, its stdout read line by line."""

    def __init__(self, target: str, mem_size_bytes: int, mode: str) -> None:
        # All of the VM's memory is initial memory: what the CrOS guest must give up front.
        self._proc = subprocess.Popen(
            [sys.executable, str(CHILD), target, str(mem_size_bytes), str(mem_size_bytes), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="child-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line.strip())
        self._lines.put(None)

    def expect(self, step: str) -> list[str]:
        """Wait for the line of ``step``; returns its words after the step name."""
        deadline = time.monotonic() + WAIT_S
        while True:
            line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"the child exited before {step!r}"
            word, *rest = line.split()
            assert word != "error", f"the child failed before {step!r}: {line}"
            if word == step:
                return rest

    def kill(self) -> None:
        """SIGKILL: the process dies at once, and its connections with it."""
        self._proc.kill()
        self._proc.wait(WAIT_S)
        self._reader.join(WAIT_S)
        assert self._proc.stdout is not None
        self._proc.stdout.close()


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    # A launch that falls short waits half a minute before its next attempt: the kill lands
    # in that back-off, never after it.
    server = start_server(launch_attempt_delays_s=(0.0, 30.0, 30.0, 30.0, 30.0))
    yield server
    server.stop(grace_s=1.0)


@pytest.mark.parametrize("step", STEPS)
def test_a_client_killed_at_any_step_of_a_launch_leaves_no_reservation(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub, step: str
) -> None:
    sim = simulator(server)
    cros_before = cros_balloon_bytes(stub)
    prepares, removes = (
        request_count(server, MessageType.PREPARE_VM),
        request_count(server, MessageType.REMOVE_VM),
    )
    finishes = request_count(server, MessageType.FINISH_ADD_VM)
    holder: LaunchStream | None = None
    if step == "queued":
        # The test's own launch holds mms's one pending start; the child queues behind it.
        holder = LaunchStream(stub, timeout_s=None)
        holder.start()
        holder.expect_reserved()
        prepares += 1
    if step == "reserving":
        sim.set_message_delay(MessageType.PREPARE_VM, SLOW_S)
    if step == "vm-started":
        sim.set_message_delay(MessageType.FINISH_ADD_VM, SLOW_S)
    mem_bytes = HUGE_BYTES if step == "backing-off" else VM_MEM_BYTES
    child = Child(server.address, mem_bytes, "start" if step == "vm-started" else "hold")
    try:
        child.expect("calling")
        if step == "queued":
            wait_until(lambda: launches_waiting(server) == 1, "the child's launch is queued")
        elif step == "reserving":
            wait_until(
                lambda: request_count(server, MessageType.PREPARE_VM) > prepares, "reserving"
            )
        elif step == "backing-off":
            attempt, shortfall_bytes = map(int, child.expect("progress"))
            assert attempt == 1 and shortfall_bytes > 0
        elif step == "reserved":
            child.expect("reserved")
        else:
            child.expect("vm-started")
            wait_until(
                lambda: request_count(server, MessageType.FINISH_ADD_VM) > finishes, "finishing"
            )
    finally:
        child.kill()

    if holder is not None:
        # The dead child's place in the queue is gone: the holder finishes and removes its VM.
        wait_until(lambda: launches_waiting(server) == 0, "the queue is empty")
        holder.vm_started()
        vm_id = holder.expect("launched").launched.vm_id
        holder.expect_ok_end()
        holder.close()
        stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=CALL_TIMEOUT_S)
        removes += 1
        # A launch killed while queued never reached mms at all.
        assert request_count(server, MessageType.PREPARE_VM) == prepares
    else:
        # Whatever the child's launch reserved, the server removed it, exactly once.
        wait_until(
            lambda: request_count(server, MessageType.REMOVE_VM) == removes + 1, "the rollback"
        )
        removes += 1
    sim.set_message_delay(MessageType.PREPARE_VM, 0.0)
    sim.set_message_delay(MessageType.FINISH_ADD_VM, 0.0)
    wait_until(lambda: listed_vm_ids(stub) == [0], "no VM is left")
    assert cros_balloon_bytes(stub) == cros_before
    assert_conserved(stub)
    # The next launch gets the pending start and succeeds; the books still balance with it.
    vm_id = run_launch(stub)
    assert listed_vm_ids(stub) == [0, vm_id]
    assert_conserved(stub)
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=CALL_TIMEOUT_S)
    assert request_count(server, MessageType.REMOVE_VM) == removes + 1
    assert_conserved(stub)


def test_the_child_is_a_real_launch_client(
    server: ManateeServer, channel: grpc.Channel, stub: pb_grpc.MemoryServiceStub
) -> None:
    """Left alone, the child launches a VM: what the kills interrupt is a working client."""
    child = Child(server.address, VM_MEM_BYTES, "start")
    try:
        (vm_id,) = map(int, child.expect("reserved"))
        assert child.expect("launched") == [str(vm_id)]
    finally:
        child.kill()
    assert listed_vm_ids(stub) == [0, vm_id]


# --- waiting costs no thread (I5) ----------------------------------------------------------------

QUIET_LAUNCHES = 200
# Threads gRPC itself may start while the few calls below run; the 200 launches must add none.
THREAD_SLACK = 4


def test_quiet_launches_hold_no_thread_and_leave_every_other_call_served(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    """200 launches that send `start` and then nothing (one reserved, 199 queued), from another
    process so that only the server's threads are counted here, with the default 64 workers."""
    assert server.config.max_workers == 64
    running_vm_id = run_launch(stub)

    def other_calls_answer() -> None:
        # Each within a generous deadline; what "fast" means is `make bench`'s business.
        stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
        for delta_bytes in (-4 * MIB, 4 * MIB):
            delta = pb.BalloonDelta(vm_id=running_vm_id, delta_bytes=delta_bytes)
            stub.RebalanceMemory(pb.RebalanceMemoryRequest(deltas=[delta]), timeout=CALL_TIMEOUT_S)

    other_calls_answer()  # the pool threads these calls use exist before counting
    threads_before = threading.active_count()
    child = Child(server.address, VM_MEM_BYTES, f"quiet={QUIET_LAUNCHES}")
    try:
        child.expect("calling")
        child.expect("reserved")
        # Nearly as many quiet launches as the old handler pool had threads (64) are queued.
        wait_until(lambda: launches_waiting(server) >= 60, "60 launches queue", timeout_s=WAIT_S)
        other_calls_answer()
        wait_until(
            lambda: launches_waiting(server) == QUIET_LAUNCHES - 1,
            "every other launch queues",
            timeout_s=3 * WAIT_S,
        )
        other_calls_answer()
        assert threading.active_count() <= threads_before + THREAD_SLACK
    finally:
        child.kill()
    # The child's death ends every launch: the queue empties and the reservation goes.
    wait_until(lambda: launches_waiting(server) == 0, "the queue is empty", timeout_s=3 * WAIT_S)
    wait_until(lambda: listed_vm_ids(stub) == [0, running_vm_id], "only the running VM is left")
    assert_conserved(stub)
