"""RequestIds: the bounded memory of request ids behind safe retries (AIP-155)."""

from __future__ import annotations

import pytest

from manatee_grpc.core._errors import InvalidArgumentError
from manatee_grpc.core._request_ids import RequestIds, validate_request_id


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


def test_ids_are_forgotten_on_a_new_session_after_their_time_and_beyond_capacity() -> None:
    clock = FakeClock()
    ids = RequestIds(capacity=2, ttl_s=10.0, clock=clock)
    ids.claim(1, "M", "a", 1)
    assert ids.claim(2, "M", "a", 1)[1] is True  # a new session: a new request
    ids.claim(2, "M", "b", 1)
    ids.claim(2, "M", "c", 1)  # over capacity: the oldest ("a") goes
    assert len(ids) == 2
    assert ids.claim(2, "M", "a", 1)[1] is True
    clock.now_s = 11.0
    assert ids.claim(2, "M", "c", 1)[1] is True  # expired


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
