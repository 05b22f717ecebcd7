"""What the synchronous ``manatee_grpc.client`` and the asyncio ``manatee_grpc.aio`` share.

Everything here is free of I/O: the defaults, the channel each opens, the requests each sends,
the decoding of a failed call into ``ManateeRpcError``, and the client's half of the LaunchVm
protocol. Both clients call these and only do the waiting themselves (a thread for one, the event
loop for the other), so they cannot drift apart. Like the clients, this module imports grpc and
the generated code only (the import-linter contract in pyproject.toml holds it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, overload

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name

# The deadline of each unary call unless the caller sets ``timeout_s``.
DEFAULT_TIMEOUT_S = 10.0

# A launch waits for the launches queued ahead of it, up to 5 reservation attempts (5 s of
# back-off) and the caller's own crosvm start: minutes at most. A launch must never hang for
# ever on a server or network that went quiet, so it has a deadline unless the caller opts out.
DEFAULT_LAUNCH_TIMEOUT_S = 300.0

DEFAULT_WATCH_INTERVAL_S = 1.0

# grpc.health.v1 Check by name: the typeshed HealthStub declares no methods.
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
HEALTH_CHECK_CODECS: dict[str, Any] = {
    "request_serializer": health_pb2.HealthCheckRequest.SerializeToString,
    "response_deserializer": health_pb2.HealthCheckResponse.FromString,
}


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of an INVALID_ARGUMENT request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class ManateeRpcError(Exception):
    """A failed call: the gRPC status code plus the server's google.rpc error details.

    ``reason`` and ``metadata`` come from ErrorInfo ("" and {} when the status has none, e.g. a
    client-side DEADLINE_EXCEEDED); ``field_violations`` from BadRequest; ``retry_delay_s``
    from RetryInfo (None when retrying will not help). Both clients raise this one class.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        retry_delay_s: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}{f' ({reason})' if reason else ''}: {message}")
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata: dict[str, str] = dict(metadata or {})
        self.field_violations: tuple[FieldViolation, ...] = tuple(field_violations)
        self.retry_delay_s = retry_delay_s
        # The request id the failed call carried (RebalanceMemory, PrepareVm): retry with it.
        self.request_id: str | None = None

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> ManateeRpcError:
        """Unpack a failed call, sync (``grpc.Call``) or asyncio (``grpc.aio.AioRpcError``);
        the one place that reads gRPC errors."""
        # An AioRpcError is a finished call's snapshot with the same three sync accessors.
        call: Any = error if isinstance(error, grpc.Call | grpc.aio.AioRpcError) else None
        code: grpc.StatusCode = call.code() if call is not None else grpc.StatusCode.UNKNOWN
        message: str = (call.details() if call is not None else str(error)) or ""
        details: list[any_pb2.Any] = []
        if call is not None:
            try:
                status = rpc_status.from_call(call)
            except ValueError:  # a status whose code or message disagrees with the call's
                status = None
            if status is not None:
                details = list(status.details)
        info = error_details_pb2.ErrorInfo()
        violations: list[FieldViolation] = []
        retry_delay_s: float | None = None
        for detail in details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [FieldViolation(v.field, v.description) for v in bad.field_violations]
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_delay_s = retry.retry_delay.ToTimedelta().total_seconds()
        return cls(
            code,
            message,
            reason=str(info.reason),
            domain=str(info.domain),
            metadata={str(k): str(v) for k, v in info.metadata.items()},
            field_violations=violations,
            retry_delay_s=retry_delay_s,
        )


@contextmanager
def translated(request_id: str | None = None) -> Iterator[None]:
    """Turn a gRPC failure inside the block into ``ManateeRpcError`` (also around ``await``)."""
    try:
        yield
    except grpc.RpcError as error:
        failure = ManateeRpcError.from_rpc_error(error)
        failure.request_id = request_id or None
        raise failure from error


def new_request_id() -> str:
    """A fresh AIP-155 request id."""
    return str(uuid.uuid4())


# --- channels ------------------------------------------------------------------------------------


@overload
def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, *, aio: Literal[False]
) -> grpc.Channel: ...
@overload
def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, *, aio: Literal[True]
) -> grpc.aio.Channel: ...
def open_channel(
    target: str, credentials: grpc.ChannelCredentials | None, *, aio: bool
) -> grpc.Channel | grpc.aio.Channel:
    """``target`` is ``HOST:PORT`` or ``unix:///abs/path``; ``credentials`` make it TLS."""
    api: Any = grpc.aio if aio else grpc
    if credentials is None:
        return api.insecure_channel(target)  # type: ignore[no-any-return]
    return api.secure_channel(target, credentials)  # type: ignore[no-any-return]


# --- requests ------------------------------------------------------------------------------------


def stats_request(vm_ids: Iterable[int], session: str) -> pb.GetBalloonStatsRequest:
    return pb.GetBalloonStatsRequest(vm_ids=list(vm_ids), session=session)


def rebalance_request(
    deltas: Mapping[int, int],
    session: str,
    request_id: str | None,
    validate_only: bool = False,
) -> pb.RebalanceMemoryRequest:
    """Every rebalance carries a request id (a new one unless given), so it can be retried; a
    preview (``validate_only``) carries one only when given, since the server does not record it."""
    if request_id is None and not validate_only:
        request_id = new_request_id()
    return pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm, delta_bytes=delta) for vm, delta in deltas.items()],
        session=session,
        request_id=request_id or "",
        validate_only=validate_only,
    )


def watch_events_request(
    replay_last: int, kinds: Iterable[pb.EventKind.ValueType]
) -> pb.WatchEventsRequest:
    return pb.WatchEventsRequest(replay_last=replay_last, kinds=list(kinds))


def prepare_request(
    mem_size_bytes: int, init_mem_size_bytes: int | None, request_id: str | None
) -> pb.PrepareVmRequest:
    """A PrepareVm carries a request id only when given: with one, the server keeps what a call
    the caller gave up on reserved (so its retry finds it)."""
    request = pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes, request_id=request_id or "")
    if init_mem_size_bytes is not None:
        request.init_mem_size_bytes = init_mem_size_bytes
    return request


def finish_request(vm_id: int, session: str) -> pb.FinishAddVmRequest:
    return pb.FinishAddVmRequest(vm_id=vm_id, session=session)


def remove_request(vm_id: int, session: str) -> pb.RemoveVmRequest:
    return pb.RemoveVmRequest(vm_id=vm_id, session=session)


def list_request() -> pb.ListVmsRequest:
    return pb.ListVmsRequest()


def health_request(service: str) -> health_pb2.HealthCheckRequest:
    return health_pb2.HealthCheckRequest(service=service)


def health_status(response: health_pb2.HealthCheckResponse) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def watch_request(
    vm_ids: Iterable[int], interval_s: float, session: str
) -> pb.WatchBalloonStatsRequest:
    interval = duration_pb2.Duration()
    interval.FromNanoseconds(round(interval_s * 1e9))
    return pb.WatchBalloonStatsRequest(vm_ids=list(vm_ids), interval=interval, session=session)


# --- LaunchVm ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """A reservation attempt fell short: tell ``on_progress``."""

    attempt: int
    shortfall_bytes: int


@dataclass(frozen=True)
class Queued:
    """The launch waits for the device's one pending start: tell ``on_queued`` its place (1:
    next), sent when it queues and each time it moves up."""

    position: int


@dataclass(frozen=True)
class StartVm:
    """Memory is reserved: call ``start_vm`` and answer with ``LaunchExchange.started``."""

    vm_id: int
    balloon_control_path: str


@dataclass(frozen=True)
class StopVm:
    """The server asks to stop the VM: call ``stop_vm`` and answer ``LaunchExchange.stopped``."""

    vm_id: int


class LaunchExchange:
    """The client's half of one LaunchVm stream, without I/O.

    Send ``first_request``; feed every response to ``on_response`` and do what it returns
    (answers are sent only after the server asked for them); read the stream to its end, so the
    call ends with the server's OK; then ``result()``.
    """

    def __init__(self, mem_size_bytes: int, init_mem_size_bytes: int | None) -> None:
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes)
        if init_mem_size_bytes is not None:
            start.init_mem_size_bytes = init_mem_size_bytes
        self.first_request = pb.LaunchVmRequest(start=start)
        self._launched: pb.VmInfo | None = None

    def on_response(
        self, response: pb.LaunchVmResponse
    ) -> Queued | Progress | StartVm | StopVm | None:
        event = response.WhichOneof("event")
        if event == "queued":
            return Queued(response.queued.position)
        if event == "progress":
            return Progress(response.progress.attempt, response.progress.shortfall_bytes)
        if event == "reserved":
            return StartVm(response.reserved.vm_id, response.reserved.balloon_control_path)
        if event == "stop_vm":
            return StopVm(response.stop_vm.vm_id)
        if event == "launched":
            self._launched = response.launched.vm
        return None  # `launched`, or an event this client does not act on

    @staticmethod
    def started(step: StartVm, started: bool) -> pb.LaunchVmRequest:
        """The answer to ``StartVm``: whether ``start_vm`` started the VM."""
        if started:
            return pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted())
        reason = f"start_vm could not start VM {step.vm_id}"
        failed = pb.LaunchVmRequest.VmStartFailed(reason=reason)
        return pb.LaunchVmRequest(vm_start_failed=failed)

    @staticmethod
    def stopped() -> pb.LaunchVmRequest:
        return pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped())

    def result(self) -> pb.VmInfo:
        """The launched VM, once the stream ended with OK."""
        if self._launched is None:
            raise ManateeRpcError(
                grpc.StatusCode.INTERNAL, "the LaunchVm stream ended without `launched`"
            )
        return self._launched
