"""The gRPC MemoryService: protobuf in, domain calls on the bridge, protobuf out.

Handlers are coroutines on the server's event loop. They validate, call the bridge, and let
ManateeErrors escape to ``_guard_async``, which aborts the RPC with the status ``_status``
builds. No mms or socket detail lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2
from google.protobuf.message import DecodeError, Message
from grpc import aio

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.core import _validation as validate
from manatee_grpc.core._books import VmRecord, VmState
from manatee_grpc.core._bridge import MemoryBridge
from manatee_grpc.core._errors import (
    InvalidArgumentError,
    LaunchAbortedError,
    ManateeError,
    ServerShuttingDownError,
)
from manatee_grpc.core._events import (
    Caller,
    CaughtUp,
    Event,
    EventError,
    EventKind,
    EventLog,
    Missed,
    Origin,
    event_error,
)
from manatee_grpc.core._launch import (
    ClientItem,
    Inbox,
    Launched,
    LaunchEvent,
    LaunchPolicy,
    LaunchRun,
    Progress,
    Queued,
    Reserved,
    StopVm,
    StreamEnded,
    Unexpected,
    VmStarted,
    VmStartFailed,
    VmStopped,
)
from manatee_grpc.core._request_ids import validate_request_id
from manatee_grpc.core._stats import StatsSnapshot
from manatee_grpc.core._watch import WatchHub
from manatee_grpc.mms._messages import (
    BALLOON_STAT_FIELDS,
    CROS_GUEST_VM_ID,
    BalloonDelta,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)
from manatee_grpc.server._status import to_status, unexpected_status

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")
M = TypeVar("M", pb.GetBalloonStatsResponse, pb.BalloonStatsSnapshot)

# The server ends its own wait this much before the caller's deadline, so that its
# DEADLINE_EXCEEDED (with ErrorInfo: was the request sent?) reaches the caller before the
# caller's own timer fires with a bare status. The answer's way back (our loop waking, the
# status frame, the caller's thread waking) is well under a millisecond on an idle machine but
# can take a few hundred on a loaded one, and a fixed 50 ms lost that race there. A tenth of
# the time left scales with what the caller can spare (a 3 s call keeps 300 ms in hand); the
# floor covers short calls, the cap keeps a long call (RemoveVm's minutes) from losing more
# than a second of its wait. See deadline_margin_s.
DEADLINE_MARGIN_FRACTION = 0.1
DEADLINE_MARGIN_MIN_S = 0.05
DEADLINE_MARGIN_MAX_S = 1.0

# More time left than this (a year) means the caller set no deadline at all.
_NO_DEADLINE_S = 365 * 24 * 3600.0

# crosvm stat name -> API field name: the API names byte amounts with `_bytes`; counts stay.
_STAT_FIELD_NAMES: dict[str, str] = {
    "swap_in": "swap_in_bytes",
    "swap_out": "swap_out_bytes",
    "major_faults": "major_faults",
    "minor_faults": "minor_faults",
    "free_memory": "free_memory_bytes",
    "total_memory": "total_memory_bytes",
    "available_memory": "available_memory_bytes",
    "disk_caches": "disk_caches_bytes",
    "hugetlb_allocations": "hugetlb_allocations",
    "hugetlb_failures": "hugetlb_failures",
    "shared_memory": "shared_memory_bytes",
    "unevictable_memory": "unevictable_memory_bytes",
}
# The API names in BalloonStats order, to zip with a BalloonStats (a NamedTuple).
_STAT_API_NAMES = tuple(_STAT_FIELD_NAMES[name] for name in BALLOON_STAT_FIELDS)


RpcObserver = Callable[[str, grpc.StatusCode, float], None]

# How long a LaunchVm stream whose client half ended early waits to be cancelled (the client
# left) before it is failed as the client's mistake; see _settle_stream_end.
STREAM_END_SETTLE_S = 1.0


def _status_of(servicer: MemoryServicer, error: Exception) -> grpc.Status:
    if isinstance(error, ManateeError):
        books = servicer.bridge.books
        session = error.metadata.get("session")
        if session is not None and session.isdigit():
            # The connection names sessions by number; callers know them by their opaque id.
            error.metadata["session"] = books.public_session_id(int(session))
        return to_status(error, books.session_id or None)
    return unexpected_status(error)


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """What the request deserializer yields for bytes that are not the method's message."""

    message_type: str
    error: str


def _tolerant_parser(message_type: type[Message]) -> Callable[[bytes], object]:
    # gRPC's own handling of a deserializer error is UNKNOWN and a traceback per call; this
    # hands the handler a marker instead, which its guard answers INVALID_ARGUMENT.
    def parse(data: bytes) -> object:
        try:
            return message_type.FromString(data)
        except DecodeError as error:
            return _Undecodable(message_type.DESCRIPTOR.full_name, str(error))

    return parse


def _refuse_undecodable(method: str, request: object) -> None:
    if isinstance(request, _Undecodable):
        logger.warning(
            "%s: the request bytes are not a %s (%s)", method, request.message_type, request.error
        )
        raise InvalidArgumentError(
            "request", f"the request bytes are not a valid {request.message_type}"
        )


def add_to_server(servicer: MemoryServicer, server: aio.Server) -> None:
    """Register the MemoryService; its unary-request methods parse their bytes tolerantly."""
    service = pb.DESCRIPTOR.services_by_name["MemoryService"]
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_type: type[Message] = getattr(pb, method.input_type.name)
        response_type: type[Message] = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            # LaunchVm: its messages are read by the launch itself (left as generated).
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour,
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
            continue
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = make(
            behaviour,
            request_deserializer=_tolerant_parser(request_type),
            response_serializer=_serialized_once,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


def _serialized_once(response: Message | bytes) -> bytes:
    # A handler may hand back bytes already serialized: GetBalloonStats gives every caller of one
    # read the same bytes, serialized once.
    return response if type(response) is bytes else response.SerializeToString()  # type: ignore[union-attr]


def _observe(
    servicer: MemoryServicer, method: str, code: grpc.StatusCode, started_s: float
) -> None:
    if servicer.observe_rpc is not None:
        servicer.observe_rpc(method, code, time.monotonic() - started_s)


# Two guards, one per handler shape, each the single place a handler's escaping error becomes
# the RPC's status (ManateeErrors as ``_status`` maps them, anything else INTERNAL) and where
# the RPC's outcome is observed. Every handler is a coroutine on the server's event loop.


def _guard_async(method: F) -> F:
    name = method.__name__

    @functools.wraps(method)
    async def unary(self: MemoryServicer, request: object, context: aio.ServicerContext) -> object:  # type: ignore[type-arg]
        started_s = time.monotonic()
        try:
            if type(request) is _Undecodable:
                _refuse_undecodable(name, request)
            response = await method(self, request, context)
        except asyncio.CancelledError:
            _observe(self, name, grpc.StatusCode.CANCELLED, started_s)
            raise
        except Exception as error:
            status = _status_of(self, error)
            _observe(self, name, _final_code(context, status.code), started_s)
            await context.abort(status.code, status.details, status.trailing_metadata)
        if self.observe_rpc is not None:  # the common case (no metrics) costs no call
            self.observe_rpc(name, grpc.StatusCode.OK, time.monotonic() - started_s)
        return response

    return cast(F, unary)


def _guard_async_stream(method: F) -> F:
    @functools.wraps(method)
    async def stream(
        self: MemoryServicer,
        request: object,
        context: aio.ServicerContext,  # type: ignore[type-arg]
    ) -> AsyncIterator[object]:
        started_s = time.monotonic()
        try:
            if not isinstance(request, AsyncIterator):
                _refuse_undecodable(method.__name__, request)
            async for message in method(self, request, context):
                yield message
        except asyncio.CancelledError:
            _observe(self, method.__name__, grpc.StatusCode.CANCELLED, started_s)
            raise
        except Exception as error:
            status = _status_of(self, error)
            _observe(self, method.__name__, _final_code(context, status.code), started_s)
            await context.abort(status.code, status.details, status.trailing_metadata)
        _observe(self, method.__name__, grpc.StatusCode.OK, started_s)

    return cast(F, stream)


def _final_code(context: aio.ServicerContext, code: grpc.StatusCode) -> grpc.StatusCode:  # type: ignore[type-arg]
    """The code the RPC really ended with: a caller that left saw CANCELLED, whatever error
    its leaving caused (a LaunchVm stream that ends before `start` reads as a bad request)."""
    return grpc.StatusCode.CANCELLED if context.cancelled() else code


def _timeout_s(context: grpc.ServicerContext | aio.ServicerContext) -> float | None:  # type: ignore[type-arg]
    """How long this call may wait for mms: the caller's deadline, less a margin."""
    remaining_s: float | None = context.time_remaining()
    # A call without a deadline reports ~9.2e18 s remaining (gRPC's infinite future);
    # waiting that long overflows the loop's timers (OverflowError -> INTERNAL).
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    # Give up a little before the caller does, so it gets our DEADLINE_EXCEEDED with its
    # ErrorInfo (was the request sent?) rather than a bare client-side timeout.
    return max(0.0, remaining_s - deadline_margin_s(remaining_s))


def deadline_margin_s(remaining_s: float) -> float:
    """How long before the caller's deadline the server stops waiting (DEADLINE_MARGIN_*)."""
    margin_s = remaining_s * DEADLINE_MARGIN_FRACTION
    margin_s = min(DEADLINE_MARGIN_MAX_S, max(DEADLINE_MARGIN_MIN_S, margin_s))
    # A call shorter than twice the floor still spends half its time trying: mms may well
    # answer within it, and giving up at once would refuse every short call.
    return min(margin_s, remaining_s / 2)


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(
        self,
        bridge: MemoryBridge,
        launch_policy: LaunchPolicy,
        watch_hub: WatchHub,
        observe_rpc: RpcObserver | None = None,
        events: EventLog | None = None,
    ) -> None:
        self.bridge = bridge
        # What happened and who asked (WatchEvents, the audit file).
        self.events = events if events is not None else EventLog()
        self._launch_policy = launch_policy
        self._watch_hub = watch_hub
        self._shutting_down = threading.Event()
        # Called with (method, final code, seconds) once per RPC: the metrics hook.
        self.observe_rpc = observe_rpc
        # Callers served by one mms read and asking for the same VMs (coalesced GetBalloonStats
        # callers, the watchers of one tick) get one message built once, not once per caller.
        session_id = bridge.books.public_session_id
        self._stats_responses = _LastConversion(pb.GetBalloonStatsResponse, session_id)
        self._watch_snapshots = _LastConversion(pb.BalloonStatsSnapshot, session_id)

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

    def _check_open(self) -> None:
        if self._shutting_down.is_set():
            raise ServerShuttingDownError("the server is shutting down")

    # --- stats ---------------------------------------------------------------------------------

    @_guard_async
    async def GetBalloonStats(
        self,
        request: pb.GetBalloonStatsRequest,
        context: aio.ServicerContext[pb.GetBalloonStatsRequest, pb.GetBalloonStatsResponse],
    ) -> pb.GetBalloonStatsResponse:
        # The hot call: the checks of an empty request (all VMs, current session) cost next
        # to nothing; any other goes through the same validation as ever.
        vm_ids = request.vm_ids
        vm_ids_checked = validate.vm_ids(vm_ids) if vm_ids else ()
        session = request.session
        session_id = validate.session_id(session) if session else ""
        self._check_open()
        snapshot = await self.bridge.get_balloon_stats_async(
            vm_ids_checked, _timeout_s(context), session_id
        )
        # The bytes every caller of this read asking the same gets (see _serialized_once).
        return cast(pb.GetBalloonStatsResponse, self._stats_responses.serialized(snapshot))

    @_guard_async_stream
    async def WatchBalloonStats(
        self,
        request: pb.WatchBalloonStatsRequest,
        context: aio.ServicerContext[pb.WatchBalloonStatsRequest, pb.WatchBalloonStatsResponse],
    ) -> AsyncIterator[pb.WatchBalloonStatsResponse]:
        vm_ids = validate.vm_ids(request.vm_ids)
        # Not ToTimedelta(): a Duration of 10^11 s overflows timedelta (OverflowError).
        interval_s = validate.watch_interval(request.interval.seconds, request.interval.nanos)
        session_id = validate.session_id(request.session)
        self._check_open()
        self.bridge.check_session(session_id, "WatchBalloonStats")
        watcher = self._watch_hub.subscribe(vm_ids, interval_s)
        public = self.bridge.books.public_session_id
        try:
            # A caller that leaves cancels this coroutine while it is parked in take_async.
            while (update := await watcher.take_async()) is not None:
                message = pb.WatchBalloonStatsResponse(dropped_updates=update.dropped_updates)
                if update.reset is not None:
                    message.session_reset.previous_session = public(update.reset.previous_session)
                    message.session_reset.session = public(update.reset.session)
                elif update.outage is not None:
                    # Not the end of the watch: the stream goes on once mms answers again.
                    outage = update.outage
                    message.mms_unavailable.reason = outage.error.grpc_reason
                    message.mms_unavailable.message = outage.error.message
                    message.mms_unavailable.since.CopyFrom(_timestamp(outage.since_unix_s))
                elif update.snapshot is not None:
                    message.snapshot.CopyFrom(self._watch_snapshots.of(update.snapshot))
                yield message
        finally:
            self._watch_hub.unsubscribe(watcher)

    # --- rebalance -----------------------------------------------------------------------------

    @_guard_async
    async def RebalanceMemory(
        self,
        request: pb.RebalanceMemoryRequest,
        context: aio.ServicerContext[pb.RebalanceMemoryRequest, pb.RebalanceMemoryResponse],
    ) -> pb.RebalanceMemoryResponse:
        deltas = validate.balloon_deltas([(d.vm_id, d.delta_bytes) for d in request.deltas])
        session_id = validate.session_id(request.session)
        request_id = validate_request_id(request.request_id)
        if request.validate_only:
            # AIP-163: the answer the call would get now; no RebalanceMemory, no request id kept,
            # and no event (a preview changes nothing).
            self._check_open()
            result = await self.bridge.preview_rebalance(deltas, _timeout_s(context), session_id)
        else:
            details: dict[str, object] = {"requested_deltas": _delta_objects(deltas.items())}
            if request_id:
                details["request_id"] = request_id
            with self._recording(
                EventKind.REBALANCE_MEMORY, context, session_id, tuple(deltas), details
            ):
                self._check_open()
                result = await self.bridge.rebalance(
                    deltas, _timeout_s(context), session_id, request_id
                )
                details["applied_requested_deltas"] = _delta_objects(
                    (d.vm_id, d.delta_bytes) for d in result.requested
                )
                details["actual_deltas"] = _delta_objects(
                    (d.vm_id, d.delta_bytes) for d in result.actual
                )
                details["fully_applied"] = result.fully_applied
        return pb.RebalanceMemoryResponse(
            requested_deltas=[_delta(d) for d in result.requested],
            actual_deltas=[_delta(d) for d in result.actual],
            fully_applied=result.fully_applied,
        )

    # --- one-by-one start ----------------------------------------------------------------------

    @_guard_async
    async def PrepareVm(
        self,
        request: pb.PrepareVmRequest,
        context: aio.ServicerContext[pb.PrepareVmRequest, pb.PrepareVmResponse],
    ) -> pb.PrepareVmResponse:
        mem_size_bytes, init_mem_size_bytes = validate.mem_sizes(
            request.mem_size_bytes,
            request.init_mem_size_bytes if request.HasField("init_mem_size_bytes") else None,
        )
        request_id = validate_request_id(request.request_id)
        details: dict[str, object] = {
            "mem_size_bytes": mem_size_bytes,
            "init_mem_size_bytes": init_mem_size_bytes,
        }
        if request_id:
            details["request_id"] = request_id
        with self._recording(EventKind.PREPARE_VM, context, "", (), details) as event:
            self._check_open()
            result = await self.bridge.prepare_vm(
                mem_size_bytes, init_mem_size_bytes, _timeout_s(context), request_id
            )
            details["reserved"] = result.reserved
            details["shortfall_bytes"] = result.shortfall_bytes
            event.session, event.vm_ids = result.session_id, (result.vm_id,)
        response = pb.PrepareVmResponse(
            vm_id=result.vm_id,
            reserved=result.reserved,
            shortfall_bytes=result.shortfall_bytes,
            balloon_control_path=result.balloon_control_path,
            session=result.session_id,
        )
        if result.lease_expire_unix_s is not None:
            response.lease_expire_time.CopyFrom(_timestamp(result.lease_expire_unix_s))
        return response

    @_guard_async
    async def FinishAddVm(
        self,
        request: pb.FinishAddVmRequest,
        context: aio.ServicerContext[pb.FinishAddVmRequest, pb.FinishAddVmResponse],
    ) -> pb.FinishAddVmResponse:
        vm_id = validate.sibling_vm_id(request.vm_id)
        session_id = validate.session_id(request.session)
        with self._recording(EventKind.FINISH_ADD_VM, context, session_id, (vm_id,)):
            self._check_open()
            vm = await self.bridge.finish_add_vm(vm_id, _timeout_s(context), session_id)
        return pb.FinishAddVmResponse(vm=self._vm_info(vm))

    @_guard_async
    async def RemoveVm(
        self,
        request: pb.RemoveVmRequest,
        context: aio.ServicerContext[pb.RemoveVmRequest, pb.RemoveVmResponse],
    ) -> pb.RemoveVmResponse:
        vm_id = validate.sibling_vm_id(request.vm_id)
        session_id = validate.session_id(request.session)
        with self._recording(EventKind.REMOVE_VM, context, session_id, (vm_id,)):
            self._check_open()
            await self.bridge.remove_vm(vm_id, _timeout_s(context), session_id)
        return pb.RemoveVmResponse()

    @_guard_async
    async def ListVms(
        self,
        request: pb.ListVmsRequest,
        context: aio.ServicerContext[pb.ListVmsRequest, pb.ListVmsResponse],
    ) -> pb.ListVmsResponse:
        session, records = self.bridge.list_vms()
        return pb.ListVmsResponse(vms=[self._vm_info(r) for r in records], session=session)

    def _vm_info(self, record: VmRecord) -> pb.VmInfo:
        return _vm_info(record, self.bridge.books.public_session_id(record.session))

    # --- events --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _recording(
        self,
        kind: EventKind,
        context: aio.ServicerContext,  # type: ignore[type-arg]
        session_id: str,
        vm_ids: tuple[int, ...],
        details: dict[str, object] | None = None,
    ) -> Iterator[_PendingEvent]:
        """Records a state-changing call's one event as it ends, failed (with its error) or not;
        the call fills in what it learnt (the VM mms gave it, the deltas that moved)."""
        caller = _caller(context)
        # The session the caller named, else the one current as the call came in.
        event = _PendingEvent(session_id or self.bridge.books.session_id, vm_ids, details)
        error: EventError | None = None
        try:
            yield event
        except BaseException as raised:
            error = event_error(raised)
            raise
        finally:
            self.events.publish(
                kind,
                caller,
                session=event.session,
                vm_ids=event.vm_ids,
                details=event.details,
                error=error,
            )

    @_guard_async_stream
    async def WatchEvents(
        self,
        request: pb.WatchEventsRequest,
        context: aio.ServicerContext[pb.WatchEventsRequest, pb.WatchEventsResponse],
    ) -> AsyncIterator[pb.WatchEventsResponse]:
        kinds = _event_kinds(request.kinds)
        self._check_open()
        replay_last = min(request.replay_last, self.events.capacity)
        subscription = self.events.subscribe(replay_last, kinds)
        try:
            while (item := await subscription.take_async()) is not None:
                if isinstance(item, CaughtUp):
                    yield pb.WatchEventsResponse(
                        caught_up=pb.WatchEventsResponse.CaughtUp(last_sequence=item.last_sequence)
                    )
                elif isinstance(item, Missed):
                    yield pb.WatchEventsResponse(
                        events_missed=pb.WatchEventsResponse.EventsMissed(
                            count=item.count,
                            first_sequence=item.first_sequence,
                            last_sequence=item.last_sequence,
                        )
                    )
                else:
                    yield pb.WatchEventsResponse(event=_event_message(item))
        finally:
            self.events.unsubscribe(subscription)
        # The log ended its subscriptions: the server is going away.
        raise ServerShuttingDownError("the server is shutting down")

    # --- launch --------------------------------------------------------------------------------

    # The generated stub types a stream handler as an iterator; gRPC also takes a coroutine
    # that writes through the context (its "reader/writer API"), which this is.
    @_guard_async
    async def LaunchVm(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.LaunchVmRequest],
        context: aio.ServicerContext[pb.LaunchVmRequest, pb.LaunchVmResponse],
    ) -> None:
        # A coroutine writing with context.write (not a generator): when the caller leaves, the
        # launch is cancelled where it waits and its finally blocks release what it holds.
        self._check_open()
        timeout_s = _timeout_s(context)
        first = await anext(aiter(request_iterator), None)
        if first is None:
            await _settle_stream_end()
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidArgumentError("start", "the first LaunchVm message must be `start`")
        start = first.start
        mem_size_bytes, init_mem_size_bytes = validate.mem_sizes(
            start.mem_size_bytes,
            start.init_mem_size_bytes if start.HasField("init_mem_size_bytes") else None,
            prefix="start.",
        )
        inbox = Inbox()
        reader = asyncio.create_task(_read_client(request_iterator, inbox))
        run = LaunchRun(
            self.bridge,
            mem_size_bytes=mem_size_bytes,
            init_mem_size_bytes=init_mem_size_bytes,
            inbox=inbox,
            policy=self._launch_policy,
            caller_gone=context.cancelled,
        )

        caller = _caller(context)
        details = {"mem_size_bytes": mem_size_bytes, "init_mem_size_bytes": init_mem_size_bytes}
        slot = self.bridge.slot
        if slot.claim is not None or slot.launches_waiting():
            self.events.publish(
                EventKind.LAUNCH_QUEUED,
                caller,
                session=self.bridge.books.session_id,
                details={**details, "launches_waiting": slot.launches_waiting() + 1},
            )
        # The VM and its session once mms answered: the launch's event names them.
        started: list[tuple[int, int]] = []

        async def emit(event: LaunchEvent) -> None:
            if isinstance(event, Reserved | Launched):
                started[:] = [(event.vm_id, event.session)]
            await context.write(self._launch_event(event))

        def record(kind: EventKind, error: EventError | None = None) -> None:
            public = self.bridge.books.public_session_id
            self.events.publish(
                kind,
                caller,
                session=public(started[0][1]) if started else self.bridge.books.session_id,
                vm_ids=(started[0][0],) if started else (),
                details=details,
                error=error,
            )

        try:
            await run.run(emit, timeout_s)
        except BaseException as error:
            if isinstance(error, LaunchAbortedError):
                # The client's half of the stream ended before `launched`: a client that hung
                # up shows it within a moment (its cancellation interrupts this wait).
                try:
                    await _settle_stream_end()
                except asyncio.CancelledError as cancelled:
                    record(EventKind.LAUNCH_ABORTED, event_error(cancelled))
                    raise
            aborted = isinstance(
                error, asyncio.CancelledError | LaunchAbortedError | ServerShuttingDownError
            )
            kind = EventKind.LAUNCH_ABORTED if aborted else EventKind.LAUNCH_FAILED
            record(kind, event_error(error))
            raise
        finally:
            reader.cancel()
        record(EventKind.LAUNCH_LAUNCHED)

    def _launch_event(self, event: LaunchEvent) -> pb.LaunchVmResponse:
        message = pb.LaunchVmResponse()
        if isinstance(event, Queued):
            message.queued.position = event.position
        elif isinstance(event, Progress):
            message.progress.attempt = event.attempt
            message.progress.shortfall_bytes = event.shortfall_bytes
            if event.next_attempt_delay_s is not None:
                message.progress.next_attempt_delay.CopyFrom(_duration(event.next_attempt_delay_s))
        elif isinstance(event, Reserved):
            message.reserved.vm_id = event.vm_id
            message.reserved.balloon_control_path = event.balloon_control_path
            message.reserved.lease_expire_time.CopyFrom(_timestamp(event.lease_expire_unix_s))
            # The session mms answered in, not the current one (the launch checked they match).
            message.reserved.session = self.bridge.books.public_session_id(event.session)
        elif isinstance(event, StopVm):
            message.stop_vm.vm_id = event.vm_id
            message.stop_vm.reason = event.reason
        elif isinstance(event, Launched):
            message.launched.vm_id = event.vm_id
            message.launched.session = self.bridge.books.public_session_id(event.session)
            record = self.bridge.books.vm(event.vm_id)
            if record is not None and record.session == event.session:
                message.launched.vm.CopyFrom(self._vm_info(record))
        return message


@dataclass(slots=True)
class _PendingEvent:
    """What a state-changing call's event will say, filled in as the call learns it."""

    session: str
    vm_ids: tuple[int, ...]
    details: dict[str, object] | None


def _caller(context: aio.ServicerContext) -> Caller:  # type: ignore[type-arg]
    """Who is calling: gRPC's peer address, and the client certificate's subject under mTLS."""
    subject = ""
    auth = context.auth_context()
    values = list(auth.get("x509_subject") or ())
    common_names = list(auth.get("x509_common_name") or ())
    if values:
        subject = values[0].decode(errors="replace")
    elif common_names:
        subject = "CN=" + common_names[0].decode(errors="replace")
    return Caller(Origin.CLIENT, context.peer() or "", subject)


_EVENT_KINDS: dict[int, EventKind] = {
    pb.EventKind.Value(f"EVENT_KIND_{kind.value}"): kind for kind in EventKind
}
_EVENT_KIND_NUMBERS: dict[EventKind, int] = {kind: number for number, kind in _EVENT_KINDS.items()}


def _event_kinds(numbers: Iterable[int]) -> frozenset[EventKind]:
    kinds = set()
    for index, number in enumerate(numbers):
        kind = _EVENT_KINDS.get(number)
        if number == pb.EVENT_KIND_UNSPECIFIED:
            raise InvalidArgumentError(
                f"kinds[{index}]",
                "EVENT_KIND_UNSPECIFIED is no kind; leave kinds empty for every kind",
            )
        if kind is None:
            raise InvalidArgumentError(f"kinds[{index}]", f"{number} is not a known EventKind")
        kinds.add(kind)
    return frozenset(kinds)


def _event_message(event: Event) -> pb.Event:
    details = struct_pb2.Struct()
    if event.details:
        details.update(event.details)
    message = pb.Event(
        sequence=event.sequence,
        time=_timestamp(event.time_unix_s),
        kind=_EVENT_KIND_NUMBERS[event.kind],  # type: ignore[arg-type]
        caller=pb.EventCaller(
            origin=event.caller.origin.value,
            peer=event.caller.peer,
            certificate_subject=event.caller.certificate_subject,
        ),
        session=event.session,
        vm_ids=event.vm_ids,
        details=details,
    )
    if event.error is not None:
        message.error.CopyFrom(
            pb.EventError(
                code=event.error.code, reason=event.error.reason, message=event.error.message
            )
        )
    return message


def _delta_objects(deltas: Iterable[tuple[int, int]]) -> list[dict[str, int]]:
    return [{"vm_id": vm_id, "delta_bytes": delta_bytes} for vm_id, delta_bytes in deltas]


async def _settle_stream_end() -> None:
    """Give a LaunchVm stream whose client half ended a moment to show that its client left.

    gRPC hands the handler the end of the client's stream before the cancellation of a client
    that hung up. Blamed at once, that client would count as a bad request (INVALID_ARGUMENT,
    or ABORTED mid-launch) instead of the CANCELLED it is; a cancellation that comes within
    ``STREAM_END_SETTLE_S`` interrupts this wait. Only a client that half-closed too early
    (a bug) waits this much longer for its error; the launch has released everything by now.

    A sleep, because grpc.aio gives no other sign: for a peer's cancellation (grpcio 1.85)
    ``context.cancelled()`` and ``context.done()`` stay False (they follow the status this
    server sets), and ``add_done_callback`` runs only when this handler ends. The cancellation
    gRPC injects into this task is the one signal, and this wait is how long it is awaited.
    """
    await asyncio.sleep(STREAM_END_SETTLE_S)


async def _read_client(requests: AsyncIterator[pb.LaunchVmRequest], inbox: Inbox) -> None:
    """Feed the launch's inbox from the client's half of the stream."""
    try:
        async for request in requests:
            inbox.put(_client_event(request))
    except asyncio.CancelledError:
        raise  # the launch is over; nothing more to tell it
    except Exception:  # the stream broke (cancelled, reset): same as the client leaving
        logger.debug("launch stream reader ended with an error", exc_info=True)
    inbox.put(StreamEnded())


def _client_event(request: pb.LaunchVmRequest) -> ClientItem:
    kind = request.WhichOneof("event")
    if kind == "vm_started":
        return VmStarted()
    if kind == "vm_start_failed":
        return VmStartFailed(request.vm_start_failed.reason)
    if kind == "vm_stopped":
        return VmStopped()
    return Unexpected(kind or "event")


# --- conversions ---------------------------------------------------------------------------------


class _LastConversion(Generic[M]):
    """The message for the last snapshot converted, reused while the same read and VMs come.

    The message is handed to every such caller as is: gRPC only reads it to serialize it.
    """

    def __init__(self, message_type: type[M], session_id: Callable[[int], str]) -> None:
        self._message_type: type[M] = message_type
        self._session_id = session_id
        # (snapshot, its read, message) of the last conversion.
        self._last: tuple[StatsSnapshot, object, M] | None = None
        # The last message's bytes, for callers that share it (GetBalloonStats).
        self._last_bytes: tuple[M, bytes] | None = None

    def of(self, snapshot: StatsSnapshot) -> M:
        last = self._last
        if last is not None and snapshot is last[0]:
            return last[2]  # the usual case: callers of one read share its snapshot object
        source = snapshot if snapshot.source is None else snapshot.source
        if last is not None and last[1] is source and _covers(last[0]) == _covers(snapshot):
            message = last[2]
        else:
            message = self._message_type(
                missing_vm_ids=snapshot.missing_vm_ids, session=self._session_id(snapshot.session)
            )
            _set_timestamp(message.read_time, snapshot.read_time_unix_s)
            add_stats = message.stats.add
            for entry in snapshot.stats:
                _add_vm_stats(add_stats, entry)
            if snapshot.unreadable:
                message.unreadable_vms.extend(
                    _unreadable_vm(entry) for entry in snapshot.unreadable
                )
        self._last = (snapshot, source, message)
        return message

    def serialized(self, snapshot: StatsSnapshot) -> bytes:
        """``of(snapshot)`` serialized, once for every caller it is shared with."""
        message = self.of(snapshot)
        cached = self._last_bytes
        if cached is None or cached[0] is not message:
            cached = self._last_bytes = (message, message.SerializeToString())
        return cached[1]


def _covers(snapshot: StatsSnapshot) -> tuple[tuple[int, ...], tuple[int, ...]]:
    # Unreadable ids are also missing ones, so the two id lists say which VMs it covers.
    return tuple(entry.vm_id for entry in snapshot.stats), snapshot.missing_vm_ids


def _add_vm_stats(add: Callable[..., pb.VmBalloonStats], entry: VmBalloonStats) -> None:
    # Absent stays absent (proto3 optional keeps the difference). Built in place in the
    # response, by one call: this runs for every VM of every stats answer, and a message built
    # apart and then copied into the response costs half as much again.
    present = {
        api_name: value
        for api_name, value in zip(_STAT_API_NAMES, entry.stats, strict=True)
        if value is not None
    }
    add(vm_id=entry.vm_id, balloon_actual_bytes=entry.balloon_actual_bytes, **present)


_UNREADABLE_REASONS = {
    UnreadableReason.WRAPPED: pb.UNREADABLE_REASON_WRAPPED,
    UnreadableReason.TOO_LARGE: pb.UNREADABLE_REASON_TOO_LARGE,
    UnreadableReason.NEGATIVE: pb.UNREADABLE_REASON_NEGATIVE,
    UnreadableReason.NOT_AN_INTEGER: pb.UNREADABLE_REASON_NOT_AN_INTEGER,
    UnreadableReason.MISSING: pb.UNREADABLE_REASON_MISSING,
    UnreadableReason.NOT_AN_OBJECT: pb.UNREADABLE_REASON_NOT_AN_OBJECT,
}


def _unreadable_vm(entry: UnreadableVm) -> pb.UnreadableVm:
    return pb.UnreadableVm(
        vm_id=entry.vm_id,
        reason=_UNREADABLE_REASONS[entry.reason],
        mms_field=entry.mms_field,
        mms_value=entry.mms_value,
    )


def _delta(delta: BalloonDelta) -> pb.BalloonDelta:
    return pb.BalloonDelta(vm_id=delta.vm_id, delta_bytes=delta.delta_bytes)


_VM_STATES = {
    VmState.STARTING: pb.VM_STATE_STARTING,
    VmState.FAILED: pb.VM_STATE_START_FAILED,
    VmState.RUNNING: pb.VM_STATE_RUNNING,
}


def _vm_info(record: VmRecord, session_id: str) -> pb.VmInfo:
    return pb.VmInfo(
        session=session_id,
        vm_id=record.vm_id,
        mem_size_bytes=record.mem_size_bytes,
        init_mem_size_bytes=record.init_mem_size_bytes,
        state=_VM_STATES[record.state],
        cros_guest=record.vm_id == CROS_GUEST_VM_ID,
        since=_timestamp(record.since_unix_s),
    )


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    # One constructor call (FromNanoseconds costs more).
    seconds, nanos = divmod(int(unix_s * 1e9), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _set_timestamp(timestamp: timestamp_pb2.Timestamp, unix_s: float) -> None:
    # In place: a stats answer sets one per read, and a Timestamp built apart is then copied.
    timestamp.seconds, timestamp.nanos = divmod(int(unix_s * 1e9), 1_000_000_000)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
