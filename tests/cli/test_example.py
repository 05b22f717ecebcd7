"""examples/launch_service.py runs against a real server and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

from manatee_grpc import Client, ManateeServer

from .conftest import CLI_TIMEOUT_S, REPO_ROOT, vm_ids


def test_launch_service_example(server: ManateeServer, client: Client) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "examples" / "launch_service.py"),
         "--server", server.address, "--mem-mib", "512"],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
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
    assert vm_ids(client) == [0]
