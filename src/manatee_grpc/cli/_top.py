"""``manatee-grpc top``: a live full-screen view of every VM's memory, fed by WatchBalloonStats.

A feed thread owns the gRPC calls and resubscribes with back-off when the stream ends; the main
thread owns the terminal (curses), applies the feed's events to a ``TopView`` and draws what
``render`` returns. ``--once`` prints one screen without curses, for scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import curses
import locale
import queue
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType

import grpc
from google.protobuf import duration_pb2

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.cli._common import credentials_from
from manatee_grpc.cli._top_view import ASCII_FALLBACK, SHOWN_EVENTS, TopView, render
from manatee_grpc.client import Client, ManateeRpcError

MIN_INTERVAL_S = 0.1  # the server's floor for WatchBalloonStats
RECONNECT_INITIAL_S = 0.2
RECONNECT_MAX_S = 5.0
# How long a keypress or a feed event waits for the screen: also the redraw period.
SCREEN_TICK_S = 0.1
FEED_JOIN_S = 2.0
UNLIMITED_WIDTH = 10_000
# Retrying cannot fix these: the request or the server is wrong, not away.
FATAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
# gRPC's own reconnection back-off grows to 120 s by default; keep it in step with ours so a
# restarted server is seen within RECONNECT_MAX_S.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", int(RECONNECT_INITIAL_S * 1000)),
    ("grpc.min_reconnect_backoff_ms", int(RECONNECT_INITIAL_S * 1000)),
    ("grpc.max_reconnect_backoff_ms", int(RECONNECT_MAX_S * 1000)),
]


# --- command line ------------------------------------------------------------------------------


def _interval_arg(text: str) -> float:
    try:
        interval_s = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not interval_s >= MIN_INTERVAL_S:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be at least {MIN_INTERVAL_S:g} s, got {text!r}")
    return interval_s


def add_top_arguments(parser: argparse.ArgumentParser) -> None:
    """``top``'s own flags; ``--server``, ``--timeout`` and TLS come with every client command."""
    parser.description = (
        "A live full-screen view of each VM's balloon and memory, updated from "
        "WatchBalloonStats. It survives a server restart and shows mms session resets."
    )
    parser.add_argument(
        "--interval",
        type=_interval_arg,
        default=1.0,
        metavar="SECONDS",
        help=f"time between updates, at least {MIN_INTERVAL_S:g} (default %(default)s)",
    )
    parser.add_argument(
        "--once", action="store_true", help="print one screen and exit (for scripts)"
    )


def run_top(client: Client, args: argparse.Namespace) -> int:
    if args.once:
        return _print_once(client)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("manatee-grpc top: needs a terminal; use --once for scripts", file=sys.stderr)
        return 2
    # The feed opens its own channel (see CHANNEL_OPTIONS), with the same TLS settings.
    credentials = credentials_from(args)
    return _run_live(client.target, args.interval, args.timeout, credentials)


def _print_once(client: Client) -> int:
    view = TopView(server=client.target, interval_s=None)
    view.vm_list(client.list_vms(), time.time())
    view.connected()
    view.snapshot(client.get_balloon_stats(), time.time())
    _recent_events(client, view)
    # Not a terminal (and no $COLUMNS): a script gets whole lines, not ones cut at 80.
    width = shutil.get_terminal_size((0, 0)).columns or UNLIMITED_WIDTH
    for line in render(view, width, None, time.time()):
        print(_printable(line))
    return 0


def _recent_events(client: Client, view: TopView) -> None:
    """The server's latest events (WatchEvents replay) into the view; none from an older server."""
    try:
        for message in client.watch_events(SHOWN_EVENTS):
            if message.WhichOneof("update") == "caught_up":
                break
            if message.WhichOneof("update") == "event":
                view.server_event(message.event, time.time())
    except ManateeRpcError as error:
        if error.code != grpc.StatusCode.UNIMPLEMENTED:
            raise


def _printable(line: str) -> str:
    encoding = sys.stdout.encoding or "ascii"
    try:
        line.encode(encoding)
    except UnicodeEncodeError:
        return line.translate(ASCII_FALLBACK).encode(encoding, "replace").decode(encoding)
    return line


# --- the feed: gRPC calls on their own thread --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Listed:
    response: pb.ListVmsResponse


@dataclass(frozen=True, slots=True)
class Connected:
    pass


@dataclass(frozen=True, slots=True)
class Streamed:
    message: pb.WatchBalloonStatsResponse


@dataclass(frozen=True, slots=True)
class Disconnected:
    problem: str
    attempt: int
    retry_in_s: float


@dataclass(frozen=True, slots=True)
class Failed:
    error: ManateeRpcError


@dataclass(frozen=True, slots=True)
class ServerEvent:
    event: pb.Event


FeedEvent = Listed | Connected | Streamed | Disconnected | Failed | ServerEvent


def apply(view: TopView, event: FeedEvent, now_s: float) -> None:
    """Apply one feed event to the view; a ``Failed`` event raises its error."""
    if isinstance(event, Listed):
        view.vm_list(event.response, now_s)
    elif isinstance(event, Connected):
        view.connected()
    elif isinstance(event, Streamed):
        view.message(event.message, now_s)
    elif isinstance(event, Disconnected):
        view.disconnected(event.problem, event.attempt, event.retry_in_s, now_s)
    elif isinstance(event, ServerEvent):
        view.server_event(event.event, now_s)
    else:
        raise event.error


class Feed:
    """ListVms, then WatchBalloonStats until it ends; then again, with back-off, until stopped.

    ``post`` receives every event, on the feed's thread.
    """

    def __init__(
        self,
        target: str,
        interval_s: float,
        timeout_s: float,
        credentials: grpc.ChannelCredentials | None,
        post: Callable[[FeedEvent], None],
    ) -> None:
        self._channel = (
            grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
            if credentials is None
            else grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        )
        self._client = Client(target, timeout_s=timeout_s, channel=self._channel)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(interval_s * 1e9))
        self._request = pb.WatchBalloonStatsRequest(interval=interval)
        self._post = post
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._cancel_call: Callable[[], object] | None = None
        self._thread = threading.Thread(target=self._run, name="top-feed", daemon=True)
        self._cancel_events: Callable[[], object] | None = None
        self._events_thread = threading.Thread(
            target=self._run_events, name="top-events", daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        self._events_thread.start()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            cancel_calls = (self._cancel_call, self._cancel_events)
        for cancel_call in cancel_calls:
            if cancel_call is not None:
                cancel_call()
        self._thread.join(FEED_JOIN_S)
        self._events_thread.join(FEED_JOIN_S)
        self._channel.close()

    def _run_events(self) -> None:
        """WatchEvents, resubscribed after the stream ends: the lines under the table."""
        replay_last = SHOWN_EVENTS  # the first time only: later ones would repeat lines
        while not self._stopping.is_set():
            try:
                call = self._stub.WatchEvents(pb.WatchEventsRequest(replay_last=replay_last))
                with self._lock:
                    self._cancel_events = call.cancel
                if self._stopping.is_set():
                    call.cancel()
                for message in call:
                    replay_last = 0
                    if message.WhichOneof("update") == "event":
                        self._post(ServerEvent(message.event))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                    return  # an older server: top shows what it sees itself
            except ValueError:
                return  # stop() closed the channel under us
            self._stopping.wait(RECONNECT_MAX_S / 2)

    def _run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            delivered = False
            try:
                for _ in self._follow():
                    delivered = True
                problem = "the stream ended"  # the server went away gracefully
            except ManateeRpcError as error:
                if self._stopping.is_set():
                    return
                if error.code in FATAL_CODES:
                    self._post(Failed(error))
                    return
                reason = f" ({error.reason})" if error.reason else ""
                problem = f"{error.code.name}{reason}"
            except ValueError:
                # stop() closes the channel once FEED_JOIN_S has passed, even under a feed
                # still busy (posting, or in a ListVms): grpc then refuses the next call.
                if self._stopping.is_set():
                    return
                raise
            if self._stopping.is_set():
                return
            # Back-off counts failures since the last subscription that delivered anything.
            failures = 1 if delivered else failures + 1
            delay_s = min(RECONNECT_MAX_S, RECONNECT_INITIAL_S * 2 ** (failures - 1))
            self._post(Disconnected(problem, failures, delay_s))
            self._stopping.wait(delay_s)

    def _follow(self) -> Iterator[None]:
        """One subscription; yields after each message it posted."""
        listing = self._client.list_vms()
        self._post(Listed(listing))
        self._post(Connected())
        call = self._stub.WatchBalloonStats(self._request)  # no deadline: it runs until cancelled
        with self._lock:
            self._cancel_call = call.cancel
        if self._stopping.is_set():
            call.cancel()
        try:
            for message in call:
                self._post(Streamed(message))
                if message.WhichOneof("event") == "snapshot" and _list_is_stale(
                    listing, message.snapshot
                ):
                    # New VMs, removed VMs or a new session: fetch their sizes and states.
                    listing = self._client.list_vms()
                    self._post(Listed(listing))
                yield
        except grpc.RpcError as error:
            raise ManateeRpcError.from_rpc_error(error) from error
        finally:
            with self._lock:
                self._cancel_call = None
            call.cancel()


def _list_is_stale(listing: pb.ListVmsResponse, snapshot: pb.BalloonStatsSnapshot) -> bool:
    # Stats cover the running VMs (starting ones have none yet), so compare with those.
    running = {vm.vm_id for vm in listing.vms if vm.state == pb.VM_STATE_RUNNING}
    seen = {stats.vm_id for stats in snapshot.stats} | set(snapshot.missing_vm_ids)
    return snapshot.session != listing.session or seen != running


# --- the terminal ------------------------------------------------------------------------------


# Signals that quit, and top's exit code for each: ^C is one of the two ways to quit.
QUIT_SIGNALS = {signal.SIGINT: 0, signal.SIGTERM: 128 + signal.SIGTERM}


def _run_live(
    target: str,
    interval_s: float,
    timeout_s: float,
    credentials: grpc.ChannelCredentials | None,
) -> int:
    # ncurses draws non-ASCII text only under the user's locale.
    with contextlib.suppress(locale.Error):
        locale.setlocale(locale.LC_CTYPE, "")
    view = TopView(server=target, interval_s=interval_s)
    events: queue.SimpleQueue[FeedEvent] = queue.SimpleQueue()
    feed = Feed(target, interval_s, timeout_s, credentials, events.put)

    quit_codes: list[int] = []

    def on_quit_signal(signum: int, frame: FrameType | None) -> None:
        # Only note it; the screen loop looks every tick and leaves through the same path as q.
        # Raising here (KeyboardInterrupt) would land wherever the main thread happens to be,
        # and one that lands in a finalizer or a callback is swallowed ("Exception ignored
        # in ..."): the ^C is lost and top runs on. list.append takes no lock a handler could
        # find already held by the code it interrupted.
        quit_codes.append(QUIT_SIGNALS[signal.Signals(signum)])

    previous = {signum: signal.signal(signum, on_quit_signal) for signum in QUIT_SIGNALS}
    try:
        feed.start()
        code: int = curses.wrapper(_screen_loop, view, events, quit_codes)
        return code
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        feed.stop()


def _screen_loop(
    screen: curses.window,
    view: TopView,
    events: queue.SimpleQueue[FeedEvent],
    quit_codes: list[int],
) -> int:
    """Draw until q (0) or a quit signal (its code in ``quit_codes``, seen within a tick)."""
    with contextlib.suppress(curses.error):
        curses.curs_set(0)  # not every terminal can hide the cursor
    screen.timeout(round(SCREEN_TICK_S * 1000))
    translate = _needs_ascii()
    while not quit_codes:
        while True:
            try:
                event = events.get_nowait()
            except queue.Empty:
                break
            apply(view, event, time.time())
        _draw(screen, view, translate)
        key = screen.getch()  # waits up to SCREEN_TICK_S; a signal may end it sooner
        if key in (ord("q"), ord("Q")):
            return 0
    return quit_codes[0]


def _needs_ascii() -> bool:
    try:
        "…Δ→·".encode(locale.getpreferredencoding(False))
    except (UnicodeEncodeError, LookupError):
        return True
    return False


def _draw(screen: curses.window, view: TopView, translate: bool) -> None:
    height, width = screen.getmaxyx()
    # One column short: writing the bottom-right cell makes curses raise.
    lines = render(view, max(1, width - 1), height, time.time())
    screen.erase()
    for row, line in enumerate(lines):
        text = line.translate(ASCII_FALLBACK) if translate else line
        attr = curses.A_REVERSE if row == 0 else curses.A_NORMAL
        with contextlib.suppress(curses.error):  # the terminal shrank since getmaxyx
            screen.addnstr(row, 0, text.ljust(width - 1) if row == 0 else text, width - 1, attr)
    screen.refresh()
