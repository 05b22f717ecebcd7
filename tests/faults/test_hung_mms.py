"""An answer that never comes, or trickles in a byte at a time: deadlines first, the watchdog last.

A caller's deadline ends only that caller's wait (DEADLINE_EXCEEDED, at its deadline). The
stream to mms is not touched then: resetting it makes mms drop every sibling VM, so the session,
the peer's connection and health all stay as they were. Only when the backend watchdog for that
message type runs out (0.6 s here, minutes in production) is the stream reset: logged as
RESETTING, health NOT_SERVING, then a redial, SERVING, a new session, and working calls.

The trickle sends one byte every 40 ms: the caller's 150 ms deadline passes after a few bytes,
and the watchdog fires long before the last (bytes that keep coming do not extend it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import health_status, wait_until
from peers import Behaviour, Hang, ScriptedMms, Trickle

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc._connection import DEFAULT_WATCHDOG_S
from manatee_grpc._messages import MessageType

from .helpers import (
    CALL_TIMEOUT_S,
    NOT_SERVING,
    SERVING,
    VM_MEM_BYTES,
    HealthWatch,
    LaunchStream,
    assert_deadline_exceeded,
    expect_rpc_error,
    session,
    session_number,
    wait_health,
)

WATCHDOG_S = 0.6
# After a session that answered nothing the server waits this long before redialling, so the
# NOT_SERVING between the reset and the redial lasts long enough to be seen (the health Watch
# stream keeps only the latest status, so a blink could be overwritten before it is read).
BACKOFF_S = 0.2
DEADLINE_S = 0.15
# The caller is back within this after its deadline.
LATE_S = 0.3
TRICKLE_INTERVAL_S = 0.04


@dataclass
class Hung:
    peer: ScriptedMms
    server: ManateeServer
    channel: grpc.Channel
    stub: pb_grpc.MemoryServiceStub


@pytest.fixture(scope="module")
def hung() -> Iterator[Hung]:
    watchdog_s = dict.fromkeys(DEFAULT_WATCHDOG_S, WATCHDOG_S)
    with ScriptedMms() as peer:
        server = start_server(
            mms=str(peer.address),
            mms_watchdog_s=watchdog_s,
            mms_backoff_initial_s=BACKOFF_S,
            mms_backoff_max_s=BACKOFF_S,
        )
        try:
            with grpc.insecure_channel(server.address) as channel:
                yield Hung(peer, server, channel, pb_grpc.MemoryServiceStub(channel))
        finally:
            server.stop(grace_s=1.0)


def _stats(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    request = pb.GetBalloonStatsRequest(vm_ids=[0])
    return expect_rpc_error(lambda: stub.GetBalloonStats(request, timeout=DEADLINE_S))


def _prepare(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    request = pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES)
    return expect_rpc_error(lambda: stub.PrepareVm(request, timeout=DEADLINE_S))


def _launch(stub: pb_grpc.MemoryServiceStub) -> grpc.RpcError:
    stream = LaunchStream(stub, timeout_s=DEADLINE_S)
    try:
        stream.start()
        events, error = stream.events_until_error()
    finally:
        stream.close()
    assert events == []
    return error


CALLS: dict[str, tuple[MessageType, Callable[[pb_grpc.MemoryServiceStub], grpc.RpcError]]] = {
    "GetBalloonStats": (MessageType.GET_BALLOON_STATS, _stats),
    "PrepareVm": (MessageType.PREPARE_VM, _prepare),
    "LaunchVm": (MessageType.PREPARE_VM, _launch),
}
ANSWERS: dict[str, Callable[[], Behaviour]] = {
    "never": Hang,
    "trickle": lambda: Trickle(interval_s=TRICKLE_INTERVAL_S),
}


@pytest.mark.parametrize("answer", list(ANSWERS))
@pytest.mark.parametrize("rpc", list(CALLS))
def test_deadline_first_then_the_watchdog_resets_and_the_server_recovers(
    hung: Hung, rpc: str, answer: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc._connection")
    peer, channel, stub = hung.peer, hung.channel, hung.stub
    msg_type, call = CALLS[rpc]
    # Start in a session that has answered nothing yet, so the reset is followed by a back-off.
    connections = peer.connections
    peer.drop_connection()
    wait_until(lambda: peer.connections == connections + 1, "a fresh session")
    wait_health(channel, SERVING)
    old_session = session(stub)
    connections = peer.connections
    watch = HealthWatch(channel)
    try:
        watch.wait_for(SERVING)
        requests = peer.request_count(msg_type)
        peer.script(ANSWERS[answer]())
        sent_at = time.monotonic()
        error = call(stub)
        back_s = time.monotonic() - sent_at

        # The caller's own deadline, not the watchdog, ended its wait.
        assert peer.request_count(msg_type) == requests + 1
        assert DEADLINE_S * 0.8 <= back_s < DEADLINE_S + LATE_S
        assert_deadline_exceeded(error)
        # ... and the stream is untouched while the watchdog has not fired.
        assert (session(stub), peer.connections) == (old_session, connections)
        assert health_status(channel) == SERVING
        assert time.monotonic() - sent_at < WATCHDOG_S, "too slow to check before the watchdog"
        assert not any("RESETTING" in record.getMessage() for record in caplog.records)

        # The watchdog fires: reset (logged), NOT_SERVING, redial, SERVING.
        wait_until(lambda: peer.connections == connections + 1, "the server redialled")
        watch.wait_for(SERVING, NOT_SERVING, SERVING)
        (reset_at,) = watch.times_of(NOT_SERVING)
        assert reset_at - sent_at >= WATCHDOG_S
        resets = [r for r in caplog.records if "RESETTING" in r.getMessage()]
        assert len(resets) == 1 and resets[0].levelno == logging.ERROR
        assert msg_type.name in resets[0].getMessage()
    finally:
        watch.close()
    assert session(stub) == old_session + 1
    response = stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    assert session_number(response.session) == old_session + 1
    assert peer.pipelined == 0  # nothing was sent while the answer was pending
