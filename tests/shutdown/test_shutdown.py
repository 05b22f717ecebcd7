"""Shutdown of the real process: SIGTERM during a launch and during a burst, and a second SIGINT.

The server runs as ``python -m manatee_grpc serve`` against a simulator in this process, so the
test sees what mms received (the RemoveVm that releases a reservation) after the server is gone.
Health is watched from before the signal, so "NOT_SERVING at once" is measured, not guessed.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from api.helpers import wait_until
from grpc_health.v1 import health_pb2
from load._process import ServerProcess, health_watch

from manatee_grpc import ManateeRpcError
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import RemoveVmRequest
from manatee_grpc.sim import Simulator, StartState

if TYPE_CHECKING:
    from load._process import HealthStream

MIB = 1024 * 1024
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
CALL_TIMEOUT_S = 30.0
# The process exits this long after in-flight calls are done (releases, closing mms, exit).
EXIT_MARGIN_S = 5.0


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with (
        tempfile.TemporaryDirectory(prefix="manatee-shutdown-") as tmp,
        Simulator(listen=f"unix://{Path(tmp) / 'mms.sock'}") as simulator,
    ):
        yield simulator


def serve(simulator: Simulator, grace_s: float) -> ServerProcess:
    return ServerProcess(f"unix://{simulator.address.path}", ["--grace", f"{grace_s:g}"])


class HealthWatcher:
    """A Health.Watch stream read on its own thread, so a status change is timed when it lands."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._stream: HealthStream = health_watch(channel, CALL_TIMEOUT_S)
        self._seen: queue.Queue[tuple[int, float]] = queue.Queue()
        self._thread = threading.Thread(target=self._read, name="health-watch")
        self._thread.start()

    def _read(self) -> None:
        try:
            for response in self._stream:
                self._seen.put((int(response.status), time.monotonic()))
        except grpc.RpcError:
            pass  # cancelled by close(), or the server went away

    def next_status(self, timeout_s: float = CALL_TIMEOUT_S) -> tuple[int, float]:
        """The next status and when it arrived (monotonic)."""
        try:
            return self._seen.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no health status within {timeout_s} s") from None

    def close(self) -> None:
        # An open watch is an in-flight call: left open, it would hold the grace period.
        self._stream.cancel()
        self._thread.join()


class Launch:
    """One LaunchVm stream; requests go through a queue, so the test answers what it has seen."""

    def __init__(self, stub: pb_grpc.MemoryServiceStub, mem_size_bytes: int) -> None:
        self._requests: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes)
        self._requests.put(pb.LaunchVmRequest(start=start))
        self.call = stub.LaunchVm(self._request_stream(), timeout=CALL_TIMEOUT_S)

    def _request_stream(self) -> Iterator[pb.LaunchVmRequest]:
        while (request := self._requests.get()) is not None:
            yield request

    def reserved_vm_id(self) -> int:
        for response in self.call:
            if response.WhichOneof("event") == "reserved":
                return response.reserved.vm_id
        raise AssertionError("the launch ended before `reserved`")

    def vm_started(self) -> None:
        self._requests.put(pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted()))

    def rest(self) -> list[str]:
        """The events left in the stream, which must end OK (raises grpc.RpcError if not)."""
        events = [str(response.WhichOneof("event")) for response in self.call]
        self._requests.put(None)
        return events


def signal_and_see_not_serving(
    server: ServerProcess, health: HealthWatcher, signum: signal.Signals, grace_s: float
) -> float:
    """Send ``signum``; assert health turns NOT_SERVING at once. Returns when it was sent.

    "At once" is checked as an order, not a stopwatch: NOT_SERVING arrives while the server is
    still inside its grace period (this open watch alone keeps it there), so a balancer hears
    it before in-flight calls are cut off. A flip done only at the end would come ``grace_s``
    late or never (the stream ends first). The grace periods used here are long enough that a
    busy machine cannot push a prompt flip past them.
    """
    assert health.next_status()[0] == SERVING
    sent = time.monotonic()
    server.send_signal(signum)
    status, seen = health.next_status()
    assert status == NOT_SERVING
    assert seen - sent < grace_s, f"health took {seen - sent:.2f} s to go NOT_SERVING"
    assert server.process is not None and server.process.poll() is None, server.log()
    health.close()
    return sent


def remove_requests(simulator: Simulator, vm_id: int) -> int:
    return sum(
        1
        for request in simulator.requests
        if isinstance(request, RemoveVmRequest) and request.vm_id == vm_id
    )


# --- SIGTERM during a launch ---------------------------------------------------------------------


def test_sigterm_while_a_launch_waits_for_its_client_releases_the_reservation(
    simulator: Simulator,
) -> None:
    # Long enough that a prompt health flip cannot be pushed past it on a busy machine; short
    # enough to stay below the client's deadline, so a cut-off is told apart from a hang.
    grace_s = 10.0
    with serve(simulator, grace_s) as server, grpc.insecure_channel(server.address) as channel:
        launch = Launch(pb_grpc.MemoryServiceStub(channel), 512 * MIB)
        vm_id = launch.reserved_vm_id()
        assert simulator.with_model(lambda model: model.start_state) is StartState.PENDING
        sent = signal_and_see_not_serving(server, HealthWatcher(channel), signal.SIGTERM, grace_s)
        # The client never starts its VM: when the grace period ends the call is cut off,
        # cleanly (no hang until the client's own 30 s deadline).
        with pytest.raises(grpc.RpcError) as cut_off:
            launch.rest()
        ended_s = time.monotonic() - sent
        assert cut_off.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        # ... after the whole grace period the client was owed, not before (a lower bound the
        # server guarantees: it starts counting after `sent`), and by the server, not by the
        # client's own deadline (the code above is not DEADLINE_EXCEEDED).
        assert ended_s >= grace_s * 0.9, f"cut off after {ended_s:.2f} s"
        assert server.wait_exit(CALL_TIMEOUT_S) == 0, server.log()
    # The reservation was given back to mms with RemoveVm before the link closed, not merely
    # dropped by the hangup.
    assert remove_requests(simulator, vm_id) >= 1
    assert f"removing VM {vm_id}:" in server.log()
    assert "manatee-grpc stopped" in server.log()


def test_sigterm_lets_a_launch_in_flight_finish_within_the_grace_period(
    simulator: Simulator,
) -> None:
    grace_s = 20.0
    with serve(simulator, grace_s) as server, grpc.insecure_channel(server.address) as channel:
        launch = Launch(pb_grpc.MemoryServiceStub(channel), 512 * MIB)
        vm_id = launch.reserved_vm_id()
        sent = signal_and_see_not_serving(server, HealthWatcher(channel), signal.SIGTERM, grace_s)
        # The launcher started its VM after the signal: the launch completes normally.
        launch.vm_started()
        assert launch.rest() == ["launched"]
        # Nothing is in flight any more, so the server need not wait out its 20 s grace: it
        # exits before the grace period ends (one that waited it out would fail this).
        assert server.wait_exit(grace_s) == 0, server.log()
        assert time.monotonic() - sent < grace_s
    assert simulator.with_model(lambda model: model.start_state) is StartState.IDLE
    assert remove_requests(simulator, vm_id) == 0  # it launched: nothing to release


# --- SIGTERM during a burst ----------------------------------------------------------------------


@dataclass
class BurstResult:
    outcomes: Counter[tuple[str, str]]
    longest_call_s: float


def stats_loop(target: str, stop: threading.Event, first_ok: threading.Barrier) -> BurstResult:
    """GetBalloonStats until the server refuses; every outcome and the slowest call.

    Each caller stops at its first refusal and only there: once the server has exited, the
    next call is refused at once (nothing listens), so no caller can miss the shutdown however
    late it is scheduled. ``stop`` is only for a test that fails before the server exits.
    """
    outcomes: Counter[tuple[str, str]] = Counter()
    longest_call_s = 0.0
    waiting_at_barrier = True
    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            try:
                stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
            except grpc.RpcError as error:
                failed = ManateeRpcError.from_rpc_error(error)
                outcomes[(failed.code.name, failed.reason)] += 1
                longest_call_s = max(longest_call_s, time.monotonic() - started)
                break  # the server is going away: a real client would back off here
            outcomes[("OK", "")] += 1
            longest_call_s = max(longest_call_s, time.monotonic() - started)
            if waiting_at_barrier:
                first_ok.wait(CALL_TIMEOUT_S)
                waiting_at_barrier = False
    return BurstResult(outcomes, longest_call_s)


def test_sigterm_during_a_burst_of_calls_ends_each_cleanly(simulator: Simulator) -> None:
    # Far above a stats call, so the bounds below are no timing window on a busy machine: a call
    # that hung would be cut off only at the end of the grace period, and fail them.
    grace_s = 20.0
    callers = 32
    with serve(simulator, grace_s) as server, grpc.insecure_channel(server.address) as channel:
        stop = threading.Event()
        first_ok = threading.Barrier(callers + 1)
        results: list[BurstResult] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(stats_loop(server.address, stop, first_ok)),
                name=f"burst-{index}",
            )
            for index in range(callers)
        ]
        for thread in threads:
            thread.start()
        try:
            first_ok.wait(CALL_TIMEOUT_S)  # every caller has had an answer: the burst is on
            sent = signal_and_see_not_serving(
                server, HealthWatcher(channel), signal.SIGTERM, grace_s
            )
            assert server.wait_exit(grace_s + EXIT_MARGIN_S) == 0, server.log()
            exited_s = time.monotonic() - sent
        except BaseException:
            stop.set()  # the server may still serve: do not wait for refusals that never come
            raise
        finally:
            # Not stopped otherwise: a caller that got its last OK before the server exited
            # but was scheduled only after that makes one more call, and it is refused.
            for thread in threads:
                thread.join(CALL_TIMEOUT_S)
    assert not [thread.name for thread in threads if thread.is_alive()]
    assert len(results) == callers  # no caller died of an exception
    outcomes: Counter[tuple[str, str]] = Counter()
    for result in results:
        outcomes.update(result.outcomes)
    # Every caller was answered while the server went away: OK, or refused as a client can
    # retry elsewhere (SHUTTING_DOWN with RetryInfo, or the transport's UNAVAILABLE/CANCELLED).
    assert outcomes[("OK", "")] >= callers
    failures = {key for key in outcomes if key != ("OK", "")}
    assert failures <= {
        ("UNAVAILABLE", "SHUTTING_DOWN"),
        ("UNAVAILABLE", ""),
        ("CANCELLED", ""),
    }, outcomes
    assert sum(outcomes[key] for key in failures) == callers  # each stopped at its first refusal
    # Nothing hung: the slowest call is far below the callers' deadline, and the process left
    # well within its grace period (the calls were short; none had to be cut off).
    assert max(result.longest_call_s for result in results) < grace_s
    assert exited_s < grace_s


# --- a second SIGINT -----------------------------------------------------------------------------


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_sigint_during_the_grace_period_exits_at_once(
    simulator: Simulator, first: signal.Signals
) -> None:
    grace_s = 30.0
    with serve(simulator, grace_s) as server, grpc.insecure_channel(server.address) as channel:
        # A launch waiting for its client keeps the server in its 30 s grace period.
        launch = Launch(pb_grpc.MemoryServiceStub(channel), 512 * MIB)
        launch.reserved_vm_id()
        signal_and_see_not_serving(server, HealthWatcher(channel), first, grace_s)
        wait_until(
            lambda: f"received {first.name}: shutting down" in server.log(),
            "the server logged the first signal",
        )
        sent = time.monotonic()
        server.send_signal(signal.SIGINT)
        # The operator insisted: exit now (130, as for an interrupted program), not at the end
        # of the 30 s grace period; half of it is the bound, so a busy machine cannot fail this.
        assert server.wait_exit(grace_s / 2) == 130, server.log()
        assert time.monotonic() - sent < grace_s / 2
        assert "second interrupt: exiting now" in server.log()
        with pytest.raises(grpc.RpcError):
            launch.rest()
    # The abrupt exit closed the mms link, and mms dropped the pending start with it.
    assert simulator.wait_until(lambda: not simulator.connected)
    assert simulator.with_model(lambda model: model.start_state) is StartState.IDLE


# --- what a shutdown leaves in the log and on disk ----------------------------------------------


def test_a_clean_sigterm_logs_a_shutdown_not_a_lost_mms_connection(simulator: Simulator) -> None:
    with serve(simulator, grace_s=5.0) as server:
        server.send_signal(signal.SIGTERM)
        assert server.wait_exit(CALL_TIMEOUT_S) == 0, server.log()
        log = server.log()
    assert "closed the mms connection (session 1): shutting down" in log
    # The operator asked for it: nothing was lost, so nothing may read like a loss.
    assert "mms connection lost" not in log
    assert " WARNING " not in log, log


_LISTENING_WITH_MMS_RE = re.compile(r"manatee-grpc listening on \S+, mms at (\S+)")


def _unix_socket_names() -> str:
    """Every unix socket of this network namespace; abstract ones read ``@name``."""
    return Path("/proc/net/unix").read_text()


def test_a_killed_server_leaves_nothing_of_its_embedded_simulator(tmp_path: Path) -> None:
    # TMPDIR is where the embedded simulator's socket directory used to be made.
    tmp_dir = tmp_path / "tmp"
    tmp_dir.mkdir()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "manatee_grpc", "serve", "--listen", "127.0.0.1:0"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TMPDIR": str(tmp_dir), "PYTHONUNBUFFERED": "1"},
        )
    try:
        wait_until(
            lambda: (
                process.poll() is not None
                or _LISTENING_WITH_MMS_RE.search(log_path.read_text()) is not None
            ),
            "the server said where it listens",
            CALL_TIMEOUT_S,
        )
        match = _LISTENING_WITH_MMS_RE.search(log_path.read_text())
        assert match is not None, log_path.read_text()
        mms = match.group(1)
        assert mms.startswith("unix-abstract:"), mms
        abstract_name = "@" + mms.removeprefix("unix-abstract:")
        assert abstract_name in _unix_socket_names()
        process.send_signal(signal.SIGKILL)
        process.wait(CALL_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    # No directory or socket file to clean up, and the kernel took the abstract name back.
    assert list(tmp_dir.iterdir()) == []
    assert abstract_name not in _unix_socket_names()
