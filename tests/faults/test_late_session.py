"""An answer is labelled with the session mms gave it in, never with a later one (I2).

mms answers PrepareVm with VM 1 in session S; before the server's event loop resumes the caller,
the link drops and a new session S' starts, whose first VM is VM 1 again. The caller must not be
told "VM 1 of S'": its FinishAddVm or RemoveVm would then act on someone else's VM. It is told
that its session reset (PrepareVm: NOT_FOUND SESSION_RESET; LaunchVm: the launch's session-reset
end, UNAVAILABLE MMS_CONNECTION_LOST, with no `reserved`).

The window is made deterministic: the peer holds the answer (Hang) while the test blocks the
server's event loop, then answers, drops the link and waits for the new session, all with the
loop blocked; only then does the loop run again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import error_info, wait_until
from peers import Hang, ScriptedMms

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import MessageType

from .helpers import (
    CALL_TIMEOUT_S,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    WAIT_S,
    LaunchStream,
    assert_status,
    listed_vm_ids,
)


@dataclass
class Peered:
    peer: ScriptedMms
    server: ManateeServer
    stub: pb_grpc.MemoryServiceStub


@pytest.fixture
def peered() -> Iterator[Peered]:
    with ScriptedMms() as peer:
        server = start_server(mms=str(peer.address))
        try:
            with grpc.insecure_channel(server.address) as channel:
                yield Peered(peer, server, pb_grpc.MemoryServiceStub(channel))
        finally:
            server.stop(grace_s=1.0)


@contextlib.contextmanager
def loop_blocked(server: ManateeServer) -> Iterator[None]:
    """The server's event loop runs nothing (no caller resumes) until the block ends."""
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(4 * WAIT_S)  # bounded: a failing test must not hang the loop for ever

    loop = server._loop  # the one loop every handler runs on
    assert loop is not None
    loop.call_soon_threadsafe(block)
    assert entered.wait(WAIT_S), "the server's loop never ran the block"
    try:
        yield
    finally:
        release.set()


def answer_then_reset(peered: Peered, hang: Hang) -> None:
    """With the caller parked on the blocked loop: mms answers VM 1 in session 1, then the link
    drops and session 2 starts."""
    books = peered.server.bridge.books
    wait_until(lambda: peered.peer.request_count(MessageType.PREPARE_VM) == 1, "PrepareVm sent")
    assert books.session == 1
    with loop_blocked(peered.server):
        hang.release()
        # The books learn the answer on the connection thread just before the caller's future
        # resolves (same thread, next step): VM 1 is known in session 1.
        wait_until(lambda: books.vm(1) is not None, "mms answered VM 1 in session 1")
        peered.peer.drop_connection()
        wait_until(lambda: books.session == 2 and books.connected, "session 2 connected")


def test_prepare_vm_answered_in_a_session_that_reset_is_session_reset(peered: Peered) -> None:
    hang = Hang()
    peered.peer.script(hang)
    call = peered.stub.PrepareVm.future(
        pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES),
        timeout=CALL_TIMEOUT_S,
    )
    answer_then_reset(peered, hang)

    error = call.exception(timeout=CALL_TIMEOUT_S)
    assert error is not None, f"PrepareVm answered {call.result()} after its session reset"
    assert isinstance(error, grpc.RpcError)
    assert_status(error, grpc.StatusCode.NOT_FOUND, "SESSION_RESET")
    session_1 = peered.server.bridge.books.public_session_id(1)
    assert error_info(error).metadata["vmSession"] == session_1
    # Nothing was sent for it in session 2, and session 2 has only the CrOS guest.
    assert peered.peer.request_count() == 1
    assert listed_vm_ids(peered.stub) == [0]


def test_launch_answered_in_a_session_that_reset_sends_no_reserved(peered: Peered) -> None:
    hang = Hang()
    peered.peer.script(hang)
    stream = LaunchStream(peered.stub)
    try:
        stream.start()
        answer_then_reset(peered, hang)
        events, error = stream.events_until_error()
    finally:
        stream.close()
    # Before: `reserved` of VM 1 labelled with session 2, a VM the launch never reserved.
    assert events == []
    assert_status(error, grpc.StatusCode.UNAVAILABLE, "MMS_CONNECTION_LOST")
    assert peered.peer.request_count() == 1  # nothing sent in session 2 on its behalf
    assert listed_vm_ids(peered.stub) == [0]
