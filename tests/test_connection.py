"""MmsConnection over real sockets: the simulator for mms's answers, ScriptedMms for abuse.

Ordering comes from events, futures and the peers' own counters, never from sleeps. Every server
binds port 0 or a fresh temporary unix socket and is stopped in teardown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future
from typing import Any, NamedTuple

import pytest
from peers import (
    CloseConnection,
    Hang,
    HugeLen,
    RawBody,
    ScriptedMms,
    Trickle,
    Truncated,
    WrongType,
)

from manatee_grpc.core._errors import (
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
from manatee_grpc.mms import _transport, _wire
from manatee_grpc.mms._connection import (
    DEFAULT_WATCHDOG_S,
    UNKNOWN_STAKES,
    BackoffPolicy,
    ConnectionConfig,
    MmsConnection,
    Stakes,
    Trouble,
)
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.mms._messages import (
    RES_EINVAL,
    RES_EIO,
    RES_ENOMEM,
    RES_OK,
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    MessageType,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    Response,
)
from manatee_grpc.mms._transport import MmsAddress
from manatee_grpc.sim import MmsModel, Scenario, Simulator, StartState

# Generous bound for anything that should happen "at once": only a broken build waits it out.
WAIT_S = 10.0
FAST_BACKOFF = BackoffPolicy(initial_s=0.001, max_s=0.01)
GIB = 1024 * MIB

GET_CROS_STATS = GetBalloonStatsRequest(vm_ids=(0,))


# --- helpers ----------------------------------------------------------------------------------


class Recorder:
    """A ConnectionObserver that remembers everything and lets tests wait for it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.connected_sessions: list[int] = []
        self.disconnects: list[tuple[int, MmsConnectionError, bool]] = []
        self.responses: list[tuple[int, MmsRequest[Any], Response]] = []
        self.connection: MmsConnection | None = None

    def on_connected(self, session: int) -> None:
        with self._changed:
            self.connected_sessions.append(session)
            self._changed.notify_all()

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        # Whether the connection already says it is down when observers hear about it.
        connected = self.connection.connected if self.connection is not None else False
        with self._changed:
            self.disconnects.append((session, error, connected))
            self._changed.notify_all()

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None:
        with self._changed:
            self.responses.append((session, request, response))
            self._changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout_s)

    def wait_session(self, session: int) -> bool:
        return self.wait(lambda: session in self.connected_sessions)


@contextlib.contextmanager
def open_connection(
    address: MmsAddress,
    recorder: Recorder | None = None,
    watchdog_s: Mapping[MessageType, float] = DEFAULT_WATCHDOG_S,
    stakes: Callable[[], Stakes] = lambda: UNKNOWN_STAKES,
    hang_reset: bool = False,
) -> Iterator[MmsConnection]:
    """A started connection that has reached session 1; stopped on exit.

    ``stakes`` stands in for the server's books: what a reset would lose.
    """
    connection = MmsConnection(
        ConnectionConfig(
            address=address, backoff=FAST_BACKOFF, watchdog_s=watchdog_s, hang_reset=hang_reset
        )
    )
    connection.set_stakes(stakes)
    if recorder is not None:
        recorder.connection = connection
        connection.add_observer(recorder)
    connection.start()
    try:
        assert connection.wait_connected(WAIT_S)
        assert connection.session == 1
        yield connection
    finally:
        connection.stop()


@contextlib.contextmanager
def unix_address() -> Iterator[MmsAddress]:
    """A fresh unix socket path, short enough for sun_path wherever pytest keeps tmp_path."""
    directory = tempfile.mkdtemp(prefix="mms-")
    try:
        yield MmsAddress("unix", path=os.path.join(directory, "mms.sock"))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    # Siblings use none of their memory, so balloons reach exactly what a test asks for.
    with Simulator(Scenario(sibling_used_bytes=0, crosvm_connect_timeout_s=0.0)) as simulator:
        yield simulator


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def conn(sim: Simulator, recorder: Recorder) -> Iterator[MmsConnection]:
    with open_connection(sim.address, recorder) as connection:
        yield connection


@pytest.fixture
def peer() -> Iterator[ScriptedMms]:
    with ScriptedMms() as scripted:
        yield scripted


def start_state(sim: Simulator) -> StartState:
    return sim.with_model(lambda model: model.start_state)


def prepare(conn: MmsConnection, mem_mib: int, init_mib: int) -> PrepareVmResponse:
    return conn.call(PrepareVmRequest(mem_mib * MIB, init_mib * MIB), WAIT_S)


def accepted(sim: Simulator, count: int) -> Callable[[], bool]:
    return lambda: sim.connections_accepted == count


def open_fds() -> tuple[int, int]:
    """(open sockets, all open fds) of this process."""
    sockets = 0
    fds = os.listdir("/proc/self/fd")
    for fd in fds:
        with contextlib.suppress(FileNotFoundError):  # the listdir's own fd, closed by now
            sockets += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return sockets, len(fds)


# --- round trips against the simulator --------------------------------------------------------


def test_first_connect_is_session_1_and_all_five_requests_round_trip(
    sim: Simulator, conn: MmsConnection, recorder: Recorder
) -> None:
    assert conn.connected
    assert recorder.connected_sessions == [1]

    stats = conn.call(GET_CROS_STATS, WAIT_S)
    assert [entry.vm_id for entry in stats.all_stats] == [0]
    cros_balloon_bytes = sim.with_model(lambda model: model.cros_balloon_bytes)
    assert stats.all_stats[0].balloon_actual_bytes == cros_balloon_bytes

    prepared = prepare(conn, 512, 512)
    assert prepared == PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_OK
    rebalanced = conn.call(
        RebalanceMemoryRequest(deltas=(BalloonDelta(1, 4 * MIB), BalloonDelta(0, -4 * MIB))),
        WAIT_S,
    )
    assert rebalanced.actual_deltas == (BalloonDelta(1, 4 * MIB), BalloonDelta(0, -4 * MIB))
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK

    assert sim.request_counts == dict.fromkeys(MessageType, 1)
    assert conn.requests_sent == 5
    assert [type(request) for _, request, _ in recorder.responses] == [
        GetBalloonStatsRequest,
        PrepareVmRequest,
        FinishAddVmRequest,
        RebalanceMemoryRequest,
        RemoveVmRequest,
    ]
    assert {session for session, _, _ in recorder.responses} == {1}
    assert conn.session == 1
    assert sim.with_model(lambda model: model.conservation_error_bytes()) == 0


# --- mms's rebalance test vectors, through the socket ---------------------------------------


class RebalanceVector(NamedTuple):
    """One row of the protocol doc's table; sizes in MiB, dicts keyed by vector index."""

    mem_mib: list[int]
    balloon_mib: list[int]
    requested_mib: list[int]
    inflates_mib: dict[int, int]
    deflates_mib: dict[int, int]


@pytest.mark.parametrize(
    "vector",
    [
        RebalanceVector([5, 10], [3, 9], [-3, +3], {1: +1}, {0: -1}),
        RebalanceVector([5, 10], [1, 5], [-2, +2], {1: +1}, {0: -1}),
        RebalanceVector([5, 5, 5, 10], [4, 5, 1, 9], [+2, +2, +3, -7], {0: +1, 2: +3}, {3: -4}),
    ],
    ids=["clamped-inflate", "clamped-deflate", "trimmed-deflate"],
)
def test_rebalance_vectors_from_mms_unit_tests(
    sim: Simulator, conn: MmsConnection, vector: RebalanceVector
) -> None:
    mem_mib, balloon_mib, requested_mib, inflates_mib, deflates_mib = vector
    # Vector index i is sibling i + 1: a sibling's balloon starts at mem - init, so starting it
    # with init = mem - balloon gives exactly the vector's balloon.
    vm_ids = []
    for mem, balloon in zip(mem_mib, balloon_mib, strict=True):
        prepared = prepare(conn, mem, mem - balloon)
        assert prepared.res == RES_OK
        assert conn.call(FinishAddVmRequest(prepared.vm_id), WAIT_S).res == RES_OK
        vm_ids.append(prepared.vm_id)
    siblings = sim.with_model(lambda model: model.siblings())
    assert [siblings[vm_id].balloon_bytes for vm_id in vm_ids] == [b * MIB for b in balloon_mib]

    response = conn.call(
        RebalanceMemoryRequest(
            deltas=tuple(
                BalloonDelta(vm_id, delta * MIB)
                for vm_id, delta in zip(vm_ids, requested_mib, strict=True)
            )
        ),
        WAIT_S,
    )

    # mms answers the inflates, then the deflates, each in request order; a VM whose clamped
    # delta was 0 is missing.
    expected = [BalloonDelta(vm_ids[i], d * MIB) for i, d in inflates_mib.items()] + [
        BalloonDelta(vm_ids[i], d * MIB) for i, d in deflates_mib.items()
    ]
    assert list(response.actual_deltas) == expected
    moved_mib = {**inflates_mib, **deflates_mib}
    siblings = sim.with_model(lambda model: model.siblings())
    assert [siblings[vm_id].balloon_bytes for vm_id in vm_ids] == [
        (balloon + moved_mib.get(index, 0)) * MIB for index, balloon in enumerate(balloon_mib)
    ]


# --- the start state machine, every transition and error code over the socket ---------------


@pytest.mark.parametrize(
    ("mem_size_bytes", "init_mem_size_bytes"),
    [
        (512 * MIB + 1, 512 * MIB),  # mem_size not page-aligned
        (512 * MIB, 256 * MIB + 100),  # init_mem_size not page-aligned
        (512 * MIB, 1024 * MIB),  # init_mem_size > mem_size
        (8 * GIB, 1024 * MIB),  # not smaller than the CrOS guest
    ],
)
def test_idle_prepare_with_bad_sizes_is_einval_and_stays_idle(
    sim: Simulator, conn: MmsConnection, mem_size_bytes: int, init_mem_size_bytes: int
) -> None:
    response = conn.call(PrepareVmRequest(mem_size_bytes, init_mem_size_bytes), WAIT_S)
    assert response.res == RES_EINVAL
    assert start_state(sim) is StartState.IDLE
    assert sim.with_model(lambda model: model.next_vm_id) == 1


def test_idle_prepare_then_finish_runs_the_vm_then_remove(
    sim: Simulator, conn: MmsConnection
) -> None:
    # Idle -> PrepareVm -> Pending (fully reserved) -> FinishAddVm -> Idle, VM running.
    prepared = prepare(conn, 1024, 1000)
    assert prepared == PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
    assert start_state(sim) is StartState.PENDING
    # Pending -> PrepareVm with the same sizes -> Pending: nothing more to reserve.
    assert prepare(conn, 1024, 1000) == prepared
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert start_state(sim) is StartState.IDLE
    assert sim.with_model(lambda model: model.siblings()[1].balloon_bytes) == 24 * MIB
    # A running sibling: RemoveVm -> 0, and its memory is back with the CrOS guest.
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert sim.with_model(lambda model: model.siblings()) == {}
    assert sim.with_model(lambda model: model.cros_balloon_bytes) == 0
    # The id is never reused.
    assert prepare(conn, 1024, 1000).vm_id == 2


def test_prepare_short_of_memory_is_enomem_and_a_retry_tops_up(
    sim: Simulator, conn: MmsConnection
) -> None:
    # The CrOS guest can give only 480 MiB (8 GiB - 7.5 GiB used - 32 MiB internal allocation).
    sim.set_vm_used_bytes(0, 7 * GIB + 512 * MIB)
    required_bytes = 1000 * MIB + extra_bytes(1024 * MIB)
    short = prepare(conn, 1024, 1000)
    assert short == PrepareVmResponse(
        res=RES_ENOMEM, vm_id=1, shortfall_bytes=required_bytes - 480 * MIB
    )
    assert start_state(sim) is StartState.PENDING
    # Pending -> PrepareVm with other sizes -> -22; FinishAddVm of another id -> -22; still
    # Pending.
    assert prepare(conn, 2048, 1000).res == RES_EINVAL
    assert conn.call(FinishAddVmRequest(vm_id=2), WAIT_S).res == RES_EINVAL
    assert start_state(sim) is StartState.PENDING
    # Memory frees up; the same PrepareVm accumulates onto what was already reserved.
    sim.set_vm_used_bytes(0, 2 * GIB)
    assert prepare(conn, 1024, 1000) == PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
    pending = sim.with_model(lambda model: model.pending_start())
    assert pending is not None
    assert pending.reserved_bytes == required_bytes


def test_finish_without_full_reservation_is_enomem_then_failed_until_removed(
    sim: Simulator, conn: MmsConnection
) -> None:
    sim.set_vm_used_bytes(0, 7 * GIB + 512 * MIB)
    assert prepare(conn, 1024, 1000).res == RES_ENOMEM
    # Pending (short) -> FinishAddVm -> -12, Failed.
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_ENOMEM
    assert start_state(sim) is StartState.FAILED
    # Failed refuses everything but RemoveVm.
    sim.set_vm_used_bytes(0, 2 * GIB)
    assert prepare(conn, 1024, 1000).res == RES_EINVAL
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_EINVAL
    # Failed -> RemoveVm -> Idle, reservation returned.
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert start_state(sim) is StartState.IDLE
    assert sim.with_model(lambda model: model.cros_balloon_bytes) == 0
    assert prepare(conn, 1024, 1000) == PrepareVmResponse(res=RES_OK, vm_id=2, shortfall_bytes=0)


def test_prepare_that_cannot_create_the_control_socket_is_eio(
    sim: Simulator, conn: MmsConnection
) -> None:
    sim.fail_control_socket()
    assert prepare(conn, 512, 512) == PrepareVmResponse(res=RES_EIO, vm_id=0, shortfall_bytes=0)
    assert start_state(sim) is StartState.IDLE
    # The id was spent all the same.
    assert prepare(conn, 512, 512).vm_id == 2


def test_finish_whose_crosvm_never_connects_is_eio_then_failed(
    sim: Simulator, conn: MmsConnection
) -> None:
    sim.fail_crosvm_connect()
    assert prepare(conn, 512, 512).res == RES_OK
    # Pending (reserved) -> FinishAddVm -> -5, Failed.
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_EIO
    assert start_state(sim) is StartState.FAILED
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert start_state(sim) is StartState.IDLE


def test_finish_whose_balloon_falls_short_is_enomem_then_failed(
    sim: Simulator, conn: MmsConnection
) -> None:
    # The new guest uses more than init_mem_size, so its balloon cannot reach mem - init.
    sim.set_vm_used_bytes(1, 768 * MIB)
    assert prepare(conn, 1024, 512).res == RES_OK
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_ENOMEM
    assert start_state(sim) is StartState.FAILED
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert start_state(sim) is StartState.IDLE


def test_pending_remove_returns_to_idle_and_bad_removes_are_einval(
    sim: Simulator, conn: MmsConnection
) -> None:
    assert conn.call(RemoveVmRequest(vm_id=0), WAIT_S).res == RES_EINVAL
    assert conn.call(RemoveVmRequest(vm_id=7), WAIT_S).res == RES_EINVAL
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_EINVAL  # Idle
    assert prepare(conn, 512, 512).res == RES_OK
    # Pending -> RemoveVm -> Idle.
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert start_state(sim) is StartState.IDLE
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_EINVAL


def test_connection_loss_acts_as_remove_for_the_pending_start_and_every_sibling(
    sim: Simulator, conn: MmsConnection, recorder: Recorder
) -> None:
    assert prepare(conn, 512, 512).res == RES_OK
    assert conn.call(FinishAddVmRequest(vm_id=1), WAIT_S).res == RES_OK
    assert prepare(conn, 512, 512).res == RES_OK  # vm 2 pending
    assert start_state(sim) is StartState.PENDING

    assert sim.drop_connection()
    assert recorder.wait_session(2)
    assert sim.with_model(lambda model: (model.start_state, model.siblings())) == (
        StartState.IDLE,
        {},
    )
    assert sim.with_model(lambda model: model.cros_balloon_bytes) == 0
    # No id from the old session is valid, and ids are not reused.
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_EINVAL
    assert conn.call(FinishAddVmRequest(vm_id=2), WAIT_S).res == RES_EINVAL
    assert prepare(conn, 512, 512).vm_id == 3
    assert conn.session == 2


# --- mms going away ---------------------------------------------------------------------------


def test_simulator_stopped_mid_call_fails_the_caller_at_once_and_the_next_call_reconnects(
    recorder: Recorder,
) -> None:
    with unix_address() as address:
        first = Simulator(listen=address).start()
        try:
            first.set_message_delay(MessageType.GET_BALLOON_STATS, 60.0)
            with open_connection(address, recorder) as conn:
                future = conn.submit(GET_CROS_STATS)
                assert first.wait_until(
                    lambda: first.request_counts[MessageType.GET_BALLOON_STATS] == 1
                )
                first.stop()
                # At once (no deadline or watchdog is near): the stream is gone.
                with pytest.raises(MmsConnectionLostError):
                    future.result(timeout=WAIT_S)
                assert recorder.wait(lambda: len(recorder.disconnects) >= 1)

                with Simulator(listen=address) as second:
                    # The client may first have reached the dying listener's backlog (one more
                    # session, lost at once). Once the new simulator has accepted, every earlier
                    # session is over, so the next one announced is the live one.
                    assert second.wait_until(accepted(second, 1))
                    assert recorder.wait(
                        lambda: len(recorder.connected_sessions) == len(recorder.disconnects) + 1
                    )
                    stats = conn.call(GET_CROS_STATS, WAIT_S)
                    assert [entry.vm_id for entry in stats.all_stats] == [0]
                    assert recorder.responses[-1][0] == conn.session > 1
                    assert second.request_counts[MessageType.GET_BALLOON_STATS] == 1
        finally:
            first.stop()


def test_peer_hanging_up_mid_call_fails_the_caller_at_once_and_the_next_call_reconnects(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    hang = Hang()
    peer.script(hang)
    with open_connection(peer.address, recorder) as conn:
        future = conn.submit(GET_CROS_STATS)
        assert peer.wait_for_requests(1, WAIT_S)
        peer.drop_connection()
        with pytest.raises(MmsConnectionLostError):
            future.result(timeout=WAIT_S)
        assert recorder.wait_session(2)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert conn.session == 2
        assert peer.connections == 2


def test_a_thousand_reconnects_leak_no_threads_and_no_fds(
    sim: Simulator, conn: MmsConnection, recorder: Recorder
) -> None:
    assert sim.wait_until(lambda: sim.connections_accepted == 1)
    conn.call(GET_CROS_STATS, WAIT_S)
    threads_before = threading.active_count()
    sockets_before, fds_before = open_fds()

    for session in range(2, 1002):
        assert sim.drop_connection()
        assert recorder.wait_session(session), f"no reconnect for session {session}"
        # The client is connected once the listener's backlog took it; wait for the accept
        # too, or the next drop could find no connection to drop.
        assert sim.wait_until(accepted(sim, session))

    assert conn.session == 1001
    assert conn.call(GET_CROS_STATS, WAIT_S).all_stats[0].vm_id == 0
    assert threading.active_count() == threads_before
    sockets_after, fds_after = open_fds()
    assert sockets_after == sockets_before
    # The simulator opens an epoll fd for each wait, so one may come or go with the timing; a
    # leak would show as a thousand.
    assert abs(fds_after - fds_before) <= 1
    assert len(recorder.disconnects) == 1000


def test_idle_hangup_is_noticed_without_a_request(sim: Simulator, recorder: Recorder) -> None:
    with open_connection(sim.address, recorder) as conn:
        sent_before = conn.requests_sent
        sim.stop()
        assert recorder.wait(lambda: len(recorder.disconnects) >= 1)
        session, error, connected_then = recorder.disconnects[0]
        assert session == 1
        assert isinstance(error, MmsConnectionLostError)
        # Observers hear of it only once the connection already says it is down.
        assert connected_then is False
        assert conn.requests_sent == sent_before


def test_idle_hangup_leaves_the_connection_down_while_mms_is_gone(recorder: Recorder) -> None:
    peer = ScriptedMms()
    try:
        with open_connection(peer.address, recorder) as conn:
            assert peer.wait_for_connections(1, WAIT_S)
            peer.stop()
            assert recorder.wait(lambda: len(recorder.disconnects) == 1)
            assert isinstance(recorder.disconnects[0][1], MmsConnectionLostError)
            assert conn.connected is False
            # mms is gone for good: a submit fails at once instead of queueing.
            with pytest.raises(MmsUnavailableError):
                conn.submit(GET_CROS_STATS).result(timeout=0)
            assert (conn.session, conn.requests_sent) == (1, 0)
    finally:
        peer.stop()


def test_idle_hangup_then_reconnect_on_the_scripted_peer(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    with open_connection(peer.address, recorder) as conn:
        assert peer.wait_for_connections(1, WAIT_S)
        peer.drop_connection()
        assert recorder.wait(lambda: len(recorder.disconnects) == 1)
        assert isinstance(recorder.disconnects[0][1], MmsConnectionLostError)
        assert recorder.wait_session(2)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert peer.request_count() == 1


# --- deadlines: a caller's wait ends, the request on the wire does not ----------------------


def test_deadline_on_the_wire_keeps_the_connection_and_the_late_answer_is_applied(
    sim: Simulator, conn: MmsConnection, recorder: Recorder
) -> None:
    sim.set_message_delay(MessageType.PREPARE_VM, 1.0)
    with pytest.raises(DeadlineExceededError, match="was sent"):
        prepare_with_timeout(conn, 0.05)

    # The answer still arrives, and the observer books it for the vanished caller.
    assert recorder.wait(lambda: len(recorder.responses) == 1)
    session, request, response = recorder.responses[0]
    assert (session, request) == (1, PrepareVmRequest(512 * MIB, 512 * MIB))
    assert response == PrepareVmResponse(res=RES_OK, vm_id=1, shortfall_bytes=0)
    assert conn.session == 1
    assert conn.connected
    assert recorder.disconnects == []
    assert sim.connections_accepted == 1

    # A later call sees the reservation: another size is refused while VM 1 is pending.
    sim.set_message_delay(MessageType.PREPARE_VM, 0.0)
    assert prepare(conn, 1024, 1000).res == RES_EINVAL
    assert conn.call(RemoveVmRequest(vm_id=1), WAIT_S).res == RES_OK


def prepare_with_timeout(conn: MmsConnection, timeout_s: float) -> PrepareVmResponse:
    return conn.call(PrepareVmRequest(512 * MIB, 512 * MIB), timeout_s)


def test_late_answer_on_the_scripted_peer_is_applied_after_the_callers_deadline(
    recorder: Recorder,
) -> None:
    model = MmsModel(Scenario())
    hang = Hang()
    with (
        ScriptedMms(responder=model.handle) as peer,
        open_connection(peer.address, recorder) as conn,
    ):
        peer.script(hang)
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            prepare_with_timeout(conn, 0.2)
        assert time.monotonic() - started >= 0.2
        hang.release()
        assert recorder.wait(lambda: len(recorder.responses) == 1)
        assert model.start_state is StartState.PENDING
        # The same sizes now find the pending start, fully reserved by the late request.
        assert prepare_with_timeout(conn, WAIT_S) == PrepareVmResponse(
            res=RES_OK, vm_id=1, shortfall_bytes=0
        )
        assert (conn.session, peer.connections, peer.pipelined) == (1, 1, 0)


def test_a_request_cancelled_before_it_was_sent_is_never_sent(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    hang = Hang()
    peer.script(hang)
    with open_connection(peer.address, recorder) as conn:
        first = conn.submit(PrepareVmRequest(512 * MIB, 512 * MIB))
        assert peer.wait_for_requests(1, WAIT_S)
        second = conn.submit(PrepareVmRequest(512 * MIB, 512 * MIB))
        assert second.cancel()
        hang.release()
        assert first.result(timeout=WAIT_S).res == RES_OK
        # Anything queued after the cancelled call goes out next, so the cancelled one was
        # skipped, not merely delayed.
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert peer.request_count(MessageType.PREPARE_VM) == 1
        assert peer.request_count() == 2
        assert conn.requests_sent == 2
        assert [type(request) for _, request, _ in recorder.responses] == [
            PrepareVmRequest,
            GetBalloonStatsRequest,
        ]


def test_a_reply_that_never_comes_ends_the_callers_wait_but_not_the_connection(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    hang = Hang()
    peer.script(hang)
    with open_connection(peer.address, recorder) as conn:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            conn.call(GET_CROS_STATS, 0.3)
        assert time.monotonic() - started >= 0.3
        assert conn.connected
        assert recorder.disconnects == []
        # Still the one stream: once mms answers, the next call goes through on it.
        hang.release()
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert (conn.session, peer.connections) == (1, 1)


# --- the watchdog: a silent mms turns the stream unusable, never resets it at a VM's cost (I4) --


class Usability:
    """A usable listener that remembers each change and lets tests wait for one."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.changes: list[bool] = []

    def __call__(self, usable: bool) -> None:
        with self._changed:
            self.changes.append(usable)
            self._changed.notify_all()

    def wait_for(self, *sequence: bool) -> bool:
        """Wait until the changes seen end with ``sequence``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.changes[-len(sequence) :] == list(sequence), WAIT_S
            )


VM_1_AT_STAKE = Stakes(vm_ids=(1,))
SHORT_WATCHDOG_S = dict.fromkeys(MessageType, 0.3)


def test_a_hung_mms_with_vms_at_stake_keeps_the_stream_and_a_late_answer_brings_it_back(
    peer: ScriptedMms, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="manatee_grpc.mms._connection")
    hang = Hang()
    peer.script(hang)
    usability = Usability()
    with open_connection(
        peer.address, recorder, SHORT_WATCHDOG_S, stakes=lambda: VM_1_AT_STAKE
    ) as conn:
        conn.add_usable_listener(usability)
        in_flight = conn.submit(GET_CROS_STATS)
        assert peer.wait_for_requests(1, WAIT_S)
        # Past the watchdog: unusable, logged at ERROR naming the VM at stake, but not closed.
        assert usability.wait_for(False)
        trouble = conn.trouble
        assert trouble is not None and trouble.kind is Trouble.HUNG
        assert trouble.stakes == VM_1_AT_STAKE
        (logged,) = [r for r in caplog.records if "NOT resetting" in r.getMessage()]
        assert logged.levelno == logging.ERROR and "VM 1" in logged.getMessage()
        assert not in_flight.done()
        # A new call is not queued behind the silent one: it fails at once, as itself.
        with pytest.raises(MmsHungError, match="PREPARE_VM not sent") as caught:
            conn.submit(PrepareVmRequest(512 * MIB, 512 * MIB)).result(timeout=0)
        assert caught.value.reached_mms is False
        assert caught.value.metadata["messageType"] == "PREPARE_VM"
        # mms answers late: the answer is delivered, the stream is in step again.
        hang.release()
        assert in_flight.result(timeout=WAIT_S).all_stats == ()
        assert usability.wait_for(False, True)
        assert conn.trouble is None
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert (conn.session, peer.connections, recorder.disconnects) == (1, 1, [])
        assert peer.request_count() == 2  # the refused PrepareVm never went out


def test_a_call_queued_behind_a_hung_one_fails_with_its_own_type_not_sent(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    hang = Hang()
    peer.script(hang)
    with open_connection(
        peer.address, recorder, SHORT_WATCHDOG_S, stakes=lambda: VM_1_AT_STAKE
    ) as conn:
        in_flight = conn.submit(GET_CROS_STATS)
        assert peer.wait_for_requests(1, WAIT_S)
        queued = conn.submit(RemoveVmRequest(vm_id=1))
        with pytest.raises(MmsHungError) as caught:
            queued.result(timeout=WAIT_S)
        error = caught.value
        assert error.metadata["messageType"] == "REMOVE_VM"
        assert "REMOVE_VM not sent" in error.message
        assert error.reached_mms is False
        hang.release()
        assert in_flight.result(timeout=WAIT_S).all_stats == ()
        assert peer.request_count(MessageType.REMOVE_VM) == 0


def test_a_call_queued_when_the_link_drops_fails_with_its_own_type_not_sent(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(Hang())
    with open_connection(peer.address, recorder, stakes=lambda: VM_1_AT_STAKE) as conn:
        in_flight = conn.submit(GET_CROS_STATS)
        assert peer.wait_for_requests(1, WAIT_S)
        queued = conn.submit(PrepareVmRequest(512 * MIB, 512 * MIB))
        peer.drop_connection()
        with pytest.raises(MmsConnectionLostError) as lost:
            in_flight.result(timeout=WAIT_S)
        assert (lost.value.reached_mms, lost.value.metadata["messageType"]) == (
            True,
            "GET_BALLOON_STATS",
        )
        with pytest.raises(MmsConnectionLostError, match="PREPARE_VM not sent") as caught:
            queued.result(timeout=WAIT_S)
        assert (caught.value.reached_mms, caught.value.metadata["messageType"]) == (
            False,
            "PREPARE_VM",
        )


def test_a_hung_mms_with_nothing_at_stake_is_reset_and_redialled(
    peer: ScriptedMms, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    peer.script(Hang())
    with open_connection(peer.address, recorder, SHORT_WATCHDOG_S, stakes=Stakes) as conn:
        with pytest.raises(MmsHungError) as caught:
            conn.call(GET_CROS_STATS, 60.0)
        assert caught.value.reached_mms is True
        assert recorder.wait(lambda: len(recorder.disconnects) == 1)
        assert isinstance(recorder.disconnects[0][1], MmsHungError)
        assert any(
            record.levelno == logging.ERROR and "RESETTING" in record.getMessage()
            for record in caplog.records
        )
        assert recorder.wait_session(2)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()
        assert peer.connections == 2


def test_hang_reset_set_by_the_operator_resets_even_with_vms_at_stake(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(Hang())
    with open_connection(
        peer.address, recorder, SHORT_WATCHDOG_S, stakes=lambda: VM_1_AT_STAKE, hang_reset=True
    ) as conn:
        with pytest.raises(MmsHungError, match="mms-hang-reset"):
            conn.call(GET_CROS_STATS, 60.0)
        assert recorder.wait_session(2)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()


def test_a_hung_stream_is_reset_once_nothing_is_at_stake_any_more(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    stakes = [VM_1_AT_STAKE]
    usability = Usability()
    peer.script(Hang())
    with open_connection(
        peer.address, recorder, SHORT_WATCHDOG_S, stakes=lambda: stakes[0]
    ) as conn:
        conn.add_usable_listener(usability)
        in_flight = conn.submit(GET_CROS_STATS)
        assert usability.wait_for(False)
        assert recorder.disconnects == []
        stakes[0] = Stakes()  # e.g. the launch that held the pending start gave up
        with pytest.raises(MmsHungError):
            in_flight.result(timeout=WAIT_S)
        assert recorder.wait_session(2)


def test_the_operator_reset_closes_a_hung_stream_and_redials(
    peer: ScriptedMms, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    usability = Usability()
    peer.script(Hang())
    with open_connection(
        peer.address, recorder, SHORT_WATCHDOG_S, stakes=lambda: VM_1_AT_STAKE
    ) as conn:
        conn.add_usable_listener(usability)
        in_flight = conn.submit(GET_CROS_STATS)
        assert usability.wait_for(False)
        assert conn.reset("the test asked")
        with pytest.raises(MmsConnectionLostError, match="operator reset it"):
            in_flight.result(timeout=WAIT_S)
        assert any(
            "RESETTING" in r.getMessage() and "VM 1" in r.getMessage() for r in caplog.records
        )
        assert recorder.wait_session(2)
        assert usability.wait_for(True)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()


def test_watchdog_covers_the_whole_answer_not_each_byte(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    # Each byte comes well within the watchdog, the whole answer does not.
    peer.script(Trickle(interval_s=0.05))
    watchdog_s = {MessageType.PREPARE_VM: 0.5}
    with open_connection(peer.address, recorder, watchdog_s=watchdog_s, stakes=Stakes) as conn:
        with pytest.raises(MmsHungError):
            prepare_with_timeout(conn, 60.0)
        assert recorder.wait_session(2)
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK


def test_a_trickled_answer_within_the_watchdog_is_reassembled(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(Trickle(interval_s=0.001))
    with open_connection(peer.address, recorder) as conn:
        assert prepare_with_timeout(conn, WAIT_S) == PrepareVmResponse(
            res=RES_OK, vm_id=1, shortfall_bytes=0
        )
        assert conn.session == 1


# --- a hostile mms: only broken framing closes the stream (I3) ---------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        RawBody(b'{"res": "\xff\xfe", "id": 1, "shortfall": 0}'),
        RawBody(b""),
        RawBody(b'{"res": 0, "id": 1, '),
        RawBody.json([0, 1, 0]),
        RawBody.json("res"),
        RawBody.json({"res": 0, "id": 1}),
        RawBody.json({}),
        RawBody.json({"res": "0", "id": 1, "shortfall": 0}),
        RawBody.json({"res": 0, "id": -1, "shortfall": 0}),
        RawBody.json({"res": 0, "id": 1, "shortfall": 1.5}),
        RawBody.json({"res": True, "id": 1, "shortfall": 0}),
        RawBody.json({"res": 0, "id": None, "shortfall": 0}),
        RawBody(b'{"res": NaN, "id": 1, "shortfall": 0}'),
        RawBody(b"[" * 100_000),
    ],
    ids=[
        "invalid-utf8",
        "empty-body",
        "truncated-json",
        "json-array",
        "json-string",
        "missing-key",
        "empty-object",
        "string-for-int",
        "negative-id",
        "float-for-int",
        "bool-for-int",
        "null-for-int",
        "nan",
        "deep-nesting",
    ],
)
def test_a_bad_body_fails_that_call_only_and_the_next_call_uses_the_same_stream(
    peer: ScriptedMms, recorder: Recorder, behaviour: Any
) -> None:
    peer.script(behaviour)
    with open_connection(peer.address, recorder, stakes=lambda: VM_1_AT_STAKE) as conn:
        # Failed by the bad answer itself: not DeadlineExceededError, not MmsHungError.
        with pytest.raises(MmsProtocolError) as caught:
            prepare_with_timeout(conn, WAIT_S)
        assert caught.value.grpc_code == "INTERNAL"
        assert caught.value.reached_mms is True
        assert conn.usable
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK
        assert (conn.session, peer.connections, recorder.disconnects) == (1, 1, [])


@pytest.mark.parametrize(
    ("behaviour", "expected_error"),
    [
        (HugeLen(), MmsProtocolError),
        (Truncated(), MmsConnectionLostError),
        (CloseConnection(), MmsConnectionLostError),
    ],
    ids=["4GiB-len", "truncated-then-close", "close-mid-request"],
)
def test_broken_framing_closes_the_stream_and_the_next_call_works(
    peer: ScriptedMms,
    recorder: Recorder,
    behaviour: Any,
    expected_error: type[MmsConnectionError],
) -> None:
    peer.script(behaviour)
    with open_connection(peer.address, recorder, stakes=lambda: VM_1_AT_STAKE) as conn:
        with pytest.raises(expected_error) as caught:
            prepare_with_timeout(conn, 30.0)
        assert caught.value.reached_mms is True
        assert recorder.wait(lambda: len(recorder.disconnects) == 1)
        assert recorder.disconnects[0][0] == 1
        assert recorder.wait_session(2)
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK
        assert (conn.session, peer.connections) == (2, 2)


def test_a_wrong_type_with_vms_at_stake_stops_sending_but_keeps_the_stream(
    peer: ScriptedMms, recorder: Recorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    usability = Usability()
    peer.script(WrongType())
    with open_connection(peer.address, recorder, stakes=lambda: VM_1_AT_STAKE) as conn:
        conn.add_usable_listener(usability)
        with pytest.raises(MmsProtocolError) as caught:
            prepare_with_timeout(conn, 30.0)
        assert caught.value.grpc_code == "INTERNAL"
        assert usability.wait_for(False)
        trouble = conn.trouble
        assert trouble is not None and trouble.kind is Trouble.OUT_OF_STEP
        assert any(
            r.levelno == logging.ERROR
            and "OUT OF STEP" in r.getMessage()
            and "VM 1" in r.getMessage()
            for r in caplog.records
        )
        # Nothing more is sent on it: a call fails at once, UNAVAILABLE, not sent.
        with pytest.raises(MmsOutOfStepError, match="GET_BALLOON_STATS not sent") as refused:
            conn.call(GET_CROS_STATS, WAIT_S)
        assert refused.value.grpc_code == "UNAVAILABLE"
        assert refused.value.reached_mms is False
        assert (conn.session, peer.connections, recorder.disconnects) == (1, 1, [])
        assert peer.request_count() == 1
        # The operator resets it: a new session, and calls work again.
        assert conn.reset("the test asked")
        assert recorder.wait_session(2)
        assert conn.call(GET_CROS_STATS, WAIT_S).all_stats == ()


def test_a_wrong_type_with_nothing_at_stake_resets_the_stream(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(WrongType())
    with open_connection(peer.address, recorder, stakes=Stakes) as conn:
        with pytest.raises(MmsProtocolError):
            prepare_with_timeout(conn, 30.0)
        assert recorder.wait_session(2)
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK


def test_a_4_gib_len_is_refused_without_allocating_it(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(HugeLen())
    with open_connection(peer.address, recorder) as conn:
        tracemalloc.start()
        try:
            with pytest.raises(MmsProtocolError, match="exceeds"):
                prepare_with_timeout(conn, 30.0)
            _, peak_bytes = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak_bytes < 8 * MIB
        assert recorder.wait_session(2)
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK


# --- the connection thread never dies silently (I11) -------------------------------------------


def test_an_unexpected_error_fails_the_call_in_flight_and_the_thread_goes_on(
    peer: ScriptedMms,
    recorder: Recorder,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    real_decode = _wire.decode_response
    faults = [RuntimeError("injected decoder fault")]

    def decode_once_faulty(request: Any, body: bytes) -> Any:
        if faults:
            raise faults.pop()
        return real_decode(request, body)

    monkeypatch.setattr(_wire, "decode_response", decode_once_faulty)
    with open_connection(peer.address, recorder, stakes=lambda: VM_1_AT_STAKE) as conn:
        with pytest.raises(ManateeError) as caught:
            prepare_with_timeout(conn, WAIT_S)
        assert caught.value.grpc_code == "INTERNAL"
        assert "RuntimeError" in caught.value.message
        tracebacks = [r for r in caplog.records if r.exc_info is not None]
        assert len(tracebacks) == 1
        assert "injected decoder fault" in str(tracebacks[0].exc_info[1])  # type: ignore[index]
        # The thread goes on, on the same stream.
        assert prepare_with_timeout(conn, WAIT_S).res == RES_OK
        assert (conn.session, peer.connections, recorder.disconnects) == (1, 1, [])


def test_an_unexpected_error_while_connecting_is_logged_and_the_thread_redials(
    peer: ScriptedMms, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="manatee_grpc.mms._connection")
    real_connect = _transport.connect
    faults = [RuntimeError("injected connect fault")]

    def connect_once_faulty(address: MmsAddress, timeout_s: float) -> Any:
        if faults:
            raise faults.pop()
        return real_connect(address, timeout_s)

    monkeypatch.setattr(_transport, "connect", connect_once_faulty)
    connection = MmsConnection(ConnectionConfig(address=peer.address, backoff=FAST_BACKOFF))
    connection.start()
    try:
        assert connection.wait_connected(WAIT_S)
        assert connection.call(GET_CROS_STATS, WAIT_S).all_stats == ()
    finally:
        connection.stop()
    (logged,) = [r for r in caplog.records if r.exc_info is not None]
    assert "injected connect fault" in str(logged.exc_info[1])  # type: ignore[index]


def test_stop_leaves_the_wake_sockets_to_a_thread_that_has_not_ended(
    peer: ScriptedMms,
) -> None:
    in_observer = threading.Event()
    release = threading.Event()

    class StuckObserver(Recorder):
        def on_response(self, *args: Any) -> None:
            in_observer.set()
            release.wait(WAIT_S)

    connection = MmsConnection(ConnectionConfig(address=peer.address, backoff=FAST_BACKOFF))
    connection.add_observer(StuckObserver())
    threads_before = set(threading.enumerate())
    connection.start()
    (thread,) = set(threading.enumerate()) - threads_before
    try:
        assert connection.wait_connected(WAIT_S)
        connection.submit(GET_CROS_STATS)
        assert in_observer.wait(WAIT_S)
        connection.stop(timeout_s=0.05)
        assert thread.is_alive()
        # The thread still selects on these: they stay open until it ends.
        assert connection._wake_r.fileno() != -1 and connection._wake_w.fileno() != -1
    finally:
        release.set()
    thread.join(WAIT_S)
    assert not thread.is_alive()
    assert connection._wake_r.fileno() == -1 and connection._wake_w.fileno() == -1


# --- fail fast: disconnected, and stopping ---------------------------------------------------


def test_submit_while_disconnected_fails_fast_with_unavailable() -> None:
    with unix_address() as address:
        # Nobody listens on this path: every connect attempt fails.
        connection = MmsConnection(ConnectionConfig(address=address, backoff=FAST_BACKOFF))
        try:
            before_start = connection.submit(GET_CROS_STATS)
            connection.start()
            assert connection.wait_connected(0.05) is False
            after_start = connection.submit(GET_CROS_STATS)
            for future in (before_start, after_start):
                assert future.done()
                with pytest.raises(MmsUnavailableError):
                    future.result(timeout=0)
            with pytest.raises(MmsUnavailableError, match="cannot connect"):
                connection.call(GET_CROS_STATS, WAIT_S)
            assert connection.requests_sent == 0
        finally:
            connection.stop()


def test_stop_fails_queued_callers_with_shutting_down_and_joins_the_thread(
    peer: ScriptedMms, recorder: Recorder
) -> None:
    peer.script(Hang())
    threads_before = set(threading.enumerate())
    connection = MmsConnection(ConnectionConfig(address=peer.address, backoff=FAST_BACKOFF))
    connection.add_observer(recorder)
    connection.start()
    try:
        (connection_thread,) = set(threading.enumerate()) - threads_before
        assert connection.wait_connected(WAIT_S)
        on_the_wire = connection.submit(GET_CROS_STATS)
        assert peer.wait_for_requests(1, WAIT_S)
        queued: list[Future[Any]] = [
            connection.submit(PrepareVmRequest(512 * MIB, 512 * MIB)),
            connection.submit(RemoveVmRequest(vm_id=1)),
        ]
    finally:
        connection.stop()
    assert not connection_thread.is_alive()
    for future in queued:
        with pytest.raises(ServerShuttingDownError):
            future.result(timeout=0)
    # The request on the wire is abandoned: its caller learns the stream is gone.
    with pytest.raises(ManateeError):
        on_the_wire.result(timeout=0)
    assert peer.request_count() == 1
    # And nothing is accepted afterwards.
    with pytest.raises(ServerShuttingDownError):
        connection.submit(GET_CROS_STATS).result(timeout=0)


def test_the_scripted_peer_stops_cleanly_even_while_hanging_on_a_request() -> None:
    threads_before = threading.active_count()
    sockets_before, _ = open_fds()
    with ScriptedMms() as peer:
        peer.script(Hang())
        with open_connection(peer.address) as conn:
            hung = conn.submit(GET_CROS_STATS)
            assert peer.wait_for_requests(1, WAIT_S)
            peer.stop()
            with pytest.raises(MmsConnectionLostError):
                hung.result(timeout=WAIT_S)
    assert not os.path.exists(peer.address.path)
    assert threading.active_count() == threads_before
    assert open_fds()[0] == sockets_before
