"""The one connection to mms: a dedicated thread owns the socket and does every read and write.

Callers submit a request and wait on a future with their own deadline. Closing the stream is
destructive (mms drops every sibling VM), so the thread closes it on its own only when it cannot
be used, or when closing loses nothing:

- framing is broken (an absurd length, a truncated frame) or the peer closed it: closed;
- a reply of the right type with a bad body fails that one call (INTERNAL, MMS_PROTOCOL_ERROR);
  the stream stays in step and the next call goes out on it;
- a reply of the wrong type, or bytes nobody asked for, may mean the stream is out of step:
  nothing more is sent on it (calls fail with MMS_OUT_OF_STEP), health goes NOT_SERVING and
  the VMs at stake are logged, but it is not closed while closing would drop a VM;
- mms silent past the watchdog: health goes NOT_SERVING, queued calls fail "not sent", the VMs
  at stake are logged, and the thread keeps waiting for the answer (callers end their own waits
  at their deadlines); when it comes the stream is in step again. Closed only when nothing is
  at stake, or when the operator configured ``hang_reset``;
- ``reset()`` is the operator's deliberate reset: it closes the stream whatever is at stake.

What is at stake comes from ``set_stakes`` (the server asks its books and start slot).
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import queue
import random
import select
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from manatee_grpc.mms import _transport, _wire
from manatee_grpc.mms._errors import (
    DeadlineExceededError,
    ManateeError,
    MmsConnectionError,
    MmsConnectionLostError,
    MmsHungError,
    MmsOutOfStepError,
    MmsProtocolError,
    MmsUnavailableError,
    ServerShuttingDownError,
)
from manatee_grpc.mms._messages import MessageType, MmsRequest, Response

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Response)

# How long mms may take to answer before we call it hung: health goes NOT_SERVING and the VMs
# at stake are logged. RemoveVm blocks until the VM has exited and FinishAddVm waits up to 10 s
# for crosvm, so those get the most room. The stream is reset then only if that loses nothing
# (or the operator asked for it with ``hang_reset``).
DEFAULT_WATCHDOG_S: Mapping[MessageType, float] = {
    MessageType.GET_BALLOON_STATS: 30.0,
    MessageType.REBALANCE_MEMORY: 60.0,
    MessageType.PREPARE_VM: 60.0,
    MessageType.FINISH_ADD_VM: 120.0,
    MessageType.REMOVE_VM: 600.0,
}

_LONGEST_WATCHDOG_S = max(DEFAULT_WATCHDOG_S.values())  # for a type the config leaves out

# While the stream is out of step with VMs at stake, how often to look whether they are gone
# (a launch gave up its start, say): then a reset loses nothing and the server heals itself.
_OUT_OF_STEP_RECHECK_S = 1.0


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Capped exponential backoff with jitter, for reconnecting to mms."""

    initial_s: float = 0.05
    max_s: float = 5.0
    multiplier: float = 2.0
    jitter_fraction: float = 0.2

    def delay_s(self, failures: int, rng: random.Random) -> float:
        base_s = min(self.max_s, self.initial_s * self.multiplier ** max(0, failures - 1))
        return base_s * (1.0 + self.jitter_fraction * (2.0 * rng.random() - 1.0))


@dataclass(frozen=True, slots=True)
class ConnectionConfig:
    address: _transport.MmsAddress
    max_body_bytes: int = _wire.DEFAULT_MAX_BODY_BYTES
    connect_timeout_s: float = 5.0
    watchdog_s: Mapping[MessageType, float] = field(default_factory=lambda: DEFAULT_WATCHDOG_S)
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
    # Reset a hung stream when the watchdog fires even if VMs are at stake (the old rule). Off
    # by default: a reset makes mms drop every sibling VM, so it is the operator's choice.
    hang_reset: bool = False


@dataclass(frozen=True, slots=True)
class Stakes:
    """What closing the stream now would lose: mms drops these with the connection."""

    vm_ids: tuple[int, ...] = ()  # sibling VMs mms holds (running, starting or failed)
    pending_start: bool = False  # someone owns mms's one pending start
    unknown: bool = False  # nobody told the connection (no books attached): assume the worst

    def __bool__(self) -> bool:
        return self.unknown or self.pending_start or bool(self.vm_ids)

    def __str__(self) -> str:
        if self.unknown:
            return "unknown (no books attached to the connection)"
        parts = []
        if self.vm_ids:
            parts.append("VM " + ", ".join(str(vm_id) for vm_id in self.vm_ids))
        if self.pending_start:
            parts.append("the pending start")
        return " and ".join(parts) or "nothing"


UNKNOWN_STAKES = Stakes(unknown=True)


class Trouble(enum.Enum):
    HUNG = "hung"  # a request is past its watchdog; its answer may still come
    OUT_OF_STEP = "out_of_step"  # mms answered out of turn; nothing more is sent


@dataclass(frozen=True, slots=True)
class StreamTrouble:
    """Why the stream is kept but not used, and what a reset would lose."""

    kind: Trouble
    session: int
    message_type: MessageType | None  # the request concerned (None: bytes nobody asked for)
    since_monotonic: float
    stakes: Stakes
    detail: str


class ConnectionObserver(Protocol):
    """Told about the link, on the connection thread. Must be quick and must not block."""

    def on_connected(self, session: int) -> None: ...

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None: ...

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None: ...


# Told (on the connection thread) whether the stream can take requests: connected and neither
# hung nor out of step. Health follows it.
UsableListener = Callable[[bool], None]


@dataclass(slots=True)
class _Call:
    request: MmsRequest[Any]
    future: Future[Any]
    frame: bytes


class _OutOfStepError(Exception):
    """mms sent bytes that are not the answer we wait for: the stream may be out of step."""


class _FrameReader:
    """Reads one response frame; keeps what it has read when a wait times out."""

    def __init__(self, sock: _TimedSocket, msg_type: MessageType, max_body_bytes: int) -> None:
        self._sock = sock
        self._msg_type = msg_type
        self._max_body_bytes = max_body_bytes
        self._buffer = bytearray()
        self._header: _wire.FrameHeader | None = None
        self._frame_bytes = _wire.HEADER_SIZE_BYTES

    def read(self, deadline: float) -> bytes:
        """The body, once the whole frame is in; TimeoutError at ``deadline`` (state is kept).

        Each read is one blocking ``recv`` (see _TimedSocket) and takes all that has arrived
        (usually the whole frame at once): on a busy server every syscall releases the GIL and
        may wait to get it back, so a round trip makes as few of them as it can (no poll
        before the recv).
        """
        buffer = self._buffer
        if not buffer:
            chunk = self._sock.recv(deadline)
            # The usual case: the first read holds the whole frame, of the right type and a
            # sane length; its body is taken as is. Anything else goes the long way below,
            # which checks (and refuses) the same things.
            if len(chunk) >= _wire.HEADER_SIZE_BYTES:
                body_len_bytes, msg_type = _wire.HEADER.unpack_from(chunk)
                if (
                    msg_type == self._msg_type
                    and body_len_bytes <= self._max_body_bytes
                    and len(chunk) == _wire.HEADER_SIZE_BYTES + body_len_bytes
                ):
                    return chunk[_wire.HEADER_SIZE_BYTES :]
            if not chunk:
                raise ConnectionResetError("mms closed the connection")
            buffer += chunk
        while True:
            if len(buffer) < self._frame_bytes:
                chunk = self._sock.recv(deadline)
                if not chunk:
                    raise ConnectionResetError("mms closed the connection")
                buffer += chunk
            if self._header is None and len(buffer) >= _wire.HEADER_SIZE_BYTES:
                header = _wire.decode_header(bytes(buffer[: _wire.HEADER_SIZE_BYTES]))
                if header.msg_type != self._msg_type:
                    raise _OutOfStepError(
                        f"mms answered {self._msg_type.name} with a frame of type {header.msg_type}"
                    )
                # Checked before the body is read: a 4 GiB length is refused, never buffered.
                _wire.check_response_header(header, self._msg_type, self._max_body_bytes)
                self._header = header
                self._frame_bytes = _wire.HEADER_SIZE_BYTES + header.body_len_bytes
            if self._header is not None and len(buffer) >= self._frame_bytes:
                if len(buffer) > self._frame_bytes:
                    raise _OutOfStepError(
                        f"mms sent bytes beyond the {self._msg_type.name} answer it owed"
                    )
                return bytes(buffer[_wire.HEADER_SIZE_BYTES :])


class _TimedSocket:
    """The mms socket in blocking mode: a read is one ``recv``, not a poll and then a recv.

    That is about 20 µs of a lone caller's p50. A blocked ``recv`` ends with data, the end of
    the stream (a shutdown from stop() or reset() wakes it at once), or the kernel's receive
    timeout (SO_RCVTIMEO), which is set once for the session to ``wait_s``: short next to the
    shortest watchdog, so a deadline is noticed at most ``wait_s`` late, and each kernel
    timeout only sends the loop back to look at the deadline (a signal that restarts the
    kernel's wait cannot stretch it beyond that). Deadlines and what they lead to stay the
    watchdog's (``_overdue``). Every other read and every send passes MSG_DONTWAIT.
    """

    def __init__(self, sock: socket.socket, wait_s: float) -> None:
        sock.setblocking(True)
        seconds = min(max(wait_s, _MIN_KERNEL_WAIT_S), _MAX_KERNEL_WAIT_S)
        whole_s = int(seconds)
        # A struct timeval; a zero one would mean "no timeout" (hence the 1 ms floor).
        timeval = struct.pack("@ll", whole_s, int((seconds - whole_s) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock = sock

    def recv(self, deadline: float) -> bytes:
        """What has arrived (b"" at end of stream); TimeoutError once ``deadline`` passed."""
        while time.monotonic() < deadline:
            try:
                return self.sock.recv(_READ_CHUNK_BYTES)
            except BlockingIOError:  # the kernel's wait ended with nothing: look again
                continue
        raise TimeoutError


# The kernel's receive timeout: a tenth of the shortest watchdog, within these bounds.
_MIN_KERNEL_WAIT_S = 0.001
_MAX_KERNEL_WAIT_S = 1.0


def _kernel_wait_s(watchdog_s: Mapping[MessageType, float]) -> float:
    return min(watchdog_s.values(), default=_LONGEST_WATCHDOG_S) / 10


class _Outgoing:
    """One request frame being written; keeps its progress when a wait times out."""

    def __init__(self, frame: bytes) -> None:
        self.view = memoryview(frame)

    def send(self, sock: socket.socket, deadline: float) -> None:
        """``sendall`` without blocking in the send, bounded by ``deadline`` (TimeoutError)."""
        while self.view:
            try:
                self.view = self.view[sock.send(self.view, socket.MSG_DONTWAIT) :]
            except BlockingIOError:
                pass
            if self.view:
                _wait(sock, select.POLLOUT, deadline)


class MmsConnection:
    """Owns the mms socket and the one thread that talks on it; see the module docstring."""

    def __init__(self, config: ConnectionConfig) -> None:
        self._config = config
        self._observers: list[ConnectionObserver] = []
        self._usable_listeners: list[UsableListener] = []
        self._stakes: Callable[[], Stakes] = lambda: UNKNOWN_STAKES
        self._lock = threading.Lock()
        self._queue: collections.deque[_Call] = collections.deque()
        self._session = 0
        self._connected = False
        self._stopping = False
        self._connected_event = threading.Condition(self._lock)
        self._last_error: MmsConnectionError | None = None
        self._trouble: StreamTrouble | None = None
        self._reset_reason: str | None = None  # the operator's, for the session it closes
        # A socketpair wakes the thread from select() when work arrives or we stop. The thread
        # closes it when it ends (stop() only if the thread never ran): never under its feet.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock: socket.socket | None = None
        # True while the thread may be parked waiting for work with nothing queued: only then
        # does a submit need to wake it (a busy thread looks at the queue after each round trip).
        self._idle = True
        # What an idle, connected thread blocks on: a submit that finds it idle rings it (the
        # loop → thread hand-off is the call queue plus this doorbell; a C queue, so ringing
        # and waking cost less than a wake-pipe write and a select, or a Python Condition).
        self._doorbell: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="mms-connection", daemon=True)
        self._rng = random.Random()
        self._requests_sent = 0
        self._responses = 0  # answers received since start
        # The last request encoded and its frame, one tuple (so any thread reads a pair).
        self._last_encoded: tuple[MmsRequest[Any] | None, bytes] = (None, b"")

    # --- public API (any thread) -------------------------------------------------------------

    def add_observer(self, observer: ConnectionObserver) -> None:
        self._observers.append(observer)

    def add_usable_listener(self, listener: UsableListener) -> None:
        """Call ``listener(usable)`` (on the connection thread) each time usability changes."""
        self._usable_listeners.append(listener)

    def set_stakes(self, stakes: Callable[[], Stakes]) -> None:
        """How to learn what a reset would lose; called on the connection thread, must be quick."""
        self._stakes = stakes

    @property
    def address(self) -> _transport.MmsAddress:
        return self._config.address

    @property
    def session(self) -> int:
        """Number of the current mms session: 1 for the first connect, +1 per reconnect."""
        return self._session

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def trouble(self) -> StreamTrouble | None:
        """Why the connected stream is not used now (hung, out of step), or None."""
        return self._trouble

    @property
    def usable(self) -> bool:
        """Connected, and neither hung nor out of step: new requests go out."""
        return self._connected and self._trouble is None

    @property
    def requests_sent(self) -> int:
        """Requests written to mms since start (for tests and metrics)."""
        return self._requests_sent

    def start(self) -> None:
        self._thread.start()

    def wait_connected(self, timeout_s: float) -> bool:
        with self._lock:
            return (
                self._connected_event.wait_for(
                    lambda: self._connected or self._stopping, timeout=timeout_s
                )
                and self._connected
            )

    def submit(self, request: MmsRequest[R]) -> Future[R]:
        """Queue ``request``; the future resolves with its response or a ManateeError.

        Cancelling the future before the request is sent keeps it off the wire; once sent it
        runs to completion, because mms has no way to cancel and closing would drop every VM.
        """
        last = self._last_encoded
        if last[0] is request:
            frame = last[1]  # requests are immutable: the same one again, the same frame
        else:
            frame = _wire.encode_request(request)  # RequestEncodeError: refused before queueing
            self._last_encoded = (request, frame)
        future: Future[R] = Future()
        with self._lock:
            error: ManateeError | None = None
            if self._stopping:
                error = _shutting_down(request.TYPE)
            elif not self._connected:
                error = self._unavailable_error(request.TYPE)
            elif self._trouble is not None:
                error = _not_sent(self._trouble, request.TYPE)
            if error is not None:
                future.set_exception(error)
                return future
            self._queue.append(_Call(request, future, frame))
            ring, self._idle = self._idle, False
        if ring:
            self._doorbell.put(None)
        return future

    def call(self, request: MmsRequest[R], timeout_s: float | None) -> R:
        """Submit and wait up to ``timeout_s``; the deadline bounds only this caller's wait."""
        future = self.submit(request)
        return wait_for(future, timeout_s, request.TYPE)

    def reset(self, reason: str) -> bool:
        """The operator's reset: close the stream now, whatever is at stake, and redial.

        mms drops every sibling VM and its pending start with the stream. Returns False when
        there is no stream to reset.
        """
        with self._lock:
            sock = self._sock
            if sock is None or self._stopping:
                return False
            self._reset_reason = reason
            stakes = self._safe_stakes()
            logger.error(
                "RESETTING the mms connection (session %d) on the operator's request (%s); "
                "mms drops what is at stake: %s",
                self._session,
                reason,
                stakes,
            )
            # The connection thread sees end-of-stream and closes the socket itself.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._doorbell.put(None)  # an idle thread looks at the socket now
        return True

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the link: waiting callers fail, the request on the wire is abandoned."""
        with self._lock:
            self._stopping = True
            self._connected_event.notify_all()
            sock = self._sock
        self._doorbell.put(None)
        self._wake()
        # Shut the stream even when nothing looks in flight: the thread may have just taken a
        # call off the queue and be about to send it. Shutting down (not closing) leaves the
        # socket object to the thread, which closes it.
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.ident is None:
            self._close_wake()  # the thread never ran: nobody else will
            return
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            # Closing the wake sockets now could close an fd the thread still selects on (or
            # one reused by then): the thread closes them itself when it ends.
            logger.warning("the mms connection thread did not end within %.1f s", timeout_s)

    # --- the connection thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            failures = 0
            while not self._stopping:
                try:
                    failures = self._connect_and_serve(failures)
                except Exception:
                    # A bug of ours: say so once, with the traceback, and go on (reconnecting).
                    logger.exception("unexpected error in the mms connection thread; going on")
                    failures += 1
                    self._sleep_unless_stopping(self._config.backoff.delay_s(failures, self._rng))
            self._fail_queued(_shutting_down)
        finally:
            self._close_wake()

    def _connect_and_serve(self, failures: int) -> int:
        """One connect attempt and, if it works, one session; returns the failure count."""
        try:
            sock = _transport.connect(self._config.address, self._config.connect_timeout_s)
        except (OSError, ValueError) as exc:
            failures += 1
            delay_s = self._config.backoff.delay_s(failures, self._rng)
            with self._lock:
                self._last_error = MmsUnavailableError(
                    f"cannot connect to mms at {self._config.address}: {exc}",
                    address=self._config.address,
                )
            if failures == 1 or failures % 20 == 0:
                logger.warning(
                    "cannot connect to mms at %s (%s); retrying in %.2f s",
                    self._config.address,
                    exc,
                    delay_s,
                )
            self._sleep_unless_stopping(delay_s)
            return failures
        answered_before = self._responses
        self._serve(sock)
        # A peer that accepts and hangs up at once must not be redialled in a tight loop:
        # back off unless the session did real work.
        failures = 0 if self._responses > answered_before else failures + 1
        if failures and not self._stopping:
            self._sleep_unless_stopping(self._config.backoff.delay_s(failures, self._rng))
        return failures

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._session += 1
            session = self._session
            self._sock = sock
            self._connected = True
            self._last_error = None
            self._trouble = None
            self._reset_reason = None
            self._connected_event.notify_all()
        logger.info("connected to mms at %s: session %d", self._config.address, session)
        self._notify(lambda o: o.on_connected(session))
        self._notify_usable(True)
        error: MmsConnectionError | None = None
        try:
            error = self._serve_calls(sock, session)
        finally:
            with self._lock:
                self._connected = False
                self._sock = None
                self._trouble = None
                if error is None:
                    error = MmsConnectionLostError(
                        "the mms connection is closing", session=session, reached_mms=True
                    )
                self._last_error = error
                stopping = self._stopping
                lost = error
            sock.close()
            if stopping:
                logger.info(
                    "closed the mms connection (session %d): shutting down; mms drops every "
                    "sibling VM with it",
                    session,
                )
            # Callers still queued were never sent: each is told so, about its own request
            # (shutting down when stop() came, else that the link went away).
            self._fail_queued(
                _shutting_down if stopping else lambda msg_type: _lost_before_sent(lost, msg_type)
            )
            self._notify_usable(False)
            self._notify(lambda o: o.on_disconnected(session, lost))

    def _serve_calls(self, sock: socket.socket, session: int) -> MmsConnectionError | None:
        """Serve calls until the link is closed; returns why it ended (None when stopping)."""
        # Every wait is bounded by the watchdog; see _FrameReader and _TimedSocket.
        timed = _TimedSocket(sock, _kernel_wait_s(self._config.watchdog_s))
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                if self._trouble is not None:  # out of step: only a close ends it
                    return self._wait_out_of_step(sock, selector, session)
                call = self._next_call()
                if call is None:
                    # Idle: wait for a submit; between waits, look at the socket, so a dead mms
                    # is noticed within _IDLE_CHECK_S, not at the next request (mms never speaks
                    # unprompted; readable means EOF or garbage).
                    self._wait_for_work()
                    if not self._queue and _readable(sock):
                        failure = self._idle_readable(sock, session)
                        if failure is not None:
                            return failure
                    continue
                if not call.future.set_running_or_notify_cancel():
                    continue  # the caller gave up before it was sent: never send it
                failure = self._round_trip(timed, session, call)
                if failure is not None:
                    return failure
            return None
        finally:
            selector.close()

    def _round_trip(
        self, timed: _TimedSocket, session: int, call: _Call
    ) -> MmsConnectionError | None:
        """Send one call and read its answer; returns why the stream must close, or None."""
        msg_type = call.request.TYPE
        watchdog_s = self._config.watchdog_s.get(msg_type, _LONGEST_WATCHDOG_S)
        started = time.monotonic()
        deadline = started + watchdog_s
        outgoing = _Outgoing(call.frame)
        sock = timed.sock
        reader = _FrameReader(timed, msg_type, self._config.max_body_bytes)
        body: bytes | None = None
        try:
            while body is None:
                try:
                    if outgoing.view:
                        outgoing.send(sock, deadline)
                        self._requests_sent += 1
                    body = reader.read(deadline)
                except TimeoutError:
                    failure = self._overdue(session, call, started, watchdog_s, not outgoing.view)
                    if failure is not None:
                        return failure
                    deadline = time.monotonic() + watchdog_s  # look at the stakes again then
        except _OutOfStepError as exc:
            error: MmsConnectionError = self._protocol_error(session, msg_type, str(exc))
            failure = self._out_of_step(session, msg_type, str(exc))
            error.stream_closed = failure is not None
            _settle(call.future, error)
            return failure
        except _wire.CodecError as exc:
            # Framing is broken (an absurd length): the stream cannot be used any more.
            error = self._protocol_error(session, msg_type, str(exc))
            error.stream_closed = True
            logger.error("closing the mms connection (session %d): %s", session, error.message)
            _settle(call.future, error)
            return error
        except OSError as exc:
            error = MmsConnectionLostError(
                f"lost the mms connection during {msg_type.name}: {self._lost_cause(exc)}",
                session=session,
                messageType=msg_type.name,
                reached_mms=not outgoing.view,
            )
            self._log_lost(session, error.message)
            _settle(call.future, error)
            return error
        except Exception as exc:
            # A bug of ours, halfway through a frame: where the stream stands is unknown.
            logger.exception("unexpected error in the mms round trip of %s", msg_type.name)
            failure = self._out_of_step(
                session, msg_type, f"an unexpected {type(exc).__name__} while reading"
            )
            _settle(call.future, _internal_error(exc, msg_type, reached_mms=not outgoing.view))
            return failure
        self._answered(session, call, body, time.monotonic() - started)
        return None

    def _answered(self, session: int, call: _Call, body: bytes, round_trip_s: float) -> None:
        """A whole frame of the right type came: the stream is in step, whatever the body."""
        msg_type = call.request.TYPE
        if self._trouble is not None:
            logger.warning(
                "mms answered %s after %.1f s (session %d): the stream is in step again",
                msg_type.name,
                round_trip_s,
                session,
            )
            with self._lock:
                self._trouble = None
            self._notify_usable(True)
        self._responses += 1
        try:
            response = _wire.decode_response(call.request, body)
        except _wire.CodecError as exc:
            # Only this answer is bad: fail this call, keep the stream (it is in step).
            error = self._protocol_error(session, msg_type, str(exc))
            logger.error("mms sent a bad %s answer (session %d): %s", msg_type.name, session, exc)
            _settle(call.future, error)
            return
        except Exception as exc:
            logger.exception("unexpected error decoding the mms answer to %s", msg_type.name)
            _settle(call.future, _internal_error(exc, msg_type, reached_mms=True))
            return
        # Update the books before the caller wakes, and even if the caller has gone away: a
        # reservation made for a vanished caller must still be known so it can be rolled back.
        self._notify(lambda o: o.on_response(session, call.request, response, round_trip_s))
        _settle(call.future, response)

    def _overdue(
        self, session: int, call: _Call, started: float, watchdog_s: float, sent: bool
    ) -> MmsConnectionError | None:
        """mms is past the watchdog: reset if that loses nothing (or the operator said so)."""
        msg_type = call.request.TYPE
        waited_s = time.monotonic() - started
        stakes = self._safe_stakes()
        first = self._trouble is None
        if (first and self._config.hang_reset) or not stakes:
            why = "--mms-hang-reset is set" if stakes else "nothing is at stake"
            error = MmsHungError(
                f"mms did not answer {msg_type.name} within {waited_s:.0f} s; the stream was "
                f"reset ({why})",
                session=session,
                messageType=msg_type.name,
                reached_mms=sent,
            )
            error.stream_closed = True
            logger.error(
                "RESETTING the mms connection (session %d): mms did not answer %s within "
                "%.1f s and %s; mms drops what is at stake: %s",
                session,
                msg_type.name,
                waited_s,
                why,
                stakes,
            )
            _settle(call.future, error)
            return error
        if first:
            trouble = StreamTrouble(
                Trouble.HUNG,
                session,
                msg_type,
                started,
                stakes,
                f"mms has not answered {msg_type.name} for {watchdog_s:g} s",
            )
            logger.error(
                "mms has not answered %s within its %g s watchdog (session %d): health is "
                "NOT_SERVING and nothing more is sent until it answers. NOT resetting the "
                "stream: mms would drop %s. To reset on purpose, see 'Operating it safely' "
                "in the README (SIGUSR1, or --mms-hang-reset)",
                msg_type.name,
                watchdog_s,
                session,
                stakes,
            )
            self._enter_trouble(trouble)
        return None

    def _out_of_step(
        self, session: int, msg_type: MessageType | None, detail: str
    ) -> MmsConnectionError | None:
        """Stop sending on a stream that may be out of step; reset it only if that loses nothing."""
        stakes = self._safe_stakes()
        if not stakes:
            logger.error(
                "closing the mms connection (session %d): %s; the stream may be out of step "
                "and nothing is at stake",
                session,
                detail,
            )
            return MmsOutOfStepError(
                f"the mms stream went out of step ({detail}) and was reset",
                session=session,
                reached_mms=True,
            )
        logger.error(
            "the mms stream may be OUT OF STEP (session %d): %s. Nothing more is sent on it and "
            "health is NOT_SERVING. NOT resetting it: mms would drop %s. An operator must reset "
            "it (SIGUSR1; see 'Operating it safely' in the README)",
            session,
            detail,
            stakes,
        )
        self._enter_trouble(
            StreamTrouble(Trouble.OUT_OF_STEP, session, msg_type, time.monotonic(), stakes, detail)
        )
        return None

    def _enter_trouble(self, trouble: StreamTrouble) -> None:
        with self._lock:
            self._trouble = trouble
        self._fail_queued(lambda msg_type: _not_sent(trouble, msg_type))
        self._notify_usable(False)

    def _wait_out_of_step(
        self, sock: socket.socket, selector: selectors.BaseSelector, session: int
    ) -> MmsConnectionError | None:
        """Keep the stream open, send nothing, until it closes, we stop, or nothing is at stake."""
        while not self._stopping:
            for key, _ in selector.select(_OUT_OF_STEP_RECHECK_S):
                if key.fileobj is sock:
                    # Whatever mms says now cannot be matched to a request: read and drop it,
                    # watching only for the end of the stream.
                    try:
                        data = sock.recv(_READ_CHUNK_BYTES, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        data, cause = b"", self._lost_cause(exc)
                    else:
                        cause = self._lost_cause(None)
                    if not data:
                        self._log_lost(session, cause)
                        return MmsConnectionLostError(
                            f"lost the mms connection: {cause}", session=session, reached_mms=True
                        )
            self._drain_wake()
            if not self._safe_stakes():
                logger.error(
                    "closing the out-of-step mms connection (session %d): nothing is at stake "
                    "any more",
                    session,
                )
                return MmsOutOfStepError(
                    "the mms stream was out of step and was reset once nothing was at stake",
                    session=session,
                    reached_mms=True,
                )
        return None

    def _idle_readable(self, sock: socket.socket, session: int) -> MmsConnectionError | None:
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            data = b""
            reason = self._lost_cause(exc)
        else:
            reason = self._lost_cause(None)
        if data:
            return self._out_of_step(session, None, "mms sent data nobody asked for")
        self._log_lost(session, reason)
        return MmsConnectionLostError(
            f"lost the mms connection: {reason}", session=session, reached_mms=True
        )

    # --- helpers ---------------------------------------------------------------------------------

    def _log_lost(self, session: int, cause: str) -> None:
        # After stop() shut the stream, the end it sees is our own doing: _serve says so.
        if not self._stopping:
            logger.warning("mms connection lost (session %d): %s", session, cause)

    def _lost_cause(self, exc: BaseException | None) -> str:
        reason = self._reset_reason
        if reason is not None:
            return f"the operator reset it ({reason})"
        if exc is None:
            return "mms closed the connection"
        return str(exc) or type(exc).__name__

    def _protocol_error(self, session: int, msg_type: MessageType, detail: str) -> MmsProtocolError:
        return MmsProtocolError(
            f"mms broke the protocol answering {msg_type.name}: {detail}",
            session=session,
            messageType=msg_type.name,
            reached_mms=True,
        )

    def _safe_stakes(self) -> Stakes:
        try:
            return self._stakes()
        except Exception:
            logger.exception("could not learn what an mms reset would lose; assuming the worst")
            return UNKNOWN_STAKES

    def _wait_for_work(self) -> None:
        """Block until a submit (or stop, or reset) rings, or for _IDLE_CHECK_S at most."""
        if self._queue or self._stopping:
            return
        try:  # not contextlib.suppress: this runs before every request of an idle thread
            self._doorbell.get(timeout=_IDLE_CHECK_S)
        except queue.Empty:
            pass

    def _next_call(self) -> _Call | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._idle = True
            return None

    def _fail_queued(self, error_for: Callable[[MessageType], ManateeError]) -> None:
        with self._lock:
            calls = list(self._queue)
            self._queue.clear()
        for call in calls:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(error_for(call.request.TYPE))

    def _unavailable_error(self, msg_type: MessageType) -> MmsConnectionError:
        if self._last_error is not None:
            return MmsUnavailableError(
                f"{msg_type.name} not sent: mms is not connected; reconnecting "
                f"({self._last_error.message})",
                address=self._config.address,
                messageType=msg_type.name,
                reached_mms=False,
            )
        return MmsUnavailableError(
            f"{msg_type.name} not sent: mms is not connected yet; connecting",
            address=self._config.address,
            messageType=msg_type.name,
            reached_mms=False,
        )

    def _notify(self, event: Callable[[ConnectionObserver], None]) -> None:
        for observer in self._observers:
            try:
                event(observer)
            except Exception:
                logger.exception("mms connection observer failed")

    def _notify_usable(self, usable: bool) -> None:
        for listener in self._usable_listeners:
            try:
                listener(usable)
            except Exception:
                logger.exception("mms connection listener failed")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed while stopping

    def _drain_wake(self) -> None:
        try:
            self._wake_r.recv(4096)  # what is left wakes the next select, which drains it
        except (BlockingIOError, OSError):
            pass

    def _close_wake(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

    def _sleep_unless_stopping(self, delay_s: float) -> None:
        selector = selectors.DefaultSelector()
        try:
            selector.register(self._wake_r, selectors.EVENT_READ)
            end = time.monotonic() + delay_s
            while not self._stopping and (remaining_s := end - time.monotonic()) > 0:
                selector.select(remaining_s)
                self._drain_wake()
        finally:
            selector.close()


def _settle(future: Future[Any], outcome: object) -> None:
    """Resolve a call's future with a response or an error, unless it is already resolved."""
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except InvalidStateError:
        pass


def _shutting_down(msg_type: MessageType) -> ManateeError:
    return ServerShuttingDownError(
        f"{msg_type.name} not sent: the mms connection is closing",
        messageType=msg_type.name,
        reached_mms=False,
    )


def _lost_before_sent(lost: MmsConnectionError, msg_type: MessageType) -> ManateeError:
    return MmsConnectionLostError(
        f"{msg_type.name} not sent: the mms connection closed before its turn ({lost.message})",
        messageType=msg_type.name,
        reached_mms=False,
        **({"session": lost.metadata["session"]} if "session" in lost.metadata else {}),
    )


def _not_sent(trouble: StreamTrouble, msg_type: MessageType) -> ManateeError:
    metadata: dict[str, object] = {"messageType": msg_type.name, "session": trouble.session}
    if trouble.kind is Trouble.HUNG:
        return MmsHungError(
            f"{msg_type.name} not sent: {trouble.detail}; nothing is sent until it answers",
            reached_mms=False,
            **metadata,
        )
    return MmsOutOfStepError(
        f"{msg_type.name} not sent: the mms stream may be out of step ({trouble.detail}); "
        "nothing is sent on it until an operator resets it",
        reached_mms=False,
        **metadata,
    )


def _internal_error(exc: BaseException, msg_type: MessageType, reached_mms: bool) -> ManateeError:
    return ManateeError(
        f"internal error in the mms connection answering {msg_type.name} ({type(exc).__name__})",
        messageType=msg_type.name,
        reached_mms=reached_mms,
    )


# One read takes up to this much; a response is a few hundred bytes, stats for 64 VMs ~20 KiB.
_READ_CHUNK_BYTES = 1 << 16


# How often an idle connection thread looks at the socket for a dead or babbling mms.
_IDLE_CHECK_S = 0.05


def _readable(sock: socket.socket) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise TimeoutError
    poller = select.poll()
    poller.register(sock, events)
    if not poller.poll(max(1, math.ceil(remaining_s * 1000))):
        raise TimeoutError


def wait_for(future: Future[R], timeout_s: float | None, msg_type: MessageType) -> R:
    """Wait for a submitted call; on timeout, cancel it if still queued and raise."""
    try:
        return future.result(timeout=timeout_s)
    except TimeoutError:
        # cancel() succeeds only while queued: a request on the wire runs to completion.
        sent = not future.cancel()
        raise DeadlineExceededError(
            f"deadline passed waiting for mms {msg_type.name}"
            + (" (the request was sent and will complete)" if sent else " (never sent)"),
            messageType=msg_type.name,
            reached_mms=sent,
        ) from None
