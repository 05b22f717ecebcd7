"""A silent mms, through the gRPC server: callers time out, health tells, no VM is lost (I4).

A caller's deadline ends only that caller's wait (DEADLINE_EXCEEDED). When mms stays silent past
the watchdog for that message type (1 s here, minutes in production) health goes NOT_SERVING,
the VMs at stake are logged at ERROR, and calls fail at once with UNAVAILABLE MMS_HUNG, each
naming its own request as "not sent" (ErrorInfo ``reachedMms: "false"``). The stream is kept:
closing it would make mms drop every sibling VM. When mms answers late the stream is in step
again: health SERVING, same session, the VM still there.

The stream is closed on its own only when nothing would be lost, or when the operator chose
``--mms-hang-reset``; the operator can always reset it on purpose (SIGUSR1).

No assertion here is on a timing window: only outcomes, each awaited within the test's own
deadline (the machine is a shared, noisy 2-core box).
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import error_info, wait_until
from load._process import ServerProcess
from metrics.conftest import metrics_address, scrape_until
from peers import Hang, ScriptedMms, Trickle

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._connection import DEFAULT_WATCHDOG_S
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import MmsModel, Scenario

from .helpers import (
    CALL_TIMEOUT_S,
    NOT_SERVING,
    SERVING,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    HealthWatch,
    LaunchStream,
    assert_deadline_exceeded,
    assert_status,
    assert_unavailable,
    expect_rpc_error,
    listed_vm_ids,
    session,
    start_vm,
    wait_health,
)

WATCHDOG_S = 1.0
# Short enough to end before the watchdog on an idle machine; nothing depends on it doing so.
DEADLINE_S = 0.2


@dataclass
class Hung:
    peer: ScriptedMms
    server: ManateeServer
    channel: grpc.Channel
    stub: pb_grpc.MemoryServiceStub


@contextlib.contextmanager
def hung_server(**overrides: object) -> Iterator[Hung]:
    """A server on a scripted mms that answers as the simulator's model does until told not to."""
    model = MmsModel(Scenario())
    with ScriptedMms(responder=model.handle) as peer:
        server = start_server(
            mms=str(peer.address),
            mms_watchdog_s=dict.fromkeys(DEFAULT_WATCHDOG_S, WATCHDOG_S),
            **overrides,
        )
        try:
            with grpc.insecure_channel(server.address) as channel:
                yield Hung(peer, server, channel, pb_grpc.MemoryServiceStub(channel))
        finally:
            server.stop(grace_s=1.0)


@pytest.fixture
def hung() -> Iterator[Hung]:
    with hung_server() as hung:
        yield hung


def _stats(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    request = pb.GetBalloonStatsRequest(vm_ids=[0])
    return expect_rpc_error(lambda: stub.GetBalloonStats(request, timeout=DEADLINE_S))


def _prepare(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    request = pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES)
    return expect_rpc_error(lambda: stub.PrepareVm(request, timeout=DEADLINE_S))


def _launch(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    stream = LaunchStream(stub, timeout_s=DEADLINE_S)
    try:
        stream.start(VM_MEM_BYTES, VM_INIT_BYTES)
        events, error = stream.events_until_error()
    finally:
        stream.close()
    assert "reserved" not in events
    return error


CALLS: dict[str, tuple[MessageType, Callable[[pb_grpc.MemoryServiceStub], grpc.RpcError]]] = {
    "GetBalloonStats": (MessageType.GET_BALLOON_STATS, _stats),
    "PrepareVm": (MessageType.PREPARE_VM, _prepare),
    "LaunchVm": (MessageType.PREPARE_VM, _launch),
}


def _rebalance(stub: pb_grpc.MemoryServiceStub, vm_id: int) -> grpc.RpcError:
    request = pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MIB)])
    return expect_rpc_error(lambda: stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S))


def _errors_naming(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and text in r.getMessage()]


@pytest.mark.parametrize(
    ("rpc", "answer"),
    [
        ("GetBalloonStats", "late"),
        ("PrepareVm", "late"),
        ("LaunchVm", "late"),
        ("PrepareVm", "trickle"),
    ],
)
def test_a_silent_mms_with_a_vm_at_stake_keeps_the_stream_and_recovers_when_it_answers(
    hung: Hung, rpc: str, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="manatee_grpc.mms._connection")
    peer, channel, stub = hung.peer, hung.channel, hung.stub
    vm_id = start_vm(stub)
    old_session = session(stub)
    connections = peer.connections
    msg_type, call = CALLS[rpc]
    watch = HealthWatch(channel)
    try:
        watch.wait_for(SERVING)
        hang = Hang()
        # A PrepareVm answer is ~40 bytes: at 50 ms a byte it comes well after the watchdog.
        peer.script(hang if answer == "late" else Trickle(interval_s=0.05))
        requests = peer.request_count(msg_type)
        error = call(stub)
        # The caller's own deadline ended its wait; its request did reach mms.
        assert peer.request_count(msg_type) == requests + 1
        if assert_deadline_exceeded(error) and rpc == "PrepareVm":
            assert error_info(error).metadata["reachedMms"] == "true"

        # Past the watchdog: NOT_SERVING, the VM at stake named at ERROR, the stream kept.
        watch.wait_for(SERVING, NOT_SERVING)
        wait_until(lambda: bool(_errors_naming(caplog, f"VM {vm_id}")), "an ERROR naming the VM")
        # A new call is not queued behind the silent one: it fails at once, as itself.
        refused = _rebalance(stub, vm_id)
        assert_unavailable(refused, "MMS_HUNG")
        info = error_info(refused)
        assert (info.metadata["reachedMms"], info.metadata["messageType"]) == (
            "false",
            "REBALANCE_MEMORY",
        )
        assert "REBALANCE_MEMORY not sent" in str(refused.details())
        assert peer.request_count(MessageType.REBALANCE_MEMORY) == 0
        assert (session(stub), peer.connections) == (old_session, connections)
        assert vm_id in listed_vm_ids(stub)

        # mms answers late: in step again, SERVING, same session, same VM.
        hang.release()
        watch.wait_for(SERVING, NOT_SERVING, SERVING)
    finally:
        watch.close()
    assert not any("RESETTING" in r.getMessage() for r in caplog.records)
    assert stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    assert (session(stub), peer.connections) == (old_session, connections)
    assert vm_id in listed_vm_ids(stub)
    stub.RebalanceMemory(
        pb.RebalanceMemoryRequest(deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MIB)]),
        timeout=CALL_TIMEOUT_S,
    )
    assert peer.pipelined == 0  # nothing was sent while an answer was pending


def test_a_silent_mms_with_nothing_at_stake_is_reset_and_the_server_recovers(
    hung: Hung, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    peer, channel, stub = hung.peer, hung.channel, hung.stub
    old_session = session(stub)
    connections = peer.connections
    peer.script(Hang())
    assert_deadline_exceeded(_stats(stub))
    # Only the CrOS guest and no start: a reset loses nothing, so the watchdog resets.
    wait_until(lambda: peer.connections == connections + 1, "the server redialled")
    wait_health(channel, SERVING)
    assert session(stub) != old_session
    (reset,) = [r for r in caplog.records if "RESETTING" in r.getMessage()]
    assert "nothing is at stake" in reset.getMessage()
    assert stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)


def test_hang_reset_resets_a_silent_mms_even_with_a_vm_at_stake(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    with hung_server(mms_hang_reset=True) as hung:
        peer, channel, stub = hung.peer, hung.channel, hung.stub
        vm_id = start_vm(stub)
        old_session = session(stub)
        connections = peer.connections
        peer.script(Hang())
        assert_deadline_exceeded(_stats(stub))
        wait_until(lambda: peer.connections == connections + 1, "the server redialled")
        wait_health(channel, SERVING)
        assert session(stub) != old_session
        assert vm_id not in listed_vm_ids(stub)
        (reset,) = [r for r in caplog.records if "RESETTING" in r.getMessage()]
        assert "--mms-hang-reset" in reset.getMessage() and f"VM {vm_id}" in reset.getMessage()


def test_the_operator_resets_a_silent_mms_on_purpose(hung: Hung) -> None:
    peer, channel, stub = hung.peer, hung.channel, hung.stub
    vm_id = start_vm(stub)
    old_session = session(stub)
    connections = peer.connections
    peer.script(Hang())
    assert_deadline_exceeded(_stats(stub))
    wait_health(channel, NOT_SERVING)
    assert peer.connections == connections
    assert hung.server.reset_mms("the test asked")
    wait_until(lambda: peer.connections == connections + 1, "the server redialled")
    wait_health(channel, SERVING)
    assert session(stub) != old_session
    assert vm_id not in listed_vm_ids(stub)
    removed = expect_rpc_error(
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=CALL_TIMEOUT_S)
    )
    assert_status(removed, grpc.StatusCode.NOT_FOUND, "SESSION_RESET")


def test_sigusr1_resets_the_mms_stream_of_a_running_server() -> None:
    model = MmsModel(Scenario())
    with ScriptedMms(responder=model.handle) as peer, ServerProcess(str(peer.address)) as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            vm_id = start_vm(stub)
            old_session = session(stub)
            connections = peer.connections
            server.send_signal(signal.SIGUSR1)
            wait_until(lambda: peer.connections == connections + 1, "the server redialled")
            wait_health(channel, SERVING)
            assert session(stub) != old_session
            assert vm_id not in listed_vm_ids(stub)
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(CALL_TIMEOUT_S) == 0
    assert "RESETTING the mms connection" in server.log()
    assert "SIGUSR1" in server.log()


def test_metrics_name_the_vms_at_stake_while_mms_is_silent() -> None:
    with hung_server(metrics_listen="127.0.0.1:0") as hung:
        peer, stub = hung.peer, hung.stub
        address = metrics_address(hung.server)
        vm_id = start_vm(stub)
        hang = Hang()
        peer.script(hang)
        assert_deadline_exceeded(_stats(stub))
        scrape_until(
            address,
            lambda s: s.value("manatee_mms_hung", vms_at_stake=str(vm_id)) == 1,
            f"manatee_mms_hung names VM {vm_id}",
            timeout_s=CALL_TIMEOUT_S,
        )
        hang.release()
        scrape_until(
            address,
            lambda s: s.value("manatee_mms_hung", vms_at_stake="") == 0,
            "manatee_mms_hung back to 0",
            timeout_s=CALL_TIMEOUT_S,
        )


def test_a_start_abandoned_while_mms_is_silent_is_removed_once_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="manatee_grpc.core._bridge")
    with hung_server() as hung:
        peer, channel, stub = hung.peer, hung.channel, hung.stub
        vm_id = start_vm(stub)
        launch = LaunchStream(stub)
        try:
            launch.start(VM_MEM_BYTES, VM_INIT_BYTES)
            pending_vm_id = launch.expect_reserved()
            hang = Hang()
            peer.script(hang)
            assert_deadline_exceeded(_stats(stub))
            wait_health(channel, NOT_SERVING)
        finally:
            # The launch's client goes away while nothing can be sent to mms.
            launch.close()
        wait_until(
            lambda: any(
                f"could not remove VM {pending_vm_id} yet" in r.getMessage() for r in caplog.records
            ),
            "the removal was held back",
        )
        assert peer.request_count(MessageType.REMOVE_VM) == 0
        assert pending_vm_id in listed_vm_ids(stub)  # mms still holds it: so do the books
        hang.release()
        wait_health(channel, SERVING)
        # In step again: the held-back removal goes out, and the start is free for others.
        wait_until(lambda: pending_vm_id not in listed_vm_ids(stub), "the start was removed")
        assert vm_id in listed_vm_ids(stub)
        other = stub.PrepareVm(
            pb.PrepareVmRequest(mem_size_bytes=2 * VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES),
            timeout=CALL_TIMEOUT_S,
        )
        assert other.reserved and other.vm_id != pending_vm_id


def test_a_request_id_refused_not_sent_while_mms_is_silent_runs_once_it_answers(
    hung: Hung,
) -> None:
    peer, channel, stub = hung.peer, hung.channel, hung.stub
    start_vm(stub)  # at stake: the silent stream is kept, in the same session
    hang = Hang()
    peer.script(hang)
    assert_deadline_exceeded(_stats(stub))
    wait_health(channel, NOT_SERVING)
    request = pb.PrepareVmRequest(
        mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES, request_id="while-hung"
    )
    refused = expect_rpc_error(lambda: stub.PrepareVm(request, timeout=CALL_TIMEOUT_S))
    assert_unavailable(refused, "MMS_HUNG")
    assert error_info(refused).metadata["reachedMms"] == "false"

    hang.release()
    wait_health(channel, SERVING)
    # mms never saw the first call: its id has no outcome to replay, so the retry runs it.
    prepares = peer.request_count(MessageType.PREPARE_VM)
    prepared = stub.PrepareVm(request, timeout=CALL_TIMEOUT_S)
    assert prepared.reserved
    assert peer.request_count(MessageType.PREPARE_VM) == prepares + 1
    # From now on the id is remembered: a repeat gets that answer and sends nothing.
    assert stub.PrepareVm(request, timeout=CALL_TIMEOUT_S).vm_id == prepared.vm_id
    assert peer.request_count(MessageType.PREPARE_VM) == prepares + 1
    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=CALL_TIMEOUT_S)


def test_a_deadline_on_a_rebalance_with_a_request_id_says_it_reached_mms(hung: Hung) -> None:
    peer, stub = hung.peer, hung.stub
    vm_id = start_vm(stub)
    hang = Hang()
    peer.script(hang)
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=MIB)], request_id="r-deadline"
    )
    # Long enough for the request to be on the wire when it passes (the peer counts it).
    first = expect_rpc_error(lambda: stub.RebalanceMemory(request, timeout=2.0))
    assert peer.request_count(MessageType.REBALANCE_MEMORY) == 1
    # A repeat waits for the first call's answer, which mms still owes.
    repeat = expect_rpc_error(lambda: stub.RebalanceMemory(request, timeout=2.0))
    for error, repeated in ((first, False), (repeat, True)):
        # The caller's own timer may beat the server's status on a loaded machine (no details).
        if assert_deadline_exceeded(error):
            metadata = error_info(error).metadata
            assert (metadata["messageType"], metadata["reachedMms"]) == (
                "REBALANCE_MEMORY",
                "true",
            )
            assert ("requestIdRepeat" in metadata) is repeated
    hang.release()
    assert stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S).fully_applied
    assert peer.request_count(MessageType.REBALANCE_MEMORY) == 1  # sent once
