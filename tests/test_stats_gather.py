"""Gathering of coalesced stats reads: a read waits for the callers the reader expects, not more.

Pure logic, with a fake connection whose reads are answered only when the test says so. The
reader expects the most callers it has seen waiting at once; a read goes as soon as that many
have joined it, or when its gather window ends, and a window that ends with fewer lowers what
is expected. A window of FAR_S shows that an arrival, not the window, sent a read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest
from held_stats import HeldConnection, reader

from manatee_grpc.core._errors import DeadlineExceededError

FAR_S = 600.0  # no loaded machine reaches it during a test
SHORT_S = 0.01  # a window that is meant to end
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


def test_callers_answered_together_wait_for_each_other_not_for_the_window() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        first = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # the first read is sent
        others = [asyncio.ensure_future(stats.read_async((0, vm_id), None)) for vm_id in (1, 2, 3)]
        await asyncio.sleep(0)  # they join the next read while the first is on the wire
        connection.answer()
        await first
        # Four callers were waiting at once; three have joined the next read: it waits.
        assert len(connection.sent) == 1
        again = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)  # the first caller is back: the fourth, and the read goes
        assert len(connection.sent) == 2
        assert connection.sent[1][0].vm_ids == (0, 1, 2, 3)
        connection.answer()
        for caller in (again, *others):
            assert (await caller).missing_vm_ids == ()

    _run(scenario())


def test_a_window_that_ends_with_fewer_callers_lowers_what_is_expected() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=SHORT_S)

    async def scenario() -> None:
        first = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        pair = [asyncio.ensure_future(stats.read_async((0,), None)) for _ in range(2)]
        await asyncio.sleep(0)  # three waiting at once: three expected
        connection.answer()
        await first  # ... and it does not come back: the pair's read goes when its window ends
        await connection.reads_sent(2)
        connection.answer()
        await asyncio.gather(*pair)
        # Two are expected now: a lone caller waits out one window, then one is expected.
        lone = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        assert len(connection.sent) == 2
        await connection.reads_sent(3)
        connection.answer()
        await lone
        alone_again = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        assert len(connection.sent) == 4  # sent at once
        connection.answer()
        await alone_again

    _run(scenario())


def test_a_caller_waiting_on_a_gathering_read_still_ends_at_its_deadline() -> None:
    connection = HeldConnection()
    stats = reader(connection, gather_window_s=FAR_S)

    async def scenario() -> None:
        first = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        hurried = asyncio.ensure_future(stats.read_async((0,), 0.05))
        await asyncio.sleep(0)  # two expected
        connection.answer()
        await first
        # The hurried caller's read gathers (one of two joined) for longer than its deadline.
        with pytest.raises(DeadlineExceededError):
            await hurried
        assert len(connection.sent) == 1
        # The next caller completes the read the hurried one had joined.
        late = asyncio.ensure_future(stats.read_async((0,), None))
        await asyncio.sleep(0)
        assert len(connection.sent) == 2
        connection.answer()
        await late

    _run(scenario())


def _run(scenario: Coroutine[Any, Any, None]) -> None:
    """Run ``scenario`` on a new loop; a caller that is never woken fails it, not hangs it."""
    asyncio.run(asyncio.wait_for(scenario, TEST_DEADLINE_S))
