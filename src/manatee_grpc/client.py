"""A typed, synchronous Python client for manatee.memory.v1.MemoryService.

One method per RPC, returning the generated messages; every failure is a ``ManateeRpcError``
with the google.rpc details (ErrorInfo, BadRequest, RetryInfo) already unpacked.
``launch_vm`` runs the LaunchVm stream with callbacks, the way concierge's LaunchVm did.

VM ids repeat across mms sessions, so every answer that gives VM ids says their ``session``,
and every method that names a VM takes the ``session`` the id came from: the server refuses
(NOT_FOUND, SESSION_RESET) an id from another session instead of acting on the VM that has
that id now. ``rebalance_memory`` sends a ``request_id`` (a new UUID per call unless given; a
failure carries it as ``ManateeRpcError.request_id``): pass it again to retry a call whose
outcome you did not learn, and the server answers the first call's result without acting twice.
``prepare_vm`` sends one only if given, because with one a reservation outlives a call the
caller gave up on (under the server's lease) so that the retry finds it.
"""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc

__all__ = ["Client", "FieldViolation", "ManateeRpcError"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name

_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of an INVALID_ARGUMENT request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str


class ManateeRpcError(Exception):
    """A failed call: the gRPC status code plus the server's google.rpc error details.

    ``reason`` and ``metadata`` come from ErrorInfo ("" and {} when the status has none, e.g. a
    client-side DEADLINE_EXCEEDED); ``field_violations`` from BadRequest; ``retry_delay_s``
    from RetryInfo (None when retrying will not help).
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
        """Unpack a failed call; the one place that reads gRPC errors."""
        code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
        message = (error.details() if isinstance(error, grpc.Call) else str(error)) or ""
        details: list[any_pb2.Any] = []
        if isinstance(error, grpc.Call):
            try:
                status = rpc_status.from_call(error)
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
def _translated(request_id: str | None = None) -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as error:
        translated = ManateeRpcError.from_rpc_error(error)
        translated.request_id = request_id or None
        raise translated from error


# A launch waits for the launches queued ahead of it, up to 5 reservation attempts (5 s of
# back-off) and the caller's own crosvm start: minutes at most. A launch must never hang for
# ever on a server or network that went quiet, so it has a deadline unless the caller opts out.
DEFAULT_LAUNCH_TIMEOUT_S = 300.0


class Client:
    """A connection to a manatee-grpc server.

    ``target`` is ``HOST:PORT`` or ``unix:///abs/path``. ``timeout_s`` is the deadline of each
    unary call. ``credentials`` (e.g. ``grpc.ssl_channel_credentials(...)``) makes the channel
    TLS. Pass ``channel`` to reuse a channel you own: the client then leaves it open.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 10.0,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        if channel is None:
            channel = (
                grpc.insecure_channel(target)
                if credentials is None
                else grpc.secure_channel(target, credentials)
            )
        self._channel = channel
        self._stub = pb_grpc.MemoryServiceStub(self._channel)

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # --- unary RPCs ------------------------------------------------------------------------------

    def get_balloon_stats(
        self, vm_ids: Iterable[int] = (), *, session: str = ""
    ) -> pb.GetBalloonStatsResponse:
        """``session``: where ``vm_ids`` came from ("" = the current session)."""
        request = pb.GetBalloonStatsRequest(vm_ids=list(vm_ids), session=session)
        with _translated():
            return self._stub.GetBalloonStats(request, timeout=self.timeout_s)

    def rebalance_memory(
        self, deltas: Mapping[int, int], *, session: str = "", request_id: str | None = None
    ) -> pb.RebalanceMemoryResponse:
        """Balloon deltas in bytes by sibling VM id: positive takes memory from that VM.

        ``session``: where the ids came from ("" = current). ``request_id``: a new UUID unless
        given; give the one of a call whose outcome you missed to retry it safely.
        """
        request = pb.RebalanceMemoryRequest(
            deltas=[pb.BalloonDelta(vm_id=vm, delta_bytes=delta) for vm, delta in deltas.items()],
            session=session,
            request_id=request_id or new_request_id(),
        )
        with _translated(request.request_id):
            return self._stub.RebalanceMemory(request, timeout=self.timeout_s)

    def prepare_vm(
        self,
        mem_size_bytes: int,
        init_mem_size_bytes: int | None = None,
        *,
        request_id: str | None = None,
    ) -> pb.PrepareVmResponse:
        """One reservation attempt; the answer's ``session`` is the one its ``vm_id`` is in.

        With ``request_id`` (e.g. ``new_request_id()``) the call can be retried safely, and a
        reservation it made outlives the call if you give up on it (the server's lease bounds
        it); without one, the server removes what a call it could not answer reserved.
        """
        request = pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes, request_id=request_id or "")
        if init_mem_size_bytes is not None:
            request.init_mem_size_bytes = init_mem_size_bytes
        with _translated(request_id):
            return self._stub.PrepareVm(request, timeout=self.timeout_s)

    def finish_add_vm(self, vm_id: int, *, session: str = "") -> pb.FinishAddVmResponse:
        request = pb.FinishAddVmRequest(vm_id=vm_id, session=session)
        with _translated():
            return self._stub.FinishAddVm(request, timeout=self.timeout_s)

    def remove_vm(self, vm_id: int, *, session: str = "") -> pb.RemoveVmResponse:
        """Remove ``vm_id`` of ``session`` ("" = whatever VM has that id now)."""
        request = pb.RemoveVmRequest(vm_id=vm_id, session=session)
        with _translated():
            return self._stub.RemoveVm(request, timeout=self.timeout_s)

    def list_vms(self) -> pb.ListVmsResponse:
        with _translated():
            return self._stub.ListVms(pb.ListVmsRequest(), timeout=self.timeout_s)

    def health(self, service: str = SERVICE_NAME) -> str:
        """grpc.health.v1 status of ``service`` ("" for the whole server), e.g. ``"SERVING"``."""
        # The typeshed HealthStub declares no methods, so call the method by name.
        check = self._channel.unary_unary(
            _HEALTH_CHECK,
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        with _translated():
            response: health_pb2.HealthCheckResponse = check(
                health_pb2.HealthCheckRequest(service=service), timeout=self.timeout_s
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # --- streams ---------------------------------------------------------------------------------

    def watch_balloon_stats(
        self, vm_ids: Iterable[int] = (), interval_s: float = 1.0, *, session: str = ""
    ) -> Iterator[pb.WatchBalloonStatsResponse]:
        """Snapshots, session resets and mms outages until the iterator is closed (which
        cancels the call)."""
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(interval_s * 1e9))
        request = pb.WatchBalloonStatsRequest(
            vm_ids=list(vm_ids), interval=interval, session=session
        )
        return self._watch(request)

    def watch_events(
        self, replay_last: int = 0, kinds: Iterable[pb.EventKind.ValueType] = ()
    ) -> Generator[pb.WatchEventsResponse, None, None]:
        """The last ``replay_last`` events, `caught_up`, then live events, until the iterator
        is closed (which cancels the call)."""
        call = self._stub.WatchEvents(
            pb.WatchEventsRequest(replay_last=replay_last, kinds=list(kinds))
        )
        try:
            with _translated():
                yield from call
        finally:
            call.cancel()

    def _watch(
        self, request: pb.WatchBalloonStatsRequest
    ) -> Iterator[pb.WatchBalloonStatsResponse]:
        call = self._stub.WatchBalloonStats(request)
        try:
            with _translated():
                yield from call
        finally:
            call.cancel()

    def launch_vm(
        self,
        mem_size_bytes: int,
        *,
        start_vm: Callable[[int, str], bool],
        stop_vm: Callable[[int], None],
        init_mem_size_bytes: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        timeout_s: float | None = DEFAULT_LAUNCH_TIMEOUT_S,
    ) -> pb.VmInfo:
        """Launch a sibling VM over one LaunchVm stream and return it once it runs.

        ``start_vm(vm_id, balloon_control_path)`` starts crosvm once memory is reserved and says
        whether it did; ``stop_vm(vm_id)`` stops it when the server asks; ``on_progress(attempt,
        shortfall_bytes)`` hears of each reservation attempt that fell short. ``timeout_s`` bounds
        the whole launch (default 5 min, enough for a queue of launches ahead; None: no
        deadline). If a callback raises, the call is cancelled (the server releases the
        reservation) and the exception propagates.
        """
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_size_bytes)
        if init_mem_size_bytes is not None:
            start.init_mem_size_bytes = init_mem_size_bytes
        outbox: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
        outbox.put(pb.LaunchVmRequest(start=start))

        def requests() -> Iterator[pb.LaunchVmRequest]:
            # Answers are sent only after the server asked for them; None half-closes the stream.
            while (request := outbox.get()) is not None:
                yield request

        call = self._stub.LaunchVm(requests(), timeout=timeout_s)
        launched: pb.VmInfo | None = None
        finished = False
        try:
            with _translated():
                # Read to the end even after `launched`, so the call ends with the server's OK.
                for response in call:
                    event = response.WhichOneof("event")
                    if event == "progress" and on_progress is not None:
                        on_progress(response.progress.attempt, response.progress.shortfall_bytes)
                    elif event == "reserved":
                        outbox.put(_answer_reserved(response.reserved, start_vm))
                    elif event == "stop_vm":
                        stop_vm(response.stop_vm.vm_id)
                        outbox.put(pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped()))
                    elif event == "launched":
                        launched = response.launched.vm
            finished = True
        finally:
            outbox.put(None)
            if not finished:
                # A callback raised (or we were interrupted): cancelling releases the launch.
                call.cancel()
        if launched is None:
            raise ManateeRpcError(
                grpc.StatusCode.INTERNAL, "the LaunchVm stream ended without `launched`"
            )
        return launched


def new_request_id() -> str:
    """A fresh AIP-155 request id."""
    return str(uuid.uuid4())


def _answer_reserved(
    reserved: pb.LaunchVmResponse.Reserved, start_vm: Callable[[int, str], bool]
) -> pb.LaunchVmRequest:
    if start_vm(reserved.vm_id, reserved.balloon_control_path):
        return pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted())
    failed = pb.LaunchVmRequest.VmStartFailed(
        reason=f"start_vm could not start VM {reserved.vm_id}"
    )
    return pb.LaunchVmRequest(vm_start_failed=failed)
