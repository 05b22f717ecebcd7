"""The gRPC MemoryService: protobuf in, domain calls on the bridge, protobuf out.

Handlers are coroutines on the server's event loop. They validate, call the bridge, and let
ManateeErrors escape to ``_guard_async``, which aborts the RPC with the status ``_status``
builds. No mms or socket detail lives here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from typing import Any, Generic, TypeVar, cast

import grpc
from google.protobuf import duration_pb2, timestamp_pb2
from grpc import aio

from . import _validation as validate
from ._books import VmRecord, VmState
from ._bridge import CallContext, MemoryBridge
from ._errors import InvalidArgumentError, ManateeError, ServerShuttingDownError
from ._launch import (
    ClientItem,
    Inbox,
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
T = TypeVar("T")
M = TypeVar("M", pb.GetBalloonStatsResponse, pb.BalloonStatsSnapshot)

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
# The API names in BalloonStats order, to zip with a BalloonStats (a NamedTuple).
_STAT_API_NAMES = tuple(_STAT_FIELD_NAMES[name] for name in BALLOON_STAT_FIELDS)


RpcObserver = Callable[[str, grpc.StatusCode, float], None]


def _status_of(servicer: MemoryServicer, error: Exception) -> grpc.Status:
    if isinstance(error, ManateeError):
        return to_status(error, servicer.bridge.books.session)
    return unexpected_status(error)


def _observe(
    servicer: MemoryServicer, method: str, code: grpc.StatusCode, started_s: float
) -> None:
    if servicer.observe_rpc is not None:
        servicer.observe_rpc(method, code, time.monotonic() - started_s)


# Two guards, one per handler shape, each the single place a handler's escaping error becomes
# the RPC's status (ManateeErrors as ``_status`` maps them, anything else INTERNAL) and where
# the RPC's outcome is observed. Every handler is a coroutine on the server's event loop.


def _guard_async(method: F) -> F:
    @functools.wraps(method)
    async def unary(self: MemoryServicer, request: object, context: aio.ServicerContext) -> object:  # type: ignore[type-arg]
        started_s = time.monotonic()
        try:
            response = await method(self, request, context)
        except asyncio.CancelledError:
            _observe(self, method.__name__, grpc.StatusCode.CANCELLED, started_s)
            raise
        except Exception as error:
            status = _status_of(self, error)
            _observe(self, method.__name__, status.code, started_s)
            await context.abort(status.code, status.details, status.trailing_metadata)
        _observe(self, method.__name__, grpc.StatusCode.OK, started_s)
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
            async for message in method(self, request, context):
                yield message
        except asyncio.CancelledError:
            _observe(self, method.__name__, grpc.StatusCode.CANCELLED, started_s)
            raise
        except Exception as error:
            status = _status_of(self, error)
            _observe(self, method.__name__, status.code, started_s)
            await context.abort(status.code, status.details, status.trailing_metadata)
        _observe(self, method.__name__, grpc.StatusCode.OK, started_s)

    return cast(F, stream)


def _timeout_s(context: grpc.ServicerContext | aio.ServicerContext) -> float | None:  # type: ignore[type-arg]
    """How long this call may wait for mms: the caller's deadline, less a margin."""
    remaining_s: float | None = context.time_remaining()
    # A call without a deadline reports ~9.2e18 s remaining (gRPC's infinite future);
    # waiting that long overflows threading's timeout (OverflowError -> INTERNAL).
    if remaining_s is None or remaining_s > _NO_DEADLINE_S:
        return None
    # Give up a little before the caller does, so it gets our DEADLINE_EXCEEDED with its
    # ErrorInfo (was the request sent?) rather than a bare client-side timeout.
    return remaining_s - min(DEADLINE_MARGIN_S, remaining_s / 10)


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(
        self,
        bridge: MemoryBridge,
        launch_policy: LaunchPolicy,
        watch_hub: WatchHub,
        blocking_pool: Executor,
        observe_rpc: RpcObserver | None = None,
    ) -> None:
        self.bridge = bridge
        self._launch_policy = launch_policy
        self._watch_hub = watch_hub
        # Where the blocking unary steps run (the server's RPC thread pool); launches need none.
        self._blocking_pool = blocking_pool
        self._shutting_down = threading.Event()
        # Called with (method, final code, seconds) once per RPC: the metrics hook.
        self.observe_rpc = observe_rpc
        # Callers served by one mms read and asking for the same VMs (coalesced GetBalloonStats
        # callers, the watchers of one tick) get one message built once, not once per caller.
        self._stats_responses = _LastConversion(pb.GetBalloonStatsResponse)
        self._watch_snapshots = _LastConversion(pb.BalloonStatsSnapshot)

    def begin_shutdown(self) -> None:
        self._shutting_down.set()

    def _check_open(self) -> None:
        if self._shutting_down.is_set():
            raise ServerShuttingDownError("the server is shutting down")

    async def _blocking(
        self,
        context: aio.ServicerContext[Any, Any],
        operation: Callable[[CallContext], T],
    ) -> T:
        """Run a bridge operation that blocks (on mms, on the start slot) on the thread pool.

        If the caller cancels or hangs up, this coroutine is cancelled: the operation is told
        through its CallContext, so a queued request stays off the wire and a reservation that
        comes back for nobody is rolled back, and its thread finishes promptly.
        """
        self._check_open()
        ctx = CallContext.with_timeout(_timeout_s(context))
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._blocking_pool, operation, ctx)
        except asyncio.CancelledError:
            ctx.mark_gone()
            raise

    # --- stats (async: the hot path, served on the event loop without a thread per call) ------

    @_guard_async
    async def GetBalloonStats(
        self,
        request: pb.GetBalloonStatsRequest,
        context: aio.ServicerContext[pb.GetBalloonStatsRequest, pb.GetBalloonStatsResponse],
    ) -> pb.GetBalloonStatsResponse:
        vm_ids = validate.vm_ids(request.vm_ids)
        self._check_open()
        snapshot = await self.bridge.get_balloon_stats_async(vm_ids, _timeout_s(context))
        return self._stats_responses.of(snapshot)

    @_guard_async_stream
    async def WatchBalloonStats(
        self,
        request: pb.WatchBalloonStatsRequest,
        context: aio.ServicerContext[pb.WatchBalloonStatsRequest, pb.WatchBalloonStatsResponse],
    ) -> AsyncIterator[pb.WatchBalloonStatsResponse]:
        vm_ids = validate.vm_ids(request.vm_ids)
        interval_s = validate.watch_interval_s(
            # Not ToTimedelta(): a Duration of 10^11 s overflows timedelta (OverflowError).
            request.interval.seconds + request.interval.nanos / 1e9
        )
        self._check_open()
        watcher = self._watch_hub.subscribe(vm_ids, interval_s)
        try:
            # A caller that leaves cancels this coroutine while it is parked in take_async.
            while (update := await watcher.take_async()) is not None:
                message = pb.WatchBalloonStatsResponse(dropped_updates=update.dropped_updates)
                if update.reset is not None:
                    message.session_reset.previous_session = update.reset.previous_session
                    message.session_reset.session = update.reset.session
                elif update.snapshot is not None:
                    message.snapshot.CopyFrom(self._watch_snapshots.of(update.snapshot))
                else:
                    # A failed poll is not the end of the watch: the next tick may succeed.
                    continue
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
        result = await self._blocking(context, lambda ctx: self.bridge.rebalance(deltas, ctx))
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
        result = await self._blocking(
            context, lambda ctx: self.bridge.prepare_vm(mem_size_bytes, init_mem_size_bytes, ctx)
        )
        response = pb.PrepareVmResponse(
            vm_id=result.vm_id,
            reserved=result.reserved,
            shortfall_bytes=result.shortfall_bytes,
            balloon_control_path=result.balloon_control_path,
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
        record = await self._blocking(context, lambda ctx: self.bridge.finish_add_vm(vm_id, ctx))
        return pb.FinishAddVmResponse(vm=_vm_info(record))

    @_guard_async
    async def RemoveVm(
        self,
        request: pb.RemoveVmRequest,
        context: aio.ServicerContext[pb.RemoveVmRequest, pb.RemoveVmResponse],
    ) -> pb.RemoveVmResponse:
        vm_id = validate.sibling_vm_id(request.vm_id)
        await self._blocking(context, lambda ctx: self.bridge.remove_vm(vm_id, ctx))
        return pb.RemoveVmResponse()

    @_guard_async
    async def ListVms(
        self,
        request: pb.ListVmsRequest,
        context: aio.ServicerContext[pb.ListVmsRequest, pb.ListVmsResponse],
    ) -> pb.ListVmsResponse:
        session, records = self.bridge.list_vms()
        return pb.ListVmsResponse(vms=[_vm_info(r) for r in records], session=session)

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
        if first is None or first.WhichOneof("event") != "start":
            raise InvalidArgumentError("start", "the first LaunchVm message must be `start`")
        start = first.start
        mem_size_bytes, init_mem_size_bytes = validate.mem_sizes(
            start.mem_size_bytes,
            start.init_mem_size_bytes if start.HasField("init_mem_size_bytes") else None,
            prefix="start.",
        )
        inbox = Inbox(asyncio.get_running_loop())
        reader = asyncio.create_task(_read_client(request_iterator, inbox))
        run = LaunchRun(
            self.bridge,
            mem_size_bytes=mem_size_bytes,
            init_mem_size_bytes=init_mem_size_bytes,
            inbox=inbox,
            policy=self._launch_policy,
            caller_gone=context.cancelled,
        )

        async def emit(event: LaunchEvent) -> None:
            await context.write(self._launch_event(event))

        try:
            await run.run(emit, timeout_s)
        finally:
            reader.cancel()

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
            message.reserved.lease_expire_time.CopyFrom(_timestamp(event.lease_expire_unix_s))
        elif isinstance(event, StopVm):
            message.stop_vm.vm_id = event.vm_id
            message.stop_vm.reason = event.reason
        elif isinstance(event, Launched):
            message.launched.vm_id = event.vm_id
            record = self.bridge.books.vm(event.vm_id)
            if record is not None:
                message.launched.vm.CopyFrom(_vm_info(record))
        return message


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

    def __init__(self, message_type: type[M]) -> None:
        self._message_type: type[M] = message_type
        # (snapshot, its read, its VMs and missing ids, message) of the last conversion.
        self._last: (
            tuple[StatsSnapshot, object, tuple[tuple[int, ...], tuple[int, ...]], M] | None
        ) = None

    def of(self, snapshot: StatsSnapshot) -> M:
        last = self._last
        if last is not None and snapshot is last[0]:
            return last[3]  # the usual case: callers of one read share its snapshot object
        source = snapshot if snapshot.source is None else snapshot.source
        key = (tuple(entry.vm_id for entry in snapshot.stats), snapshot.missing_vm_ids)
        if last is None or last[1] is not source or last[2] != key:
            message = self._message_type(
                stats=[_vm_stats(entry) for entry in snapshot.stats],
                missing_vm_ids=snapshot.missing_vm_ids,
                read_time=_timestamp(snapshot.read_time_unix_s),
                session=snapshot.session,
            )
        else:
            message = last[3]
        self._last = (snapshot, source, key, message)
        return message


def _vm_stats(entry: VmBalloonStats) -> pb.VmBalloonStats:
    # Absent stays absent (proto3 optional keeps the difference); one constructor call, since
    # this runs for every VM of every stats answer.
    present = {
        api_name: value
        for api_name, value in zip(_STAT_API_NAMES, entry.stats, strict=True)
        if value is not None
    }
    return pb.VmBalloonStats(
        vm_id=entry.vm_id, balloon_actual_bytes=entry.balloon_actual_bytes, **present
    )


def _delta(delta: BalloonDelta) -> pb.BalloonDelta:
    return pb.BalloonDelta(vm_id=delta.vm_id, delta_bytes=delta.delta_bytes)


_VM_STATES = {
    VmState.STARTING: pb.VM_STATE_STARTING,
    VmState.FAILED: pb.VM_STATE_START_FAILED,
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
    # One constructor call (FromNanoseconds costs more): a stats answer builds one per read.
    seconds, nanos = divmod(int(unix_s * 1e9), 1_000_000_000)
    return timestamp_pb2.Timestamp(seconds=seconds, nanos=nanos)


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
