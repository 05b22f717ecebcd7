"""The README's Limits table is what the server does: each row's example, sent to a live server,
gets exactly the code, ErrorInfo reason, BadRequest field and description the row gives.

The table is parsed from README.md; this file only knows how to build each row's example (keyed
by the row's field and example text). A row without a builder, or a builder without a row,
fails: the table and the server cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from manatee_grpc import Client, ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.core._request_ids import DEFAULT_CAPACITY, RequestIds
from manatee_grpc.mms._messages import MessageType

from .conftest import start_server
from .helpers import request_count, simulator, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
MIB = 1 << 20
GIB = 1 << 30
CALL_TIMEOUT_S = 10.0
SERVICE = "manatee.memory.v1.MemoryService"


@dataclass(frozen=True)
class Row:
    rpcs: tuple[str, ...]
    field: str | None  # None: the error names no field
    limit: str
    example: str
    code: str
    reason: str | None  # None: gRPC's own check, no ErrorInfo
    description: str


def _code_span(cell: str) -> str:
    """The text of a markdown code span (``x`` or ``` `` a `b` `` ```), as CommonMark reads it."""
    match = re.fullmatch(r"(`+)(.*?)\1", cell)
    if match is None:
        return cell
    text = match.group(2)
    if len(text) > 1 and text.startswith(" ") and text.endswith(" ") and text.strip():
        text = text[1:-1]
    return text


def limit_rows() -> list[Row]:
    text = README.read_text()
    section = text[text.index("### Limits") : text.index("\n## ", text.index("### Limits"))]
    rows = []
    for line in section.splitlines():
        if not line.startswith("| ") or line.startswith("| RPC |"):
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        assert len(cells) == 7, line
        rpcs, field, limit, example, code, reason, description = cells
        rows.append(
            Row(
                rpcs=tuple(name.strip() for name in rpcs.split(",")),
                field=None if field == "—" else _code_span(field),
                limit=limit,
                example=example.replace("`", ""),
                code=_code_span(code),
                reason=None if reason == "—" else _code_span(reason),
                description=_code_span(description),
            )
        )
    return rows


ROWS = limit_rows()


# --- the examples --------------------------------------------------------------------------------

SIBLING_DELTA = pb.BalloonDelta(vm_id=1, delta_bytes=4096)  # valid, so a later field is judged


def _rebalance(*deltas: tuple[int, int], **fields: Any) -> pb.RebalanceMemoryRequest:
    return pb.RebalanceMemoryRequest(
        deltas=[pb.BalloonDelta(vm_id=vm_id, delta_bytes=delta) for vm_id, delta in deltas],
        **fields,
    )


def _ids_request(rpc: str, vm_ids: list[int]) -> Message:
    if rpc == "GetBalloonStats":
        return pb.GetBalloonStatsRequest(vm_ids=vm_ids)
    assert rpc == "WatchBalloonStats"
    return pb.WatchBalloonStatsRequest(vm_ids=vm_ids)


def _session_request(rpc: str) -> Message:
    session = "s" * 65
    builders: dict[str, Callable[[], Message]] = {
        "GetBalloonStats": lambda: pb.GetBalloonStatsRequest(session=session),
        "WatchBalloonStats": lambda: pb.WatchBalloonStatsRequest(session=session),
        "RebalanceMemory": lambda: _rebalance((1, 4096), session=session),
        "FinishAddVm": lambda: pb.FinishAddVmRequest(vm_id=1, session=session),
        "RemoveVm": lambda: pb.RemoveVmRequest(vm_id=1, session=session),
    }
    return builders[rpc]()


def _request_id_request(rpc: str, request_id: str) -> Message:
    if rpc == "RebalanceMemory":
        return _rebalance((1, 4096), request_id=request_id)
    assert rpc == "PrepareVm"
    return pb.PrepareVmRequest(mem_size_bytes=512 * MIB, request_id=request_id)


def _watch(seconds: int, nanos: int) -> pb.WatchBalloonStatsRequest:
    return pb.WatchBalloonStatsRequest(interval=duration_pb2.Duration(seconds=seconds, nanos=nanos))


def _sizes(mem_size_bytes: int, init_mem_size_bytes: int | None = None) -> Callable[[str], Message]:
    def build(rpc: str) -> Message:
        assert rpc == "PrepareVm"
        request = pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes)
        if init_mem_size_bytes is not None:
            request.init_mem_size_bytes = init_mem_size_bytes
        return request

    return build


def _vm_id_request(rpc: str, vm_id: int) -> Message:
    if rpc == "FinishAddVm":
        return pb.FinishAddVmRequest(vm_id=vm_id)
    assert rpc == "RemoveVm"
    return pb.RemoveVmRequest(vm_id=vm_id)


def _watch_events(kind: int) -> pb.WatchEventsRequest:
    assert kind == pb.EVENT_KIND_UNSPECIFIED or kind not in pb.EventKind.values()
    return pb.WatchEventsRequest(kinds=[kind])  # type: ignore[list-item]


# (field, example) -> the request to send for an RPC of the row.
EXAMPLES: dict[tuple[str | None, str], Callable[[str], Message]] = {
    ("vm_ids", "1025 ids"): lambda rpc: _ids_request(rpc, list(range(1025))),
    ("vm_ids[0]", "[4294967296]"): lambda rpc: _ids_request(rpc, [2**32]),
    ("vm_ids[1]", "[0, 0]"): lambda rpc: _ids_request(rpc, [0, 0]),
    ("session", "65 characters"): _session_request,
    ("interval", "99,999,999 ns"): lambda rpc: _watch(0, 99_999_999),
    ("interval", "3600 s + 1 ns"): lambda rpc: _watch(3600, 1),
    ("interval.seconds", "315,576,000,001 s"): lambda rpc: _watch(315_576_000_001, 0),
    ("interval.nanos", "nanos 2,000,000,000"): lambda rpc: _watch(0, 2_000_000_000),
    ("interval.nanos", "1 s and -1 ns"): lambda rpc: _watch(1, -1),
    ("deltas", "no deltas"): lambda rpc: _rebalance(),
    ("deltas", "1025 deltas"): lambda rpc: _rebalance(*((i, 4096) for i in range(1, 1026))),
    ("deltas[0].vm_id", "VM 0"): lambda rpc: _rebalance((0, 4096)),
    ("deltas[0].vm_id", "VM 4294967296"): lambda rpc: _rebalance((2**32, 4096)),
    ("deltas[1].vm_id", "VM 1 twice"): lambda rpc: _rebalance((1, 4096), (1, 4096)),
    ("deltas[0].delta_bytes", "2^53 + 1"): lambda rpc: _rebalance((1, 2**53 + 1)),
    ("deltas", "2^53 and 4096"): lambda rpc: _rebalance((1, 2**53), (2, 4096)),
    ("request_id", "65 characters"): lambda rpc: _request_id_request(rpc, "r" * 65),
    ("request_id", "a newline"): lambda rpc: _request_id_request(rpc, "a\nb"),
    ("mem_size_bytes", "0"): _sizes(0),
    ("mem_size_bytes", "2^53 + 4096"): _sizes(2**53 + 4096),
    ("mem_size_bytes", "4097"): _sizes(4097),
    ("mem_size_bytes", "8 GiB on an 8 GiB device"): _sizes(8 * GIB),
    ("init_mem_size_bytes", "0"): _sizes(512 * MIB, 0),
    ("init_mem_size_bytes", "4097"): _sizes(512 * MIB, 4097),
    ("init_mem_size_bytes", "1 GiB of 512 MiB"): _sizes(512 * MIB, GIB),
    ("vm_id", "0"): lambda rpc: _vm_id_request(rpc, 0),
    ("vm_id", "4294967296"): lambda rpc: _vm_id_request(rpc, 2**32),
    ("kinds[0]", "[999]"): lambda rpc: _watch_events(999),
    ("kinds[0]", "[EVENT_KIND_UNSPECIFIED]"): lambda rpc: _watch_events(pb.EVENT_KIND_UNSPECIFIED),
}
# Rows whose example needs more than one request, or a server of its own: tested one by one
# below, each test naming its row.
SPECIAL = {
    ("start", "vm_started first"),
    ("request", "a second start after reserved"),
    ("request", "the bytes ff"),
    (None, "a new id while 4096 are in flight"),
    (None, "a 1,048,580-byte request"),
    (None, "one more"),
}
# PrepareVm's size rows hold for LaunchVm's `start` too, with `start.` before each field name.
SIZE_FIELDS = ("mem_size_bytes", "init_mem_size_bytes")


def _cases() -> Iterator[Any]:
    for row in ROWS:
        if (row.field, row.example) in SPECIAL:
            continue
        for rpc in row.rpcs:
            yield pytest.param(row, rpc, id=f"{rpc}-{row.field}-{row.example}")
            if rpc == "PrepareVm" and row.field in SIZE_FIELDS:
                yield pytest.param(row, "LaunchVm", id=f"LaunchVm-start.{row.field}-{row.example}")


# --- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    code: str
    reason: str | None
    metadata: dict[str, str]
    field: str | None
    description: str
    message: str


def answer_of(error: grpc.RpcError) -> Answer:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:  # gRPC's own refusal: no details at all
        return Answer(error.code().name, None, {}, None, error.details() or "", "")
    reason, metadata, field, description = None, {}, None, ""
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, metadata = info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            ((violation,),) = [bad.field_violations]
            field, description = violation.field, violation.description
    if field is None:
        description = status.message
    return Answer(error.code().name, reason, metadata, field, description, status.message)


def assert_row(answer: Answer, row: Row, prefix: str = "") -> None:
    field = None if row.field is None else prefix + row.field
    description = row.description
    if prefix:
        description = re.sub(r"(?<![\w.])(?=(init_)?mem_size_bytes)", prefix, description)
    assert (answer.code, answer.reason, answer.field, answer.description) == (
        row.code,
        row.reason,
        field,
        description,
    )
    if row.reason == "INVALID_ARGUMENT":
        assert answer.metadata["field"] == field
        assert answer.message == f"{field}: {description}"
    if 'reachedMms: "true"' in row.limit:
        assert answer.metadata["reachedMms"] == "true"


def call(stub: pb_grpc.MemoryServiceStub, rpc: str, request: Message) -> grpc.RpcError:
    method = getattr(stub, rpc)
    with pytest.raises(grpc.RpcError) as caught:
        if rpc in ("WatchBalloonStats", "WatchEvents"):
            stream = method(request, timeout=CALL_TIMEOUT_S)
            try:
                next(stream)
            finally:
                stream.cancel()
        else:
            method(request, timeout=CALL_TIMEOUT_S)
    return caught.value


def launch_error(stub: pb_grpc.MemoryServiceStub, start: pb.LaunchVmRequest.Start) -> Answer:
    with pytest.raises(grpc.RpcError) as caught:
        for response in stub.LaunchVm(
            iter([pb.LaunchVmRequest(start=start)]), timeout=CALL_TIMEOUT_S
        ):
            raise AssertionError(f"expected the launch to fail, got {response}")
    return answer_of(caught.value)


@pytest.fixture(scope="module")
def shared_server() -> Iterator[ManateeServer]:
    server = start_server()
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def shared_stub(shared_server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(shared_server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)


def row_of(field: str | None, example: str) -> Row:
    (row,) = [row for row in ROWS if (row.field, row.example) == (field, example)]
    return row


# --- the tests -----------------------------------------------------------------------------------


def test_every_row_has_an_example_and_every_example_a_row() -> None:
    in_readme = {(row.field, row.example) for row in ROWS}
    assert in_readme == set(EXAMPLES) | SPECIAL
    assert len(in_readme) == len(ROWS), "two rows with the same field and example"


@pytest.mark.parametrize(("row", "rpc"), list(_cases()))
def test_the_server_answers_as_the_limits_table_says(
    shared_server: ManateeServer, shared_stub: pb_grpc.MemoryServiceStub, row: Row, rpc: str
) -> None:
    prepares_before = request_count(shared_server, MessageType.PREPARE_VM)
    if rpc == "LaunchVm":
        prepare = EXAMPLES[(row.field, row.example)]("PrepareVm")
        assert isinstance(prepare, pb.PrepareVmRequest)
        start = pb.LaunchVmRequest.Start(mem_size_bytes=prepare.mem_size_bytes)
        if prepare.HasField("init_mem_size_bytes"):
            start.init_mem_size_bytes = prepare.init_mem_size_bytes
        assert_row(launch_error(shared_stub, start), row, prefix="start.")
    else:
        request = EXAMPLES[(row.field, row.example)](rpc)
        assert_row(answer_of(call(shared_stub, rpc, request)), row)
    if 'reachedMms: "true"' not in row.limit:
        # Refused before anything reached mms.
        assert request_count(shared_server, MessageType.PREPARE_VM) == prepares_before


def test_replay_last_above_the_events_held_replays_them_all_without_an_error() -> None:
    """The README's note under the table: replay_last has a bound, not an error."""
    ring_size = 3
    server = start_server(event_ring_size=ring_size)
    try:
        with Client(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            for vm_id in range(1, 6):  # five events, of which the server keeps the last three
                with pytest.raises(ManateeRpcError):
                    client.remove_vm(vm_id)
            updates = client.watch_events(replay_last=2**32 - 1)
            replayed = []
            for update in updates:
                if update.WhichOneof("update") == "caught_up":
                    break
                replayed.append(update.event)
            updates.close()
        # All the server holds (a late server event may be among them), the newest last.
        assert len(replayed) == ring_size
        assert (replayed[-1].kind, list(replayed[-1].vm_ids)) == (pb.EVENT_KIND_REMOVE_VM, [5])
    finally:
        server.stop(grace_s=1.0)


def test_launch_vm_first_message_row(shared_stub: pb_grpc.MemoryServiceStub) -> None:
    row = row_of("start", "vm_started first")
    requests = iter([pb.LaunchVmRequest(vm_started=pb.LaunchVmRequest.VmStarted())])
    with pytest.raises(grpc.RpcError) as caught:
        next(shared_stub.LaunchVm(requests, timeout=CALL_TIMEOUT_S))
    assert_row(answer_of(caught.value), row)


def test_launch_vm_out_of_turn_row(shared_stub: pb_grpc.MemoryServiceStub) -> None:
    row = row_of("request", "a second start after reserved")
    start = pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=512 * MIB))
    # `start` twice at once: the second is judged once `reserved` is sent, whenever it came.
    stream = shared_stub.LaunchVm(iter([start, start]), timeout=CALL_TIMEOUT_S)
    assert next(stream).WhichOneof("event") == "reserved"
    with pytest.raises(grpc.RpcError) as caught:
        next(stream)
    assert_row(answer_of(caught.value), row)


def test_undecodable_bytes_row(shared_server: ManateeServer) -> None:
    row = row_of("request", "the bytes ff")
    with grpc.insecure_channel(shared_server.address) as channel:
        raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            f"/{SERVICE}/{row.rpcs[0]}"
        )
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\xff", timeout=CALL_TIMEOUT_S)
    assert_row(answer_of(caught.value), row)


def test_message_size_row(shared_stub: pb_grpc.MemoryServiceStub) -> None:
    row = row_of(None, "a 1,048,580-byte request")
    request = pb.GetBalloonStatsRequest(session="s" * MIB)
    assert request.ByteSize() == 1_048_580
    assert_row(answer_of(call(shared_stub, "GetBalloonStats", request)), row)


def test_concurrent_rpcs_row() -> None:
    """The cap is 1000 by default; a server capped at 1 shows the same refusal with one watch."""
    row = row_of(None, "one more")
    server = start_server(max_concurrent_rpcs=1)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            watch = stub.WatchBalloonStats(pb.WatchBalloonStatsRequest(), timeout=30.0)
            try:
                assert next(watch).HasField("snapshot")  # the one RPC in progress
                request = pb.GetBalloonStatsRequest()
                assert_row(answer_of(call(stub, "GetBalloonStats", request)), row)
            finally:
                watch.cancel()
    finally:
        server.stop(grace_s=1.0)


def test_request_ids_full_row() -> None:
    """4096 request ids in flight at once would take 4096 calls waiting on a stuck mms; a server
    holding at most one shows the same refusal (its text names that capacity) with one."""
    row = row_of(None, "a new id while 4096 are in flight")
    capacity = 1
    server = start_server()
    try:
        server.bridge.request_ids = RequestIds(capacity=capacity)
        with Client(server.address, timeout_s=CALL_TIMEOUT_S) as client:
            vm = client.launch_vm(512 * MIB, start_vm=lambda v, p: True, stop_vm=lambda v: None)
        simulator(server).set_message_delay(MessageType.REBALANCE_MEMORY, 60.0)
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            in_flight = stub.RebalanceMemory.future(
                _rebalance((vm.vm_id, 4096), request_id="first"), timeout=30.0
            )
            wait_until(
                lambda: request_count(server, MessageType.REBALANCE_MEMORY) == 1,
                "mms received the first rebalance (and sits on it)",
            )
            error = call(stub, "RebalanceMemory", _rebalance((vm.vm_id, 4096), request_id="new"))
            in_flight.cancel()
        expected = Row(
            row.rpcs,
            row.field,
            row.limit,
            row.example,
            row.code,
            row.reason,
            row.description.replace(f"{DEFAULT_CAPACITY} request ids", f"{capacity} request ids"),
        )
        assert expected.description != row.description
        assert_row(answer_of(error), expected)
        assert request_count(server, MessageType.REBALANCE_MEMORY) == 1  # nothing sent
    finally:
        simulator(server).set_message_delay(MessageType.REBALANCE_MEMORY, 0.0)
        server.stop(grace_s=1.0)
