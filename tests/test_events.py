"""The event log on its own: ring, numbering, replay, bounded fan-out and the audit file."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import pytest

from manatee_grpc.core._errors import VmNotFoundError
from manatee_grpc.core._events import (
    POLICY,
    SERVER,
    AuditFile,
    Caller,
    CaughtUp,
    Event,
    EventKind,
    EventLog,
    Missed,
    Origin,
    event_error,
)

ALICE = Caller(Origin.CLIENT, "ipv4:127.0.0.1:4000", "CN=alice")


def _clock() -> float:
    return 1_700_000_000.25


def _log(**kwargs: object) -> EventLog:
    return EventLog(clock=_clock, **kwargs)  # type: ignore[arg-type]


def _drain(subscription: object) -> list[object]:
    items = []
    while (item := subscription.take_nowait()) is not None:  # type: ignore[attr-defined]
        items.append(item)
    return items


def test_events_are_numbered_in_order_and_the_ring_keeps_the_last_n() -> None:
    log = _log(capacity=3)
    for vm_id in range(5):
        log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(vm_id,))
    assert [e.sequence for e in log.events()] == [3, 4, 5]
    assert [e.vm_ids for e in log.events()] == [(2,), (3,), (4,)]
    assert log.last_sequence == 5


def test_replay_gives_the_last_n_then_caught_up_then_live_events() -> None:
    log = _log()
    for _ in range(5):
        log.publish(EventKind.PREPARE_VM, ALICE)
    subscription = log.subscribe(replay_last=2)
    log.publish(EventKind.REMOVE_VM, ALICE)
    items = _drain(subscription)
    assert [getattr(i, "sequence", None) for i in items] == [4, 5, None, 6]
    assert items[2] == CaughtUp(last_sequence=5)


def test_replay_asking_more_than_the_ring_holds_gets_what_it_holds() -> None:
    log = _log(capacity=4)
    for _ in range(10):
        log.publish(EventKind.PREPARE_VM, ALICE)
    items = _drain(log.subscribe(replay_last=1000))
    assert [getattr(i, "sequence", None) for i in items] == [7, 8, 9, 10, None]


def test_a_kind_filter_applies_to_replay_and_live_events() -> None:
    log = _log()
    log.publish(EventKind.PREPARE_VM, ALICE)
    log.publish(EventKind.REBALANCE_MEMORY, ALICE)
    log.publish(EventKind.PREPARE_VM, ALICE)
    subscription = log.subscribe(replay_last=5, kinds=[EventKind.REBALANCE_MEMORY])
    log.publish(EventKind.REMOVE_VM, ALICE)
    log.publish(EventKind.REBALANCE_MEMORY, ALICE)
    events = [i for i in _drain(subscription) if isinstance(i, Event)]
    assert [(e.sequence, e.kind) for e in events] == [
        (2, EventKind.REBALANCE_MEMORY),
        (5, EventKind.REBALANCE_MEMORY),
    ]


def test_a_slow_subscriber_loses_its_oldest_events_and_is_told_how_many() -> None:
    log = _log(subscriber_queue=4)
    slow = log.subscribe()
    fast = log.subscribe()
    assert isinstance(slow.take_nowait(), CaughtUp)
    assert isinstance(fast.take_nowait(), CaughtUp)
    received: list[int] = []
    for _ in range(10):
        log.publish(EventKind.PREPARE_VM, ALICE)
        item = fast.take_nowait()
        assert isinstance(item, Event)
        received.append(item.sequence)
    assert received == list(range(1, 11))  # the slow one never held the fast one back
    assert slow.queued == 4  # bounded
    items = _drain(slow)
    assert items[0] == Missed(count=6, first_sequence=1, last_sequence=6)
    assert [e.sequence for e in items[1:]] == [7, 8, 9, 10]  # type: ignore[attr-defined]


def test_policy_decisions_are_one_event_each_with_their_inputs() -> None:
    log = _log()
    first = log.publish_policy_decision(
        {"available_bytes": {"1": 100, "2": 5}, "pending_start": False}, "rebalance"
    )
    second = log.publish_policy_decision({"why": object()}, {"move": {"1": -4096}})
    assert [e.kind for e in log.events()] == [EventKind.POLICY_DECISION] * 2
    assert first is not None and second is not None
    assert first.caller == POLICY
    assert first.details == {
        "inputs": {"available_bytes": {"1": 100, "2": 5}, "pending_start": False},
        "action": "rebalance",
    }
    # What JSON cannot hold is kept as its text, so the audit line is always valid.
    assert isinstance(second.details["inputs"]["why"], str)


def test_an_event_error_is_the_status_the_caller_got() -> None:
    error = event_error(VmNotFoundError("no VM 9", vmId=9))
    assert (error.code, error.reason) == ("NOT_FOUND", "VM_NOT_FOUND")
    assert event_error(asyncio.CancelledError()).code == "CANCELLED"
    assert event_error(RuntimeError("x")).code == "INTERNAL"


def test_a_subscriber_on_the_loop_wakes_for_an_event_published_from_another_thread() -> None:
    async def scenario() -> list[object]:
        log = _log()
        log.attach(asyncio.get_running_loop(), threading.get_ident())
        subscription = log.subscribe()
        assert isinstance(await subscription.take_async(), CaughtUp)
        thread = threading.Thread(
            target=log.publish_from_thread, args=(EventKind.MMS_UNAVAILABLE, SERVER)
        )
        thread.start()
        item = await asyncio.wait_for(subscription.take_async(), 30)
        thread.join()
        log.end_subscriptions()
        return [item, await subscription.take_async()]

    item, end = asyncio.run(scenario())
    assert isinstance(item, Event) and item.kind is EventKind.MMS_UNAVAILABLE
    assert end is None  # ended subscriptions end their readers


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_audit_file_is_appended_and_numbering_continues_after_a_restart(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    log = _log(audit=AuditFile(str(path)))
    log.publish(EventKind.PREPARE_VM, ALICE, session="s-1", vm_ids=(1,), details={"x": 1})
    log.publish(EventKind.REMOVE_VM, ALICE, session="s-1", vm_ids=(1,))
    log.close()
    first = path.read_bytes()
    log = _log(audit=AuditFile(str(path)))
    log.publish(EventKind.POLICY_DECISION, POLICY)
    log.close()
    assert path.read_bytes().startswith(first)
    lines = _lines(path)
    assert [line["sequence"] for line in lines] == [1, 2, 3]
    caller = {"origin": "client", "peer": "ipv4:127.0.0.1:4000", "certificate_subject": "CN=alice"}
    assert lines[0] == {
        "sequence": 1,
        "time": "2023-11-14T22:13:20.250000Z",
        "kind": "PREPARE_VM",
        "caller": caller,
        "session": "s-1",
        "vm_ids": [1],
        "details": {"x": 1},
        "error": None,
    }


def test_a_line_cut_short_by_a_crash_is_kept_and_numbering_follows_the_last_whole_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_text('{"sequence": 41, "kind": "REMOVE_VM"}\n{"sequence": 42, "ki')
    log = _log(audit=AuditFile(str(path)))
    log.publish(EventKind.REMOVE_VM, ALICE)
    log.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"sequence": 42, "ki'  # never truncated, never rewritten
    assert json.loads(lines[2])["sequence"] == 42


def test_the_last_sequence_is_found_past_a_long_tail(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    # A last line longer than the tail the file is first read from.
    path.write_text('{"sequence": 7}\n' + '{"sequence": 8, "pad": "' + "x" * 100_000 + '"}\n')
    audit = AuditFile(str(path))
    audit.close()
    assert audit.last_sequence == 8


def test_an_audit_file_that_cannot_be_opened_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        AuditFile(str(tmp_path / "no-such-dir" / "audit.jsonl"))


class _Disk:
    """The audit file's raw file, with a disk that can fill up: "full" refuses every write,
    "partial" takes the first 10 bytes of one write and then is full."""

    def __init__(self, real: object) -> None:
        self.real = real
        self.mode = "ok"

    def write(self, data: bytes) -> int:
        if self.mode == "full":
            raise OSError(28, "No space left on device")
        if self.mode == "partial":
            self.mode = "full"
            return int(self.real.write(data[:10]))  # type: ignore[attr-defined]
        return int(self.real.write(data))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.real.close()  # type: ignore[attr-defined]


def test_a_failed_audit_write_is_counted_logged_once_and_leaves_no_line_behind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditFile(str(path))
    disk = _Disk(audit._file)
    audit._file = disk  # type: ignore[assignment]
    log = _log(audit=audit)
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(1,))
    disk.mode = "full"
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(2,))
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(3,))
    disk.mode = "partial"
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(4,))
    assert audit.failed_writes == 3
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "#2" in errors[0].getMessage()
    disk.mode = "ok"
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(5,))
    log.publish(EventKind.REMOVE_VM, ALICE, vm_ids=(6,))
    log.close()
    assert audit.failed_writes == 3
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "#5" in warnings[0].getMessage()
    # Every event still reached the ring; the file has the written ones, each on its own line
    # (the 10 bytes of #4 end before #5), and nothing that failed comes out later.
    assert [e.sequence for e in log.events()] == [1, 2, 3, 4, 5, 6]
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and len(lines[1]) == 10
    assert [json.loads(lines[i])["sequence"] for i in (0, 2, 3)] == [1, 5, 6]
