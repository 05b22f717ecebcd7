"""Each client subcommand end to end: ``python -m manatee_grpc ...`` against a real server."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from api.conftest import start_server
from api.helpers import session_id, wait_until
from faults.helpers import KillableMms
from faults.wrapped_cros import ISSUE_DEVICE, WRAPPED_AFTER_HANG_UP, wrap_the_cros_balloon

from manatee_grpc import Client, ManateeServer
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Simulator

from .conftest import CLI_TIMEOUT_S, REPO_ROOT, run_cli, simulator, vm_ids

MIB = 1024 * 1024


def test_health(server: ManateeServer) -> None:
    result = run_cli("health", "--server", server.address)
    assert (result.returncode, result.stdout) == (0, "SERVING\n")

    result = run_cli("health", "--json", "--server", server.address)
    assert json.loads(result.stdout) == {
        "service": "manatee.memory.v1.MemoryService",
        "status": "SERVING",
    }


def test_vms_table_and_json(server: ManateeServer, client: Client) -> None:
    client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None)

    table = run_cli("vms", "--server", server.address)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "MEMORY", "INITIAL", "SINCE", "NOTE"]
    assert lines[1].split()[:4] == ["0", "running", "-", "-"]
    assert lines[1].endswith("cros guest")
    assert lines[2].split()[:6] == ["1", "running", "512.0", "MiB", "512.0", "MiB"]
    # Aligned: every column starts at the same offset on every line.
    assert lines[0].index("STATE") == lines[1].index("running") == lines[2].index("running")

    data = json.loads(run_cli("vms", "--json", "--server", server.address).stdout)
    assert data["session"] == session_id(server, 1)
    assert lines[-1] == f"session {data['session']}"
    assert [sorted(vm) for vm in data["vms"]] == [
        [
            "cros_guest",
            "init_mem_size_bytes",
            "mem_size_bytes",
            "session",
            "since",
            "state",
            "vm_id",
        ]
    ] * 2
    assert data["vms"][1] | {"since": None} == {
        "vm_id": 1,
        "state": "running",
        "mem_size_bytes": 512 * MIB,
        "init_mem_size_bytes": 512 * MIB,
        "cros_guest": False,
        "since": None,
        "session": data["session"],
    }


def test_stats_table_json_and_missing_ids(server: ManateeServer) -> None:
    table = run_cli("stats", "0", "7", "--server", server.address)
    assert table.returncode == 0, table.stderr
    header, row, missing = table.stdout.splitlines()
    assert header.split()[:4] == ["VM", "BALLOON", "TOTAL", "AVAILABLE"]
    assert row.split()[0] == "0"
    assert "GiB" in row  # sizes are humanised
    assert missing == "no statistics for VM 7"

    data = json.loads(run_cli("stats", "--json", "--server", server.address).stdout)
    assert sorted(data) == ["missing_vm_ids", "read_time", "session", "stats", "unreadable_vms"]
    assert data["missing_vm_ids"] == []
    assert data["unreadable_vms"] == []
    (cros,) = data["stats"]
    assert cros["vm_id"] == 0
    assert isinstance(cros["balloon_actual_bytes"], int)
    assert len(cros) == 14  # vm_id and all thirteen statistics, absent ones as null


def test_stats_says_why_a_vm_is_unreadable() -> None:
    """The real simulator with VM 0's balloon wrapped (issue 11): the reason, not "no stats"."""
    with Simulator(ISSUE_DEVICE) as sim:
        wrap_the_cros_balloon(sim)
        server = start_server(mms=str(sim.address))
        try:
            table = run_cli("stats", "0", "7", "--server", server.address)
            data = json.loads(
                run_cli("stats", "0", "7", "--json", "--server", server.address).stdout
            )
        finally:
            server.stop(grace_s=1.0)

    assert table.returncode == 0, table.stderr
    header, unreadable, missing = table.stdout.splitlines()
    assert header.split()[:2] == ["VM", "BALLOON"]
    assert unreadable == f"VM 0: unreadable (WRAPPED: balloon_actual={WRAPPED_AFTER_HANG_UP})"
    assert missing == "no statistics for VM 7"  # 7 is unknown; 0 is named once, with its reason

    assert data["stats"] == []
    assert data["missing_vm_ids"] == [0, 7]
    assert data["unreadable_vms"] == [
        {
            "vm_id": 0,
            "reason": "wrapped",
            "mms_field": "balloon_actual",
            "mms_value": str(WRAPPED_AFTER_HANG_UP),
        }
    ]


def test_rebalance_with_units_and_signs(server: ManateeServer, client: Client) -> None:
    client.launch_vm(
        512 * MIB, init_mem_size_bytes=256 * MIB, start_vm=lambda v, p: True, stop_vm=print
    )

    result = run_cli("rebalance", "1=-64MiB", "--json", "--server", server.address)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "requested_deltas": [
            {"vm_id": 1, "delta_bytes": -64 * MIB},
            {"vm_id": 0, "delta_bytes": 64 * MIB},
        ],
        "actual_deltas": [
            {"vm_id": 1, "delta_bytes": -64 * MIB},
            {"vm_id": 0, "delta_bytes": 64 * MIB},
        ],
        "fully_applied": True,
    }

    table = run_cli("rebalance", "1=+32M", "--server", server.address)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "VM  REQUESTED     ACTUAL",
        "1   +32.0 MiB  +32.0 MiB",
        "0   -32.0 MiB  -32.0 MiB",
        "fully applied: yes",
    ]
    assert client.get_balloon_stats([1]).stats[0].balloon_actual_bytes == 224 * MIB


def test_rebalance_dry_run_prints_the_preview_and_moves_nothing(
    server: ManateeServer, client: Client
) -> None:
    client.launch_vm(
        512 * MIB, init_mem_size_bytes=256 * MIB, start_vm=lambda v, p: True, stop_vm=print
    )
    sent_before = simulator(server).request_counts[MessageType.REBALANCE_MEMORY]

    table = run_cli("rebalance", "1=-64MiB", "--dry-run", "--server", server.address)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines() == [
        "VM  REQUESTED  WOULD MOVE",
        "1   -64.0 MiB   -64.0 MiB",
        "0   +64.0 MiB   +64.0 MiB",
        "dry run, nothing moved; would be fully applied: yes",
    ]
    # VM 1's balloon holds 256 MiB: a preview of taking 300 MiB out says what would move.
    result = run_cli("rebalance", "1=-300MiB", "--dry-run", "--json", "--server", server.address)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "requested_deltas": [
            {"vm_id": 1, "delta_bytes": -300 * MIB},
            {"vm_id": 0, "delta_bytes": 300 * MIB},
        ],
        "actual_deltas": [
            {"vm_id": 1, "delta_bytes": -256 * MIB},
            {"vm_id": 0, "delta_bytes": 256 * MIB},
        ],
        "fully_applied": False,
        "dry_run": True,
    }
    assert client.get_balloon_stats([1]).stats[0].balloon_actual_bytes == 256 * MIB
    assert simulator(server).request_counts[MessageType.REBALANCE_MEMORY] == sent_before


def test_launch_with_start_cmd_then_vms_shows_it(server: ManateeServer, tmp_path: Path) -> None:
    record = tmp_path / "started"
    start_cmd = f"echo {{vm_id}} {{balloon_control_path}} > {record}; true"

    result = run_cli("launch", "512MiB", "--start-cmd", start_cmd, "--server", server.address)

    assert result.returncode == 0, result.stderr
    # The first attempt reserved everything: no attempt fell short, so no progress line.
    assert not [line for line in result.stderr.splitlines() if line.startswith("attempt ")]
    vm_id, path = record.read_text().split()
    assert vm_id == "1" and path.endswith(".sock")
    assert result.stdout.splitlines()[1].split()[:4] == ["1", "running", "512.0", "MiB"]

    listed = run_cli("vms", "--server", server.address)
    *rows, session_line = listed.stdout.splitlines()[1:]
    assert [line.split()[0] for line in rows] == ["0", "1"]
    assert session_line == f"session {session_id(server, 1)}"

    # `true` is the simplest start command: exit status 0 means started.
    again = run_cli("launch", "512MiB", "--init", "256MiB", "--start-cmd", "true", "--json",
                    "--server", server.address)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["init_mem_size_bytes"] == 256 * MIB


def test_launch_behind_a_pending_start_says_it_is_queued(
    server: ManateeServer, client: Client
) -> None:
    held = client.prepare_vm(512 * MIB)  # a bare start holds the device's one pending start
    command = [sys.executable, "-m", "manatee_grpc", "launch", "512MiB", "--start-cmd", "true",
               "--server", server.address]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT
    ) as process:
        assert process.stderr is not None
        first_line = process.stderr.readline()  # blocks until the launch says where it is
        assert first_line == "queued: position 1 (another VM start is pending)\n"
        client.finish_add_vm(held.vm_id)  # the start is free: the launch goes on
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    assert process.returncode == 0, stderr
    assert stdout.splitlines()[1].split()[:2] == [str(held.vm_id + 1), "running"]


def test_launch_confirmed_on_stdin(server: ManateeServer, client: Client) -> None:
    result = run_cli("launch", "1G", "--json", "--server", server.address, stdin="y\n")

    assert result.returncode == 0, result.stderr
    assert "started? [y/N]" in result.stderr
    vm = json.loads(result.stdout)
    assert (vm["vm_id"], vm["mem_size_bytes"], vm["state"]) == (1, 1024 * MIB, "running")
    assert vm_ids(client) == [0, 1]


def test_launch_declined_is_vm_start_failed(server: ManateeServer, client: Client) -> None:
    result = run_cli("launch", "1G", "--server", server.address, stdin="n\n")

    assert result.returncode == 19  # 10 + FAILED_PRECONDITION (9)
    assert "error: FAILED_PRECONDITION (VM_START_FAILED): " in result.stderr
    assert result.stdout == ""
    wait_until(lambda: vm_ids(client) == [0], "the reservation was released")


def test_launch_failing_start_cmd_is_vm_start_failed(server: ManateeServer) -> None:
    result = run_cli("launch", "512MiB", "--start-cmd", "exit 3", "--server", server.address)

    assert result.returncode == 19
    assert "(VM_START_FAILED)" in result.stderr


def test_launch_shows_progress_then_resource_exhausted(server: ManateeServer) -> None:
    result = run_cli("launch", "7GiB", "--init", "7GiB", "--start-cmd", "true",
                     "--server", server.address)  # fmt: skip

    assert result.returncode == 18  # 10 + RESOURCE_EXHAUSTED (8)
    progress = [line for line in result.stderr.splitlines() if line.startswith("attempt ")]
    assert [line.split(":")[0] for line in progress] == [f"attempt {n}" for n in range(1, 6)]
    assert all(line.endswith("GiB") for line in progress)
    assert "error: RESOURCE_EXHAUSTED (MMS_ENOMEM): " in result.stderr


def test_remove_then_not_found_exits_15(server: ManateeServer, client: Client) -> None:
    client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None)

    removed = run_cli("remove", "1", "--server", server.address)
    assert (removed.returncode, removed.stdout) == (0, "removed VM 1 of the current session\n")
    assert vm_ids(client) == [0]

    again = run_cli("remove", "1", "--server", server.address)
    assert again.returncode == 15  # 10 + NOT_FOUND (5)
    assert again.stderr.startswith("error: NOT_FOUND (VM_NOT_FOUND): ")

    rebalance = run_cli("rebalance", "9=1M", "--server", server.address)
    assert rebalance.returncode == 15


def test_remove_with_the_session_vms_printed_never_removes_a_later_vm_with_that_id() -> None:
    mms = KillableMms()
    server = start_server(mms=mms.address)
    try:
        with Client(server.address) as client:
            launch = functools.partial(
                client.launch_vm, 512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None
            )
            assert launch().vm_id == 1
            old_session = run_cli("vms", "--server", server.address).stdout.splitlines()[-1]
            old_session = old_session.removeprefix("session ")
            assert old_session == session_id(server, 1)
            # mms restarts: it dropped VM 1, and the next launch is VM 1 again, in a new session.
            mms.kill()
            mms.restart()
            wait_until(lambda: client.list_vms().session == session_id(server, 2), "new session")
            assert launch().vm_id == 1

            stale = run_cli("remove", "1", "--session", old_session, "--server", server.address)
            assert stale.returncode == 15  # 10 + NOT_FOUND (5)
            assert stale.stderr.startswith("error: NOT_FOUND (SESSION_RESET): ")
            assert vm_ids(client) == [0, 1]  # the new VM 1 is untouched

            current = session_id(server, 2)
            removed = run_cli("remove", "1", "--session", current, "--server", server.address)
            assert removed.returncode == 0, removed.stderr
            assert removed.stdout == f"removed VM 1 of session {current}\n"
            assert vm_ids(client) == [0]
    finally:
        server.stop(grace_s=1.0)
        mms.close()


def test_invalid_argument_exits_13_and_names_the_field(server: ManateeServer) -> None:
    result = run_cli("launch", "0", "--start-cmd", "true", "--server", server.address)

    assert result.returncode == 13  # 10 + INVALID_ARGUMENT (3)
    assert result.stderr.startswith("error: INVALID_ARGUMENT (INVALID_ARGUMENT): ")
    assert "start.mem_size_bytes: must be positive" in result.stderr
    # Named once: the message is the field violation, so it is not repeated under it.
    assert result.stderr.count("start.mem_size_bytes") == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["launch", "12XB"],
        ["launch"],
        ["rebalance", "1=-64XiB"],
        ["rebalance", "one=64MiB"],
        ["rebalance", "1=64MiB", "1=32MiB"],
        ["stats", "zero"],
        ["remove"],
        ["bogus"],
    ],
)
def test_usage_errors_exit_2(args: list[str]) -> None:
    # No server: usage is checked before anything is sent.
    result = run_cli(*args, "--server", "unix:///nonexistent/manatee.sock")

    assert result.returncode == 2, result.stderr
    assert "usage: manatee-grpc" in result.stderr


def test_unreachable_server_exits_24() -> None:
    result = run_cli("vms", "--server", "unix:///nonexistent/manatee.sock", "--timeout", "5")

    assert result.returncode == 24  # 10 + UNAVAILABLE (14)
    assert result.stderr.startswith("error: UNAVAILABLE: ")


def test_unix_socket_server(tmp_path: Path) -> None:
    server = start_server(listen=f"unix://{tmp_path}/manatee.sock")
    try:
        result = run_cli("vms", "--json", "--server", f"unix://{tmp_path}/manatee.sock")
    finally:
        server.stop(grace_s=1.0)

    assert result.returncode == 0, result.stderr
    assert [vm["vm_id"] for vm in json.loads(result.stdout)["vms"]] == [0]
