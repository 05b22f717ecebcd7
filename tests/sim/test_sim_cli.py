"""Tests of ``manatee-grpc sim`` (``python -m manatee_grpc.sim``): serve, answer, stop cleanly.

The happy path runs in a subprocess so SIGTERM reaches a real main thread.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from manatee_grpc.mms import _transport
from manatee_grpc.mms._messages import GetBalloonStatsRequest
from manatee_grpc.mms._transport import MmsAddress
from manatee_grpc.mms._wire import (
    HEADER_SIZE_BYTES,
    decode_header,
    decode_response,
    encode_request,
)
from manatee_grpc.sim import main

STARTUP_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="mms-", dir="/tmp") as path:
        yield Path(path)


def _wait_for_line(process: subprocess.Popen[str], fragment: str) -> str:
    """Read stderr lines until one contains ``fragment`` (fails at the deadline)."""
    assert process.stderr is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    seen = []
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([process.stderr], [], [], remaining)
        if not readable:
            break
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if fragment in line:
            return line
    raise AssertionError(f"{fragment!r} not logged; stderr so far: {''.join(seen)}")


def _exit_code(process: subprocess.Popen[str]) -> int:
    """The process's exit code; if it does not exit in time, fail with its threads' stacks."""
    try:
        return process.wait(timeout=EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler dumps every thread's stack
        process.wait(timeout=EXIT_TIMEOUT_S)
        assert process.stderr is not None
        raise AssertionError(
            f"the simulator did not exit within {EXIT_TIMEOUT_S} s of SIGTERM; its stderr since "
            f"it started listening:\n{process.stderr.read()[-8000:]}"
        ) from None


def _signals_blocked_per_thread(pid: int) -> dict[int, set[int]]:
    """Each of the process's threads (by tid) and the signals it blocks (Linux /proc)."""
    blocked = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = (task / "status").read_text()
        mask = int(
            next(ln for ln in status.splitlines() if ln.startswith("SigBlk:")).split()[1], 16
        )
        blocked[int(task.name)] = {signum for signum in range(1, 65) if mask >> (signum - 1) & 1}
    return blocked


def test_cli_serves_the_scenario_and_stops_on_sigterm(socket_dir: Path) -> None:
    path = socket_dir / "mms.sock"
    scenario = socket_dir / "scenario.toml"
    scenario.write_text('cros_mem_size_bytes = "4GiB"\n')
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "manatee_grpc.sim"),
            *("--listen", f"unix://{path}", "--scenario", str(scenario)),
        ],
        stderr=subprocess.PIPE,
        text=True,
        # faulthandler: a simulator that does not exit is sent SIGABRT and prints its threads.
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    try:
        line = _wait_for_line(process, "listening on")
        assert f"unix://{path}" in line

        sock = _transport.connect(MmsAddress("unix", path=str(path)), timeout_s=5.0)
        sock.settimeout(10.0)
        request = GetBalloonStatsRequest((0,))
        sock.sendall(encode_request(request))
        header = decode_header(_transport.recv_exactly(sock, HEADER_SIZE_BYTES))
        response = decode_response(request, _transport.recv_exactly(sock, header.body_len_bytes))
        # The scenario's 4 GiB CrOS guest, less its 2 GiB in use and mms's 32 MiB.
        assert response.all_stats[0].stats.total_memory == 4 * 1024**3 - 32 * 1024**2
        sock.close()

        # The kernel hands a process signal to any thread that does not block it; one that
        # reached the serving thread used to go unheard by the main thread (the simulator then
        # never stopped). Only the main thread, waiting in sigwait() (which unblocks what it
        # waits for), may take the stop signals.
        # Polled: the main thread may not have reached sigwait() yet on a busy machine.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            blocked = _signals_blocked_per_thread(process.pid)
            takers = {tid for tid, signals in blocked.items() if not signals >= STOP_SIGNALS}
            if (len(blocked) >= 2 and takers == {process.pid}) or time.monotonic() > deadline:
                break
            time.sleep(0.002)
        assert len(blocked) >= 2, blocked  # the main thread and the serving thread
        assert takers == {process.pid}, f"threads that can take SIGINT or SIGTERM: {blocked}"

        process.send_signal(signal.SIGTERM)
        assert _exit_code(process) == 0
        assert not path.exists()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stderr is not None
        process.stderr.close()


def test_cli_refuses_a_bad_scenario_or_address(socket_dir: Path) -> None:
    bad = socket_dir / "bad.toml"
    bad.write_text("no_such_key = 1\n")
    assert main(["--listen", f"unix://{socket_dir}/mms.sock", "--scenario", str(bad)]) == 2
    assert main(["--listen", "carrier-pigeon://coop"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
