"""Balloon-stats reads, coalesced: callers arriving while a read is in flight share the next one.

mms serves one request at a time, so throughput comes from doing less: every caller waiting for
stats is served by one GetBalloonStats for the union of their ids. Callers that arrive while a
read is in flight join the next one, which the connection thread sends as soon as the answer
is in, if it has its callers (see Gathering).

Gathering: a read waits for the callers the reader expects, as many as the last read served
(callers answered together come back together), or ``gather_window_s`` at most, counted from
when it could first have gone: mms idle, or the read before it answered. When the read before
answers, its own callers are on their way back, so a next read that has fewer callers than it
served waits for them rather than go with whoever happens to be waiting; that is what merges a
crowd split over several reads into one, and each read costs mms a round of every VM's balloon
and this process a decode and a hand-off. A next read with as many callers goes from the
connection thread at once, and so does any next read when mms took longer than the window to
answer: then mms is the bottleneck, and a read that waited would leave it idle (with a 2 ms mms
at 32 callers, waiting cost 18 % of the calls/s). A lone caller never waits (the last read
served one), and when the crowd thins, the read that waits out its window serves fewer and so
lowers what the next expects. (An earlier version looked at the loop's private ready queue to
see whether more callers were on their way; this looks only at what the reader itself saw.)

Callers are coroutines on the server's event loop. The read's answer comes back to them through
the one hand-off from the connection thread (``_aio.call_soon_from_thread``): one per read,
whatever the number of callers it serves (it also starts the window of a next read left
gathering). A reader serves one loop at a time, as a server has one loop; a batch left by a
loop that closed is dropped, not joined.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from typing import Any

from manatee_grpc.core import _aio
from manatee_grpc.core._errors import DeadlineExceededError, MmsConnectionError
from manatee_grpc.mms._connection import MmsConnection
from manatee_grpc.mms._messages import (
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


@dataclass(frozen=True, slots=True)
class _Answer:
    """One mms stats answer, indexed by VM id, with the session it was read in."""

    session: int
    read_time_unix_s: float
    by_id: dict[int, VmBalloonStats]
    unreadable_by_id: dict[int, UnreadableVm]
    # The answer's entries and their ids in mms's order (the order of the ids asked).
    all_stats: tuple[VmBalloonStats, ...]
    ids: tuple[int, ...] | None  # None if mms named a VM twice

    @classmethod
    def of(cls, session: int, response: GetBalloonStatsResponse) -> _Answer:
        all_stats = response.all_stats
        by_id = {entry.vm_id: entry for entry in all_stats}
        return cls(
            session,
            time.time(),
            by_id,
            {entry.vm_id: entry for entry in response.unreadable},
            all_stats,
            tuple(by_id) if len(by_id) == len(all_stats) else None,
        )


# The longest a read waits for the callers expected to join it, once mms could take it.
DEFAULT_GATHER_WINDOW_S = 0.001

# The callers waiting on one read, each with its deadline (loop time; inf: none).
_Waiters = list[tuple[asyncio.Future[None], float]]


@dataclass(slots=True)
class _Batch:
    loop: asyncio.AbstractEventLoop
    vm_ids: set[int] = field(default_factory=set)
    gathering: bool = False  # a loop timer will send it if enough callers have not joined
    sent_at_s: float = 0.0  # when it was handed to the connection (monotonic)
    answer: _Answer | None = None
    error: BaseException | None = None
    # Coroutines waiting on this batch, each with its deadline (loop time; inf: none), woken
    # together by one hand-off to their loop (so a batch of N callers costs the connection
    # thread one wake-up, not N); None once handed off.
    waiters: _Waiters | None = field(default_factory=list)
    picks: dict[tuple[int, ...], StatsSnapshot] = field(default_factory=dict)


class StatsReader:
    """Reads balloon stats through the connection, coalescing concurrent callers if enabled."""

    def __init__(
        self,
        connection: MmsConnection,
        coalesce: bool = True,
        gather_window_s: float = DEFAULT_GATHER_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connection = connection
        self._coalesce = coalesce
        self._gather_window_s = gather_window_s
        self._clock = clock  # times an mms read against the gather window
        # How many callers a read waits for (see the module docstring): as many as the last
        # read served. Under _lock.
        self._expected_callers = 0
        # Taken on the loop (a caller joins) and on the connection thread (a read is answered).
        # Re-entrant: a submit that fails at once runs the done callback inline, under the lock.
        self._lock = threading.RLock()
        self._in_flight = False
        self._sent: _Batch | None = None  # the batch on the wire (under _lock)
        self._next: _Batch | None = None
        # One loop timer for every waiting caller's deadline, at the earliest one (see
        # _expire): a caller costs no timer of its own, and under steady load with like
        # deadlines the one timer is re-armed only when it fires. Touched only on the loop.
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._expiry_loop: asyncio.AbstractEventLoop | None = None
        self._last_request: GetBalloonStatsRequest | None = None  # under _lock
        self.mms_reads = 0  # GetBalloonStats round trips started (for tests and benchmarks)
        connection.add_observer(UnreadableVmLog())

    async def read_async(self, vm_ids: tuple[int, ...], timeout_s: float | None) -> StatsSnapshot:
        """Stats for ``vm_ids``, read after this call; a coroutine on the server's loop."""
        if not self._coalesce:
            self.mms_reads += 1
            session = self._connection.session
            future = self._connection.submit(GetBalloonStatsRequest(vm_ids))
            response: GetBalloonStatsResponse = await _aio.await_mms(
                future, timeout_s, MessageType.GET_BALLOON_STATS
            )
            return _pick(vm_ids, _Answer.of(session, response))
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # The batch is shared: this caller's deadline ends only its own wait, never the read.
        # Seen to before the read is handed over, so that once it is the loop has nothing left
        # to do before it lets the connection thread run (it blocks in its selector).
        deadline = math.inf if timeout_s is None else loop.time() + timeout_s
        if deadline < math.inf and (deadline < self._expiry_at or self._expiry_loop is not loop):
            self._arm_expiry(loop, deadline)
        with self._lock:
            batch = self._next
            if batch is None or (batch.loop is not loop and batch.loop.is_closed()):
                # (A batch left by a closed loop has nobody waiting on it, and its wake-up and
                # window would go to that loop: it is dropped.)
                batch = self._next = _Batch(loop)
            batch.vm_ids.update(vm_ids)
            waiters = batch.waiters
            assert waiters is not None  # only the batch being gathered is joined
            waiters.append((waiter, deadline))
            if not self._in_flight:
                if len(waiters) >= self._expected_callers:
                    self._send_next_locked()
                elif not batch.gathering:
                    batch.gathering = True
                    loop.call_later(self._gather_window_s, self._gathered, batch)
        await waiter
        answer = batch.answer
        if answer is None:
            if batch.error is not None:
                raise batch.error
            raise _stats_deadline()
        # Callers of one read asking for the same VMs get the same snapshot (only the loop
        # touches ``picks``), so the servicer converts it once for all of them.
        snapshot = batch.picks.get(vm_ids)
        if snapshot is None:
            snapshot = batch.picks[vm_ids] = _pick(vm_ids, answer)
        return snapshot

    def _arm_expiry(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = loop.call_at(deadline, self._expire, loop)
        self._expiry_at = deadline
        self._expiry_loop = loop

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        """The expiry timer: wake the callers whose deadline passed (they fail with
        DEADLINE_EXCEEDED; the read goes on for the others), re-armed at the next deadline."""
        self._expiry = None
        self._expiry_at = math.inf
        with self._lock:
            waiting = [
                entry
                for batch in (self._sent, self._next)
                if batch is not None and batch.waiters
                for entry in batch.waiters
            ]
        now = loop.time()
        earliest = math.inf
        for waiter, deadline in waiting:
            if waiter.done():
                continue  # its caller left, or it was woken already
            if deadline <= now:
                waiter.set_result(None)
            elif deadline < earliest:
                earliest = deadline
        if earliest < math.inf:
            self._arm_expiry(loop, earliest)

    def _gathered(self, batch: _Batch) -> None:
        """The gather window ended: send ``batch`` unless it went already (or mms is busy)."""
        with self._lock:
            if self._next is batch and not self._in_flight:
                self._send_next_locked()

    def _send_next_locked(self) -> None:
        batch = self._next
        assert batch is not None
        self._next = None
        self._in_flight = True
        self._sent = batch
        batch.sent_at_s = self._clock()
        self.mms_reads += 1
        session = self._connection.session
        vm_ids = tuple(sorted(batch.vm_ids))
        request = self._last_request
        if request is None or request.vm_ids != vm_ids:
            # The same VMs are read again and again (pollers, watch ticks): the connection
            # writes a request it has just sent from the frame it kept.
            request = self._last_request = GetBalloonStatsRequest(vm_ids)
        mms_future = self._connection.submit(request)
        mms_future.add_done_callback(lambda done: self._answered(batch, session, done))

    def _answered(self, batch: _Batch, session: int, done: Future[GetBalloonStatsResponse]) -> None:
        # On the connection thread (or inline, if submit failed at once): settle the batch,
        # send the next one (its callers arrived while this read was in flight) if as many
        # have joined it as expected, else leave it gathering; then hand the wake-up of this
        # batch's callers (and the gathering batch's window) to their loop in one go.
        try:
            response = done.result(0)  # done: one look at the future, not three
        except CancelledError:
            pass  # neither answer nor error: its callers are told the deadline passed
        except BaseException as error:  # whatever the connection failed it with
            batch.error = error
        else:
            batch.answer = _Answer.of(session, response)
        gathering: _Batch | None = None
        with self._lock:
            self._in_flight = False
            self._sent = None
            waiters, batch.waiters = batch.waiters, None
            self._expected_callers = len(waiters) if waiters else 0
            following = self._next
            if following is not None:
                assert following.waiters is not None
                if (
                    len(following.waiters) >= self._expected_callers
                    or self._clock() - batch.sent_at_s >= self._gather_window_s
                ):
                    self._send_next_locked()
                elif not following.gathering:
                    # The callers just answered are on their way back, and mms answers faster
                    # than they can be waited for: wait for them.
                    following.gathering = True
                    gathering = following
        if gathering is not None and (not waiters or gathering.loop is batch.loop):
            _aio.call_soon_from_thread(gathering.loop, self._wake_and_gather, waiters, gathering)
        else:
            if waiters:
                _aio.call_soon_from_thread(batch.loop, _wake_all, waiters)
            if gathering is not None:  # callers on two loops (tests): a hand-off each
                _aio.call_soon_from_thread(gathering.loop, self._wake_and_gather, [], gathering)

    def _wake_and_gather(self, waiters: _Waiters | None, gathering: _Batch) -> None:
        """On ``gathering``'s loop: wake ``waiters``, then time ``gathering``'s window."""
        if waiters:
            _wake_all(waiters)
        gathering.loop.call_later(self._gather_window_s, self._gathered, gathering)


def _wake_all(waiters: _Waiters) -> None:
    for waiter, _ in waiters:
        if not waiter.done():
            waiter.set_result(None)


def _stats_deadline() -> DeadlineExceededError:
    return DeadlineExceededError(
        "deadline passed waiting for mms GET_BALLOON_STATS",
        messageType=MessageType.GET_BALLOON_STATS.name,
    )


def _pick(vm_ids: tuple[int, ...], answer: _Answer) -> StatsSnapshot:
    if vm_ids == answer.ids:
        # The usual case (a lone caller, or callers asking alike): the answer is exactly
        # what was asked, in the order asked; nothing is missing.
        return StatsSnapshot(
            answer.session, answer.read_time_unix_s, answer.all_stats, (), (), answer
        )
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
