"""The one pending start is never left held by nobody, whatever mms's answers look like.

A PrepareVm whose answer has the right type but a body that cannot be read may have opened a
start in mms (mms did the work; only its answer is bad). A RemoveVm that should end a start may
fail. Either way the start must end up removed (or held by someone making progress), so later
starts proceed and get their own errors. The peer is a scripted mms around the simulator's
model, so mms really holds what it answered about.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from api.conftest import start_server
from api.helpers import error_info, wait_until
from peers import ScriptedMms

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
)
from manatee_grpc.sim._model import MmsModel

from .helpers import CALL_TIMEOUT_S, WAIT_S, LaunchStream, expect_rpc_error, listed_vm_ids

Spoil = Callable[[MmsRequest[Any], Response], Response | None]


class SpoilingMms:
    """The simulator's model behind a scripted peer; ``spoil`` may replace one answer's body."""

    def __init__(self, spoil: Spoil) -> None:
        self.model = MmsModel()
        self._spoil = spoil
        self._lock = threading.Lock()
        self.spoiled = 0

    def respond(self, request: MmsRequest[Any]) -> Response:
        with self._lock:
            response: Response = self.model.handle(request)  # mms does the work whatever it answers
            bad = self._spoil(request, response)
            if bad is None:
                return response
            self.spoiled += 1
            return bad


def _serve(spoil: Spoil, lease_s: float) -> Iterator[tuple[SpoilingMms, ManateeServer]]:
    mms = SpoilingMms(spoil)
    with ScriptedMms(responder=mms.respond) as peer:
        server = start_server(mms=f"unix://{peer.address.path}", prepare_lease_s=lease_s)
        try:
            yield mms, server
        finally:
            server.stop(grace_s=1.0)


def _prepare(stub: pb_grpc.MemoryServiceStub, mem_bytes: int) -> pb.PrepareVmResponse:
    request = pb.PrepareVmRequest(mem_size_bytes=mem_bytes, init_mem_size_bytes=256 * MIB)
    response: pb.PrepareVmResponse = stub.PrepareVm(request, timeout=CALL_TIMEOUT_S)
    return response


@pytest.fixture
def bad_first_prepare() -> Iterator[tuple[SpoilingMms, ManateeServer]]:
    state = {"done": False}

    def spoil(request: MmsRequest[Any], response: Response) -> Response | None:
        if isinstance(request, PrepareVmRequest) and not state["done"]:
            state["done"] = True
            assert isinstance(response, PrepareVmResponse)
            # The right type, a body no reader accepts (shortfall < 0); mms opened the start.
            return PrepareVmResponse(response.res, response.vm_id, -1)
        return None

    # A long lease: the start must go because nobody can finish it, not because time passed.
    yield from _serve(spoil, lease_s=600.0)


def test_a_start_opened_by_an_unreadable_prepare_answer_is_removed(
    bad_first_prepare: tuple[SpoilingMms, ManateeServer],
) -> None:
    mms, server = bad_first_prepare
    stub = pb_grpc.MemoryServiceStub(grpc.insecure_channel(server.address))
    error = expect_rpc_error(lambda: _prepare(stub, 512 * MIB))
    assert isinstance(error, grpc.Call)
    assert (error.code(), error_info(error).reason) == (
        grpc.StatusCode.INTERNAL,
        "MMS_PROTOCOL_ERROR",
    )
    # mms opened VM 1; nobody read its id; the server removes it.
    wait_until(lambda: mms.model.pending_start() is None, "mms's pending start removed")

    # A start of other sizes is neither blamed on the caller (INVALID_ARGUMENT "too large")
    # nor refused for a start that no longer exists: it opens VM 2.
    def other_start_goes_through() -> bool:
        try:
            response = _prepare(stub, 1024 * MIB)
        except grpc.RpcError as refused:
            assert isinstance(refused, grpc.Call)
            assert error_info(refused).reason == "START_IN_PROGRESS", refused.details()
            return False
        assert response.vm_id == 2 and response.reserved, response
        return True

    wait_until(other_start_goes_through, "a start of other sizes", timeout_s=WAIT_S)
    assert listed_vm_ids(stub) == [0, 2]


def test_a_launch_whose_prepare_answer_is_unreadable_removes_the_start_it_opened(
    bad_first_prepare: tuple[SpoilingMms, ManateeServer],
) -> None:
    mms, server = bad_first_prepare
    stub = pb_grpc.MemoryServiceStub(grpc.insecure_channel(server.address))
    stream = LaunchStream(stub)
    try:
        stream.start(512 * MIB)
        _, error = stream.events_until_error()
    finally:
        stream.close()
    assert isinstance(error, grpc.Call)
    assert error_info(error).reason == "MMS_PROTOCOL_ERROR", error.details()
    wait_until(lambda: mms.model.pending_start() is None, "mms's pending start removed")
    stream = LaunchStream(stub)
    try:
        stream.start(1024 * MIB)  # other sizes: refused by mms if the first start were left
        assert stream.expect_reserved() == 2
        stream.vm_started()
        assert stream.expect("launched").launched.vm_id == 2
        stream.expect_ok_end()
    finally:
        stream.close()


@pytest.fixture
def bad_first_remove() -> Iterator[tuple[SpoilingMms, ManateeServer]]:
    state = {"done": False}

    def spoil(request: MmsRequest[Any], response: Response) -> Response | None:
        if isinstance(request, RemoveVmRequest) and not state["done"]:
            state["done"] = True
            return RemoveVmResponse(2**40)  # the right type, res out of range; mms removed it
        return None

    yield from _serve(spoil, lease_s=1.0)


def test_a_lease_removal_that_fails_is_retried_and_the_start_is_freed(
    bad_first_remove: tuple[SpoilingMms, ManateeServer],
) -> None:
    mms, server = bad_first_remove
    stub = pb_grpc.MemoryServiceStub(grpc.insecure_channel(server.address))
    assert _prepare(stub, 512 * MIB).vm_id == 1
    # Nobody finishes VM 1: the lease removes it; that first RemoveVm's answer is unreadable.
    wait_until(lambda: mms.spoiled == 1, "the lease's RemoveVm (answered badly)", WAIT_S)
    # A launch waits for the start to be freed, then reserves: it does not wait for ever.
    stream = LaunchStream(stub)
    try:
        stream.start(512 * MIB)
        first = stream.next_event()
        if first.WhichOneof("event") == "queued":
            # It came while the lease's removal was still being retried: first in line.
            assert first.queued.position == 1
            first = stream.next_event()
        assert first.WhichOneof("event") == "reserved", first
        assert first.reserved.vm_id == 2
        stream.vm_started()
        assert stream.expect("launched").launched.vm_id == 2
        stream.expect_ok_end()
    finally:
        stream.close()
    assert listed_vm_ids(stub) == [0, 2]
