"""Gathering of coalesced stats reads: a read waits for the callers the reader expects, not more.

Pure logic, with a fake connection whose reads are answered only when the test says so. The
reader expects as many callers as the last read served: a read goes as soon as that many have
joined it, or when its gather window ends; when a read is answered, the next one goes at once
if it has as many callers or if mms took longer than the window to answer, else it waits for
the callers just answered to come back. A window of FAR_S shows that an arrival, not the
window, sent a read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from held_stats import HeldConnection, reader

from manatee_grpc.core._errors import DeadlineExceededError
from manatee_grpc.core._stats import StatsReader, StatsSnapshot

FAR_S = 600.0  # no loaded machine reaches it during a test
# A window that is meant to end, and still far longer than a read the test answers at once.
SHORT_S = 0.5
TEST_DEADLINE_S = 60.0


def test_a_lone_caller_is_sent_at_once_whatever_the_window() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        for sent in (1, 2):
            caller = asyncio.ensure_future(stats.read_async((0,), None))
            await asyncio.sleep(0)  # one step of the caller: it joins, and its read goes
            assert len(connection.sent) == sent
            connection.answer()
            await caller

    _run(scenario())


async def _crowd_on_the_wire(
    stats: StatsReader, connection: HeldConnection, size: int
) -> list[asyncio.Task[StatsSnapshot]]:
    """A lone caller's read, then ``size`` callers sharing the next, which is on the wire."""
    lone = asyncio.ensure_future(stats.read_async((0,), None))
    await asyncio.sleep(0)  # the lone caller's read is sent
    crowd = [asyncio.ensure_future(stats.read_async((0,), None)) for _ in range(size)]
    await asyncio.sleep(0)  # they join the next read while the first is on the wire
    connection.answer()  # it served one; the next has as many or more: it goes at once
    assert len(connection.sent) == 2
    await lone
    return crowd


def test_a_next_read_with_as_many_callers_goes_when_the_one_before_is_answered() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        crowd = await _crowd_on_the_wire(stats, connection, 3)
        connection.answer()
        await asyncio.gather(*crowd)

    _run(scenario())


def test_callers_answered_together_are_waited_for_not_the_window() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        crowd = await _crowd_on_the_wire(stats, connection, 3)
        straggler = asyncio.ensure_future(stats.read_async((0, 7), None))
        await asyncio.sleep(0)  # one caller joins the next read while the crowd's is on the wire
        connection.answer()
        await asyncio.gather(*crowd)
        # The crowd's read served three; one has joined the next: it waits for the crowd.
        assert len(connection.sent) == 2
        back = [asyncio.ensure_future(stats.read_async((0,), None)) for _ in range(2)]
        await asyncio.sleep(0)  # two of the crowd are back: three joined, and the read goes
        assert len(connection.sent) == 3
        assert connection.sent[2][0].vm_ids == (0, 7)
        connection.answer()
        assert (await straggler).missing_vm_ids == ()
        await asyncio.gather(*back)

    _run(scenario())


def test_after_a_read_mms_took_longer_than_the_window_to_answer_the_next_goes_at_once() -> None:
    connection = HeldConnection()
    now_s = [0.0]  # the reader's clock, moved by the test
    stats = reader(connection, gather_window_s=FAR_S, clock=lambda: now_s[0])

    async def scenario() -> None:
        crowd = await _crowd_on_the_wire(stats, connection, 3)
        straggler = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # it joins the next read while the crowd's is on the wire
        # mms is the bottleneck (slower than the window): waiting would leave it idle.
        now_s[0] += 2 * FAR_S
        connection.answer()
        assert len(connection.sent) == 3
        await asyncio.gather(*crowd)
        connection.answer()
        await straggler

    _run(scenario())


def test_a_window_that_ends_with_fewer_callers_lowers_what_is_expected() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=SHORT_S)

    async def scenario() -> None:
        crowd = await _crowd_on_the_wire(stats, connection, 3)
        lone = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        connection.answer()
        await asyncio.gather(*crowd)  # ... and the crowd does not come back
        assert len(connection.sent) == 2
        await connection.reads_sent(3)  # the window ended: the read went with one caller
        connection.answer()
        await lone
        # That read served one: the next lone caller goes at once.
        alone_again = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        assert len(connection.sent) == 4
        connection.answer()
        await alone_again

    _run(scenario())


def test_a_caller_waiting_on_a_gathering_read_still_ends_at_its_deadline() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        crowd = await _crowd_on_the_wire(stats, connection, 2)
        hurried = asyncio.ensure_future(stats.read_async((0,), 0.05))
        await asyncio.sleep(0)
        connection.answer()
        await asyncio.gather(*crowd)
        # The hurried caller's read gathers (one of two joined) for longer than its deadline.
        with pytest.raises(DeadlineExceededError):
            await hurried
        assert len(connection.sent) == 2
        # One of the crowd comes back: with the hurried caller's place, two have joined the
        # read, and it goes.
        back = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        assert len(connection.sent) == 3
        connection.answer()
        await back

    _run(scenario())


def test_a_read_left_gathering_by_a_closed_loop_is_not_joined_from_a_new_one() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=SHORT_S)

    async def first_loop() -> None:
        await _crowd_on_the_wire(stats, connection, 2)
        left = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # a caller joins the next read; then this loop ends
        assert not left.done()

    asyncio.run(first_loop())
    connection.answer()  # the crowd's read: the next one is left gathering for a closed loop

    async def second_loop() -> None:
        caller = asyncio.ensure_future(stats.read_async((0,), None))
        await connection.reads_sent(3)
        connection.answer()
        await caller  # woken on its own loop

    _run(second_loop())


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run ``scenario`` on a new loop; a caller that is never woken fails it, not hangs it."""
    asyncio.run(asyncio.wait_for(scenario, TEST_DEADLINE_S))
