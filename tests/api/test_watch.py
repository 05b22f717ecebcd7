"""WatchBalloonStats: one poll per tick for every watcher, bounded mailboxes, resets in-stream.

Also: interval validation, and a cancelled watch leaving no watcher or polling thread behind.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import grpc
import pytest
from google.protobuf import duration_pb2

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc._messages import MessageType
from manatee_grpc._stats import StatsSnapshot
from manatee_grpc._watch import SessionChanged, Watcher, WatchHub
from manatee_grpc.sim import Simulator

from .helpers import bad_request_fields
from .helpers import wait_until as _wait_until

if TYPE_CHECKING:
    WatchStream = grpc._CallIterator[pb.WatchBalloonStatsResponse]

CALL_TIMEOUT_S = 10.0


def _sim(server: ManateeServer) -> Simulator:
    assert server.simulator is not None
    return server.simulator


def _stats_reads(server: ManateeServer) -> int:
    return _sim(server).request_counts[MessageType.GET_BALLOON_STATS]


def _watch(
    stub: pb_grpc.MemoryServiceStub, interval_s: float, vm_ids: tuple[int, ...] = ()
) -> WatchStream:
    interval = duration_pb2.Duration()
    interval.FromNanoseconds(round(interval_s * 1e9))
    request = pb.WatchBalloonStatsRequest(vm_ids=list(vm_ids), interval=interval)
    return stub.WatchBalloonStats(request, timeout=CALL_TIMEOUT_S)


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("watch-")]


def test_watchers_of_one_interval_share_each_poll(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    watchers = 3
    wanted = 6
    reads_before = _stats_reads(server)
    counts = [0] * watchers
    streams = [_watch(stub, 0.1) for _ in range(watchers)]

    def consume(index: int, stream: WatchStream) -> None:
        for message in stream:
            if message.WhichOneof("event") == "snapshot":
                assert [entry.vm_id for entry in message.snapshot.stats] == [0]
                counts[index] += 1
                if counts[index] >= wanted:
                    stream.cancel()
                    return

    threads = [
        threading.Thread(target=consume, args=(i, s), daemon=True) for i, s in enumerate(streams)
    ]
    for thread in threads:
        thread.start()
    _wait_until(lambda: server.watch_hub.watcher_count() == watchers)
    for thread in threads:
        thread.join(CALL_TIMEOUT_S)
        assert not thread.is_alive()
    reads = _stats_reads(server) - reads_before

    # One mms read per tick: the reads track one watcher's snapshots, not the sum of all.
    assert min(counts) >= wanted
    assert reads <= max(counts) + 2
    assert sum(counts) >= watchers * wanted > reads + wanted


@pytest.mark.parametrize("interval_s", [0.099, 0.001])
def test_interval_below_100ms_is_invalid_argument(
    stub: pb_grpc.MemoryServiceStub, interval_s: float
) -> None:
    stream = _watch(stub, interval_s)
    with pytest.raises(grpc.RpcError) as raised:
        next(stream)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "interval" in bad_request_fields(raised.value)
    assert "interval" in (raised.value.details() or "")


def test_slow_watcher_gets_latest_snapshot_and_dropped_count() -> None:
    offered = 10
    calls = 0
    gate = threading.Event()
    lock = threading.Lock()

    def read(vm_ids: tuple[int, ...]) -> StatsSnapshot:
        nonlocal calls
        with lock:
            calls += 1
            number = calls
        if number > offered:
            gate.wait(CALL_TIMEOUT_S)  # hold the ticker: exactly `offered` snapshots went out
        return _snapshot(number)

    hub = WatchHub(read)
    watcher = hub.subscribe((), 0.005)
    try:
        _wait_until(lambda: calls > offered)
        update = watcher.take(timeout_s=0)
        assert update is not None and update.snapshot is not None
        # The newest one, with every earlier one counted as dropped, not queued.
        assert update.snapshot.session == offered
        assert update.dropped_updates == offered - 1
        assert watcher.take(timeout_s=0) is None
    finally:
        gate.set()
        hub.unsubscribe(watcher)
        hub.close()


def test_watcher_that_keeps_up_drops_nothing(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    stream = _watch(stub, 0.1)
    dropped = []
    for _, message in zip(range(3), stream, strict=False):
        dropped.append(message.dropped_updates)
    stream.cancel()
    assert dropped == [0, 0, 0]


def test_session_reset_arrives_in_stream_before_new_session_snapshots(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    stream = _watch(stub, 0.1)
    messages = iter(stream)
    first = next(messages)
    assert first.WhichOneof("event") == "snapshot"
    old_session = first.snapshot.session

    assert _sim(server).drop_connection()

    reset: pb.SessionReset | None = None
    for message in messages:
        if message.WhichOneof("event") == "session_reset":
            reset = message.session_reset
            break
        # Until the reset, only snapshots of the old session.
        assert message.snapshot.session == old_session
    assert reset is not None
    assert reset.previous_session == old_session
    assert reset.session > old_session
    after = [next(messages) for _ in range(2)]
    stream.cancel()
    assert [m.WhichOneof("event") for m in after] == ["snapshot", "snapshot"]
    assert [m.snapshot.session for m in after] == [reset.session] * 2
    assert [[e.vm_id for e in m.snapshot.stats] for m in after] == [[0], [0]]


def _snapshot(session: int) -> StatsSnapshot:
    return StatsSnapshot(session=session, read_time_unix_s=0.0, stats=(), missing_vm_ids=())


def test_no_old_session_snapshot_is_delivered_after_the_reset() -> None:
    watcher = Watcher((), 1.0)
    watcher.offer(_snapshot(1))  # pending, not yet taken, when the session changes
    watcher.offer_reset(SessionChanged(previous_session=1, session=2))
    watcher.offer(_snapshot(1))  # a poll that read the old session and finished late

    update = watcher.take(timeout_s=0)
    assert update is not None and update.reset == SessionChanged(1, 2)
    assert watcher.take(timeout_s=0) is None

    watcher.offer(_snapshot(2))
    update = watcher.take(timeout_s=0)
    assert update is not None and update.snapshot is not None
    assert update.snapshot.session == 2


def test_cancelled_watch_frees_watcher_and_stops_polling(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    stream = _watch(stub, 0.1)
    next(stream)
    assert server.watch_hub.watcher_count() == 1
    assert len(_watch_threads()) == 1

    stream.cancel()

    _wait_until(lambda: server.watch_hub.watcher_count() == 0)
    _wait_until(lambda: not _watch_threads())
    # With the ticker gone, nothing reads stats any more.
    reads = _stats_reads(server)
    assert server.watch_hub.polls() == 0
    stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
    assert _stats_reads(server) == reads
