"""Deadlines of callers sharing a coalesced stats read: one loop timer serves them all.

Pure logic, with a fake connection whose reads are answered only when the test says so: each
caller's deadline ends its own wait (DEADLINE_EXCEEDED), never the read, and in deadline order
whatever the order the callers came in; a caller without a deadline waits for the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

import pytest

from manatee_grpc.core._errors import DeadlineExceededError
from manatee_grpc.core._stats import StatsReader
from manatee_grpc.mms._messages import (
    BalloonStats,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    VmBalloonStats,
)

# Long enough that no loaded machine reaches it during the test: "still waiting" is certain.
FAR_S = 600.0
NEAR_S = 0.05
TEST_DEADLINE_S = 60.0


class _HeldConnection:
    """The part of MmsConnection a StatsReader uses; every read waits for ``answer``."""

    session = 1

    def __init__(self) -> None:
        self.sent: list[tuple[GetBalloonStatsRequest, Future[GetBalloonStatsResponse]]] = []

    def add_observer(self, observer: Any) -> None:
        pass

    def submit(self, request: GetBalloonStatsRequest) -> Future[GetBalloonStatsResponse]:
        future: Future[GetBalloonStatsResponse] = Future()
        future.set_running_or_notify_cancel()  # on the wire at once: a caller cannot take it back
        self.sent.append((request, future))
        return future

    def answer(self) -> None:
        request, future = self.sent[-1]
        future.set_result(
            GetBalloonStatsResponse(
                tuple(VmBalloonStats(vm_id, BalloonStats(), 0) for vm_id in request.vm_ids)
            )
        )


def _reader(connection: _HeldConnection) -> StatsReader:
    return StatsReader(connection)  # type: ignore[arg-type]


def test_a_later_caller_with_an_earlier_deadline_ends_first_and_the_read_goes_on() -> None:
    connection = _HeldConnection()
    reader = _reader(connection)

    async def scenario() -> None:
        first = asyncio.ensure_future(reader.read_async((0,), None))
        await asyncio.sleep(0)  # the first read is sent; the callers below share the next
        far = asyncio.ensure_future(reader.read_async((0,), FAR_S))
        near = asyncio.ensure_future(reader.read_async((0,), NEAR_S))
        with pytest.raises(DeadlineExceededError):
            await near
        assert not far.done() and not first.done()
        connection.answer()  # the first read; its answer sends the next at once
        connection.answer()
        for caller in (first, far):
            assert [entry.vm_id for entry in (await caller).stats] == [0]

    _run(scenario())
    assert len(connection.sent) == 2


def test_callers_of_one_read_each_end_at_their_own_deadline() -> None:
    connection = _HeldConnection()
    reader = _reader(connection)

    async def scenario() -> None:
        first = asyncio.ensure_future(reader.read_async((0,), None))
        await asyncio.sleep(0)  # the first read is sent; the callers below share the next
        later = asyncio.ensure_future(reader.read_async((0,), 2 * NEAR_S))
        sooner = asyncio.ensure_future(reader.read_async((0,), NEAR_S))
        forever = asyncio.ensure_future(reader.read_async((0,), None))
        for caller in (sooner, later):
            with pytest.raises(DeadlineExceededError):
                await caller
        assert not forever.done()
        connection.answer()
        connection.answer()
        for caller in (first, forever):
            assert [entry.vm_id for entry in (await caller).stats] == [0]

    _run(scenario())
    assert len(connection.sent) == 2


def test_a_caller_on_the_wire_ends_at_its_deadline_on_a_new_loop() -> None:
    connection = _HeldConnection()
    reader = _reader(connection)

    async def answered() -> None:
        caller = asyncio.ensure_future(reader.read_async((0,), NEAR_S))
        await asyncio.sleep(0)
        connection.answer()
        await caller  # answered; its loop ends (usually) with the timer for NEAR_S still armed

    async def never_answered() -> None:
        # Sent at once (mms idle): it waits on the read on the wire, which is never answered;
        # its deadline is later than the one the dead loop's timer was armed for.
        with pytest.raises(DeadlineExceededError):
            await reader.read_async((0,), 2 * NEAR_S)

    _run(answered())
    _run(never_answered())
    assert len(connection.sent) == 2


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run ``scenario`` on a new loop; a caller that is never woken fails it, not hangs it."""
    asyncio.run(asyncio.wait_for(scenario, TEST_DEADLINE_S))
