"""Bad input: hypothesis drives every RPC with arbitrary field values; nothing invalid reaches mms.

Values: negative, zero, unaligned, around and above 2^53, ids around and above u32 (the proto's
int64 bounds what can be sent at all), duplicates, thousands of ids, empty lists, durations out
of range. Each answer is exactly what an oracle written from the API's rules predicts:

- Invalid input: INVALID_ARGUMENT, reason INVALID_ARGUMENT, and a BadRequest naming the *first*
  offending field the way the server walks the request (``vm_ids[3]``, ``deltas[0].delta_bytes``,
  ``start.init_mem_size_bytes``), and not one request reaches mms.
- Valid input gets OK, or the domain status of a valid request meeting the device's state:
  GetBalloonStats / WatchBalloonStats answer unknown ids as ``missing_vm_ids`` (OK);
  RebalanceMemory, FinishAddVm and RemoveVm of a VM the server does not know are NOT_FOUND
  (VM_NOT_FOUND, naming the field); FinishAddVm of the running sibling reaches mms, which refuses
  it (FAILED_PRECONDITION MMS_EINVAL: it is not the pending start); PrepareVm or a LaunchVm start
  not smaller than the CrOS guest's memory reaches mms (only mms knows that size), which refuses
  it: INVALID_ARGUMENT naming the size, with reachedMms in ErrorInfo; a LaunchVm mms cannot fully
  reserve in five attempts is RESOURCE_EXHAUSTED
  (MMS_ENOMEM); a LaunchVm client's second message decides the rest (vm_started: launched;
  vm_start_failed: FAILED_PRECONDITION VM_START_FAILED; anything else: INVALID_ARGUMENT
  ``request``; a half-close: ABORTED LAUNCH_ABORTED).

Every request the simulator received is checked against mms's own rules (aligned positive sizes
within 2^53, init <= mem, u32 sibling ids, unique stats ids, rebalances that sum to zero with
the CrOS guest last). The server never leaves mms session 1: bad input costs no VM anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from api.helpers import bad_request_fields, error_info, session_id, wait_until
from google.protobuf import duration_pb2
from google.protobuf.message import DecodeError, Message
from grpc_status import rpc_status
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    PrepareVmRequest,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    Request,
)
from manatee_grpc.sim import Scenario, Simulator

from .helpers import CALL_TIMEOUT_S, LaunchStream, expect_rpc_error, start_vm

PAGE_BYTES = 4096
GIB = 1024 * MIB
U32_MAX = 2**32 - 1
JSON_SAFE_MAX = 2**53
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
MAX_IDS = 1024
CROS_MEM_BYTES = Scenario().cros_mem_size_bytes
SIBLING_USED_BYTES = Scenario().sibling_used_bytes
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT

EXAMPLES = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- the module's server: one for every example ----------------------------------------------


@dataclass
class Device:
    server: ManateeServer
    sim: Simulator
    channel: grpc.Channel
    stub: pb_grpc.MemoryServiceStub
    running_vm_id: int  # a sibling that runs for the whole module, so valid ids exist


@pytest.fixture(scope="module")
def device() -> Iterator[Device]:
    server = start_server()
    try:
        assert server.simulator is not None
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            yield Device(server, server.simulator, channel, stub, start_vm(stub))
        assert server.simulator.connections_accepted == 1  # never reset by anything we sent
    finally:
        server.stop(grace_s=1.0)


@dataclass(frozen=True)
class Answer:
    code: grpc.StatusCode
    reason: str = ""
    fields: tuple[str, ...] = ()  # BadRequest field violations
    metadata: tuple[tuple[str, str], ...] = ()


def answer_of(error: object) -> Answer:
    """The status of a failed call (an RpcError, or a finished stream)."""
    assert isinstance(error, grpc.RpcError) and isinstance(error, grpc.Call)
    if rpc_status.from_call(error) is None:  # e.g. the client's own deadline
        return Answer(error.code())
    info = error_info(error)
    return Answer(
        error.code(),
        info.reason,
        tuple(bad_request_fields(error)),
        tuple(sorted(info.metadata.items())),
    )


def call(rpc: Callable[[], object]) -> tuple[Answer, object]:
    try:
        return Answer(OK), rpc()
    except grpc.RpcError as error:
        return answer_of(error), None


def assert_invalid(answer: Answer, field: str) -> None:
    """INVALID_ARGUMENT naming ``field``, in BadRequest and in ErrorInfo's metadata."""
    assert (answer.code, answer.reason, answer.fields) == (INVALID, "INVALID_ARGUMENT", (field,))
    assert dict(answer.metadata)["field"] == field


class Watched:
    """What mms receives during one example: the simulator's counters, before and after."""

    def __init__(self, device: Device) -> None:
        self._sim = device.sim
        self._before = sum(self._sim.request_counts.values())

        self._ignored = 0

    def received(self) -> list[Request]:
        count = sum(self._sim.request_counts.values()) - self._before
        assert count <= 100, "more requests than the simulator's log keeps"
        return self._sim.requests[-count:][: count - self._ignored] if count else []

    def ignore_last(self, request: Request) -> None:
        """The test's own last request (a barrier), which is not the example's doing."""
        assert self.received()[-1:] == [request]
        self._ignored += 1


def check_reached_mms(
    answer: Answer, watched: Watched, device: Device, refused: bool | None = None
) -> None:
    """Refused input reached nothing; whatever did reach mms is valid by mms's own rules.

    ``refused``: the request was refused before anything was sent (default: INVALID_ARGUMENT).
    """
    received = watched.received()
    if refused is None:
        refused = answer.code == INVALID
    if refused:
        assert received == [], f"{answer} yet mms received {received}"
    for request in received:
        assert_valid_for_mms(request)
    assert device.sim.malformed_requests == 0
    assert device.sim.connections_accepted == 1


def assert_valid_for_mms(request: Request) -> None:
    if isinstance(request, GetBalloonStatsRequest):
        assert len(set(request.vm_ids)) == len(request.vm_ids) <= MAX_IDS, request
    elif isinstance(request, RebalanceMemoryRequest):
        ids = [delta.vm_id for delta in request.deltas]
        assert ids[-1] == 0 and all(1 <= vm_id <= U32_MAX for vm_id in ids[:-1]), request
        assert len(set(ids)) == len(ids), request
        assert sum(delta.delta_bytes for delta in request.deltas) == 0, request
        for delta in request.deltas:
            assert delta.delta_bytes % PAGE_BYTES == 0, request
            assert abs(delta.delta_bytes) <= JSON_SAFE_MAX, request
    elif isinstance(request, PrepareVmRequest):
        mem, init = request.mem_size_bytes, request.init_mem_size_bytes
        assert 0 < init <= mem <= JSON_SAFE_MAX, request
        assert mem % PAGE_BYTES == 0 and init % PAGE_BYTES == 0, request
    else:
        assert isinstance(request, FinishAddVmRequest | RemoveVmRequest)
        assert 1 <= request.vm_id <= U32_MAX, request


# --- the oracle: the API's rules, written independently of the server's code --------------------


def ids_violation(ids: list[int], field: str = "vm_ids") -> str | None:
    if len(ids) > MAX_IDS:
        return field
    seen: set[int] = set()
    for index, vm_id in enumerate(ids):
        if not 0 <= vm_id <= U32_MAX or vm_id in seen:
            return f"{field}[{index}]"
        seen.add(vm_id)
    return None


def sibling_violation(vm_id: int, field: str = "vm_id") -> str | None:
    return None if 1 <= vm_id <= U32_MAX else field


def deltas_violation(deltas: list[tuple[int, int]]) -> str | None:
    if not deltas or len(deltas) > MAX_IDS:
        return "deltas"
    seen: set[int] = set()
    for index, (vm_id, delta_bytes) in enumerate(deltas):
        if sibling_violation(vm_id) or vm_id in seen:
            return f"deltas[{index}].vm_id"
        if abs(delta_bytes) > JSON_SAFE_MAX:
            return f"deltas[{index}].delta_bytes"
        seen.add(vm_id)
    # The CrOS guest's delta is their negated sum: it must be exact too.
    if abs(sum(delta for _, delta in deltas)) > JSON_SAFE_MAX:
        return "deltas"
    return None


def sizes_violation(mem_bytes: int, init_bytes: int | None, prefix: str = "") -> str | None:
    if not 0 < mem_bytes <= JSON_SAFE_MAX or mem_bytes % PAGE_BYTES:
        return f"{prefix}mem_size_bytes"
    if init_bytes is not None and (
        init_bytes <= 0 or init_bytes % PAGE_BYTES or init_bytes > mem_bytes
    ):
        return f"{prefix}init_mem_size_bytes"
    return None


def interval_violation(seconds: int, nanos: int) -> str | None:
    """A valid google.protobuf.Duration first (duration.proto's bounds and sign rule), then:
    unset (zero) means the default; otherwise 100 ms .. 1 h, exactly, in nanoseconds."""
    if not -315_576_000_000 <= seconds <= 315_576_000_000:
        return "interval.seconds"
    if not -999_999_999 <= nanos <= 999_999_999:
        return "interval.nanos"
    if seconds and nanos and (seconds < 0) != (nanos < 0):
        return "interval.nanos"
    total_ns = seconds * 1_000_000_000 + nanos
    return None if total_ns == 0 or 10**8 <= total_ns <= 3600 * 10**9 else "interval"


# --- strategies ----------------------------------------------------------------------------------

BOUNDARIES = [
    0, 1, -1, PAGE_BYTES - 1, PAGE_BYTES, PAGE_BYTES + 1, 2**31 - 1, 2**31, U32_MAX, U32_MAX + 1,
    JSON_SAFE_MAX - PAGE_BYTES, JSON_SAFE_MAX - 1, JSON_SAFE_MAX, JSON_SAFE_MAX + 1,
    JSON_SAFE_MAX + PAGE_BYTES, -JSON_SAFE_MAX, -JSON_SAFE_MAX - 1, I64_MAX, I64_MIN, I64_MIN + 1,
]  # fmt: skip
any_int64 = st.one_of(
    st.sampled_from(BOUNDARIES), st.integers(I64_MIN, I64_MAX), st.integers(-10_000, 10_000)
)
# Sizes: mostly page multiples (often valid, sometimes beyond the device), and anything at all.
sizes = st.one_of(
    any_int64,
    st.integers(1, 2**21).map(lambda pages: pages * PAGE_BYTES),
    st.sampled_from([512 * MIB, CROS_MEM_BYTES - PAGE_BYTES, CROS_MEM_BYTES, 6 * GIB]),
)
optional_sizes = st.one_of(st.none(), sizes)


def vm_ids(device: Device) -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from([0, 1, device.running_vm_id, 2, U32_MAX, U32_MAX + 1, -1, I64_MAX]),
        any_int64,
        st.integers(0, 50),
    )


def id_lists(device: Device) -> st.SearchStrategy[list[int]]:
    return st.one_of(
        st.lists(vm_ids(device), max_size=8),
        st.lists(st.integers(0, 4), max_size=8),  # duplicates, often
        st.sampled_from([MAX_IDS - 1, MAX_IDS, MAX_IDS + 1]).map(lambda n: list(range(n))),
        st.integers(2000, 5000).map(lambda n: list(range(n))),  # thousands
    )


def delta_lists(device: Device) -> st.SearchStrategy[list[tuple[int, int]]]:
    deltas = st.one_of(any_int64, st.integers(-GIB, GIB))
    return st.one_of(
        st.lists(st.tuples(vm_ids(device), deltas), max_size=6),
        st.lists(st.tuples(st.just(device.running_vm_id), deltas), min_size=1, max_size=3),
        st.sampled_from([MAX_IDS, MAX_IDS + 1]).map(
            lambda n: [(vm_id, PAGE_BYTES) for vm_id in range(1, n + 1)]
        ),
    )


durations = st.tuples(
    st.one_of(
        st.sampled_from([0, 1, 3600, 3601, -1, 10**12, 10**14, I64_MAX, I64_MIN]),
        st.integers(I64_MIN, I64_MAX),
        st.integers(-5, 4000),
    ),
    st.one_of(
        st.just(0),
        st.sampled_from(
            [99_999_999, 100_000_000, 999_999_999, 10**9, -(10**9), 2 * 10**9, -1, 2**31 - 1]
        ),
        st.integers(-(2**31), 2**31 - 1),
    ),
)


# --- the RPCs ------------------------------------------------------------------------------------


@given(data=st.data())
@EXAMPLES
def test_get_balloon_stats(device: Device, data: st.DataObject) -> None:
    ids = data.draw(id_lists(device))
    watched = Watched(device)
    answer, response = call(
        lambda: device.stub.GetBalloonStats(
            pb.GetBalloonStatsRequest(vm_ids=ids), timeout=CALL_TIMEOUT_S
        )
    )
    check_reached_mms(answer, watched, device)
    field = ids_violation(ids)
    if field is not None:
        assert_invalid(answer, field)
        return
    assert answer.code == OK, answer
    assert isinstance(response, pb.GetBalloonStatsResponse)
    answered = [entry.vm_id for entry in response.stats]
    if ids:
        assert sorted(answered + list(response.missing_vm_ids)) == sorted(ids)
    else:
        assert answered == [0, device.running_vm_id]


# A new watch's first snapshot comes from its interval's first poll, at once; far sooner than this.
FIRST_SNAPSHOT_S = 2.0


@given(data=st.data())
@settings(EXAMPLES, max_examples=60)
def test_watch_balloon_stats(device: Device, data: st.DataObject) -> None:
    ids = data.draw(id_lists(device))
    seconds, nanos = data.draw(durations)
    watched = Watched(device)
    request = pb.WatchBalloonStatsRequest(
        vm_ids=ids, interval=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )
    stream = device.stub.WatchBalloonStats(request, timeout=FIRST_SNAPSHOT_S)
    try:
        answer, first = call(lambda: next(stream))
    finally:
        stream.cancel()
    # Once the cancelled watch is gone, the next example's watch starts a ticker of its own
    # (a watch that joins a running ticker waits for its next tick, up to an hour away).
    hub = device.server.watch_hub
    wait_until(lambda: hub.watcher_count() == 0, "the cancelled watch is gone")
    check_reached_mms(answer, watched, device)
    field = ids_violation(ids) or interval_violation(seconds, nanos)
    if field is not None:
        assert_invalid(answer, field)
        return
    assert answer.code == OK, answer
    assert isinstance(first, pb.WatchBalloonStatsResponse) and first.HasField("snapshot")
    answered = [entry.vm_id for entry in first.snapshot.stats]
    if ids:
        assert sorted(answered + list(first.snapshot.missing_vm_ids)) == sorted(ids)
    else:
        assert answered == [0, device.running_vm_id]


def test_a_watch_of_an_hour_gets_its_first_snapshot_at_once(device: Device) -> None:
    """Found by the test above: a new interval's ticker used to start before its watcher was
    added, so the first snapshot came only after a whole interval."""
    interval = duration_pb2.Duration(seconds=3600)
    stream = device.stub.WatchBalloonStats(
        pb.WatchBalloonStatsRequest(interval=interval), timeout=FIRST_SNAPSHOT_S
    )
    try:
        first = next(stream).snapshot
        assert first.session == session_id(device.server, 1)
    finally:
        stream.cancel()


@pytest.mark.parametrize("seconds", [10**14, I64_MAX])
def test_an_interval_too_long_for_a_timedelta_is_invalid_argument(
    device: Device, seconds: int
) -> None:
    """Found by the test above: seconds beyond timedelta's range (2.7 million years)."""
    request = pb.WatchBalloonStatsRequest(interval=duration_pb2.Duration(seconds=seconds))
    stream = device.stub.WatchBalloonStats(request, timeout=CALL_TIMEOUT_S)
    # Beyond duration.proto's +-315,576,000,000 s too: not a Duration at all.
    assert_invalid(answer_of(expect_rpc_error(lambda: next(stream))), "interval.seconds")


@given(data=st.data())
@EXAMPLES
def test_rebalance_memory(device: Device, data: st.DataObject) -> None:
    deltas = data.draw(delta_lists(device))
    # A preview (validate_only) is checked exactly as the real call.
    validate_only = data.draw(st.booleans())
    watched = Watched(device)
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=delta) for vm_id, delta in deltas],
        validate_only=validate_only,
    )
    answer, response = call(lambda: device.stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S))
    check_reached_mms(answer, watched, device)
    field = deltas_violation(deltas)
    if field is not None:
        assert_invalid(answer, field)
        return
    unknown = [i for i, (vm_id, _) in enumerate(deltas) if vm_id != device.running_vm_id]
    if unknown:
        assert (answer.code, answer.reason) == (grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND")
        assert dict(answer.metadata)["field"] == f"deltas[{unknown[0]}].vm_id"
        assert watched.received() == []
        return
    assert answer.code == OK, answer
    assert isinstance(response, pb.RebalanceMemoryResponse)
    requested = [(d.vm_id, d.delta_bytes) for d in response.requested_deltas]
    # The server page-aligns each delta (down) and adds the CrOS guest's opposite delta last.
    assert requested[:-1] == [(vm_id, delta - delta % PAGE_BYTES) for vm_id, delta in deltas]
    assert requested[-1] == (0, -sum(delta for _, delta in requested[:-1]))
    if validate_only:  # it read stats and sent no RebalanceMemory
        assert all(isinstance(r, GetBalloonStatsRequest) for r in watched.received())


@given(mem_bytes=sizes, init_bytes=optional_sizes)
@EXAMPLES
def test_prepare_vm(device: Device, mem_bytes: int, init_bytes: int | None) -> None:
    watched = Watched(device)
    request = pb.PrepareVmRequest(mem_size_bytes=mem_bytes)
    if init_bytes is not None:
        request.init_mem_size_bytes = init_bytes
    answer, response = call(lambda: device.stub.PrepareVm(request, timeout=CALL_TIMEOUT_S))
    if isinstance(response, pb.PrepareVmResponse):
        # Leave nothing pending for the next example (and check it was really opened).
        assert response.reserved == (response.shortfall_bytes == 0)
        device.stub.RemoveVm(pb.RemoveVmRequest(vm_id=response.vm_id), timeout=CALL_TIMEOUT_S)
    field = sizes_violation(mem_bytes, init_bytes)
    check_reached_mms(answer, watched, device, refused=field is not None)
    if field is not None:
        assert_invalid(answer, field)
    elif mem_bytes >= CROS_MEM_BYTES:
        assert_invalid(answer, "mem_size_bytes")
        assert dict(answer.metadata)["reachedMms"] == "true"
    else:
        assert answer.code == OK, answer


@given(data=st.data())
@EXAMPLES
def test_finish_add_vm(device: Device, data: st.DataObject) -> None:
    vm_id = data.draw(vm_ids(device))
    watched = Watched(device)
    answer, _ = call(
        lambda: device.stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=vm_id), timeout=CALL_TIMEOUT_S)
    )
    check_reached_mms(answer, watched, device)
    field = sibling_violation(vm_id)
    if field is not None:
        assert_invalid(answer, field)
    elif vm_id == device.running_vm_id:
        # Known to the server, so it asks mms, which has no such pending start.
        assert (answer.code, answer.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "MMS_EINVAL")
    else:
        assert (answer.code, answer.reason) == (grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND")
        assert watched.received() == []


@given(data=st.data())
@EXAMPLES
def test_remove_vm(device: Device, data: st.DataObject) -> None:
    # Removing the module's running VM would be valid, and would end the module's device.
    vm_id = data.draw(vm_ids(device).filter(lambda vm_id: vm_id != device.running_vm_id))
    watched = Watched(device)
    answer, _ = call(
        lambda: device.stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=CALL_TIMEOUT_S)
    )
    check_reached_mms(answer, watched, device)
    field = sibling_violation(vm_id)
    if field is not None:
        assert_invalid(answer, field)
    else:
        assert (answer.code, answer.reason) == (grpc.StatusCode.NOT_FOUND, "VM_NOT_FOUND")


def test_list_vms_has_no_input_to_get_wrong(device: Device) -> None:
    response = device.stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
    assert [vm.vm_id for vm in response.vms] == [0, device.running_vm_id]
    assert response.session == session_id(device.server, 1)


FIRST_MESSAGES = ["start", "vm_started", "vm_start_failed", "vm_stopped", "empty"]
SECOND_MESSAGES = ["vm_started", "vm_start_failed", "vm_stopped", "start", "empty", "half-close"]


def _message(kind: str, mem_bytes: int = 0, init_bytes: int | None = None) -> pb.LaunchVmRequest:
    if kind == "start":
        start = pb.LaunchVmRequest.Start(mem_size_bytes=mem_bytes)
        if init_bytes is not None:
            start.init_mem_size_bytes = init_bytes
        return pb.LaunchVmRequest(start=start)
    if kind == "vm_started":
        return pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted())
    if kind == "vm_start_failed":
        return pb.LaunchVmRequest(vm_start_failed=pb.LaunchVmRequest.VmStartFailed())
    if kind == "vm_stopped":
        return pb.LaunchVmRequest(vm_stopped=pb.LaunchVmRequest.VmStopped())
    return pb.LaunchVmRequest()


@given(
    first=st.sampled_from(FIRST_MESSAGES) | st.just("start"),  # mostly a start
    mem_bytes=sizes,
    init_bytes=optional_sizes,
    second=st.sampled_from(SECOND_MESSAGES),
)
@settings(EXAMPLES, max_examples=60)
def test_launch_vm(
    device: Device, first: str, mem_bytes: int, init_bytes: int | None, second: str
) -> None:
    watched = Watched(device)
    stream = LaunchStream(device.stub)
    events: list[str] = []
    launched_vm_id: int | None = None
    try:
        stream.send(_message(first, mem_bytes, init_bytes))
        for response in stream.call:
            events.append(str(response.WhichOneof("event")))
            if response.HasField("reserved"):
                if second == "half-close":
                    stream.half_close()
                else:
                    stream.send(_message(second, mem_bytes, init_bytes))
            if response.HasField("stop_vm"):
                stream.send(_message("vm_stopped"))  # as a well-behaved client does
            if response.HasField("launched"):
                launched_vm_id = response.launched.vm_id
        answer = Answer(OK)
    except grpc.RpcError as error:
        answer = answer_of(error)
    finally:
        stream.close()
    if launched_vm_id is not None:
        device.stub.RemoveVm(pb.RemoveVmRequest(vm_id=launched_vm_id), timeout=CALL_TIMEOUT_S)
    # A launch that did not complete is released in the background before its status is sent;
    # this read is queued behind that RemoveVm, so once it is answered the release is done.
    device.stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=CALL_TIMEOUT_S)
    watched.ignore_last(GetBalloonStatsRequest(vm_ids=(0,)))
    field = "start" if first != "start" else sizes_violation(mem_bytes, init_bytes, prefix="start.")
    # A message out of turn later is INVALID_ARGUMENT too, after a valid start reached mms.
    check_reached_mms(answer, watched, device, refused=field is not None)
    if field is not None:
        assert_invalid(answer, field)
        assert events == []
        return
    if mem_bytes >= CROS_MEM_BYTES:
        assert_invalid(answer, "start.mem_size_bytes")
        assert dict(answer.metadata)["reachedMms"] == "true"
        return
    if "reserved" not in events:
        # Every attempt fell short: five progress reports, then out of memory.
        assert events == ["progress"] * 5
        assert (answer.code, answer.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MMS_ENOMEM")
        return
    if second == "vm_started":
        effective_init_bytes = min(1000 * MIB, mem_bytes) if init_bytes is None else init_bytes
        balloon_bytes = mem_bytes - effective_init_bytes
        if balloon_bytes > max(0, mem_bytes - SIBLING_USED_BYTES):
            # The new VM already uses more than its initial memory: its balloon cannot take all
            # of the rest, so mms fails FinishAddVm, and the client is asked to stop the VM.
            assert events[-2:] == ["reserved", "stop_vm"]
            assert (answer.code, answer.reason) == (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "MMS_ENOMEM",
            )
        else:
            assert events[-2:] == ["reserved", "launched"] and launched_vm_id is not None
            assert answer.code == OK, answer
        return
    assert events[-1] == "reserved"
    if second not in ("vm_start_failed", "half-close"):
        assert_invalid(answer, "request")  # a message out of turn
        return
    expected = {
        "vm_start_failed": (grpc.StatusCode.FAILED_PRECONDITION, "VM_START_FAILED"),
        "half-close": (grpc.StatusCode.ABORTED, "LAUNCH_ABORTED"),
    }[second]
    assert (answer.code, answer.reason) == expected


REQUEST_TYPES: dict[str, type[Message]] = {
    "GetBalloonStats": pb.GetBalloonStatsRequest,
    "RebalanceMemory": pb.RebalanceMemoryRequest,
    "PrepareVm": pb.PrepareVmRequest,
    "FinishAddVm": pb.FinishAddVmRequest,
    "RemoveVm": pb.RemoveVmRequest,
    "ListVms": pb.ListVmsRequest,
}


@pytest.mark.parametrize("method", list(REQUEST_TYPES))
@given(payload=st.binary(max_size=64))
@settings(EXAMPLES, max_examples=25)
def test_bytes_that_are_not_the_message_never_crash_the_server(
    device: Device, method: str, payload: bytes
) -> None:
    try:
        parsed: Message | None = REQUEST_TYPES[method].FromString(payload)
    except DecodeError:
        parsed = None
    # Valid, and would end the module's device: the typed tests above cover it.
    assume(not (isinstance(parsed, pb.RemoveVmRequest) and parsed.vm_id == device.running_vm_id))
    watched = Watched(device)
    rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = device.channel.unary_unary(
        f"/manatee.memory.v1.MemoryService/{method}"
    )
    try:
        response = rpc(payload, timeout=CALL_TIMEOUT_S)
        answer = Answer(OK)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        response = None
        answer = Answer(error.code(), error_info(error).reason, tuple(bad_request_fields(error)))
    if parsed is None:
        # What does not parse is bad input like any other, refused before the handler runs.
        assert answer == Answer(INVALID, "INVALID_ARGUMENT", ("request",)), answer
    else:
        # What parses is an ordinary request: judged by the rules, never a handler's crash
        # (which would be UNKNOWN, or INTERNAL with the reason INTERNAL).
        assert answer.code != grpc.StatusCode.UNKNOWN and answer.reason != "INTERNAL", answer
    if isinstance(parsed, pb.PrepareVmRequest) and isinstance(response, bytes):
        opened = pb.PrepareVmResponse.FromString(response)
        device.stub.RemoveVm(pb.RemoveVmRequest(vm_id=opened.vm_id), timeout=CALL_TIMEOUT_S)
    check_reached_mms(answer, watched, device)


@pytest.mark.parametrize("method", ["RemoveVm", "WatchBalloonStats"])
def test_undecodable_bytes_are_invalid_argument_with_one_log_line(
    device: Device, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    payload = b"\x0a\xff"  # field 1, length-delimited, 255 bytes announced, none there
    with pytest.raises(DecodeError):
        pb.RemoveVmRequest.FromString(payload)
    watched = Watched(device)
    caplog.clear()
    if method == "RemoveVm":
        rpc: grpc.UnaryUnaryMultiCallable[bytes, bytes] = device.channel.unary_unary(
            f"/manatee.memory.v1.MemoryService/{method}"
        )
        with pytest.raises(grpc.RpcError) as caught:
            rpc(payload, timeout=CALL_TIMEOUT_S)
        error = caught.value
    else:
        stream: grpc.UnaryStreamMultiCallable[bytes, bytes] = device.channel.unary_stream(
            f"/manatee.memory.v1.MemoryService/{method}"
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(iter(stream(payload, timeout=CALL_TIMEOUT_S)))
        error = caught.value
    answer = answer_of(error)
    assert (answer.code, answer.reason, answer.fields) == (
        INVALID,
        "INVALID_ARGUMENT",
        ("request",),
    )
    records = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(records) == 1 and records[0].exc_info is None, records
    assert method in records[0].getMessage()
    check_reached_mms(answer_of(error), watched, device)
