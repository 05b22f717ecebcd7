"""Unreadable VMs in the stats path, without sockets: picking per caller, watch filtering, and
the rate-limited log line (a fake clock)."""

from __future__ import annotations

import logging

import pytest

from manatee_grpc.core._errors import MmsConnectionLostError
from manatee_grpc.core._stats import UnreadableVmLog, _Answer, _pick
from manatee_grpc.core._watch import _filter
from manatee_grpc.mms._messages import (
    BalloonStats,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)

WRAPPED_CROS = UnreadableVm(0, UnreadableReason.WRAPPED, "balloon_actual", "18446744073675997184")
NEGATIVE_FREE = UnreadableVm(2, UnreadableReason.NEGATIVE, "stats.free_memory", "-1")
VM_1 = VmBalloonStats(1, BalloonStats(free_memory=4096), 8192)
ANSWER = GetBalloonStatsResponse(all_stats=(VM_1,), unreadable=(WRAPPED_CROS, NEGATIVE_FREE))


def test_each_caller_of_one_read_gets_the_unreadable_vms_it_asked_for() -> None:
    answer = _Answer.of(7, ANSWER)

    everything = _pick((0, 1, 2, 3), answer)
    assert everything.stats == (VM_1,)
    assert everything.missing_vm_ids == (0, 2, 3)  # 3: unknown to mms, not unreadable
    assert everything.unreadable == (WRAPPED_CROS, NEGATIVE_FREE)
    assert everything.session == 7

    only_cros = _pick((0,), answer)
    assert (only_cros.stats, only_cros.missing_vm_ids, only_cros.unreadable) == (
        (),
        (0,),
        (WRAPPED_CROS,),
    )
    assert _pick((1,), answer).unreadable == ()


def test_a_watcher_of_some_vms_gets_their_unreadable_entries_only() -> None:
    source = _pick((0, 1, 2), _Answer.of(1, ANSWER))

    watched = _filter(source, (2, 1))

    assert watched.stats == (VM_1,)
    assert watched.missing_vm_ids == (2,)
    assert watched.unreadable == (NEGATIVE_FREE,)
    assert watched.source is source.source  # same read: converted once for its watchers


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


def _read(
    log: UnreadableVmLog, *unreadable: UnreadableVm, vm_ids: tuple[int, ...] = (0, 1)
) -> None:
    response = GetBalloonStatsResponse(all_stats=(), unreadable=unreadable)
    log.on_response(1, GetBalloonStatsRequest(vm_ids), response, 0.001)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "manatee_grpc.core._stats"]


def test_the_log_says_it_once_then_at_most_every_interval_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="manatee_grpc.core._stats")
    clock = FakeClock()
    log = UnreadableVmLog(interval_s=300.0, clock=clock)

    for _ in range(50):  # a watch at 10 Hz for 5 s
        _read(log, WRAPPED_CROS)
        clock.now_s += 0.1
    assert len(_lines(caplog)) == 1
    assert "VM 0" in _lines(caplog)[0] and "wrapped" in _lines(caplog)[0]

    clock.now_s += 300.0
    _read(log, WRAPPED_CROS)
    assert len(_lines(caplog)) == 2
    assert "49 more unreadable reads" in _lines(caplog)[1]


def test_the_log_speaks_again_after_recovery_a_new_reason_or_a_new_session(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="manatee_grpc.core._stats")
    log = UnreadableVmLog(interval_s=300.0, clock=FakeClock())

    _read(log, WRAPPED_CROS)
    _read(log, vm_ids=(1,))  # VM 0 not asked for: says nothing about it
    _read(log, WRAPPED_CROS)
    assert len(_lines(caplog)) == 1

    _read(log)  # VM 0 read again, readable: the fault is over
    _read(log, WRAPPED_CROS)
    assert len(_lines(caplog)) == 2

    _read(log, UnreadableVm(0, UnreadableReason.TOO_LARGE, "balloon_actual", "9007199254740993"))
    assert len(_lines(caplog)) == 3

    log.on_disconnected(1, MmsConnectionLostError("gone"))
    log.on_connected(2)
    _read(log, WRAPPED_CROS)
    assert len(_lines(caplog)) == 4
