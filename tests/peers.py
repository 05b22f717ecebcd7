"""A scripted, hostile mms for tests: a real socket whose every answer a test chooses.

``ScriptedMms`` serves one connection at a time, like mms, on a temporary unix socket in its own
thread. Each request it reads takes the next behaviour from its script (or the default one):
answer, hang until released, trickle, break the protocol in one of many ways, or hang up.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import selectors
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from manatee_grpc.mms import _transport, _wire
from manatee_grpc.mms._messages import (
    RES_OK,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmResponse,
    Request,
    Response,
)
from manatee_grpc.sim._decode import RequestDecodeError, decode_request

__all__ = [
    "ANSWER",
    "Answer",
    "Behaviour",
    "CloseConnection",
    "Hang",
    "HugeLen",
    "RawBody",
    "ReceivedRequest",
    "ScriptedMms",
    "Trickle",
    "Truncated",
    "WrongType",
    "canned_response",
]

# Any callable from a request to its response: canned_response, or a sim MmsModel().handle.
Responder = Callable[[MmsRequest[Any]], Response]
_HEADER = struct.Struct("<II")


def canned_response(request: MmsRequest[Any]) -> Response:
    """A plausible, always-successful answer, for tests that only need *an* answer."""
    if isinstance(request, GetBalloonStatsRequest):
        return GetBalloonStatsResponse(all_stats=())
    if isinstance(request, RebalanceMemoryRequest):
        return RebalanceMemoryResponse(actual_deltas=request.deltas)
    if isinstance(request, PrepareVmRequest):
        return PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
    if isinstance(request, FinishAddVmRequest):
        return FinishAddVmResponse(res=RES_OK)
    return RemoveVmResponse(res=RES_OK)


# --- behaviours: what the peer does with one request ----------------------------------------


class Behaviour:
    """What ScriptedMms does with one request. Subclasses are the script's vocabulary."""


@dataclass(frozen=True, slots=True)
class Answer(Behaviour):
    """Answer normally, through the peer's responder."""


ANSWER = Answer()


class Hang(Behaviour):
    """Send nothing until ``release()`` (then answer normally), the client hangs up, or stop."""

    def __init__(self) -> None:
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._wake: Callable[[], None] | None = None

    @property
    def released(self) -> bool:
        return self._released.is_set()

    def release(self) -> None:
        self._released.set()
        with self._lock:
            wake = self._wake
        if wake is not None:
            wake()

    def _attach(self, wake: Callable[[], None]) -> None:
        with self._lock:
            self._wake = wake


@dataclass(frozen=True, slots=True)
class Trickle(Behaviour):
    """Send the normal answer one byte every ``interval_s`` seconds."""

    interval_s: float


@dataclass(frozen=True, slots=True)
class WrongType(Behaviour):
    """A well-formed answer carrying another message type than the request's."""


@dataclass(frozen=True, slots=True)
class HugeLen(Behaviour):
    """A header announcing a body of 4 GiB - 1 bytes (the u32 maximum), then a few bytes."""


@dataclass(frozen=True, slots=True)
class Truncated(Behaviour):
    """Half of the normal answer's frame, then hang up."""


@dataclass(frozen=True, slots=True)
class RawBody(Behaviour):
    """A frame of the right type whose body is ``body`` as given (bad UTF-8, bad JSON, ...)."""

    body: bytes

    @classmethod
    def json(cls, value: object) -> RawBody:
        return cls(json.dumps(value).encode("utf-8"))


@dataclass(frozen=True, slots=True)
class CloseConnection(Behaviour):
    """Hang up without answering, as if mms died mid-request."""


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    connection: int  # 1 for the first accepted connection
    msg_type: int
    request: Request | None  # None when the body did not parse as that request


class _ConnectionOverError(Exception):
    """The current connection ended (client hung up, peer was told to drop it, or stop)."""


# --- the peer -------------------------------------------------------------------------------


class ScriptedMms:
    """A hostile mms on a temporary unix socket; ``with ScriptedMms() as peer:`` stops it."""

    def __init__(self, responder: Responder = canned_response, default: Behaviour = ANSWER) -> None:
        self._responder = responder
        self._default = default
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._script: collections.deque[Behaviour] = collections.deque()
        self._requests: list[ReceivedRequest] = []
        self._connections = 0
        self._pipelined = 0
        self._stopping = False
        self._drop_requested = False
        self._dir = tempfile.mkdtemp(prefix="mms-peer-")
        self.address = _transport.MmsAddress("unix", path=os.path.join(self._dir, "mms.sock"))
        self._listener = _transport.listen(self.address)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._thread = threading.Thread(target=self._run, name="scripted-mms", daemon=True)
        self._thread.start()

    def __enter__(self) -> ScriptedMms:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- test API (any thread) ---------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order; later requests use the default."""
        with self._lock:
            self._script.extend(behaviours)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    @property
    def requests(self) -> list[ReceivedRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def pipelined(self) -> int:
        """Requests that arrived while an earlier one was still unanswered (must stay 0)."""
        with self._lock:
            return self._pipelined

    def request_count(self, msg_type: MessageType | None = None) -> int:
        with self._lock:
            return sum(1 for r in self._requests if msg_type is None or r.msg_type == msg_type)

    def wait_for_requests(self, count: int, timeout_s: float) -> bool:
        """Wait until at least ``count`` requests have been read, in all connections."""
        with self._lock:
            return self._changed.wait_for(lambda: len(self._requests) >= count, timeout_s)

    def wait_for_connections(self, count: int, timeout_s: float) -> bool:
        with self._lock:
            return self._changed.wait_for(lambda: self._connections >= count, timeout_s)

    def drop_connection(self) -> None:
        """Hang up the current connection (if any) at the next chance; keep listening."""
        with self._lock:
            self._drop_requested = True
        self._wake()

    def stop(self) -> None:
        """Stop serving, close every socket, join the thread and remove the temp directory."""
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # --- the peer thread ---------------------------------------------------------------------

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                ready = [key.fileobj for key, _ in selector.select()]
                self._drain_wake()
                if self._listener not in ready:
                    continue
                conn, _ = self._listener.accept()
                with self._lock:
                    self._connections += 1
                    connection = self._connections
                    # A drop asked for between connections concerns none of them.
                    self._drop_requested = False
                    self._changed.notify_all()
                with conn:
                    self._serve(conn, connection)

    def _serve(self, conn: socket.socket, connection: int) -> None:
        conn.setblocking(True)
        with selectors.DefaultSelector() as selector:
            selector.register(conn, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            try:
                while True:
                    header = self._recv(conn, selector, _wire.HEADER_SIZE_BYTES)
                    body_len_bytes, msg_type = _HEADER.unpack(header)
                    body = self._recv(conn, selector, body_len_bytes)
                    request = self._record(connection, msg_type, body)
                    if request is None:
                        return  # not a request we understand: hang up, as mms's "close" policy
                    self._perform(conn, selector, request)
            except (_ConnectionOverError, OSError):
                if self._stopping:
                    # Like a dying mms, stop listening before hanging up: a client that
                    # reconnects at once must be refused, not queued on a listener about to go.
                    self._listener.close()
                return

    def _record(self, connection: int, msg_type: int, body: bytes) -> Request | None:
        try:
            request: Request | None = decode_request(msg_type, body)
        except RequestDecodeError:
            request = None
        with self._lock:
            self._requests.append(ReceivedRequest(connection, msg_type, request))
            self._changed.notify_all()
        return request

    def _next_behaviour(self) -> Behaviour:
        with self._lock:
            return self._script.popleft() if self._script else self._default

    def _perform(
        self, conn: socket.socket, selector: selectors.BaseSelector, request: Request
    ) -> None:
        behaviour = self._next_behaviour()
        if isinstance(behaviour, Hang):
            behaviour._attach(self._wake)
            while not behaviour.released:
                self._pause(conn, selector, None)
            behaviour = ANSWER
        frame = _wire.encode_response(request.TYPE, self._responder(request))
        if isinstance(behaviour, Answer):
            conn.sendall(frame)
        elif isinstance(behaviour, Trickle):
            for index in range(len(frame)):
                # Pause between bytes, not after the last: the answer is whole then, and the
                # client may send its next request at once.
                if index:
                    self._pause(conn, selector, behaviour.interval_s)
                conn.sendall(frame[index : index + 1])
        elif isinstance(behaviour, WrongType):
            wrong_type = MessageType(request.TYPE % len(MessageType) + 1)
            conn.sendall(_wire.encode_response(wrong_type, self._responder(request)))
        elif isinstance(behaviour, HugeLen):
            conn.sendall(_HEADER.pack(2**32 - 1, request.TYPE) + b'{"res":')
        elif isinstance(behaviour, Truncated):
            conn.sendall(frame[: len(frame) // 2])
            raise _ConnectionOverError
        elif isinstance(behaviour, RawBody):
            conn.sendall(_HEADER.pack(len(behaviour.body), request.TYPE) + behaviour.body)
        elif isinstance(behaviour, CloseConnection):
            raise _ConnectionOverError
        else:
            raise TypeError(f"unknown behaviour {behaviour!r}")

    def _recv(self, conn: socket.socket, selector: selectors.BaseSelector, n_bytes: int) -> bytes:
        data = bytearray()
        while len(data) < n_bytes:
            if self._wait(selector, None, conn):
                chunk = conn.recv(n_bytes - len(data))
                if not chunk:
                    raise _ConnectionOverError
                data += chunk
        return bytes(data)

    def _pause(
        self, conn: socket.socket, selector: selectors.BaseSelector, timeout_s: float | None
    ) -> None:
        """Wait while a request is pending: for a wake-up or ``timeout_s``.

        The client must not speak before it has its answer, so a readable socket here is either
        its hang-up or a pipelined request; both end the connection.
        """
        if self._wait(selector, timeout_s, conn):
            if conn.recv(1, socket.MSG_PEEK):
                with self._lock:
                    self._pipelined += 1
            raise _ConnectionOverError

    def _wait(
        self, selector: selectors.BaseSelector, timeout_s: float | None, conn: socket.socket
    ) -> bool:
        """Whether ``conn`` became readable before a wake-up or ``timeout_s``.

        Raises _ConnectionOverError if the peer must stop or drop this connection.
        """
        ready = [key.fileobj for key, _ in selector.select(timeout_s)]
        self._drain_wake()
        with self._lock:
            if self._stopping or self._drop_requested:
                self._drop_requested = False
                raise _ConnectionOverError
        return conn in ready

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _drain_wake(self) -> None:
        with contextlib.suppress(OSError):
            while self._wake_r.recv(4096):
                pass
