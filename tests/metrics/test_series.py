"""Each series moves as calls go through a real server on the simulator, seen by a real scrape."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from manatee_grpc import ManateeServer, ServerConfig
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType

from .conftest import Scrape, metrics_address, scrape, scrape_until, simulator

PER_VM_SERIES = ("manatee_vm_balloon_bytes", "manatee_vm_free_bytes", "manatee_vm_available_bytes")


def per_vm_ids(current: Scrape) -> dict[str, set[str]]:
    return {name: current.label_values(name, "vm_id") for name in PER_VM_SERIES}


def on_every_series(*vm_ids: str) -> dict[str, set[str]]:
    return {name: set(vm_ids) for name in PER_VM_SERIES}


def start_vm(stub: pb_grpc.MemoryServiceStub, mem_size_bytes: int = 512 * MIB) -> int:
    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=mem_size_bytes), timeout=5)
    stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=5)
    return prepared.vm_id


def test_link_gauges_follow_a_session_reset(server: ManateeServer) -> None:
    address = metrics_address(server)
    first = scrape(address)
    assert first.value("manatee_mms_connected") == 1
    assert first.value("manatee_mms_session") == 1

    assert simulator(server).drop_connection()
    scrape_until(
        address,
        lambda s: s.value("manatee_mms_session") == 2 and s.value("manatee_mms_connected") == 1,
        "the reconnect shows as session 2, connected",
    )


def test_connected_is_0_while_mms_is_unreachable(tmp_path: Path) -> None:
    server = ManateeServer(
        ServerConfig(
            listen="127.0.0.1:0",
            mms=f"unix://{tmp_path / 'nobody-listens.sock'}",
            metrics_listen="127.0.0.1:0",
            mms_backoff_initial_s=0.01,
            mms_backoff_max_s=0.05,
        )
    ).start()
    try:
        current = scrape(metrics_address(server))
        assert current.value("manatee_mms_connected") == 0
        assert current.value("manatee_mms_session") == 0
    finally:
        server.stop(grace_s=1.0)


def test_reservations_pending_follow_prepare_and_remove(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    address = metrics_address(server)
    assert scrape(address).value("manatee_reservations_pending") == 0

    prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=5)
    assert prepared.reserved
    scrape_until(
        address, lambda s: s.value("manatee_reservations_pending") == 1, "PrepareVm reserved"
    )

    stub.RemoveVm(pb.RemoveVmRequest(vm_id=prepared.vm_id), timeout=5)
    scrape_until(
        address, lambda s: s.value("manatee_reservations_pending") == 0, "RemoveVm released it"
    )


def test_per_vm_gauges_come_with_stats_and_go_with_the_vm(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    address = metrics_address(server)
    vm_id = start_vm(stub)
    # Nothing read stats yet, and a scrape never asks mms itself.
    assert per_vm_ids(scrape(address)) == on_every_series()
    reads_before = simulator(server).request_counts.get(MessageType.GET_BALLOON_STATS, 0)

    stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    current = scrape(address)
    assert per_vm_ids(current) == on_every_series("0", str(vm_id))
    for entry in stats.stats:
        labels = {"vm_id": str(entry.vm_id)}
        assert current.value("manatee_vm_balloon_bytes", **labels) == entry.balloon_actual_bytes
        assert current.value("manatee_vm_free_bytes", **labels) == entry.free_memory_bytes
        assert current.value("manatee_vm_available_bytes", **labels) == (
            entry.available_memory_bytes
        )
    # Scraping sent nothing to mms: only the one read the RPC made.
    assert simulator(server).request_counts[MessageType.GET_BALLOON_STATS] == reads_before + 1

    stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=5)
    scrape_until(
        address,
        lambda s: per_vm_ids(s) == on_every_series("0"),
        f"VM {vm_id}'s series are gone after RemoveVm",
    )

    assert simulator(server).drop_connection()
    scrape_until(
        address,
        lambda s: s.value("manatee_mms_session") == 2 and per_vm_ids(s) == on_every_series(),
        "the session reset dropped every VM's series",
    )


def test_a_vm_mms_gives_no_stats_for_loses_its_series(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    address = metrics_address(server)
    vm_id = start_vm(stub)
    stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    assert per_vm_ids(scrape(address)) == on_every_series("0", str(vm_id))

    simulator(server).fail_stats(vm_id)
    stats = stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    assert list(stats.missing_vm_ids) == [vm_id]
    # A value from an earlier read would pass for a current one.
    assert per_vm_ids(scrape(address)) == on_every_series("0")


def test_mms_round_trip_histogram_times_each_message(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    address = metrics_address(server)
    stats_type = {"message_type": "GET_BALLOON_STATS"}
    before = scrape(address)
    count_before = before.value("manatee_mms_round_trip_seconds_count", **stats_type) or 0.0
    sum_before = before.value("manatee_mms_round_trip_seconds_sum", **stats_type) or 0.0

    # A slow answer must land in a slow bucket: the histogram measures the real round trip.
    delay_s = 0.05
    simulator(server).set_message_delay(MessageType.GET_BALLOON_STATS, delay_s)
    for _ in range(3):
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    after = scrape_until(
        address,
        lambda s: s.value("manatee_mms_round_trip_seconds_count", **stats_type) == count_before + 3,
        "three more GET_BALLOON_STATS round trips",
    )
    sum_after = after.value("manatee_mms_round_trip_seconds_sum", **stats_type)
    assert sum_after is not None
    assert sum_after - sum_before >= 3 * delay_s
    fast = after.value("manatee_mms_round_trip_seconds_bucket", le="0.025", **stats_type)
    slow = after.value("manatee_mms_round_trip_seconds_bucket", le="+Inf", **stats_type)
    assert (fast, slow) == (count_before, count_before + 3)

    start_vm(stub)
    scrape_until(
        address,
        lambda s: (
            s.value("manatee_mms_round_trip_seconds_count", message_type="PREPARE_VM") == 1
            and s.value("manatee_mms_round_trip_seconds_count", message_type="FINISH_ADD_VM") == 1
        ),
        "one PREPARE_VM and one FINISH_ADD_VM round trip",
    )


def test_rpc_series_count_and_time_calls_through_the_server(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    """Needs the servicer to call Metrics.observe_rpc with each call's final status."""
    address = metrics_address(server)
    ok = {"grpc_method": "GetBalloonStats", "grpc_code": "OK"}
    not_found = {"grpc_method": "RemoveVm", "grpc_code": "NOT_FOUND"}
    before = scrape(address)

    stub.GetBalloonStats(pb.GetBalloonStatsRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as failed:
        stub.RemoveVm(pb.RemoveVmRequest(vm_id=99), timeout=5)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND

    def moved(s: Scrape) -> bool:
        def grew(name: str, **labels: str) -> bool:
            return (s.value(name, **labels) or 0) == (before.value(name, **labels) or 0) + 1

        return (
            grew("manatee_grpc_server_handled_total", **ok)
            and grew("manatee_grpc_server_handled_total", **not_found)
            and grew("manatee_grpc_server_handling_seconds_count", grpc_method="GetBalloonStats")
            and grew("manatee_grpc_server_handling_seconds_count", grpc_method="RemoveVm")
        )

    scrape_until(address, moved, "one OK GetBalloonStats and one NOT_FOUND RemoveVm counted")


LEFT_LAUNCHES = 50


def _until_reserved(call: Iterator[pb.LaunchVmResponse]) -> Iterator[pb.LaunchVmResponse]:
    for response in call:
        yield response
        if response.WhichOneof("event") == "reserved":
            return


def test_launch_streams_whose_client_left_count_as_cancelled(server: ManateeServer) -> None:
    # Each client opens its own connection, starts a launch, reads `reserved` (so the server
    # is surely in the launch) and hangs up without a word. The server hears the end of the
    # client's stream before the cancellation; counted at once, the launch read as ABORTED
    # (or INVALID_ARGUMENT before `start`), when what the client saw was CANCELLED.
    unblock: list[queue.Queue[None]] = []
    try:
        for _ in range(LEFT_LAUNCHES):
            hold: queue.Queue[None] = queue.Queue()
            unblock.append(hold)

            def requests(hold: queue.Queue[None] = hold) -> Iterator[pb.LaunchVmRequest]:
                yield pb.LaunchVmRequest(start=pb.LaunchVmRequest.Start(mem_size_bytes=256 * MIB))
                hold.get()  # the client says nothing more: it leaves

            with grpc.insecure_channel(server.address) as channel:
                call = pb_grpc.MemoryServiceStub(channel).LaunchVm(requests(), timeout=30)
                # The launch before may still hold the start (its hang-up not yet seen): this
                # one is then told it queued before it gets `reserved`.
                events = [response.WhichOneof("event") for response in _until_reserved(call)]
                assert set(events[:-1]) <= {"queued"} and events[-1] == "reserved", events
    finally:
        for hold in unblock:
            hold.put(None)

    def launch_codes(current: Scrape) -> dict[str, float]:
        series = current.samples.get("manatee_grpc_server_handled_total", {})
        return {
            dict(labels)["grpc_code"]: value
            for labels, value in series.items()
            if dict(labels)["grpc_method"] == "LaunchVm"
        }

    current = scrape_until(
        metrics_address(server),
        lambda s: sum(launch_codes(s).values()) >= LEFT_LAUNCHES,
        f"all {LEFT_LAUNCHES} launches are counted",
        timeout_s=60.0,
    )
    assert launch_codes(current) == {"CANCELLED": LEFT_LAUNCHES}


class _FullDisk:
    """An audit file's raw file on a disk that has filled up."""

    def __init__(self, real: object) -> None:
        self.real = real

    def write(self, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


def test_audit_lines_lost_to_a_full_disk_are_counted_and_the_server_goes_on(
    tmp_path: Path,
) -> None:
    from api.conftest import start_server

    path = tmp_path / "audit.jsonl"
    server = start_server(metrics_listen="127.0.0.1:0", audit_file=str(path))
    try:
        address = metrics_address(server)
        assert scrape(address).value("manatee_audit_write_failures_total") == 0
        assert server.events is not None
        audit = server.events._audit
        assert audit is not None
        audit._file = _FullDisk(audit._file)  # type: ignore[assignment]
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            for vm_id in (98, 99):
                with pytest.raises(grpc.RpcError) as caught:
                    stub.RemoveVm(pb.RemoveVmRequest(vm_id=vm_id), timeout=10)
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # answered as ever
            scrape_until(
                address,
                lambda current: current.value("manatee_audit_write_failures_total") == 2,
                "both events' lines counted as lost",
            )
            # Still serving: a state-changing call works and is in the ring.
            prepared = stub.PrepareVm(pb.PrepareVmRequest(mem_size_bytes=512 * MIB), timeout=10)
            assert prepared.reserved
        assert any(e.vm_ids == (99,) for e in server.events.events())
    finally:
        server.stop(grace_s=1.0)
