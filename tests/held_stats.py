"""A fake of the part of MmsConnection a StatsReader uses, for unit tests of its pure logic.

Every read it is sent waits until the test answers it; a test can also wait (on its loop) until
a given number of reads have been sent, since the reader may hold a read back to gather callers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from manatee_grpc.core._stats import StatsReader
from manatee_grpc.mms._messages import (
    BalloonStats,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    VmBalloonStats,
)


class HeldConnection:
    session = 1

    def __init__(self) -> None:
        self.sent: list[tuple[GetBalloonStatsRequest, Future[GetBalloonStatsResponse]]] = []
        self._signal: asyncio.Future[None] | None = None

    def add_observer(self, observer: Any) -> None:
        pass

    def submit(self, request: GetBalloonStatsRequest) -> Future[GetBalloonStatsResponse]:
        future: Future[GetBalloonStatsResponse] = Future()
        future.set_running_or_notify_cancel()  # on the wire at once: a caller cannot take it back
        self.sent.append((request, future))
        if self._signal is not None and not self._signal.done():
            self._signal.set_result(None)
        return future

    async def reads_sent(self, count: int) -> None:
        """Return once ``count`` reads have been sent (submit runs on the test's loop)."""
        while len(self.sent) < count:
            self._signal = asyncio.get_running_loop().create_future()
            await self._signal

    def answer(self) -> None:
        """Answer the last read sent (it must not have been answered yet)."""
        request, future = self.sent[-1]
        future.set_result(
            GetBalloonStatsResponse(
                tuple(VmBalloonStats(vm_id, BalloonStats(), 0) for vm_id in request.vm_ids)
            )
        )


def reader(
    connection: HeldConnection,
    gather_window_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> StatsReader:
    if gather_window_s is None:
        return StatsReader(connection, clock=clock)  # type: ignore[arg-type]
    return StatsReader(connection, gather_window_s=gather_window_s, clock=clock)  # type: ignore[arg-type]
