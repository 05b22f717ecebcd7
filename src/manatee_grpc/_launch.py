"""LaunchVm: concierge's launch sequence, run for one client, without holding the mms thread.

The launch is a generator of events for the client; it reads the client's answers from an inbox
that also receives "caller gone" and "session reset". Whatever way it ends, a reservation it made
is released: that is the invariant everything here serves.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from ._bridge import CallContext, CallerGoneError, MemoryBridge, await_call
from ._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    LaunchAbortedError,
    MmsConnectionError,
    MmsConnectionLostError,
    MmsRefusedError,
    VmStartFailedError,
)
from ._messages import (
    RES_ENOMEM,
    RES_OK,
    FinishAddVmRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    Response,
)

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
class SessionReset:
    session: int


@dataclass(frozen=True, slots=True)
class CallerGone:
    pass


@dataclass(frozen=True, slots=True)
class Unexpected:
    """A client message that does not belong at this step."""

    what: str


InboxItem = (
    VmStarted | VmStartFailed | VmStopped | StreamEnded | SessionReset | CallerGone | Unexpected
)


# --- what we tell the client ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    attempt: int  # 1-based
    shortfall_bytes: int
    next_attempt_delay_s: float | None  # None: no attempt left


@dataclass(frozen=True, slots=True)
class Reserved:
    vm_id: int
    balloon_control_path: str


@dataclass(frozen=True, slots=True)
class StopVm:
    vm_id: int
    reason: str


@dataclass(frozen=True, slots=True)
class Launched:
    vm_id: int


LaunchEvent = Progress | Reserved | StopVm | Launched


@dataclass(frozen=True, slots=True)
class LaunchPolicy:
    attempt_delays_s: Sequence[float] = DEFAULT_ATTEMPT_DELAYS_S
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S


class Inbox:
    """Everything that can happen to a launch while it waits, in arrival order."""

    def __init__(self) -> None:
        self._queue: queue.Queue[InboxItem] = queue.Queue()

    def put(self, item: InboxItem) -> None:
        self._queue.put(item)

    def get(self, timeout_s: float | None) -> InboxItem | None:
        """The next item, or None when ``timeout_s`` passes first."""
        try:
            return self._queue.get(timeout=timeout_s)
        except queue.Empty:
            return None


class LaunchRun:
    """One launch; iterate ``events()`` and feed the inbox. See the module docstring."""

    def __init__(
        self,
        bridge: MemoryBridge,
        *,
        mem_size_bytes: int,
        init_mem_size_bytes: int,
        ctx: CallContext,
        inbox: Inbox,
        policy: LaunchPolicy,
    ) -> None:
        self._bridge = bridge
        self._mem_size_bytes = mem_size_bytes
        self._init_mem_size_bytes = init_mem_size_bytes
        self._ctx = ctx
        self._inbox = inbox
        self._policy = policy
        self._token = object()
        self._vm_id: int | None = None
        self._prepare_future: Future[PrepareVmResponse] | None = None
        self._settled = False  # launched, or mms already forgot the VM: nothing to roll back
        self._reserved_sent = False  # the client may have started the VM
        ctx.on_gone(self._caller_gone)

    def _caller_gone(self) -> None:
        self._inbox.put(CallerGone())
        self._bridge.slot.abort_waiter(self._token)

    def events(self) -> Iterator[LaunchEvent]:
        slot = self._bridge.slot
        slot.acquire_for_launch(self._token, self._ctx.remaining_s())
        listener = self._bridge.add_session_reset_listener(self._inbox)
        try:
            yield from self._run()
        except MmsConnectionError as error:
            # A VM the client started cannot go on: it must stop. If the link reset, mms dropped
            # the VM with the old session and there is nothing to remove; if the stream was kept
            # (a bad answer, a hung or out-of-step stream), the release below removes it.
            self._settled = error.stream_closed
            if self._reserved_sent and self._vm_id is not None:
                yield StopVm(
                    self._vm_id,
                    "the mms session was reset; mms dropped this VM"
                    if error.stream_closed
                    else f"the launch failed: {error.message}",
                )
            raise
        except CallerGoneError:
            logger.info("launch: the client went away; releasing what it reserved")
            raise
        finally:
            self._bridge.remove_session_reset_listener(listener)
            self._release()

    def _run(self) -> Iterator[LaunchEvent]:
        response = yield from self._reserve()
        vm_id = response.vm_id
        self._refuse_early_messages()
        self._reserved_sent = True
        yield Reserved(vm_id, self._bridge.config.balloon_control_path(vm_id))
        answer = self._wait_for_client(self._ctx.remaining_s(), expect=(VmStarted, VmStartFailed))
        if isinstance(answer, VmStartFailed):
            raise VmStartFailedError(
                f"the client could not start VM {vm_id}: {answer.reason or 'no reason given'}",
                vmId=vm_id,
            )
        finish = self._bridge.connection.submit(FinishAddVmRequest(vm_id))
        finish_response = self._await(finish, "FinishAddVm")
        if finish_response.res == RES_OK:
            self._settled = True  # the slot is freed by the answer itself (it follows the wire)
            yield Launched(vm_id)
            return
        error = MmsRefusedError(
            finish_response.res, f"mms could not finish adding VM {vm_id}", vmId=vm_id
        )
        yield StopVm(vm_id, f"FinishAddVm failed: {error.message} (res {error.res})")
        # The VM is the client's to stop; remove it from mms once it has (or the client left).
        self._wait_for_client(self._policy.stop_timeout_s, expect=(VmStopped,), stopping=True)
        raise error

    def _refuse_early_messages(self) -> None:
        """A client message that came before `reserved` is out of turn, as is a departure."""
        item = self._inbox.get(0)
        if item is not None:
            self._inbox.put(item)  # let the common handling below judge it
            self._wait_for_client(0, expect=())

    def _reserve(self) -> Generator[LaunchEvent, None, PrepareVmResponse]:
        delays_s = list(self._policy.attempt_delays_s)
        response: PrepareVmResponse | None = None
        for index, delay_s in enumerate(delays_s):
            if delay_s > 0:
                # Let the guest reclaim memory; any client message now is out of turn.
                self._wait_for_client(delay_s, expect=(), idle=True)
            self._prepare_future = self._bridge.connection.submit(
                PrepareVmRequest(self._mem_size_bytes, self._init_mem_size_bytes)
            )
            response = self._await(self._prepare_future, "PrepareVm")
            if response.res not in (RES_OK, RES_ENOMEM):
                raise MmsRefusedError(response.res, "mms refused PrepareVm for this launch")
            self._vm_id = response.vm_id
            self._bridge.slot.set_vm_id(self._token, response.vm_id)
            next_delay_s = delays_s[index + 1] if index + 1 < len(delays_s) else None
            if response.res == RES_OK:
                next_delay_s = None
            yield Progress(index + 1, response.shortfall_bytes, next_delay_s)
            if response.res == RES_OK:
                return response
        assert response is not None
        raise MmsRefusedError(
            RES_ENOMEM,
            f"could not reserve memory for the VM after {len(delays_s)} attempts",
            shortfallBytes=response.shortfall_bytes,
            vmId=response.vm_id,
        )

    def _await(self, future: Future[R], what: str) -> R:
        return await_call(future, self._ctx, what)

    def _wait_for_client(
        self,
        timeout_s: float | None,
        expect: tuple[type, ...],
        idle: bool = False,
        stopping: bool = False,
    ) -> InboxItem | None:
        """Wait for an expected client message; session resets and departures end the launch."""
        deadline_s = self._ctx.remaining_s()
        if timeout_s is None or (deadline_s is not None and deadline_s < timeout_s):
            wait_s, deadline_hit = deadline_s, True
        else:
            wait_s, deadline_hit = timeout_s, False
        item = self._inbox.get(wait_s)
        if item is None:
            if idle or stopping:
                if deadline_hit and not stopping:
                    raise DeadlineExceededError("deadline passed during the launch")
                return None
            raise DeadlineExceededError("deadline passed waiting for the client to start its VM")
        if isinstance(item, SessionReset):
            raise MmsConnectionLostError(
                f"the mms connection (session {item.session}) was lost during the launch; mms "
                "dropped the VM being launched",
                session=item.session,
                **({"vmId": self._vm_id} if self._vm_id is not None else {}),
            )
        if isinstance(item, CallerGone):
            raise CallerGoneError("the client went away during the launch")
        if isinstance(item, StreamEnded):
            if stopping:
                return item
            raise LaunchAbortedError("the client closed the launch stream before it finished")
        if isinstance(item, expect):
            return item
        what = item.what if isinstance(item, Unexpected) else type(item).__name__
        raise InvalidArgumentError("request", f"unexpected {what} at this step of the launch")

    def _release(self) -> None:
        """Release the pending start; remove the reservation unless it launched or is gone."""
        slot = self._bridge.slot
        if self._settled:
            slot.release(self._token)
            return
        future = self._prepare_future
        if future is not None and not future.done():
            # The answer is still coming: remove whatever it reserves once it arrives.
            future.add_done_callback(self._remove_after)
            return
        if self._vm_id is None:
            slot.release(self._token)
            return
        self._bridge.remove_in_background(
            self._vm_id, "its launch did not complete", then=lambda: slot.release(self._token)
        )

    def _remove_after(self, done: Future[PrepareVmResponse]) -> None:
        slot = self._bridge.slot
        if done.cancelled() or done.exception() is not None:
            slot.release(self._token)
            return
        response = done.result()
        if response.res not in (RES_OK, RES_ENOMEM):
            slot.release(self._token)
            return
        self._bridge.remove_in_background(
            response.vm_id,
            "its launch ended before the reservation came back",
            then=lambda: slot.release(self._token),
        )
