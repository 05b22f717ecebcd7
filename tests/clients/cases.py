"""The table of client calls that ``test_table.py`` runs once through each client.

A case names a method, what the server holds before the call (``given``), the call's arguments
(a function of what was given, for VM ids and sessions), and either what the result must show
(``Ok``: a view of the result and the value it must have) or the error it must raise
(``Fails``: code, ErrorInfo reason, the fields BadRequest names, RetryInfo, ...). Every method of
the clients has cases; so has every kind of error they decode, launch_vm's ends and deadlines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from api.test_launch import launch

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Simulator

MIB = 1024 * 1024
HUGE_BYTES = 7 * 1024 * MIB  # more than the simulated CrOS guest can ever give
RPC_TIMEOUT_S = 10.0
# Long past any deadline a case sets, short of the server's 30 s watchdog for the message.
SILENT_MMS_S = 25.0


GENERATED = "<a UUID the client generated>"


@dataclass
class Given:
    """The server before the call, what the setup made on it, and what callbacks heard."""

    server: ManateeServer
    stub: pb_grpc.MemoryServiceStub
    session: str = ""
    vm_id: int = 0
    heard: list[tuple[Any, ...]] = field(default_factory=list)
    balloon_before: int = 0  # a_running_vm_and_its_balloon: VM vm_id's balloon before the call

    @property
    def simulator(self) -> Simulator:
        assert self.server.simulator is not None, "the cases need the embedded simulator"
        return self.server.simulator

    def vm_ids(self) -> list[int]:
        listed = self.stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S)
        return [vm.vm_id for vm in listed.vms]

    # launch_vm's callbacks: plain functions, which both clients take.
    def start_vm(self, vm_id: int, balloon_control_path: str) -> bool:
        self.heard.append(("start_vm", vm_id, balloon_control_path.endswith(".sock")))
        return True

    def cannot_start_vm(self, vm_id: int, balloon_control_path: str) -> bool:
        self.heard.append(("start_vm", vm_id, balloon_control_path.endswith(".sock")))
        return False

    def stop_vm(self, vm_id: int) -> None:
        self.heard.append(("stop_vm", vm_id))

    def on_progress(self, attempt: int, shortfall_bytes: int) -> None:
        self.heard.append(("progress", attempt, shortfall_bytes > 0))

    def on_queued(self, position: int) -> None:
        self.heard.append(("queued", position))

    def launch_callbacks(self) -> dict[str, Any]:
        return {
            "start_vm": self.start_vm,
            "stop_vm": self.stop_vm,
            "on_progress": self.on_progress,
            "on_queued": self.on_queued,
        }

    def balloon_bytes(self, vm_id: int) -> int:
        stats = self.stub.GetBalloonStats(
            pb.GetBalloonStatsRequest(vm_ids=[vm_id]), timeout=RPC_TIMEOUT_S
        )
        (vm,) = stats.stats
        return vm.balloon_actual_bytes


Setup = Callable[[Given], AbstractContextManager[None]]


@contextmanager
def nothing(given: Given) -> Iterator[None]:
    yield


@contextmanager
def a_prepared_vm(given: Given) -> Iterator[None]:
    """VM 1 reserved by a bare PrepareVm, not yet finished (so not running)."""
    prepared = given.stub.PrepareVm(
        pb.PrepareVmRequest(mem_size_bytes=512 * MIB, init_mem_size_bytes=256 * MIB),
        timeout=RPC_TIMEOUT_S,
    )
    given.vm_id = prepared.vm_id
    yield


@contextmanager
def a_running_vm(given: Given) -> Iterator[None]:
    with a_prepared_vm(given):
        given.stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=given.vm_id), timeout=RPC_TIMEOUT_S)
        yield


@contextmanager
def a_running_vm_and_its_balloon(given: Given) -> Iterator[None]:
    with a_running_vm(given):
        given.balloon_before = given.balloon_bytes(given.vm_id)
        yield


@contextmanager
def a_rebalance_with_request_id(given: Given) -> Iterator[None]:
    """A running VM, and a rebalance of it that used the request id "retry-me"."""
    with a_running_vm(given):
        given.stub.RebalanceMemory(
            pb.RebalanceMemoryRequest(
                deltas=[pb.BalloonDelta(vm_id=given.vm_id, delta_bytes=-4 * MIB)],
                request_id="retry-me",
            ),
            timeout=RPC_TIMEOUT_S,
        )
        yield


@contextmanager
def a_launch_holding_the_start(given: Given) -> Iterator[None]:
    """Another caller's LaunchVm reserved VM 1 and has not said it started: it owns the
    device's one pending start, and launches queue behind it."""
    with launch(given.stub) as holder:
        holder.start(512 * MIB)
        given.vm_id = holder.expect_reserved().vm_id
        yield


@contextmanager
def a_failed_remove(given: Given) -> Iterator[None]:
    """One REMOVE_VM event (of VM 42, which is not there) among the server's own."""
    with contextlib.suppress(grpc.RpcError):
        given.stub.RemoveVm(pb.RemoveVmRequest(vm_id=42), timeout=RPC_TIMEOUT_S)
    yield


@contextmanager
def crosvm_never_connects(given: Given) -> Iterator[None]:
    # FinishAddVm answers -5 (crosvm never connected), after a short wait instead of mms's 10 s.
    given.simulator.set_crosvm_connect_timeout(0.05)
    given.simulator.fail_crosvm_connect()
    yield


@contextmanager
def mms_silent_on_stats(given: Given) -> Iterator[None]:
    given.simulator.set_message_delay(MessageType.GET_BALLOON_STATS, SILENT_MMS_S)
    try:
        yield
    finally:
        given.simulator.set_message_delay(MessageType.GET_BALLOON_STATS, 0.0)


@dataclass(frozen=True)
class Call:
    """The arguments of one call."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


def call(*args: Any, **kwargs: Any) -> Call:
    return Call(args, kwargs)


@dataclass(frozen=True)
class Ok:
    """The call returns; ``view(result, given)`` must equal ``expected``."""

    view: Callable[[Any, Given], Any]
    expected: Any


@dataclass(frozen=True)
class Fails:
    """The call raises ``ManateeRpcError`` with this code; ``reason`` None: any (a deadline
    may be the client's own, without details, or the server's)."""

    code: grpc.StatusCode
    reason: str | None = ""
    fields: tuple[str, ...] = ()
    retry_delay_s: float | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    request_id: str | None = None  # GENERATED: a new UUID the client made up
    # What the callbacks heard, and the VMs left, once the call failed (None: not checked).
    heard: list[tuple[Any, ...]] | None = None
    vm_ids_after: list[int] | None = None


@dataclass(frozen=True)
class Case:
    method: str
    name: str
    args: Callable[[Given], Call]
    expect: Ok | Fails
    given: Setup = nothing
    client_kwargs: Mapping[str, Any] = field(default_factory=dict)
    target: str | None = None  # None: the test's server
    take: int = 1  # events read from a stream

    @property
    def id(self) -> str:
        return f"{self.method}:{self.name}"


def _vm_rows(listed: pb.ListVmsResponse) -> list[tuple[int, bool, int]]:
    return [(vm.vm_id, vm.cros_guest, vm.state) for vm in listed.vms]


def _launched(vm: pb.VmInfo, given: Given) -> tuple[Any, ...]:
    in_session = vm.session == given.session
    return (vm.vm_id, vm.state, vm.mem_size_bytes, vm.init_mem_size_bytes, in_session, given.heard)


@contextmanager
def _both(
    first: AbstractContextManager[None], second: AbstractContextManager[None]
) -> Iterator[None]:
    with first, second:
        yield


CASES: list[Case] = [
    # --- health, list_vms ------------------------------------------------------------------------
    Case("health", "the service", lambda g: call(), Ok(lambda r, g: r, "SERVING")),
    Case("health", "the whole server", lambda g: call(""), Ok(lambda r, g: r, "SERVING")),
    Case(
        "health",
        "an unknown service is NOT_FOUND without details",
        lambda g: call("no.such.Service"),
        Fails(grpc.StatusCode.NOT_FOUND),
    ),
    Case(
        "list_vms",
        "a fresh device",
        lambda g: call(),
        Ok(
            lambda r, g: (_vm_rows(r), r.session == g.session),
            ([(0, True, pb.VM_STATE_RUNNING)], True),
        ),
    ),
    Case(
        "list_vms",
        "an unreachable server is UNAVAILABLE without details",
        lambda g: call(),
        Fails(grpc.StatusCode.UNAVAILABLE),
        target="unix:///nonexistent/manatee.sock",
        client_kwargs={"timeout_s": 5.0},
    ),
    # --- get_balloon_stats -----------------------------------------------------------------------
    Case(
        "get_balloon_stats",
        "known and unknown ids",
        lambda g: call([0, 7]),
        Ok(lambda r, g: ([s.vm_id for s in r.stats], list(r.missing_vm_ids)), ([0], [7])),
    ),
    Case(
        "get_balloon_stats",
        "a running VM in its session",
        lambda g: call([g.vm_id], session=g.session),
        Ok(lambda r, g: [(s.vm_id, s.balloon_actual_bytes) for s in r.stats], [(1, 256 * MIB)]),
        given=a_running_vm,
    ),
    Case(
        "get_balloon_stats",
        "another session is NOT_FOUND SESSION_RESET",
        lambda g: call([0], session="stale"),
        Fails(grpc.StatusCode.NOT_FOUND, "SESSION_RESET", metadata={"requestSession": "stale"}),
    ),
    Case(
        "get_balloon_stats",
        "a silent mms is DEADLINE_EXCEEDED at the client's timeout_s",
        lambda g: call([0]),
        Fails(grpc.StatusCode.DEADLINE_EXCEEDED, reason=None),
        given=mms_silent_on_stats,
        client_kwargs={"timeout_s": 0.5},
    ),
    # --- prepare_vm, finish_add_vm, remove_vm ----------------------------------------------------
    Case(
        "prepare_vm",
        "reserves VM 1 in the current session",
        lambda g: call(512 * MIB, 256 * MIB),
        Ok(
            lambda r, g: (r.vm_id, r.reserved, r.shortfall_bytes, r.session == g.session),
            (1, True, 0, True),
        ),
    ),
    Case(
        "prepare_vm",
        "a zero size is INVALID_ARGUMENT naming the field",
        lambda g: call(0),
        Fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=("mem_size_bytes",)),
    ),
    Case(
        "prepare_vm",
        "while a launch holds the start is ABORTED with RetryInfo",
        lambda g: call(512 * MIB, request_id="prep-1"),
        Fails(
            grpc.StatusCode.ABORTED,
            "START_IN_PROGRESS",
            retry_delay_s=1.0,
            metadata={"vmId": "1"},
            request_id="prep-1",
        ),
        given=a_launch_holding_the_start,
    ),
    Case(
        "finish_add_vm",
        "a prepared VM runs",
        lambda g: call(g.vm_id, session=g.session),
        Ok(
            lambda r, g: (r.vm.vm_id, r.vm.state, r.vm.init_mem_size_bytes),
            (1, pb.VM_STATE_RUNNING, 256 * MIB),
        ),
        given=a_prepared_vm,
    ),
    Case(
        "finish_add_vm",
        "crosvm never connected is FAILED_PRECONDITION MMS_EIO",
        lambda g: call(g.vm_id),
        Fails(grpc.StatusCode.FAILED_PRECONDITION, "MMS_EIO"),
        given=lambda g: _both(crosvm_never_connects(g), a_prepared_vm(g)),
    ),
    Case(
        "finish_add_vm",
        "an unknown VM is NOT_FOUND",
        lambda g: call(42),
        Fails(grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND", metadata={"vmId": "42"}),
    ),
    Case(
        "remove_vm",
        "a running VM of its session",
        lambda g: call(g.vm_id, session=g.session),
        Ok(lambda r, g: g.vm_ids(), [0]),
        given=a_running_vm,
    ),
    Case(
        "remove_vm",
        "an unknown VM is NOT_FOUND with reason and metadata",
        lambda g: call(42),
        Fails(
            grpc.StatusCode.NOT_FOUND,
            "VM_NOT_FOUND",
            metadata={"vmId": "42", "field": "vm_id"},
        ),
    ),
    # --- rebalance_memory ------------------------------------------------------------------------
    Case(
        "rebalance_memory",
        "a sibling deflate and the CrOS guest's opposite",
        lambda g: call({g.vm_id: -64 * MIB}, session=g.session),
        Ok(
            lambda r, g: ([(d.vm_id, d.delta_bytes) for d in r.requested_deltas], r.fully_applied),
            ([(1, -64 * MIB), (0, 64 * MIB)], True),
        ),
        given=a_running_vm,
    ),
    Case(
        "rebalance_memory",
        "no deltas is INVALID_ARGUMENT naming deltas, with the request id to retry",
        lambda g: call({}, request_id="empty-1"),
        Fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            fields=("deltas",),
            request_id="empty-1",
        ),
    ),
    Case(
        "rebalance_memory",
        "a request id reused for another request is INVALID_ARGUMENT naming request_id",
        lambda g: call({g.vm_id: 4 * MIB}, request_id="retry-me"),
        Fails(
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_ARGUMENT",
            fields=("request_id",),
            request_id="retry-me",
        ),
        given=a_rebalance_with_request_id,
    ),
    Case(
        "rebalance_memory",
        "a VM that is not running is FAILED_PRECONDITION VM_NOT_RUNNING",
        lambda g: call({g.vm_id: 4 * MIB}),
        Fails(grpc.StatusCode.FAILED_PRECONDITION, "VM_NOT_RUNNING", request_id=GENERATED),
        given=a_prepared_vm,
    ),
    Case(
        "rebalance_memory",
        "validate_only previews what would move, and nothing moves",
        lambda g: call({g.vm_id: -64 * MIB}, session=g.session, validate_only=True),
        Ok(
            lambda r, g: (
                [(d.vm_id, d.delta_bytes) for d in r.actual_deltas],
                r.fully_applied,
                g.balloon_bytes(g.vm_id) == g.balloon_before,
            ),
            ([(1, -64 * MIB), (0, 64 * MIB)], True, True),
        ),
        given=a_running_vm_and_its_balloon,
    ),
    # --- watch_balloon_stats ---------------------------------------------------------------------
    Case(
        "watch_balloon_stats",
        "snapshots until closed",
        lambda g: call([0], interval_s=0.1),
        Ok(
            lambda r, g: [(e.WhichOneof("event"), [s.vm_id for s in e.snapshot.stats]) for e in r],
            [("snapshot", [0]), ("snapshot", [0])],
        ),
        take=2,
    ),
    Case(
        "watch_balloon_stats",
        "a too short interval is INVALID_ARGUMENT naming interval",
        lambda g: call(interval_s=0.01),
        Fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=("interval",)),
    ),
    # --- watch_events ----------------------------------------------------------------------------
    Case(
        "watch_events",
        "the replay of the kinds asked for, then caught_up",
        lambda g: call(replay_last=1000, kinds=[pb.EVENT_KIND_REMOVE_VM]),
        Ok(
            lambda r, g: [(u.WhichOneof("update"), u.event.kind, list(u.event.vm_ids)) for u in r],
            [("event", pb.EVENT_KIND_REMOVE_VM, [42]), ("caught_up", 0, [])],
        ),
        given=a_failed_remove,
        take=2,
    ),
    Case(
        "watch_events",
        "an unknown kind is INVALID_ARGUMENT naming kinds[1]",
        lambda g: call(kinds=[pb.EVENT_KIND_REMOVE_VM, 999]),
        Fails(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", fields=("kinds[1]",)),
    ),
    # --- launch_vm -------------------------------------------------------------------------------
    Case(
        "launch_vm",
        "to launched",
        lambda g: call(
            512 * MIB, init_mem_size_bytes=256 * MIB, timeout_s=30.0, **g.launch_callbacks()
        ),
        Ok(
            _launched,
            # No progress: it is only for attempts that fell short.
            (1, pb.VM_STATE_RUNNING, 512 * MIB, 256 * MIB, True, [("start_vm", 1, True)]),
        ),
    ),
    Case(
        "launch_vm",
        "start_vm returning False is FAILED_PRECONDITION VM_START_FAILED and releases",
        lambda g: call(512 * MIB, start_vm=g.cannot_start_vm, stop_vm=g.stop_vm),
        Fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            "VM_START_FAILED",
            heard=[("start_vm", 1, True)],
            vm_ids_after=[0],
        ),
    ),
    Case(
        "launch_vm",
        "too large: progress for each attempt, then RESOURCE_EXHAUSTED MMS_ENOMEM",
        lambda g: call(HUGE_BYTES, init_mem_size_bytes=HUGE_BYTES, **g.launch_callbacks()),
        Fails(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "MMS_ENOMEM",
            heard=[("progress", attempt, True) for attempt in range(1, 6)],
            vm_ids_after=[0],
        ),
    ),
    Case(
        "launch_vm",
        "crosvm never connected: stop_vm, then FAILED_PRECONDITION MMS_EIO",
        lambda g: call(512 * MIB, **g.launch_callbacks()),
        Fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            "MMS_EIO",
            heard=[("start_vm", 1, True), ("stop_vm", 1)],
            vm_ids_after=[0],
        ),
        given=crosvm_never_connects,
    ),
    Case(
        "launch_vm",
        "queued behind a held start: on_queued hears its place, then DEADLINE_EXCEEDED",
        lambda g: call(512 * MIB, timeout_s=1.0, **g.launch_callbacks()),
        Fails(grpc.StatusCode.DEADLINE_EXCEEDED, reason=None, heard=[("queued", 1)]),
        given=a_launch_holding_the_start,
    ),
]
