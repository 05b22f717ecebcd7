"""A typed, synchronous Python client for manatee.memory.v1.MemoryService.

One method per RPC, returning the generated messages; every failure is a ``ManateeRpcError``
with the google.rpc details (ErrorInfo, BadRequest, RetryInfo) already unpacked.
``launch_vm`` runs the LaunchVm stream with callbacks, the way concierge's LaunchVm did.
``manatee_grpc.aio.Client`` is the same client for asyncio: both build their requests, decode
their errors and run LaunchVm through ``manatee_grpc._client_common``.

VM ids repeat across mms sessions, so every answer that gives VM ids says their ``session``,
and every method that names a VM takes the ``session`` the id came from: the server refuses
(NOT_FOUND, SESSION_RESET) an id from another session instead of acting on the VM that has
that id now. ``rebalance_memory`` sends a ``request_id`` (a new UUID per call unless given; a
failure carries it as ``ManateeRpcError.request_id``): pass it again to retry a call whose
outcome you did not learn, and the server answers the first call's result without acting twice.
``prepare_vm`` sends one only if given, because with one a reservation outlives a call the
caller gave up on (under the server's lease) so that the retry finds it.
``rebalance_memory(..., validate_only=True)`` previews what the call would move now; nothing
moves, and it sends no request id unless given (the server keeps none for a preview).
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2

from manatee_grpc import _client_common as common
from manatee_grpc._client_common import (
    DEFAULT_LAUNCH_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WATCH_INTERVAL_S,
    SERVICE_NAME,
    FieldViolation,
    ManateeRpcError,
    new_request_id,
    translated,
)
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc

__all__ = [
    "DEFAULT_LAUNCH_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
    "SERVICE_NAME",
    "Client",
    "FieldViolation",
    "ManateeRpcError",
    "new_request_id",
]


_R = TypeVar("_R")


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
        timeout_s: float = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        self._channel = (
            common.open_channel(target, credentials, aio=False) if channel is None else channel
        )
        self._stub = pb_grpc.MemoryServiceStub(self._channel)

    def close(self) -> None:
        """Close the channel (unless it was passed in): calls still running are cancelled."""
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
        request = common.stats_request(vm_ids, session)
        with translated():
            return self._stub.GetBalloonStats(request, timeout=self.timeout_s)

    def rebalance_memory(
        self,
        deltas: Mapping[int, int],
        *,
        session: str = "",
        request_id: str | None = None,
        validate_only: bool = False,
    ) -> pb.RebalanceMemoryResponse:
        """Balloon deltas in bytes by sibling VM id: positive takes memory from that VM.

        ``session``: where the ids came from ("" = current). ``request_id``: a new UUID unless
        given; give the one of a call whose outcome you missed to retry it safely.
        ``validate_only``: a preview of what the call would do now; nothing moves (a preview
        sends no request id unless given: the server does not record it).
        """
        request = common.rebalance_request(deltas, session, request_id, validate_only)
        with translated(request.request_id):
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
        request = common.prepare_request(mem_size_bytes, init_mem_size_bytes, request_id)
        with translated(request_id):
            return self._stub.PrepareVm(request, timeout=self.timeout_s)

    def finish_add_vm(self, vm_id: int, *, session: str = "") -> pb.FinishAddVmResponse:
        request = common.finish_request(vm_id, session)
        with translated():
            return self._stub.FinishAddVm(request, timeout=self.timeout_s)

    def remove_vm(self, vm_id: int, *, session: str = "") -> pb.RemoveVmResponse:
        """Remove ``vm_id`` of ``session`` ("" = whatever VM has that id now)."""
        request = common.remove_request(vm_id, session)
        with translated():
            return self._stub.RemoveVm(request, timeout=self.timeout_s)

    def list_vms(self) -> pb.ListVmsResponse:
        with translated():
            return self._stub.ListVms(common.list_request(), timeout=self.timeout_s)

    def health(self, service: str = SERVICE_NAME) -> str:
        """grpc.health.v1 status of ``service`` ("" for the whole server), e.g. ``"SERVING"``."""
        check = self._channel.unary_unary(common.HEALTH_CHECK_METHOD, **common.HEALTH_CHECK_CODECS)
        with translated():
            response: health_pb2.HealthCheckResponse = check(
                common.health_request(service), timeout=self.timeout_s
            )
        return common.health_status(response)

    # --- streams ---------------------------------------------------------------------------------

    def watch_balloon_stats(
        self,
        vm_ids: Iterable[int] = (),
        interval_s: float = DEFAULT_WATCH_INTERVAL_S,
        *,
        session: str = "",
    ) -> Generator[pb.WatchBalloonStatsResponse, None, None]:
        """Snapshots, session resets and mms outages until the generator is closed
        (``close()``, which cancels the call) or the client is."""
        request = common.watch_request(vm_ids, interval_s, session)
        return _streamed(lambda: self._stub.WatchBalloonStats(request))

    def watch_events(
        self, replay_last: int = 0, kinds: Iterable[pb.EventKind.ValueType] = ()
    ) -> Generator[pb.WatchEventsResponse, None, None]:
        """The last ``replay_last`` events, `caught_up`, then live events, until the iterator
        is closed (which cancels the call)."""
        request = common.watch_events_request(replay_last, kinds)
        return _streamed(lambda: self._stub.WatchEvents(request))

    def launch_vm(
        self,
        mem_size_bytes: int,
        *,
        start_vm: Callable[[int, str], bool],
        stop_vm: Callable[[int], None],
        init_mem_size_bytes: int | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        timeout_s: float | None = DEFAULT_LAUNCH_TIMEOUT_S,
        on_queued: Callable[[int], None] | None = None,
    ) -> pb.VmInfo:
        """Launch a sibling VM over one LaunchVm stream and return it once it runs.

        ``start_vm(vm_id, balloon_control_path)`` starts crosvm once memory is reserved and says
        whether it did; ``stop_vm(vm_id)`` stops it when the server asks; ``on_progress(attempt,
        shortfall_bytes)`` hears of each reservation attempt that fell short;
        ``on_queued(position)`` hears that the launch waits for the device's one pending start,
        and its place in the queue (1: next), when it queues and each time it moves up (without
        it, the wait is silent).
        ``timeout_s`` bounds
        the whole launch (default 5 min, enough for a queue of launches ahead; None: no
        deadline). If a callback raises, the call is cancelled (the server releases the
        reservation) and the exception propagates.
        """
        exchange = common.LaunchExchange(mem_size_bytes, init_mem_size_bytes)
        outbox: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
        outbox.put(exchange.first_request)

        def requests() -> Iterator[pb.LaunchVmRequest]:
            # None half-closes the stream.
            while (request := outbox.get()) is not None:
                yield request

        call = self._stub.LaunchVm(requests(), timeout=timeout_s)
        finished = False
        try:
            with translated():
                for response in call:
                    step = exchange.on_response(response)
                    if isinstance(step, common.Queued):
                        if on_queued is not None:
                            on_queued(step.position)
                    elif isinstance(step, common.Progress):
                        if on_progress is not None:
                            on_progress(step.attempt, step.shortfall_bytes)
                    elif isinstance(step, common.StartVm):
                        started = start_vm(step.vm_id, step.balloon_control_path)
                        outbox.put(exchange.started(step, started))
                    elif isinstance(step, common.StopVm):
                        stop_vm(step.vm_id)
                        outbox.put(exchange.stopped())
            finished = True
        finally:
            outbox.put(None)
            if not finished:
                # A callback raised (or we were interrupted): cancelling releases the launch.
                call.cancel()
        return exchange.result()


def _streamed(start: Callable[[], grpc._CallIterator[_R]]) -> Generator[_R, None, None]:
    """A server stream's messages until it ends or the generator is closed (which cancels it);
    the call starts when the generator is first iterated."""
    call = start()
    try:
        with translated():
            yield from call
    finally:
        call.cancel()
