"""Sizes as operators type them, and as the CLI prints them (pure functions, no server)."""

from __future__ import annotations

import pytest

from manatee_grpc.cli._cli_client import format_table, parse_size_bytes
from manatee_grpc.cli._common import format_bytes

MIB = 1024 * 1024
GIB = 1024 * MIB


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("4KiB", 4096),
        ("4k", 4096),
        ("512MiB", 512 * MIB),
        ("512M", 512 * MIB),
        ("2G", 2 * GIB),
        ("2GiB", 2 * GIB),
        ("2 gib", 2 * GIB),
        ("1.5GiB", 3 * GIB // 2),
        ("1TiB", 1024 * GIB),
    ],
)
def test_sizes_parse_with_binary_units(text: str, expected: int) -> None:
    assert parse_size_bytes(text) == expected


@pytest.mark.parametrize(("text", "expected"), [("-64MiB", -64 * MIB), ("+1G", GIB), ("0", 0)])
def test_signed_sizes_parse_for_deltas(text: str, expected: int) -> None:
    assert parse_size_bytes(text, signed=True) == expected


@pytest.mark.parametrize("text", ["", "12XB", "MiB", "1.5", "0.3K", "-64MiB", "2 G B", "1e3"])
def test_unreadable_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"size|bytes|sign"):
        parse_size_bytes(text)


def test_bytes_are_humanised() -> None:
    assert format_bytes(0) == "0 B"
    assert format_bytes(4096) == "4.0 KiB"
    assert format_bytes(512 * MIB) == "512.0 MiB"
    assert format_bytes(2 * GIB) == "2.00 GiB"
    assert format_bytes(-64 * MIB, signed=True) == "-64.0 MiB"
    assert format_bytes(64 * MIB, signed=True) == "+64.0 MiB"


def test_table_columns_are_aligned() -> None:
    table = format_table(["ID", "SIZE"], [["1", "512.0 MiB"], ["10", "2.00 GiB"]], right=(1,))

    assert table.splitlines() == ["ID       SIZE", "1   512.0 MiB", "10   2.00 GiB"]
