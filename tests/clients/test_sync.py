"""What only the synchronous client has to show; ``test_table.py`` runs every call through it,
and ``test_both.py`` the scenarios both clients share."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from api.helpers import simulator, wait_until

import manatee_grpc
from manatee_grpc import Client, ManateeRpcError, ManateeServer
from manatee_grpc.core._errors import ServerShuttingDownError
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.server._status import to_status

MIB = 1024 * 1024


@pytest.fixture
def client(server: ManateeServer) -> Iterator[Client]:
    with Client(server.address) as client:
        yield client


def test_client_and_its_errors_are_public() -> None:
    for name in ("Client", "ManateeRpcError", "FieldViolation"):
        assert name in manatee_grpc.__all__
        assert getattr(manatee_grpc, name) is getattr(manatee_grpc.client, name)


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
