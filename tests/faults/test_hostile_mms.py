"""A hostile or broken mms, through the gRPC server: every broken answer to every kind of RPC.

The server talks to ScriptedMms (tests/peers.py), which answers plausibly until told to break
one answer. Closing the stream makes mms drop every sibling VM, so the server closes it only
when it cannot be used (I3):

- a reply of the right type whose body is wrong (not UTF-8, JSON that is not an object, missing
  keys, keys of the wrong type) fails that one call with INTERNAL (MMS_PROTOCOL_ERROR) and the
  next call goes out on the same stream: same session, same connection;
- broken framing (a 4 GiB ``len``, half a frame then a hang-up) closes it: INTERNAL or
  UNAVAILABLE (MMS_CONNECTION_LOST), a new connection and session, and the next call works;
- a reply of another message type may mean the stream is out of step: nothing more is sent on
  it (UNAVAILABLE MMS_OUT_OF_STEP, not sent), health NOT_SERVING, the VMs at stake logged at
  ERROR; it is closed only by the operator, or on its own if that loses nothing.

Every failure says whether the request reached mms (ErrorInfo ``reachedMms``), and the call
allocates next to nothing (the 4 GiB is never allocated).
"""

from __future__ import annotations

import contextlib
import logging
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import error_info, wait_until
from google.protobuf import duration_pb2
from peers import Behaviour, HugeLen, RawBody, ScriptedMms, Truncated, WrongType

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
    LaunchStream,
    assert_status,
    assert_unavailable,
    expect_rpc_error,
    listed_vm_ids,
    session,
    session_number,
    wait_health,
)

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

# name -> (the broken answer for a request of that type, the code, the reason, stream closed?)
FAULTS: dict[str, tuple[Callable[[MessageType], Behaviour], grpc.StatusCode, str, bool]] = {
    "4GiB-len": (lambda _: HugeLen(), grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR", True),
    "truncated-frame": (
        lambda _: Truncated(),
        grpc.StatusCode.UNAVAILABLE,
        "MMS_CONNECTION_LOST",
        True,
    ),
    "invalid-utf8": (
        lambda _: RawBody(b'{"res": "\xff\xfe", "all_stats": "\xc3\x28"}'),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
        False,
    ),
    "json-not-an-object": (
        lambda _: RawBody.json([0, 1, 0]),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
        False,
    ),
    "missing-keys": (
        lambda _: RawBody.json({}),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
        False,
    ),
    "wrong-value-types": (
        lambda msg_type: RawBody.json(WRONG_VALUE_TYPES[msg_type]),
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
        False,
    ),
}


@dataclass
class Hostile:
    peer: ScriptedMms
    server: ManateeServer
    stub: pb_grpc.MemoryServiceStub


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    """One peer and one server for the module: every case leaves a working stream behind."""
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
        # The launch cannot finish: the VM the client started must stop.
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
def test_a_broken_answer_fails_the_call_and_only_broken_framing_closes_the_stream(
    hostile: Hostile, rpc: str, fault: str
) -> None:
    peer, stub = hostile.peer, hostile.stub
    victim = VICTIMS[rpc](stub)
    behaviour, code, reason, closes = FAULTS[fault]
    old_session = session(stub)
    connections = peer.connections
    peer.script(behaviour(victim.msg_type))
    requests = peer.request_count(victim.msg_type)
    tracemalloc.start()
    try:
        error = victim.call()
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        victim.close()
    assert peer.request_count(victim.msg_type) == requests + 1  # the broken answer was its own
    if code == grpc.StatusCode.UNAVAILABLE:
        assert_unavailable(error, reason)
    else:
        assert_status(error, code, reason)
    assert error_info(error).metadata["reachedMms"] == "true"
    assert peak_bytes < PEAK_ALLOCATION_BYTES, f"{peak_bytes / MIB:.1f} MiB"
    if closes:
        # Framing is broken: a new connection, a new session.
        wait_until(lambda: peer.connections == connections + 1, "the server redialled")
        wait_until(lambda: session(stub) != old_session, "a new session")
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    if not closes:
        # Only that call failed: the next one went out on the same stream.
        assert (session_number(response.session), peer.connections) == (old_session, connections)
    else:
        assert session_number(response.session) != old_session
    assert peer.pipelined == 0  # the server never spoke out of turn


@contextlib.contextmanager
def own_server() -> Iterator[Hostile]:
    with ScriptedMms() as peer:
        server = start_server(mms=str(peer.address))
        try:
            with grpc.insecure_channel(server.address) as channel:
                yield Hostile(peer, server, pb_grpc.MemoryServiceStub(channel))
        finally:
            server.stop(grace_s=1.0)


def test_a_wrong_type_with_a_vm_at_stake_stops_sending_and_keeps_the_stream_for_the_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    with own_server() as hostile:
        peer, stub, server = hostile.peer, hostile.stub, hostile.server
        channel = grpc.insecure_channel(server.address)
        vm_id = _start_vm(stub)
        old_session = session(stub)
        connections = peer.connections
        peer.script(WrongType())
        error = _stats(stub).call()
        assert_status(error, grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR")
        assert error_info(error).metadata["reachedMms"] == "true"
        # Out of step: nothing more is sent, health says so, the VM at stake is named.
        wait_health(channel, NOT_SERVING)
        logged = [r for r in caplog.records if "OUT OF STEP" in r.getMessage()]
        assert len(logged) == 1 and f"VM {vm_id}" in logged[0].getMessage()
        request = pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MIB)])
        refused = expect_rpc_error(lambda: stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S))
        assert_status(refused, grpc.StatusCode.UNAVAILABLE, "MMS_OUT_OF_STEP")
        info = error_info(refused)
        assert (info.metadata["reachedMms"], info.metadata["messageType"]) == (
            "false",
            "REBALANCE_MEMORY",
        )
        assert peer.request_count(MessageType.REBALANCE_MEMORY) == 0
        # Not closed: the VM is still there in the same session.
        assert (session(stub), peer.connections) == (old_session, connections)
        assert vm_id in listed_vm_ids(stub)
        # The operator resets it: a new session, and calls work again.
        assert server.reset_mms("the test asked")
        wait_until(lambda: peer.connections == connections + 1, "the server redialled")
        wait_health(channel, SERVING)
        assert session(stub) != old_session
        assert vm_id not in listed_vm_ids(stub)
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
        channel.close()


def test_a_wrong_type_with_nothing_at_stake_resets_the_stream_on_its_own() -> None:
    with own_server() as hostile:
        peer, stub = hostile.peer, hostile.stub
        old_session = session(stub)
        connections = peer.connections
        peer.script(WrongType())
        error = _stats(stub).call()
        assert_status(error, grpc.StatusCode.INTERNAL, "MMS_PROTOCOL_ERROR")
        wait_until(lambda: peer.connections == connections + 1, "the server redialled")
        wait_until(lambda: session(stub) != old_session, "a new session")
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)


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
