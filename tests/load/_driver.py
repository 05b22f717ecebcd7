"""A bounded, mixed load on a manatee-grpc server: the driver shared by the 5 s test and the soak.

``clients`` threads, each with its own channel and TCP connection, loop over a weighted mix of
every RPC until the end time and tally each call by (RPC, code, reason). ``EXPECTED`` is the
short list of failures that contention between the clients can cause; anything else is a bug.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from manatee_grpc import Client, ManateeRpcError
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB, extra_bytes
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Scenario, Simulator, StartState

T = TypeVar("T")

# The device: a 2.5 GiB CrOS guest with 1 GiB in use has room for about ten sibling VMs, fewer
# than the clients want, so starts run out of memory now and then, as on a busy device.
LOAD_SCENARIO = Scenario(
    cros_mem_size_bytes=2560 * MIB,
    cros_used_bytes=1024 * MIB,
    # An injected crosvm connect failure answers at once instead of after mms's 10 s.
    crosvm_connect_timeout_s=0.0,
)
LAUNCH_MEM_BYTES = 256 * MIB
LAUNCH_INIT_BYTES = 128 * MIB
UNARY_MEM_BYTES = 192 * MIB
UNARY_INIT_BYTES = 96 * MIB
REBALANCE_STEP_BYTES = 4 * MIB
WATCH_INTERVAL_S = 0.1
WATCH_SNAPSHOTS = 2

OK = ("OK", "")
CLIENT_CANCELLED = ("CLIENT_CANCELLED", "")  # our start_vm raised: the client abandons the launch

# What each RPC may answer under this load, and why; the list is kept as short as the load allows.
EXPECTED: dict[str, frozenset[tuple[str, str]]] = {
    # Reads never fail: unknown ids come back in missing_vm_ids, not as an error.
    "GetBalloonStats": frozenset({OK}),
    "WatchBalloonStats": frozenset({OK}),
    "ListVms": frozenset({OK}),
    "RebalanceMemory": frozenset(
        {
            OK,
            # Another client removed the VM after this one picked it (from ListVms or its own
            # list): the books no longer have it.
            ("NOT_FOUND", "VM_NOT_FOUND"),
        }
    ),
    "LaunchVm": frozenset(
        {
            OK,
            # The CrOS guest had nothing left to give after the five reservation attempts.
            ("RESOURCE_EXHAUSTED", "MMS_ENOMEM"),
            # The client's start_vm said False on purpose (a crosvm that failed to start).
            ("FAILED_PRECONDITION", "VM_START_FAILED"),
            # An injected crosvm connect failure: the server asked the client to stop its VM.
            ("FAILED_PRECONDITION", "MMS_EIO"),
            # The client's start_vm raised on purpose: it cancelled the call itself.
            CLIENT_CANCELLED,
        }
    ),
    "PrepareVm": frozenset(
        {
            OK,
            # A launch owns mms's single pending start, or launches are queued for it.
            ("ABORTED", "START_IN_PROGRESS"),
        }
    ),
    "FinishAddVm": frozenset(
        {
            OK,
            # An injected crosvm connect failure; the client then removes the VM.
            ("FAILED_PRECONDITION", "MMS_EIO"),
        }
    ),
    "RemoveVm": frozenset(
        {
            OK,
            # Another client removed it first (seen in the books).
            ("NOT_FOUND", "VM_NOT_FOUND"),
            # Two removals of one VM were on the wire at once; mms answered the other first.
            ("FAILED_PRECONDITION", "MMS_EINVAL"),
        }
    ),
}

# Relative frequency of each client step.
OP_WEIGHTS: dict[str, int] = {
    "stats_all": 24,
    "stats_own": 10,
    "list": 8,
    "rebalance_own": 14,
    "rebalance_other": 6,
    "launch": 2,
    "unary_start": 6,
    "remove_own": 3,
    "remove_other": 1,
    "watch": 3,
}


@dataclass(frozen=True, slots=True)
class LoadConfig:
    clients: int = 64
    duration_s: float = 60.0
    # Every call has a deadline far above its normal latency: DEADLINE_EXCEEDED means a hang.
    call_timeout_s: float = 20.0
    launch_timeout_s: float = 60.0
    # A client keeps at most this many VMs; it starts another once it removed one.
    max_own_vms: int = 1
    # Launches in flight at once (the other clients do something else meanwhile). They still
    # queue for mms's single pending start, but the queue stays short: bare PrepareVm calls get
    # their turn, and the server's per-launch reader threads do not swing the thread count the
    # soak watches for leaks.
    max_concurrent_launches: int = 2
    # One crosvm connect failure is armed in the simulator this often (None: never).
    fault_interval_s: float | None = 1.0
    seed: int = 1


@dataclass(slots=True)
class LoadReport:
    outcomes: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    unexpected_examples: list[str] = field(default_factory=list)
    stop_vm_callbacks: int = 0
    # Reservation attempts (LaunchVm progress, bare PrepareVm) that found too little memory.
    short_reservations: int = 0
    faults_armed: int = 0
    elapsed_s: float = 0.0

    def calls_by_rpc(self) -> dict[str, int]:
        calls: Counter[str] = Counter()
        for (rpc, _, _), count in self.outcomes.items():
            calls[rpc] += count
        return dict(sorted(calls.items()))

    def unexpected(self) -> dict[tuple[str, str, str], int]:
        return {
            key: count
            for key, count in self.outcomes.items()
            if (key[1], key[2]) not in EXPECTED.get(key[0], frozenset())
        }

    def lines(self) -> list[str]:
        total = sum(self.outcomes.values())
        lines = [
            f"{total} calls in {self.elapsed_s:.1f} s ({total / max(self.elapsed_s, 1e-9):.0f}/s); "
            f"{self.faults_armed} crosvm connect failures armed, "
            f"{self.stop_vm_callbacks} stop_vm callbacks, "
            f"{self.short_reservations} reservation attempts short of memory"
        ]
        lines.append(
            "calls per RPC: " + ", ".join(f"{rpc} {n}" for rpc, n in self.calls_by_rpc().items())
        )
        for (rpc, code, reason), count in sorted(self.outcomes.items()):
            lines.append(f"  {rpc:<18} {code:<20} {reason:<18} {count:>8}")
        return lines


class _AbandonError(Exception):
    """Raised by a start_vm callback on purpose: the client walks away from its launch."""


@dataclass(slots=True)
class _Shared:
    """What the clients coordinate through (see the steps that use each)."""

    bare_start_lock: threading.Lock
    launch_slots: threading.Semaphore
    launch_numbers: Iterator[int]


class _LoadClient:
    """One client: its own connection, its own VMs, and a seeded random walk over the RPCs."""

    def __init__(
        self,
        index: int,
        target: str,
        config: LoadConfig,
        shared: _Shared,
    ) -> None:
        self._index = index
        self._config = config
        self._shared = shared
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        self.examples: list[str] = []
        self.stop_vm_callbacks = 0
        self.short_reservations = 0
        # A local subchannel pool gives each client its own TCP connection, as 64 processes
        # would have; the default global pool would share one.
        self._channel = grpc.insecure_channel(
            target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self._client = Client(target, timeout_s=config.call_timeout_s, channel=self._channel)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)
        self._rng = random.Random(config.seed * 1_000_003 + index)
        self._own_vm_ids: list[int] = []
        ops = list(OP_WEIGHTS)
        self._ops = ops
        self._weights = [OP_WEIGHTS[op] for op in ops]

    def close(self) -> None:
        self._channel.close()

    def run(self, end_monotonic: float) -> None:
        while time.monotonic() < end_monotonic:
            op = self._rng.choices(self._ops, self._weights)[0]
            try:
                getattr(self, f"_op_{op}")()
            except Exception as error:  # a client bug or a broken stream: record, keep going
                self._record("client", "EXCEPTION", type(error).__name__, repr(error))

    # --- bookkeeping -----------------------------------------------------------------------------

    def _record(self, rpc: str, code: str, reason: str, detail: str = "") -> None:
        self.outcomes[(rpc, code, reason)] += 1
        if (code, reason) not in EXPECTED.get(rpc, frozenset()) and len(self.examples) < 5:
            self.examples.append(f"client {self._index}: {rpc} {code} {reason}: {detail}")

    def _call(self, rpc: str, call: Callable[[], T]) -> T | None:
        try:
            result = call()
        except ManateeRpcError as error:
            self._record(rpc, error.code.name, error.reason, error.message)
            return None
        self._record(rpc, *OK)
        return result

    def _running_siblings(self, exclude_own: bool) -> list[int]:
        listed = self._call("ListVms", self._client.list_vms)
        if listed is None:
            return []
        return [
            vm.vm_id
            for vm in listed.vms
            if not vm.cros_guest
            and vm.state == pb.VM_STATE_RUNNING
            and not (exclude_own and vm.vm_id in self._own_vm_ids)
        ]

    # --- steps -----------------------------------------------------------------------------------

    def _op_stats_all(self) -> None:
        self._call("GetBalloonStats", self._client.get_balloon_stats)

    def _op_stats_own(self) -> None:
        vm_ids = [0, *self._own_vm_ids]
        self._call("GetBalloonStats", lambda: self._client.get_balloon_stats(vm_ids))

    def _op_list(self) -> None:
        self._call("ListVms", self._client.list_vms)

    def _rebalance(self, vm_id: int) -> bool:
        steps = self._rng.randint(1, 8) * self._rng.choice((-1, 1))
        deltas = {vm_id: steps * REBALANCE_STEP_BYTES}
        return (
            self._call("RebalanceMemory", lambda: self._client.rebalance_memory(deltas)) is not None
        )

    def _op_rebalance_own(self) -> None:
        if not self._own_vm_ids:
            return self._op_stats_own()
        vm_id = self._rng.choice(self._own_vm_ids)
        if not self._rebalance(vm_id):
            self._forget(vm_id)  # another client removed it
        return None

    def _op_rebalance_other(self) -> None:
        others = self._running_siblings(exclude_own=True)
        if others:
            self._rebalance(self._rng.choice(others))

    def _op_launch(self) -> None:
        if len(self._own_vm_ids) >= self._config.max_own_vms:
            return self._op_rebalance_own()
        if not self._shared.launch_slots.acquire(blocking=False):
            return self._op_stats_own()
        try:
            self._launch()
        finally:
            self._shared.launch_slots.release()
        return None

    def _launch(self) -> None:
        # Of every 20 launches, one walks away after `reserved` and one reports that crosvm
        # failed to start: counted across clients, so even the 5 s run does both.
        number = next(self._shared.launch_numbers)

        def start_vm(vm_id: int, balloon_control_path: str) -> bool:
            del vm_id, balloon_control_path
            if number % 20 == 0:
                raise _AbandonError("the launcher gives up on purpose")
            return number % 20 != 10

        def stop_vm(vm_id: int) -> None:
            del vm_id
            self.stop_vm_callbacks += 1

        def on_progress(attempt: int, shortfall_bytes: int) -> None:
            del attempt
            if shortfall_bytes > 0:
                self.short_reservations += 1

        try:
            launched = self._client.launch_vm(
                LAUNCH_MEM_BYTES,
                init_mem_size_bytes=LAUNCH_INIT_BYTES,
                start_vm=start_vm,
                stop_vm=stop_vm,
                on_progress=on_progress,
                timeout_s=self._config.launch_timeout_s,
            )
        except ManateeRpcError as error:
            self._record("LaunchVm", error.code.name, error.reason, error.message)
            return None
        except _AbandonError:
            self._record("LaunchVm", *CLIENT_CANCELLED)
            return None
        self._record("LaunchVm", *OK)
        self._own_vm_ids.append(launched.vm_id)
        return None

    def _op_unary_start(self) -> None:
        if len(self._own_vm_ids) >= self._config.max_own_vms:
            return self._op_rebalance_own()
        # Bare starts of different clients do not overlap: a PrepareVm that joins another
        # caller's bare start but reaches mms after that start finished opens a start the
        # server does not track (no claim, no lease), and the next LaunchVm then fails with
        # MMS_EINVAL. That is a known server bug, reported; launches still overlap these.
        if not self._shared.bare_start_lock.acquire(blocking=False):
            return self._op_stats_own()
        try:
            self._unary_start()
        finally:
            self._shared.bare_start_lock.release()
        return None

    def _unary_start(self) -> None:
        prepared = self._call(
            "PrepareVm", lambda: self._client.prepare_vm(UNARY_MEM_BYTES, UNARY_INIT_BYTES)
        )
        if prepared is None:
            return None
        vm_id = prepared.vm_id
        if not prepared.reserved:
            self.short_reservations += 1
        else:
            finished = self._call("FinishAddVm", lambda: self._client.finish_add_vm(vm_id))
            if finished is not None:
                self._own_vm_ids.append(vm_id)
                return None
        # Short of memory, or crosvm did not connect: give the reservation back.
        self._call("RemoveVm", lambda: self._client.remove_vm(vm_id))
        return None

    def _op_remove_own(self) -> None:
        if not self._own_vm_ids:
            return self._op_list()
        vm_id = self._own_vm_ids.pop(self._rng.randrange(len(self._own_vm_ids)))
        self._call("RemoveVm", lambda: self._client.remove_vm(vm_id))
        return None

    def _op_remove_other(self) -> None:
        others = self._running_siblings(exclude_own=True)
        if others:
            vm_id = self._rng.choice(others)
            self._call("RemoveVm", lambda: self._client.remove_vm(vm_id))

    def _op_watch(self) -> None:
        interval = duration_pb2.Duration()
        interval.FromNanoseconds(round(WATCH_INTERVAL_S * 1e9))
        request = pb.WatchBalloonStatsRequest(vm_ids=[0, *self._own_vm_ids], interval=interval)
        stream = self._stub.WatchBalloonStats(request, timeout=self._config.call_timeout_s)
        snapshots = 0
        try:
            for message in stream:
                if message.HasField("snapshot"):
                    snapshots += 1
                if snapshots >= WATCH_SNAPSHOTS:
                    break
        except grpc.RpcError as error:
            failed = ManateeRpcError.from_rpc_error(error)
            self._record("WatchBalloonStats", failed.code.name, failed.reason, failed.message)
            return
        finally:
            stream.cancel()  # our own cancel after the snapshots we wanted: not an outcome
        if snapshots >= WATCH_SNAPSHOTS:
            self._record("WatchBalloonStats", *OK)
        else:
            self._record("WatchBalloonStats", "ENDED_EARLY", "", f"{snapshots} snapshots")

    def _forget(self, vm_id: int) -> None:
        if vm_id in self._own_vm_ids:
            self._own_vm_ids.remove(vm_id)


def fill_handler_threads(target: str, calls: int, hold_s: float = 1.0) -> Counter[str]:
    """Park ``calls`` LaunchVm calls in the server at once, each until its ``hold_s`` deadline.

    A LaunchVm handler is a plain (thread-holding) handler that waits in the queue for mms's
    pending start, so this grows the server's RPC thread pool to its maximum now: a pool that
    grew on some later burst would look like a thread leak. Returns the codes the calls ended
    with (DEADLINE_EXCEEDED, after one of them reserved and waited for its client).
    """
    release = threading.Event()

    def requests() -> Iterator[pb.LaunchVmRequest]:
        start = pb.LaunchVmRequest.Start(
            mem_size_bytes=LAUNCH_MEM_BYTES, init_mem_size_bytes=LAUNCH_INIT_BYTES
        )
        yield pb.LaunchVmRequest(start=start)
        release.wait()  # keep our half open: never answer `reserved`

    def one(stub: pb_grpc.MemoryServiceStub) -> str:
        stream = stub.LaunchVm(requests(), timeout=hold_s)
        try:
            for _ in stream:
                pass
        except grpc.RpcError as error:
            return ManateeRpcError.from_rpc_error(error).code.name
        return "OK"

    codes: Counter[str] = Counter()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        with ThreadPoolExecutor(max_workers=calls, thread_name_prefix="fill") as pool:
            try:
                codes.update(pool.map(lambda _: one(stub), range(calls)))
            finally:
                release.set()
    return codes


def _arm_faults(simulator: Simulator, interval_s: float, stop: threading.Event) -> int:
    """Every ``interval_s``, make the next FinishAddVm fail as if crosvm never connected.

    A failure is armed only once a FinishAddVm came since the last one, so at most one waits.
    """
    armed = 0
    finishes_seen = -1
    while not stop.wait(interval_s):
        finishes = simulator.request_counts[MessageType.FINISH_ADD_VM]
        if finishes > finishes_seen:
            simulator.fail_crosvm_connect(count=1)
            finishes_seen = finishes
            armed += 1
    return armed


def run_load(target: str, config: LoadConfig, simulator: Simulator | None = None) -> LoadReport:
    """Run the load until ``config.duration_s`` has passed and every client finished its step."""
    report = LoadReport()
    shared = _Shared(
        bare_start_lock=threading.Lock(),
        launch_slots=threading.BoundedSemaphore(config.max_concurrent_launches),
        launch_numbers=itertools.count(),
    )
    clients = [_LoadClient(index, target, config, shared) for index in range(config.clients)]
    started = time.monotonic()
    end_monotonic = started + config.duration_s
    threads = [
        threading.Thread(target=client.run, args=(end_monotonic,), name=f"load-{index}")
        for index, client in enumerate(clients)
    ]
    stop_faults = threading.Event()
    armed: list[int] = []
    fault_thread: threading.Thread | None = None
    if simulator is not None and config.fault_interval_s is not None:
        interval_s = config.fault_interval_s
        fault_thread = threading.Thread(
            target=lambda: armed.append(_arm_faults(simulator, interval_s, stop_faults)),
            name="load-faults",
        )
        fault_thread.start()
    for thread in threads:
        thread.start()
    # A client finishes its step within its call deadlines; a longer wait is a hang.
    join_deadline = end_monotonic + config.launch_timeout_s + config.call_timeout_s
    for thread in threads:
        thread.join(max(0.0, join_deadline - time.monotonic()))
    stop_faults.set()
    if fault_thread is not None:
        fault_thread.join()
    hung = [thread.name for thread in threads if thread.is_alive()]
    if hung:
        raise AssertionError(f"load clients still running after their deadlines: {hung}")
    report.elapsed_s = time.monotonic() - started
    for client in clients:
        report.outcomes.update(client.outcomes)
        report.unexpected_examples.extend(client.examples)
        report.stop_vm_callbacks += client.stop_vm_callbacks
        report.short_reservations += client.short_reservations
        client.close()
    report.faults_armed = sum(armed)
    return report


# --- conservation, through the public API and in mms ---------------------------------------------


@dataclass(frozen=True, slots=True)
class Conservation:
    running_vm_ids: tuple[int, ...]
    cros_balloon_bytes: int
    sibling_footprint_bytes: int

    @property
    def error_bytes(self) -> int:
        return self.cros_balloon_bytes - self.sibling_footprint_bytes


def settle(client: Client, simulator: Simulator, timeout_s: float = 20.0) -> None:
    """Wait until no start is pending anywhere: released launches may still be removing."""
    deadline = time.monotonic() + timeout_s
    while True:
        starting = [vm.vm_id for vm in client.list_vms().vms if vm.state != pb.VM_STATE_RUNNING]
        idle = simulator.with_model(lambda model: model.start_state) is StartState.IDLE
        if not starting and idle:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"a start is still pending: starting {starting}, mms idle {idle}")
        time.sleep(0.02)


def public_conservation(client: Client) -> Conservation:
    """The CrOS balloon equals what the running siblings hold, read only through the API.

    A sibling holds ``mem - balloon + extra_bytes(mem)`` of CrOS memory; with no start pending
    the CrOS balloon (ListVms + GetBalloonStats) is exactly their sum.
    """
    listed = client.list_vms()
    mem_by_vm_id = {vm.vm_id: vm.mem_size_bytes for vm in listed.vms if not vm.cros_guest}
    stats = client.get_balloon_stats([0, *mem_by_vm_id])
    assert list(stats.missing_vm_ids) == [], stats.missing_vm_ids
    assert stats.session == listed.session
    balloon_by_vm_id = {entry.vm_id: entry.balloon_actual_bytes for entry in stats.stats}
    footprint_bytes = sum(
        mem - balloon_by_vm_id[vm_id] + extra_bytes(mem) for vm_id, mem in mem_by_vm_id.items()
    )
    return Conservation(tuple(sorted(mem_by_vm_id)), balloon_by_vm_id[0], footprint_bytes)


def remove_all(client: Client, vm_ids: Iterable[int]) -> None:
    for vm_id in vm_ids:
        client.remove_vm(vm_id)
