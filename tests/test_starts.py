"""The start slot when mms's answers cannot be read or a removal fails: pure logic with fakes.

Whatever happens, mms's one pending start ends up held by someone making progress, under a
removal that is retried until mms confirms it, or released: never held by nobody, never for ever.
The fakes are those of test_launch_unit: a FakeConnection whose futures the test completes, and
lease/retry timers that the test fires by hand (no sleeps).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import pytest
from test_launch_unit import MIB, FakeBridge, run, settle

from manatee_grpc.core._errors import MmsProtocolError, StartInProgressError
from manatee_grpc.mms._messages import (
    RES_EINVAL,
    RES_OK,
    FinishAddVmRequest,
    FinishAddVmResponse,
    PrepareVmRequest,
    PrepareVmResponse,
    RemoveVmRequest,
    RemoveVmResponse,
)


def _unreadable(what: str) -> MmsProtocolError:
    """What the connection fails a call with when a right-type answer has a bad body."""
    return MmsProtocolError(f"mms broke the protocol answering {what}", reached_mms=True)


def _pending(bridge: FakeBridge, kind: type) -> list[tuple[Any, Future[Any]]]:
    return [
        (request, future) for request, future in bridge.connection.pending if type(request) is kind
    ]


def _bridge_with_running_vm_1() -> FakeBridge:
    """mms gave VM 1 in this session (it is running): the next start it opens is VM 2."""
    bridge = FakeBridge()
    connection = bridge.connection
    connection.answers[RemoveVmRequest].clear()  # RemoveVm answers are the test's to give
    connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 1, 0))
    connection.answers[FinishAddVmRequest].append(FinishAddVmResponse(RES_OK))
    bridge.slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
    bridge.slot.submit_end(FinishAddVmRequest(1)).result()
    assert bridge.slot.claim is None
    return bridge


def test_an_unreadable_prepare_answer_tracks_the_next_id_and_removes_it() -> None:
    bridge = _bridge_with_running_vm_1()
    slot, connection = bridge.slot, bridge.connection
    prepare = slot.submit_prepare(PrepareVmRequest(1024 * MIB, 256 * MIB))
    prepare.future.set_exception(_unreadable("PREPARE_VM"))
    claim = slot.claim
    assert claim is not None and (claim.vm_id, claim.vm_id_guessed) == (2, True)
    assert bridge.removed == [2]  # nobody can finish it: removed at once
    # While it is being removed no PrepareVm joins it (it would be refused or top up a goner).
    with pytest.raises(StartInProgressError):
        slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
    ((_, removal),) = _pending(bridge, RemoveVmRequest)
    connection.pending.clear()
    connection.answer(RemoveVmRequest(2), removal, RemoveVmResponse(RES_OK))
    assert slot.claim is None
    # mms used id 2: a start opened unseen next would be VM 3.
    later = slot.submit_prepare(PrepareVmRequest(1024 * MIB, 256 * MIB))
    later.future.set_exception(_unreadable("PREPARE_VM"))
    assert slot.claim is not None and slot.claim.vm_id == 3


def test_a_removal_of_a_guessed_start_answered_einval_means_nothing_was_pending() -> None:
    bridge = _bridge_with_running_vm_1()
    slot, connection = bridge.slot, bridge.connection
    prepare = slot.submit_prepare(PrepareVmRequest(1024 * MIB, 256 * MIB))
    prepare.future.set_exception(_unreadable("PREPARE_VM"))
    ((_, removal),) = _pending(bridge, RemoveVmRequest)
    connection.answer(RemoveVmRequest(2), removal, RemoveVmResponse(RES_EINVAL))
    assert slot.claim is None  # the bad answer opened nothing: the slot is free again


def test_a_failed_lease_removal_is_retried_until_mms_confirms_and_launches_then_proceed() -> None:
    bridge = _bridge_with_running_vm_1()
    slot, connection = bridge.slot, bridge.connection
    connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 2, 0))
    slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
    (_, expire) = bridge.timers.pop()
    expire()  # the lease runs out
    ((_, removal),) = _pending(bridge, RemoveVmRequest)
    connection.pending.clear()
    removal.set_exception(_unreadable("REMOVE_VM"))  # mms may or may not have removed it
    claim = slot.claim
    assert claim is not None and claim.removing is not None  # still held, by the removal
    with pytest.raises(StartInProgressError):  # a dead claim is not joined
        slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
    (_, retry) = bridge.timers.pop()

    async def scenario() -> None:
        launch = asyncio.create_task(slot.acquire_for_launch(object()))
        await settle()
        assert not launch.done()  # waits behind the start being removed
        retry()
        ((_, again),) = _pending(bridge, RemoveVmRequest)
        # The first RemoveVm did remove it: mms no longer knows VM 2.
        connection.answer(RemoveVmRequest(2), again, RemoveVmResponse(RES_EINVAL))
        await asyncio.wait_for(launch, 5.0)

    run(scenario())
    assert bridge.removed == [2, 2]


def test_a_launch_whose_prepare_answer_is_unreadable_removes_the_guessed_start() -> None:
    bridge = _bridge_with_running_vm_1()
    slot, connection = bridge.slot, bridge.connection
    token = object()

    async def scenario() -> None:
        await slot.acquire_for_launch(token)

    run(scenario())
    prepare: Future[Any] = Future()
    prepare.set_exception(_unreadable("PREPARE_VM"))
    slot.remove_launch_start(token, "its launch did not complete", prepare)
    assert bridge.removed == [2]
    assert slot.claim is not None  # held until mms confirms
    ((_, removal),) = _pending(bridge, RemoveVmRequest)
    connection.answer(RemoveVmRequest(2), removal, RemoveVmResponse(RES_OK))
    assert slot.claim is None


def test_a_launch_whose_prepare_was_never_sent_just_releases() -> None:
    bridge = _bridge_with_running_vm_1()
    slot = bridge.slot
    token = object()

    async def scenario() -> None:
        await slot.acquire_for_launch(token)

    run(scenario())
    prepare: Future[Any] = Future()
    prepare.set_exception(MmsProtocolError("not sent", reached_mms=False))
    slot.remove_launch_start(token, "its launch did not complete", prepare)
    assert bridge.removed == [] and slot.claim is None
