"""``manatee-grpc events``: the server's recent events, and ``--follow`` for new ones."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from api.event_helpers import wait_mms_available_recorded

from manatee_grpc import Client, ManateeRpcError, ManateeServer

from .conftest import REPO_ROOT, run_cli


@pytest.fixture(autouse=True)
def _settled(client: Client) -> None:
    wait_mms_available_recorded(client)


LINE_WAIT_S = 30.0


def test_events_prints_the_recent_events_and_exits(server: ManateeServer, client: Client) -> None:
    prepared = client.prepare_vm(512 << 20)
    with pytest.raises(ManateeRpcError):
        client.remove_vm(99)
    result = run_cli("events", "--server", server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(f"PREPARE_VM VM {prepared.vm_id} 512.0 MiB by ipv4:127.0.0.1:" in x for x in lines)
    assert "REMOVE_VM VM 99 failed NOT_FOUND (VM_NOT_FOUND)" in lines[-1]

    result = run_cli("events", "--server", server.address, "--last", "2", "--json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["PREPARE_VM", "REMOVE_VM"]
    assert records[1]["vm_ids"] == [99] and records[1]["error"]["reason"] == "VM_NOT_FOUND"
    assert records[0]["sequence"] + 1 == records[1]["sequence"]

    result = run_cli("events", "--server", server.address, "--kind", "prepare_vm", "--json")
    assert [json.loads(line)["kind"] for line in result.stdout.splitlines()] == ["PREPARE_VM"]
    result = run_cli("events", "--server", server.address, "--kind", "nonsense")
    assert result.returncode == 2 and "expected one of" in result.stderr


def test_events_follow_prints_new_events_as_they_happen(
    server: ManateeServer, client: Client
) -> None:
    with pytest.raises(ManateeRpcError):
        client.remove_vm(41)
    follower = subprocess.Popen(
        [sys.executable, "-m", "manatee_grpc", "events", "--follow", "--last", "1",
         "--server", server.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        # The replayed line says the follower is subscribed: what comes next is live.
        assert "REMOVE_VM VM 41 failed" in lines.get(timeout=LINE_WAIT_S)
        with pytest.raises(ManateeRpcError):
            client.remove_vm(42)
        assert "REMOVE_VM VM 42 failed" in lines.get(timeout=LINE_WAIT_S)
        assert follower.poll() is None  # still following
    finally:
        follower.kill()
        follower.wait(LINE_WAIT_S)
        reader.join(LINE_WAIT_S)
        assert follower.stderr is not None
        follower.stdout.close()  # type: ignore[union-attr]
        follower.stderr.close()


def test_top_shows_the_servers_latest_events_and_the_latest_policy_decision(
    server: ManateeServer, client: Client
) -> None:
    result = _top_once(server.address)
    assert result.returncode == 0, result.stderr
    assert "policy: none seen" in result.stdout.splitlines()[0]

    assert server.events is not None
    server.events.publish_policy_decision({"pending_start": True}, "hold")
    with pytest.raises(ManateeRpcError):
        client.remove_vm(43)
    result = _top_once(server.address)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "policy: action=hold by policy" in lines[0]
    assert "POLICY_DECISION action=hold by policy" in lines[-2]
    assert "REMOVE_VM VM 43 failed NOT_FOUND (VM_NOT_FOUND)" in lines[-1]


def _top_once(address: str) -> subprocess.CompletedProcess[str]:
    """``top --once`` into a pipe without ``$COLUMNS``: whole lines, nothing cut."""
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    return subprocess.run(
        [sys.executable, "-m", "manatee_grpc", "top", "--once", "--server", address],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO_ROOT, env=env,
    )  # fmt: skip


def test_serve_takes_an_audit_file_and_a_ring_size_and_refuses_a_bad_one(tmp_path: Path) -> None:
    from manatee_grpc.cli import build_parser
    from manatee_grpc.cli._main import _config_from

    args = build_parser().parse_args(["serve", "--audit-file", "/x/a.jsonl", "--event-ring", "5"])
    config = _config_from(args)
    assert (config.audit_file, config.event_ring_size) == ("/x/a.jsonl", 5)
    assert _config_from(build_parser().parse_args(["serve"])).audit_file is None

    result = run_cli("serve", "--listen", "127.0.0.1:0", "--audit-file", str(tmp_path / "no" / "a"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # one line, naming the flag and the cause
    assert line.startswith("manatee-grpc: error: --audit-file ") and "No such file" in line
    result = run_cli("serve", "--event-ring", "0")
    assert result.returncode == 2 and "--event-ring" in result.stderr


def test_a_real_policy_decision_reads_as_words_with_the_policys_state_in_top(
    tmp_path: Path,
) -> None:
    """The server's own POLICY_DECISION (its action a mapping, not a word): ``events`` and
    ``top`` say acted/held and why, and top's header carries the policy's counts."""
    from api.conftest import start_server

    config = tmp_path / "policy.toml"
    config.write_text("period_s = 3600\n")  # the test runs each period itself
    server = start_server(policy="balance-available", policy_config_path=str(config))
    try:
        with Client(server.address) as client:
            wait_mms_available_recorded(client)
            first = server.run_policy_tick()
            prepared = client.prepare_vm(512 << 20)
            second = server.run_policy_tick()
            assert not first.acted and second.reason == "a VM start is pending"
            client.remove_vm(prepared.vm_id)
        result = run_cli("events", "--server", server.address, "--kind", "policy_decision")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 2
        assert f"POLICY_DECISION VM 0 held: {first.reason} by policy" in lines[0]
        assert "POLICY_DECISION held: a VM start is pending by policy" in lines[1]
        assert not any("{" in line for line in lines), lines

        result = _top_once(server.address)
        assert result.returncode == 0, result.stderr
        header = result.stdout.splitlines()[0]
        assert "policy: held: a VM start is pending (2 decisions, 0 rebalances, 0 B moved)" in (
            header
        ), header
    finally:
        server.stop(grace_s=1.0)


def test_an_acted_policy_decision_says_what_moved_and_which_vms_sit_out() -> None:
    from google.protobuf import struct_pb2

    from manatee_grpc import memory_service_pb2 as pb
    from manatee_grpc.cli._events_view import policy_state, summary

    details = struct_pb2.Struct()
    details.update(
        {
            "inputs": {"policy_sequence": 7},
            "action": {
                "acted": True,
                "reason": "imbalance above hysteresis",
                "moved_bytes": 64 << 20,
                "fully_applied": False,
                "error": None,
            },
            "state": {
                "decisions": 7,
                "rebalances_sent": 3,
                "bytes_moved": 192 << 20,
                "backed_off_until": {"2": 9},
            },
        }
    )
    event = pb.Event(kind=pb.EVENT_KIND_POLICY_DECISION, vm_ids=[0, 1, 2], details=details)
    assert summary(event) == (
        "POLICY_DECISION VM 0,1,2 acted: imbalance above hysteresis, moved 64.0 MiB (partly)"
    )
    assert policy_state(event) == "7 decisions, 3 rebalances, 192.0 MiB moved, VM 2 backed off"
