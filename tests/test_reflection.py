"""Server reflection, checked with the real grpcurl and with a raw v1 reflection stream.

A real server on 127.0.0.1 port 0 runs a stub MemoryService, the health service and
``enable_reflection``. grpcurl 1.8.6 speaks v1alpha; v1 is exercised over a raw channel. The
comments grpcurl shows are compared with the .proto source text itself.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool, text_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2, memory_service_pb2_grpc
from manatee_grpc.server._reflection import (
    V1_SERVICE_NAME,
    V1ALPHA_SERVICE_NAME,
    _commented_files,
    enable_reflection,
)

GRPCURL = Path(sys.executable).parent / "grpcurl"
PROTO_FILE = Path(__file__).resolve().parents[1] / "protos" / memory_service_pb2.DESCRIPTOR.name
MEMORY_SERVICE = memory_service_pb2.DESCRIPTOR.services_by_name["MemoryService"]
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"]


def _messages(
    containers: list[descriptor.Descriptor],
) -> Iterator[descriptor.Descriptor]:
    for message in containers:
        yield message
        yield from _messages(list(message.nested_types))


MESSAGES = sorted(
    _messages(list(memory_service_pb2.DESCRIPTOR.message_types_by_name.values())),
    key=lambda m: m.full_name,
)
METHODS = [*MEMORY_SERVICE.methods, *HEALTH_SERVICE.methods]


@pytest.fixture(scope="module")
def address() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    # The generated base class answers UNIMPLEMENTED, and reflection needs only the
    # registration; its .pyi marks every RPC abstract so that real servicers implement them all.
    unimplemented = memory_service_pb2_grpc.MemoryServiceServicer()  # type: ignore[abstract]
    memory_service_pb2_grpc.add_MemoryServiceServicer_to_server(unimplemented, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    enable_reflection(server, [MEMORY_SERVICE.full_name, health.SERVICE_NAME])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def grpcurl(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GRPCURL), "-plaintext", "-max-time", "30", address, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def rpc_line(method: descriptor.MethodDescriptor) -> str:
    """How grpcurl prints a method."""
    request = f"{'stream ' if method.client_streaming else ''}.{method.input_type.full_name}"
    response = f"{'stream ' if method.server_streaming else ''}.{method.output_type.full_name}"
    return f"rpc {method.name} ( {request} ) returns ( {response} );"


def test_list_shows_every_service(address: str) -> None:
    result = grpcurl(address, "list")

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == sorted(
        [MEMORY_SERVICE.full_name, health.SERVICE_NAME, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME]
    )


def test_describe_memory_service_shows_every_rpc(address: str) -> None:
    result = grpcurl(address, "describe", MEMORY_SERVICE.full_name)

    assert result.returncode == 0, result.stderr
    assert f"{MEMORY_SERVICE.full_name} is a service:" in result.stdout
    for method in MEMORY_SERVICE.methods:
        assert rpc_line(method) in result.stdout
    # The service's whole comment (sessions, retries, every error code) comes first.
    lines = result.stdout.splitlines()
    comment = leading_comment(r"service MemoryService \{")
    assert lines[1 : 1 + len(comment) + 1] == [*comment, "service MemoryService {"]


def leading_comment(declaration: str, inside: str = "") -> list[str]:
    """The ``//`` lines right above the first line of the .proto matching ``declaration``.

    With ``inside``, the search starts at the line matching it (a message's opening line), so
    that a field name other messages also have is found in the right one.
    """
    lines = [line.strip() for line in PROTO_FILE.read_text(encoding="utf-8").splitlines()]
    start = next(i for i, line in enumerate(lines) if re.match(inside, line)) if inside else 0
    index = next(i for i in range(start, len(lines)) if re.match(declaration, lines[i]))
    comment: list[str] = []
    while lines[index - 1 - len(comment)].startswith("//"):
        comment.insert(0, lines[index - 1 - len(comment)])
    assert comment, f"{declaration!r} has no comment in {PROTO_FILE}"
    return comment


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.full_name)
def test_describe_method(address: str, method: descriptor.MethodDescriptor) -> None:
    # Stock Python reflection fails here (grpc/grpc#34743); ours resolves the service's file.
    result = grpcurl(address, "describe", method.full_name)

    assert result.returncode == 0, result.stderr
    # Our methods come with the proto's comment; the health service's file has none to give.
    comment = (
        leading_comment(rf"rpc {method.name}\(")
        if method.containing_service is MEMORY_SERVICE
        else []
    )
    assert result.stdout.splitlines() == [
        f"{method.full_name} is a method:",
        *comment,
        rpc_line(method),
    ]


def test_describe_launch_vm_shows_the_stream_protocol(address: str) -> None:
    result = grpcurl(address, "describe", "manatee.memory.v1.MemoryService.LaunchVm")

    assert result.returncode == 0, result.stderr
    assert "// Starts a sibling VM end to end: the recommended way to start one." in result.stdout
    assert "// Client messages are handled in order, whenever they arrive:" in result.stdout


def test_describe_field_shows_its_comment(address: str) -> None:
    result = grpcurl(address, "describe", "manatee.memory.v1.RebalanceMemoryRequest.request_id")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "manatee.memory.v1.RebalanceMemoryRequest.request_id is a field:",
        *leading_comment(r"string request_id = 3;", inside=r"message RebalanceMemoryRequest "),
        "string request_id = 3;",
    ]


def test_describe_message_shows_its_comment_and_its_fields_comments(address: str) -> None:
    message = memory_service_pb2.RebalanceMemoryRequest.DESCRIPTOR
    opening = rf"message {message.name} "

    result = grpcurl(address, "describe", message.full_name)

    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    comment = leading_comment(opening)
    assert lines[: 2 + len(comment)] == [
        f"{message.full_name} is a message:",
        *comment,
        f"message {message.name} {{",
    ]
    for field in message.fields:
        # grpcurl writes the type fully qualified: match the declaration by name and number.
        declaration = rf".* {field.name} = {field.number};"
        at = next(i for i, line in enumerate(lines) if re.fullmatch(declaration, line))
        field_comment = leading_comment(declaration, inside=opening)
        assert lines[at - len(field_comment) : at] == field_comment, field.name


def test_describe_enum_value_shows_its_comment(address: str) -> None:
    result = grpcurl(address, "describe", "manatee.memory.v1.UnreadableReason")

    assert result.returncode == 0, result.stderr
    assert "\n".join(leading_comment(r"UNREADABLE_REASON_WRAPPED = 1;")) in "\n".join(
        line.strip() for line in result.stdout.splitlines()
    )


def test_a_stale_descriptor_set_is_not_served(caplog: pytest.LogCaptureFixture) -> None:
    # A pool whose memory_service.proto differs from the checked-in descriptor set (one field
    # renamed) must get the pool's comment-less copy: comments never describe another shape.
    changed = descriptor_pb2.FileDescriptorProto()
    memory_service_pb2.DESCRIPTOR.CopyToProto(changed)
    changed.message_type[0].field[0].name = "renamed"
    pool = descriptor_pool.DescriptorPool()
    for dependency in memory_service_pb2.DESCRIPTOR.dependencies:
        dependency_proto = descriptor_pb2.FileDescriptorProto()
        dependency.CopyToProto(dependency_proto)
        pool.Add(dependency_proto)
    pool.Add(changed)

    with caplog.at_level(logging.WARNING):
        assert _commented_files(pool) == {}
    assert "without comments" in caplog.text
    # The real pool's file is current, so it is served with its comments.
    assert list(_commented_files(descriptor_pool.Default())) == [memory_service_pb2.DESCRIPTOR.name]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.full_name)
def test_describe_message(address: str, message: descriptor.Descriptor) -> None:
    result = grpcurl(address, "describe", message.full_name)

    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    # buf lint COMMENTS holds every message and field to a comment, and reflection serves them.
    assert lines[0] == f"{message.full_name} is a message:"
    assert lines[1].startswith("// ")
    assert f"message {message.name} {{" in lines
    for field in message.fields:
        at = next(i for i, line in enumerate(lines) if f" {field.name} = {field.number};" in line)
        assert lines[at - 1].startswith("//"), f"{field.name} is described without a comment"


def test_describe_enum(address: str) -> None:
    enum = memory_service_pb2.DESCRIPTOR.enum_types_by_name["VmState"]

    result = grpcurl(address, "describe", enum.full_name)

    assert result.returncode == 0, result.stderr
    assert f"{enum.full_name} is an enum:" in result.stdout
    for value in enum.values:
        assert f"{value.name} = {value.number};" in result.stdout


def test_describe_unknown_symbol_fails(address: str) -> None:
    result = grpcurl(address, "describe", "manatee.memory.v1.MemoryService.NoSuchMethod")

    assert result.returncode != 0
    assert "Symbol not found" in result.stderr


def test_describe_v1_reflection_service(address: str) -> None:
    result = grpcurl(address, "describe", V1_SERVICE_NAME)

    assert result.returncode == 0, result.stderr
    assert (
        "rpc ServerReflectionInfo ( stream .grpc.reflection.v1.ServerReflectionRequest )"
        " returns ( stream .grpc.reflection.v1.ServerReflectionResponse );"
    ) in result.stdout


# --- the v1 protocol ---------------------------------------------------------------------------


def reflect_v1(
    address: str,
    requests: list[reflection_pb2.ServerReflectionRequest],
    service: str = V1_SERVICE_NAME,
) -> list[reflection_pb2.ServerReflectionResponse]:
    """One reflection stream, v1 by default; v1 messages are byte-identical to v1alpha's."""
    # No proxy: the environment's http_proxy must not capture a loopback test channel.
    with grpc.insecure_channel(address, options=[("grpc.enable_http_proxy", 0)]) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        return list(call(iter(requests), timeout=30))


def file_descriptors(
    response: reflection_pb2.ServerReflectionResponse,
) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [
        descriptor_pb2.FileDescriptorProto.FromString(serialized)
        for serialized in response.file_descriptor_response.file_descriptor_proto
    ]


def test_v1_lists_services_and_resolves_methods(address: str) -> None:
    method = MEMORY_SERVICE.methods_by_name["PrepareVm"].full_name
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=method),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
    ]

    listed, by_method, unknown = reflect_v1(address, requests)

    assert [s.name for s in listed.list_services_response.service] == sorted(
        [MEMORY_SERVICE.full_name, health.SERVICE_NAME, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME]
    )
    files = file_descriptors(by_method)
    # The requested file first, then its imports, so the client can build every type.
    assert [f.name for f in files] == [
        "manatee/memory/v1/memory_service.proto",
        "google/protobuf/duration.proto",
        "google/protobuf/struct.proto",
        "google/protobuf/timestamp.proto",
    ]
    assert by_method.original_request == requests[1]
    # Our file is the pool's own copy plus its comments, and nothing else: no json_name, which
    # would make grpcurl print camelCase keys instead of the proto's names.
    served = files[0]
    assert served.source_code_info.location
    served.ClearField("source_code_info")
    pools_copy = descriptor_pb2.FileDescriptorProto()
    memory_service_pb2.DESCRIPTOR.CopyToProto(pools_copy)
    assert served == pools_copy
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_v1_describes_itself_as_a_renamed_v1alpha(address: str) -> None:
    by_symbol, by_name = reflect_v1(
        address,
        [
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=V1_SERVICE_NAME),
            reflection_pb2.ServerReflectionRequest(
                file_by_filename="grpc/reflection/v1/reflection.proto"
            ),
        ],
    )

    (v1,) = file_descriptors(by_symbol)
    assert file_descriptors(by_name) == [v1]
    assert (v1.name, v1.package) == ("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")
    assert b"v1alpha" not in v1.SerializeToString()
    # v1alpha with the package renamed (in text form: the binary form has length prefixes) and
    # no longer deprecated: the same messages on the wire, so one servicer serves both.
    v1alpha = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(v1alpha)
    renamed = text_format.Parse(
        text_format.MessageToString(v1alpha).replace("v1alpha", "v1"),
        descriptor_pb2.FileDescriptorProto(),
    )
    renamed.name = "grpc/reflection/v1/reflection.proto"
    renamed.options.ClearField("deprecated")
    assert v1 == renamed


@pytest.mark.parametrize("service", [V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME])
def test_extension_queries_and_empty_requests(address: str, service: str) -> None:
    no_extension = reflection_pb2.ExtensionRequest(
        containing_type="manatee.memory.v1.VmInfo", extension_number=100
    )
    numbers, extension, empty = reflect_v1(
        address,
        [
            reflection_pb2.ServerReflectionRequest(
                all_extension_numbers_of_type="manatee.memory.v1.VmInfo"
            ),
            reflection_pb2.ServerReflectionRequest(file_containing_extension=no_extension),
            reflection_pb2.ServerReflectionRequest(),
        ],
        service,
    )

    assert numbers.all_extension_numbers_response.base_type_name == "manatee.memory.v1.VmInfo"
    assert list(numbers.all_extension_numbers_response.extension_number) == []
    assert extension.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert empty.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
