"""The real command: ``python -m manatee_grpc serve`` starts, serves, and shuts down cleanly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB

from .helpers import health_status


def wait_serving(target: str, process: subprocess.Popen[str], timeout_s: float = 20.0) -> None:
    """Poll health until SERVING (a bounded condition wait), failing fast if the process dies."""
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        while time.monotonic() < end:
            assert process.poll() is None, process.communicate()[1]
            try:
                if health_status(channel) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise AssertionError("the server never became SERVING")


@pytest.fixture
def served() -> Iterator[tuple[str, subprocess.Popen[str]]]:
    with tempfile.TemporaryDirectory() as tmp:
        target = f"unix://{Path(tmp) / 'manatee.sock'}"
        process = subprocess.Popen(
            [sys.executable, "-m", "manatee_grpc", "serve", "--listen", target, "--grace", "5"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            wait_serving(target, process)
            yield target, process
        finally:
            if process.poll() is None:
                process.kill()
            process.communicate()


def test_serve_says_it_runs_a_simulation_and_exits_zero_on_sigterm(
    served: tuple[str, subprocess.Popen[str]],
) -> None:
    target, process = served
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
        assert prepared.reserved
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "SIMULATOR" in stderr
    # The pending reservation was released before the mms link closed.
    assert "removing VM 1: the server is shutting down" in stderr
    assert "manatee-grpc stopped" in stderr


def test_sigint_stops_too(served: tuple[str, subprocess.Popen[str]]) -> None:
    _, process = served
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert "received SIGINT" in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mms", "bogus://x"], "accepted forms: vsock://CID:PORT"),
        (["--mms-watchdog", "NOPE=1"], "--mms-watchdog 'NOPE=1': expected TYPE=SECONDS"),
        (["--mms-watchdog", "REMOVE_VM=0"], "SECONDS must be positive"),
        (["--launch-attempt-delays", "0,x"], "--launch-attempt-delays"),
    ],
)
def test_bad_settings_exit_2_with_a_message(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "manatee_grpc", "serve", "--listen", "127.0.0.1:0", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
