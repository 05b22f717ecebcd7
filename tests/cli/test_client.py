"""manatee_grpc.Client end to end against a real server: every RPC, errors, and launch_vm."""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from api.helpers import wait_until

import manatee_grpc
from manatee_grpc import Client, FieldViolation, ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc.core._errors import ServerShuttingDownError
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.server._status import to_status

from .conftest import simulator, vm_ids

MIB = 1024 * 1024
HUGE_BYTES = 7 * 1024 * MIB  # more than the simulated CrOS guest can ever give


def test_client_and_its_errors_are_public() -> None:
    for name in ("Client", "ManateeRpcError", "FieldViolation"):
        assert name in manatee_grpc.__all__
        assert getattr(manatee_grpc, name) is getattr(manatee_grpc.client, name)


def test_health_and_list_vms(client: Client) -> None:
    assert client.health() == "SERVING"
    assert client.health("") == "SERVING"
    listed = client.list_vms()
    assert listed.session != ""
    assert [(vm.vm_id, vm.cros_guest, vm.state) for vm in listed.vms] == [
        (0, True, pb.VM_STATE_RUNNING)
    ]


def test_prepare_finish_stats_rebalance_remove(client: Client) -> None:
    prepared = client.prepare_vm(512 * MIB, init_mem_size_bytes=256 * MIB)
    assert (prepared.vm_id, prepared.reserved, prepared.shortfall_bytes) == (1, True, 0)
    assert prepared.balloon_control_path

    finished = client.finish_add_vm(prepared.vm_id)
    assert (finished.vm.vm_id, finished.vm.state) == (1, pb.VM_STATE_RUNNING)
    assert finished.vm.init_mem_size_bytes == 256 * MIB

    stats = client.get_balloon_stats([1, 7])
    assert [s.vm_id for s in stats.stats] == [1]
    assert list(stats.missing_vm_ids) == [7]
    balloon_before = stats.stats[0].balloon_actual_bytes
    assert balloon_before == 256 * MIB  # mem_size - init_mem_size starts in the balloon

    moved = client.rebalance_memory({1: -64 * MIB})
    assert [(d.vm_id, d.delta_bytes) for d in moved.requested_deltas] == [
        (1, -64 * MIB),
        (0, 64 * MIB),
    ]
    assert moved.fully_applied
    assert client.get_balloon_stats([1]).stats[0].balloon_actual_bytes == 192 * MIB

    client.remove_vm(1)
    assert vm_ids(client) == [0]


def test_watch_balloon_stats_streams_snapshots_until_closed(client: Client) -> None:
    watch = client.watch_balloon_stats([0], interval_s=0.1)
    first_two = list(itertools.islice(watch, 2))
    watch.close()  # type: ignore[attr-defined]

    assert [event.WhichOneof("event") for event in first_two] == ["snapshot", "snapshot"]
    assert [s.vm_id for s in first_two[0].snapshot.stats] == [0]


def test_watch_with_a_bad_interval_raises_invalid_argument(client: Client) -> None:
    with pytest.raises(ManateeRpcError) as caught:
        next(client.watch_balloon_stats(interval_s=0.01))

    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in caught.value.field_violations] == ["interval"]


def test_unknown_vm_is_not_found_with_reason_and_metadata(client: Client) -> None:
    with pytest.raises(ManateeRpcError) as caught:
        client.remove_vm(42)

    error = caught.value
    assert error.code == grpc.StatusCode.NOT_FOUND
    assert (error.reason, error.domain) == ("VM_NOT_FOUND", "manatee.memory.v1")
    assert error.metadata["vmId"] == "42"
    assert error.field_violations == ()
    assert error.retry_delay_s is None
    assert str(error).startswith("NOT_FOUND (VM_NOT_FOUND): ")
    assert isinstance(error.__cause__, grpc.RpcError)


def test_bad_size_is_invalid_argument_with_field_violations(client: Client) -> None:
    with pytest.raises(ManateeRpcError) as caught:
        client.prepare_vm(0)

    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert [v.field for v in error.field_violations] == ["mem_size_bytes"]
    assert isinstance(error.field_violations[0], FieldViolation)
    assert error.field_violations[0].description


def test_unreachable_server_is_unavailable() -> None:
    with (
        Client("unix:///nonexistent/manatee.sock", timeout_s=5.0) as client,
        pytest.raises(ManateeRpcError) as caught,
    ):
        client.list_vms()

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == ""


class _FailedCall(grpc.RpcError, grpc.Call):
    """A finished call carrying the status the server would send, for details no live server
    produces on demand (RetryInfo)."""

    def __init__(self, status: grpc.Status) -> None:
        self._status = status

    def code(self) -> grpc.StatusCode:
        return self._status.code

    def details(self) -> str:
        return self._status.details

    def trailing_metadata(self) -> Any:  # grpc-stubs' metadatum type is private
        return self._status.trailing_metadata

    def initial_metadata(self) -> Any:
        return ()

    def is_active(self) -> bool:
        return False

    def time_remaining(self) -> float:
        return 0.0

    def cancel(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def test_retry_info_becomes_retry_delay_s() -> None:
    status = to_status(ServerShuttingDownError("the server is shutting down"))

    error = ManateeRpcError.from_rpc_error(_FailedCall(status))

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "SHUTTING_DOWN")
    assert error.retry_delay_s == 1.0
    assert error.message == "the server is shutting down"


# --- launch_vm -----------------------------------------------------------------------------------


def test_launch_vm_starts_the_vm_and_returns_it(client: Client) -> None:
    started: list[tuple[int, str]] = []
    progress: list[tuple[int, int]] = []

    def start_vm(vm_id: int, balloon_control_path: str) -> bool:
        started.append((vm_id, balloon_control_path))
        return True

    vm = client.launch_vm(
        512 * MIB,
        init_mem_size_bytes=256 * MIB,
        start_vm=start_vm,
        stop_vm=lambda vm_id: pytest.fail("stop_vm must not be called"),
        on_progress=lambda attempt, shortfall: progress.append((attempt, shortfall)),
        timeout_s=30.0,
    )

    assert (vm.vm_id, vm.state, vm.mem_size_bytes) == (1, pb.VM_STATE_RUNNING, 512 * MIB)
    assert vm.init_mem_size_bytes == 256 * MIB
    assert [vm_id for vm_id, _ in started] == [1]
    assert started[0][1].endswith(".sock")
    assert progress == []  # progress is only for attempts that fell short
    assert vm_ids(client) == [0, 1]


def test_launch_vm_tells_on_queued_while_another_start_is_pending(client: Client) -> None:
    held = client.prepare_vm(512 * MIB)  # a bare start holds the device's one pending start
    queued: list[int] = []
    told = threading.Event()

    def on_queued(position: int) -> None:
        queued.append(position)
        told.set()

    with ThreadPoolExecutor(max_workers=1) as pool:
        launched = pool.submit(
            client.launch_vm,
            512 * MIB,
            start_vm=lambda vm_id, path: True,
            stop_vm=lambda vm_id: None,
            on_queued=on_queued,
            timeout_s=30.0,
        )
        assert told.wait(timeout=30.0), "the launch was never told it queued"
        assert not launched.done()
        client.finish_add_vm(held.vm_id)  # frees the start: the launch goes on
        vm = launched.result(timeout=30.0)
    assert queued == [1]
    assert vm.vm_id == held.vm_id + 1
    # Without on_queued the event is simply not reported (the launch behind nobody never queues).
    assert client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None).vm_id


def test_launch_vm_start_failure_is_failed_precondition_and_releases(client: Client) -> None:
    with pytest.raises(ManateeRpcError) as caught:
        client.launch_vm(512 * MIB, start_vm=lambda vm_id, path: False, stop_vm=lambda vm_id: None)

    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.reason == "VM_START_FAILED"
    wait_until(lambda: vm_ids(client) == [0], "the reservation was released")


def test_launch_vm_reports_progress_then_resource_exhausted(client: Client) -> None:
    progress: list[tuple[int, int]] = []

    with pytest.raises(ManateeRpcError) as caught:
        client.launch_vm(
            HUGE_BYTES,
            init_mem_size_bytes=HUGE_BYTES,
            start_vm=lambda vm_id, path: pytest.fail("nothing can be reserved"),
            stop_vm=lambda vm_id: None,
            on_progress=lambda attempt, shortfall: progress.append((attempt, shortfall)),
        )

    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "MMS_ENOMEM",
    )
    assert [attempt for attempt, _ in progress] == [1, 2, 3, 4, 5]
    assert all(shortfall > 0 for _, shortfall in progress)
    assert caught.value.metadata["shortfallBytes"] == str(progress[-1][1])


def test_launch_vm_stops_the_vm_when_the_server_asks(server: ManateeServer, client: Client) -> None:
    # FinishAddVm answers -5 (crosvm never connected), after a short wait instead of mms's 10 s.
    simulator(server).set_crosvm_connect_timeout(0.05)
    simulator(server).fail_crosvm_connect()
    stopped: list[int] = []

    with pytest.raises(ManateeRpcError) as caught:
        client.launch_vm(512 * MIB, start_vm=lambda vm_id, path: True, stop_vm=stopped.append)

    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MMS_EIO",
    )
    assert stopped == [1]
    wait_until(lambda: vm_ids(client) == [0], "the VM was removed")


def test_launch_vm_callback_error_cancels_the_launch(client: Client) -> None:
    def start_vm(vm_id: int, balloon_control_path: str) -> bool:
        raise OSError("crosvm binary missing")

    with pytest.raises(OSError, match="crosvm binary missing"):
        client.launch_vm(512 * MIB, start_vm=start_vm, stop_vm=lambda vm_id: None)

    wait_until(lambda: vm_ids(client) == [0], "the reservation was released")
    # The device's one pending start is free again.
    assert (
        client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None).vm_id == 2
    )


def test_client_calls_carry_a_request_id_and_the_session_of_their_ids(
    server: ManateeServer, client: Client
) -> None:
    vm = client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None)
    assert vm.session == client.list_vms().session != ""
    sent = simulator(server).request_counts[MessageType.REBALANCE_MEMORY]
    # Each call gets its own request id: two calls are two rebalances...
    client.rebalance_memory({vm.vm_id: -4 * MIB}, session=vm.session)
    client.rebalance_memory({vm.vm_id: -4 * MIB}, session=vm.session)
    assert simulator(server).request_counts[MessageType.REBALANCE_MEMORY] == sent + 2
    # ... and a retry with the id of a call whose outcome was missed is not a third.
    first = client.rebalance_memory({vm.vm_id: -4 * MIB}, request_id="retry-me")
    again = client.rebalance_memory({vm.vm_id: -4 * MIB}, request_id="retry-me")
    assert again == first
    assert simulator(server).request_counts[MessageType.REBALANCE_MEMORY] == sent + 3
    # A failure says which id to retry with.
    with pytest.raises(ManateeRpcError) as refused:
        client.rebalance_memory({vm.vm_id: 4 * MIB}, request_id="retry-me")  # another request
    assert (refused.value.code, refused.value.request_id) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "retry-me",
    )

    assert simulator(server).drop_connection()
    wait_until(lambda: client.list_vms().session != vm.session, "a new session")
    with pytest.raises(ManateeRpcError) as raised:
        client.remove_vm(vm.vm_id, session=vm.session)
    assert (raised.value.code, raised.value.reason) == (grpc.StatusCode.NOT_FOUND, "SESSION_RESET")
