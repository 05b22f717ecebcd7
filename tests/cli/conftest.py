"""A real server (embedded simulator) per test, and helpers to drive the Client and the CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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


def wait_until(predicate: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Poll ``predicate`` quickly until it holds; a condition wait with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {what}")
        time.sleep(0.005)


def vm_ids(client: Client) -> list[int]:
    return [vm.vm_id for vm in client.list_vms().vms]
