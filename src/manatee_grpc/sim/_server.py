"""The simulator's socket shell: one control connection at a time, frames in, model answers out.

A background thread accepts a connection, reads frames, decodes them as mms did (sim._decode),
asks MmsModel under one lock, applies the scenario's delays and writes the answers; a frame mms
could not decode gets no answer (or a hang-up under the "close" departure); a hangup is mms's
"connection lost". Counters for tests. The workload (the scenario's demand curves) runs on an
injectable clock, scaled by ``workload_time_scale``; ManualClock drives it step by step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import TypeVar

from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    RES_EIO,
    FinishAddVmRequest,
    FinishAddVmResponse,
    MessageType,
    RemoveVmRequest,
    Request,
)
from manatee_grpc.mms._transport import (
    MmsAddress,
    bound_address,
    listen,
    parse_address,
    recv_exactly,
)
from manatee_grpc.mms._wire import (
    HEADER_SIZE_BYTES,
    CodecError,
    decode_header,
    encode_response,
)
from manatee_grpc.sim._decode import RequestDecodeError, decode_request
from manatee_grpc.sim._model import MmsModel
from manatee_grpc.sim._scenario import MalformedRequestPolicy, Scenario

__all__ = ["DEFAULT_LISTEN", "ManualClock", "Simulator"]

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "tcp://127.0.0.1:0"
DEFAULT_REQUEST_LOG_LIMIT = 1000
# mms allocated whatever `len` said and read the body; the simulator reads and discards a body
# this large without keeping it, and treats it as undecodable (no real request comes close).
MAX_REQUEST_BODY_BYTES = 64 * MIB
_DISCARD_CHUNK_BYTES = 1 * MIB

_T = TypeVar("_T")


class ManualClock:
    """A clock that moves only when told: tests and the benchmark step a workload with it."""

    def __init__(self, start_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._now_s = start_s

    def __call__(self) -> float:
        with self._lock:
            return self._now_s

    def advance(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"a clock moves forward, got {seconds}")
        with self._lock:
            self._now_s += seconds


class _StoppedError(Exception):
    """Simulator.stop() was called while the serving thread was waiting."""


class Simulator:
    """An mms on a socket, backed by MmsModel; ``start()`` serves from a background thread.

    ``listen`` is any mms address (``unix:///path``, ``tcp://127.0.0.1:0``, ``vsock://any:PORT``,
    ``fd://N`` for an inherited listening or already connected socket). All setters and
    introspection are thread-safe.
    """

    def __init__(
        self,
        scenario: Scenario | None = None,
        listen: str | MmsAddress = DEFAULT_LISTEN,
        *,
        request_log_limit: int = DEFAULT_REQUEST_LOG_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._scenario = scenario if scenario is not None else Scenario()
        # The workload's time is this clock since the simulator was made, scaled.
        self._clock = clock
        self._workload_start_s = clock()
        self._listen_address = parse_address(listen) if isinstance(listen, str) else listen
        self._lock = threading.RLock()
        # Notified on every observable change, so tests wait on conditions instead of sleeping.
        self._changed = threading.Condition(self._lock)
        self._model = MmsModel(self._scenario)
        self._latency_s = self._scenario.latency_s
        self._message_delay_s = dict(self._scenario.message_delay_s)
        self._remove_vm_delay_s = self._scenario.remove_vm_delay_s
        self._crosvm_connect_timeout_s = self._scenario.crosvm_connect_timeout_s
        self._malformed_request: MalformedRequestPolicy = self._scenario.malformed_request
        self._request_counts = dict.fromkeys(MessageType, 0)
        self._requests: deque[Request] = deque(maxlen=request_log_limit)
        self._connections_accepted = 0
        self._connections_closed = 0
        self._malformed_requests = 0
        self._stopping = threading.Event()
        # Set by stop() just before it shuts the listener, whose accept() then fails (EINVAL).
        self._refusing = threading.Event()
        self._listener: socket.socket | None = None
        self._listening = False
        self._conn: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._address: MmsAddress | None = None

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind and serve from a background thread; returns once clients can connect."""
        if self._thread is not None:
            raise RuntimeError("Simulator already started")
        listener = listen(self._listen_address)
        self._listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) != 0
        self._listener = listener
        self._address = (
            bound_address(listener, self._listen_address)
            if self._listening
            else self._listen_address
        )
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="mms-simulator", daemon=True)
        self._thread.start()
        logger.debug("mms simulator serving on %s", self._address)
        return self

    def stop(self) -> None:
        """Stop accepting, hang up the current connection (connection lost), join the thread."""
        if self._thread is None or self._stopping.is_set():
            return
        # Like a dying mms, stop listening before hanging up (the woken thread may hang up at
        # once): a client that redials must be refused, not accepted by a closing listener.
        if self._listening and self._listener is not None:
            self._refusing.set()
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        # Wake the thread wherever it waits: select (wake socket), delays (event), recv (shutdown).
        self._stopping.set()
        assert self._wake_w is not None
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
        self._thread.join()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        # Leave no socket file behind for the next simulator on this path.
        address = self._listen_address
        if self._listening and address.scheme == "unix" and not address.is_abstract:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
        logger.debug("mms simulator on %s stopped", self._address)

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def address(self) -> MmsAddress:
        """Where clients dial (the real port when tcp port 0 was asked for)."""
        if self._address is None:
            raise RuntimeError("Simulator not started")
        return self._address

    # --- test hooks and runtime settings ------------------------------------------------------

    def drop_connection(self, timeout_s: float = 10.0) -> bool:
        """Hang up on the current client as if mms's side broke; waits for the teardown.

        Returns False if there was no connection (or the teardown did not finish in time).
        """
        with self._changed:
            conn = self._conn
            if conn is None:
                return False
            closed_target = self._connections_closed + 1
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            return self._changed.wait_for(
                lambda: self._connections_closed >= closed_target, timeout_s
            )

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Wait until ``predicate()`` (called under the simulator's lock) is true."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    @contextlib.contextmanager
    def holding_answers(self) -> Iterator[None]:
        """While inside, mms reads requests but answers none of them (each answer needs the
        simulator's lock): a test orders what happens before an answer without sleeping."""
        with self._lock:
            yield

    def with_model(self, read: Callable[[MmsModel], _T]) -> _T:
        """Run ``read`` on the model under the simulator's lock (for introspection)."""
        with self._lock:
            self._advance_workload()
            return read(self._model)

    def _advance_workload(self) -> None:
        elapsed_s = self._clock() - self._workload_start_s
        self._model.set_workload_time(elapsed_s * self._scenario.workload_time_scale)

    def set_vm_used_bytes(self, vm_id: int, used_bytes: int) -> None:
        with self._changed:
            self._model.set_vm_used_bytes(vm_id, used_bytes)
            self._changed.notify_all()

    def fail_crosvm_connect(self, vm_id: int | None = None, count: int = 1) -> None:
        with self._lock:
            self._model.fail_crosvm_connect(vm_id, count)

    def fail_control_socket(self, count: int = 1) -> None:
        with self._lock:
            self._model.fail_control_socket(count)

    def fail_stats(self, vm_id: int, failing: bool = True) -> None:
        with self._lock:
            self._model.fail_stats(vm_id, failing)

    def fail_balloon_adjust(self, vm_id: int, failing: bool = True) -> None:
        with self._lock:
            self._model.fail_balloon_adjust(vm_id, failing)

    def change_internal_allocation(self, delta_bytes: int) -> int:
        with self._changed:
            actual_bytes = self._model.change_internal_allocation(delta_bytes)
            self._changed.notify_all()
            return actual_bytes

    def set_latency(self, seconds: float) -> None:
        with self._lock:
            self._latency_s = _checked_seconds(seconds)

    def set_message_delay(self, msg_type: MessageType, seconds: float) -> None:
        with self._lock:
            self._message_delay_s[MessageType(msg_type)] = _checked_seconds(seconds)

    def set_remove_vm_delay(self, seconds: float) -> None:
        with self._lock:
            self._remove_vm_delay_s = _checked_seconds(seconds)

    def set_crosvm_connect_timeout(self, seconds: float) -> None:
        with self._lock:
            self._crosvm_connect_timeout_s = _checked_seconds(seconds)

    def set_malformed_request(self, policy: MalformedRequestPolicy) -> None:
        """Policy for undecodable frames: "ignore" as mms did (default), "close" departs from it."""
        if policy not in ("close", "ignore"):
            raise ValueError(f"policy must be 'close' or 'ignore', got {policy!r}")
        with self._lock:
            self._malformed_request = policy

    # --- counters -----------------------------------------------------------------------------

    @property
    def request_counts(self) -> dict[MessageType, int]:
        """Well-formed requests received, per type (counted on arrival, before any delay)."""
        with self._lock:
            return dict(self._request_counts)

    @property
    def requests(self) -> list[Request]:
        """The last ``request_log_limit`` decoded requests, oldest first."""
        with self._lock:
            return list(self._requests)

    @property
    def connections_accepted(self) -> int:
        with self._lock:
            return self._connections_accepted

    @property
    def connections_closed(self) -> int:
        """Connections whose teardown (mms's connection lost) has completed."""
        with self._lock:
            return self._connections_closed

    @property
    def malformed_requests(self) -> int:
        """Frames mms could not have decoded (see sim._decode), answered or not."""
        with self._lock:
            return self._malformed_requests

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._conn is not None

    # --- the serving thread -------------------------------------------------------------------

    def _run(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            if not self._listening:
                # An inherited, already connected stream: one session, then nothing to accept.
                self._serve(listener)
                return
            while True:
                conn = self._accept(listener)
                if conn is None:
                    return
                self._serve(conn)
        except _StoppedError:
            return
        except Exception:
            logger.exception("mms simulator thread failed")

    def _accept(self, listener: socket.socket) -> socket.socket | None:
        # Accepting only between connections is what keeps a second client queued in the
        # backlog until the first hangs up, as mms did.
        while True:
            try:
                self._wait_readable(listener)
            except _StoppedError:
                return None
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError:
                if self._refusing.is_set():
                    return None
                raise
            conn.setblocking(True)
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn

    def _serve(self, conn: socket.socket) -> None:
        with self._changed:
            self._conn = conn
            self._connections_accepted += 1
            self._changed.notify_all()
        logger.info("mms simulator: control connection %d accepted", self._connections_accepted)
        try:
            self._serve_requests(conn)
        except _StoppedError:
            pass
        except (OSError, CodecError) as exc:
            logger.info("mms simulator: control connection ended: %s", exc)
        finally:
            with self._lock:
                self._conn = None
            conn.close()
            self._connection_lost()

    def _connection_lost(self) -> None:
        with self._lock:
            must_wait = self._model.has_vms_to_wait_for()
            wait_s = self._remove_vm_delay_s
        # mms waits for the siblings' crosvm processes to exit before releasing their memory;
        # a stop() cuts the wait short but the model must still drop the session.
        if must_wait and wait_s > 0:
            self._stopping.wait(wait_s)
        with self._changed:
            self._model.connection_lost()
            self._connections_closed += 1
            self._changed.notify_all()
        logger.info("mms simulator: connection lost, siblings dropped, memory back to CrOS")

    def _serve_requests(self, conn: socket.socket) -> None:
        while True:
            self._wait_readable(conn)
            try:
                header = decode_header(recv_exactly(conn, HEADER_SIZE_BYTES))
            except ConnectionError:
                logger.info("mms simulator: client hung up")
                return
            try:
                if header.body_len_bytes > MAX_REQUEST_BODY_BYTES:
                    _discard_exactly(conn, header.body_len_bytes)
                    raise RequestDecodeError(
                        f"request body of {header.body_len_bytes} bytes is too large to decode"
                    )
                # mms read the whole body before looking at the type, so the stream stays framed.
                body = recv_exactly(conn, header.body_len_bytes)
                request = decode_request(header.msg_type, body)
            except RequestDecodeError as exc:
                if self._count_malformed() == "close":
                    raise CodecError(f"malformed request: {exc}") from exc
                # What mms did: log, answer nothing, carry on with the next frame.
                logger.warning("mms simulator: ignoring malformed request: %s", exc)
                continue
            conn.sendall(self._answer(request))

    def _count_malformed(self) -> MalformedRequestPolicy:
        with self._changed:
            self._malformed_requests += 1
            self._changed.notify_all()
            return self._malformed_request

    def _answer(self, request: Request) -> bytes:
        msg_type = request.TYPE
        with self._changed:
            self._request_counts[msg_type] += 1
            self._requests.append(request)
            self._changed.notify_all()
            delay_s = self._latency_s + self._message_delay_s.get(msg_type, 0.0)
            if isinstance(request, RemoveVmRequest) and self._model.remove_would_wait(
                request.vm_id
            ):
                # RemoveVm blocks until the VM's crosvm exits, before memory moves.
                delay_s += self._remove_vm_delay_s
        self._sleep(delay_s)
        with self._changed:
            self._advance_workload()
            response = self._model.handle(request)
            self._changed.notify_all()
            connect_wait_s = (
                self._crosvm_connect_timeout_s
                if isinstance(request, FinishAddVmRequest)
                and isinstance(response, FinishAddVmResponse)
                and response.res == RES_EIO
                else 0.0
            )
        # mms answers -5 only after waiting this long for the new VM's crosvm to connect.
        self._sleep(connect_wait_s)
        return encode_response(msg_type, response)

    def _sleep(self, seconds: float) -> None:
        """Model mms's latency; raises _StoppedError if stop() comes first."""
        if seconds > 0 and self._stopping.wait(seconds):
            raise _StoppedError
        if self._stopping.is_set():
            raise _StoppedError

    def _wait_readable(self, sock: socket.socket) -> None:
        assert self._wake_r is not None
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while True:
                ready = selector.select()
                if self._stopping.is_set():
                    raise _StoppedError
                if ready:
                    return


def _discard_exactly(conn: socket.socket, size_bytes: int) -> None:
    """Read and drop ``size_bytes`` (ConnectionError if the peer hangs up first)."""
    buffer = bytearray(min(size_bytes, _DISCARD_CHUNK_BYTES))
    view = memoryview(buffer)
    while size_bytes > 0:
        received = conn.recv_into(view, min(size_bytes, len(buffer)))
        if received == 0:
            raise ConnectionError("connection closed inside a request body")
        size_bytes -= received


def _checked_seconds(seconds: float) -> float:
    if not 0 <= seconds < float("inf"):
        raise ValueError(f"seconds must be finite and >= 0, got {seconds}")
    return float(seconds)
