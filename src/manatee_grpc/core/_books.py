"""What the server knows about mms: the session, its VMs, and VM ids from earlier sessions.

Updated only from the connection thread's observer events, so the books follow what really
happened on the wire, even when the caller who asked has gone away.

Sessions have two names. The connection numbers them 1, 2, ... (its own bookkeeping, and the
metrics gauge); callers see an opaque session id that is also unique across server restarts,
because VM ids repeat in every session and a restarted server numbers its sessions from 1 again.
"""

from __future__ import annotations

import enum
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from manatee_grpc.core._errors import MmsConnectionError, SessionResetError, VmNotFoundError
from manatee_grpc.mms._messages import (
    CROS_GUEST_VM_ID,
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


class VmState(enum.Enum):
    STARTING = "starting"  # PrepareVm opened it; FinishAddVm has not succeeded
    FAILED = "failed"  # FinishAddVm failed: mms holds it until RemoveVm
    RUNNING = "running"


@dataclass(frozen=True, slots=True)
class VmRecord:
    vm_id: int
    mem_size_bytes: int
    init_mem_size_bytes: int
    state: VmState
    since_unix_s: float
    session: int


SessionListener = Callable[[int, int], None]  # (previous_session, new_session)


class Books:
    """Thread-safe record of mms's VMs in the current session; a ConnectionObserver."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._lock = threading.Lock()
        # Held while a request that names a VM is checked and queued, and by on_disconnected:
        # so a request checked against a session is queued in that session or not at all.
        self._gate = threading.RLock()
        self._clock = clock
        # Random per server instance: what makes session ids unique across restarts.
        self._instance = secrets.token_hex(8)
        self._session = 0
        self._connected = False
        self._vms: dict[int, VmRecord] = {}
        # running_vm_ids() as last computed; None once _vms changed (every stats read without
        # ids asks for it, and the VMs change far less often). Set and cleared under _lock.
        self._running_ids: tuple[int, ...] | None = None
        # VM ids that an mms session reset dropped, with the session they belonged to.
        self._dropped_by_reset: dict[int, int] = {}
        self._session_listeners: list[SessionListener] = []
        self._disconnect_listeners: list[Callable[[int, MmsConnectionError], None]] = []

    # --- queries -----------------------------------------------------------------------------

    @property
    def session(self) -> int:
        """The connection's number of the current (or last) mms session; 0 before the first."""
        return self._session

    @property
    def session_id(self) -> str:
        """The current session as callers name it; "" before the first connection."""
        return self.public_session_id(self._session)

    def public_session_id(self, session: int) -> str:
        """The opaque id of the connection's session ``session`` (0, no session: "")."""
        return f"{self._instance}-{session}" if session else ""

    @contextmanager
    def pinned(self, session_id: str, what: str) -> Iterator[None]:
        """Hold the current session while the body checks the books and queues its request.

        ``session_id`` is the session the caller learnt its VM ids in ("" means the current
        one); another session is refused with SessionResetError. While this is held, mms's
        connection cannot be declared lost, so what the body queues goes to this session or
        fails as not sent: never to a later session whose VMs reuse the ids.
        """
        with self._gate:
            current = self.session_id
            if session_id and session_id != current:
                raise SessionResetError(
                    f"{what} names session {session_id}, not the current mms session "
                    f"{current or '(none)'}; mms dropped that session's VMs and ids repeat",
                    requestSession=session_id,
                    session=current,
                )
            yield

    @property
    def connected(self) -> bool:
        return self._connected

    def is_current(self, session: int) -> bool:
        """True while ``session`` (the connection's number) is the connected, current session."""
        return self._connected and session == self._session

    @contextmanager
    def holding(self, session: int) -> Iterator[bool]:
        """Hold the gate; yields whether ``session`` is the connected, current session.

        While True is held, mms's connection cannot be declared lost, so what the body queues
        goes to ``session`` or fails as not sent: never to a later session that reuses VM ids.
        """
        with self._gate:
            yield self.is_current(session)

    def vms(self) -> list[VmRecord]:
        with self._lock:
            return sorted(self._vms.values(), key=lambda vm: vm.vm_id)

    def vm(self, vm_id: int) -> VmRecord | None:
        with self._lock:
            return self._vms.get(vm_id)

    def running_vm_ids(self) -> tuple[int, ...]:
        """The CrOS guest and every running sibling: what "all VMs" means for stats."""
        with self._lock:
            ids = self._running_ids
            if ids is None:
                ids = self._running_ids = tuple(
                    sorted(vm.vm_id for vm in self._vms.values() if vm.state is VmState.RUNNING)
                )
            return ids

    def require_vm(self, vm_id: int, field: str = "vm_id") -> VmRecord:
        """The VM's record, or VmNotFoundError / SessionResetError saying why it is not here."""
        with self._lock:
            record = self._vms.get(vm_id)
            if record is not None:
                return record
            dropped_in = self._dropped_by_reset.get(vm_id)
            session = self._session
        if dropped_in is not None:
            raise SessionResetError(
                f"VM {vm_id} belonged to mms session {self.public_session_id(dropped_in)}; the "
                f"connection to mms was reset since (now session "
                f"{self.public_session_id(session)}) and mms dropped every sibling VM",
                vmId=vm_id,
                vmSession=self.public_session_id(dropped_in),
                session=self.public_session_id(session),
            )
        raise VmNotFoundError(
            f"no VM {vm_id} in mms session {self.public_session_id(session)}",
            vmId=vm_id,
            session=self.public_session_id(session),
            field=field,
        )

    # --- listeners ---------------------------------------------------------------------------

    def add_session_listener(self, listener: SessionListener) -> None:
        """Called (on the connection thread) when a new mms session starts."""
        self._session_listeners.append(listener)

    def add_disconnect_listener(self, listener: Callable[[int, MmsConnectionError], None]) -> None:
        self._disconnect_listeners.append(listener)

    # --- ConnectionObserver --------------------------------------------------------------------

    def on_connected(self, session: int) -> None:
        with self._lock:
            previous = self._session
            self._session = session
            self._connected = True
            # mms starts every session with only the CrOS guest; its memory size is mms's own.
            self._vms = {
                CROS_GUEST_VM_ID: VmRecord(
                    CROS_GUEST_VM_ID, 0, 0, VmState.RUNNING, self._clock(), session
                )
            }
            self._running_ids = None
        for listener in self._session_listeners:
            listener(previous, session)

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        with self._gate, self._lock:
            self._connected = False
            for vm_id in self._vms:
                if vm_id != CROS_GUEST_VM_ID:
                    self._dropped_by_reset[vm_id] = session
            self._vms = {}
            self._running_ids = None
        for listener in self._disconnect_listeners:
            listener(session, error)

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None:
        del round_trip_s
        if isinstance(request, GetBalloonStatsRequest | RebalanceMemoryRequest):
            return  # nothing for the books (most answers): no lock taken
        with self._lock:
            if session != self._session:
                return
            if isinstance(request, PrepareVmRequest) and isinstance(response, PrepareVmResponse):
                self._record_prepare(session, request, response)
            elif isinstance(request, FinishAddVmRequest) and isinstance(
                response, FinishAddVmResponse
            ):
                record = self._vms.get(request.vm_id)
                if record is not None and record.state is not VmState.RUNNING:
                    state = VmState.RUNNING if response.res == RES_OK else VmState.FAILED
                    self._vms[request.vm_id] = replace(
                        record, state=state, since_unix_s=self._clock()
                    )
                    self._running_ids = None
            elif (
                isinstance(request, RemoveVmRequest)
                and isinstance(response, RemoveVmResponse)
                and response.res in (RES_OK, RES_EINVAL)
                and request.vm_id != CROS_GUEST_VM_ID
            ):
                # -22: mms holds no such VM (a pending, failed or running one would go with
                # 0), e.g. an earlier RemoveVm removed it but its answer could not be read.
                self._vms.pop(request.vm_id, None)
                self._running_ids = None

    def _record_prepare(
        self, session: int, request: PrepareVmRequest, response: PrepareVmResponse
    ) -> None:
        # mms answers an id for a reservation it opened or topped up (res 0 or -12); -22 may
        # carry no meaningful id, and then nothing changed in mms.
        if response.vm_id == CROS_GUEST_VM_ID or response.vm_id in self._vms:
            return
        if response.res in (RES_OK, RES_ENOMEM):
            self._running_ids = None
            self._vms[response.vm_id] = VmRecord(
                response.vm_id,
                request.mem_size_bytes,
                request.init_mem_size_bytes,
                VmState.STARTING,
                self._clock(),
                session,
            )
