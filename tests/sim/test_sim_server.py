"""Socket tests of the Simulator: real frames over unix, tcp and inherited sockets.

A raw client (transport + codec, no bridge) talks to a Simulator on a temp unix socket or tcp
port 0. Ordering is proven with select and the simulator's own counters, never with sleeps.
"""

from __future__ import annotations

import select
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from manatee_grpc.mms import _transport
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    RES_EIO,
    RES_ENOMEM,
    RES_OK,
    BalloonDelta,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    MessageType,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
)
from manatee_grpc.mms._transport import MmsAddress
from manatee_grpc.mms._wire import (
    HEADER_SIZE_BYTES,
    check_response_header,
    decode_header,
    decode_response,
    encode_frame,
    encode_request,
)
from manatee_grpc.sim import Scenario, Simulator

_R = TypeVar("_R", bound=Response)

MEM_1G = 1024 * MIB
INIT_1G = 1000 * MIB
# Long enough that "nothing arrived yet" means the simulator is holding back, not slow.
QUIET_POLL_S = 0.3
STATS_OF_CROS = GetBalloonStatsRequest((0,))


class RawClient:
    """One mms control connection speaking raw frames."""

    def __init__(self, address: MmsAddress) -> None:
        self.sock = _transport.connect(address, timeout_s=5.0)
        # A broken test fails instead of hanging on a read.
        self.sock.settimeout(10.0)

    @classmethod
    def over(cls, sock: socket.socket) -> RawClient:
        client = cls.__new__(cls)
        client.sock = sock
        sock.settimeout(10.0)
        return client

    def send(self, request: MmsRequest[Any]) -> None:
        self.sock.sendall(encode_request(request))

    def recv(self, request: MmsRequest[_R]) -> _R:
        header = decode_header(_transport.recv_exactly(self.sock, HEADER_SIZE_BYTES))
        check_response_header(header, request.TYPE)
        return decode_response(request, _transport.recv_exactly(self.sock, header.body_len_bytes))

    def call(self, request: MmsRequest[_R]) -> _R:
        self.send(request)
        return self.recv(request)

    def has_data(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], QUIET_POLL_S)
        return bool(readable)

    def hung_up(self) -> bool:
        """True if the simulator closed the stream (a client still in the backlog sees a reset)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def stats_ids(self, *vm_ids: int) -> list[int]:
        response = self.call(GetBalloonStatsRequest(vm_ids))
        return [entry.vm_id for entry in response.all_stats]

    def start_vm(self) -> int:
        prepared = self.call(PrepareVmRequest(MEM_1G, INIT_1G))
        assert prepared.res == RES_OK
        assert self.call(FinishAddVmRequest(prepared.vm_id)).res == RES_OK
        return prepared.vm_id

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte unix socket path limit.
    with tempfile.TemporaryDirectory(prefix="mms-", dir="/tmp") as path:
        yield Path(path)


@pytest.fixture
def unix_sim(socket_dir: Path) -> Iterator[Simulator]:
    with Simulator(listen=f"unix://{socket_dir}/mms.sock") as sim:
        yield sim


Dial = Callable[[MmsAddress], RawClient]


@pytest.fixture
def dial() -> Iterator[Dial]:
    """Connect raw clients that are closed at teardown even if the test fails."""
    clients: list[RawClient] = []

    def connect(address: MmsAddress) -> RawClient:
        clients.append(RawClient(address))
        return clients[-1]

    yield connect
    for client in clients:
        client.close()


@pytest.fixture(autouse=True)
def _fresh_fd_numbers() -> Iterator[None]:
    # fd numbers are reused between tests that hand a socket over by number.
    yield
    _transport._forget_handed_over_fds()


def test_unix_round_trip_of_every_message(unix_sim: Simulator, dial: Dial) -> None:
    client = dial(unix_sim.address)
    stats = client.call(STATS_OF_CROS)
    assert [entry.vm_id for entry in stats.all_stats] == [0]
    prepared = client.call(PrepareVmRequest(MEM_1G, INIT_1G))
    assert prepared == PrepareVmResponse(RES_OK, 1, 0)
    assert client.call(FinishAddVmRequest(1)) == FinishAddVmResponse(RES_OK)
    moved = client.call(
        RebalanceMemoryRequest((BalloonDelta(1, -4 * MIB), BalloonDelta(0, 4 * MIB)))
    )
    assert moved == RebalanceMemoryResponse((BalloonDelta(0, 4 * MIB), BalloonDelta(1, -4 * MIB)))
    assert client.call(RemoveVmRequest(1)) == RemoveVmResponse(RES_OK)

    assert unix_sim.request_counts == {
        MessageType.GET_BALLOON_STATS: 1,
        MessageType.REBALANCE_MEMORY: 1,
        MessageType.PREPARE_VM: 1,
        MessageType.FINISH_ADD_VM: 1,
        MessageType.REMOVE_VM: 1,
    }
    assert [type(r).__name__ for r in unix_sim.requests] == [
        "GetBalloonStatsRequest",
        "PrepareVmRequest",
        "FinishAddVmRequest",
        "RebalanceMemoryRequest",
        "RemoveVmRequest",
    ]
    assert unix_sim.requests[1] == PrepareVmRequest(MEM_1G, INIT_1G)


def test_tcp_port_zero_reports_the_real_port(dial: Dial) -> None:
    with Simulator(listen="tcp://127.0.0.1:0") as sim:
        assert sim.address.scheme == "tcp"
        assert sim.address.port != 0
        client = dial(sim.address)
        assert client.stats_ids(0, 1) == [0]


def test_a_second_connection_waits_until_the_first_hangs_up(
    unix_sim: Simulator, dial: Dial
) -> None:
    first = dial(unix_sim.address)
    first.start_vm()
    second = dial(unix_sim.address)  # connects into the listen backlog
    second.send(STATS_OF_CROS)

    assert not second.has_data()
    assert unix_sim.connections_accepted == 1
    # The first connection is still served while the second waits.
    assert first.stats_ids(0, 1) == [0, 1]

    first.close()
    answer = second.recv(STATS_OF_CROS)

    assert [entry.vm_id for entry in answer.all_stats] == [0]
    assert unix_sim.connections_accepted == 2


def test_hanging_up_drops_every_sibling_and_ids_stay_unique(
    unix_sim: Simulator, dial: Dial
) -> None:
    first = dial(unix_sim.address)
    assert [first.start_vm(), first.start_vm()] == [1, 2]
    assert first.call(PrepareVmRequest(MEM_1G, INIT_1G)).vm_id == 3
    first.close()
    assert unix_sim.wait_until(lambda: unix_sim.connections_closed == 1)

    second = dial(unix_sim.address)
    assert second.stats_ids(0, 1, 2, 3) == [0]
    assert second.call(PrepareVmRequest(MEM_1G, INIT_1G)).vm_id == 4
    assert unix_sim.with_model(lambda model: model.conservation_error_bytes()) == 0


def test_drop_connection_hangs_up_on_the_client(unix_sim: Simulator, dial: Dial) -> None:
    assert not unix_sim.drop_connection()
    client = dial(unix_sim.address)
    client.start_vm()

    assert unix_sim.drop_connection()

    assert client.hung_up()
    assert unix_sim.with_model(lambda model: model.siblings()) == {}
    assert unix_sim.with_model(lambda model: model.cros_balloon_bytes) == 0


def test_malformed_request_closes_the_connection_when_the_scenario_departs_from_mms(
    socket_dir: Path, dial: Dial
) -> None:
    scenario = Scenario(malformed_request="close")
    with Simulator(scenario, listen=f"unix://{socket_dir}/mms.sock") as sim:
        client = dial(sim.address)
        client.start_vm()
        client.sock.sendall(encode_frame(MessageType.PREPARE_VM, b'{"mem_size": "big"}'))

        assert client.hung_up()
        assert sim.wait_until(lambda: sim.connections_closed == 1)
        assert sim.malformed_requests == 1
        assert sim.with_model(lambda model: model.siblings()) == {}


def test_malformed_request_is_ignored_unanswered_like_mms_by_default(
    unix_sim: Simulator, dial: Dial
) -> None:
    """mms's handle_message fails, on_event logs it, and the next frame is read (issue 11)."""
    client = dial(unix_sim.address)
    client.start_vm()
    client.sock.sendall(encode_frame(9, b"{}"))
    client.sock.sendall(encode_frame(MessageType.REMOVE_VM, b""))
    client.sock.sendall(encode_frame(MessageType.REMOVE_VM, b'{"id": 1, "id": 1}'))
    client.sock.sendall(encode_frame(MessageType.PREPARE_VM, b'{"mem_size": "big"}'))

    assert unix_sim.wait_until(lambda: unix_sim.malformed_requests == 4)
    assert not client.has_data()
    # The stream carries on: the next request gets the next answer, and the VM is still there.
    assert client.stats_ids(0, 1) == [0, 1]
    assert unix_sim.connections_closed == 0


def test_runtime_settings_change_the_answers(unix_sim: Simulator, dial: Dial) -> None:
    client = dial(unix_sim.address)
    vm_id = client.start_vm()

    unix_sim.fail_stats(vm_id)
    assert client.stats_ids(0, vm_id) == [0]
    unix_sim.fail_stats(vm_id, failing=False)
    assert client.stats_ids(0, vm_id) == [0, vm_id]

    # The CrOS guest can spare nothing more: the next start falls short.
    unix_sim.set_vm_used_bytes(
        0,
        unix_sim.with_model(lambda m: m.cros_mem_size_bytes - m.guest_balloon_bytes(0)),
    )
    prepared = client.call(PrepareVmRequest(MEM_1G, INIT_1G))
    assert prepared.res == RES_ENOMEM
    assert prepared.shortfall_bytes == unix_sim.with_model(
        lambda m: m.pending_start().required_bytes  # type: ignore[union-attr]
    )
    assert client.call(RemoveVmRequest(prepared.vm_id)).res == RES_OK

    unix_sim.set_vm_used_bytes(0, 0)
    unix_sim.set_crosvm_connect_timeout(0)
    unix_sim.fail_crosvm_connect()
    prepared = client.call(PrepareVmRequest(MEM_1G, INIT_1G))
    assert client.call(FinishAddVmRequest(prepared.vm_id)).res == RES_EIO


def test_message_delay_and_latency_hold_the_answer_back(unix_sim: Simulator, dial: Dial) -> None:
    client = dial(unix_sim.address)
    unix_sim.set_latency(0.05)
    unix_sim.set_message_delay(MessageType.GET_BALLOON_STATS, 0.2)

    started = time.monotonic()
    client.call(STATS_OF_CROS)
    assert time.monotonic() - started >= 0.25


def test_remove_vm_blocks_before_the_memory_moves(unix_sim: Simulator, dial: Dial) -> None:
    client = dial(unix_sim.address)
    vm_id = client.start_vm()
    unix_sim.set_remove_vm_delay(1.0)

    started = time.monotonic()
    client.send(RemoveVmRequest(vm_id))
    assert unix_sim.wait_until(lambda: unix_sim.request_counts[MessageType.REMOVE_VM] == 1)
    # mms is waiting for the VM's crosvm to exit: the sibling still holds its memory.
    assert vm_id in unix_sim.with_model(lambda model: model.siblings())

    assert client.recv(RemoveVmRequest(vm_id)).res == RES_OK
    assert time.monotonic() - started >= 1.0
    assert unix_sim.with_model(lambda model: model.siblings()) == {}


def test_connect_failure_answers_only_after_the_connect_timeout(
    socket_dir: Path, dial: Dial
) -> None:
    scenario = Scenario(crosvm_connect_fail_count=1, crosvm_connect_timeout_s=0.3)
    with Simulator(scenario, listen=f"unix://{socket_dir}/mms.sock") as sim:
        client = dial(sim.address)
        prepared = client.call(PrepareVmRequest(MEM_1G, INIT_1G))
        started = time.monotonic()
        assert client.call(FinishAddVmRequest(prepared.vm_id)).res == RES_EIO
        assert time.monotonic() - started >= 0.3


def test_stop_hangs_up_and_removes_the_socket_file(socket_dir: Path, dial: Dial) -> None:
    path = socket_dir / "mms.sock"
    sim = Simulator(listen=f"unix://{path}").start()
    client = dial(sim.address)
    client.start_vm()
    waiting = dial(sim.address)

    sim.stop()

    assert client.hung_up()
    assert waiting.hung_up()
    assert not path.exists()
    assert sim.connections_closed == 1
    sim.stop()  # idempotent


def test_request_log_is_bounded_and_counts_are_not(socket_dir: Path, dial: Dial) -> None:
    with Simulator(listen=f"unix://{socket_dir}/mms.sock", request_log_limit=2) as sim:
        client = dial(sim.address)
        for vm_id in (1, 2, 3):
            client.call(GetBalloonStatsRequest((vm_id,)))
        assert sim.requests == [GetBalloonStatsRequest((2,)), GetBalloonStatsRequest((3,))]
        assert sim.request_counts[MessageType.GET_BALLOON_STATS] == 3


def test_inherited_listening_socket(socket_dir: Path, dial: Dial) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(socket_dir / "inherited.sock"))
    listener.listen(4)
    fd = listener.detach()

    with Simulator(listen=f"fd://{fd}") as sim:
        assert sim.address == MmsAddress("unix", path=str(socket_dir / "inherited.sock"))
        client = dial(sim.address)
        assert client.stats_ids(0) == [0]


def test_inherited_connected_socket_serves_one_session() -> None:
    ours, theirs = socket.socketpair()
    fd = theirs.detach()

    with Simulator(listen=f"fd://{fd}") as sim, ours:
        client = RawClient.over(ours)
        assert client.start_vm() == 1
        assert client.stats_ids(0, 1) == [0, 1]
        ours.shutdown(socket.SHUT_RDWR)
        assert sim.wait_until(lambda: sim.connections_closed == 1)
        assert sim.with_model(lambda model: model.siblings()) == {}
        assert not sim.connected
