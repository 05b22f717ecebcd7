"""mms dies in the middle of each kind of RPC, and comes back: the server follows it through.

Every caller waiting on mms gets UNAVAILABLE (MMS_CONNECTION_LOST, with RetryInfo) at once, not
at its deadline, and so does one queued behind it (or arriving just after: MMS_UNAVAILABLE), which
says it was not sent (ErrorInfo ``reachedMms: "false"``, its own message type);
health goes NOT_SERVING while mms is away; when a new mms listens on the same socket the server
redials (10 ms backoff doubling to 50 ms), health goes SERVING, the session number goes up by
one, VMs of the dead session are reported gone (NOT_FOUND SESSION_RESET, missing from stats,
absent from ListVms), and new calls succeed with the books balanced.

"In the middle" is made deterministic with the simulator's per-message delay: the request is on
the wire (mms counted it) and its answer is a minute away when mms is killed. ListVms is served
from the server's books and never waits on mms; WatchBalloonStats outlives a reset by design
(the reset arrives in-stream), so both are checked for what they do instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import pytest
from api.helpers import error_info, wait_until
from google.protobuf import duration_pb2

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType

from .helpers import (
    CALL_TIMEOUT_S,
    NOT_SERVING,
    SERVING,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    KillableMms,
    LaunchStream,
    Resources,
    assert_conserved,
    assert_status,
    assert_unavailable,
    expect_rpc_error,
    listed_vm_ids,
    resources,
    session,
    session_number,
    start_vm,
    wait_health,
)

# An answer this far away has certainly not come when mms is killed.
ANSWER_DELAY_S = 60.0

Outcome = tuple[list[str], grpc.RpcError]  # stream events before the error, and the error


@dataclass
class InFlight:
    """An RPC set up to be waiting on mms (or on its client) when mms dies."""

    waits_on: MessageType | None  # the mms request on the wire; None: nothing is on the wire
    run: Callable[[], Outcome]
    events: list[str]  # what a launch stream says before its error ([] for unary calls)
    close: Callable[[], None] = lambda: None


def _unary(call: Callable[[], object]) -> Callable[[], Outcome]:
    return lambda: ([], expect_rpc_error(call))


def _stats(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    request = pb.GetBalloonStatsRequest(vm_ids=[0, old_vm_id])
    return InFlight(
        MessageType.GET_BALLOON_STATS,
        _unary(lambda: stub.GetBalloonStats(request, timeout=CALL_TIMEOUT_S)),
        [],
    )


def _rebalance(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=old_vm_id, delta_bytes=-64 * MIB)]
    )
    return InFlight(
        MessageType.REBALANCE_MEMORY,
        _unary(lambda: stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S)),
        [],
    )


def _prepare(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    request = pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES)
    return InFlight(
        MessageType.PREPARE_VM, _unary(lambda: stub.PrepareVm(request, timeout=CALL_TIMEOUT_S)), []
    )


def _finish(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES),
        timeout=CALL_TIMEOUT_S,
    )
    request = pb.FinishAddVmRequest(vm_id=prepared.vm_id)
    return InFlight(
        MessageType.FINISH_ADD_VM,
        _unary(lambda: stub.FinishAddVm(request, timeout=CALL_TIMEOUT_S)),
        [],
    )


def _remove(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    request = pb.RemoveVmRequest(vm_id=old_vm_id)
    return InFlight(
        MessageType.REMOVE_VM, _unary(lambda: stub.RemoveVm(request, timeout=CALL_TIMEOUT_S)), []
    )


def _launch_reserving(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    """mms dies while it reserves: no `reserved` was sent, so nothing is asked to stop."""
    stream = LaunchStream(stub)

    def run() -> Outcome:
        stream.start()
        return stream.events_until_error()

    return InFlight(MessageType.PREPARE_VM, run, [], stream.close)


def _launch_waiting_for_client(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    """mms dies while the launch waits for its client: the client must stop the VM it started."""
    stream = LaunchStream(stub)
    stream.start()
    stream.expect_reserved()
    return InFlight(None, stream.events_until_error, ["stop_vm"], stream.close)


def _launch_finishing(stub: pb_grpc.MemoryServiceStub, old_vm_id: int) -> InFlight:
    """mms dies during FinishAddVm: the VM the client started has lost its memory service."""
    stream = LaunchStream(stub)
    stream.start()
    stream.expect_reserved()

    def run() -> Outcome:
        stream.vm_started()
        return stream.events_until_error()

    return InFlight(MessageType.FINISH_ADD_VM, run, ["stop_vm"], stream.close)


KINDS: dict[str, Callable[[pb_grpc.MemoryServiceStub, int], InFlight]] = {
    "GetBalloonStats": _stats,
    "RebalanceMemory": _rebalance,
    "PrepareVm": _prepare,
    "FinishAddVm": _finish,
    "RemoveVm": _remove,
    "LaunchVm-reserving": _launch_reserving,
    "LaunchVm-waiting-for-client": _launch_waiting_for_client,
    "LaunchVm-finishing": _launch_finishing,
}


def kill_mid_rpc_and_recover(
    kind: str,
    mms: KillableMms,
    channel: grpc.Channel,
    stub: pb_grpc.MemoryServiceStub,
    pool: ThreadPoolExecutor,
) -> None:
    """One kill/restart cycle with every check of the module docstring."""
    old_vm_id = start_vm(stub)
    old_session = session(stub)
    in_flight = KINDS[kind](stub, old_vm_id)
    try:
        if in_flight.waits_on is not None:
            sent_before = mms.sim.request_counts[in_flight.waits_on]
            mms.sim.set_message_delay(in_flight.waits_on, ANSWER_DELAY_S)
        outcome = pool.submit(in_flight.run)
        behind = None
        if in_flight.waits_on is not None:
            msg_type = in_flight.waits_on
            wait_until(
                lambda: mms.sim.request_counts[msg_type] > sent_before, "the request is on the wire"
            )
            # Another caller, queued behind it (or, if it loses the race, arriving just after
            # the kill): it must not wait for its deadline either.
            behind = pool.submit(
                expect_rpc_error,
                lambda: stub.GetBalloonStats(
                    pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S
                ),
            )
        mms.kill()
        events, error = outcome.result(timeout=CALL_TIMEOUT_S)
        behind_error = None if behind is None else behind.result(timeout=CALL_TIMEOUT_S)
    finally:
        in_flight.close()
    # UNAVAILABLE, not DEADLINE_EXCEEDED: nobody waited for its deadline.
    assert events == in_flight.events
    assert_unavailable(error, "MMS_CONNECTION_LOST")
    if in_flight.waits_on is not None:
        # Its request was on the wire: a retry may find it applied (or dropped with the VMs).
        assert error_info(error).metadata["reachedMms"] == "true"
    if behind_error is not None:
        info = error_info(behind_error)
        assert info.reason in ("MMS_CONNECTION_LOST", "MMS_UNAVAILABLE")
        assert_unavailable(behind_error, info.reason)
        # It never reached mms, and says so about itself, not about the request on the wire.
        assert (info.metadata["reachedMms"], info.metadata["messageType"]) == (
            "false",
            "GET_BALLOON_STATS",
        )
        assert "not sent" in str(behind_error.details())

    # mms is away: health says so, and calls that need it fail fast with MMS_UNAVAILABLE.
    wait_health(channel, NOT_SERVING)
    down = expect_rpc_error(
        lambda: stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
    )
    assert_unavailable(down, "MMS_UNAVAILABLE")
    assert error_info(down).metadata["reachedMms"] == "false"
    assert old_vm_id not in listed_vm_ids(stub)

    # A new mms on the same socket: the server redials by itself, as a new session.
    mms.restart()
    wait_health(channel, SERVING)
    assert session(stub) == old_session + 1
    gone = expect_rpc_error(
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=old_vm_id), timeout=CALL_TIMEOUT_S)
    )
    assert_status(gone, grpc.StatusCode.NOT_FOUND, "SESSION_RESET")
    assert session_number(error_info(gone).metadata["vmSession"]) == old_session
    stats = stub.GetBalloonStats(
        pb.GetBalloonStatsRequest(vm_ids=[0, old_vm_id]), timeout=CALL_TIMEOUT_S
    )
    assert (list(stats.missing_vm_ids), session_number(stats.session)) == (
        [old_vm_id],
        old_session + 1,
    )
    assert listed_vm_ids(stub) == [0]

    # New calls succeed, and the new mms's books balance.
    new_vm_id = start_vm(stub)
    assert_conserved(stub)
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=new_vm_id), timeout=CALL_TIMEOUT_S)
    assert_conserved(stub)


@pytest.mark.parametrize("kind", list(KINDS))
def test_mms_killed_mid_rpc_fails_the_caller_fast_and_the_server_recovers(
    kind: str, mms: KillableMms, channel: grpc.Channel, stub: pb_grpc.MemoryServiceStub
) -> None:
    with ThreadPoolExecutor(max_workers=2) as pool:
        kill_mid_rpc_and_recover(kind, mms, channel, stub, pool)
    assert mms.kills == 1


def test_list_vms_never_waits_on_mms_and_never_lists_a_dead_sessions_vm(
    mms: KillableMms, stub: pb_grpc.MemoryServiceStub
) -> None:
    vm_id = start_vm(stub)
    # Even with mms stuck on another request, ListVms answers from the server's books.
    mms.sim.set_message_delay(MessageType.GET_BALLOON_STATS, ANSWER_DELAY_S)
    with ThreadPoolExecutor(max_workers=1) as pool:
        stuck = pool.submit(
            lambda: expect_rpc_error(
                lambda: stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
            )
        )
        wait_until(
            lambda: mms.sim.request_counts[MessageType.GET_BALLOON_STATS] > 0, "stats on the wire"
        )
        # Answered from the server's books while the stats read is stuck on mms: one that waited
        # on mms would wait until the kill below, which comes only after this returns.
        listed = stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
        assert [vm.vm_id for vm in listed.vms] == [0, vm_id]
        assert session_number(listed.session) == 1
        mms.kill()
        assert_unavailable(stuck.result(timeout=CALL_TIMEOUT_S), "MMS_CONNECTION_LOST")
    # While mms is away there is no session to list VMs of; the dead one's are not shown.
    wait_until(lambda: vm_id not in listed_vm_ids(stub), "the dead session's VM is not listed")
    mms.restart()
    wait_until(lambda: session(stub) == 2, "a new session")
    assert listed_vm_ids(stub) == [0]


def test_a_watch_outlives_mms_dying_mid_poll_and_hears_of_the_reset_in_stream(
    mms: KillableMms, channel: grpc.Channel, stub: pb_grpc.MemoryServiceStub
) -> None:
    old_vm_id = start_vm(stub)
    interval = duration_pb2.Duration()
    interval.FromMilliseconds(100)
    watch = stub.WatchBalloonStats(
        pb.WatchBalloonStatsRequest(interval=interval), timeout=CALL_TIMEOUT_S
    )
    try:
        first = next(watch)
        assert session_number(first.snapshot.session) == 1
        assert [entry.vm_id for entry in first.snapshot.stats] == [0, old_vm_id]
        polls = mms.sim.request_counts[MessageType.GET_BALLOON_STATS]
        mms.sim.set_message_delay(MessageType.GET_BALLOON_STATS, ANSWER_DELAY_S)
        wait_until(
            lambda: mms.sim.request_counts[MessageType.GET_BALLOON_STATS] > polls,
            "a watch poll is on the wire",
        )
        mms.kill()
        wait_health(channel, NOT_SERVING)
        mms.restart()
        # The stream was never broken: the outage is an event, next comes the reset, then the
        # new session's snapshots. Snapshots of the old session read before the kill may come
        # first; none after the reset.
        seen_reset = False
        while True:
            response = next(watch)
            if response.HasField("mms_unavailable"):
                assert not seen_reset
                continue
            if response.HasField("session_reset"):
                reset = response.session_reset
                assert session_number(reset.previous_session) == 1
                assert session_number(reset.session) == 2
                seen_reset = True
                continue
            if seen_reset:
                assert session_number(response.snapshot.session) == 2
                assert [entry.vm_id for entry in response.snapshot.stats] == [0]
                break
            assert session_number(response.snapshot.session) == 1
    finally:
        watch.cancel()
    wait_health(channel, SERVING)


# --- a hundred deaths: nothing may grow ---------------------------------------------------------

WARM_UP_CYCLES = 8
MEASURED_CYCLES = 100
# The server has no handler pool (every call waits on the event loop); gRPC's own threads may
# come and go by one or two. A leak of one thread per kill would show as +100.
THREAD_TOLERANCE = 2
# A leaked socket per kill (the old mms stream) would show as +100; gRPC may hold a pipe or
# socket of its own a little longer.
FD_TOLERANCE = 2
# CPython's allocator keeps freed arenas, so RSS moves a little with churn (within +-0.3 MiB
# over 100 kills when measured); 4 MiB still catches a leak of 40 KiB or more per kill.
RSS_TOLERANCE_BYTES = 4 * MIB


def test_a_hundred_kills_leak_no_threads_fds_or_memory(
    server: ManateeServer, mms: KillableMms, channel: grpc.Channel, stub: pb_grpc.MemoryServiceStub
) -> None:
    kinds = list(KINDS)
    with ThreadPoolExecutor(max_workers=2) as pool:
        # Warm up: every kind once, so pools, caches and lazily made objects exist already.
        for cycle in range(WARM_UP_CYCLES):
            kill_mid_rpc_and_recover(kinds[cycle % len(kinds)], mms, channel, stub, pool)
        before = resources()
        started = time.monotonic()
        for cycle in range(MEASURED_CYCLES):
            kill_mid_rpc_and_recover(kinds[cycle % len(kinds)], mms, channel, stub, pool)
        elapsed_s = time.monotonic() - started
        after = _settled(before)
    assert mms.kills == WARM_UP_CYCLES + MEASURED_CYCLES
    assert session(stub) == WARM_UP_CYCLES + MEASURED_CYCLES + 1
    print(f"{MEASURED_CYCLES} kills in {elapsed_s:.1f} s; before: {before}; after: {after}")
    assert after.threads <= before.threads + THREAD_TOLERANCE, (before, after)
    assert after.fds <= before.fds + FD_TOLERANCE, (before, after)
    assert after.rss_bytes <= before.rss_bytes + RSS_TOLERANCE_BYTES, (before, after)


# Only a bound on a poll that returns as soon as the condition holds.
SETTLE_TIMEOUT_S = 30.0


def _settled(before: Resources) -> Resources:
    """Resources once threads that were told to end have ended (bounded wait)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        now = resources()
        if now.threads <= before.threads + THREAD_TOLERANCE or time.monotonic() > deadline:
            return now
        time.sleep(0.01)
