"""The one pending start that mms allows, owned on behalf of one caller at a time.

Every start mms opens is tracked by exactly one claim. LaunchVm coroutines queue for the claim
in arrival order (an asyncio future each: a queued launch holds no thread) and hold it alone for
the whole launch (a bare call on its VM is refused with START_IN_PROGRESS). A launch that leaves
the queue (its caller left, its deadline passed) leaves no trace here. Bare PrepareVm calls
share one unary claim, and the start they open holds it under a lease, so a caller that
vanished cannot block every later start.

The claim follows the wire, as the books do; that is what makes it race-free:

- Bare PrepareVm, FinishAddVm and RemoveVm go to mms only through ``submit_prepare`` and
  ``submit_end``, which decide and queue under the slot's lock; mms answers in queue order.
- The slot observes the connection, before the books, so a start's VM id is known here before
  any caller can read it (books, PrepareVm answer). Still on the connection thread, it drops the
  claim when mms answers FinishAddVm or RemoveVm of the start with 0, whoever asked and whether
  or not they still wait; and when the session resets.
- A bare PrepareVm goes out under the unary claim, opening the claim if there is none. The first
  answer with a VM id is the start the claim tracks; its lease starts then.
- A PrepareVm joins the claim only while no FinishAddVm or RemoveVm of its start is queued or on
  the wire; otherwise it is refused with START_IN_PROGRESS before reaching mms. So a joined
  PrepareVm always reaches mms before anything that ends the start: it tops that start up (same
  sizes) or mms refuses it (-22). It can never open a start that nobody tracks.
- A unary claim whose PrepareVm calls all came back without a VM id opened nothing: dropped.
- When the lease runs out, or the caller of the PrepareVm that opened the start left before its
  answer, the start is removed. If a FinishAddVm or RemoveVm of it is in flight, the removal
  waits for that answer and happens only if the start is still pending: never a VM that started.
- A PrepareVm whose answer reached mms but could not be read (a right-type bad body, say) may
  have opened a start whose id nobody read. mms numbers starts in sequence within a session, so
  that start can only be the id after the last one mms gave: the claim tracks that id (marked
  guessed) and removes it at once (or under the lease, if other PrepareVm calls joined it).
- A removal the slot sends is followed to its answer: 0 ends the claim (as any removal does);
  -22 means mms holds no pending start with that id, which ends the claim too; anything else
  (an unreadable answer, an error) is retried with backoff while the claim is current. A claim
  being removed is joined by no PrepareVm: the start is going away.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

from manatee_grpc.core import _aio
from manatee_grpc.core._errors import MmsConnectionError, StartInProgressError
from manatee_grpc.mms._messages import (
    RES_EINVAL,
    RES_ENOMEM,
    RES_OK,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
)

if TYPE_CHECKING:
    from manatee_grpc.mms._connection import MmsConnection

logger = logging.getLogger(__name__)


class Owner(enum.Enum):
    LAUNCH = "launch"
    UNARY = "unary"  # PrepareVm / FinishAddVm / RemoveVm called one by one


@dataclass(slots=True, eq=False)
class Claim:
    owner: Owner
    token: object
    vm_id: int | None = None  # the start's VM, once mms answered the PrepareVm that opened it
    session: int = 0  # the connection's session mms opened ``vm_id`` in (0: none yet)
    # When the lease of a start opened by bare PrepareVm runs out (wall clock), or None. A lease
    # timer that fires for an older lease, or after the claim ended, does nothing.
    lease_expire_unix_s: float | None = None
    lease_generation: int = 0
    lease_ran_out: bool = False  # the lease timer fired while this claim held the start
    # Bare PrepareVm calls sent under this claim and not yet answered (unary claims).
    prepares_in_flight: int = 0
    # FinishAddVm / RemoveVm of ``vm_id`` queued or on the wire: a join now could land after.
    ends_in_flight: int = 0
    # Why to remove the start once no end is in flight (the lease ran out behind one), or None.
    remove_when_idle: str | None = None
    # The bare PrepareVm whose answer opened the start (compared by identity).
    opened_by: PrepareVmRequest | None = None
    # vm_id was inferred (the id after the last one mms gave), not read from an answer.
    vm_id_guessed: bool = False
    # Why the slot is removing the start (its RemoveVm sent or being retried), or None.
    removing: str | None = None
    removal_attempts: int = 0
    # A RemoveVm of the start reached mms and its outcome is unknown (it may have removed it).
    removal_ambiguous: bool = False


@dataclass(slots=True, eq=False)
class BarePrepare:
    """One bare PrepareVm sent under the unary claim; its caller waits on ``future``."""

    claim: Claim
    request: PrepareVmRequest
    future: Future[PrepareVmResponse]
    # The connection's session mms answered in (set before ``future`` resolves), or None: the
    # VM id of the answer means something only in that session.
    answered_session: int | None = None
    # No start was pending in mms when it answered (the slot follows the wire): then a -22
    # can only mean the VM is too large for the CrOS guest.
    answered_idle: bool = False
    opened: bool = False  # mms answered, and the answer opened the claim's start
    caller_left: bool = False


# Send RemoveVm for (vm_id, why, session); called under the slot's lock; must not block.
RemoveStart = Callable[[int, str, int], None]
# A removal that failed is tried again after this, doubling up to the cap (or the lease).
REMOVAL_RETRY_INITIAL_S = 0.5
REMOVAL_RETRY_MAX_S = 30.0
# Run a callback after a delay, from any thread; must not block. Never cancelled: a lease
# callback checks whether its lease still holds.
CallLater = Callable[[float, Callable[[], None]], None]


def thread_timer(delay_s: float, callback: Callable[[], None]) -> None:
    """A CallLater for a slot without an event loop (unit tests, tools): a daemon Timer."""
    timer = threading.Timer(delay_s, callback)
    timer.daemon = True
    timer.name = "start-lease"
    timer.start()


def loop_timer(loop: asyncio.AbstractEventLoop) -> CallLater:
    """A CallLater on the server's event loop: a lease costs a timer entry, not a thread."""

    def call_later(delay_s: float, callback: Callable[[], None]) -> None:
        _aio.call_soon_from_thread(loop, loop.call_later, delay_s, callback)

    return call_later


@dataclass(slots=True, eq=False)
class _LaunchWaiter:
    """A queued launch: its ``changed`` future completes when the slot frees or it moves up."""

    token: object
    changed: asyncio.Future[None]


# Told a queued launch's place in the queue (1: next to take the start), on the loop, when it
# queues and each time it moves up. Must not block: the launch takes the start without waiting
# for its client to read this.
OnPosition = Callable[[int], None]


class StartSlot:
    """Who owns mms's pending start, a ConnectionObserver; see the module docstring."""

    def __init__(
        self,
        connection: MmsConnection,
        lease_s: float,
        remove_start: RemoveStart,
        call_later: CallLater = thread_timer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._connection = connection
        self._lease_s = lease_s
        self._remove_start = remove_start
        self._call_later = call_later
        self._clock = clock
        # Reentrant: a future that is already done runs its callback at once, under the lock.
        self._lock = threading.RLock()
        self._claim: Claim | None = None
        # The highest VM id mms gave in this session: a start opened unseen got the next one.
        self._last_vm_id = 0
        self._session = 0  # the connection's current session (0: never connected)
        self._waiters: collections.deque[_LaunchWaiter] = collections.deque()
        # Bare PrepareVm calls on their way, by id() of their request: on_response stamps the
        # session mms answered in on them.
        self._bare_in_flight: dict[int, BarePrepare] = {}
        # Told (vm_id, session) when a start's lease runs out, under the lock: must not block.
        self.on_lease_expired: Callable[[int | None, int], None] | None = None

    @property
    def lease_s(self) -> float:
        return self._lease_s

    def use_call_later(self, call_later: CallLater) -> None:
        """Run lease timers with ``call_later`` from now on (the server's event loop)."""
        self._call_later = call_later

    @property
    def claim(self) -> Claim | None:
        return self._claim

    def launches_waiting(self) -> int:
        with self._lock:
            return len(self._waiters)

    # --- launches ------------------------------------------------------------------------------

    async def acquire_for_launch(
        self, token: object, on_position: OnPosition | None = None
    ) -> None:
        """Wait, in arrival order, until this launch owns the pending start.

        A launch that must wait is told its place through ``on_position`` when it queues and
        each time a launch ahead of it leaves the queue (took the start, or gave up). Waiting
        holds nothing: bare starts are refused while launches queue, but the start itself is
        free for the launch at the head. Cancelling the wait (the caller left, its deadline
        passed) takes the launch out of the queue and hands its turn on; nothing of it stays
        here.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._claim is None and not self._waiters:
                self._claim = Claim(Owner.LAUNCH, token)
                return
            waiter = _LaunchWaiter(token, loop.create_future())
            self._waiters.append(waiter)
        told = 0
        try:
            while True:
                with self._lock:
                    if self._claim is None and self._waiters[0] is waiter:
                        self._waiters.popleft()
                        self._claim = Claim(Owner.LAUNCH, token)
                        self._tell_moved(0)
                        return
                    # A fresh future under the lock: a change from now on completes it.
                    waiter.changed = loop.create_future()
                    position = self._waiters.index(waiter) + 1
                if on_position is not None and position != told:
                    on_position(position)
                    told = position
                # Woken by a release with a bare start in first, or by a move: look again.
                await waiter.changed
        except BaseException:
            with self._lock:
                if waiter in self._waiters:
                    index = self._waiters.index(waiter)
                    del self._waiters[index]
                    self._tell_moved(index)
                self._wake_next()
            raise

    def queue_positions(self) -> dict[object, int]:
        """Each queued launch's token and its place in the queue (1: next); for tests, tools."""
        with self._lock:
            return {waiter.token: index + 1 for index, waiter in enumerate(self._waiters)}

    def set_vm_id(self, token: object, vm_id: int) -> None:
        with self._lock:
            if self._claim is not None and self._claim.token is token:
                self._claim.vm_id = vm_id

    def open_start_vm_id(self, token: object) -> int | None:
        """The VM of the start mms opened for ``token``'s claim and has not ended, or None.

        Set on the connection thread before the PrepareVm caller sees the answer.
        """
        with self._lock:
            claim = self._claim
            return claim.vm_id if claim is not None and claim.token is token else None

    def remove_launch_start(self, token: object, why: str, prepare: Future[Any] | None) -> None:
        """The launch ``token`` ended unfinished: remove the start it opened, or release.

        ``prepare`` is its last PrepareVm: if that reached mms but its answer was unreadable, it
        may have opened a start nobody read the id of, tracked under the guessed id. The claim
        stays (blocking other starts) until mms confirms the start is gone.
        """
        with self._lock:
            claim = self._claim
            if claim is None or claim.token is not token:
                return
            if claim.vm_id is None and prepare is not None and _may_have_opened(prepare):
                self._guess_start(claim)
            if claim.vm_id is None:
                self._drop_claim()
                return
            self._remove_unfinished(claim, why)

    def open_start(self, token: object) -> tuple[int, int] | None:
        """(VM, session) of the start mms opened for ``token``'s claim, read at once, or None."""
        with self._lock:
            claim = self._claim
            if claim is None or claim.token is not token or claim.vm_id is None:
                return None
            return claim.vm_id, claim.session

    def release(self, token: object) -> None:
        with self._lock:
            if self._claim is not None and self._claim.token is token:
                self._drop_claim()

    def release_all(self) -> None:
        """mms forgot its pending start (the session reset): nobody owns it any more."""
        with self._lock:
            if self._claim is not None:
                self._drop_claim()

    # --- bare calls ----------------------------------------------------------------------------

    def submit_prepare(self, request: PrepareVmRequest) -> BarePrepare:
        """Send a bare PrepareVm under the unary claim, or refuse it (StartInProgressError)."""
        with self._lock:
            claim = self._claim
            if claim is not None and claim.owner is Owner.LAUNCH:
                raise self._launch_in_progress_error()
            if claim is None and self._waiters:
                raise StartInProgressError(
                    "launches are queued for the pending VM start",
                    launchesWaiting=len(self._waiters),
                )
            if claim is not None and claim.removing is not None:
                raise StartInProgressError(
                    f"the pending VM start (VM {claim.vm_id}) is being removed "
                    f"({claim.removing}); retry PrepareVm once it is gone",
                    vmId=claim.vm_id,
                )
            if claim is not None and claim.ends_in_flight:
                raise StartInProgressError(
                    f"a FinishAddVm or RemoveVm of the pending VM start (VM {claim.vm_id}) is on "
                    "its way to mms; retry PrepareVm once it is answered",
                    vmId=claim.vm_id,
                )
            if claim is None:
                claim = self._claim = Claim(Owner.UNARY, object())
            claim.prepares_in_flight += 1
            try:
                future = self._connection.submit(request)
            except BaseException:
                claim.prepares_in_flight -= 1
                self._drop_if_nothing_opened(claim)
                raise
            prepare = BarePrepare(claim, request, future)
            self._bare_in_flight[id(request)] = prepare
            future.add_done_callback(lambda _: self._prepare_done(prepare))
            return prepare

    def caller_left(self, prepare: BarePrepare) -> None:
        """The caller stopped waiting for ``prepare``; if its answer opens the start, remove it."""
        with self._lock:
            prepare.caller_left = True
            if prepare.opened:
                self._remove_unfinished(prepare.claim, "its PrepareVm caller went away")

    @overload
    def submit_end(
        self, request: FinishAddVmRequest, *, refuse_if_launching: bool = ...
    ) -> Future[FinishAddVmResponse]: ...

    @overload
    def submit_end(
        self, request: RemoveVmRequest, *, refuse_if_launching: bool = ...
    ) -> Future[RemoveVmResponse]: ...

    def submit_end(
        self, request: FinishAddVmRequest | RemoveVmRequest, *, refuse_if_launching: bool = False
    ) -> Future[Any]:
        """Send FinishAddVm or RemoveVm; one naming the pending start counts until answered.

        ``refuse_if_launching``: a caller's own call on the VM a launch is starting is refused
        (StartInProgressError): that start is not theirs.
        """
        with self._lock:
            claim = self._claim
            if claim is not None and claim.vm_id != request.vm_id:
                claim = None  # another VM: this call cannot end the pending start
            if refuse_if_launching and claim is not None and claim.owner is Owner.LAUNCH:
                raise self._launch_in_progress_error()
            future: Future[Any] = self._connection.submit(request)
            if claim is not None:
                claim.ends_in_flight += 1
                ending = claim
                future.add_done_callback(lambda done: self._end_done(ending, request, done))
            return future

    # --- ConnectionObserver (the connection thread, before the books) --------------------------

    def on_connected(self, session: int) -> None:
        with self._lock:
            self._session = session
            self._last_vm_id = 0  # mms numbers every session's starts from 1

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        del session, error
        self.release_all()

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None:
        del round_trip_s
        if isinstance(request, GetBalloonStatsRequest | RebalanceMemoryRequest):
            return  # nothing for the start slot (most answers): no lock taken
        with self._lock:
            if isinstance(request, PrepareVmRequest) and isinstance(response, PrepareVmResponse):
                bare = self._bare_in_flight.get(id(request))
                if bare is not None and bare.request is request:
                    bare.answered_session = session
                # mms answers an id for a start it opened or topped up (res 0 or -12).
                if response.res in (RES_OK, RES_ENOMEM):
                    self._last_vm_id = max(self._last_vm_id, response.vm_id)
                    self._start_answered(request, response.vm_id, session)
            elif (
                isinstance(request, FinishAddVmRequest | RemoveVmRequest)
                and isinstance(response, FinishAddVmResponse | RemoveVmResponse)
                and response.res == RES_OK
                and self._claim is not None
                and self._claim.vm_id == request.vm_id
            ):
                # mms knew that id (a guessed one too): a start opened unseen gets a later one.
                self._last_vm_id = max(self._last_vm_id, request.vm_id)
                self._drop_claim()  # the start became a running VM, or is gone

    # --- internals -----------------------------------------------------------------------------

    def _start_answered(self, request: PrepareVmRequest, vm_id: int, session: int) -> None:
        claim = self._claim
        if claim is not None and claim.vm_id == vm_id:
            claim.vm_id_guessed = False
            return  # a top-up of the start we track
        if claim is not None and claim.vm_id_guessed:
            logger.warning("mms answered VM %d for the start guessed as VM %d", vm_id, claim.vm_id)
            claim.vm_id, claim.vm_id_guessed = vm_id, False
            return
        if claim is None:
            # Every PrepareVm goes out under a claim, so this means a bug here; track the start
            # anyway, under a lease, rather than let it block every later start.
            logger.error("mms opened a start (VM %d) outside any claim; leasing it", vm_id)
            claim = self._claim = Claim(Owner.UNARY, object())
        elif claim.vm_id is not None:
            logger.error("mms answered VM %d for the start known as VM %d", vm_id, claim.vm_id)
        claim.vm_id = vm_id
        claim.session = session
        if claim.owner is Owner.UNARY:
            claim.opened_by = request
            self._start_lease(claim)

    def _prepare_done(self, prepare: BarePrepare) -> None:
        # After on_response when mms answered; also when the call failed or was cancelled.
        with self._lock:
            if self._bare_in_flight.get(id(prepare.request)) is prepare:
                del self._bare_in_flight[id(prepare.request)]
            claim = prepare.claim
            prepare.answered_idle = claim.vm_id is None
            claim.prepares_in_flight -= 1
            unread = (
                claim is self._claim and claim.vm_id is None and _may_have_opened(prepare.future)
            )
            if unread:
                # Its caller got an error and no id: nobody can finish this start.
                self._guess_start(claim)
                claim.opened_by = prepare.request
                self._start_lease(claim)
            prepare.opened = claim.opened_by is prepare.request
            self._drop_if_nothing_opened(claim)
            if prepare.opened and prepare.caller_left:
                self._remove_unfinished(claim, "its PrepareVm caller went away")
            elif unread and claim.prepares_in_flight == 0:
                # No joined PrepareVm can learn the id and finish it: remove it now.
                self._remove_unfinished(
                    claim, "mms's answer to the PrepareVm that opened it was unreadable"
                )

    def _guess_start(self, claim: Claim) -> None:
        """A PrepareVm reached mms but its answer was unreadable: track the id it would get."""
        claim.vm_id = self._last_vm_id + 1
        claim.vm_id_guessed = True
        claim.session = self._session  # unread answers come on the current stream only
        logger.warning(
            "mms's answer to a PrepareVm was unreadable; it may have opened a start, which would "
            "be VM %d: tracking it until it is removed",
            claim.vm_id,
        )

    def _end_done(
        self, claim: Claim, request: FinishAddVmRequest | RemoveVmRequest, done: Future[Any]
    ) -> None:
        with self._lock:
            claim.ends_in_flight -= 1
            if (
                claim is self._claim
                and claim.removing is not None
                and isinstance(request, RemoveVmRequest)
            ):
                self._removal_done(claim, done)
            if claim.ends_in_flight == 0 and claim.remove_when_idle is not None:
                why, claim.remove_when_idle = claim.remove_when_idle, None
                self._remove_unfinished(claim, why)

    def _remove_unfinished(self, claim: Claim, why: str) -> None:
        """Remove the claim's start if it is still pending; behind an end, once that fails."""
        if claim is not self._claim or claim.vm_id is None:
            return  # it started, was removed, or the session reset
        if claim.removing is not None:
            return  # already being removed (and retried until mms confirms it)
        if claim.ends_in_flight:
            claim.remove_when_idle = why
            return
        claim.removing = why
        try:
            self._remove_start(claim.vm_id, why, claim.session)
        except Exception as error:  # e.g. not connected: the next try (or a reset) settles it
            logger.warning("could not send RemoveVm %d (%s): %s", claim.vm_id, why, error)
            self._retry_removal_later(claim)

    def _removal_done(self, claim: Claim, done: Future[Any]) -> None:
        """The slot's RemoveVm of the claim's start came back, and the claim is still current."""
        assert claim.vm_id is not None
        error = None if done.cancelled() else done.exception()
        if not done.cancelled() and error is None:
            res = done.result().res
            if res == RES_EINVAL:
                # mms holds no pending start with this id (any pending start would be removed
                # with 0): nothing to remove. If a start was opened unseen, its id is used.
                if not claim.vm_id_guessed or claim.removal_ambiguous:
                    self._last_vm_id = max(self._last_vm_id, claim.vm_id)
                logger.info("mms holds no pending start VM %d: the start is released", claim.vm_id)
                self._drop_claim()
                return
        elif (
            isinstance(error, MmsConnectionError)
            and error.reached_mms is False
            and not error.stream_closed
        ):
            return  # not sent (hung or out of step): sent again once the stream is usable
        elif error is not None and getattr(error, "reached_mms", None) is not False:
            claim.removal_ambiguous = True
        self._retry_removal_later(claim)

    def _retry_removal_later(self, claim: Claim) -> None:
        claim.removal_attempts += 1
        delay_s = min(
            REMOVAL_RETRY_MAX_S,
            self._lease_s,
            REMOVAL_RETRY_INITIAL_S * 2 ** (claim.removal_attempts - 1),
        )
        attempts = claim.removal_attempts
        logger.warning(
            "removing the pending start VM %s failed; trying again in %.1f s", claim.vm_id, delay_s
        )
        self._call_later(delay_s, lambda: self._retry_removal(claim, attempts))

    def _retry_removal(self, claim: Claim, attempts: int) -> None:
        with self._lock:
            if claim is not self._claim or claim.removal_attempts != attempts:
                return  # removed, reset, or another retry took over
            why, claim.removing = claim.removing, None
            if why is not None:
                self._remove_unfinished(claim, why)

    def _drop_if_nothing_opened(self, claim: Claim) -> None:
        if (
            claim is self._claim
            and claim.owner is Owner.UNARY
            and claim.vm_id is None
            and claim.prepares_in_flight == 0
        ):
            self._drop_claim()

    def _start_lease(self, claim: Claim) -> None:
        claim.lease_generation += 1
        claim.lease_expire_unix_s = self._clock() + self._lease_s
        generation = claim.lease_generation
        self._call_later(self._lease_s, lambda: self._lease_expired(claim, generation))

    def _lease_expired(self, claim: Claim, generation: int) -> None:
        with self._lock:
            if claim is not self._claim or claim.lease_generation != generation:
                return  # the start ended (or got a new lease) before this timer fired
            claim.lease_ran_out = True
            if self.on_lease_expired is not None:
                self.on_lease_expired(claim.vm_id, claim.session)
            self._remove_unfinished(claim, "its PrepareVm lease expired before FinishAddVm")

    def _launch_in_progress_error(self) -> StartInProgressError:
        claim = self._claim
        return StartInProgressError(
            "a LaunchVm owns the pending VM start; wait for it or use LaunchVm",
            **({"vmId": claim.vm_id} if claim is not None and claim.vm_id is not None else {}),
        )

    def _drop_claim(self) -> None:
        assert self._claim is not None
        self._claim = None
        self._wake_next()

    def _wake_next(self) -> None:
        """The slot is free: let the first queued launch take it (on its own loop)."""
        if self._claim is None and self._waiters:
            self._wake(self._waiters[0])

    def _tell_moved(self, from_index: int) -> None:
        """The waiter at ``from_index`` left the queue: those behind it moved up one place."""
        for index in range(from_index, len(self._waiters)):
            self._wake(self._waiters[index])

    @staticmethod
    def _wake(waiter: _LaunchWaiter) -> None:
        # From the loop or the connection thread (an answer freed the slot): a loop hand-off.
        changed = waiter.changed
        _aio.call_soon_from_thread(changed.get_loop(), _set_if_pending, changed)


def _may_have_opened(prepare: Future[Any]) -> bool:
    """The PrepareVm reached mms, the stream is kept, and its answer could not be read."""
    if not prepare.done() or prepare.cancelled():
        return False
    error = prepare.exception()
    return (
        error is not None
        and getattr(error, "reached_mms", None) is not False
        and not getattr(error, "stream_closed", False)
    )


def _set_if_pending(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
