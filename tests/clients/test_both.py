"""What both clients share beyond the table: the same error class and defaults, the same
methods with the same arguments, callbacks that raise, closing, channels they are given, and
the transports (unix socket, mutual TLS); each scenario runs through both."""

from __future__ import annotations

import asyncio
import inspect
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from api.conftest import start_server
from api.helpers import wait_until
from google.rpc import code_pb2, error_details_pb2, status_pb2
from security.conftest import make_pki

import manatee_grpc
from manatee_grpc import ManateeRpcError, ManateeServer, aio, client
from manatee_grpc import memory_service_pb2 as pb

from . import drivers
from .cases import CASES, Case, Given
from .drivers import Flavour

MIB = 1024 * 1024
HOURLY_S = 3600.0  # a watch that says nothing more after its first snapshot


def _vm_ids(server: ManateeServer) -> list[int]:
    listed = drivers.call("sync", server.address, "list_vms")
    return [vm.vm_id for vm in listed.vms]


def test_both_clients_raise_the_one_error_class_and_share_their_defaults() -> None:
    for name in aio.__all__:
        if name != "Client":
            assert getattr(aio, name) is getattr(client, name), name
    assert aio.ManateeRpcError is manatee_grpc.ManateeRpcError
    assert aio.FieldViolation is manatee_grpc.FieldViolation
    assert set(aio.__all__) == set(client.__all__)


# Where the asyncio client's annotations differ, and how: callbacks may be coroutine functions,
# the watch is an async iterator, the channel a grpc.aio one.
_AIO_ANNOTATIONS = {
    ("__init__", "channel"): "grpc.aio.Channel | None",
    ("launch_vm", "start_vm"): "Callable[[int, str], bool | Awaitable[bool]]",
    ("launch_vm", "stop_vm"): "Callable[[int], Awaitable[None] | None]",
    ("launch_vm", "on_progress"): "Callable[[int, int], Awaitable[None] | None] | None",
    ("launch_vm", "on_queued"): "Callable[[int], Awaitable[None] | None] | None",
    ("watch_balloon_stats", "return"): "AsyncGenerator[pb.WatchBalloonStatsResponse, None]",
    ("watch_events", "return"): "AsyncGenerator[pb.WatchEventsResponse, None]",
}


def _public_methods(cls: type) -> dict[str, Callable[..., Any]]:
    return {
        name: member
        for name, member in vars(cls).items()
        if callable(member) and (name == "__init__" or not name.startswith("_"))
    }


def test_both_clients_have_the_same_methods_arguments_defaults_and_results() -> None:
    sync_methods = _public_methods(client.Client)
    aio_methods = _public_methods(aio.Client)
    assert sorted(aio_methods) == sorted(sync_methods)
    for name, sync_method in sync_methods.items():
        sync_sig = inspect.signature(sync_method)
        aio_sig = inspect.signature(aio_methods[name])
        assert [(p.name, p.kind, p.default) for p in aio_sig.parameters.values()] == [
            (p.name, p.kind, p.default) for p in sync_sig.parameters.values()
        ], name
        for parameter in sync_sig.parameters.values():
            assert aio_sig.parameters[parameter.name].annotation == _AIO_ANNOTATIONS.get(
                (name, parameter.name), parameter.annotation
            ), (name, parameter.name)
        assert aio_sig.return_annotation == _AIO_ANNOTATIONS.get(
            (name, "return"), sync_sig.return_annotation
        ), name
        # Every call is a coroutine but the watches, which are async iterators at once.
        is_coroutine = inspect.iscoroutinefunction(aio_methods[name])
        assert is_coroutine == (name not in {"__init__", "watch_balloon_stats", "watch_events"}), (
            name
        )


def test_every_method_and_keyword_of_the_clients_has_a_case_in_the_table() -> None:
    """The table (cases.py) runs through both clients: each method, and each keyword a newer
    feature added (validate_only, on_queued, kinds), is exercised there at least once."""
    methods = set(_public_methods(client.Client)) - {"__init__", "close"}
    in_table = {case.method for case in CASES}
    assert methods <= in_table, f"no case for {sorted(methods - in_table)}"
    used = {(case.method, name) for case in CASES for name in _keywords(case)}
    for keyword in [
        ("rebalance_memory", "validate_only"),
        ("launch_vm", "on_queued"),
        ("watch_events", "kinds"),
        ("watch_events", "replay_last"),
    ]:
        assert keyword in used, f"no case passes {keyword}"


def _keywords(case: Case) -> set[str]:
    given = Given(server=None, stub=None)  # type: ignore[arg-type]
    try:
        return set(case.args(given).kwargs)
    except AttributeError:  # an argument builder that reads the server
        return set()


def test_a_callback_that_raises_cancels_the_launch_and_releases_it(
    server: ManateeServer, flavour: Flavour
) -> None:
    def start_vm(vm_id: int, balloon_control_path: str) -> bool:
        raise OSError("crosvm binary missing")

    with pytest.raises(OSError, match="crosvm binary missing"):
        drivers.call(
            flavour,
            server.address,
            "launch_vm",
            (512 * MIB,),
            {"start_vm": start_vm, "stop_vm": lambda vm_id: None},
        )

    wait_until(lambda: _vm_ids(server) == [0], "the reservation was released")
    # The device's one pending start is free again.
    launched = drivers.call(
        flavour,
        server.address,
        "launch_vm",
        (512 * MIB,),
        {"start_vm": lambda vm_id, path: True, "stop_vm": lambda vm_id: None},
    )
    assert launched.vm_id == 2


def _sync_watch_after_close(address: str) -> tuple[pb.WatchBalloonStatsResponse, Exception]:
    with manatee_grpc.Client(address) as sync_client:
        watch = sync_client.watch_balloon_stats([0], interval_s=HOURLY_S)
        first = next(watch)
    with pytest.raises(ManateeRpcError) as caught:
        next(watch)
    return first, caught.value


async def _aio_watch_after_close(address: str) -> tuple[pb.WatchBalloonStatsResponse, Exception]:
    async with aio.Client(address) as aio_client:
        watch = aio_client.watch_balloon_stats([0], interval_s=HOURLY_S)
        first = await anext(watch)
    with pytest.raises(ManateeRpcError) as caught:
        await anext(watch)
    return first, caught.value


def test_closing_the_client_ends_its_open_watch_with_cancelled(
    server: ManateeServer, flavour: Flavour
) -> None:
    if flavour == "sync":
        first, error = _sync_watch_after_close(server.address)
    else:
        first, error = asyncio.run(_aio_watch_after_close(server.address))

    assert first.WhichOneof("event") == "snapshot"
    assert isinstance(error, ManateeRpcError)
    assert error.code == grpc.StatusCode.CANCELLED


async def _aio_leaves_a_given_channel_open(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        async with aio.Client(address, channel=channel) as first:
            sessions = [(await first.list_vms()).session]
        async with aio.Client(address, channel=channel) as second:
            sessions.append((await second.list_vms()).session)
    return sessions


def test_a_client_given_a_channel_leaves_it_open(server: ManateeServer, flavour: Flavour) -> None:
    if flavour == "sync":
        with grpc.insecure_channel(server.address) as channel:
            with manatee_grpc.Client(server.address, channel=channel) as first:
                sessions = [first.list_vms().session]
            with manatee_grpc.Client(server.address, channel=channel) as second:
                sessions.append(second.list_vms().session)
    else:
        sessions = asyncio.run(_aio_leaves_a_given_channel_open(server.address))

    assert len(sessions) == 2 and sessions[0] == sessions[1] != ""


@pytest.fixture
def unix_server() -> Iterator[ManateeServer]:
    # A short directory: a unix socket path must fit in 107 bytes, which tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="mg-cl-") as directory:
        server = start_server(listen=f"unix://{directory}/m.sock")
        yield server
        server.stop(grace_s=1.0)


def test_both_reach_a_unix_socket_server(unix_server: ManateeServer, flavour: Flavour) -> None:
    assert unix_server.address.startswith("unix://")
    assert drivers.call(flavour, unix_server.address, "health") == "SERVING"


def test_both_speak_mutual_tls_with_the_credentials_given(tmp_path: Path, flavour: Flavour) -> None:
    pki = make_pki(tmp_path)
    server = start_server(
        tls_cert_path=str(pki.server.cert_path),
        tls_key_path=str(pki.server.key_path),
        tls_client_ca_path=str(pki.ca_path),
    )
    try:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=pki.ca_pem,
            private_key=pki.client.key_pem,
            certificate_chain=pki.client.cert_pem,
        )
        listed = drivers.call(
            flavour, server.address, "list_vms", client_kwargs={"credentials": credentials}
        )
        assert listed.session != ""
        # Without credentials the client speaks plaintext, which the TLS port refuses.
        with pytest.raises(ManateeRpcError) as caught:
            drivers.call(flavour, server.address, "list_vms", client_kwargs={"timeout_s": 5.0})
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace_s=1.0)


def test_an_asyncio_grpc_error_is_decoded_like_a_sync_one() -> None:
    # The asyncio client's errors are grpc.aio.AioRpcError snapshots, not grpc.Call objects.
    retry = error_details_pb2.RetryInfo()
    retry.retry_delay.FromSeconds(2)
    info = error_details_pb2.ErrorInfo(reason="MMS_HUNG", domain="manatee.memory.v1")
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message="mms is silent")
    for detail in (info, retry):
        status.details.add().Pack(detail)
    trailing = grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString()))
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        trailing,
        details="mms is silent",
    )

    decoded = ManateeRpcError.from_rpc_error(error)

    assert (decoded.code, decoded.reason, decoded.domain) == (
        grpc.StatusCode.UNAVAILABLE,
        "MMS_HUNG",
        "manatee.memory.v1",
    )
    assert (decoded.message, decoded.retry_delay_s) == ("mms is silent", 2.0)
    assert decoded.field_violations == ()
