"""Balloon-stats reads, coalesced: callers arriving while a read is in flight share the next one.

mms serves one request at a time, so throughput comes from doing less: every caller waiting for
stats is served by one GetBalloonStats for the union of their ids, sent after they all arrived.

Under load a read is also *gathered*: with mms idle, a read for callers on the event loop is
sent once the loop has nothing else ready to run (at most ``gather_window_s`` later). Work still
queued on the loop is mostly more requests arriving, which then share the read; without this a
busy server sends a read per two or three callers, and on a server bound by one interpreter lock
every read (its thread hand-offs, decode and response build) is time taken from the callers. A
lone caller never waits: an idle loop sends at once.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from . import _aio
from ._connection import MmsConnection
from ._errors import DeadlineExceededError
from ._messages import (
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    VmBalloonStats,
)


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Stats for the ids one caller asked for, read after that caller's request arrived."""

    session: int
    read_time_unix_s: float
    stats: tuple[VmBalloonStats, ...]
    missing_vm_ids: tuple[int, ...]
    # The mms answer this was picked from: callers served by the same read share it, so the
    # servicer can build one response for all of them.
    source: object = field(default=None, compare=False, repr=False)


# The longest a read waits for a busy loop (callers still arriving) while mms is idle: a few
# mms round trips, so a loop that never goes idle still sends a read this often.
DEFAULT_GATHER_WINDOW_S = 0.002


@dataclass(slots=True)
class _Batch:
    vm_ids: set[int] = field(default_factory=set)
    # A caller on a plain thread (a watch ticker) joined: send as soon as mms is idle.
    urgent: bool = False
    # loop.time() after which the batch is sent however busy the loop (set when it first waits).
    gather_until: float | None = None
    done: Future[tuple[int, float, dict[int, VmBalloonStats]]] = field(default_factory=Future)
    # Coroutines waiting on this batch, woken together by one hand-off to their loop (so a
    # batch of N callers costs the connection thread one wake-up, not N); None once woken.
    loop_waiters: list[asyncio.Future[None]] | None = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    picks: dict[tuple[int, ...], StatsSnapshot] = field(default_factory=dict)


class StatsReader:
    """Reads balloon stats through the connection, coalescing concurrent callers if enabled."""

    def __init__(
        self,
        connection: MmsConnection,
        coalesce: bool = True,
        gather_window_s: float = DEFAULT_GATHER_WINDOW_S,
    ) -> None:
        self._connection = connection
        self._coalesce = coalesce
        self._gather_window_s = gather_window_s
        # Re-entrant: a submit that fails at once runs the done callback inline, under the lock.
        self._lock = threading.RLock()
        self._in_flight = False
        self._flush_scheduled = False  # a loop callback will send the next batch soon
        self._next: _Batch | None = None
        self.mms_reads = 0  # GetBalloonStats round trips started (for tests and benchmarks)

    def read(self, vm_ids: tuple[int, ...], timeout_s: float | None) -> StatsSnapshot:
        """Blocking read, for callers on plain threads (the watch tickers)."""
        if not self._coalesce:
            return self._read_direct(vm_ids, timeout_s)
        batch = self._join_batch(vm_ids)
        try:
            # Not wait_for(): the batch is shared, so one caller's deadline must not cancel it.
            session, read_time_unix_s, by_id = batch.done.result(timeout=timeout_s)
        except TimeoutError:
            raise _stats_deadline() from None
        return _pick(vm_ids, session, read_time_unix_s, by_id)

    async def read_async(self, vm_ids: tuple[int, ...], timeout_s: float | None) -> StatsSnapshot:
        """The same read for a coroutine on the gRPC event loop."""
        if not self._coalesce:
            with self._lock:
                self.mms_reads += 1
            session = self._connection.session
            future = self._connection.submit(GetBalloonStatsRequest(vm_ids))
            response: GetBalloonStatsResponse = await _aio.await_mms(
                future, timeout_s, MessageType.GET_BALLOON_STATS
            )
            by_id = {entry.vm_id: entry for entry in response.all_stats}
            return _pick(vm_ids, session, time.time(), by_id)
        loop = asyncio.get_running_loop()
        batch = self._join_batch(vm_ids, loop)
        waiter = loop.create_future()
        if self._add_loop_waiter(batch, waiter):
            # The batch is shared: this caller's deadline ends only its own wait, never the read.
            expiry = None if timeout_s is None else loop.call_later(timeout_s, _aio.wake, waiter)
            try:
                await waiter
            finally:
                if expiry is not None:
                    expiry.cancel()
        if not batch.done.done():
            raise _stats_deadline()
        # Callers of one read asking for the same VMs get the same snapshot (only the loop
        # touches ``picks``), so the servicer converts it once for all of them.
        snapshot = batch.picks.get(vm_ids)
        if snapshot is None:
            snapshot = batch.picks[vm_ids] = _pick(vm_ids, *batch.done.result())
        return snapshot

    def _flush(self) -> None:
        """On the loop: send the next batch once mms is idle and the loop has no other work
        (callers still arriving in this burst join it), or once it has waited its window."""
        with self._lock:
            self._flush_scheduled = False
            batch = self._next
            if self._in_flight or batch is None:
                return
            assert batch.loop is not None
            now = batch.loop.time()
            if batch.gather_until is None:
                batch.gather_until = now + self._gather_window_s
            if batch.urgent or now >= batch.gather_until or not _aio.has_ready_work(batch.loop):
                self._send_next_locked()
            else:
                self._flush_scheduled = True
                batch.loop.call_soon(self._flush)

    def _add_loop_waiter(self, batch: _Batch, waiter: asyncio.Future[None]) -> bool:
        """Park ``waiter`` on ``batch``; False if the batch is already answered (no wait)."""
        with self._lock:
            if batch.loop_waiters is None:
                return False
            batch.loop_waiters.append(waiter)
            return True

    def _answered_on_loop(self, waiters: list[asyncio.Future[None]], flush: bool) -> None:
        # One hand-off per answered read: wake its callers, then maybe send the next read.
        _aio.wake_all(waiters)
        if flush:
            self._flush()

    def _join_batch(
        self, vm_ids: tuple[int, ...], loop: asyncio.AbstractEventLoop | None = None
    ) -> _Batch:
        """Join the next read. From a thread it is sent at once if mms is idle; from the event
        loop it is sent once the loop has no other work ready (see the module docstring)."""
        with self._lock:
            if self._next is None:
                self._next = _Batch(loop=loop)
            batch = self._next
            batch.vm_ids.update(vm_ids)
            if loop is None:
                batch.urgent = True
            elif batch.loop is None:
                batch.loop = loop
            if self._in_flight:
                pass  # the in-flight read's answer sends this batch, or hands it to the loop
            elif loop is None or (not self._flush_scheduled and not _aio.has_ready_work(loop)):
                self._send_next_locked()  # nobody else is about to join: no loop pass to wait
            elif not self._flush_scheduled:
                self._flush_scheduled = True
                loop.call_soon(self._flush)
        return batch

    def _read_direct(self, vm_ids: tuple[int, ...], timeout_s: float | None) -> StatsSnapshot:
        with self._lock:
            self.mms_reads += 1
        session = self._connection.session
        response = self._connection.call(GetBalloonStatsRequest(vm_ids), timeout_s)
        by_id = {entry.vm_id: entry for entry in response.all_stats}
        return _pick(vm_ids, session, time.time(), by_id)

    def _send_next_locked(self) -> None:
        batch = self._next
        assert batch is not None
        self._next = None
        self._in_flight = True
        self.mms_reads += 1
        session = self._connection.session
        mms_future = self._connection.submit(GetBalloonStatsRequest(tuple(sorted(batch.vm_ids))))

        def finished(done: Future[GetBalloonStatsResponse]) -> None:
            # Runs on the connection thread (or inline if submit failed at once).
            flush_on_loop = False
            with self._lock:
                self._in_flight = False
                following = self._next
                if following is not None:
                    if following.urgent or following.loop is None:
                        self._send_next_locked()
                    elif not self._flush_scheduled:
                        # The loop sends it once its own callers have gathered.
                        self._flush_scheduled = flush_on_loop = True
            if done.cancelled():
                batch.done.cancel()
            elif (error := done.exception()) is not None:
                batch.done.set_exception(error)
            else:
                by_id = {entry.vm_id: entry for entry in done.result().all_stats}
                batch.done.set_result((session, time.time(), by_id))
            with self._lock:  # after the answer is set: a caller parking later need not wait
                waiters, batch.loop_waiters = batch.loop_waiters, None
            flush_loop = following.loop if flush_on_loop and following is not None else None
            if waiters and batch.loop is not None and flush_loop in (None, batch.loop):
                _aio.call_soon_from_thread(
                    batch.loop, self._answered_on_loop, waiters, flush_loop is not None
                )
                return
            if waiters and batch.loop is not None:
                _aio.call_soon_from_thread(batch.loop, _aio.wake_all, waiters)
            if flush_loop is not None:
                _aio.call_soon_from_thread(flush_loop, self._flush)

        mms_future.add_done_callback(finished)


def _stats_deadline() -> DeadlineExceededError:
    return DeadlineExceededError(
        "deadline passed waiting for mms GET_BALLOON_STATS",
        messageType=MessageType.GET_BALLOON_STATS.name,
    )


def _pick(
    vm_ids: tuple[int, ...],
    session: int,
    read_time_unix_s: float,
    by_id: dict[int, VmBalloonStats],
) -> StatsSnapshot:
    stats = tuple(by_id[vm_id] for vm_id in vm_ids if vm_id in by_id)
    missing = tuple(vm_id for vm_id in vm_ids if vm_id not in by_id)
    return StatsSnapshot(session, read_time_unix_s, stats, missing, by_id)
