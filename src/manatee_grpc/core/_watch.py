"""WatchBalloonStats fan-out: one backend poll per tick serves every watcher of that interval.

Everything here lives on the server's event loop: a ticker is a task, a watcher's mailbox wakes
its stream through a loop future, and nothing holds a thread. Intervals are rounded to a 100 ms
grid (``round_interval_s``) so that watchers asking for nearly the same period share one ticker.

Each watcher has a one-slot mailbox: a slow watcher sees the latest snapshot and a count of the
ones it missed, never an unbounded queue. Events are queued apart, in order, so none is dropped:
session resets, and the start of each mms outage (a failed read after a good one). A watcher
that joins an interval already polled gets its first snapshot from a read of its own, at once,
not at the interval's next tick (which may be an hour away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from manatee_grpc.core._errors import ManateeError
from manatee_grpc.core._stats import StatsSnapshot

logger = logging.getLogger(__name__)

ReadStats = Callable[[tuple[int, ...]], Awaitable[StatsSnapshot]]  # () = every known VM

# Tickers run on a grid of this step: 0.1 s, 0.2 s, ...; an hour-long interval is kept to the
# same step (an interval's drift of 50 ms at most is nothing next to its length).
INTERVAL_GRID_S = 0.1


def round_interval_s(interval_s: float) -> float:
    """The ticker interval that serves ``interval_s``: the nearest 100 ms step (at least one)."""
    return max(1, round(interval_s / INTERVAL_GRID_S)) * INTERVAL_GRID_S


@dataclass(frozen=True, slots=True)
class SessionChanged:
    previous_session: int
    session: int


@dataclass(frozen=True, slots=True)
class Outage:
    """Reads from mms began to fail at ``since_unix_s``; the first failure says why."""

    error: ManateeError
    since_unix_s: float


@dataclass(frozen=True, slots=True)
class WatchUpdate:
    """What a watcher receives: a reset, the start of an outage, or a snapshot."""

    reset: SessionChanged | None = None
    snapshot: StatsSnapshot | None = None
    outage: Outage | None = None
    dropped_updates: int = 0


class Watcher:
    """One WatchBalloonStats stream's mailbox; used on the event loop only."""

    def __init__(self, vm_ids: tuple[int, ...], interval_s: float, epoch: int = 0) -> None:
        self.vm_ids = vm_ids
        self.interval_s = interval_s
        # The hub's count of session changes when this watcher last heard of one (or joined):
        # a read that started before it and failed belongs to a session already reported gone.
        self._epoch = epoch
        # Resets and outage starts, in the order they happened; never dropped.
        self._events: list[SessionChanged | Outage] = []
        self._latest: StatsSnapshot | None = None
        # True from a failed read until the next snapshot: one outage event per outage.
        self._in_outage = False
        self._dropped = 0
        self._closed = False
        # Snapshots of sessions before the last reset are stale: their VM ids mean nothing now.
        self._min_session = 0
        # The loop future a ``take_async`` is parked on, if any.
        self._waiter: asyncio.Future[None] | None = None

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def offer(self, item: StatsSnapshot | ManateeError, read_epoch: int | None = None) -> None:
        """A read's result; ``read_epoch``: the hub's session-change count when it started."""
        if isinstance(item, ManateeError):
            if read_epoch is not None and read_epoch < self._epoch:
                return  # that session's end is already told (session_reset): not an outage
            self._offer_error(item)
            return
        if item.session < self._min_session:
            return  # read before the reset, offered after it
        self._in_outage = False
        if self._latest is not None:
            self._dropped += 1  # the watcher did not take the previous one in time
        self._latest = item
        self._wake()

    def _offer_error(self, error: ManateeError) -> None:
        if self._in_outage:
            return  # already told: the next snapshot says the outage is over
        self._in_outage = True
        if self._latest is not None:
            # Read before the failure: sent after the outage event, it would look like recovery.
            self._latest = None
            self._dropped += 1
        self._events.append(Outage(error, time.time()))
        self._wake()

    def offer_reset(self, reset: SessionChanged, epoch: int = 0) -> None:
        self._epoch = max(self._epoch, epoch)
        self._min_session = max(self._min_session, reset.session)
        if self._latest is not None and self._latest.session < reset.session:
            self._latest = None  # never deliver an old session's snapshot after its reset
        self._events.append(reset)
        self._wake()

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _ready(self) -> bool:
        return self._closed or bool(self._events) or self._latest is not None

    async def take_async(self) -> WatchUpdate | None:
        """The next update, parked on the loop until there is one; None once closed."""
        while not self._ready():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self.take_now()

    def take_now(self) -> WatchUpdate | None:
        """The next update if there is one, else None (also once closed)."""
        if self._closed or not self._ready():
            return None
        if self._events:
            event = self._events.pop(0)
            if isinstance(event, SessionChanged):
                return WatchUpdate(reset=event)
            dropped, self._dropped = self._dropped, 0
            return WatchUpdate(outage=event, dropped_updates=dropped)
        item, self._latest = self._latest, None
        dropped, self._dropped = self._dropped, 0
        return WatchUpdate(snapshot=item, dropped_updates=dropped)


class _Ticker:
    """Polls for every watcher of one interval: a task on the event loop."""

    def __init__(self, interval_s: float, read: ReadStats, epoch: Callable[[], int]) -> None:
        self.interval_s = interval_s
        self._read = read
        self._epoch = epoch
        self.watchers: set[Watcher] = set()
        self.polls = 0
        # Watchers that joined since the last poll and want their first snapshot now.
        self._fresh: set[Watcher] = set()
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"watch-{interval_s:g}s"
        )

    def stop(self) -> None:
        self._task.cancel()

    def poll_soon(self, watcher: Watcher) -> None:
        """Read for ``watcher`` now, off the tick schedule: its first snapshot."""
        self._fresh.add(watcher)
        self._wake.set()

    def _take_fresh(self) -> list[Watcher]:
        fresh, self._fresh = self._fresh, set()
        return [w for w in fresh if w in self.watchers]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            self._wake.clear()  # before looking: a poll_soon from now on ends the wait below
            if loop.time() >= next_tick:
                self._take_fresh()  # this tick serves them too
                watchers = list(self.watchers)
                if watchers:
                    await self._poll(watchers)
                next_tick += self.interval_s
                # Skip ticks we are late for rather than bursting to catch up.
                now = loop.time()
                if next_tick < now:
                    next_tick = now + self.interval_s
            elif fresh := self._take_fresh():
                await self._poll(fresh)  # the schedule stays: the others are not polled twice
            if self._wake.is_set():
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(next_tick):
                    await self._wake.wait()

    async def _poll(self, watchers: list[Watcher]) -> None:
        wants_all = any(not w.vm_ids for w in watchers)
        ids = sorted({vm_id for w in watchers for vm_id in w.vm_ids})
        self.polls += 1
        epoch = self._epoch()
        try:
            source = await self._read(() if wants_all else tuple(ids))
        except ManateeError as error:
            _offer_error(watchers, error, epoch)
            return
        _offer_snapshot(watchers, source)


def _offer_error(watchers: list[Watcher], error: ManateeError, read_epoch: int) -> None:
    for watcher in watchers:
        watcher.offer(error, read_epoch)


def _offer_snapshot(watchers: list[Watcher], source: StatsSnapshot) -> None:
    for watcher in watchers:
        # Watchers of every VM share the one snapshot object (the servicer converts it once).
        watcher.offer(_filter(source, watcher.vm_ids) if watcher.vm_ids else source)


def _filter(snapshot: StatsSnapshot, vm_ids: tuple[int, ...]) -> StatsSnapshot:
    by_id = {entry.vm_id: entry for entry in snapshot.stats}
    unreadable_by_id = {entry.vm_id: entry for entry in snapshot.unreadable}
    missing = tuple(i for i in vm_ids if i not in by_id)
    return StatsSnapshot(
        snapshot.session,
        snapshot.read_time_unix_s,
        tuple(by_id[i] for i in vm_ids if i in by_id),
        missing,
        tuple(unreadable_by_id[i] for i in missing if i in unreadable_by_id),
        source=snapshot.source,  # same read: watchers of the same VMs share one message
    )


class WatchHub:
    """Registers watchers and runs one ticker task per distinct (rounded) interval.

    Used on the event loop; ``watcher_count`` and ``polls`` may be read from any thread.
    """

    def __init__(self, read: ReadStats) -> None:
        self._read = read
        self._lock = threading.Lock()  # only for the counts read from other threads
        self._tickers: dict[float, _Ticker] = {}
        self._epoch = 0  # session changes seen so far

    def _current_epoch(self) -> int:
        return self._epoch

    def subscribe(self, vm_ids: tuple[int, ...], interval_s: float) -> Watcher:
        interval_s = round_interval_s(interval_s)
        watcher = Watcher(vm_ids, interval_s, self._epoch)
        with self._lock:
            ticker = self._tickers.get(interval_s)
            if ticker is None:
                # Made with its watcher already in: its first tick then polls at once, so the
                # first watcher of an interval is not left a whole interval without a snapshot.
                ticker = self._tickers[interval_s] = _Ticker(
                    interval_s, self._read, self._current_epoch
                )
                ticker.watchers = {watcher}
            else:
                ticker.watchers = ticker.watchers | {watcher}
                ticker.poll_soon(watcher)
        return watcher

    def unsubscribe(self, watcher: Watcher) -> None:
        watcher.close()
        with self._lock:
            ticker = self._tickers.get(watcher.interval_s)
            if ticker is None:
                return
            ticker.watchers = ticker.watchers - {watcher}
            if not ticker.watchers:
                ticker.stop()
                del self._tickers[watcher.interval_s]

    def session_changed(self, previous_session: int, session: int) -> None:
        self._epoch += 1
        epoch = self._epoch
        with self._lock:
            watchers = [w for t in self._tickers.values() for w in t.watchers]
        for watcher in watchers:
            watcher.offer_reset(SessionChanged(previous_session, session), epoch)

    def watcher_count(self) -> int:
        with self._lock:
            return sum(len(t.watchers) for t in self._tickers.values())

    def ticker_count(self) -> int:
        with self._lock:
            return len(self._tickers)

    def polls(self) -> int:
        with self._lock:
            return sum(t.polls for t in self._tickers.values())

    def close(self) -> None:
        with self._lock:
            tickers, self._tickers = list(self._tickers.values()), {}
        for ticker in tickers:
            ticker.stop()
            for watcher in ticker.watchers:
                watcher.close()
