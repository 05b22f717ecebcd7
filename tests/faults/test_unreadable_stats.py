"""One VM's impossible stats, through the gRPC server: that VM is unreadable, nothing else is.

Real mms reports the CrOS guest's balloon as 2^64 - 32 MiB once that balloon fell below its own
internal allocation (a u64 subtraction that wraps), and passes crosvm's figures through
unchecked. The scripted mms (tests/peers.py) sends such answers over a real socket; the caller
gets the other VMs' stats, the bad VM in ``missing_vm_ids`` and ``unreadable_vms`` with the
reason, and the connection is untouched: same session, no reconnect, health SERVING, the next
call works. A metric and one log line per VM and reason record it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from api.conftest import start_server
from api.helpers import health_status
from metrics.conftest import scrape_until
from peers import RawBody, ScriptedMms, canned_response

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import (
    BalloonStats,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    MmsRequest,
    Response,
    VmBalloonStats,
)

from .helpers import (
    CALL_TIMEOUT_S,
    SERVICE_NAME,
    SERVING,
    VM_INIT_BYTES,
    VM_MEM_BYTES,
    watch_snapshots,
)

WRAPPED_CROS_BALLOON = 2**64 - 32 * MIB  # 18446744073675997184, as real mms reports it
SIBLING_BALLOON_BYTES = 256 * MIB
GOOD_STATS = {"free_memory": 64 * MIB, "total_memory": 512 * MIB, "available_memory": 128 * MIB}


def _good_entry(vm_id: int) -> dict[str, object]:
    return {"id": vm_id, "stats": dict(GOOD_STATS), "balloon_actual": SIBLING_BALLOON_BYTES}


def _wrapped_cros_responder(request: MmsRequest[Any]) -> Response:
    """Canned answers; stats as real mms gives them with VM 0's balloon wrapped."""
    if isinstance(request, GetBalloonStatsRequest):
        return GetBalloonStatsResponse(
            all_stats=tuple(
                VmBalloonStats(
                    vm_id,
                    BalloonStats(free_memory=64 * MIB),
                    WRAPPED_CROS_BALLOON if vm_id == 0 else SIBLING_BALLOON_BYTES,
                )
                for vm_id in request.vm_ids
            )
        )
    return canned_response(request)


@dataclass
class Device:
    peer: ScriptedMms
    server: ManateeServer
    channel: grpc.Channel
    stub: pb_grpc.MemoryServiceStub
    vm_id: int

    def session(self) -> str:
        return self.stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S).session

    def stats(self, *vm_ids: int) -> pb.GetBalloonStatsResponse:
        request = pb.GetBalloonStatsRequest(vm_ids=vm_ids)
        return self.stub.GetBalloonStats(request, timeout=CALL_TIMEOUT_S)

    def assert_untouched(self, session: str) -> None:
        """The stream mms holds every VM on is the one it was: no reset, no reconnect."""
        assert self.peer.connections == 1
        assert self.session() == session
        assert health_status(self.channel, SERVICE_NAME) == SERVING
        assert [vm.vm_id for vm in self.stub.ListVms(pb.ListVmsRequest()).vms] == [0, self.vm_id]


def _device(peer: ScriptedMms, **server_settings: object) -> Iterator[Device]:
    server = start_server(mms=str(peer.address), **server_settings)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            # The scripted peer's canned answers: VM 1, reserved in full, started.
            prepared = stub.PrepareVm(
                pb.PrepareVmRequest(mem_size_bytes=VM_MEM_BYTES, init_mem_size_bytes=VM_INIT_BYTES),
                timeout=CALL_TIMEOUT_S,
            )
            stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=CALL_TIMEOUT_S)
            yield Device(peer, server, channel, stub, prepared.vm_id)
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def scripted() -> Iterator[Device]:
    """One scripted mms and server for the module: no case may leave the connection changed."""
    with ScriptedMms() as peer:
        yield from _device(peer)


@pytest.fixture
def wrapped() -> Iterator[Device]:
    """mms whose every stats answer has VM 0's balloon wrapped; the server serves metrics."""
    with ScriptedMms(_wrapped_cros_responder) as peer:
        yield from _device(peer, metrics_listen="127.0.0.1:0")


# --- the headline: a wrapped CrOS balloon ---------------------------------------------------------


def test_a_wrapped_cros_balloon_leaves_vm_0_unreadable_and_serves_the_others(
    wrapped: Device, caplog: pytest.LogCaptureFixture
) -> None:
    session = wrapped.session()
    caplog.set_level(logging.WARNING, logger="manatee_grpc")

    for _ in range(3):
        response = wrapped.stats(0, wrapped.vm_id)
        assert [entry.vm_id for entry in response.stats] == [wrapped.vm_id]
        assert response.stats[0].balloon_actual_bytes == SIBLING_BALLOON_BYTES
        assert list(response.missing_vm_ids) == [0]
        assert list(response.unreadable_vms) == [
            pb.UnreadableVm(
                vm_id=0,
                reason=pb.UNREADABLE_REASON_WRAPPED,
                mms_field="balloon_actual",
                mms_value="18446744073675997184",
            )
        ]
        assert response.session == session
    # Every VM: the CrOS guest and VM 1 (the empty request asks for all the server knows).
    everything = wrapped.stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=CALL_TIMEOUT_S)
    assert [entry.vm_id for entry in everything.stats] == [wrapped.vm_id]
    assert [entry.vm_id for entry in everything.unreadable_vms] == [0]

    wrapped.assert_untouched(session)
    assert wrapped.peer.request_count(MessageType.GET_BALLOON_STATS) == 4
    # One log line for the four reads, naming the VM, the reason and the value.
    lines = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "VM 0" in lines[0] and "wrapped" in lines[0] and "18446744073675997184" in lines[0]
    # The metric counts every unreadable entry, by reason.
    assert wrapped.server.metrics_address is not None
    scrape_until(
        wrapped.server.metrics_address,
        lambda s: (
            s.value("manatee_mms_unreadable_vm_stats_total", reason="wrapped") == 4
            and s.value("manatee_mms_unreadable_vm_stats_total", reason="negative") == 0
        ),
        "4 wrapped entries counted",
    )


def test_a_watch_goes_on_with_vm_0_unreadable(wrapped: Device) -> None:
    session = wrapped.session()
    for snapshot in watch_snapshots(wrapped.stub, 3):
        assert [entry.vm_id for entry in snapshot.stats] == [wrapped.vm_id]
        assert list(snapshot.missing_vm_ids) == [0]
        assert [(u.vm_id, u.reason) for u in snapshot.unreadable_vms] == [
            (0, pb.UNREADABLE_REASON_WRAPPED)
        ]
        assert snapshot.session == session
    wrapped.assert_untouched(session)


# --- every kind of impossible value, in one VM of an answer ---------------------------------------

# VM 1's entry in an otherwise good answer -> the reason and the mms field reported.
IMPOSSIBLE: dict[str, tuple[dict[str, object], int, str]] = {
    "wrapped": (
        {"balloon_actual": WRAPPED_CROS_BALLOON},
        pb.UNREADABLE_REASON_WRAPPED,
        "balloon_actual",
    ),
    "over-2^53": (
        {"stats": {"total_memory": 2**53 + 1}},
        pb.UNREADABLE_REASON_TOO_LARGE,
        "stats.total_memory",
    ),
    # Before: the server closed the stream on this one (mms then drops every VM).
    "negative-free-memory": (
        {"stats": {"free_memory": -4096}},
        pb.UNREADABLE_REASON_NEGATIVE,
        "stats.free_memory",
    ),
    "float": ({"balloon_actual": 4096.5}, pb.UNREADABLE_REASON_NOT_AN_INTEGER, "balloon_actual"),
    "string": (
        {"stats": {"available_memory": "lots"}},
        pb.UNREADABLE_REASON_NOT_AN_INTEGER,
        "stats.available_memory",
    ),
    "null-stats": ({"stats": None}, pb.UNREADABLE_REASON_MISSING, "stats"),
}


@pytest.mark.parametrize("kind", IMPOSSIBLE)
def test_one_vms_impossible_value_fails_neither_the_call_nor_the_connection(
    scripted: Device, kind: str
) -> None:
    overrides, reason, mms_field = IMPOSSIBLE[kind]
    session = scripted.session()
    bad = _good_entry(scripted.vm_id) | overrides
    scripted.peer.script(RawBody.json({"all_stats": [_good_entry(0), bad]}))

    response = scripted.stats(0, scripted.vm_id)

    assert [entry.vm_id for entry in response.stats] == [0]
    assert response.stats[0].free_memory_bytes == GOOD_STATS["free_memory"]
    assert list(response.missing_vm_ids) == [scripted.vm_id]
    assert [(u.vm_id, u.reason, u.mms_field) for u in response.unreadable_vms] == [
        (scripted.vm_id, reason, mms_field)
    ]
    scripted.assert_untouched(session)
    # The next read (a good answer) serves both VMs.
    scripted.peer.script(RawBody.json({"all_stats": [_good_entry(0), _good_entry(1)]}))
    assert [entry.vm_id for entry in scripted.stats(0, scripted.vm_id).stats] == [0, 1]


# --- a rebalance answer that lists the CrOS guest with delta 0 ------------------------------------

# (mms's actual_deltas for a request {VM 1: +1 MiB, VM 0: -1 MiB}) -> fully_applied, actual
ANSWERS: dict[str, tuple[list[dict[str, int]], bool, list[tuple[int, int]]]] = {
    # Upstream answers id 0 with delta 0 when it trimmed the CrOS deflate away: not full.
    "cros-0-sibling-full": (
        [{"id": 1, "delta": MIB}, {"id": 0, "delta": 0}],
        False,
        [(1, MIB), (0, 0)],
    ),
    "cros-0-sibling-absent": ([{"id": 0, "delta": 0}], False, [(1, 0), (0, 0)]),
    # concierge compares only the ids answered and would call this full; VM 1 moved nothing.
    "sibling-absent": ([{"id": 0, "delta": -MIB}], False, [(1, 0), (0, -MIB)]),
    "both-full": ([{"id": 1, "delta": MIB}, {"id": 0, "delta": -MIB}], True, [(1, MIB), (0, -MIB)]),
}


@pytest.mark.parametrize("answer", ANSWERS)
def test_fully_applied_compares_every_requested_vm(scripted: Device, answer: str) -> None:
    actual_deltas, fully_applied, actual = ANSWERS[answer]
    scripted.peer.script(RawBody.json({"actual_deltas": actual_deltas}))
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=scripted.vm_id, delta_bytes=MIB)]
    )

    response = scripted.stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S)

    assert [(d.vm_id, d.delta_bytes) for d in response.requested_deltas] == [(1, MIB), (0, -MIB)]
    assert [(d.vm_id, d.delta_bytes) for d in response.actual_deltas] == actual
    assert response.fully_applied is fully_applied


def test_a_rebalance_that_moves_nothing_and_says_0_for_the_cros_guest_is_full(
    scripted: Device,
) -> None:
    # A delta below a page aligns to 0: the CrOS guest's delta is 0 too, and so is its answer.
    scripted.peer.script(RawBody.json({"actual_deltas": [{"id": 0, "delta": 0}]}))
    request = pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=scripted.vm_id, delta_bytes=100)]
    )

    response = scripted.stub.RebalanceMemory(request, timeout=CALL_TIMEOUT_S)

    assert [(d.vm_id, d.delta_bytes) for d in response.requested_deltas] == [(1, 0), (0, 0)]
    assert [(d.vm_id, d.delta_bytes) for d in response.actual_deltas] == [(1, 0), (0, 0)]
    assert response.fully_applied
