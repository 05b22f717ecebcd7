"""A real manatee-grpc server on a port-0 loopback socket, backed by the embedded simulator."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from manatee_grpc import ManateeServer, ServerConfig
from manatee_grpc import memory_service_pb2_grpc as pb_grpc

# Short launch back-off so tests that exhaust the reservation attempts stay quick.
FAST_ATTEMPT_DELAYS_S = (0.0, 0.01, 0.01, 0.01, 0.01)


def start_server(**overrides: object) -> ManateeServer:
    settings: dict[str, object] = {
        "listen": "127.0.0.1:0",
        "launch_attempt_delays_s": FAST_ATTEMPT_DELAYS_S,
        "grace_s": 2.0,
        "mms_backoff_initial_s": 0.01,
        "mms_backoff_max_s": 0.05,
    }
    settings.update(overrides)
    server = ManateeServer(ServerConfig(**settings)).start()  # type: ignore[arg-type]
    assert server.connection is not None
    assert server.connection.wait_connected(10.0), "the server never connected to mms"
    return server


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def channel(server: ManateeServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.MemoryServiceStub:
    return pb_grpc.MemoryServiceStub(channel)
