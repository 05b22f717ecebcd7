"""Scenario: every knob of the mms simulator (guest sizes, workloads, failures, latencies).

A frozen dataclass built in Python or read from a TOML or JSON file with the same keys; sizes in
a file may be byte counts or strings such as ``"512MiB"``. Runtime changes go through Simulator.
A workload gives VMs a demand curve (DemandCurve: memory in use over workload time).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, cast, get_args

from manatee_grpc.mms._memory_math import MIB, PAGE_SIZE_BYTES, ExtraBytesFormula
from manatee_grpc.mms._messages import U32_MAX, MessageType

__all__ = [
    "GIB",
    "DemandCurve",
    "MalformedRequestPolicy",
    "Scenario",
    "ScenarioError",
    "parse_size_bytes",
]

GIB = 1024 * MIB

# What to do with a frame mms could not decode (bad JSON, wrong shape, unknown message type).
# "ignore" (the default) is what sirenia's mms did: log it, send no answer, read the next frame.
# "close" is a departure from mms, for tests of a client facing a stricter peer: hang up.
MalformedRequestPolicy = Literal["close", "ignore"]

_SIZE_UNITS_BYTES = {"": 1, "B": 1, "KiB": 1024, "MiB": MIB, "GiB": GIB, "TiB": 1024 * GIB}
_SIZE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", re.ASCII)


class ScenarioError(ValueError):
    """A scenario that is malformed or that mms itself could not have started with."""


@dataclass(frozen=True, slots=True)
class DemandCurve:
    """Memory a guest has in use over workload time: ``(time_s, used_bytes)`` points.

    Between two points the demand moves in a straight line (a ramp); two points at the same time
    make a step (the later one wins from then on); a spike is a step up and a step down. Before
    the first point and after the last, the demand stays at that point's value.
    """

    points: tuple[tuple[float, int], ...]

    def __post_init__(self) -> None:
        if not self.points:
            raise ScenarioError("a demand curve needs at least one (time_s, used_bytes) point")
        previous_s = -math.inf
        for time_s, used_bytes in self.points:
            _check_seconds(time_s, "demand curve time_s")
            _check_non_negative_int(used_bytes, "demand curve used_bytes")
            if time_s < previous_s:
                raise ScenarioError(
                    f"demand curve times must not go back, got {time_s} after {previous_s}"
                )
            previous_s = time_s

    @classmethod
    def of(cls, *points: tuple[float, int]) -> DemandCurve:
        return cls(tuple((float(t), int(b)) for t, b in points))

    def used_bytes_at(self, time_s: float) -> int:
        """The demand at ``time_s``: the last point at or before it, ramping to the next."""
        times = [t for t, _ in self.points]
        index = bisect.bisect_right(times, time_s)
        if index == 0:
            return self.points[0][1]
        if index == len(self.points):
            return self.points[-1][1]
        (t0, b0), (t1, b1) = self.points[index - 1], self.points[index]
        # t1 > t0 here: at equal times bisect_right already moved past the step.
        return b0 + round((b1 - b0) * (time_s - t0) / (t1 - t0))


@dataclass(frozen=True, slots=True)
class Scenario:
    """The device and the faults the simulator plays; every field has a realistic default."""

    # The CrOS guest (VM 0). mms refuses a sibling whose memory is not smaller than this.
    cros_mem_size_bytes: int = 8 * GIB
    # What mms itself keeps in the CrOS balloon for the TEE app; hidden from the client.
    cros_internal_allocation_bytes: int = 32 * MIB
    # CrOS memory in use that its balloon cannot take back.
    cros_used_bytes: int = 2 * GIB
    extra_bytes_formula: ExtraBytesFormula = "current"
    # Memory a new sibling uses that its balloon cannot take (must fit in its init_mem_size).
    sibling_used_bytes: int = 64 * MIB
    # Per-VM overrides of the used bytes, also for ids not assigned yet.
    vm_used_bytes: Mapping[int, int] = field(default_factory=dict)
    # FinishAddVm: the VM's crosvm never connects to its balloon control socket (res -5).
    crosvm_connect_fail_vm_ids: frozenset[int] = frozenset()
    crosvm_connect_fail_count: int = 0
    # How long mms waits for that connection before answering -5 (10 s in mms).
    crosvm_connect_timeout_s: float = 10.0
    # PrepareVm: creating /run/mms_control_<id>.sock fails for the next N new starts (res -5).
    control_socket_fail_count: int = 0
    # GetBalloonStats: crosvm's stats request fails, so mms leaves these VMs out.
    stats_fail_vm_ids: frozenset[int] = frozenset()
    # Every balloon adjust of these VMs fails; mms then assumes the pessimistic outcome.
    balloon_adjust_fail_vm_ids: frozenset[int] = frozenset()
    # Added before every answer, and per message type on top of it.
    latency_s: float = 0.0
    message_delay_s: Mapping[MessageType, float] = field(default_factory=dict)
    # RemoveVm of a running VM blocks until its crosvm exits; so does a lost connection.
    remove_vm_delay_s: float = 0.0
    # Departure from mms when "close" (see MalformedRequestPolicy); "ignore" is what mms did.
    malformed_request: MalformedRequestPolicy = "ignore"
    # A workload: per-VM demand curves (memory in use over workload time, replacing that VM's
    # used bytes while it runs), also for ids not assigned yet. Workload time is the
    # simulator's clock since it started times ``workload_time_scale``, so minutes of workload
    # run in seconds; the demand is page-aligned, and ``demand_jitter_bytes`` adds a seeded
    # noise of up to that much, fixed for each whole workload second (reproducible).
    vm_demand: Mapping[int, DemandCurve] = field(default_factory=dict)
    workload_time_scale: float = 1.0
    workload_seed: int = 0
    demand_jitter_bytes: int = 0

    def __post_init__(self) -> None:
        for name in (
            "cros_mem_size_bytes",
            "cros_internal_allocation_bytes",
            "cros_used_bytes",
            "sibling_used_bytes",
        ):
            _check_non_negative_int(getattr(self, name), name)
        if self.cros_mem_size_bytes == 0 or self.cros_mem_size_bytes % PAGE_SIZE_BYTES:
            raise ScenarioError(
                f"cros_mem_size_bytes must be a positive multiple of {PAGE_SIZE_BYTES}, "
                f"got {self.cros_mem_size_bytes}"
            )
        if self.cros_internal_allocation_bytes % PAGE_SIZE_BYTES:
            raise ScenarioError(
                "cros_internal_allocation_bytes must be a multiple of "
                f"{PAGE_SIZE_BYTES}, got {self.cros_internal_allocation_bytes}"
            )
        # mms inflates the CrOS balloon by its internal allocation at start and exits if that
        # comes back short: such a device never ran an mms.
        if self.cros_internal_allocation_bytes + self.cros_used_bytes > self.cros_mem_size_bytes:
            raise ScenarioError(
                "cros_internal_allocation_bytes + cros_used_bytes exceeds cros_mem_size_bytes: "
                "mms could not inflate its internal allocation and would not start"
            )
        if self.extra_bytes_formula not in get_args(ExtraBytesFormula):
            raise ScenarioError(
                f"extra_bytes_formula must be one of {get_args(ExtraBytesFormula)}, "
                f"got {self.extra_bytes_formula!r}"
            )
        if self.malformed_request not in get_args(MalformedRequestPolicy):
            raise ScenarioError(
                f"malformed_request must be one of {get_args(MalformedRequestPolicy)}, "
                f"got {self.malformed_request!r}"
            )
        for vm_id, used_bytes in self.vm_used_bytes.items():
            _check_vm_id(vm_id, "vm_used_bytes")
            _check_non_negative_int(used_bytes, f"vm_used_bytes[{vm_id}]")
        for name in (
            "crosvm_connect_fail_vm_ids",
            "stats_fail_vm_ids",
            "balloon_adjust_fail_vm_ids",
        ):
            for vm_id in getattr(self, name):
                _check_vm_id(vm_id, name)
        _check_non_negative_int(self.crosvm_connect_fail_count, "crosvm_connect_fail_count")
        _check_non_negative_int(self.control_socket_fail_count, "control_socket_fail_count")
        for name in ("crosvm_connect_timeout_s", "latency_s", "remove_vm_delay_s"):
            _check_seconds(getattr(self, name), name)
        for msg_type, delay_s in self.message_delay_s.items():
            if not isinstance(msg_type, MessageType):
                raise ScenarioError(f"message_delay_s keys must be MessageType, got {msg_type!r}")
            _check_seconds(delay_s, f"message_delay_s[{msg_type.name}]")
        for vm_id, curve in self.vm_demand.items():
            _check_vm_id(vm_id, "vm_demand")
            if not isinstance(curve, DemandCurve):
                raise ScenarioError(f"vm_demand[{vm_id}] must be a DemandCurve, got {curve!r}")
        _check_seconds(self.workload_time_scale, "workload_time_scale")
        if self.workload_time_scale == 0:
            raise ScenarioError("workload_time_scale must be positive")
        if type(self.workload_seed) is not int:
            raise ScenarioError(f"workload_seed must be an integer, got {self.workload_seed!r}")
        _check_non_negative_int(self.demand_jitter_bytes, "demand_jitter_bytes")

    def demand_bytes_at(self, vm_id: int, workload_time_s: float) -> int | None:
        """A VM's workload demand at that time (page-aligned, jitter added), or None."""
        curve = self.vm_demand.get(vm_id)
        if curve is None:
            return None
        used_bytes = curve.used_bytes_at(workload_time_s)
        if self.demand_jitter_bytes:
            # Seeded per VM and whole second: the same run gives the same numbers.
            noise = random.Random(f"{self.workload_seed}:{vm_id}:{math.floor(workload_time_s)}")
            used_bytes += noise.randint(-self.demand_jitter_bytes, self.demand_jitter_bytes)
        return max(0, used_bytes) // PAGE_SIZE_BYTES * PAGE_SIZE_BYTES

    def used_bytes_for(self, vm_id: int) -> int:
        """The used bytes a VM starts with: its override, else the CrOS or sibling default."""
        if vm_id in self.vm_used_bytes:
            return self.vm_used_bytes[vm_id]
        return self.cros_used_bytes if vm_id == 0 else self.sibling_used_bytes

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Scenario:
        """Read a ``.toml`` or ``.json`` scenario; keys are this class's field names."""
        file_path = Path(path)
        suffix = file_path.suffix.lower()
        try:
            if suffix == ".toml":
                with file_path.open("rb") as toml_file:
                    data: object = tomllib.load(toml_file)
            elif suffix == ".json":
                with file_path.open("rb") as json_file:
                    data = json.load(json_file)
            else:
                raise ScenarioError(f"{file_path}: scenario files end in .toml or .json")
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"{file_path}: not a valid {suffix[1:]} file: {exc}") from exc
        if not isinstance(data, dict):
            raise ScenarioError(f"{file_path}: the top level must be a table/object")
        return cls.from_mapping(cast(dict[str, object], data), source=str(file_path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object], source: str = "scenario") -> Scenario:
        """Build from parsed TOML/JSON: sizes as ints or unit strings, ids as ints or digits."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ScenarioError(
                f"{source}: unknown key(s) {', '.join(unknown)}; known keys: "
                f"{', '.join(sorted(known))}"
            )
        kwargs: dict[str, object] = {}
        for key, raw in data.items():
            where = f"{source}: {key}"
            try:
                kwargs[key] = _FILE_PARSERS[key](raw, where)
            except ScenarioError:
                raise
            except (TypeError, ValueError) as exc:
                raise ScenarioError(f"{where}: {exc}") from exc
        try:
            return cls(**kwargs)  # type: ignore[arg-type]
        except ScenarioError as exc:
            raise ScenarioError(f"{source}: {exc}") from exc


def parse_size_bytes(value: object, where: str = "size") -> int:
    """Bytes from an int or a string such as ``"8GiB"``, ``"512 MiB"``, ``"1.5GiB"``, ``"4096"``."""
    if type(value) is int:
        if value < 0:
            raise ScenarioError(f"{where}: a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ScenarioError(f"{where}: a size is an integer of bytes or a string like '512MiB'")
    match = _SIZE_RE.fullmatch(value)
    if match is None or match.group(2) not in _SIZE_UNITS_BYTES:
        raise ScenarioError(
            f"{where}: cannot read size {value!r}; use bytes or a number with one of "
            f"{', '.join(unit for unit in _SIZE_UNITS_BYTES if unit)}"
        )
    number_text: str = match.group(1)
    unit: str = match.group(2)
    whole, _, fraction = number_text.partition(".")
    scale: int = 10 ** len(fraction)
    numerator = (int(whole) * scale + int(fraction or "0")) * _SIZE_UNITS_BYTES[unit]
    # Exact integer arithmetic: "1.5GiB" is a whole number of bytes, "0.3B" is not.
    if numerator % scale:
        raise ScenarioError(f"{where}: {value!r} is not a whole number of bytes")
    return numerator // scale


# --- field parsers for files -------------------------------------------------------------------


def _check_non_negative_int(value: object, name: str) -> None:
    if type(value) is not int or value < 0:
        raise ScenarioError(f"{name} must be a non-negative integer, got {value!r}")


def _check_vm_id(value: object, name: str) -> None:
    if type(value) is not int or not 0 <= value <= U32_MAX:
        raise ScenarioError(f"{name}: VM ids are integers in 0..{U32_MAX}, got {value!r}")


def _check_seconds(value: object, name: str) -> None:
    if (
        type(value) not in (int, float)
        or not math.isfinite(cast(float, value))
        or cast(float, value) < 0
    ):
        raise ScenarioError(f"{name} must be a finite number of seconds >= 0, got {value!r}")


def _parse_vm_id(value: object, where: str) -> int:
    # TOML and JSON table keys are strings, so ids may arrive as "3".
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    _check_vm_id(value, where)
    return cast(int, value)


def _parse_vm_ids(value: object, where: str) -> frozenset[int]:
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: expected a list of VM ids")
    return frozenset(_parse_vm_id(item, f"{where}[{index}]") for index, item in enumerate(value))


def _parse_count(value: object, where: str) -> int:
    _check_non_negative_int(value, where)
    return cast(int, value)


def _parse_seconds(value: object, where: str) -> float:
    if type(value) not in (int, float):
        raise ScenarioError(f"{where}: expected a number of seconds, got {value!r}")
    return float(cast(float, value))


def _parse_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise ScenarioError(f"{where}: expected a string, got {value!r}")
    return value


def _parse_message_type(value: str, where: str) -> MessageType:
    """Accept ``GET_BALLOON_STATS``, ``get_balloon_stats``, ``GetBalloonStats`` or ``"1"``."""
    if value.isascii() and value.isdigit():
        try:
            return MessageType(int(value))
        except ValueError:
            pass
    folded = value.replace("_", "").lower()
    for msg_type in MessageType:
        if msg_type.name.replace("_", "").lower() == folded:
            return msg_type
    raise ScenarioError(
        f"{where}: unknown message type {value!r}; use one of "
        f"{', '.join(t.name for t in MessageType)} or its number"
    )


def _parse_message_delays(value: object, where: str) -> dict[MessageType, float]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a table of message type -> seconds")
    return {
        _parse_message_type(str(key), where): _parse_seconds(seconds, f"{where}.{key}")
        for key, seconds in value.items()
    }


def _parse_vm_used(value: object, where: str) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a table of VM id -> size")
    return {
        _parse_vm_id(key, f"{where} key {key!r}"): parse_size_bytes(size, f"{where}.{key}")
        for key, size in value.items()
    }


def _parse_demand(value: object, where: str) -> dict[int, DemandCurve]:
    """``{vm_id: [[time_s, size], ...]}``: each VM's curve as a list of points."""
    if not isinstance(value, dict):
        raise ScenarioError(f"{where}: expected a table of VM id -> [[time_s, size], ...]")
    curves: dict[int, DemandCurve] = {}
    for key, points in value.items():
        at = f"{where}.{key}"
        if not isinstance(points, list):
            raise ScenarioError(f"{at}: expected a list of [time_s, size] points")
        parsed: list[tuple[float, int]] = []
        for index, point in enumerate(points):
            if not isinstance(point, list) or len(point) != 2:
                raise ScenarioError(f"{at}[{index}]: expected [time_s, size]")
            parsed.append(
                (
                    _parse_seconds(point[0], f"{at}[{index}]"),
                    parse_size_bytes(point[1], f"{at}[{index}]"),
                )
            )
        curves[_parse_vm_id(key, f"{where} key {key!r}")] = DemandCurve(tuple(parsed))
    return curves


def _parse_int(value: object, where: str) -> int:
    if type(value) is not int:
        raise ScenarioError(f"{where}: expected an integer, got {value!r}")
    return value


_FILE_PARSERS: dict[str, Callable[[object, str], object]] = {
    "cros_mem_size_bytes": parse_size_bytes,
    "cros_internal_allocation_bytes": parse_size_bytes,
    "cros_used_bytes": parse_size_bytes,
    "extra_bytes_formula": _parse_text,
    "sibling_used_bytes": parse_size_bytes,
    "vm_used_bytes": _parse_vm_used,
    "crosvm_connect_fail_vm_ids": _parse_vm_ids,
    "crosvm_connect_fail_count": _parse_count,
    "crosvm_connect_timeout_s": _parse_seconds,
    "control_socket_fail_count": _parse_count,
    "stats_fail_vm_ids": _parse_vm_ids,
    "balloon_adjust_fail_vm_ids": _parse_vm_ids,
    "latency_s": _parse_seconds,
    "message_delay_s": _parse_message_delays,
    "remove_vm_delay_s": _parse_seconds,
    "malformed_request": _parse_text,
    "vm_demand": _parse_demand,
    "workload_time_scale": _parse_seconds,
    "workload_seed": _parse_int,
    "demand_jitter_bytes": parse_size_bytes,
}
