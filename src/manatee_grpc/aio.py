"""The typed client for services built on asyncio, as ``grpc.aio`` is to ``grpc``.

``manatee_grpc.aio.Client`` has the methods of ``manatee_grpc.client.Client`` with the same
arguments, defaults and results, as coroutines; ``watch_balloon_stats`` is an async iterator;
``launch_vm`` runs the same LaunchVm exchange, and its callbacks may be plain functions or
coroutine functions (anything slow, such as spawning crosvm, should be a coroutine: a plain
callback runs on the event loop). Failures are the very same ``ManateeRpcError``. Requests,
defaults, the channel and the decoding of errors come from ``manatee_grpc._client_common``,
which the synchronous client uses too.

    async with Client("127.0.0.1:50051") as client:
        vms = await client.list_vms()
        async for event in client.watch_balloon_stats(interval_s=1.0):
            ...

Open the client inside the event loop that uses it: a grpc.aio channel belongs to one loop.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from contextlib import contextmanager
from types import TracebackType
from typing import Any, TypeVar

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

_T = TypeVar("_T")
_R = TypeVar("_R")


class Client:
    """An asyncio connection to a manatee-grpc server; use ``async with`` or ``await close()``.

    ``target`` is ``HOST:PORT`` or ``unix:///abs/path``. ``timeout_s`` is the deadline of each
    unary call. ``credentials`` (e.g. ``grpc.ssl_channel_credentials(...)``) makes the channel
    TLS. Pass ``channel`` (a ``grpc.aio.Channel``) to reuse one you own: the client then leaves
    it open.
    """

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        channel: grpc.aio.Channel | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._owns_channel = channel is None
        self._channel = (
            common.open_channel(target, credentials, aio=True) if channel is None else channel
        )
        self._stub = pb_grpc.MemoryServiceStub(self._channel)

    async def close(self) -> None:
        """Close the channel (unless it was passed in): calls still running are cancelled."""
        if self._owns_channel:
            await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # --- unary RPCs ------------------------------------------------------------------------------

    async def get_balloon_stats(
        self, vm_ids: Iterable[int] = (), *, session: str = ""
    ) -> pb.GetBalloonStatsResponse:
        """``session``: where ``vm_ids`` came from ("" = the current session)."""
        request = common.stats_request(vm_ids, session)
        with _translated():
            return await self._stub.GetBalloonStats(request, timeout=self.timeout_s)

    async def rebalance_memory(
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
        with _translated(request.request_id):
            return await self._stub.RebalanceMemory(request, timeout=self.timeout_s)

    async def prepare_vm(
        self,
        mem_size_bytes: int,
        init_mem_size_bytes: int | None = None,
        *,
        request_id: str | None = None,
    ) -> pb.PrepareVmResponse:
        """One reservation attempt; see ``manatee_grpc.client.Client.prepare_vm``."""
        request = common.prepare_request(mem_size_bytes, init_mem_size_bytes, request_id)
        with _translated(request_id):
            return await self._stub.PrepareVm(request, timeout=self.timeout_s)

    async def finish_add_vm(self, vm_id: int, *, session: str = "") -> pb.FinishAddVmResponse:
        request = common.finish_request(vm_id, session)
        with _translated():
            return await self._stub.FinishAddVm(request, timeout=self.timeout_s)

    async def remove_vm(self, vm_id: int, *, session: str = "") -> pb.RemoveVmResponse:
        """Remove ``vm_id`` of ``session`` ("" = whatever VM has that id now)."""
        request = common.remove_request(vm_id, session)
        with _translated():
            return await self._stub.RemoveVm(request, timeout=self.timeout_s)

    async def list_vms(self) -> pb.ListVmsResponse:
        with _translated():
            return await self._stub.ListVms(common.list_request(), timeout=self.timeout_s)

    async def health(self, service: str = SERVICE_NAME) -> str:
        """grpc.health.v1 status of ``service`` ("" for the whole server), e.g. ``"SERVING"``."""
        check = self._channel.unary_unary(common.HEALTH_CHECK_METHOD, **common.HEALTH_CHECK_CODECS)
        with _translated():
            response: health_pb2.HealthCheckResponse = await check(
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
    ) -> AsyncGenerator[pb.WatchBalloonStatsResponse, None]:
        """Snapshots, session resets and mms outages, as an async generator, until it is closed
        (``await it.aclose()``, or leave an ``async with contextlib.aclosing(...)``: either
        cancels the call) or the client is."""
        request = common.watch_request(vm_ids, interval_s, session)
        return _streamed(lambda: self._stub.WatchBalloonStats(request))

    def watch_events(
        self, replay_last: int = 0, kinds: Iterable[pb.EventKind.ValueType] = ()
    ) -> AsyncGenerator[pb.WatchEventsResponse, None]:
        """The last ``replay_last`` events, `caught_up`, then live events, as an async generator
        until it is closed (which cancels the call) or the client is."""
        request = common.watch_events_request(replay_last, kinds)
        return _streamed(lambda: self._stub.WatchEvents(request))

    async def launch_vm(
        self,
        mem_size_bytes: int,
        *,
        start_vm: Callable[[int, str], bool | Awaitable[bool]],
        stop_vm: Callable[[int], Awaitable[None] | None],
        init_mem_size_bytes: int | None = None,
        on_progress: Callable[[int, int], Awaitable[None] | None] | None = None,
        timeout_s: float | None = DEFAULT_LAUNCH_TIMEOUT_S,
        on_queued: Callable[[int], Awaitable[None] | None] | None = None,
    ) -> pb.VmInfo:
        """Launch a sibling VM over one LaunchVm stream and return it once it runs.

        As ``manatee_grpc.client.Client.launch_vm``; each callback may also be a coroutine
        function. If a callback raises, or the task running this is cancelled, the call is
        cancelled (the server releases the reservation) and the exception propagates.
        """
        exchange = common.LaunchExchange(mem_size_bytes, init_mem_size_bytes)
        outbox: asyncio.Queue[pb.LaunchVmRequest | None] = asyncio.Queue()
        outbox.put_nowait(exchange.first_request)

        async def requests() -> AsyncIterator[pb.LaunchVmRequest]:
            # None half-closes the stream.
            while (request := await outbox.get()) is not None:
                yield request

        call = self._stub.LaunchVm(requests(), timeout=timeout_s)
        finished = False
        try:
            with _translated():
                async for response in call:
                    step = exchange.on_response(response)
                    if isinstance(step, common.Queued):
                        if on_queued is not None:
                            await _settled(on_queued(step.position))
                    elif isinstance(step, common.Progress):
                        if on_progress is not None:
                            await _settled(on_progress(step.attempt, step.shortfall_bytes))
                    elif isinstance(step, common.StartVm):
                        started = await _settled(start_vm(step.vm_id, step.balloon_control_path))
                        outbox.put_nowait(exchange.started(step, started))
                    elif isinstance(step, common.StopVm):
                        await _settled(stop_vm(step.vm_id))
                        outbox.put_nowait(exchange.stopped())
            finished = True
        finally:
            outbox.put_nowait(None)
            if not finished:
                # A callback raised, or this task was cancelled: cancelling releases the launch.
                call.cancel()
        return exchange.result()


@contextmanager
def _translated(request_id: str | None = None) -> Iterator[None]:
    """``_client_common.translated``, and a call cancelled under a task nobody cancelled (its
    client was closed) raises ``ManateeRpcError`` CANCELLED, as it does in the sync client,
    instead of a CancelledError that would look like the task's own cancellation."""
    with common.translated(request_id):
        try:
            yield
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            raise ManateeRpcError(
                grpc.StatusCode.CANCELLED, "the call was cancelled: its client was closed"
            ) from None


async def _streamed(
    start: Callable[[], grpc.aio.UnaryStreamCall[Any, _R]],
) -> AsyncGenerator[_R, None]:
    """A server stream's messages until it ends or the generator is closed (which cancels it);
    the call starts when the generator is first iterated."""
    call = start()
    try:
        with _translated():
            async for response in call:
                yield response
    finally:
        call.cancel()


async def _settled(result: _T | Awaitable[_T]) -> _T:
    """A callback's result, awaited if the callback was a coroutine function."""
    if inspect.isawaitable(result):
        return await result
    return result
