"""WatchEvents and the audit file against a live server: one event per state-changing call,
with who asked; replay; a slow watcher; the audit file across a restart."""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest

from manatee_grpc import Client, ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.cli._events_view import details_of

from .conftest import start_server
from .event_helpers import (
    last_sequence,
    new_events,
    recorded_events,
    wait_mms_available_recorded,
)
from .helpers import bad_request_fields, error_info, wait_until

MEM_BYTES = 512 << 20
LOOPBACK_PEER = re.compile(r"^ipv4:127\.0\.0\.1:\d+$")


@pytest.fixture
def client(server: ManateeServer) -> Iterator[Client]:
    with Client(server.address) as client:
        wait_mms_available_recorded(client)
        yield client


def _one_event(server: ManateeServer, after: int, kind: pb.EventKind.ValueType) -> pb.Event:
    events = new_events(server, after)
    assert [pb.EventKind.Name(e.kind) for e in events] == [pb.EventKind.Name(kind)]
    return events[0]


def test_every_state_changing_rpc_is_one_event_with_the_callers_address(
    server: ManateeServer, client: Client
) -> None:
    seen: list[pb.Event] = []

    def expect(kind: pb.EventKind.ValueType) -> pb.Event:
        event = _one_event(server, last, kind)
        seen.append(event)
        return event

    last = last_sequence(client)
    prepared = client.prepare_vm(MEM_BYTES)
    event = expect(pb.EVENT_KIND_PREPARE_VM)
    assert list(event.vm_ids) == [prepared.vm_id] and event.session == prepared.session
    assert details_of(event)["reserved"] is True

    last = event.sequence
    client.finish_add_vm(prepared.vm_id)
    assert list(expect(pb.EVENT_KIND_FINISH_ADD_VM).vm_ids) == [prepared.vm_id]

    last = seen[-1].sequence
    # A preview (validate_only) changes nothing and is no event: the one below is the call's.
    client.rebalance_memory({prepared.vm_id: 64 << 20}, validate_only=True)
    answer = client.rebalance_memory({prepared.vm_id: 64 << 20})
    details = details_of(expect(pb.EVENT_KIND_REBALANCE_MEMORY))
    assert details["requested_deltas"] == [{"vm_id": prepared.vm_id, "delta_bytes": 64 << 20}]
    assert details["actual_deltas"] == [
        {"vm_id": d.vm_id, "delta_bytes": d.delta_bytes} for d in answer.actual_deltas
    ]
    assert details["fully_applied"] is answer.fully_applied

    last = seen[-1].sequence
    client.remove_vm(prepared.vm_id)
    assert list(expect(pb.EVENT_KIND_REMOVE_VM).vm_ids) == [prepared.vm_id]

    # A refused call is an event too, with its status.
    last = seen[-1].sequence
    with pytest.raises(ManateeRpcError):
        client.remove_vm(99)
    refused = expect(pb.EVENT_KIND_REMOVE_VM)
    assert (refused.error.code, refused.error.reason) == ("NOT_FOUND", "VM_NOT_FOUND")

    last = seen[-1].sequence
    launched = client.launch_vm(MEM_BYTES, start_vm=lambda vm_id, path: True, stop_vm=print)
    event = expect(pb.EVENT_KIND_LAUNCH_LAUNCHED)
    assert list(event.vm_ids) == [launched.vm_id] and not event.HasField("error")

    last = seen[-1].sequence
    with pytest.raises(ManateeRpcError):
        client.launch_vm(MEM_BYTES, start_vm=lambda vm_id, path: False, stop_vm=print)
    failed = expect(pb.EVENT_KIND_LAUNCH_FAILED)
    assert (failed.error.code, failed.error.reason) == ("FAILED_PRECONDITION", "VM_START_FAILED")

    # Every one says who asked: this client's address (one channel, one peer).
    assert all(e.caller.origin == "client" for e in seen)
    assert all(LOOPBACK_PEER.match(e.caller.peer) for e in seen), [e.caller.peer for e in seen]
    assert len({e.caller.peer for e in seen}) == 1
    assert all(e.caller.certificate_subject == "" for e in seen)  # plaintext: no certificate


def test_a_request_refused_as_invalid_argument_changes_nothing_and_is_no_event(
    server: ManateeServer, client: Client, stub: pb_grpc.MemoryServiceStub
) -> None:
    last = last_sequence(client)
    for call in (
        lambda: stub.RemoveVm(pb.RemoveVmRequest(vm_id=-1), timeout=10),
        lambda: stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=0), timeout=10),
        lambda: stub.RebalanceMemory(pb.RebalanceMemoryRequest(), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as refused:
            call()
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    server.events.publish_policy_decision({"marker": True}, "hold")  # type: ignore[union-attr]
    _one_event(server, last, pb.EVENT_KIND_POLICY_DECISION)


def test_each_policy_decision_published_through_the_core_api_is_one_event(
    server: ManateeServer, client: Client
) -> None:
    assert server.events is not None
    last = last_sequence(client)
    server.events.publish_policy_decision(
        {"available_bytes": {"1": 1 << 30, "2": 1 << 20}, "pending_start": False},
        {"rebalance": {"1": 4 << 20, "2": -(4 << 20)}},
        vm_ids=(1, 2),
    )
    server.events.publish_policy_decision({"pending_start": True}, "hold")
    events = new_events(server, last, at_least=2)
    assert [e.kind for e in events] == [pb.EVENT_KIND_POLICY_DECISION] * 2
    assert all(e.caller.origin == "policy" and e.caller.peer == "" for e in events)
    assert details_of(events[0]) == {
        "inputs": {"available_bytes": {"1": 1 << 30, "2": 1 << 20}, "pending_start": False},
        "action": {"rebalance": {"1": 4 << 20, "2": -(4 << 20)}},
    }
    assert details_of(events[1])["action"] == "hold"


def test_a_watch_replays_the_last_n_events_then_follows_live(
    server: ManateeServer, client: Client
) -> None:
    assert server.events is not None
    for index in range(6):
        server.events.publish_policy_decision({"index": index}, "hold")
    wait_until(lambda: len(recorded_events(client)) >= 6, "six decisions recorded")
    newest = last_sequence(client)
    stream = client.watch_events(3)
    replayed = [next(stream) for _ in range(4)]
    assert [m.WhichOneof("update") for m in replayed] == ["event"] * 3 + ["caught_up"]
    assert [m.event.sequence for m in replayed[:3]] == [newest - 2, newest - 1, newest]
    assert replayed[3].caught_up.last_sequence == newest
    with pytest.raises(ManateeRpcError):
        client.remove_vm(42)
    live = next(stream)
    assert live.event.sequence == newest + 1 and live.event.kind == pb.EVENT_KIND_REMOVE_VM
    stream.close()


def test_a_kinds_filter_keeps_only_those_kinds_and_an_unknown_kind_is_invalid_argument(
    server: ManateeServer, client: Client, stub: pb_grpc.MemoryServiceStub
) -> None:
    with pytest.raises(ManateeRpcError):
        client.remove_vm(42)
    stream = client.watch_events(1000, [pb.EVENT_KIND_REMOVE_VM])
    first = next(stream)
    assert first.event.kind == pb.EVENT_KIND_REMOVE_VM
    assert next(stream).WhichOneof("update") == "caught_up"
    stream.close()

    unknown_kind = cast(pb.EventKind.ValueType, 999)
    call = stub.WatchEvents(pb.WatchEventsRequest(kinds=[pb.EVENT_KIND_REMOVE_VM, unknown_kind]))
    with pytest.raises(grpc.RpcError) as refused:
        next(call)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_fields(refused.value) == ["kinds[1]"]
    assert error_info(refused.value).reason == "INVALID_ARGUMENT"


BATCHES = 20
BATCH = 100
PAD = "x" * 4096  # 8 MB in all: far past what a watcher that never reads can take in


def test_a_slow_watcher_does_not_stall_others_and_what_it_misses_is_counted(
    server: ManateeServer,
) -> None:
    assert server.events is not None
    kinds = [pb.EVENT_KIND_POLICY_DECISION]
    # The slow watcher's channel keeps HTTP/2's initial 64 KiB window (no BDP growth).
    with (
        grpc.insecure_channel(server.address, options=[("grpc.http2.bdp_probe", 0)]) as slow_ch,
        grpc.insecure_channel(server.address) as fast_ch,
    ):
        slow = pb_grpc.MemoryServiceStub(slow_ch).WatchEvents(
            pb.WatchEventsRequest(kinds=kinds), timeout=120
        )
        assert next(slow).WhichOneof("update") == "caught_up"
        fast_seen: list[int] = []
        fast = pb_grpc.MemoryServiceStub(fast_ch).WatchEvents(pb.WatchEventsRequest(kinds=kinds))
        assert next(fast).WhichOneof("update") == "caught_up"

        def read_fast() -> None:
            try:
                for message in fast:
                    assert message.WhichOneof("update") == "event", message
                    fast_seen.append(int(details_of(message.event)["inputs"]["n"]))
            except grpc.RpcError:
                pass  # cancelled below, once it has read them all

        def has_read(count: int) -> bool:
            return len(fast_seen) >= count

        reader = threading.Thread(target=read_fast, daemon=True)
        reader.start()
        # The fast watcher keeps up with every batch while the slow one reads nothing.
        for batch in range(BATCHES):
            for index in range(BATCH):
                server.events.publish_policy_decision({"n": batch * BATCH + index, "pad": PAD}, "x")
            wait_until(functools.partial(has_read, (batch + 1) * BATCH), "the fast watcher", 60)
        assert fast_seen == list(range(BATCHES * BATCH))  # all of them, in order
        fast.cancel()
        reader.join(10)

        # The slow one lost its oldest events, was told how many, and then got the newest.
        received: list[int] = []
        missed = 0
        while len(received) + missed < BATCHES * BATCH:
            message = next(slow)
            if message.WhichOneof("update") == "events_missed":
                missed += message.events_missed.count
            else:
                received.append(int(details_of(message.event)["inputs"]["n"]))
        slow.cancel()
    assert missed > 0
    assert received == sorted(received) and received[-1] == BATCHES * BATCH - 1
    assert len(received) < BATCHES * BATCH // 2  # bounded: it was not all kept for it


def _audit_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_file_survives_a_restart_appended_and_numbered_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    server = start_server(audit_file=str(path))
    try:
        with Client(server.address) as client:
            prepared = client.prepare_vm(MEM_BYTES)
            client.remove_vm(prepared.vm_id)
    finally:
        server.stop(grace_s=1.0)
    before = path.read_bytes()
    first_run = _audit_lines(path)
    by_clients = [line["kind"] for line in first_run if line["caller"]["origin"] == "client"]  # type: ignore[index]
    assert by_clients == ["PREPARE_VM", "REMOVE_VM"]

    server = start_server(audit_file=str(path))
    try:
        with Client(server.address) as client:
            with pytest.raises(ManateeRpcError):
                client.remove_vm(7)
            # The restarted server numbers on from the file, on the wire too.
            assert recorded_events(client)[0].sequence == len(first_run) + 1
    finally:
        server.stop(grace_s=1.0)
    after = path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)  # appended, never truncated
    lines = _audit_lines(path)  # every line is one valid JSON object
    assert [line["sequence"] for line in lines] == list(range(1, len(lines) + 1))
    assert lines[len(first_run)]["kind"] == "SERVER_STARTED"
    (removal,) = [line for line in lines[len(first_run) :] if line["kind"] == "REMOVE_VM"]
    assert removal["vm_ids"] == [7]
    assert removal["error"]["reason"] == "VM_NOT_FOUND"  # type: ignore[index]
    caller = removal["caller"]
    assert caller["origin"] == "client" and LOOPBACK_PEER.match(caller["peer"])  # type: ignore[index]


def test_lease_expiry_session_resets_and_mms_outages_are_server_events(tmp_path: Path) -> None:
    server = start_server(prepare_lease_s=0.2)
    try:
        with Client(server.address) as client:
            wait_mms_available_recorded(client)
            last = last_sequence(client)
            prepared = client.prepare_vm(MEM_BYTES)
            events = new_events(server, last, at_least=2)
            by_kind = {e.kind: e for e in events}
            assert len(events) == 2 and set(by_kind) == {
                pb.EVENT_KIND_PREPARE_VM,
                pb.EVENT_KIND_START_LEASE_EXPIRED,
            }
            expired = by_kind[pb.EVENT_KIND_START_LEASE_EXPIRED]
            assert list(expired.vm_ids) == [prepared.vm_id] and expired.caller.origin == "server"

            last = events[-1].sequence
            assert server.reset_mms("test")
            events = new_events(server, last, at_least=3)
            kinds = [e.kind for e in events[:3]]
            assert kinds == [
                pb.EVENT_KIND_MMS_UNAVAILABLE,
                pb.EVENT_KIND_SESSION_RESET,
                pb.EVENT_KIND_MMS_AVAILABLE,
            ]
            reset = events[1]
            assert details_of(reset)["previous_session"] == prepared.session
            assert reset.session != prepared.session
    finally:
        server.stop(grace_s=1.0)


def test_a_launch_that_waits_is_queued_then_one_end_event_and_a_caller_who_leaves_aborts(
    server: ManateeServer, client: Client, stub: pb_grpc.MemoryServiceStub
) -> None:
    from .test_launch import launch

    last = last_sequence(client)
    with launch(stub) as first:
        first.start(MEM_BYTES)
        first_vm_id = first.expect_reserved().vm_id
        with launch(stub) as queued:
            queued.start(MEM_BYTES)
            wait_until(lambda: server.bridge.slot.launches_waiting() == 1, "the launch queues")
            assert queued.call.cancel()
        events = new_events(server, last, at_least=2)
        assert [e.kind for e in events] == [
            pb.EVENT_KIND_LAUNCH_QUEUED,
            pb.EVENT_KIND_LAUNCH_ABORTED,
        ]
        assert details_of(events[0])["launches_waiting"] == 1
        assert events[1].error.code == "CANCELLED"
        first.vm_started()
        first.expect("launched")
        first.expect_ok_end()
    events = new_events(server, events[-1].sequence)
    assert [e.kind for e in events] == [pb.EVENT_KIND_LAUNCH_LAUNCHED]
    assert list(events[0].vm_ids) == [first_vm_id]
