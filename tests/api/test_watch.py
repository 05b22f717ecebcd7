"""WatchBalloonStats: one poll per tick for every watcher, bounded mailboxes, resets in-stream.

Also: interval validation, and a cancelled watch leaving no watcher or polling thread behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TYPE_CHECKING

import grpc
import pytest
from faults.helpers import KillableMms
from google.protobuf import duration_pb2

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.core._errors import MmsConnectionLostError, MmsHungError, MmsUnavailableError
from manatee_grpc.core._stats import StatsSnapshot
from manatee_grpc.core._watch import SessionChanged, Watcher, WatchHub, round_interval_s
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Simulator

from .conftest import start_server
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

    # One mms read per tick: the reads track one watcher's snapshots, not the sum of all
    # (plus, at most, one first-snapshot read for each watcher that joined a running ticker).
    assert min(counts) >= wanted
    assert reads <= max(counts) + 2 + (watchers - 1)
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

    async def scenario() -> None:
        calls = 0
        gate = asyncio.Event()
        held = asyncio.Event()

        async def read(vm_ids: tuple[int, ...]) -> StatsSnapshot:
            nonlocal calls
            calls += 1
            if calls > offered:
                held.set()
                await gate.wait()  # hold the ticker: exactly `offered` snapshots went out
            return _snapshot(calls)

        hub = WatchHub(read)
        watcher = hub.subscribe((), 0.1)
        try:
            await asyncio.wait_for(held.wait(), CALL_TIMEOUT_S)
            update = watcher.take_now()
            assert update is not None and update.snapshot is not None
            # The newest one, with every earlier one counted as dropped, not queued.
            assert update.snapshot.session == offered
            assert update.dropped_updates == offered - 1
            assert watcher.take_now() is None
        finally:
            gate.set()
            hub.unsubscribe(watcher)
            hub.close()

    asyncio.run(scenario())


def test_intervals_are_rounded_to_100ms_so_close_watchers_share_a_ticker() -> None:
    assert round_interval_s(0.1) == pytest.approx(0.1)
    assert round_interval_s(0.149) == pytest.approx(0.1)
    assert round_interval_s(1.26) == pytest.approx(1.3)
    assert round_interval_s(3600.0) == pytest.approx(3600.0)

    async def scenario() -> int:
        async def read(vm_ids: tuple[int, ...]) -> StatsSnapshot:
            return _snapshot(1)

        hub = WatchHub(read)
        for interval_s in (1.0, 1.01, 0.99, 1.04, 2.0):
            hub.subscribe((), interval_s)
        try:
            return hub.ticker_count()
        finally:
            hub.close()

    assert asyncio.run(scenario()) == 2


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
        if message.WhichOneof("event") == "mms_unavailable":
            continue  # a poll between the drop and the redial: the outage, told in-stream
        # Until the reset, only snapshots of the old session.
        assert message.snapshot.session == old_session
    assert reset is not None
    assert reset.previous_session == old_session
    assert reset.session not in ("", old_session)
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

    update = watcher.take_now()
    assert update is not None and update.reset == SessionChanged(1, 2)
    assert watcher.take_now() is None

    watcher.offer(_snapshot(2))
    update = watcher.take_now()
    assert update is not None and update.snapshot is not None
    assert update.snapshot.session == 2


def test_cancelled_watch_frees_watcher_and_stops_polling(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    stream = _watch(stub, 0.1)
    next(stream)
    assert server.watch_hub.watcher_count() == 1
    assert server.watch_hub.ticker_count() == 1

    stream.cancel()

    _wait_until(lambda: server.watch_hub.watcher_count() == 0)
    _wait_until(lambda: server.watch_hub.ticker_count() == 0)
    # With the ticker gone, nothing reads stats any more.
    reads = _stats_reads(server)
    assert server.watch_hub.polls() == 0
    stub.ListVms(pb.ListVmsRequest(), timeout=CALL_TIMEOUT_S)
    assert _stats_reads(server) == reads


# --- every watcher's first snapshot at once; outages in the stream (I9) -----------------------


def test_a_new_watcher_of_an_hourly_interval_gets_its_first_snapshot_at_once(
    server: ManateeServer, stub: pb_grpc.MemoryServiceStub
) -> None:
    first = _watch(stub, 3600.0)
    try:
        assert next(first).WhichOneof("event") == "snapshot"
        # The interval's ticker now sleeps for an hour; a watcher that joins must not wait.
        second = _watch(stub, 3600.0, vm_ids=(0,))
        try:
            message = next(second)  # within the call's deadline (CALL_TIMEOUT_S), not an hour
            assert message.WhichOneof("event") == "snapshot"
            assert [entry.vm_id for entry in message.snapshot.stats] == [0]
        finally:
            second.cancel()
    finally:
        first.cancel()


def test_an_mms_outage_is_an_event_and_the_watch_goes_on_after_it() -> None:
    mms = KillableMms()
    server = start_server(mms=mms.address)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            interval = duration_pb2.Duration()
            interval.FromMilliseconds(100)
            request = pb.WatchBalloonStatsRequest(vm_ids=[0], interval=interval)
            stream = stub.WatchBalloonStats(request, timeout=30)
            try:
                old = next(stream).snapshot.session
                killed_s = time.time()
                mms.kill()
                # Snapshots read before the kill may come first; then the outage, once.
                while (message := next(stream)).WhichOneof("event") == "snapshot":
                    assert message.snapshot.session == old
                assert message.WhichOneof("event") == "mms_unavailable", message
                outage = message.mms_unavailable
                assert outage.reason in ("MMS_CONNECTION_LOST", "MMS_UNAVAILABLE")
                assert outage.message
                assert outage.since.ToNanoseconds() >= int(killed_s * 1e9)
                mms.restart()
                # The stream goes on: the reset, then the new session's snapshots.
                message = next(stream)
                assert message.WhichOneof("event") == "session_reset", message
                assert message.session_reset.previous_session == old
                new = message.session_reset.session
                after = next(stream)
                assert after.WhichOneof("event") == "snapshot"
                assert after.snapshot.session == new != old
            finally:
                stream.cancel()
    finally:
        server.stop(grace_s=1.0)
        mms.close()


def test_an_outage_is_one_event_and_a_snapshot_read_before_it_is_not_sent_after_it() -> None:
    watcher = Watcher((), 1.0)
    watcher.offer(_snapshot(1))  # not yet taken when reads start to fail
    watcher.offer(MmsConnectionLostError("lost the mms connection"))
    watcher.offer(MmsUnavailableError("cannot connect to mms"))  # the same outage

    update = watcher.take_now()
    assert update is not None and update.outage is not None
    assert update.outage.error.reason == "MMS_CONNECTION_LOST"
    assert update.dropped_updates == 1  # the stale snapshot
    assert watcher.take_now() is None

    watcher.offer(_snapshot(1))  # recovered
    update = watcher.take_now()
    assert update is not None and update.snapshot is not None
    watcher.offer(MmsHungError("mms did not answer"))  # a new outage: a new event
    update = watcher.take_now()
    assert update is not None and update.outage is not None
    assert update.outage.error.reason == "MMS_HUNG"


def test_a_read_that_failed_in_a_session_already_reported_reset_is_no_outage() -> None:
    watcher = Watcher((), 1.0)
    # A read starts (no session change yet), the link resets, the reset is told...
    watcher.offer_reset(SessionChanged(previous_session=1, session=2), epoch=1)
    # ... and only then does the read's failure arrive: it was that reset, already told.
    watcher.offer(MmsConnectionLostError("lost the mms connection"), read_epoch=0)
    update = watcher.take_now()
    assert update is not None and update.reset == SessionChanged(1, 2)
    assert watcher.take_now() is None
    # A read of the new session that fails is an outage.
    watcher.offer(MmsUnavailableError("cannot connect to mms"), read_epoch=1)
    update = watcher.take_now()
    assert update is not None and update.outage is not None
