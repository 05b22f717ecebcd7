"""LaunchVm: concierge's launch sequence for one client, as one coroutine on the server's loop.

A launch holds no thread while it waits: for the start slot (an asyncio future), for mms (the
connection thread's futures, awaited through ``_aio``), for back-off timers and for its client.

The protocol is deterministic. The client's messages queue in an inbox in arrival order and are
judged only when the launch reaches the step that reads them, so when they arrive never changes
the outcome: a `vm_started` sent right after `start` is applied once `reserved` is sent, and a
half-close after `vm_started` is a normal end. Only a session reset overtakes them.

The wait for `vm_started` is leased (the server's start lease, as for a bare PrepareVm): a client
that stays quiet past it is asked to stop its VM, and loses the start. Whatever way the coroutine
ends (error, deadline, lease, the caller cancelling it), a reservation it made is released: that
is the invariant everything here serves.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from manatee_grpc.core import _aio
from manatee_grpc.core._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LaunchAbortedError,
    LaunchLeaseExpiredError,
    MmsConnectionError,
    MmsConnectionLostError,
    MmsRefusedError,
    VmStartFailedError,
)
from manatee_grpc.mms._messages import (
    RES_EINVAL,
    RES_ENOMEM,
    RES_OK,
    FinishAddVmRequest,
    FinishAddVmResponse,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    Response,
)

if TYPE_CHECKING:
    from manatee_grpc.core._bridge import MemoryBridge

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Response)

# Concierge waited i * 500 ms before attempt i (from 0): 0, 0.5, 1, 1.5, 2 s.
DEFAULT_ATTEMPT_DELAYS_S: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0)
# How long a client may take to stop its VM after we ask, before we remove it anyway.
DEFAULT_STOP_TIMEOUT_S = 30.0


# --- what the client tells us (through the inbox) ----------------------------------------------


@dataclass(frozen=True, slots=True)
class VmStarted:
    pass


@dataclass(frozen=True, slots=True)
class VmStartFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class VmStopped:
    pass


@dataclass(frozen=True, slots=True)
class StreamEnded:
    """The client half-closed its side, or the stream broke."""


@dataclass(frozen=True, slots=True)
class Unexpected:
    """A client message that is never valid here (a second `start`, an empty message)."""

    field: str  # the oneof field it set, or "event" when it set none


ClientItem = VmStarted | VmStartFailed | VmStopped | StreamEnded | Unexpected


@dataclass(frozen=True, slots=True)
class SessionReset:
    """mms dropped the session (and the VM being launched with it); overtakes client messages."""

    session: int


InboxItem = ClientItem | SessionReset


# --- what we tell the client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Queued:
    """The launch waits for the device's one pending start; sent on queueing and each move up."""

    position: int  # 1: the next launch to take the start once it is free


@dataclass(frozen=True, slots=True)
class Progress:
    attempt: int  # 1-based
    shortfall_bytes: int
    next_attempt_delay_s: float | None  # None: no attempt left


@dataclass(frozen=True, slots=True)
class Reserved:
    vm_id: int
    balloon_control_path: str
    lease_expire_unix_s: float  # `vm_started` must come before this, or the launch ends
    session: int  # the connection's session mms answered in: vm_id names a VM of it only


@dataclass(frozen=True, slots=True)
class StopVm:
    vm_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Launched:
    vm_id: int
    session: int  # the connection's session mms started the VM in


LaunchEvent = Queued | Progress | Reserved | StopVm | Launched
Emit = Callable[[LaunchEvent], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class LaunchPolicy:
    attempt_delays_s: Sequence[float] = DEFAULT_ATTEMPT_DELAYS_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S


class Inbox:
    """The client's messages in arrival order, and a session reset that overtakes them.

    Lives on the event loop and is used there only: the launch hands a reset reported on the
    connection thread over to the loop first (``LaunchRun._session_reset``).
    """

    def __init__(self) -> None:
        self._items: collections.deque[ClientItem] = collections.deque()
        self._reset: SessionReset | None = None
        self._changed = asyncio.Event()

    def put(self, item: InboxItem) -> None:
        if isinstance(item, SessionReset):
            self._reset = self._reset or item
        else:
            self._items.append(item)
        self._changed.set()

    @property
    def session_reset(self) -> SessionReset | None:
        return self._reset

    async def get(self, timeout_s: float | None) -> InboxItem | None:
        """The reset if any, else the next client message; None when ``timeout_s`` passes."""
        return await self._wait(timeout_s, clients_too=True)

    async def wait_reset(self, timeout_s: float) -> SessionReset | None:
        """Wait ``timeout_s`` unless the session resets first; client messages stay queued."""
        item = await self._wait(timeout_s, clients_too=False)
        return item if isinstance(item, SessionReset) else None

    async def _wait(self, timeout_s: float | None, clients_too: bool) -> InboxItem | None:
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if self._reset is not None:
                return self._reset
            if clients_too and self._items:
                return self._items.popleft()
            remaining_s = None if deadline_s is None else deadline_s - time.monotonic()
            if remaining_s is not None and remaining_s <= 0:
                return None
            self._changed.clear()
            # Not asyncio.wait_for: in 3.11 it can swallow a cancel that lands as the event is
            # set (the client's half-close and its cancel arrive together).
            try:
                async with asyncio.timeout(remaining_s):
                    await self._changed.wait()
            except TimeoutError:
                return None


class LaunchRun:
    """One launch; ``await run(emit, timeout_s)``. See the module docstring."""

    def __init__(
        self,
        bridge: MemoryBridge,
        *,
        mem_size_bytes: int,
        init_mem_size_bytes: int,
        inbox: Inbox,
        policy: LaunchPolicy,
        caller_gone: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bridge = bridge
        self._mem_size_bytes = mem_size_bytes
        self._init_mem_size_bytes = init_mem_size_bytes
        self._inbox = inbox
        self._policy = policy
        self._caller_gone = caller_gone
        self._clock = clock
        self._token = object()
        self._vm_id: int | None = None
        # The connection's session mms answered the reserving PrepareVm in (0 until then):
        # every later request of this launch goes to that session or not at all.
        self._session = 0
        self._prepare_future: Future[PrepareVmResponse] | None = None
        self._finish_future: Future[FinishAddVmResponse] | None = None
        self._settled = False  # launched, or mms already forgot the VM: nothing to roll back
        self._reserved_sent = False  # the client may have started the VM
        self._step = "waiting for earlier launches to finish"
        self._emit: Emit | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # The queue position to tell the client (None: nothing more to tell), the last one told,
        # and the task telling it: the slot reports moves synchronously, the stream is async.
        self._queue_position: int | None = None
        self._told_position = 0
        self._queue_reporter: asyncio.Task[None] | None = None

    async def run(self, emit: Emit, timeout_s: float | None) -> None:
        """Run the launch to its end, telling the client through ``emit``; raises how it failed.

        ``timeout_s`` is the caller's deadline; cancelling this coroutine means the caller left.
        """
        self._emit = emit
        try:
            async with asyncio.timeout(timeout_s):
                await self._run_holding_slot()
        except TimeoutError:
            metadata: dict[str, object] = {}
            if self._vm_id is not None:
                metadata["vmId"] = self._vm_id
            raise DeadlineExceededError(
                f"deadline passed {self._step}", step=self._step, **metadata
            ) from None

    async def _run_holding_slot(self) -> None:
        slot = self._bridge.slot
        if self._caller_gone():
            # The caller left before the launch queued: nothing may reach mms on its behalf.
            raise asyncio.CancelledError
        try:
            await slot.acquire_for_launch(self._token, self._queued)
        except BaseException:
            self._stop_queue_reporter()
            raise
        self._loop = asyncio.get_running_loop()
        self._bridge.add_session_reset_listener(self._session_reset)
        try:
            await self._finish_queue_reports()
            await self._run()
        except MmsConnectionError as error:
            # A VM the client started cannot go on: it must stop. If the link reset, mms dropped
            # the VM with the old session and there is nothing to remove; if the stream was kept
            # (a bad answer, a hung or out-of-step stream), the release below removes it.
            self._settled = error.stream_closed
            if self._reserved_sent and self._vm_id is not None:
                await self._send(
                    StopVm(
                        self._vm_id,
                        "the mms session was reset; mms dropped this VM"
                        if error.stream_closed
                        else f"the launch failed: {error.message}",
                    )
                )
            raise
        except asyncio.CancelledError:
            logger.info("launch: the client went away; releasing what it reserved")
            raise
        finally:
            self._bridge.remove_session_reset_listener(self._session_reset)
            self._release()

    def _queued(self, position: int) -> None:
        """The slot's report of this launch's place in the queue (on the loop, must not block)."""
        self._queue_position = position
        if self._queue_reporter is None or self._queue_reporter.done():
            self._queue_reporter = asyncio.get_running_loop().create_task(self._tell_queue())

    async def _finish_queue_reports(self) -> None:
        """The start is ours: a place in the queue not yet told is stale, and one being told
        must reach the client before anything about the start does. A client that reads
        nothing could hold up that write, and with it the device's start: it gets the start
        lease, like a client that never says `vm_started`."""
        self._queue_position = None
        reporter = self._queue_reporter
        if reporter is None or reporter.done():
            if reporter is not None:
                await reporter  # its write failed: the stream is broken, say so
            return
        self._step = "telling the client its place in the queue"
        lease_s = self._bridge.slot.lease_s
        try:
            async with asyncio.timeout(lease_s):
                await reporter
        except TimeoutError:
            raise LaunchLeaseExpiredError(
                f"the client read no launch message within the start lease ({lease_s:g} s); "
                "the start is released",
                leaseSeconds=f"{lease_s:g}",
            ) from None

    def _stop_queue_reporter(self) -> None:
        reporter = self._queue_reporter
        if reporter is None:
            return
        if reporter.done():
            if not reporter.cancelled():
                reporter.exception()  # retrieved: the launch ends for its own reason
        else:
            reporter.cancel()

    async def _tell_queue(self) -> None:
        # Only the latest place matters: moves made while a message is being written collapse.
        while self._queue_position is not None and self._queue_position != self._told_position:
            position = self._queue_position
            await self._send(Queued(position))
            self._told_position = position

    def _session_reset(self, session: int) -> None:
        """mms dropped ``session`` (a bridge listener, on the connection thread): to the loop."""
        loop = self._loop
        if loop is None:
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._inbox.put(SessionReset(session))
        else:
            _aio.call_soon_from_thread(loop, self._inbox.put, SessionReset(session))

    async def _send(self, event: LaunchEvent) -> None:
        assert self._emit is not None
        await self._emit(event)

    async def _run(self) -> None:
        response = await self._reserve()
        vm_id = response.vm_id
        lease_s = self._bridge.slot.lease_s
        # The link may have reset after mms answered, before this coroutine resumed: then the
        # id names no VM of the current session and is not sent (the reset path instead).
        self._check_session()
        self._reserved_sent = True
        await self._send(
            Reserved(
                vm_id,
                self._bridge.config.balloon_control_path(vm_id),
                self._clock() + lease_s,
                self._session,
            )
        )
        self._step = "waiting for the client to start its VM"
        answer = await self._next_from_client(lease_s, expect=(VmStarted, VmStartFailed))
        if answer is None:
            # The client holds the device's one start and says nothing: it loses it. Its VM
            # may be running, so it is asked to stop first (as when FinishAddVm fails).
            why = f"no vm_started within the start lease ({lease_s:g} s)"
            logger.warning("launch of VM %d: %s; releasing the start", vm_id, why)
            await self._send(StopVm(vm_id, f"{why}; the start is released"))
            await self._wait_stopped()
            raise LaunchLeaseExpiredError(
                f"{why}: the reservation was released", vmId=vm_id, leaseSeconds=f"{lease_s:g}"
            )
        if isinstance(answer, VmStartFailed):
            raise VmStartFailedError(
                f"the client could not start VM {vm_id}: {answer.reason or 'no reason given'}",
                vmId=vm_id,
            )
        self._step = "waiting for mms FinishAddVm"
        finish = self._finish_future = self._submit_in_session(FinishAddVmRequest(vm_id))
        finish_response = await self._await(finish)
        if finish_response.res == RES_OK:
            self._settled = True  # the slot is freed by the answer itself (it follows the wire)
            self._check_session()
            await self._send(Launched(vm_id, self._session))
            return
        error = MmsRefusedError(
            finish_response.res, f"mms could not finish adding VM {vm_id}", vmId=vm_id
        )
        await self._send(StopVm(vm_id, f"FinishAddVm failed: {error.message} (res {error.res})"))
        # The VM is the client's to stop; remove it from mms once it has (or the client left).
        await self._wait_stopped()
        raise error

    async def _reserve(self) -> PrepareVmResponse:
        delays_s = list(self._policy.attempt_delays_s)
        response: PrepareVmResponse | None = None
        for index, delay_s in enumerate(delays_s):
            if delay_s > 0:
                # Let the guest reclaim memory; client messages wait in the inbox meanwhile.
                self._step = "backing off between reservation attempts"
                reset = await self._inbox.wait_reset(delay_s)
                if reset is not None:
                    raise self._reset_error(reset)
            self._step = "waiting for mms PrepareVm"
            request = PrepareVmRequest(self._mem_size_bytes, self._init_mem_size_bytes)
            # A retry tops up the start of the first attempt's session, or is not sent.
            self._prepare_future = (
                self._submit_in_session(request)
                if self._session
                else self._bridge.connection.submit(request)
            )
            response = await self._await(self._prepare_future)
            if response.res == RES_EINVAL and index == 0:
                # The launch owns the slot, so mms had no start pending: the only size rule
                # left that it checks is "smaller than the CrOS guest's memory".
                raise InvalidArgumentError(
                    "start.mem_size_bytes",
                    "must be smaller than the CrOS guest's memory (mms refused the size)",
                    reachedMms="true",
                )
            if response.res not in (RES_OK, RES_ENOMEM):
                raise MmsRefusedError(response.res, "mms refused PrepareVm for this launch")
            self._vm_id = response.vm_id
            self._bridge.slot.set_vm_id(self._token, response.vm_id)
            # The slot recorded the session mms answered in, on the connection thread, before
            # this coroutine woke; no start left (the slot dropped it): the session reset.
            opened = self._bridge.slot.open_start(self._token)
            if opened is None or opened[0] != response.vm_id:
                raise self._reset_error(SessionReset(self._session or self._bridge.books.session))
            self._session = opened[1]
            if response.res == RES_OK:
                return response
            # Progress means an attempt fell short; an attempt that reserved says `reserved`.
            next_delay_s = delays_s[index + 1] if index + 1 < len(delays_s) else None
            await self._send(Progress(index + 1, response.shortfall_bytes, next_delay_s))
        assert response is not None
        raise MmsRefusedError(
            RES_ENOMEM,
            f"could not reserve memory for the VM after {len(delays_s)} attempts",
            shortfallBytes=response.shortfall_bytes,
            vmId=response.vm_id,
        )

    def _check_session(self) -> None:
        """Raise the session-reset error if the launch's session is no longer current."""
        if not self._bridge.books.is_current(self._session):
            raise self._reset_error(SessionReset(self._session))

    def _submit_in_session(self, request: MmsRequest[R]) -> Future[R]:
        """Queue ``request`` in the launch's session, or raise its reset: under the books' gate,
        so it cannot go to a later session whose VMs reuse the id."""
        with self._bridge.books.holding(self._session) as current:
            if not current:
                raise self._reset_error(SessionReset(self._session))
            return self._bridge.connection.submit(request)

    async def _await(self, future: Future[R]) -> R:
        """An mms answer; if the launch is cancelled meanwhile, a queued request is never sent
        (one on the wire completes, and ``_release`` deals with what it did)."""
        if future.done():
            return future.result()
        try:
            await _aio.wake_on_done(future)
        except asyncio.CancelledError:
            future.cancel()
            raise
        return future.result()

    async def _wait_stopped(self) -> None:
        """After `stop_vm`: wait for `vm_stopped`, a half-close, or the stop timeout."""
        self._step = "waiting for the client to stop its VM"
        await self._next_from_client(
            self._policy.stop_timeout_s, expect=(VmStopped,), stopping=True
        )

    async def _next_from_client(
        self, timeout_s: float | None, expect: tuple[type, ...], stopping: bool = False
    ) -> ClientItem | None:
        """The next client message, which must be one of ``expect``; None on timeout."""
        deadline_s = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            remaining_s = None if deadline_s is None else max(0.0, deadline_s - time.monotonic())
            item = await self._inbox.get(remaining_s)
            if item is None:
                return None
            if isinstance(item, SessionReset):
                raise self._reset_error(item)
            if isinstance(item, StreamEnded):
                if stopping:
                    return item  # the client is done with this launch: stopped or gone
                raise LaunchAbortedError("the client closed the launch stream before it finished")
            if isinstance(item, expect):
                return item
            if stopping and isinstance(item, VmStarted | VmStartFailed):
                continue  # sent before the client saw `stop_vm`: stale, not wrong
            raise InvalidArgumentError(
                "request", f"`{_field_of(item)}` is out of turn at this step of the launch"
            )

    def _reset_error(self, reset: SessionReset) -> MmsConnectionLostError:
        return MmsConnectionLostError(
            f"the mms connection (session {reset.session}) was lost during the launch; mms "
            "dropped the VM being launched",
            session=reset.session,
            **({"vmId": self._vm_id} if self._vm_id is not None else {}),
        )

    def _release(self) -> None:
        """Release the pending start; remove the reservation unless it launched or is gone."""
        slot = self._bridge.slot
        if self._settled:
            slot.release(self._token)
            return
        future = self._prepare_future
        if future is not None and not future.done():
            # The answer is still coming: remove whatever it reserves once it arrives.
            future.add_done_callback(lambda _: self._remove_open_start("its launch ended"))
            return
        self._remove_open_start("its launch did not complete")

    def _remove_open_start(self, why: str) -> None:
        """Remove the start mms opened for this launch, if any, then release the slot.

        Which start is open comes from the slot, which follows the wire, not from what this
        coroutine read: a PrepareVm answer can arrive just as the caller leaves, so the
        coroutine is cancelled before it resumes to read it (and ``_vm_id`` is still unset).
        """
        slot = self._bridge.slot
        opened = slot.open_start(self._token)  # the VM and its session, read together
        vm_id, session = opened if opened is not None else (None, self._session)
        finish = self._finish_future
        if vm_id is not None or finish is None:
            # The slot removes the start (a guessed one too, if the last PrepareVm's answer was
            # unreadable), retries until mms confirms it is gone, and then frees the slot.
            slot.remove_launch_start(self._token, why, self._prepare_future)
            return
        if (
            vm_id is None
            and finish is not None
            and finish.done()
            and not finish.cancelled()
            and finish.exception() is None
            and finish.result().res == RES_OK
        ):
            # It launched as the caller left, unseen: nobody will use that VM (as before).
            vm_id = self._vm_id
        if vm_id is None:
            slot.release(self._token)
            return
        # Sent only if ``session`` is still current: a later session's VM may have this id.
        self._bridge.remove_in_background(
            vm_id, why, then=lambda: slot.release(self._token), session=session
        )


def _field_of(item: ClientItem) -> str:
    if isinstance(item, Unexpected):
        return item.field
    return {
        VmStarted: "vm_started",
        VmStartFailed: "vm_start_failed",
        VmStopped: "vm_stopped",
    }.get(type(item), "event")
