"""The one connection to mms: a dedicated thread owns the socket and does every read and write.

Callers submit a request and wait on a future with their own deadline. Closing the stream is
destructive (mms drops every sibling VM), so the socket is closed only when it is unusable.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from . import _transport, _wire
from ._errors import (
    DeadlineExceededError,
    MmsConnectionError,
    MmsConnectionLostError,
    MmsHungError,
    MmsProtocolError,
    MmsUnavailableError,
    ServerShuttingDownError,
)
from ._messages import MessageType, MmsRequest, Response

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Response)

# How long mms may take to answer before we declare it hung and reset the stream. Generous on
# purpose: a reset makes mms drop every sibling VM. RemoveVm blocks until the VM has exited and
# FinishAddVm waits up to 10 s for crosvm, so those get the most room.
DEFAULT_WATCHDOG_S: Mapping[MessageType, float] = {
    MessageType.GET_BALLOON_STATS: 30.0,
    MessageType.REBALANCE_MEMORY: 60.0,
    MessageType.PREPARE_VM: 60.0,
    MessageType.FINISH_ADD_VM: 120.0,
    MessageType.REMOVE_VM: 600.0,
}


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


class ConnectionObserver(Protocol):
    """Told about the link, on the connection thread. Must be quick and must not block."""

    def on_connected(self, session: int) -> None: ...

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None: ...

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None: ...


@dataclass(slots=True)
class _Call:
    request: MmsRequest[Any]
    future: Future[Any]
    frame: bytes


class MmsConnection:
    """Owns the mms socket and the one thread that talks on it; see the module docstring."""

    def __init__(self, config: ConnectionConfig) -> None:
        self._config = config
        self._observers: list[ConnectionObserver] = []
        self._lock = threading.Lock()
        self._queue: collections.deque[_Call] = collections.deque()
        self._session = 0
        self._connected = False
        self._stopping = False
        self._connected_event = threading.Condition(self._lock)
        self._last_error: MmsConnectionError | None = None
        # A socketpair wakes the thread from select() when work arrives or we stop.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sock: socket.socket | None = None
        # True while the thread may be parked in select() with nothing queued: only then does
        # a submit need to wake it (a busy thread looks at the queue after each round trip).
        self._idle = True
        self._thread = threading.Thread(target=self._run, name="mms-connection", daemon=True)
        self._rng = random.Random()
        self._requests_sent = 0
        self._responses = 0  # answers received since start

    # --- public API (any thread) -------------------------------------------------------------

    def add_observer(self, observer: ConnectionObserver) -> None:
        self._observers.append(observer)

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
        frame = _wire.encode_request(request)  # RequestEncodeError: refused before queueing
        future: Future[R] = Future()
        with self._lock:
            if self._stopping:
                future.set_exception(ServerShuttingDownError("the mms connection is closing"))
                return future
            if not self._connected:
                future.set_exception(self._unavailable_error())
                return future
            self._queue.append(_Call(request, future, frame))
            wake, self._idle = self._idle, False
        if wake:
            self._wake()
        return future

    def call(self, request: MmsRequest[R], timeout_s: float | None) -> R:
        """Submit and wait up to ``timeout_s``; the deadline bounds only this caller's wait."""
        future = self.submit(request)
        return wait_for(future, timeout_s, request.TYPE)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the link: waiting callers fail, the request on the wire is abandoned."""
        with self._lock:
            self._stopping = True
            self._connected_event.notify_all()
        self._wake()
        sock = self._sock
        # Shut the stream even when nothing looks in flight: the thread may have just taken a
        # call off the queue and be about to send it, then wait up to a watchdog for the answer.
        if sock is not None:
            # Unblock a read that is waiting on mms; we are going away regardless.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._wake_r.close()
        self._wake_w.close()

    # --- the connection thread -----------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stopping:
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
                continue
            answered_before = self._responses
            self._serve(sock)
            # A peer that accepts and hangs up at once must not be redialled in a tight loop:
            # back off unless the session did real work.
            failures = 0 if self._responses > answered_before else failures + 1
            if failures and not self._stopping:
                self._sleep_unless_stopping(self._config.backoff.delay_s(failures, self._rng))
        self._fail_queued(ServerShuttingDownError("the mms connection is closing"))

    def _serve(self, sock: socket.socket) -> None:
        with self._lock:
            self._session += 1
            session = self._session
            self._sock = sock
            self._connected = True
            self._last_error = None
            self._connected_event.notify_all()
        logger.info("connected to mms at %s: session %d", self._config.address, session)
        self._notify(lambda o: o.on_connected(session))
        error: MmsConnectionError | None = None
        try:
            error = self._serve_calls(sock)
        finally:
            with self._lock:
                self._connected = False
                self._sock = None
                if error is None:
                    error = MmsConnectionLostError("the mms connection is closing", session=session)
                self._last_error = error
                stopping = self._stopping
            sock.close()
            # Callers still queued when stop() came were never sent: they are told the server
            # is shutting down, not that mms went away (the request on the wire gets `error`).
            self._fail_queued(
                ServerShuttingDownError("the mms connection is closing") if stopping else error
            )
            self._notify(lambda o: o.on_disconnected(session, error))

    def _serve_calls(self, sock: socket.socket) -> MmsConnectionError | None:
        """Serve calls until the link is unusable; returns why it ended (None when stopping)."""
        session = self._session
        sock.setblocking(False)  # every wait is a poll bounded by the watchdog; see _recv_frame
        selector = selectors.DefaultSelector()
        selector.register(sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping:
                call = self._next_call()
                if call is None:
                    # Idle: watch the socket too, so a dead mms is noticed at once, not at the
                    # next request (mms never speaks unprompted; readable means EOF or garbage).
                    for key, _ in selector.select():
                        if key.fileobj is sock:
                            return self._idle_readable(sock, session)
                    self._drain_wake()
                    continue
                if not call.future.set_running_or_notify_cancel():
                    continue  # the caller gave up before it was sent: never send it
                failure = self._round_trip(sock, session, call)
                if failure is not None:
                    return failure
            return None
        finally:
            selector.close()

    def _round_trip(
        self, sock: socket.socket, session: int, call: _Call
    ) -> MmsConnectionError | None:
        msg_type = call.request.TYPE
        watchdog_s = self._config.watchdog_s.get(msg_type, max(DEFAULT_WATCHDOG_S.values()))
        deadline = time.monotonic() + watchdog_s
        started = time.monotonic()
        try:
            _send_all(sock, call.frame, deadline)
            self._requests_sent += 1
            _, body = self._recv_frame(sock, msg_type, deadline)
            response = _wire.decode_response(call.request, body)
        except TimeoutError:
            error: MmsConnectionError = MmsHungError(
                f"mms did not answer {msg_type.name} within {watchdog_s:g} s",
                session=session,
                messageType=msg_type.name,
            )
            logger.error(
                "RESETTING the mms connection (session %d): %s. mms will now drop every "
                "sibling VM and return its memory to the CrOS guest",
                session,
                error.message,
            )
            call.future.set_exception(error)
            return error
        except _wire.CodecError as exc:
            error = MmsProtocolError(
                f"mms broke the protocol answering {msg_type.name}: {exc}",
                session=session,
                messageType=msg_type.name,
            )
            logger.error("resetting the mms connection (session %d): %s", session, error)
            call.future.set_exception(error)
            return error
        except OSError as exc:
            error = MmsConnectionLostError(
                f"lost the mms connection during {msg_type.name}: {exc or type(exc).__name__}",
                session=session,
                messageType=msg_type.name,
            )
            logger.warning("mms connection lost (session %d): %s", session, error.message)
            call.future.set_exception(error)
            return error
        round_trip_s = time.monotonic() - started
        self._responses += 1
        # Update the books before the caller wakes, and even if the caller has gone away: a
        # reservation made for a vanished caller must still be known so it can be rolled back.
        self._notify(lambda o: o.on_response(session, call.request, response, round_trip_s))
        call.future.set_result(response)
        return None

    def _recv_frame(
        self, sock: socket.socket, msg_type: MessageType, deadline: float
    ) -> tuple[_wire.FrameHeader, bytes]:
        """Read one response frame; the watchdog deadline covers a peer that trickles bytes.

        The socket is non-blocking and each read takes all that has arrived (usually the whole
        frame at once): on a busy server every syscall releases the GIL and may wait to get it
        back, so a round trip makes as few of them as it can.
        """
        buffer = bytearray()
        header: _wire.FrameHeader | None = None
        frame_bytes = _wire.HEADER_SIZE_BYTES
        while True:
            if len(buffer) < frame_bytes:
                _wait(sock, select.POLLIN, deadline)
                chunk = sock.recv(_READ_CHUNK_BYTES)
                if not chunk:
                    raise ConnectionResetError("mms closed the connection")
                buffer += chunk
            if header is None and len(buffer) >= _wire.HEADER_SIZE_BYTES:
                header = _wire.decode_header(bytes(buffer[: _wire.HEADER_SIZE_BYTES]))
                # Checked before the body is read: a 4 GiB length is refused, never buffered.
                _wire.check_response_header(header, msg_type, self._config.max_body_bytes)
                frame_bytes = _wire.HEADER_SIZE_BYTES + header.body_len_bytes
            if header is not None and len(buffer) >= frame_bytes:
                if len(buffer) > frame_bytes:
                    raise _wire.CodecError("mms sent bytes beyond the response it owed")
                return header, bytes(buffer[_wire.HEADER_SIZE_BYTES :])

    def _idle_readable(self, sock: socket.socket, session: int) -> MmsConnectionError:
        try:
            data = sock.recv(1, socket.MSG_PEEK)
        except OSError as exc:
            data = b""
            reason = str(exc)
        else:
            reason = "mms closed the connection"
        if data:
            error: MmsConnectionError = MmsProtocolError(
                "mms sent data nobody asked for", session=session
            )
            logger.error("resetting the mms connection (session %d): %s", session, error)
            return error
        logger.warning("mms connection lost (session %d): %s", session, reason)
        return MmsConnectionLostError(f"lost the mms connection: {reason}", session=session)

    # --- helpers ---------------------------------------------------------------------------------

    def _next_call(self) -> _Call | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            self._idle = True
            return None

    def _fail_queued(self, error: Exception) -> None:
        with self._lock:
            calls = list(self._queue)
            self._queue.clear()
        for call in calls:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(error)

    def _unavailable_error(self) -> MmsConnectionError:
        if self._last_error is not None:
            return MmsUnavailableError(
                f"mms is not connected; reconnecting ({self._last_error.message})",
                address=self._config.address,
            )
        return MmsUnavailableError(
            "mms is not connected yet; connecting", address=self._config.address
        )

    def _notify(self, event: Callable[[ConnectionObserver], None]) -> None:
        for observer in self._observers:
            try:
                event(observer)
            except Exception:
                logger.exception("mms connection observer failed")

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed while stopping

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

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


# One read takes up to this much; a response is a few hundred bytes, stats for 64 VMs ~20 KiB.
_READ_CHUNK_BYTES = 1 << 16


def _wait(sock: socket.socket, events: int, deadline: float) -> None:
    remaining_s = deadline - time.monotonic()
    if remaining_s <= 0:
        raise TimeoutError
    poller = select.poll()
    poller.register(sock, events)
    if not poller.poll(max(1, math.ceil(remaining_s * 1000))):
        raise TimeoutError


def _send_all(sock: socket.socket, data: bytes, deadline: float) -> None:
    """``sendall`` on the non-blocking socket, bounded by the watchdog deadline."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view) :]
        except BlockingIOError:
            pass
        if view:
            _wait(sock, select.POLLOUT, deadline)


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
        ) from None
