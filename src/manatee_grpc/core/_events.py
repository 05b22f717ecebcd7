"""What happened, and who asked: the event log behind WatchEvents and the audit file.

``EventLog`` keeps the last N events in a ring, numbers them, hands each to every subscriber
(a bounded queue each: a slow one loses its oldest events and is told how many, it never slows
the server or grows without bound), and appends it to an optional JSON-lines ``AuditFile``.
Everything runs on the server's event loop; other threads hand their events over with
``publish_from_thread``.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import enum
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

from manatee_grpc.core import _aio
from manatee_grpc.core._errors import ManateeError

logger = logging.getLogger(__name__)

DEFAULT_CAPACITY = 1000
# A subscriber this many events behind loses its oldest ones (and hears how many it lost).
DEFAULT_SUBSCRIBER_QUEUE = 256
# How much of the audit file's end is read at start-up to find the last sequence number.
_TAIL_BYTES = 64 * 1024


class EventKind(enum.Enum):
    """What an event records; the names are the audit file's `kind` and the proto's enum."""

    SERVER_STARTED = "SERVER_STARTED"
    PREPARE_VM = "PREPARE_VM"
    FINISH_ADD_VM = "FINISH_ADD_VM"
    REMOVE_VM = "REMOVE_VM"
    REBALANCE_MEMORY = "REBALANCE_MEMORY"
    LAUNCH_QUEUED = "LAUNCH_QUEUED"
    LAUNCH_LAUNCHED = "LAUNCH_LAUNCHED"
    LAUNCH_FAILED = "LAUNCH_FAILED"
    LAUNCH_ABORTED = "LAUNCH_ABORTED"
    START_LEASE_EXPIRED = "START_LEASE_EXPIRED"
    SESSION_RESET = "SESSION_RESET"
    MMS_UNAVAILABLE = "MMS_UNAVAILABLE"
    MMS_AVAILABLE = "MMS_AVAILABLE"
    POLICY_DECISION = "POLICY_DECISION"


class Origin(enum.Enum):
    CLIENT = "client"  # an RPC caller
    SERVER = "server"  # the server on its own (leases, the mms link)
    POLICY = "policy"  # the balancing policy


@dataclass(frozen=True, slots=True)
class Caller:
    """Who asked: an RPC's peer (and its certificate's subject under mTLS), or an insider."""

    origin: Origin
    peer: str = ""  # gRPC's peer string: ipv4:127.0.0.1:5431, unix:/run/x.sock, ...
    certificate_subject: str = ""  # RFC 4514 subject of the client certificate, if any

    def to_json(self) -> dict[str, str]:
        return {
            "origin": self.origin.value,
            "peer": self.peer,
            "certificate_subject": self.certificate_subject,
        }


SERVER = Caller(Origin.SERVER)
POLICY = Caller(Origin.POLICY)


@dataclass(frozen=True, slots=True)
class EventError:
    """How the act failed: the status it ended with."""

    code: str  # gRPC code name: NOT_FOUND, CANCELLED, ...
    reason: str  # ErrorInfo reason, or "" when it has none
    message: str


@dataclass(frozen=True, slots=True)
class Event:
    sequence: int  # 1, 2, ...: continues across restarts when an audit file is kept
    time_unix_s: float
    kind: EventKind
    caller: Caller
    session: str = ""  # the mms session the VM ids belong to ("" when none applies)
    vm_ids: tuple[int, ...] = ()
    # Kind-specific facts, JSON values only (see the proto's EventKind for the keys). The
    # server's own details are built of plain values; free-form ones pass _json_values first.
    details: Mapping[str, Any] = field(default_factory=dict)
    error: EventError | None = None  # the act failed (RPC events only)

    def to_json(self) -> dict[str, Any]:
        """The audit file's object (and --json's)."""
        return {
            "sequence": self.sequence,
            "time": _rfc3339(self.time_unix_s),
            "kind": self.kind.value,
            "caller": self.caller.to_json(),
            "session": self.session,
            "vm_ids": list(self.vm_ids),
            "details": dict(self.details),
            "error": None
            if self.error is None
            else {
                "code": self.error.code,
                "reason": self.error.reason,
                "message": self.error.message,
            },
        }


def event_error(error: BaseException) -> EventError:
    """The EventError of a call that ended with ``error`` (as the caller's status says it)."""
    if isinstance(error, ManateeError):
        return EventError(error.grpc_code, error.grpc_reason, error.message)
    if isinstance(error, asyncio.CancelledError):
        return EventError("CANCELLED", "", "the caller went away")
    return EventError("INTERNAL", "", f"internal error ({type(error).__name__})")


@dataclass(frozen=True, slots=True)
class Missed:
    """In a subscription: it fell behind and lost ``count`` events, oldest first."""

    count: int
    first_sequence: int
    last_sequence: int


def _rfc3339(unix_s: float) -> str:
    moment = datetime.datetime.fromtimestamp(unix_s, datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _json_values(values: Mapping[str, object]) -> dict[str, Any]:
    # Free-form inputs (a policy's) become plain JSON values once, here: the audit file, the
    # ring and the wire then all hold the same thing. What JSON cannot hold becomes its text.
    loaded: dict[str, Any] = json.loads(json.dumps(dict(values), default=str))
    return loaded


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """In a subscription: the replay is over (``last_sequence`` was the newest event then);
    what follows is live."""

    last_sequence: int


class Subscription:
    """One subscriber's view: the replayed events, CaughtUp, then live ones through a bounded
    queue."""

    def __init__(
        self,
        replay: Iterable[Event],
        kinds: frozenset[EventKind],
        max_queued: int,
        last_sequence: int,
    ) -> None:
        self._replay: collections.deque[Event] = collections.deque(replay)
        self._caught_up: CaughtUp | None = CaughtUp(last_sequence)
        self._queue: collections.deque[Event] = collections.deque()
        self._kinds = kinds
        self._max_queued = max_queued
        self._missed = 0
        self._first_missed = 0
        self._last_missed = 0
        self._wake: asyncio.Event | None = None
        self.closed = False

    def wants(self, event: Event) -> bool:
        return not self._kinds or event.kind in self._kinds

    def offer(self, event: Event) -> None:
        """Queue ``event`` (on the loop); a full queue drops its oldest event to make room."""
        if len(self._queue) >= self._max_queued:
            dropped = self._queue.popleft()
            if not self._missed:
                self._first_missed = dropped.sequence
            self._missed += 1
            self._last_missed = dropped.sequence
        self._queue.append(event)
        if self._wake is not None:
            self._wake.set()

    def close(self) -> None:
        self.closed = True
        if self._wake is not None:
            self._wake.set()

    def take_nowait(self) -> Event | Missed | CaughtUp | None:
        if self._replay:
            return self._replay.popleft()
        if self._caught_up is not None:
            caught_up, self._caught_up = self._caught_up, None
            return caught_up
        if self._missed:
            missed = Missed(self._missed, self._first_missed, self._last_missed)
            self._missed = 0
            return missed
        if self._queue:
            return self._queue.popleft()
        return None

    async def take_async(self) -> Event | Missed | CaughtUp | None:
        """The next event or marker; None once the log ended its subscriptions."""
        while True:
            item = self.take_nowait()
            if item is not None:
                return item
            if self.closed:
                return None
            if self._wake is None:
                self._wake = asyncio.Event()
            self._wake.clear()
            await self._wake.wait()

    @property
    def queued(self) -> int:
        return len(self._queue)


class AuditFile:
    """An append-only JSON-lines file: one event per line, written as it is recorded.

    Opened in append mode and never truncated; a server restarted on the same file continues
    its sequence numbers after the file's last complete line. Lines are written on the event
    loop: one unbuffered ``write`` to the page cache per event (no fsync, which could stall the
    loop for as long as the disk likes), so a crash of the process loses nothing already
    published and a crash of the machine at most what the kernel had not yet written back.
    A write that fails (a full disk) loses that event's line, whole: nothing is kept to be
    written later, a line cut short is ended before the next one, and each lost line is counted
    (``failed_writes``, the metric ``manatee_audit_write_failures_total``) and logged once per
    outage; the server goes on.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.last_sequence = _last_sequence(path)
        # Unbuffered: a failed write leaves nothing behind in a buffer to come out later.
        self._file: IO[bytes] = open(path, "ab", buffering=0)  # noqa: SIM115 - held open
        # A line cut short (by a crash, or a failed write) is ended before ours.
        self._cut = self._file.tell() > 0 and not _ends_with_newline(path)
        # Events that could not be written since start-up, and in the current outage.
        self.failed_writes = 0
        self._failing = 0

    def write(self, event: Event) -> None:
        line = json.dumps(event.to_json(), separators=(",", ":")).encode() + b"\n"
        data = (b"\n" if self._cut else b"") + line
        written = 0
        try:
            while written < len(data):
                written += self._file.write(data[written:]) or 0
        except OSError as error:
            prefix_bytes = len(data) - len(line)
            if written >= prefix_bytes:  # the file now ends with a newline or part of this line
                self._cut = written > prefix_bytes
            self.failed_writes += 1
            if not self._failing:
                logger.error(
                    "cannot write the audit file %s from event #%d on (counted in "
                    "manatee_audit_write_failures_total): %s",
                    self.path,
                    event.sequence,
                    error,
                )
            self._failing += 1
            return
        self._cut = False
        if self._failing:
            logger.warning(
                "the audit file %s is written again from event #%d; the %d event(s) before it "
                "are not in it",
                self.path,
                event.sequence,
                self._failing,
            )
            self._failing = 0

    def close(self) -> None:
        self._file.close()


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _last_sequence(path: str) -> int:
    """The sequence number of the file's last complete event (0 for none or no file)."""
    try:
        with open(path, "rb") as file:
            size = file.seek(0, os.SEEK_END)
            file.seek(max(0, size - _TAIL_BYTES))
            lines = file.read().split(b"\n")
            if size > _TAIL_BYTES:
                lines = lines[1:]  # the first may be cut
            found = _last_sequence_of(lines)
            if found is None and size > _TAIL_BYTES:
                file.seek(0)
                found = _last_sequence_of(file.read().split(b"\n"))
    except FileNotFoundError:
        return 0
    return found or 0


def _last_sequence_of(lines: list[bytes]) -> int | None:
    for line in reversed(lines):
        try:
            sequence = json.loads(line)["sequence"]
        except (ValueError, KeyError, TypeError):
            continue  # empty, or cut short by a crash
        if isinstance(sequence, int):
            return sequence
    return None


class EventLog:
    """The ring, the subscribers and the audit file; see the module docstring.

    ``publish`` runs on the event loop (or anywhere, before a loop is attached: unit tests);
    ``publish_from_thread`` is for the mms connection thread's events.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        audit: AuditFile | None = None,
        subscriber_queue: int = DEFAULT_SUBSCRIBER_QUEUE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if capacity < 1:
            raise ValueError("the event ring holds at least one event")
        self.capacity = capacity
        self._ring: collections.deque[Event] = collections.deque(maxlen=capacity)
        self._audit = audit
        self._subscriber_queue = subscriber_queue
        self._clock = clock
        self._sequence = 0 if audit is None else audit.last_sequence
        self._subscribers: set[Subscription] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._ending = False  # subscriptions ended (shutting down)
        self._closed = False

    def attach(self, loop: asyncio.AbstractEventLoop, loop_thread: int) -> None:
        """From now on events are numbered on ``loop`` (run by thread ``loop_thread``)."""
        self._loop = loop
        self._loop_thread = loop_thread

    @property
    def last_sequence(self) -> int:
        return self._sequence

    def events(self) -> list[Event]:
        return list(self._ring)

    def publish(
        self,
        kind: EventKind,
        caller: Caller,
        *,
        session: str = "",
        vm_ids: Iterable[int] = (),
        details: Mapping[str, object] | None = None,
        error: EventError | None = None,
        time_unix_s: float | None = None,
    ) -> Event | None:
        """Record one event; hand it to the loop first when called on another thread.

        Returns the event, or None when it was handed over (or the log is closed).
        """
        when = self._clock() if time_unix_s is None else time_unix_s
        record = functools.partial(
            self._record,
            kind,
            caller,
            session=session,
            vm_ids=vm_ids,
            details=details,
            error=error,
            time_unix_s=when,
        )
        if self._loop is not None and threading.get_ident() != self._loop_thread:
            _aio.call_soon_from_thread(self._loop, record)
            return None
        return record()

    publish_from_thread = publish

    def publish_policy_decision(
        self,
        inputs: Mapping[str, object],
        action: str | Mapping[str, object],
        *,
        session: str = "",
        vm_ids: Iterable[int] = (),
        state: Mapping[str, object] | None = None,
    ) -> Event | None:
        """One POLICY_DECISION event: what the policy saw (``inputs``) and what it chose.

        ``action`` is a word ("rebalance", "hold", "back-off") or a mapping of what it did;
        ``state``, the policy's own after it (counts, margins, back-offs), for ``top``.
        """
        details: dict[str, object] = {"inputs": dict(inputs), "action": action}
        if state is not None:
            details["state"] = dict(state)
        return self.publish(
            EventKind.POLICY_DECISION,
            POLICY,
            session=session,
            vm_ids=vm_ids,
            details=_json_values(details),
        )

    def _record(
        self,
        kind: EventKind,
        caller: Caller,
        *,
        session: str,
        vm_ids: Iterable[int],
        details: Mapping[str, object] | None,
        error: EventError | None,
        time_unix_s: float,
    ) -> Event | None:
        if self._closed:
            return None
        self._sequence += 1
        event = Event(
            sequence=self._sequence,
            time_unix_s=time_unix_s,
            kind=kind,
            caller=caller,
            session=session,
            vm_ids=tuple(vm_ids),
            details=details if details is not None else {},
            error=error,
        )
        self._ring.append(event)
        if self._audit is not None:
            self._audit.write(event)
        for subscriber in self._subscribers:
            if subscriber.wants(event):
                subscriber.offer(event)
        return event

    def subscribe(self, replay_last: int = 0, kinds: Collection[EventKind] = ()) -> Subscription:
        """A subscriber that first gets the last ``replay_last`` events of ``kinds`` (all kinds
        when empty) still in the ring, then every new one. Call on the loop."""
        wanted = frozenset(kinds)
        replay: list[Event] = []
        if replay_last > 0:
            for event in reversed(self._ring):
                if not wanted or event.kind in wanted:
                    replay.append(event)
                    if len(replay) >= replay_last:
                        break
            replay.reverse()
        subscription = Subscription(replay, wanted, self._subscriber_queue, self._sequence)
        if self._ending:
            subscription.close()
        else:
            self._subscribers.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def end_subscriptions(self) -> None:
        """End every subscription (at shutdown, on the loop); events are still recorded."""
        self._ending = True
        for subscriber in self._subscribers:
            subscriber.close()
        self._subscribers.clear()

    def close(self) -> None:
        """Stop recording and close the audit file (once the loop has stopped)."""
        self.end_subscriptions()
        self._closed = True
        if self._audit is not None:
            self._audit.close()
