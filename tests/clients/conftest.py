"""A real server on the embedded simulator per test, and the two clients under test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer

from .drivers import FLAVOURS, Flavour


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> Flavour:
    """Each test that takes it runs once through each client."""
    flavour: Flavour = request.param
    return flavour
