"""WatchBalloonStats fan-out: one backend poll per tick serves every watcher of that interval.

Each watcher has a one-slot mailbox: a slow watcher sees the latest snapshot and a count of the
ones it missed, never an unbounded queue. Session resets are queued apart so none is dropped.
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
class WatchUpdate:
    """What a watcher receives: a reset, a snapshot, or an error from the backend."""

    reset: SessionChanged | None = None
    snapshot: StatsSnapshot | None = None
    error: ManateeError | None = None
    dropped_updates: int = 0


class Watcher:
    """One WatchBalloonStats stream's mailbox."""

    def __init__(self, vm_ids: tuple[int, ...], interval_s: float) -> None:
        self.vm_ids = vm_ids
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._resets: list[SessionChanged] = []
        self._latest: StatsSnapshot | ManateeError | None = None
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

    def offer(self, item: StatsSnapshot | ManateeError) -> None:
        with self._cond:
            if isinstance(item, StatsSnapshot) and item.session < self._min_session:
                return  # read before the reset, offered after it
            if self._latest is not None:
                self._dropped += 1  # the watcher did not take the previous one in time
            self._latest = item
            self._wake_locked()

    def offer_reset(self, reset: SessionChanged) -> None:
        with self._cond:
            self._min_session = max(self._min_session, reset.session)
            if isinstance(self._latest, StatsSnapshot) and self._latest.session < reset.session:
                self._latest = None  # never deliver an old session's snapshot after its reset
            self._resets.append(reset)
            self._wake_locked()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._wake_locked()

    def _ready_locked(self) -> bool:
        return self._closed or bool(self._resets) or self._latest is not None

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
        if self._resets:
            return WatchUpdate(reset=self._resets.pop(0))
        item, self._latest = self._latest, None
        dropped, self._dropped = self._dropped, 0
        if isinstance(item, ManateeError):
            return WatchUpdate(error=item, dropped_updates=dropped)
        return WatchUpdate(snapshot=item, dropped_updates=dropped)


class _Ticker:
    """Polls for every watcher of one interval, on its own thread."""

    def __init__(self, interval_s: float, read: ReadStats, dispatch: Dispatch) -> None:
        self.interval_s = interval_s
        self._read = read
        self._dispatch = dispatch
        self.watchers: set[Watcher] = set()
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"watch-{interval_s:g}s", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_tick = time.monotonic()
        while not self._stop.is_set():
            watchers = list(self.watchers)
            if watchers:
                self._poll(watchers)
            next_tick += self.interval_s
            # Skip ticks we are late for rather than bursting to catch up.
            now = time.monotonic()
            if next_tick < now:
                next_tick = now + self.interval_s
            self._stop.wait(next_tick - now)

    def _poll(self, watchers: list[Watcher]) -> None:
        wants_all = any(not w.vm_ids for w in watchers)
        ids = sorted({vm_id for w in watchers for vm_id in w.vm_ids})
        self.polls += 1
        try:
            everything = self._read(()) if wants_all else None
            listed = self._read(tuple(ids)) if ids and not wants_all else None
        except ManateeError as error:
            # partial, not a lambda: the except variable is unbound once this block ends.
            self._dispatch(functools.partial(_offer_error, watchers, error))
            return
        source = everything if everything is not None else listed
        assert source is not None
        self._dispatch(functools.partial(_offer_snapshot, watchers, source))


def _offer_error(watchers: list[Watcher], error: ManateeError) -> None:
    for watcher in watchers:
        watcher.offer(error)


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

    def subscribe(self, vm_ids: tuple[int, ...], interval_s: float) -> Watcher:
        watcher = Watcher(vm_ids, interval_s)
        with self._lock:
            ticker = self._tickers.get(interval_s)
            if ticker is None:
                ticker = self._tickers[interval_s] = _Ticker(interval_s, self._read, self._dispatch)
                # Start it with its watcher already in: its first tick then polls at once, so
                # the first watcher of an interval is not left a whole interval without a snapshot.
                ticker.watchers = {watcher}
                ticker.start()
            else:
                ticker.watchers = ticker.watchers | {watcher}
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
            watchers = [w for t in self._tickers.values() for w in t.watchers]
        for watcher in watchers:
            watcher.offer_reset(SessionChanged(previous_session, session))

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
