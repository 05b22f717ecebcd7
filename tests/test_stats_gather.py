"""StatsReader gathering on the event loop, against a real connection to the real simulator.

With mms idle, a read for loop callers is sent once the loop has nothing else ready to run, so
callers that arrive while the loop is busy share it; a lone caller is never held, and a loop
that never goes idle still gets its read within the gather window. Loop "busyness" is made
for real with callbacks that keep rescheduling themselves, never with sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from manatee_grpc._connection import ConnectionConfig, MmsConnection
from manatee_grpc._messages import CROS_GUEST_VM_ID, MessageType
from manatee_grpc._stats import StatsReader, StatsSnapshot
from manatee_grpc.sim import Simulator

WAIT_S = 10.0


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator() as simulator:
        yield simulator


@pytest.fixture
def conn(sim: Simulator) -> Iterator[MmsConnection]:
    connection = MmsConnection(ConnectionConfig(address=sim.address))
    connection.start()
    assert connection.wait_connected(WAIT_S)
    yield connection
    connection.stop()


def _reads(sim: Simulator) -> int:
    return sim.request_counts[MessageType.GET_BALLOON_STATS]


def _keep_busy(loop: asyncio.AbstractEventLoop, passes: int, each_pass: list[object]) -> None:
    """Occupy ``passes`` loop passes with a callback that reschedules itself."""

    def step(left: int) -> None:
        each_pass.append(left)
        if left > 1:
            loop.call_soon(step, left - 1)

    loop.call_soon(step, passes)


@contextlib.contextmanager
def _busy_loop() -> Iterator[None]:
    """Keep the running loop busy (a callback that reschedules itself) until the block ends."""
    loop = asyncio.get_running_loop()
    busy = True

    def spin() -> None:
        if busy:
            loop.call_soon(spin)

    loop.call_soon(spin)
    try:
        yield
    finally:
        busy = False


def test_callers_arriving_over_a_busy_loop_share_one_read(
    sim: Simulator, conn: MmsConnection
) -> None:
    callers = 6
    reader = StatsReader(conn, gather_window_s=WAIT_S)  # only idleness may send the read

    async def scenario() -> list[StatsSnapshot]:
        loop = asyncio.get_running_loop()
        passes: list[object] = []
        _keep_busy(loop, 4 * callers, passes)
        tasks: list[asyncio.Task[StatsSnapshot]] = []
        for _ in range(callers):
            tasks.append(asyncio.create_task(reader.read_async((CROS_GUEST_VM_ID,), WAIT_S)))
            # A later pass: before gathering, the first caller's read left at the end of its own.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        assert len(passes) < 4 * callers, "the loop went idle before every caller joined"
        return await asyncio.gather(*tasks)

    before = _reads(sim)
    snapshots = asyncio.run(scenario())
    assert _reads(sim) - before == 1
    assert reader.mms_reads == 1
    assert all([s.vm_id for s in snap.stats] == [CROS_GUEST_VM_ID] for snap in snapshots)
    assert len({snap.read_time_unix_s for snap in snapshots}) == 1  # one read served them all


def test_a_lone_caller_on_an_idle_loop_is_not_held_for_the_window(
    sim: Simulator, conn: MmsConnection
) -> None:
    reader = StatsReader(conn, gather_window_s=3600.0)

    async def one_read() -> StatsSnapshot:
        # The read must go out as soon as the loop is idle, not after the hour-long window.
        return await asyncio.wait_for(reader.read_async((CROS_GUEST_VM_ID,), WAIT_S), WAIT_S)

    snapshot = asyncio.run(one_read())
    assert [entry.vm_id for entry in snapshot.stats] == [CROS_GUEST_VM_ID]
    assert _reads(sim) >= 1


def test_a_loop_that_never_goes_idle_still_reads_within_the_window(
    sim: Simulator, conn: MmsConnection
) -> None:
    reader = StatsReader(conn, gather_window_s=0.05)

    async def read_while_busy() -> StatsSnapshot:
        with _busy_loop():
            return await asyncio.wait_for(reader.read_async((CROS_GUEST_VM_ID,), WAIT_S), WAIT_S)

    snapshot = asyncio.run(read_while_busy())
    assert [entry.vm_id for entry in snapshot.stats] == [CROS_GUEST_VM_ID]
    assert reader.mms_reads == 1


def test_a_thread_caller_is_sent_at_once_even_with_loop_callers_gathering(
    sim: Simulator, conn: MmsConnection
) -> None:
    """A watch ticker (a plain thread) joining a gathering batch makes it go out when mms is
    idle, however busy the loop: its wait is bounded by mms, not by the loop."""
    reader = StatsReader(conn, gather_window_s=3600.0)

    async def scenario() -> tuple[StatsSnapshot, StatsSnapshot]:
        with _busy_loop():
            on_loop = asyncio.create_task(reader.read_async((CROS_GUEST_VM_ID,), WAIT_S))
            await asyncio.sleep(0)  # the loop caller has joined and is gathering
            from_thread = await asyncio.to_thread(reader.read, (CROS_GUEST_VM_ID,), WAIT_S)
            return await asyncio.wait_for(on_loop, WAIT_S), from_thread

    on_loop, from_thread = asyncio.run(scenario())
    assert on_loop.read_time_unix_s == from_thread.read_time_unix_s  # the same read
    assert reader.mms_reads == 1
