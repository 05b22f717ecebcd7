"""gRPC server reflection, so grpcurl and similar tools can list and describe our services.

grpcio-reflection serves only ``grpc.reflection.v1alpha`` and cannot resolve a method symbol
(``grpcurl describe pkg.Service.Method`` fails on every Python server: grpc/grpc#34743). This
module serves v1alpha and v1 from one servicer that also resolves methods to their file.

Python's descriptor pools drop a file's comments (its ``source_code_info``), so reflection built
on them alone describes the API without a word of its contract. ``make proto`` therefore also
writes ``manatee_grpc/_proto/descriptor_set.binpb``, our files as protoc saw them, comments
included; those bytes are served in place of the pool's copy of the same file.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2

V1ALPHA_SERVICE_NAME = "grpc.reflection.v1alpha.ServerReflection"
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"

_METHOD_NAME = "ServerReflectionInfo"
_V1_PACKAGE = "grpc.reflection.v1"
_V1_FILE_NAME = "grpc/reflection/v1/reflection.proto"

# Written by tools/gen_proto.py (its DESCRIPTOR_SET) into the generated package.
_SOURCE_PACKAGE = "manatee_grpc._proto"
_SOURCE_DESCRIPTOR_SET = "descriptor_set.binpb"

_log = logging.getLogger(__name__)

_Request = reflection_pb2.ServerReflectionRequest
_Response = reflection_pb2.ServerReflectionResponse


def enable_reflection(server: grpc.Server | grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serve both reflection protocols on ``server``, listing ``service_names`` and themselves.

    The services' descriptors are looked up in the default descriptor pool, where the generated
    ``*_pb2`` modules register them on import.
    """
    names = sorted({*service_names, V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME})
    servicer = _ReflectionServicer(
        names, (descriptor_pool.Default(), _v1_pool()), _commented_files(descriptor_pool.Default())
    )
    # v1 is a copy of v1alpha under a new package: the messages are identical on the wire, so
    # one servicer and the v1alpha message classes serve both paths.
    # On an aio server every handler is a coroutine: a sync one would hold a pool thread that
    # never learns its caller left.
    behaviour = (
        servicer.ServerReflectionInfoAsync
        if isinstance(server, grpc.aio.Server)
        else servicer.ServerReflectionInfo
    )
    handler = grpc.stream_stream_rpc_method_handler(
        behaviour,
        request_deserializer=_Request.FromString,
        response_serializer=_Response.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(name, {_METHOD_NAME: handler})
            for name in (V1ALPHA_SERVICE_NAME, V1_SERVICE_NAME)
        ]
    )


@functools.cache
def _v1_pool() -> descriptor_pool.DescriptorPool:
    """A private pool holding ``grpc/reflection/v1/reflection.proto``, for ``describe``.

    No Python package ships the v1 descriptor, so it is derived from v1alpha's by renaming the
    file and package. It lives in its own pool so that it cannot clash with a real v1 module
    registered in the default pool later; the default pool is searched first.
    """
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix, new_prefix = f".{proto.package}.", f".{_V1_PACKAGE}."

    def rename(type_name: str) -> str:
        return new_prefix + type_name.removeprefix(old_prefix)

    proto.name = _V1_FILE_NAME
    proto.package = _V1_PACKAGE
    for message in proto.message_type:
        for field in message.field:
            if field.type_name:
                field.type_name = rename(field.type_name)
    for service in proto.service:
        for method in service.method:
            method.input_type = rename(method.input_type)
            method.output_type = rename(method.output_type)
    # The options of upstream's v1 file; v1alpha's are v1alpha-specific and deprecated.
    proto.options.Clear()
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    proto.options.java_multiple_files = True
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"

    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return pool


def _commented_files(pool: descriptor_pool.DescriptorPool) -> dict[str, bytes]:
    """File name -> serialized FileDescriptorProto with comments, for the files ``pool`` holds.

    What is served is the pool's own file plus its comments, nothing else: a file is used only
    if, comments aside, it is exactly the pool's copy (a descriptor set older than the generated
    code would describe fields that are not served; then the comment-less copy is the truth).
    """
    resource = importlib.resources.files(_SOURCE_PACKAGE) / _SOURCE_DESCRIPTOR_SET
    try:
        data = resource.read_bytes()
    except OSError as error:
        _log.warning("reflection serves no comments: cannot read %s: %s", resource, error)
        return {}
    commented: dict[str, bytes] = {}
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        try:
            registered = pool.FindFileByName(file.name)
        except KeyError:
            continue
        served = _without_json_names(file)
        bare = descriptor_pb2.FileDescriptorProto()
        bare.CopyFrom(served)
        bare.ClearField("source_code_info")
        if bare == _pool_copy(registered):
            commented[file.name] = served.SerializeToString()
        else:
            _log.warning("reflection serves %s without comments: %s is stale", file.name, resource)
    return commented


def _without_json_names(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """``file`` without the json_name protoc fills in and the pool's copy leaves out.

    Kept out on purpose: given json_name, grpcurl prints responses with camelCase keys
    (``vmId``) instead of the proto's names that the README's commands and their -d bodies use.
    """
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    pending = list(copy.message_type)
    while pending:
        message = pending.pop()
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
        pending.extend(message.nested_type)
    for extension in copy.extension:
        extension.ClearField("json_name")
    return copy


def _pool_copy(file: descriptor.FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    return proto


class _ReflectionServicer:
    """Answers reflection requests from a fixed service list and a chain of descriptor pools.

    ``commented_files`` (file name -> serialized FileDescriptorProto) replaces the pools' copies
    of those files in answers: the pools' copies carry no comments.
    """

    def __init__(
        self,
        service_names: Sequence[str],
        pools: Sequence[descriptor_pool.DescriptorPool],
        commented_files: Mapping[str, bytes],
    ) -> None:
        self._service_names = tuple(service_names)
        self._pools = tuple(pools)
        self._commented_files = dict(commented_files)

    def ServerReflectionInfo(
        self, request_iterator: Iterable[_Request], context: grpc.ServicerContext
    ) -> Iterator[_Response]:
        for request in request_iterator:
            yield self.answer(request)

    async def ServerReflectionInfoAsync(
        self, request_iterator: AsyncIterator[_Request], context: object
    ) -> AsyncIterator[_Response]:
        async for request in request_iterator:
            yield self.answer(request)

    def answer(self, request: _Request) -> _Response:
        """The response to one request of the stream; failures are in-band error responses."""
        match request.WhichOneof("message_request"):
            case "list_services":
                return _Response(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[
                            reflection_pb2.ServiceResponse(name=name)
                            for name in self._service_names
                        ]
                    ),
                )
            case "file_by_filename":
                file = self._file_by_name(request.file_by_filename)
                what = f"file {request.file_by_filename!r}"
            case "file_containing_symbol":
                file = self._file_containing_symbol(request.file_containing_symbol)
                what = f"symbol {request.file_containing_symbol!r}"
            case "file_containing_extension":
                extension = request.file_containing_extension
                file = self._file_containing_extension(
                    extension.containing_type, extension.extension_number
                )
                what = f"extension {extension.extension_number} of {extension.containing_type!r}"
            case "all_extension_numbers_of_type":
                return self._extension_numbers(request)
            case _:
                return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "unknown request kind")
        if file is None:
            return _error(request, grpc.StatusCode.NOT_FOUND, f"{what} not found")
        return _Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=_serialized_with_dependencies(file, self._commented_files)
            ),
        )

    def _file_by_name(self, name: str) -> descriptor.FileDescriptor | None:
        for pool in self._pools:
            try:
                return pool.FindFileByName(name)
            except KeyError:
                continue
        return None

    def _file_containing_symbol(self, symbol: str) -> descriptor.FileDescriptor | None:
        parent, _, leaf = symbol.rpartition(".")
        for pool in self._pools:
            try:
                return pool.FindFileContainingSymbol(symbol)
            except KeyError:
                pass
            # Python pools do not index methods (grpc/grpc#34743): find the service instead.
            try:
                service = pool.FindServiceByName(parent)
            except KeyError:
                continue
            if leaf in service.methods_by_name:
                return service.file
        return None

    def _file_containing_extension(
        self, containing_type: str, number: int
    ) -> descriptor.FileDescriptor | None:
        for pool in self._pools:
            try:
                message = pool.FindMessageTypeByName(containing_type)
                extension = pool.FindExtensionByNumber(message, number)
                return pool.FindFileContainingSymbol(extension.full_name)
            except KeyError:
                continue
        return None

    def _extension_numbers(self, request: _Request) -> _Response:
        containing_type = request.all_extension_numbers_of_type
        for pool in self._pools:
            try:
                message = pool.FindMessageTypeByName(containing_type)
            except KeyError:
                continue
            return _Response(
                original_request=request,
                all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                    base_type_name=message.full_name,
                    extension_number=sorted(e.number for e in pool.FindAllExtensions(message)),
                ),
            )
        return _error(request, grpc.StatusCode.NOT_FOUND, f"type {containing_type!r} not found")


def _serialized_with_dependencies(
    file: descriptor.FileDescriptor, commented_files: Mapping[str, bytes]
) -> list[bytes]:
    """``file`` then every file it imports, transitively, each once; with comments if known.

    Sending all of them every time lets a client that caches nothing build the descriptors.
    """
    ordered: dict[str, descriptor.FileDescriptor] = {}
    pending = [file]
    while pending:
        current = pending.pop()
        if current.name not in ordered:
            ordered[current.name] = current
            pending.extend(reversed(current.dependencies))
    return [
        commented_files.get(each.name) or _pool_copy(each).SerializeToString()
        for each in ordered.values()
    ]


def _error(request: _Request, code: grpc.StatusCode, message: str) -> _Response:
    # In-band errors carry the numeric status code, as the reflection protocol defines.
    number: int = code.value[0]
    return _Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=number, error_message=message),
    )
