"""A real server (embedded simulator) per test, and helpers to drive the Client and the CLI."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from api.conftest import start_server

from manatee_grpc import Client, ManateeServer
from manatee_grpc.sim import Simulator

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 60.0


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def client(server: ManateeServer) -> Iterator[Client]:
    with Client(server.address) as client:
        yield client


def simulator(server: ManateeServer) -> Simulator:
    assert server.simulator is not None, "these tests need the embedded simulator"
    return server.simulator


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """``python -m manatee_grpc ARGS`` as an operator would run it."""
    return subprocess.run(
        [sys.executable, "-m", "manatee_grpc", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        cwd=REPO_ROOT,
    )


def vm_ids(client: Client) -> list[int]:
    return [vm.vm_id for vm in client.list_vms().vms]
