"""The launchers in examples/ (the sync one and its asyncio twin) run against a real server and
clean up after themselves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from manatee_grpc import ManateeServer

from . import drivers

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_TIMEOUT_S = 60.0


@pytest.mark.parametrize("example", ["launch_service.py", "launch_service_aio.py"])
def test_the_launch_service_example(server: ManateeServer, example: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / example),
         "--server", server.address, "--mem-mib", "512"],
        capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # The first attempt reserved everything: no attempt fell short, so no progress line.
    assert lines[0].startswith("start crosvm for VM 1 with --balloon-control ")
    assert lines[1:] == [
        "VM 1 runs with 512 MiB",
        "VMs now: [0, 1]",
        "stop crosvm for VM 1",
        "VM 1 removed",
    ]
    listed = drivers.call("sync", server.address, "list_vms")
    assert [vm.vm_id for vm in listed.vms] == [0]
