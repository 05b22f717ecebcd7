"""The API definition: buf-clean, its checked-in generated code current, its names as agreed.

Stale generated code fails here: the test regenerates into a temporary directory and compares
byte for byte with src/manatee_grpc/_proto (fix with `make proto`).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2, status_pb2

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOS = REPO_ROOT / "protos"
GENERATED = REPO_ROOT / "src" / "manatee_grpc" / "_proto"
BUF = Path(sys.executable).parent / "buf"


def _tree(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    out = tmp_path / "_proto"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "gen_proto.py"), "--out", str(out)],
        check=True,
        timeout=120,
    )

    fresh, checked_in = _tree(out), _tree(GENERATED)

    assert sorted(fresh) == sorted(checked_in), "generated files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale generated code in {stale}: run `make proto`"


@pytest.mark.parametrize(
    "command",
    [["lint"], ["format", "--diff", "--exit-code"]],
    ids=["lint", "format"],
)
def test_buf(command: list[str]) -> None:
    result = subprocess.run(
        [str(BUF), *command],
        cwd=PROTOS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_lives_inside_manatee_grpc() -> None:
    # A fresh interpreter, so nothing imported by other tests hides a stray top-level package.
    code = (
        "import sys\n"
        "from manatee_grpc._proto.manatee.memory.v1 import"
        " memory_service_pb2, memory_service_pb2_grpc\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'manatee'))\n"
        "print(memory_service_pb2.PrepareVmRequest.__module__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )

    assert result.stdout.splitlines() == [
        "[]",
        "manatee_grpc._proto.manatee.memory.v1.memory_service_pb2",
    ]


def test_descriptor_keeps_the_proto_file_name() -> None:
    # Reflection serves files by this name, and clients import it by this name.
    assert memory_service_pb2.DESCRIPTOR.name == "manatee/memory/v1/memory_service.proto"
    assert memory_service_pb2.DESCRIPTOR.package == "manatee.memory.v1"


def test_rpcs_are_as_agreed() -> None:
    service = memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"]

    shapes = {
        m.name: (m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
        for m in service.methods
    }

    assert shapes == {
        "GetBalloonStats": ("GetBalloonStatsRequest", "GetBalloonStatsResponse", False, False),
        "WatchBalloonStats": (
            "WatchBalloonStatsRequest",
            "WatchBalloonStatsResponse",
            False,
            True,
        ),
        "RebalanceMemory": ("RebalanceMemoryRequest", "RebalanceMemoryResponse", False, False),
        "LaunchVm": ("LaunchVmRequest", "LaunchVmResponse", True, True),
        "PrepareVm": ("PrepareVmRequest", "PrepareVmResponse", False, False),
        "FinishAddVm": ("FinishAddVmRequest", "FinishAddVmResponse", False, False),
        "RemoveVm": ("RemoveVmRequest", "RemoveVmResponse", False, False),
        "ListVms": ("ListVmsRequest", "ListVmsResponse", False, False),
        "WatchEvents": ("WatchEventsRequest", "WatchEventsResponse", False, True),
    }


def test_guest_statistics_are_optional_and_say_their_units() -> None:
    stats = memory_service_pb2.VmBalloonStats.DESCRIPTOR

    optional = [f.name for f in stats.fields if f.has_presence]

    # crosvm's twelve BalloonStats in crosvm's order, byte counts named _bytes.
    assert optional == [
        "swap_in_bytes",
        "swap_out_bytes",
        "major_faults",
        "minor_faults",
        "free_memory_bytes",
        "total_memory_bytes",
        "available_memory_bytes",
        "disk_caches_bytes",
        "hugetlb_allocations",
        "hugetlb_failures",
        "shared_memory_bytes",
        "unevictable_memory_bytes",
    ]
    assert [f.name for f in stats.fields if not f.has_presence] == [
        "vm_id",
        "balloon_actual_bytes",
    ]


def _compiled(*names: str) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """protos/``names`` as buf builds them from protos/ alone, as any client's build would."""
    with tempfile.TemporaryDirectory() as work:
        out = Path(work) / "image.binpb"
        paths = [argument for name in names for argument in ("--path", name)]
        subprocess.run(
            [str(BUF), "build", "--exclude-source-info", "-o", str(out), *paths],
            cwd=PROTOS, check=True, timeout=120,
        )  # fmt: skip
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {file.name: file for file in files}


def _shape(message: descriptor_pb2.DescriptorProto) -> dict[str, object]:
    return {
        "fields": [(f.name, f.number, f.type, f.label, f.type_name) for f in message.field],
        "nested": {nested.name: _shape(nested) for nested in message.nested_type},
    }


@pytest.mark.parametrize("module", [status_pb2, error_details_pb2], ids=lambda m: m.__name__)
def test_google_rpc_protos_beside_ours_decode_what_the_server_sends(module: ModuleType) -> None:
    # The server builds its details with googleapis-common-protos; a client generating from
    # protos/google/rpc/ alone must read the same wire format: every message the server's copy
    # has, field for field (upstream only ever adds messages and fields).
    ours = _compiled(module.DESCRIPTOR.name)[module.DESCRIPTOR.name]
    servers = descriptor_pb2.FileDescriptorProto()
    module.DESCRIPTOR.CopyToProto(servers)

    assert ours.package == servers.package == "google.rpc"
    our_messages = {message.name: _shape(message) for message in ours.message_type}
    for message in servers.message_type:
        assert our_messages.get(message.name) == _shape(message), message.name
    # The licence header travels with upstream's text.
    text = (PROTOS / module.DESCRIPTOR.name).read_text(encoding="utf-8")
    assert "Licensed under the Apache License, Version 2.0" in text.split("syntax", 1)[0]


def test_no_python_code_is_generated_for_the_google_rpc_protos() -> None:
    # Python clients and the server use googleapis-common-protos' google.rpc modules; a second
    # copy under _proto would register the same names twice.
    assert (PROTOS / "google" / "rpc" / "status.proto").is_file()
    assert not (GENERATED / "google").exists()


def test_descriptor_set_carries_the_comments() -> None:
    files = descriptor_pb2.FileDescriptorSet.FromString(
        (GENERATED / "descriptor_set.binpb").read_bytes()
    ).file

    assert [file.name for file in files] == [memory_service_pb2.DESCRIPTOR.name]
    comments = [location.leading_comments for location in files[0].source_code_info.location]
    assert any(c.startswith(" Starts a sibling VM end to end") for c in comments)


def test_the_wheel_ships_the_descriptor_set(tmp_path: Path) -> None:
    # Built from a copy, so the build leaves nothing in the worktree.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip

    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = archive.read("manatee_grpc/_proto/descriptor_set.binpb")
    assert shipped == (GENERATED / "descriptor_set.binpb").read_bytes()
