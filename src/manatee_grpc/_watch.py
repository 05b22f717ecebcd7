"""WatchBalloonStats fan-out: one backend poll per tick serves every watcher of that interval.

Each watcher has a one-slot mailbox: a slow watcher sees the latest snapshot and a count of the
ones it missed, never an unbounded queue. Events are queued apart, in order, so none is dropped:
session resets, and the start of each mms outage (a failed read after a good one). A watcher
that joins an interval already polled gets its first snapshot from a read of its own, at once,
not at the interval's next tick (which may be an hour away).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import _aio
from ._errors import ManateeError
from ._stats import StatsSnapshot

logger = logging.getLogger(__name__)

ReadStats = Callable[[tuple[int, ...]], StatsSnapshot]  # () = every known VM
Dispatch = Callable[[Callable[[], None]], None]


def _call_now(work: Callable[[], None]) -> None:
    work()


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
    """One WatchBalloonStats stream's mailbox."""

    def __init__(self, vm_ids: tuple[int, ...], interval_s: float, epoch: int = 0) -> None:
        self.vm_ids = vm_ids
        self.interval_s = interval_s
        # The hub's count of session changes when this watcher last heard of one (or joined):
        # a read that started before it and failed belongs to a session already reported gone.
        self._epoch = epoch
        self._cond = threading.Condition()
        # Resets and outage starts, in the order they happened; never dropped.
        self._events: list[SessionChanged | Outage] = []
        self._latest: StatsSnapshot | None = None
        # True from a failed read until the next snapshot: one outage event per outage.
        self._in_outage = False
        self._dropped = 0
        self._closed = False
        # Snapshots of sessions before the last reset are stale: their VM ids mean nothing now.
        self._min_session = 0
        # The event-loop future a ``take_async`` is parked on, if any.
        self._waiter: asyncio.Future[None] | None = None

    def _wake_locked(self) -> None:
        self._cond.notify_all()
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            _aio.wake_soon(waiter)

    def offer(self, item: StatsSnapshot | ManateeError, read_epoch: int | None = None) -> None:
        """A read's result; ``read_epoch``: the hub's session-change count when it started."""
        with self._cond:
            if isinstance(item, ManateeError):
                if read_epoch is not None and read_epoch < self._epoch:
                    return  # that session's end is already told (session_reset): not an outage
                self._offer_error_locked(item)
                return
            if item.session < self._min_session:
                return  # read before the reset, offered after it
            self._in_outage = False
            if self._latest is not None:
                self._dropped += 1  # the watcher did not take the previous one in time
            self._latest = item
            self._wake_locked()

    def _offer_error_locked(self, error: ManateeError) -> None:
        if self._in_outage:
            return  # already told: the next snapshot says the outage is over
        self._in_outage = True
        if self._latest is not None:
            # Read before the failure: sent after the outage event, it would look like recovery.
            self._latest = None
            self._dropped += 1
        self._events.append(Outage(error, time.time()))
        self._wake_locked()

    def offer_reset(self, reset: SessionChanged, epoch: int = 0) -> None:
        with self._cond:
            self._epoch = max(self._epoch, epoch)
            self._min_session = max(self._min_session, reset.session)
            if self._latest is not None and self._latest.session < reset.session:
                self._latest = None  # never deliver an old session's snapshot after its reset
            self._events.append(reset)
            self._wake_locked()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._wake_locked()

    def _ready_locked(self) -> bool:
        return self._closed or bool(self._events) or self._latest is not None

    async def take_async(self) -> WatchUpdate | None:
        """``take`` for a coroutine: parks on the event loop, not on a thread."""
        while True:
            with self._cond:
                if self._ready_locked():
                    return self._take_locked()
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter

    def take(self, timeout_s: float | None = None) -> WatchUpdate | None:
        """The next update, or None once closed (or when ``timeout_s`` passes)."""
        with self._cond:
            if not self._cond.wait_for(self._ready_locked, timeout_s):
                return None
            return self._take_locked()

    def _take_locked(self) -> WatchUpdate | None:
        if self._closed:
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
    """Polls for every watcher of one interval, on its own thread."""

    def __init__(
        self, interval_s: float, read: ReadStats, dispatch: Dispatch, epoch: Callable[[], int]
    ) -> None:
        self.interval_s = interval_s
        self._read = read
        self._epoch = epoch
        self._dispatch = dispatch
        self.watchers: set[Watcher] = set()
        self.polls = 0
        self._stop = threading.Event()
        # Watchers that joined since the last poll and want their first snapshot now.
        self._fresh: set[Watcher] = set()
        self._fresh_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{interval_s:g}s", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def poll_soon(self, watcher: Watcher) -> None:
        """Read for ``watcher`` now, off the tick schedule: its first snapshot."""
        with self._fresh_lock:
            self._fresh.add(watcher)
        self._wake.set()

    def _take_fresh(self) -> list[Watcher]:
        with self._fresh_lock:
            fresh, self._fresh = self._fresh, set()
        return [w for w in fresh if w in self.watchers]

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            self._wake.clear()  # before looking: a poll_soon from now on wakes the wait below
            if time.monotonic() >= next_tick:
                self._take_fresh()  # this tick serves them too
                watchers = list(self.watchers)
                if watchers:
                    self._poll(watchers)
                next_tick += self.interval_s
                # Skip ticks we are late for rather than bursting to catch up.
                now = time.monotonic()
                if next_tick < now:
                    next_tick = now + self.interval_s
            elif fresh := self._take_fresh():
                self._poll(fresh)  # the schedule stays: the others are not polled twice
            self._wake.wait(max(0.0, next_tick - time.monotonic()))

    def _poll(self, watchers: list[Watcher]) -> None:
        wants_all = any(not w.vm_ids for w in watchers)
        ids = sorted({vm_id for w in watchers for vm_id in w.vm_ids})
        self.polls += 1
        epoch = self._epoch()
        try:
            everything = self._read(()) if wants_all else None
            listed = self._read(tuple(ids)) if ids and not wants_all else None
        except ManateeError as error:
            # partial, not a lambda: the except variable is unbound once this block ends.
            self._dispatch(functools.partial(_offer_error, watchers, error, epoch))
            return
        source = everything if everything is not None else listed
        assert source is not None
        self._dispatch(functools.partial(_offer_snapshot, watchers, source))


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
    """Registers watchers and runs one ticker per distinct interval."""

    def __init__(self, read: ReadStats, dispatch: Dispatch | None = None) -> None:
        self._read = read
        # Where a tick's fan-out runs: inline on the ticker thread by default; the server runs
        # it on the gRPC event loop, so waking 1000 parked watchers is one hand-off, not 1000.
        self._dispatch: Dispatch = dispatch or _call_now
        self._lock = threading.Lock()
        self._tickers: dict[float, _Ticker] = {}
        self._epoch = 0  # session changes seen so far

    def _current_epoch(self) -> int:
        return self._epoch

    def subscribe(self, vm_ids: tuple[int, ...], interval_s: float) -> Watcher:
        with self._lock:
            watcher = Watcher(vm_ids, interval_s, self._epoch)
            ticker = self._tickers.get(interval_s)
            if ticker is None:
                ticker = self._tickers[interval_s] = _Ticker(
                    interval_s, self._read, self._dispatch, self._current_epoch
                )
                # Start it with its watcher already in: its first tick then polls at once, so
                # the first watcher of an interval is not left a whole interval without a snapshot.
                ticker.watchers = {watcher}
                ticker.start()
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
        with self._lock:
            self._epoch += 1
            epoch = self._epoch
            watchers = [w for t in self._tickers.values() for w in t.watchers]
        for watcher in watchers:
            watcher.offer_reset(SessionChanged(previous_session, session), epoch)

    def watcher_count(self) -> int:
        with self._lock:
            return sum(len(t.watchers) for t in self._tickers.values())

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
