"""Servers for the fault tests: on a killable mms, or on the embedded simulator."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2_grpc as pb_grpc

from .helpers import KillableMms


@pytest.fixture
def mms() -> Iterator[KillableMms]:
    mms = KillableMms()
    yield mms
    mms.close()


@pytest.fixture
def server(mms: KillableMms) -> Iterator[ManateeServer]:
    """A server on the killable mms (small reconnect backoff: 10 ms doubling up to 50 ms)."""
    server = start_server(mms=mms.address)
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def channel(server: ManateeServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.MemoryServiceStub:
    return pb_grpc.MemoryServiceStub(channel)
