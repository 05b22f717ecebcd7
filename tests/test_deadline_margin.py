"""The server's deadline margin: how long before the caller's deadline it stops waiting, so its
own DEADLINE_EXCEEDED (with ErrorInfo) reaches the caller before the caller's timer fires."""

from __future__ import annotations

import pytest

from manatee_grpc.server._servicer import deadline_margin_s


@pytest.mark.parametrize(
    ("remaining_s", "margin_s"),
    [
        (3.0, 0.3),  # a tenth of the time left
        (0.5, 0.05),  # never less than the floor...
        (0.06, 0.03),  # ...unless that leaves the call less than half its time
        (10.0, 1.0),
        (600.0, 1.0),  # a long RemoveVm keeps all but a second of its wait
    ],
)
def test_margin_is_a_tenth_of_the_time_left_within_a_floor_and_a_cap(
    remaining_s: float, margin_s: float
) -> None:
    assert deadline_margin_s(remaining_s) == pytest.approx(margin_s)


@pytest.mark.parametrize("remaining_s", [0.0, 0.001, 0.1, 1.0, 7.5, 1e6])
def test_margin_leaves_the_call_at_least_half_its_time(remaining_s: float) -> None:
    assert 0.0 <= deadline_margin_s(remaining_s) <= remaining_s / 2
