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
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from . import _aio
from ._connection import MmsConnection
from ._errors import DeadlineExceededError, MmsConnectionError
from ._messages import (
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    MmsRequest,
    Response,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Stats for the ids one caller asked for, read after that caller's request arrived."""

    session: int
    read_time_unix_s: float
    stats: tuple[VmBalloonStats, ...]
    # Every asked-for id without statistics here: unknown to mms, left out by it, or unreadable.
    missing_vm_ids: tuple[int, ...]
    # The ids of ``missing_vm_ids`` that mms did answer for, with impossible values, and why.
    unreadable: tuple[UnreadableVm, ...] = ()
    # The mms answer this was picked from: callers served by the same read share it, so the
    # servicer can build one response for all of them.
    source: object = field(default=None, compare=False, repr=False)


# The longest a read waits for a busy loop (callers still arriving) while mms is idle: a few
# mms round trips, so a loop that never goes idle still sends a read this often.
DEFAULT_GATHER_WINDOW_S = 0.002


@dataclass(frozen=True, slots=True)
class _Answer:
    """One mms stats answer, indexed by VM id, with the session it was read in."""

    session: int
    read_time_unix_s: float
    by_id: dict[int, VmBalloonStats]
    unreadable_by_id: dict[int, UnreadableVm]

    @classmethod
    def of(cls, session: int, response: GetBalloonStatsResponse) -> _Answer:
        return cls(
            session,
            time.time(),
            {entry.vm_id: entry for entry in response.all_stats},
            {entry.vm_id: entry for entry in response.unreadable},
        )


@dataclass(slots=True)
class _Batch:
    vm_ids: set[int] = field(default_factory=set)
    # A caller on a plain thread (a watch ticker) joined: send as soon as mms is idle.
    urgent: bool = False
    # loop.time() after which the batch is sent however busy the loop (set when it first waits).
    gather_until: float | None = None
    done: Future[_Answer] = field(default_factory=Future)
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
        connection.add_observer(UnreadableVmLog())

    def read(self, vm_ids: tuple[int, ...], timeout_s: float | None) -> StatsSnapshot:
        """Blocking read, for callers on plain threads (the watch tickers)."""
        if not self._coalesce:
            return self._read_direct(vm_ids, timeout_s)
        batch = self._join_batch(vm_ids)
        try:
            # Not wait_for(): the batch is shared, so one caller's deadline must not cancel it.
            answer = batch.done.result(timeout=timeout_s)
        except TimeoutError:
            raise _stats_deadline() from None
        return _pick(vm_ids, answer)

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
            return _pick(vm_ids, _Answer.of(session, response))
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
            snapshot = batch.picks[vm_ids] = _pick(vm_ids, batch.done.result())
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
        return _pick(vm_ids, _Answer.of(session, response))

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
                batch.done.set_result(_Answer.of(session, done.result()))
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


def _pick(vm_ids: tuple[int, ...], answer: _Answer) -> StatsSnapshot:
    by_id, unreadable_by_id = answer.by_id, answer.unreadable_by_id
    stats = tuple(by_id[vm_id] for vm_id in vm_ids if vm_id in by_id)
    missing = tuple(vm_id for vm_id in vm_ids if vm_id not in by_id)
    unreadable = (
        tuple(unreadable_by_id[vm_id] for vm_id in missing if vm_id in unreadable_by_id)
        if unreadable_by_id
        else ()
    )
    return StatsSnapshot(
        answer.session, answer.read_time_unix_s, stats, missing, unreadable, answer
    )


# How often one VM's same fault is logged again while it lasts (with a count of the reads).
UNREADABLE_LOG_INTERVAL_S = 300.0


class UnreadableVmLog:
    """Logs a VM whose stats mms answered with impossible values: once when it starts, then at
    most every ``interval_s`` while it lasts (a watch would otherwise log it on every tick).

    A ConnectionObserver, so every read is seen, whoever asked and whether or not they stayed.
    """

    def __init__(
        self,
        interval_s: float = UNREADABLE_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        # (vm_id, reason) -> (when last logged, reads seen unreadable since then)
        self._seen: dict[tuple[int, UnreadableReason], tuple[float, int]] = {}

    def on_connected(self, session: int) -> None:
        with self._lock:
            self._seen.clear()  # a new session's VM 0 (or id 1) is a new story

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        pass

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None:
        if not isinstance(response, GetBalloonStatsResponse):
            return
        if not response.unreadable and not self._seen:
            return  # the usual case, and the hot path
        now = self._clock()
        with self._lock:
            current = {(entry.vm_id, entry.reason) for entry in response.unreadable}
            for key in [key for key in self._seen if key not in current]:
                if key[0] in _asked(request):
                    del self._seen[key]  # read again and readable (or another fault): over
            for entry in response.unreadable:
                key = (entry.vm_id, entry.reason)
                last = self._seen.get(key)
                if last is not None and now - last[0] < self._interval_s:
                    self._seen[key] = (last[0], last[1] + 1)
                    continue
                repeats = 0 if last is None else last[1]
                self._seen[key] = (now, 0)
                logger.warning(
                    "mms session %d: VM %d's stats are unreadable (%s: %s = %s)%s; "
                    "reported in unreadable_vms, the other VMs are served",
                    session,
                    entry.vm_id,
                    entry.reason.value,
                    entry.mms_field,
                    entry.mms_value,
                    f" ({repeats} more unreadable reads since the last report)" if repeats else "",
                )


def _asked(request: MmsRequest[Any]) -> tuple[int, ...]:
    return request.vm_ids if isinstance(request, GetBalloonStatsRequest) else ()
