"""RequestIds: the bounded memory of request ids behind safe retries (AIP-155)."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from manatee_grpc.core._bridge import _await_outcome, _settle
from manatee_grpc.core._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    MmsHungError,
    RequestIdsFullError,
)
from manatee_grpc.core._request_ids import Outcome, RequestIds, validate_request_id
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.server._status import to_status

_DETAILS_KEY = "grpc-status-details-bin"


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 0.0

    def __call__(self) -> float:
        return self.now_s


def test_a_repeat_gets_the_first_outcome_and_another_request_is_refused() -> None:
    ids = RequestIds()
    outcome, first = ids.claim(1, "RebalanceMemory", "a", ((1, 4096),))
    again, repeat_first = ids.claim(1, "RebalanceMemory", "a", ((1, 4096),))
    assert (first, repeat_first) == (True, False) and again is outcome
    with pytest.raises(InvalidArgumentError) as raised:
        ids.claim(1, "RebalanceMemory", "a", ((1, 8192),))
    assert raised.value.field == "request_id"
    # Methods do not share ids.
    assert ids.claim(1, "PrepareVm", "a", (4096, 4096))[1] is True


def test_ids_are_forgotten_on_a_new_session_and_a_ttl_after_their_answer() -> None:
    clock = FakeClock()
    ids = RequestIds(capacity=2, ttl_s=10.0, clock=clock)
    ids.claim(1, "M", "a", 1)
    assert ids.claim(2, "M", "a", 1)[1] is True  # a new session: a new request
    outcome, _ = ids.claim(2, "M", "c", 1)
    clock.now_s = 5.0
    outcome.set_result("answer")  # the TTL runs from here
    clock.now_s = 14.0
    again, first = ids.claim(2, "M", "c", 1)  # 14 s after its claim, 9 after its answer
    assert (first, again.result()) == (False, "answer")
    clock.now_s = 15.0
    assert ids.claim(2, "M", "c", 1)[1] is True  # expired


def test_an_entry_whose_outcome_is_pending_is_never_forgotten_for_age_or_count() -> None:
    clock = FakeClock()
    ids = RequestIds(capacity=2, ttl_s=10.0, clock=clock)
    pending, _ = ids.claim(1, "M", "a", 1)
    ids.claim(1, "M", "b", 1)
    clock.now_s = 1000.0  # far past the TTL, but both are still in flight
    with pytest.raises(RequestIdsFullError) as refused:
        ids.claim(1, "M", "c", 1)  # refused, rather than "a" or "b" forgotten
    assert ids.claim(1, "M", "a", 1) == (pending, False)
    assert len(ids) == 2
    status = to_status(refused.value)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = status_pb2.Status.FromString(dict(status.trailing_metadata)[_DETAILS_KEY]).details
    info = error_details_pb2.ErrorInfo()
    assert details[0].Unpack(info) and info.reason == "REQUEST_IDS_FULL"
    assert info.metadata["reachedMms"] == "false"  # nothing sent: a retry is safe
    retry = error_details_pb2.RetryInfo()
    assert any(detail.Unpack(retry) for detail in details)
    assert retry.retry_delay.ToTimedelta().total_seconds() > 0


def test_beyond_capacity_the_oldest_answered_id_goes_never_one_in_flight() -> None:
    ids = RequestIds(capacity=2, ttl_s=10.0, clock=FakeClock())
    pending, _ = ids.claim(1, "M", "a", 1)  # the oldest, still in flight
    ids.claim(1, "M", "b", 1)[0].set_result("b")
    ids.claim(1, "M", "c", 1)[0].set_result("c")  # over capacity: "b" goes, not older "a"
    assert ids.claim(1, "M", "a", 1) == (pending, False)
    assert ids.claim(1, "M", "c", 1)[0].result() == "c"
    assert ids.claim(1, "M", "b", 1)[1] is True  # forgotten: a new call (and "c" makes room)


def test_a_first_call_never_sent_is_forgotten_so_a_repeat_runs_it() -> None:
    ids = RequestIds()
    outcome, _ = ids.claim(1, "M", "a", 1)
    ids.forget("M", "a", outcome)
    assert ids.claim(1, "M", "a", 1)[1] is True


@pytest.mark.parametrize("text", ["r" * 65, "bad\nid"])
def test_request_ids_are_short_printable_text(text: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_request_id(text)
    assert validate_request_id("4b1f9c4e-2a55-4c61-8d2b-6a0f1e7d9c30")


# --- the bridge's use of an id's outcome ---------------------------------------------------------


def _run(awaitable: Any) -> Any:
    async def main() -> Any:
        return await awaitable

    return asyncio.run(main())


def _hung_not_sent() -> MmsHungError:
    return MmsHungError(
        "PREPARE_VM not sent: mms is silent", messageType="PREPARE_VM", reached_mms=False
    )


def test_a_first_call_refused_not_sent_forgets_its_id_and_repeats_run_it_afresh() -> None:
    ids = RequestIds()
    outcome, _ = ids.claim(1, "PrepareVm", "a", 1)
    sent: Future[Any] = Future()
    forgotten: list[bool] = []

    def forget() -> None:
        forgotten.append(True)
        ids.forget("PrepareVm", "a", outcome)

    sent.add_done_callback(lambda _: _settle(outcome, sent, lambda r: r, forget))
    sent.set_running_or_notify_cancel()
    sent.set_exception(_hung_not_sent())  # a hung stream: "not sent", the stream is kept
    assert forgotten == [True]
    assert ids.claim(1, "PrepareVm", "a", 1)[1] is True  # a later retry runs it
    # A repeat that waited for it runs it itself (None); the first call gets its own error.
    assert _run(_await_outcome(outcome, 1.0, MessageType.PREPARE_VM, None)) is None
    with pytest.raises(MmsHungError):
        _run(_await_outcome(outcome, 1.0, MessageType.PREPARE_VM, sent))


@pytest.mark.parametrize("on_wire", [True, False])
def test_a_deadline_on_a_call_with_a_request_id_says_whether_it_reached_mms(
    on_wire: bool,
) -> None:
    outcome: Outcome[Any] = Outcome()
    sent: Future[Any] = Future()
    if on_wire:
        sent.set_running_or_notify_cancel()  # what the connection thread does as it sends
    with pytest.raises(DeadlineExceededError) as caught:
        _run(_await_outcome(outcome, 0.0, MessageType.REBALANCE_MEMORY, sent))
    assert caught.value.reached_mms is on_wire
    assert caught.value.metadata["messageType"] == "REBALANCE_MEMORY"
    assert sent.cancelled() is not on_wire


def test_a_deadline_on_a_repeat_says_it_waited_for_the_first_call() -> None:
    outcome: Outcome[Any] = Outcome()
    outcome.request = Future()
    outcome.request.set_running_or_notify_cancel()
    with pytest.raises(DeadlineExceededError) as caught:
        _run(_await_outcome(outcome, 0.0, MessageType.REBALANCE_MEMORY, None))
    assert caught.value.reached_mms is True
    assert caught.value.metadata["messageType"] == "REBALANCE_MEMORY"
    assert caught.value.metadata["requestIdRepeat"] == "true"
    assert not outcome.request.cancelled()  # a repeat never cancels the first call's request
