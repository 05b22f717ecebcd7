"""StatsReader coalescing on the event loop, against a real connection to the real simulator.

A caller that finds mms idle sends its read at once; callers that arrive while a read is in
flight share the next one, for the union of their ids.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from manatee_grpc.core._stats import StatsReader
from manatee_grpc.mms._connection import ConnectionConfig, MmsConnection
from manatee_grpc.mms._messages import CROS_GUEST_VM_ID, MessageType
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


def test_a_lone_caller_is_sent_at_once(sim: Simulator, conn: MmsConnection) -> None:
    reader = StatsReader(conn)

    async def scenario() -> None:
        snapshot = await reader.read_async((CROS_GUEST_VM_ID,), WAIT_S)
        assert [entry.vm_id for entry in snapshot.stats] == [CROS_GUEST_VM_ID]

    before = _reads(sim)
    asyncio.run(scenario())
    assert _reads(sim) == before + 1
    assert reader.mms_reads == 1


def test_callers_arriving_during_a_read_share_the_next_one(
    sim: Simulator, conn: MmsConnection
) -> None:
    callers = 8
    reader = StatsReader(conn)

    async def scenario() -> None:
        # The first starts a read at once; the others arrive while it is in flight. mms holds
        # its answer until all of them have joined the next read: the answer is taken on the
        # connection thread, which sends the next read at once (it has at least as many
        # callers as the first served), so an answer arriving among them would split them
        # over two reads.
        first = asyncio.ensure_future(reader.read_async((CROS_GUEST_VM_ID,), WAIT_S))
        await asyncio.sleep(0)  # let the first send
        with sim.holding_answers():
            rest = [
                asyncio.ensure_future(reader.read_async((CROS_GUEST_VM_ID, 7 + i), WAIT_S))
                for i in range(callers - 1)
            ]
            await asyncio.sleep(0)  # each of them joins (they were queued before this wake-up)
        snapshots = await asyncio.gather(first, *rest)
        # One snapshot object per distinct ask within a read; every asked id is answered for.
        for index, snapshot in enumerate(snapshots[1:]):
            assert snapshot.missing_vm_ids == (7 + index,)

    before = _reads(sim)
    asyncio.run(scenario())
    assert _reads(sim) - before == 2  # the first read, and one shared by the seven others
    assert reader.mms_reads == 2
