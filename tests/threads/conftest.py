"""A real server on the embedded simulator, as in tests/api."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)
