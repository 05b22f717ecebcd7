"""A hostile or broken mms, through the gRPC server: every broken answer to every kind of RPC.

The server talks to ScriptedMms (tests/peers.py), which answers plausibly until told to break
one answer: a 4 GiB ``len``, another message type, half a frame then a hang-up, a body that is
not UTF-8, JSON that is not an object, an object missing its keys, or keys of the wrong type.
Each time the caller gets INTERNAL (MMS_PROTOCOL_ERROR) or, for the hang-up, UNAVAILABLE
(MMS_CONNECTION_LOST); the server drops the stream it can no longer trust (the session goes up
by one and the peer sees a new connection), the call allocates next to nothing (the 4 GiB is
never allocated), and the next call works.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import wait_until
from google.protobuf import duration_pb2
from peers import Behaviour, HugeLen, RawBody, ScriptedMms, Truncated, WrongType

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc._memory_math import MIB
from manatee_grpc._messages import MessageType

from .helpers import (
    CALL_TIMEOUT_S,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    LaunchStream,
    assert_status,
    assert_unavailable,
    expect_rpc_error,
    session,
    session_number,
)

# A broken answer is noticed at once, far inside the caller's deadline.
NOTICE_S = 2.0
# What one failing call may allocate (Python heap, every thread): frames and a status, not a body.
PEAK_ALLOCATION_BYTES = 2 * MIB

# Keys of the wrong type, for each message's answer.
WRONG_VALUE_TYPES: dict[MessageType, object] = {
    MessageType.GET_BALLOON_STATS: {"all_stats": {"id": 0}},
    MessageType.REBALANCE_MEMORY: {"actual_deltas": [{"id": "1", "delta": 0}]},
    MessageType.PREPARE_VM: {"res": "0", "id": 1, "shortfall": 0},
    MessageType.FINISH_ADD_VM: {"res": None},
    MessageType.REMOVE_VM: {"res": 0.5},
}

# name -> (the broken answer for a request of that type, the code, the reason)
FAULTS: dict[str, tuple[Callable[[MessageType], Behaviour], grpc.StatusCode, str]] = {
    "4GiB-len": (lambda _: HugeLen(), grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR"),
    "wrong-type": (lambda _: WrongType(), grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR"),
    "truncated-frame": (lambda _: Truncated(), grpc.StatusCode.UNAVAILABLE, "MMS_CONNECTION_LOST"),
    "invalid-utf8": (
        lambda _: RawBody(b'{"res": "\xff\xfe", "all_stats": "\xc3\x28"}'),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
    ),
    "json-not-an-object": (
        lambda _: RawBody.json([0, 1, 0]),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
    ),
    "missing-keys": (lambda _: RawBody.json({}), grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR"),
    "wrong-value-types": (
        lambda msg_type: RawBody.json(WRONG_VALUE_TYPES[msg_type]),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
    ),
}


@dataclass
class Hostile:
    peer: ScriptedMms
    server: ManateeServer
    stub: pb_grpc.MemoryServiceStub


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    """One peer and one server for the module: every case leaves a fresh session behind."""
    with ScriptedMms() as peer:
        server = start_server(mms=str(peer.address))
        try:
            with grpc.insecure_channel(server.address) as channel:
                yield Hostile(peer, server, pb_grpc.MemoryServiceStub(channel))
        finally:
            server.stop(grace_s=1.0)


# --- the RPCs, each set up so that its next mms request is the one that breaks --------------------


@dataclass
class Victim:
    msg_type: MessageType  # the request whose answer breaks
    call: Callable[[], grpc.RpcError]
    close: Callable[[], None] = lambda: None


def _start_vm(stub: pb_grpc.MemoryServiceStub) -> int:
    # The scripted peer's canned answers: VM 1, reserved in full, started.
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES),
        timeout=CALL_TIMEOUT_S,
    )
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=CALL_TIMEOUT_S)
    return prepared.vm_id


def _stats(stub: pb_grpc.MemoryServiceStub) -> Victim:
    request = pb.GetBalloonStatsRequest(vm_ids=[0])
    return Victim(
        MessageType.GET_BALLOON_STATS,
        lambda: expect_rpc_error(lambda: stub.GetBalloonStats(request, timeout=CALL_TIMEOUT_S)),
    )


def _rebalance(stub: pb_grpc.MemoryServiceStub) -> Victim:
    vm_id = _start_vm(stub)
    request = pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MIB)])
    return Victim(
        MessageType.REBALANCE_MEMORY,
        lambda: expect_rpc_error(lambda: stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S)),
    )


def _prepare(stub: pb_grpc.MemoryServiceStub) -> Victim:
    request = pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES)
    return Victim(
        MessageType.PREPARE_VM,
        lambda: expect_rpc_error(lambda: stub.PrepareVm(request, timeout=CALL_TIMEOUT_S)),
    )


def _finish(stub: pb_grpc.MemoryServiceStub) -> Victim:
    prepared = stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES), timeout=CALL_TIMEOUT_S
    )
    request = pb.FinishAddVmRequest(vm_id=prepared.vm_id)
    return Victim(
        MessageType.FINISH_ADD_VM,
        lambda: expect_rpc_error(lambda: stub.FinishAddVm(request, timeout=CALL_TIMEOUT_S)),
    )


def _remove(stub: pb_grpc.MemoryServiceStub) -> Victim:
    request = pb.RemoveVmRequest(vm_id=_start_vm(stub))
    return Victim(
        MessageType.REMOVE_VM,
        lambda: expect_rpc_error(lambda: stub.RemoveVm(request, timeout=CALL_TIMEOUT_S)),
    )


def _launch_reserving(stub: pb_grpc.MemoryServiceStub) -> Victim:
    stream = LaunchStream(stub)

    def call() -> grpc.RpcError:
        stream.start()
        events, error = stream.events_until_error()
        assert events == []  # nothing was reserved, so nothing to stop
        return error

    return Victim(MessageType.PREPARE_VM, call, stream.close)


def _launch_finishing(stub: pb_grpc.MemoryServiceStub) -> Victim:
    stream = LaunchStream(stub)
    stream.start()
    stream.expect_reserved()

    def call() -> grpc.RpcError:
        stream.vm_started()
        events, error = stream.events_until_error()
        # The stream mms broke is gone and mms drops the VM with it: the client must stop it.
        assert events == ["stop_vm"]
        return error

    return Victim(MessageType.FINISH_ADD_VM, call, stream.close)


VICTIMS: dict[str, Callable[[pb_grpc.MemoryServiceStub], Victim]] = {
    "GetBalloonStats": _stats,
    "RebalanceMemory": _rebalance,
    "PrepareVm": _prepare,
    "FinishAddVm": _finish,
    "RemoveVm": _remove,
    "LaunchVm-reserving": _launch_reserving,
    "LaunchVm-finishing": _launch_finishing,
}


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("rpc", list(VICTIMS))
def test_a_broken_answer_fails_the_call_resets_the_stream_and_the_next_call_works(
    hostile: Hostile, rpc: str, fault: str
) -> None:
    peer, stub = hostile.peer, hostile.stub
    victim = VICTIMS[rpc](stub)
    behaviour, code, reason = FAULTS[fault]
    old_session = session(stub)
    connections = peer.connections
    peer.script(behaviour(victim.msg_type))
    requests = peer.request_count(victim.msg_type)
    tracemalloc.start()
    try:
        started = time.monotonic()
        error = victim.call()
        elapsed_s = time.monotonic() - started
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        victim.close()
    assert peer.request_count(victim.msg_type) == requests + 1  # the broken answer was its own
    assert elapsed_s < NOTICE_S
    if code == grpc.StatusCode.UNAVAILABLE:
        assert_unavailable(error, reason)
    else:
        assert_status(error, code, reason)
    assert peak_bytes < PEAK_ALLOCATION_BYTES, f"{peak_bytes / MIB:.1f} MiB"
    # The stream was reset: a new connection, a new session, and calls work again.
    wait_until(lambda: peer.connections == connections + 1, "the server redialled")
    wait_until(lambda: session(stub) == old_session + 1, "a new session")
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    assert session_number(response.session) == old_session + 1
    assert peer.pipelined == 0  # the server never spoke out of turn


def test_a_watch_outlives_a_broken_poll_and_hears_of_the_reset(hostile: Hostile) -> None:
    peer, stub = hostile.peer, hostile.stub
    old_session = session(stub)
    interval = duration_pb2.Duration()
    interval.FromMilliseconds(100)
    watch = stub.WatchBalloonStats(
        pb.WatchBalloonStatsRequest(vm_ids=[0], interval=interval), timeout=CALL_TIMEOUT_S
    )
    try:
        assert session_number(next(watch).snapshot.session) == old_session
        peer.script(HugeLen())
        # The broken poll fails only that poll (an outage event): the stream goes on in the
        # new session.
        while not (response := next(watch)).HasField("session_reset"):
            if not response.HasField("mms_unavailable"):
                assert session_number(response.snapshot.session) == old_session
        reset = response.session_reset
        assert session_number(reset.previous_session) == old_session
        assert session_number(reset.session) == old_session + 1
        assert session_number(next(watch).snapshot.session) == old_session + 1
    finally:
        watch.cancel()
