"""Request validation as pure logic: Durations as duration.proto defines them, intervals checked
exactly, and error texts that show the value the caller sent."""

from __future__ import annotations

import pytest
from google.protobuf import duration_pb2, timestamp_pb2

from manatee_grpc.core import _validation as validate
from manatee_grpc.core._errors import InvalidArgumentError
from manatee_grpc.server._servicer import _duration, _timestamp


def _refusal(seconds: int, nanos: int) -> tuple[str, str]:
    with pytest.raises(InvalidArgumentError) as caught:
        validate.watch_interval(seconds, nanos)
    return caught.value.field, caught.value.description


def test_an_interval_just_below_the_floor_is_refused_with_the_exact_value_sent() -> None:
    assert _refusal(0, 99_999_999) == ("interval", "0.099999999 s is outside 0.1 s .. 3600 s")
    assert _refusal(3600, 1) == ("interval", "3600.000000001 s is outside 0.1 s .. 3600 s")
    assert _refusal(-1, -500_000_000) == ("interval", "-1.5 s is outside 0.1 s .. 3600 s")


def test_the_bounds_themselves_and_zero_are_accepted() -> None:
    assert validate.watch_interval(0, 100_000_000) == pytest.approx(0.1)
    assert validate.watch_interval(3600, 0) == 3600.0
    assert validate.watch_interval(1, 260_000_000) == pytest.approx(1.26)
    assert validate.watch_interval(0, 0) == validate.DEFAULT_WATCH_INTERVAL_S


def test_a_duration_outside_the_protobuf_spec_is_refused_naming_its_part() -> None:
    assert _refusal(0, 2_000_000_000) == (
        "interval.nanos",
        "2000000000 is outside the Duration range -999999999 .. 999999999",
    )
    assert _refusal(0, -1_000_000_000)[0] == "interval.nanos"
    assert _refusal(315_576_000_001, 0) == (
        "interval.seconds",
        "315576000001 is outside the Duration range -315576000000 .. 315576000000",
    )
    assert _refusal(-315_576_000_001, 0)[0] == "interval.seconds"
    assert _refusal(1, -1) == (
        "interval.nanos",
        "-1 and interval.seconds 1 have opposite signs; a Duration's must match",
    )
    assert _refusal(-1, 1)[0] == "interval.nanos"
    # The spec's extremes are Durations (then simply out of the interval's range).
    assert _refusal(315_576_000_000, 999_999_999)[0] == "interval"
    assert _refusal(-315_576_000_000, -999_999_999)[0] == "interval"


def test_a_float_interval_error_shows_the_float_sent() -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        validate.watch_interval_s(0.099999999)
    assert caught.value.description == "0.099999999 s is outside 0.1 s .. 3600 s"


def test_format_duration_ns_is_exact() -> None:
    assert validate.format_duration_ns(99_999_999) == "0.099999999"
    assert validate.format_duration_ns(1_500_000_000) == "1.5"
    assert validate.format_duration_ns(3_600_000_000_000) == "3600"
    assert validate.format_duration_ns(-1) == "-0.000000001"
    assert validate.format_duration_ns(0) == "0"


@pytest.mark.parametrize("seconds", [0.0, 0.001, 0.5, 1.26, 5.0, 299.999999999])
def test_the_servers_own_durations_are_valid_durations(seconds: float) -> None:
    """The server's Durations (progress.next_attempt_delay) pass the check it applies to ours."""
    duration = _duration(seconds)
    assert isinstance(duration, duration_pb2.Duration)
    validate.duration_ns(duration.seconds, duration.nanos, "next_attempt_delay")


@pytest.mark.parametrize("unix_s", [0.0, 1.9999999999, 1_700_000_000.123456789, 4_102_444_800.5])
def test_the_servers_own_timestamps_are_valid_timestamps(unix_s: float) -> None:
    """timestamp.proto: nanos in [0, 1e9) and seconds in years 0001 .. 9999."""
    stamp = _timestamp(unix_s)
    assert isinstance(stamp, timestamp_pb2.Timestamp)
    assert 0 <= stamp.nanos < 1_000_000_000
    assert -62_135_596_800 <= stamp.seconds <= 253_402_300_799
