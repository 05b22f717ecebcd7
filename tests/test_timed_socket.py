"""The connection thread's reads: one blocking recv, the kernel's timeout a short wait.

Pure mechanics on a socketpair: a read returns what has arrived; the deadline ends a wait with
TimeoutError and takes nothing from the stream; a kernel timeout shorter than the deadline is
not the deadline; the end of the stream is b"", never a timeout; a shutdown wakes a read.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from manatee_grpc.mms._connection import _kernel_wait_s, _TimedSocket
from manatee_grpc.mms._messages import MessageType

FAR_S = 30.0  # a deadline no test reaches
WAIT_S = 0.01  # the kernel's receive timeout


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def test_a_read_returns_what_has_arrived(pair: tuple[socket.socket, socket.socket]) -> None:
    ours, theirs = pair
    timed = _TimedSocket(ours, WAIT_S)
    theirs.sendall(b"frame")
    assert timed.recv(time.monotonic() + FAR_S) == b"frame"


def test_the_deadline_ends_a_wait_and_takes_nothing(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    timed = _TimedSocket(ours, WAIT_S)
    with pytest.raises(TimeoutError):
        timed.recv(time.monotonic() + 0.05)
    # The stream is as it was: what comes later is read whole, by the next wait.
    theirs.sendall(b"late")
    assert timed.recv(time.monotonic() + FAR_S) == b"late"


def test_a_kernel_timeout_shorter_than_the_deadline_is_not_the_deadline(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    timed = _TimedSocket(ours, 0.001)  # the kernel gives up every millisecond
    sender = threading.Timer(0.05, theirs.sendall, (b"answer",))
    sender.start()
    try:
        assert timed.recv(time.monotonic() + FAR_S) == b"answer"
    finally:
        sender.join()


def test_the_end_of_the_stream_is_empty_not_a_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, theirs = pair
    timed = _TimedSocket(ours, WAIT_S)
    theirs.shutdown(socket.SHUT_WR)
    assert timed.recv(time.monotonic() + FAR_S) == b""


def test_a_shutdown_wakes_a_waiting_read(pair: tuple[socket.socket, socket.socket]) -> None:
    # stop() and the operator's reset() shut the socket down to end the thread's wait.
    ours, _theirs = pair
    timed = _TimedSocket(ours, WAIT_S)
    stopper = threading.Timer(0.05, ours.shutdown, (socket.SHUT_RDWR,))
    stopper.start()
    try:
        assert timed.recv(time.monotonic() + FAR_S) == b""
    finally:
        stopper.join()


def test_the_kernel_wait_is_a_tenth_of_the_shortest_watchdog() -> None:
    watchdogs = {MessageType.GET_BALLOON_STATS: 30.0, MessageType.PREPARE_VM: 2.0}
    assert _kernel_wait_s(watchdogs) == pytest.approx(0.2)


def test_any_watchdog_makes_a_kernel_wait_the_kernel_takes(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    ours, _theirs = pair
    for wait_s in (0.0, 1e-9, 1e19, float("inf")):
        _TimedSocket(ours, wait_s)  # a zero timeval would mean "for ever"; a huge one, overflow
        seconds, micros = struct.unpack(
            "@ll", ours.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)
        )
        assert (seconds, micros) != (0, 0)
        assert seconds <= 1
