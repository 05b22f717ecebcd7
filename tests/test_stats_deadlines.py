"""Deadlines of callers sharing a coalesced stats read: one loop timer serves them all.

Pure logic, with a fake connection whose reads are answered only when the test says so: each
caller's deadline ends its own wait (DEADLINE_EXCEEDED), never the read, and in deadline order
whatever the order the callers came in; a caller without a deadline waits for the answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from held_stats import HeldConnection, reader

from manatee_grpc.core._errors import DeadlineExceededError

# Long enough that no loaded machine reaches it during the test: "still waiting" is certain.
FAR_S = 600.0
NEAR_S = 0.05
TEST_DEADLINE_S = 60.0


def test_a_later_caller_with_an_earlier_deadline_ends_first_and_the_read_goes_on() -> None:
    connection = HeldConnection()
    stats = reader(connection)

    async def scenario() -> None:
        first = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # the first read is sent; the callers below share the next
        far = asyncio.ensure_future(stats.read_async((0,), FAR_S))
        near = asyncio.ensure_future(stats.read_async((0,), NEAR_S))
        with pytest.raises(DeadlineExceededError):
            await near
        assert not far.done() and not first.done()
        connection.answer()  # the first read, which served one: the next goes at once
        await connection.reads_sent(2)
        connection.answer()
        for caller in (first, far):
            assert [entry.vm_id for entry in (await caller).stats] == [0]

    _run(scenario())
    assert len(connection.sent) == 2


def test_callers_of_one_read_each_end_at_their_own_deadline() -> None:
    connection = HeldConnection()
    stats = reader(connection)

    async def scenario() -> None:
        first = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # the first read is sent; the callers below share the next
        later = asyncio.ensure_future(stats.read_async((0,), 2 * NEAR_S))
        sooner = asyncio.ensure_future(stats.read_async((0,), NEAR_S))
        forever = asyncio.ensure_future(stats.read_async((0,), None))
        for caller in (sooner, later):
            with pytest.raises(DeadlineExceededError):
                await caller
        assert not forever.done()
        connection.answer()
        await connection.reads_sent(2)
        connection.answer()
        for caller in (first, forever):
            assert [entry.vm_id for entry in (await caller).stats] == [0]

    _run(scenario())
    assert len(connection.sent) == 2


def test_a_caller_on_the_wire_ends_at_its_deadline_on_a_new_loop() -> None:
    connection = HeldConnection()
    stats = reader(connection)

    async def answered() -> None:
        caller = asyncio.ensure_future(stats.read_async((0,), NEAR_S))
        await asyncio.sleep(0)
        connection.answer()
        await caller  # answered; its loop ends (usually) with the timer for NEAR_S still armed

    async def never_answered() -> None:
        # Sent at once (mms idle): it waits on the read on the wire, which is never answered;
        # its deadline is later than the one the dead loop's timer was armed for.
        with pytest.raises(DeadlineExceededError):
            await stats.read_async((0,), 2 * NEAR_S)

    _run(answered())
    _run(never_answered())
    assert len(connection.sent) == 2


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run ``scenario`` on a new loop; a caller that is never woken fails it, not hangs it."""
    asyncio.run(asyncio.wait_for(scenario, TEST_DEADLINE_S))
