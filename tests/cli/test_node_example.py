"""examples/node/journey.js, a Node.js client generated from protos/, against a real server.

The example is installed with ``npm ci`` from its own package-lock.json into
examples/node/node_modules (git-ignored). A stamp holding the lockfile's hash lets later runs
reuse that install; a changed lockfile installs afresh. Skipped only when node or npm is absent.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from api.conftest import start_server

from manatee_grpc import Client, ManateeServer
from manatee_grpc import memory_service_pb2 as pb

from .conftest import REPO_ROOT, vm_ids

EXAMPLE = REPO_ROOT / "examples" / "node"
NODE_MODULES = EXAMPLE / "node_modules"
# Written into node_modules after a successful `npm ci`, so `npm ci` wiping it removes it too.
STAMP = NODE_MODULES / ".manatee-grpc-lock-sha256"
# npm ci fetches from the registry on a clean clone: generous, for a slow shared machine.
NPM_CI_TIMEOUT_S = 600.0
JOURNEY_TIMEOUT_S = 120.0

# The journey's output, line by line (fullmatch). Session ids and paths vary; the rest is fixed.
SESSION = r"[0-9a-f]+-\d+"
EXPECTED_LINES = [
    rf"GetBalloonStats: session {SESSION}; VM 0: balloon \d+ MiB",
    r"PrepareVm: VM 1 reserved=true, balloon control /run/mms_control_1\.sock",
    r"FinishAddVm: VM 1 is VM_STATE_RUNNING",
    r"RebalanceMemory: inflate VM 1 by 64 MiB: applied VM 1 67108864 bytes, VM 0 -67108864 bytes;"
    r" fully_applied=true",
    r"RemoveVm: VM 1 removed",
    r"LaunchVm: reserved VM 2; start crosvm with --balloon-control /run/mms_control_2\.sock",
    r"LaunchVm: launched VM 2, VM_STATE_RUNNING",
    r"WatchBalloonStats: snapshot 1: VMs 0, 2",
    r"WatchBalloonStats: snapshot 2: VMs 0, 2",
    r"WatchBalloonStats: cancelled after 2 snapshots",
    r"RemoveVm: VM 2 removed",
    r"PrepareVm with mem_size_bytes 0 \(bad on purpose\):",
    # The rich error, decoded from grpc-status-details-bin with protos/google/rpc/.
    r"  status: INVALID_ARGUMENT \(3\): mem_size_bytes: must be positive",
    rf"  ErrorInfo: reason INVALID_ARGUMENT, domain manatee\.memory\.v1, metadata"
    rf" field=mem_size_bytes session={SESSION}",
    r"  BadRequest: mem_size_bytes: must be positive",
    r"ListVms: 0",
    r"journey done",
]


def _lock_hash() -> str:
    return hashlib.sha256((EXAMPLE / "package-lock.json").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's dependencies installed from its lockfile."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed: the Node.js example cannot run")
    if not (STAMP.is_file() and STAMP.read_text(encoding="utf-8") == _lock_hash()):
        # --ignore-scripts: no dependency needs one (protobufjs' postinstall only checks the
        # versions of its optional command-line tools).
        result = subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"],
            cwd=EXAMPLE, capture_output=True, text=True, timeout=NPM_CI_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"
        STAMP.write_text(_lock_hash(), encoding="utf-8")
    return node


def run_journey(node: str, address: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(EXAMPLE / "journey.js"), address],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=JOURNEY_TIMEOUT_S, check=False,
    )  # fmt: skip


def tcp_server(tmp_path: Path) -> ManateeServer:
    return start_server()


def unix_server(tmp_path: Path) -> ManateeServer:
    return start_server(listen=f"unix://{tmp_path}/manatee.sock")


@pytest.fixture(params=[tcp_server, unix_server], ids=["tcp", "unix"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ManateeServer]:
    make: Callable[[Path], ManateeServer] = request.param
    server = make(tmp_path)
    yield server
    server.stop(grace_s=1.0)


def test_node_journey(node: str, any_server: ManateeServer) -> None:
    result = run_journey(node, any_server.address)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == len(EXPECTED_LINES), result.stdout
    for line, expected in zip(lines, EXPECTED_LINES, strict=True):
        assert re.fullmatch(expected, line), f"{line!r} does not match {expected!r}"
    # Both VMs it started are gone again.
    with Client(any_server.address) as client:
        assert vm_ids(client) == [0]


def test_node_journey_fails_loudly(node: str, server: ManateeServer, client: Client) -> None:
    # A pending start held by someone else: the journey's PrepareVm is refused, and the script
    # says so and exits 1 rather than carrying on.
    held = client.prepare_vm(256 * 1024 * 1024)  # not the journey's 512 MiB: no top-up
    try:
        result = run_journey(node, server.address)
    finally:
        client.remove_vm(held.vm_id)

    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1].startswith("GetBalloonStats: "), "stopped at PrepareVm"
    failure = result.stderr.splitlines()
    assert failure[0].startswith("journey failed: FAILED_PRECONDITION: "), result.stderr
    # The failure's rich details come along, decoded.
    assert "  ErrorInfo: reason MMS_EINVAL, domain manatee.memory.v1, metadata" in "\n".join(
        failure
    )


# proto-loader with its default options, and a request written with the proto's field names.
DEFAULT_OPTIONS_PREPARE = """
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const definition = protoLoader.loadSync('manatee/memory/v1/memory_service.proto', {
  includeDirs: [process.argv[1]],
});
const {MemoryService} = grpc.loadPackageDefinition(definition).manatee.memory.v1;
const client = new MemoryService(process.argv[2], grpc.credentials.createInsecure(), {
  'grpc.enable_http_proxy': 0,
});
client.PrepareVm({mem_size_bytes: 536870912}, (error) => {
  console.log(error ? `${grpc.status[error.code]}: ${error.details}` : 'OK');
  client.close();
});
"""


def test_proto_loader_defaults_drop_snake_case_fields(node: str, server: ManateeServer) -> None:
    # Why the example (and the README) set keepCase: without it the request's field is silently
    # dropped, and the server sees a PrepareVm for 0 bytes.
    result = subprocess.run(
        [node, "-e", DEFAULT_OPTIONS_PREPARE, str(REPO_ROOT / "protos"), server.address],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=JOURNEY_TIMEOUT_S, check=False,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout == "INVALID_ARGUMENT: mem_size_bytes: must be positive\n"
    # The README's "From another language" quotes that answer.
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## From another language") :]
    assert 'answers "mem_size_bytes: must be positive"' in section[: section.index("\n## ")]


def test_the_journey_handles_every_launch_vm_message() -> None:
    """A LaunchVmResponse the journey has no case for would end its launch as "unexpected":
    each member of the `event` oneof (`queued` too, sent when another start is pending) has
    its case in journey.js."""
    events = [field.name for field in pb.LaunchVmResponse.DESCRIPTOR.oneofs_by_name["event"].fields]
    journey = (EXAMPLE / "journey.js").read_text()
    launch = journey[
        journey.index("function launchVm(") : journey.index("function watchBalloonStats(")
    ]
    missing = [name for name in events if f"case '{name}':" not in launch]
    assert not missing, f"journey.js's launchVm has no case for {missing}"
