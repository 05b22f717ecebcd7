"""The one pending start that mms allows, owned on behalf of one caller at a time.

Launches queue for it in arrival order; a start opened by a bare PrepareVm holds it under a
lease, so a caller that vanished cannot block every later start.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import DeadlineExceededError, LaunchAbortedError, StartInProgressError


class Owner(enum.Enum):
    LAUNCH = "launch"
    UNARY = "unary"  # PrepareVm / FinishAddVm / RemoveVm called one by one


@dataclass(slots=True)
class Claim:
    owner: Owner
    token: object
    vm_id: int | None = None
    lease_timer: threading.Timer | None = None


LeaseExpired = Callable[[int], None]  # called with the VM id whose lease ran out


class StartSlot:
    """Who owns mms's pending start; see the module docstring."""

    def __init__(self, lease_s: float, on_lease_expired: LeaseExpired) -> None:
        self._lease_s = lease_s
        self._on_lease_expired = on_lease_expired
        self._cond = threading.Condition()
        self._claim: Claim | None = None
        self._waiters: collections.deque[object] = collections.deque()
        self._aborted: set[object] = set()

    @property
    def claim(self) -> Claim | None:
        return self._claim

    def launches_waiting(self) -> int:
        with self._cond:
            return len(self._waiters)

    # --- launches ------------------------------------------------------------------------------

    def acquire_for_launch(self, token: object, timeout_s: float | None) -> None:
        """Wait, in arrival order, until this launch owns the pending start."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            self._waiters.append(token)
            try:
                while not (self._claim is None and self._waiters[0] is token):
                    if token in self._aborted:
                        raise LaunchAbortedError("the launch was cancelled while queued")
                    remaining_s = None if deadline is None else deadline - time.monotonic()
                    if remaining_s is not None and remaining_s <= 0:
                        raise DeadlineExceededError(
                            "deadline passed while waiting for earlier launches to finish",
                            launchesAhead=self._waiters.index(token),
                        )
                    self._cond.wait(remaining_s)
                self._claim = Claim(Owner.LAUNCH, token)
            finally:
                self._waiters.remove(token)
                self._aborted.discard(token)
                self._cond.notify_all()

    def abort_waiter(self, token: object) -> None:
        """Wake a queued launch whose caller went away (or stop it before it queues)."""
        with self._cond:
            if self._claim is None or self._claim.token is not token:
                self._aborted.add(token)
                self._cond.notify_all()

    def set_vm_id(self, token: object, vm_id: int) -> None:
        with self._cond:
            if self._claim is not None and self._claim.token is token:
                self._claim.vm_id = vm_id

    def release(self, token: object) -> None:
        with self._cond:
            if self._claim is not None and self._claim.token is token:
                self._drop_claim()

    def release_all(self) -> None:
        """mms forgot its pending start (the session reset): nobody owns it any more."""
        with self._cond:
            if self._claim is not None:
                self._drop_claim()

    # --- unary calls ---------------------------------------------------------------------------

    def claim_for_prepare(self) -> tuple[Claim, bool]:
        """Claim (or join) the start for a bare PrepareVm; returns (claim, newly_opened)."""
        with self._cond:
            if self._claim is not None and self._claim.owner is Owner.LAUNCH:
                raise self._in_progress_error()
            if self._claim is None and self._waiters:
                raise StartInProgressError(
                    "launches are queued for the pending VM start",
                    launchesWaiting=len(self._waiters),
                )
            if self._claim is not None:
                return self._claim, False
            self._claim = Claim(Owner.UNARY, object())
            return self._claim, True

    def opened_by_prepare(self, claim: Claim, vm_id: int) -> None:
        """mms assigned ``vm_id`` to a bare PrepareVm start: (re)start its lease."""
        with self._cond:
            if self._claim is not claim:
                return
            claim.vm_id = vm_id
            if claim.lease_timer is not None:
                claim.lease_timer.cancel()
            timer = threading.Timer(self._lease_s, self._lease_expired, args=(claim,))
            timer.daemon = True
            timer.name = f"start-lease-{vm_id}"
            claim.lease_timer = timer
            timer.start()

    def abandon(self, claim: Claim) -> None:
        """A bare PrepareVm opened nothing after all (mms refused it)."""
        with self._cond:
            if self._claim is claim and claim.vm_id is None:
                self._drop_claim()

    def check_not_launching(self, vm_id: int) -> None:
        """Refuse FinishAddVm / RemoveVm on the VM a launch is starting: it is not yours."""
        with self._cond:
            claim = self._claim
            if claim is not None and claim.owner is Owner.LAUNCH and claim.vm_id == vm_id:
                raise self._in_progress_error()

    def finished(self, vm_id: int) -> None:
        """The pending VM ``vm_id`` started or was removed: the start slot is free again."""
        with self._cond:
            if self._claim is not None and self._claim.vm_id == vm_id:
                self._drop_claim()

    # --- internals -----------------------------------------------------------------------------

    def _in_progress_error(self) -> StartInProgressError:
        claim = self._claim
        return StartInProgressError(
            "a LaunchVm owns the pending VM start; wait for it or use LaunchVm",
            **({"vmId": claim.vm_id} if claim is not None and claim.vm_id is not None else {}),
        )

    def _drop_claim(self) -> None:
        assert self._claim is not None
        if self._claim.lease_timer is not None:
            self._claim.lease_timer.cancel()
        self._claim = None
        self._cond.notify_all()

    def _lease_expired(self, claim: Claim) -> None:
        with self._cond:
            if self._claim is not claim or claim.vm_id is None:
                return
            vm_id = claim.vm_id
        self._on_lease_expired(vm_id)
