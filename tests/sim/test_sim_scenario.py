"""Tests of Scenario: defaults, TOML and JSON files with the same keys, sizes, and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import MmsModel, Scenario, ScenarioError
from manatee_grpc.sim._scenario import _FILE_PARSERS, GIB, parse_size_bytes

FULL_TOML = """
cros_mem_size_bytes = "16GiB"
cros_internal_allocation_bytes = "128 MiB"
cros_used_bytes = 3221225472
extra_bytes_formula = "older"
sibling_used_bytes = "1.5GiB"
crosvm_connect_fail_vm_ids = [2, 5]
crosvm_connect_fail_count = 1
crosvm_connect_timeout_s = 0.5
control_socket_fail_count = 2
stats_fail_vm_ids = [3]
balloon_adjust_fail_vm_ids = [4]
latency_s = 0.01
remove_vm_delay_s = 2
malformed_request = "close"

[vm_used_bytes]
0 = "2GiB"
7 = 4096

[message_delay_s]
GetBalloonStats = 0.25
remove_vm = 1
"3" = 0.5
"""

FULL_SCENARIO = Scenario(
    cros_mem_size_bytes=16 * GIB,
    cros_internal_allocation_bytes=128 * MIB,
    cros_used_bytes=3 * GIB,
    extra_bytes_formula="older",
    sibling_used_bytes=1536 * MIB,
    vm_used_bytes={0: 2 * GIB, 7: 4096},
    crosvm_connect_fail_vm_ids=frozenset({2, 5}),
    crosvm_connect_fail_count=1,
    crosvm_connect_timeout_s=0.5,
    control_socket_fail_count=2,
    stats_fail_vm_ids=frozenset({3}),
    balloon_adjust_fail_vm_ids=frozenset({4}),
    latency_s=0.01,
    message_delay_s={
        MessageType.GET_BALLOON_STATS: 0.25,
        MessageType.REMOVE_VM: 1.0,
        MessageType.PREPARE_VM: 0.5,
    },
    remove_vm_delay_s=2.0,
    malformed_request="close",
)


def test_defaults_describe_an_8_gib_device_with_a_small_sibling_footprint() -> None:
    scenario = Scenario()
    assert scenario.cros_mem_size_bytes == 8 * GIB
    assert scenario.extra_bytes_formula == "current"
    assert scenario.sibling_used_bytes == 64 * MIB
    assert scenario.crosvm_connect_timeout_s == 10.0
    # Like mms: an undecodable frame is ignored without an answer ("close" is a departure).
    assert scenario.malformed_request == "ignore"
    assert scenario.used_bytes_for(0) == scenario.cros_used_bytes
    assert scenario.used_bytes_for(1) == 64 * MIB


def test_every_field_can_be_read_from_a_file() -> None:
    assert set(_FILE_PARSERS) == {f.name for f in dataclasses.fields(Scenario)}


def test_toml_file_reads_every_key(tmp_path: Path) -> None:
    path = tmp_path / "scenario.toml"
    path.write_text(FULL_TOML)
    assert Scenario.from_file(path) == FULL_SCENARIO


def test_json_file_reads_the_same_keys(tmp_path: Path) -> None:
    data = {
        "cros_mem_size_bytes": "16GiB",
        "cros_internal_allocation_bytes": "128MiB",
        "cros_used_bytes": 3 * GIB,
        "extra_bytes_formula": "older",
        "sibling_used_bytes": "1.5GiB",
        "vm_used_bytes": {"0": "2GiB", "7": 4096},
        "crosvm_connect_fail_vm_ids": [2, 5],
        "crosvm_connect_fail_count": 1,
        "crosvm_connect_timeout_s": 0.5,
        "control_socket_fail_count": 2,
        "stats_fail_vm_ids": [3],
        "balloon_adjust_fail_vm_ids": [4],
        "latency_s": 0.01,
        "message_delay_s": {"GET_BALLOON_STATS": 0.25, "RemoveVm": 1, "3": 0.5},
        "remove_vm_delay_s": 2,
        "malformed_request": "close",
    }
    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(data))
    assert Scenario.from_file(path) == FULL_SCENARIO


def test_an_empty_file_is_the_default_scenario(tmp_path: Path) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    assert Scenario.from_file(path) == Scenario()


def test_a_file_scenario_drives_the_model(tmp_path: Path) -> None:
    path = tmp_path / "small.toml"
    path.write_text('cros_mem_size_bytes = "2GiB"\ncros_internal_allocation_bytes = 0\n')
    model = MmsModel(Scenario.from_file(path))
    assert model.cros_mem_size_bytes == 2 * GIB
    assert model.cros_internal_allocation_bytes == 0


@pytest.mark.parametrize(
    ("text", "size_bytes"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("12 B", 12),
        ("4KiB", 4096),
        ("512MiB", 512 * MIB),
        ("8GiB", 8 * GIB),
        ("1.5GiB", 1536 * MIB),
        ("1TiB", 1024 * GIB),
    ],
)
def test_sizes_accept_bytes_and_binary_units(text: object, size_bytes: int) -> None:
    assert parse_size_bytes(text) == size_bytes


@pytest.mark.parametrize("text", ["8GB", "8 gigs", "-1", -1, "0.3B", "1.5", 1.5, True, None, ""])
def test_sizes_refuse_anything_else(text: object) -> None:
    with pytest.raises(ScenarioError):
        parse_size_bytes(text)


def test_unknown_keys_are_named_with_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('cros_mem_bytes = "8GiB"\nlatency = 1\n')
    with pytest.raises(ScenarioError) as error:
        Scenario.from_file(path)
    message = str(error.value)
    assert "cros_mem_bytes, latency" in message
    assert "cros_mem_size_bytes" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ('extra_bytes_formula = "newest"', "extra_bytes_formula"),
        ('malformed_request = "crash"', "malformed_request"),
        ("stats_fail_vm_ids = 3", "stats_fail_vm_ids"),
        ('stats_fail_vm_ids = ["x"]', "stats_fail_vm_ids"),
        ("crosvm_connect_fail_count = -1", "crosvm_connect_fail_count"),
        ('latency_s = "fast"', "latency_s"),
        ("latency_s = -0.5", "latency_s"),
        ("[message_delay_s]\nReboot = 1", "Reboot"),
        ('cros_mem_size_bytes = "1GiB"\ncros_used_bytes = "1GiB"', "would not start"),
        ("cros_mem_size_bytes = 4097", "multiple of 4096"),
        ("[vm_used_bytes]\nabc = 1", "vm_used_bytes"),
    ],
)
def test_bad_values_are_refused_with_the_key_named(
    tmp_path: Path, toml: str, fragment: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ScenarioError, match=fragment):
        Scenario.from_file(path)


def test_malformed_files_and_unknown_extensions_are_refused(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("latency_s = = 1")
    with pytest.raises(ScenarioError, match="not a valid toml"):
        Scenario.from_file(broken)
    array = tmp_path / "array.json"
    array.write_text("[1, 2]")
    with pytest.raises(ScenarioError, match="top level"):
        Scenario.from_file(array)
    yaml = tmp_path / "scenario.yaml"
    yaml.write_text("latency_s: 1")
    with pytest.raises(ScenarioError, match=r"\.toml or \.json"):
        Scenario.from_file(yaml)


def test_python_construction_is_validated_too() -> None:
    with pytest.raises(ScenarioError, match="cros_used_bytes"):
        Scenario(cros_used_bytes=-1)
    with pytest.raises(ScenarioError, match="message_delay_s"):
        Scenario(message_delay_s={MessageType.PREPARE_VM: float("inf")})
