"""The memory operations the gRPC API offers, in domain terms: no protobuf, no gRPC context.

Each operation is a coroutine on the server's event loop: it validates against the books, sends
what mms needs through the one connection, waits within the caller's deadline (``timeout_s``),
and turns mms's ``res`` codes into ManateeErrors. A caller that leaves cancels the coroutine:
a request still queued stays off the wire; one on the wire runs to completion.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from manatee_grpc.core import _aio
from manatee_grpc.core._books import Books, VmRecord, VmState
from manatee_grpc.core._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ManateeError,
    MmsConnectionError,
    MmsRefusedError,
    PreviewUnavailableError,
    SessionResetError,
    VmNotRunningError,
)
from manatee_grpc.core._request_ids import Outcome, RequestIds
from manatee_grpc.core._starts import BarePrepare, StartSlot
from manatee_grpc.core._stats import StatsReader, StatsSnapshot
from manatee_grpc.mms._connection import MmsConnection
from manatee_grpc.mms._memory_math import align_down_page
from manatee_grpc.mms._messages import (
    CROS_GUEST_VM_ID,
    RES_EINVAL,
    RES_ENOMEM,
    RES_OK,
    BalloonDelta,
    FinishAddVmRequest,
    MessageType,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
)
from manatee_grpc.mms._rebalance import StatsGapError, preview_from_stats

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=Response)
T = TypeVar("T")


async def _await_outcome(
    outcome: Outcome[T], timeout_s: float | None, msg_type: MessageType, sent: Future[Any] | None
) -> T | None:
    """Wait for a request id's shared outcome; None if its request never reached mms (run it).

    ``sent`` is the mms request of the caller that runs it (None for a repeat): if that caller
    gives up while the request is still queued, the request stays off the wire and repeats run
    it afresh. Other callers (repeats) never cancel what they wait for.
    """
    try:
        done = await _aio.wait_done(outcome, timeout_s)
    except asyncio.CancelledError:
        if sent is not None:
            sent.cancel()  # still queued: it stays off the wire; its callback drops the id
        raise
    if done:
        if not outcome.cancelled():
            return outcome.result()
        own_error = None if sent is None or sent.cancelled() else sent.exception()
        if own_error is not None:
            raise own_error  # this call's own "not sent"; repeats waiting on it run it afresh
        return None
    what = msg_type.name
    if sent is None:
        # A repeat sends nothing: whether "the request" reached mms is whether the first
        # call's did. One still queued may yet be sent, so that cannot be said (no reachedMms).
        first = outcome.request
        on_wire = first is not None and (
            first.running() or (first.done() and not first.cancelled())
        )
        raise DeadlineExceededError(
            f"deadline passed waiting for mms {what}: this call repeats a request_id whose "
            "first call is still in flight"
            + (" (its request was sent and will complete)" if on_wire else " (still queued)")
            + "; retry with the same request_id to get its answer",
            messageType=what,
            requestIdRepeat="true",
            **({"reached_mms": True} if on_wire else {}),
        )
    reached = not sent.cancel()  # still queued: it stays off the wire; its callback drops the id
    raise DeadlineExceededError(
        f"deadline passed waiting for mms {what}"
        + (" (the request was sent and will complete)" if reached else " (never sent)"),
        messageType=what,
        reached_mms=reached,
    )


def _settle(
    outcome: Future[T],
    sent: Future[R],
    convert: Callable[[R], T],
    forget: Callable[[], None],
) -> None:
    """Resolve a request id's outcome from its mms call: the answer, or why it failed.

    A call that never reached mms (cancelled while queued; refused "not sent" because mms is not
    connected, hung or out of step, or the stream closed before its turn; the server closing)
    has no outcome to remember: the id is forgotten and the outcome cancelled, so that repeats
    waiting on it, and any later retry, run the request afresh.
    """
    if sent.cancelled():
        forget()
        outcome.cancel()
        return
    error = sent.exception()
    if error is not None:
        if isinstance(error, ManateeError) and error.reached_mms is False:
            forget()
            outcome.cancel()  # the first caller raises its own error (see _await_outcome)
        else:
            outcome.set_exception(error)
        return
    try:
        outcome.set_result(convert(sent.result()))
    except Exception as refused:  # e.g. mms refused with an errno: the same for every repeat
        outcome.set_exception(refused)


@dataclass(frozen=True, slots=True)
class RebalanceResult:
    requested: tuple[BalloonDelta, ...]  # page-aligned, CrOS guest delta last
    actual: tuple[BalloonDelta, ...]  # one per requested VM; left out by mms = 0
    fully_applied: bool


@dataclass(frozen=True, slots=True)
class PrepareResult:
    vm_id: int
    reserved: bool
    shortfall_bytes: int
    balloon_control_path: str
    session_id: str  # the session vm_id belongs to
    # When the start's lease runs out (wall clock): FinishAddVm must come before it.
    lease_expire_unix_s: float | None = None


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    lease_s: float = 60.0
    coalesce_stats: bool = True
    balloon_control_dir: str = "/run"

    def balloon_control_path(self, vm_id: int) -> str:
        # mms creates this socket for the new VM's crosvm; the path is mms's, not ours.
        return f"{self.balloon_control_dir.rstrip('/')}/mms_control_{vm_id}.sock"


class MemoryBridge:
    """The service's operations over one MmsConnection; see the module docstring."""

    def __init__(self, connection: MmsConnection, config: BridgeConfig | None = None) -> None:
        self.config = config or BridgeConfig()
        self.connection = connection
        # The slot observes before the books, so a VM id a caller can read is known to it.
        self.slot = StartSlot(connection, self.config.lease_s, self._remove_for_slot)
        connection.add_observer(self.slot)
        self.books = Books()
        connection.add_observer(self.books)
        self.request_ids = RequestIds()
        self.stats = StatsReader(connection, coalesce=self.config.coalesce_stats)
        self.books.add_disconnect_listener(self._on_disconnected)
        # Called with the ended session when mms drops it (launches under way listen).
        self._reset_listeners: list[Callable[[int], None]] = []
        self._reset_lock = threading.Lock()
        # Background removals that could not be sent while the stream was hung or out of step:
        # (vm_id, why, then, session); an entry of another session is never sent.
        self._deferred_removals: list[tuple[int, str, Callable[[], None] | None, int]] = []
        connection.add_usable_listener(self._usable_changed)

    # --- stats ---------------------------------------------------------------------------------

    async def get_balloon_stats_async(
        self, vm_ids: tuple[int, ...], timeout_s: float | None, session_id: str = ""
    ) -> StatsSnapshot:
        self.check_session(session_id, "GetBalloonStats")
        return await self.stats.read_async(self._stats_ids(vm_ids), timeout_s)

    def check_session(self, session_id: str, what: str) -> None:
        """SessionResetError unless ``session_id`` is "" or the current session.

        For calls that queue nothing on a VM's behalf (stats): no need to hold the session.
        """
        if session_id and session_id != self.books.session_id:
            with self.books.pinned(session_id, what):
                pass  # raises SessionResetError, worded once, in the books

    def _stats_ids(self, vm_ids: tuple[int, ...]) -> tuple[int, ...]:
        # Unknown ids are not an error here: mms leaves them out and they come back as missing.
        return vm_ids or self.books.running_vm_ids() or (CROS_GUEST_VM_ID,)

    # --- rebalance -----------------------------------------------------------------------------

    async def rebalance(
        self,
        deltas: Mapping[int, int],
        timeout_s: float | None,
        session_id: str = "",
        request_id: str = "",
    ) -> RebalanceResult:
        """Move memory between siblings and the CrOS guest; the CrOS delta keeps the sum 0.

        ``session_id``: the session the VM ids were learnt in ("" = current). ``request_id``: a
        repeat gets the first call's result and sends nothing (see _request_ids).
        """
        fingerprint = tuple(deltas.items())
        while True:
            with self.books.pinned(session_id, "RebalanceMemory"):
                outcome, first = self._claim_id("RebalanceMemory", request_id, fingerprint)
                sent = None
                if first:
                    try:
                        requested = self._rebalance_deltas(deltas)
                        sent = self.connection.submit(RebalanceMemoryRequest(requested))
                    except BaseException:
                        self._drop_id("RebalanceMemory", request_id, outcome)
                        raise
            if outcome is None:
                assert sent is not None
                response = await _aio.await_mms(sent, timeout_s, MessageType.REBALANCE_MEMORY)
                return _rebalance_result(requested, response)
            if sent is not None:
                self._settle_id(
                    "RebalanceMemory",
                    request_id,
                    outcome,
                    sent,
                    functools.partial(_rebalance_result, requested),
                )
            result: RebalanceResult | None = await _await_outcome(
                outcome, timeout_s, MessageType.REBALANCE_MEMORY, sent
            )
            if result is not None:
                return result
            # The first call with this id was never sent: run it now.

    async def preview_rebalance(
        self, deltas: Mapping[int, int], timeout_s: float | None, session_id: str = ""
    ) -> RebalanceResult:
        """What ``rebalance(deltas)`` would answer now (validate_only); no RebalanceMemory is sent.

        The same checks as the real call, then one GetBalloonStats (the coalesced reader: a read
        changes nothing) of the VMs named, and mms's own arithmetic (mms/_rebalance) on what it
        shows: each balloon, each guest's available memory, the CrOS guest's total memory, and
        each sibling's memory size from the books. PreviewUnavailableError where that cannot be
        certain (see ``preview_rebalance`` in mms/_rebalance); a request_id is never recorded.
        """
        with self.books.pinned(session_id, "RebalanceMemory"):
            requested = self._rebalance_deltas(deltas)
            session = self.books.session
            mem_sizes_bytes = {
                delta.vm_id: self.books.require_vm(delta.vm_id).mem_size_bytes
                for delta in requested
                if delta.vm_id != CROS_GUEST_VM_ID
            }
        snapshot = await self.stats.read_async(
            tuple(sorted(delta.vm_id for delta in requested)), timeout_s
        )
        if snapshot.session != session:
            raise SessionResetError(
                "the mms session was reset during the preview: mms dropped its sibling VMs",
                session=self.books.public_session_id(snapshot.session),
            )
        try:
            preview = preview_from_stats(
                {entry.vm_id: entry for entry in snapshot.stats}, mem_sizes_bytes, requested
            )
        except StatsGapError as gap:
            unreadable = {entry.vm_id: entry for entry in snapshot.unreadable}.get(gap.vm_id)
            why = (
                f"its stats are unreadable ({unreadable.mms_field} = {unreadable.mms_value})"
                if unreadable is not None
                else f"mms gave no {gap.field} for it"
            )
            raise PreviewUnavailableError(
                f"cannot preview the rebalance: VM {gap.vm_id} is not known well enough, {why} "
                "(nothing was sent but a stats read)",
                vmId=gap.vm_id,
                mmsField=unreadable.mms_field if unreadable is not None else gap.field,
            ) from None
        if not preview.exact:
            raise PreviewUnavailableError(
                "cannot preview the rebalance: mms would deflate the CrOS guest past its visible "
                "balloon, and what it does then depends on its internal allocation, which mms "
                "does not report (nothing was sent but a stats read)",
                vmId=CROS_GUEST_VM_ID,
                mmsField="internal_balloon_allocation",
            )
        return _rebalance_result(requested, RebalanceMemoryResponse(preview.actual_deltas))

    def _rebalance_deltas(self, deltas: Mapping[int, int]) -> tuple[BalloonDelta, ...]:
        requested: list[BalloonDelta] = []
        for index, (vm_id, delta_bytes) in enumerate(deltas.items()):
            record = self.books.require_vm(vm_id, f"deltas[{index}].vm_id")
            if record.state is not VmState.RUNNING:
                # Refused here, never sent: mms did not say so, so no MMS_* reason.
                raise VmNotRunningError(
                    f"VM {vm_id} is {record.state.value}, not running: its balloon cannot move "
                    "(nothing was sent to mms)",
                    vmId=vm_id,
                    state=record.state.value,
                    field=f"deltas[{index}].vm_id",
                    reached_mms=False,
                )
            requested.append(BalloonDelta(vm_id, align_down_page(delta_bytes)))
        cros_delta_bytes = -sum(delta.delta_bytes for delta in requested)
        requested.append(BalloonDelta(CROS_GUEST_VM_ID, cros_delta_bytes))
        return tuple(requested)

    # --- request ids ---------------------------------------------------------------------------

    def _claim_id(
        self, method: str, request_id: str, fingerprint: Hashable
    ) -> tuple[Outcome[Any] | None, bool]:
        """(outcome, first) for a request id; (None, True) without one."""
        if not request_id:
            return None, True
        return self.request_ids.claim(self.books.session, method, request_id, fingerprint)

    def _drop_id(self, method: str, request_id: str, outcome: Future[Any] | None) -> None:
        """A first call refused before reaching mms: repeats waiting on it run it themselves."""
        if outcome is not None:
            self.request_ids.forget(method, request_id, outcome)
            outcome.cancel()

    def _settle_id(
        self,
        method: str,
        request_id: str,
        outcome: Outcome[T],
        sent: Future[R],
        convert: Callable[[R], T],
    ) -> None:
        def forget() -> None:
            self.request_ids.forget(method, request_id, outcome)

        outcome.request = sent
        sent.add_done_callback(lambda _: _settle(outcome, sent, convert, forget))

    # --- one-by-one start ----------------------------------------------------------------------

    async def prepare_vm(
        self,
        mem_size_bytes: int,
        init_mem_size_bytes: int,
        timeout_s: float | None,
        request_id: str = "",
    ) -> PrepareResult:
        """One PrepareVm attempt; with ``request_id``, a repeat gets the first attempt's result.

        A caller who leaves before the answer loses the start it opened, unless it gave a
        request_id: it means to retry, so the start stays, under the lease like any bare start.
        """
        while True:
            outcome, first = self._claim_id(
                "PrepareVm", request_id, (mem_size_bytes, init_mem_size_bytes)
            )
            prepare: BarePrepare | None = None
            if first:
                try:
                    prepare = self.slot.submit_prepare(
                        PrepareVmRequest(mem_size_bytes, init_mem_size_bytes)
                    )
                except BaseException:
                    self._drop_id("PrepareVm", request_id, outcome)
                    raise
            if outcome is None:
                assert prepare is not None
                try:
                    response = await _aio.await_mms(
                        prepare.future, timeout_s, MessageType.PREPARE_VM
                    )
                except (DeadlineExceededError, asyncio.CancelledError):
                    # A start this call opens has nobody to finish it: the slot removes it.
                    self.slot.caller_left(prepare)
                    raise
                return self._still_current(self._prepare_result(prepare, response))
            if prepare is not None:
                self._settle_id(
                    "PrepareVm",
                    request_id,
                    outcome,
                    prepare.future,
                    functools.partial(self._prepare_result, prepare),
                )
            result: PrepareResult | None = await _await_outcome(
                outcome,
                timeout_s,
                MessageType.PREPARE_VM,
                None if prepare is None else prepare.future,
            )
            if result is not None:
                return self._still_current(result)

    def _still_current(self, result: PrepareResult) -> PrepareResult:
        """``result`` unless its session ended since mms answered: its VM id would name
        another session's VM (ids repeat), and mms dropped the start with its session."""
        if result.session_id != self.books.session_id or not self.books.connected:
            raise SessionResetError(
                f"mms answered PrepareVm (VM {result.vm_id}) in session {result.session_id}, "
                f"which was reset before the answer could be delivered (now session "
                f"{self.books.session_id or '(none)'}); mms dropped that start",
                vmId=result.vm_id,
                vmSession=result.session_id,
                session=self.books.session_id,
                reached_mms=True,
            )
        return result

    def _prepare_result(self, prepare: BarePrepare, response: PrepareVmResponse) -> PrepareResult:
        mem_size_bytes = prepare.request.mem_size_bytes
        init_mem_size_bytes = prepare.request.init_mem_size_bytes
        if response.res == RES_EINVAL and prepare.answered_idle:
            # No start was pending, and the sizes passed our checks: mms's one rule left is
            # "smaller than the CrOS guest's memory" (which only mms knows).
            raise InvalidArgumentError(
                "mem_size_bytes",
                "must be smaller than the CrOS guest's memory (mms refused the size)",
                reachedMms="true",
            )
        if response.res not in (RES_OK, RES_ENOMEM):
            raise MmsRefusedError(
                response.res,
                "mms refused PrepareVm: sizes differ from the pending start, or it failed",
                memSizeBytes=mem_size_bytes,
                initMemSizeBytes=init_mem_size_bytes,
            )
        # The session mms answered in, not the current one: they differ if the link reset
        # before this caller resumed, and then vm_id names no VM of the current session.
        answered_session = prepare.answered_session
        assert answered_session is not None, "the slot stamps every answered PrepareVm"
        return PrepareResult(
            response.vm_id,
            response.res == RES_OK,
            response.shortfall_bytes,
            self.config.balloon_control_path(response.vm_id),
            self.books.public_session_id(answered_session),
            prepare.claim.lease_expire_unix_s,
        )

    async def finish_add_vm(
        self, vm_id: int, timeout_s: float | None, session_id: str = ""
    ) -> VmRecord:
        with self.books.pinned(session_id, "FinishAddVm"):
            self.books.require_vm(vm_id)
            future = self.slot.submit_end(FinishAddVmRequest(vm_id), refuse_if_launching=True)
        response = await _aio.await_mms(future, timeout_s, MessageType.FINISH_ADD_VM)
        if response.res != RES_OK:
            raise MmsRefusedError(response.res, _finish_message(response.res), vmId=vm_id)
        # Finished, but a RemoveVm (or a reset) may have landed right behind it: then say the
        # VM is gone (NOT_FOUND), not INTERNAL.
        return self.books.require_vm(vm_id)

    async def remove_vm(self, vm_id: int, timeout_s: float | None, session_id: str = "") -> None:
        if vm_id == CROS_GUEST_VM_ID:
            raise InvalidArgumentError("vm_id", "VM 0 is the CrOS guest and cannot be removed")
        with self.books.pinned(session_id, "RemoveVm"):
            self.books.require_vm(vm_id)
            future = self.slot.submit_end(RemoveVmRequest(vm_id), refuse_if_launching=True)
        response = await _aio.await_mms(future, timeout_s, MessageType.REMOVE_VM)
        if response.res != RES_OK:
            raise MmsRefusedError(response.res, "mms refused RemoveVm", vmId=vm_id)

    def list_vms(self) -> tuple[str, list[VmRecord]]:
        return self.books.session_id, self.books.vms()

    # --- shared plumbing -----------------------------------------------------------------------

    def remove_in_background(
        self,
        vm_id: int,
        why: str,
        then: Callable[[], None] | None = None,
        session: int | None = None,
    ) -> None:
        """Release a reservation nobody will finish; runs without a caller to wait for it.

        ``session``: the connection's session the VM belongs to (None: the current one). It is
        sent only if that session is still current, checked under the books' gate, so it never
        removes a later session's VM with the same id; if the session ended, mms dropped the VM
        with it and there is nothing to send. The slot frees the start when mms answers (see
        _starts); ``then`` runs in any case.
        """
        with self.books.holding(self.books.session if session is None else session) as current:
            if session is None:
                session = self.books.session
            if not current:
                logger.info("not removing VM %d (%s): mms session %d ended", vm_id, why, session)
                if then is not None:
                    then()
                return
            self._send_removal(vm_id, why, then, session)

    def _remove_for_slot(self, vm_id: int, why: str, session: int) -> None:
        """The slot's removal of its claim's start. The slot calls this under its lock with the
        claim still current, so the session cannot change before the request is queued (the
        slot drops its claim first when it does); the books' gate is not taken here, as a
        caller holding it may be waiting for the slot's lock."""
        if not self.books.is_current(session):
            logger.info("not removing VM %d (%s): its mms session %d ended", vm_id, why, session)
            return
        self._send_removal(vm_id, why, None, session)

    def _send_removal(
        self, vm_id: int, why: str, then: Callable[[], None] | None, session: int
    ) -> None:
        logger.info("removing VM %d: %s (session %d)", vm_id, why, session)

        def removed(done: Future[RemoveVmResponse]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if (
                isinstance(error, MmsConnectionError)
                and error.reached_mms is False
                and not error.stream_closed
            ):
                # Not sent, and the stream is kept (mms hung or out of step): mms still holds
                # the VM, so the start would be held by nobody. Try again once the stream is
                # usable, in this session only; if it closes instead, mms drops the VM with it.
                logger.warning("could not remove VM %d yet (%s): %s", vm_id, why, error)
                with self._reset_lock:
                    self._deferred_removals.append((vm_id, why, then, session))
                return
            if error is not None:
                logger.warning("could not remove VM %d (%s): %s", vm_id, why, error)
            elif done.result().res != RES_OK:
                logger.warning(
                    "mms refused RemoveVm %d (%s): res %d", vm_id, why, done.result().res
                )
            if then is not None:
                then()

        self.slot.submit_end(RemoveVmRequest(vm_id)).add_done_callback(removed)

    def _usable_changed(self, usable: bool) -> None:
        """The stream is usable again (mms answered late): send the removals it held back.

        An entry of an ended session (its callback may have run after _on_disconnected emptied
        the list) is dropped by remove_in_background's session check, never sent.
        """
        if not usable:
            return
        with self._reset_lock:
            deferred, self._deferred_removals = self._deferred_removals, []
        for vm_id, why, then, session in deferred:
            self.remove_in_background(vm_id, why, then, session)

    def _on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        del error
        # mms dropped its pending start with the connection; the slot saw it first. Removals
        # held back for that stream are moot: mms dropped those VMs too.
        with self._reset_lock:
            listeners = list(self._reset_listeners)
            deferred, self._deferred_removals = self._deferred_removals, []
        for _, _, then, _ in deferred:
            if then is not None:
                then()
        for listener in listeners:
            listener(session)

    def add_session_reset_listener(self, listener: Callable[[int], None]) -> None:
        """``listener(session)`` runs on the connection thread when mms drops ``session``."""
        with self._reset_lock:
            self._reset_listeners.append(listener)

    def remove_session_reset_listener(self, listener: Callable[[int], None]) -> None:
        with self._reset_lock:
            self._reset_listeners.remove(listener)


def _rebalance_result(
    requested: tuple[BalloonDelta, ...], response: RebalanceMemoryResponse
) -> RebalanceResult:
    answered = {delta.vm_id: delta.delta_bytes for delta in response.actual_deltas}
    # Unlike concierge, a VM mms left out of the answer moved 0 bytes, not "as asked".
    actual = tuple(BalloonDelta(d.vm_id, answered.get(d.vm_id, 0)) for d in requested)
    fully = all(a.delta_bytes == r.delta_bytes for a, r in zip(actual, requested, strict=True))
    return RebalanceResult(requested, actual, fully)


def _finish_message(res: int) -> str:
    return {
        -22: "mms refused FinishAddVm: the VM is not the pending start, or the start failed",
        -12: "mms could not complete FinishAddVm: the reservation or the new balloon fell short",
        -5: "mms could not complete FinishAddVm: the VM's crosvm did not connect in time",
    }.get(res, f"mms failed FinishAddVm with res {res}")
