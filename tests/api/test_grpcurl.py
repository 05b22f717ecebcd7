"""The real grpcurl against a live server: reflection, health, and the README's commands verbatim.

The README's "Try it with grpcurl" lines are read from README.md and run as written, with only
the binary's path and the server's port-0 address substituted, so the documentation cannot drift
from what the server does.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import descriptor, json_format
from grpc_health.v1 import health_pb2

from manatee_grpc import SERVICE_NAME, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc.mms._memory_math import MIB, extra_bytes

from .conftest import start_server

GRPCURL = Path(sys.executable).parent / "grpcurl"
README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "127.0.0.1:50051"  # where `make run` listens; swapped for the test server's
HEALTH_SERVICE_NAME = "grpc.health.v1.Health"
MEMORY_SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
README_START_MEM_BYTES = 512 * MIB


def _messages(containers: list[descriptor.Descriptor]) -> Iterator[descriptor.Descriptor]:
    for message in containers:
        yield message
        yield from _messages(list(message.nested_types))


MESSAGE_NAMES = sorted(
    m.full_name for m in _messages(list(pb.DESCRIPTOR.message_types_by_name.values()))
)
METHOD_NAMES = [method.full_name for method in MEMORY_SERVICE.methods]


def readme_commands() -> list[list[str]]:
    """Each grpcurl command line of the README, split the way a shell would."""
    lines = README.read_text(encoding="utf-8").splitlines()
    return [shlex.split(line) for line in lines if line.startswith("grpcurl ")]


def readme_command(*tail: str) -> list[str]:
    """The one README command whose last arguments are ``tail``."""
    found = [argv for argv in readme_commands() if tuple(argv[-len(tail) :]) == tail]
    assert len(found) == 1, f"README.md should show exactly one `grpcurl ... {' '.join(tail)}`"
    return found[0]


def grpcurl(argv: list[str], address: str) -> subprocess.CompletedProcess[str]:
    """Run a README-style command line against ``address`` with the real grpcurl binary."""
    assert argv[0] == "grpcurl"
    args = [address if arg == README_ADDRESS else arg for arg in argv[1:]]
    assert address in args, f"no {README_ADDRESS} to replace in {argv}"
    return subprocess.run(
        [str(GRPCURL), *args], capture_output=True, text=True, timeout=60, check=False
    )


def grpcurl_ok(argv: list[str], address: str) -> str:
    result = grpcurl(argv, address)
    assert result.returncode == 0, f"{shlex.join(argv)} failed:\n{result.stderr}"
    return result.stdout


def call_ok(address: str, method: str, data: str) -> str:
    return grpcurl_ok(["grpcurl", "-plaintext", "-d", data, README_ADDRESS, method], address)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ManateeServer]:
    """One server for the read-only tests (list, describe, health)."""
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


def test_the_binary_is_the_pinned_grpcurl() -> None:
    result = subprocess.run(
        [str(GRPCURL), "-version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert "v1.8.6" in result.stdout + result.stderr


def test_list_shows_the_memory_and_health_services(shared_server: ManateeServer) -> None:
    services = grpcurl_ok(readme_command("list"), shared_server.address).split()
    assert SERVICE_NAME == "manatee.memory.v1.MemoryService"
    assert SERVICE_NAME in services
    assert HEALTH_SERVICE_NAME in services


def test_list_of_the_service_shows_every_method(shared_server: ManateeServer) -> None:
    argv = ["grpcurl", "-plaintext", README_ADDRESS, "list", SERVICE_NAME]
    assert grpcurl_ok(argv, shared_server.address).split() == sorted(METHOD_NAMES)


def test_describe_the_service(shared_server: ManateeServer) -> None:
    argv = ["grpcurl", "-plaintext", README_ADDRESS, "describe", SERVICE_NAME]
    output = grpcurl_ok(argv, shared_server.address)
    assert f"{SERVICE_NAME} is a service:" in output
    for method in MEMORY_SERVICE.methods:
        assert f"rpc {method.name} (" in output


def test_readme_describe_of_prepare_vm(shared_server: ManateeServer) -> None:
    argv = readme_command("describe", f"{SERVICE_NAME}.PrepareVm")
    output = grpcurl_ok(argv, shared_server.address)
    assert f"{SERVICE_NAME}.PrepareVm is a method:" in output
    assert (
        "rpc PrepareVm ( .manatee.memory.v1.PrepareVmRequest ) returns "
        "( .manatee.memory.v1.PrepareVmResponse );"
    ) in output


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_describe_each_method(shared_server: ManateeServer, method: str) -> None:
    argv = ["grpcurl", "-plaintext", README_ADDRESS, "describe", method]
    output = grpcurl_ok(argv, shared_server.address)
    assert f"{method} is a method:" in output
    assert f"rpc {method.rsplit('.', 1)[1]} (" in output


@pytest.mark.parametrize("message", MESSAGE_NAMES)
def test_describe_each_message(shared_server: ManateeServer, message: str) -> None:
    argv = ["grpcurl", "-plaintext", README_ADDRESS, "describe", message]
    output = grpcurl_ok(argv, shared_server.address)
    assert f"{message} is a message:" in output
    assert f"message {message.rsplit('.', 1)[1]} {{" in output


def test_readme_health_check_is_serving(shared_server: ManateeServer) -> None:
    argv = readme_command(f"{HEALTH_SERVICE_NAME}/Check")
    assert argv[argv.index("-d") + 1] == '{"service": "manatee.memory.v1.MemoryService"}'
    output = grpcurl_ok(argv, shared_server.address)
    response = json_format.Parse(output, health_pb2.HealthCheckResponse())
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_error_exits_non_zero_with_the_grpc_code(shared_server: ManateeServer) -> None:
    argv = [
        "grpcurl",
        "-plaintext",
        "-d",
        '{"vm_id": 0}',
        README_ADDRESS,
        f"{SERVICE_NAME}/RemoveVm",
    ]
    result = grpcurl(argv, shared_server.address)
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    # The rich details travel too: ErrorInfo and BadRequest.
    assert '"reason":"INVALID_ARGUMENT"' in result.stderr
    assert "field_violations" in result.stderr


def test_readme_start_of_a_vm_by_hand(server: ManateeServer) -> None:
    """PrepareVm -> FinishAddVm -> GetBalloonStats -> RemoveVm, exactly as the README shows."""
    address = server.address
    prepare = readme_command(f"{SERVICE_NAME}/PrepareVm")
    finish = readme_command(f"{SERVICE_NAME}/FinishAddVm")
    stats = readme_command(f"{SERVICE_NAME}/GetBalloonStats")
    remove = readme_command(f"{SERVICE_NAME}/RemoveVm")
    # The README's request bodies, pinned: change them there and here together.
    assert [argv[argv.index("-d") + 1] for argv in (prepare, finish, stats, remove)] == [
        '{"mem_size_bytes": 536870912}',
        '{"vm_id": 1}',
        "{}",
        '{"vm_id": 1}',
    ]
    commands = readme_commands()
    assert [commands.index(argv) for argv in (prepare, finish, stats, remove)] == sorted(
        commands.index(argv) for argv in (prepare, finish, stats, remove)
    ), "the README shows the start in this order"

    def cros_balloon_bytes() -> int:
        response = json_format.Parse(grpcurl_ok(stats, address), pb.GetBalloonStatsResponse())
        by_id = {entry.vm_id: entry for entry in response.stats}
        assert 0 in by_id, response
        return by_id[0].balloon_actual_bytes

    cros_before = cros_balloon_bytes()

    prepared = json_format.Parse(grpcurl_ok(prepare, address), pb.PrepareVmResponse())
    assert prepared.vm_id == 1
    assert prepared.reserved and prepared.shortfall_bytes == 0
    assert prepared.balloon_control_path == "/run/mms_control_1.sock"
    # init defaults to min(1000 MiB, 512 MiB): the CrOS guest gave all of it plus the overhead.
    assert cros_balloon_bytes() - cros_before == README_START_MEM_BYTES + extra_bytes(
        README_START_MEM_BYTES
    )

    finished = json_format.Parse(grpcurl_ok(finish, address), pb.FinishAddVmResponse())
    assert (finished.vm.vm_id, finished.vm.state) == (1, pb.VM_STATE_RUNNING)

    looked = json_format.Parse(grpcurl_ok(stats, address), pb.GetBalloonStatsResponse())
    assert sorted(entry.vm_id for entry in looked.stats) == [0, 1]
    assert looked.session == finished.vm.session != ""

    removed = json_format.Parse(grpcurl_ok(remove, address), pb.RemoveVmResponse())
    assert removed == pb.RemoveVmResponse()

    after = json_format.Parse(grpcurl_ok(stats, address), pb.GetBalloonStatsResponse())
    assert [entry.vm_id for entry in after.stats] == [0]
    assert after.stats[0].balloon_actual_bytes == cros_before
    listed = json_format.Parse(
        call_ok(address, f"{SERVICE_NAME}/ListVms", "{}"), pb.ListVmsResponse()
    )
    assert [vm.vm_id for vm in listed.vms] == [0]
