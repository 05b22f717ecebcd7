"""The gRPC MemoryService: protobuf in, domain calls on the bridge, protobuf out.

Handlers validate, call the bridge, and let ManateeErrors escape to ``_guard``, which aborts the
RPC with the status ``_status`` builds. No mms or socket detail lives here.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, timestamp_pb2

from . import _validation as validate
from ._books import VmRecord, VmState
from ._bridge import CallContext, MemoryBridge
from ._errors import InvalidArgumentError, ManateeError, ServerShuttingDownError
from ._launch import (
    Inbox,
    InboxItem,
    Launched,
    LaunchEvent,
    LaunchPolicy,
    LaunchRun,
    Progress,
    Reserved,
    StopVm,
    StreamEnded,
    Unexpected,
    VmStarted,
    VmStartFailed,
    VmStopped,
)
from ._messages import BALLOON_STAT_FIELDS, CROS_GUEST_VM_ID, BalloonDelta, VmBalloonStats
from ._proto.manatee.memory.v1 import memory_service_pb2 as pb
from ._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc
from ._stats import StatsSnapshot
from ._status import to_status, unexpected_status
from ._watch import WatchHub

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

DEADLINE_MARGIN_S = 0.05

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


def _guard(method: F) -> F:
    """Turn escaping errors into a status: ManateeErrors as mapped, anything else INTERNAL."""

    @functools.wraps(method)
    def unary(self: MemoryServicer, request: object, context: grpc.ServicerContext) -> object:
        try:
            return method(self, request, context)
        except ManateeError as error:
            context.abort_with_status(to_status(error, self.bridge.books.session))
        except Exception as error:
            context.abort_with_status(unexpected_status(error))
        raise AssertionError("unreachable: abort_with_status raises")

    return cast(F, unary)


def _guard_stream(method: F) -> F:
    """The same for streaming handlers, around the whole stream."""

    @functools.wraps(method)
    def stream(
        self: MemoryServicer, request: object, context: grpc.ServicerContext
    ) -> Iterator[object]:
        try:
            yield from method(self, request, context)
        except ManateeError as error:
            context.abort_with_status(to_status(error, self.bridge.books.session))
        except Exception as error:
            context.abort_with_status(unexpected_status(error))

    return cast(F, stream)


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(
        self, bridge: MemoryBridge, launch_policy: LaunchPolicy, watch_hub: WatchHub
    ) -> None:
        self.bridge = bridge
        self._launch_policy = launch_policy
        self._watch_hub = watch_hub
        self._shutting_down = threading.Event()

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

    def _context(self, context: grpc.ServicerContext) -> CallContext:
        if self._shutting_down.is_set():
            raise ServerShuttingDownError("the server is shutting down")
        remaining_s: float | None = context.time_remaining()
        # A call without a deadline reports ~9.2e18 s remaining (gRPC's infinite future);
        # waiting that long overflows threading's timeout (OverflowError -> INTERNAL).
        if remaining_s is not None and remaining_s > _NO_DEADLINE_S:
            remaining_s = None
        if remaining_s is not None:
            # Give up a little before the caller does, so it gets our DEADLINE_EXCEEDED with
            # its ErrorInfo (was the request sent?) rather than a bare client-side timeout.
            remaining_s -= min(DEADLINE_MARGIN_S, remaining_s / 10)
        ctx = CallContext.with_timeout(remaining_s)
        if not context.add_callback(ctx.mark_gone):
            ctx.mark_gone()
        return ctx

    # --- stats ---------------------------------------------------------------------------------

    @_guard
    def GetBalloonStats(
        self, request: pb.GetBalloonStatsRequest, context: grpc.ServicerContext
    ) -> pb.GetBalloonStatsResponse:
        vm_ids = validate.vm_ids(request.vm_ids)
        ctx = self._context(context)
        snapshot = self.bridge.get_balloon_stats(vm_ids, ctx)
        response = pb.GetBalloonStatsResponse()
        _fill_snapshot(response, snapshot)
        return response

    @_guard_stream
    def WatchBalloonStats(
        self, request: pb.WatchBalloonStatsRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.WatchBalloonStatsResponse]:
        vm_ids = validate.vm_ids(request.vm_ids)
        interval_s = validate.watch_interval_s(request.interval.ToTimedelta().total_seconds())
        ctx = self._context(context)
        watcher = self._watch_hub.subscribe(vm_ids, interval_s)
        ctx.on_gone(watcher.close)
        try:
            while (update := watcher.take()) is not None:
                message = pb.WatchBalloonStatsResponse(dropped_updates=update.dropped_updates)
                if update.reset is not None:
                    message.session_reset.previous_session = update.reset.previous_session
                    message.session_reset.session = update.reset.session
                elif update.snapshot is not None:
                    _fill_snapshot(message.snapshot, update.snapshot)
                else:
                    # A failed poll is not the end of the watch: the next tick may succeed.
                    continue
                yield message
        finally:
            self._watch_hub.unsubscribe(watcher)

    # --- rebalance -----------------------------------------------------------------------------

    @_guard
    def RebalanceMemory(
        self, request: pb.RebalanceMemoryRequest, context: grpc.ServicerContext
    ) -> pb.RebalanceMemoryResponse:
        deltas = validate.balloon_deltas([(d.vm_id, d.delta_bytes) for d in request.deltas])
        result = self.bridge.rebalance(deltas, self._context(context))
        return pb.RebalanceMemoryResponse(
            requested_deltas=[_delta(d) for d in result.requested],
            actual_deltas=[_delta(d) for d in result.actual],
            fully_applied=result.fully_applied,
        )

    # --- one-by-one start ----------------------------------------------------------------------

    @_guard
    def PrepareVm(
        self, request: pb.PrepareVmRequest, context: grpc.ServicerContext
    ) -> pb.PrepareVmResponse:
        mem_size_bytes, init_mem_size_bytes = validate.mem_sizes(
            request.mem_size_bytes,
            request.init_mem_size_bytes if request.HasField("init_mem_size_bytes") else None,
        )
        result = self.bridge.prepare_vm(mem_size_bytes, init_mem_size_bytes, self._context(context))
        return pb.PrepareVmResponse(
            vm_id=result.vm_id,
            reserved=result.reserved,
            shortfall_bytes=result.shortfall_bytes,
            balloon_control_path=result.balloon_control_path,
        )

    @_guard
    def FinishAddVm(
        self, request: pb.FinishAddVmRequest, context: grpc.ServicerContext
    ) -> pb.FinishAddVmResponse:
        vm_id = validate.sibling_vm_id(request.vm_id)
        record = self.bridge.finish_add_vm(vm_id, self._context(context))
        return pb.FinishAddVmResponse(vm=_vm_info(record))

    @_guard
    def RemoveVm(
        self, request: pb.RemoveVmRequest, context: grpc.ServicerContext
    ) -> pb.RemoveVmResponse:
        vm_id = validate.sibling_vm_id(request.vm_id)
        self.bridge.remove_vm(vm_id, self._context(context))
        return pb.RemoveVmResponse()

    @_guard
    def ListVms(
        self, request: pb.ListVmsRequest, context: grpc.ServicerContext
    ) -> pb.ListVmsResponse:
        session, records = self.bridge.list_vms()
        return pb.ListVmsResponse(vms=[_vm_info(r) for r in records], session=session)

    # --- launch --------------------------------------------------------------------------------

    @_guard_stream
    def LaunchVm(
        self, request_iterator: Iterator[pb.LaunchVmRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.LaunchVmResponse]:
        ctx = self._context(context)
        first = next(request_iterator, None)
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidArgumentError("start", "the first LaunchVm message must be `start`")
        start = first.start
        mem_size_bytes, init_mem_size_bytes = validate.mem_sizes(
            start.mem_size_bytes,
            start.init_mem_size_bytes if start.HasField("init_mem_size_bytes") else None,
            prefix="start.",
        )
        inbox = Inbox()
        reader = threading.Thread(
            target=_read_client, args=(request_iterator, inbox), name="launch-reader", daemon=True
        )
        reader.start()
        run = LaunchRun(
            self.bridge,
            mem_size_bytes=mem_size_bytes,
            init_mem_size_bytes=init_mem_size_bytes,
            ctx=ctx,
            inbox=inbox,
            policy=self._launch_policy,
        )
        for event in run.events():
            yield self._launch_event(event)

    def _launch_event(self, event: LaunchEvent) -> pb.LaunchVmResponse:
        message = pb.LaunchVmResponse()
        if isinstance(event, Progress):
            message.progress.attempt = event.attempt
            message.progress.shortfall_bytes = event.shortfall_bytes
            if event.next_attempt_delay_s is not None:
                message.progress.next_attempt_delay.CopyFrom(_duration(event.next_attempt_delay_s))
        elif isinstance(event, Reserved):
            message.reserved.vm_id = event.vm_id
            message.reserved.balloon_control_path = event.balloon_control_path
        elif isinstance(event, StopVm):
            message.stop_vm.vm_id = event.vm_id
            message.stop_vm.reason = event.reason
        elif isinstance(event, Launched):
            message.launched.vm_id = event.vm_id
            record = self.bridge.books.vm(event.vm_id)
            if record is not None:
                message.launched.vm.CopyFrom(_vm_info(record))
        return message


def _read_client(requests: Iterator[pb.LaunchVmRequest], inbox: Inbox) -> None:
    """Feed the launch's inbox from the client's half of the stream."""
    try:
        for request in requests:
            inbox.put(_client_event(request))
    except Exception:  # the stream broke (cancelled, reset): same as the client leaving
        logger.debug("launch stream reader ended with an error", exc_info=True)
    inbox.put(StreamEnded())


def _client_event(request: pb.LaunchVmRequest) -> InboxItem:
    kind = request.WhichOneof("event")
    if kind == "vm_started":
        return VmStarted()
    if kind == "vm_start_failed":
        return VmStartFailed(request.vm_start_failed.reason)
    if kind == "vm_stopped":
        return VmStopped()
    return Unexpected(kind or "an empty message")


# --- conversions ---------------------------------------------------------------------------------


def _fill_snapshot(
    message: pb.GetBalloonStatsResponse | pb.BalloonStatsSnapshot, snapshot: StatsSnapshot
) -> None:
    message.stats.extend(_vm_stats(entry) for entry in snapshot.stats)
    message.missing_vm_ids.extend(snapshot.missing_vm_ids)
    message.read_time.CopyFrom(_timestamp(snapshot.read_time_unix_s))
    message.session = snapshot.session


def _vm_stats(entry: VmBalloonStats) -> pb.VmBalloonStats:
    message = pb.VmBalloonStats(vm_id=entry.vm_id, balloon_actual_bytes=entry.balloon_actual_bytes)
    for name in BALLOON_STAT_FIELDS:
        value = getattr(entry.stats, name)
        if value is not None:  # absent stays absent: proto3 optional keeps the difference
            setattr(message, _STAT_FIELD_NAMES[name], value)
    return message


def _delta(delta: BalloonDelta) -> pb.BalloonDelta:
    return pb.BalloonDelta(vm_id=delta.vm_id, delta_bytes=delta.delta_bytes)


_VM_STATES = {
    VmState.STARTING: pb.VM_STATE_STARTING,
    VmState.FAILED: pb.VM_STATE_STARTING,
    VmState.RUNNING: pb.VM_STATE_RUNNING,
}


def _vm_info(record: VmRecord) -> pb.VmInfo:
    return pb.VmInfo(
        vm_id=record.vm_id,
        mem_size_bytes=record.mem_size_bytes,
        init_mem_size_bytes=record.init_mem_size_bytes,
        state=_VM_STATES[record.state],
        cros_guest=record.vm_id == CROS_GUEST_VM_ID,
        since=_timestamp(record.since_unix_s),
    )


def _timestamp(unix_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(unix_s * 1e9))
    return stamp


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
