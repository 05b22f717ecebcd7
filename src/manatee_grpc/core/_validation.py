"""Request validation: pure checks that turn API messages into safe mms values.

Everything here runs before a request reaches mms; each failure names the offending field the
way google.rpc.BadRequest expects (``deltas[2].vm_id``).
"""

from __future__ import annotations

from collections.abc import Sequence

from manatee_grpc.core._errors import InvalidArgumentError
from manatee_grpc.mms._memory_math import (
    MAX_JSON_SAFE_INT,
    PAGE_SIZE_BYTES,
    default_init_mem_size_bytes,
)
from manatee_grpc.mms._messages import CROS_GUEST_VM_ID, U32_MAX

# More ids than this in one request is a mistake, not a device: mms serves a handful of VMs.
MAX_VM_IDS = 1024
MIN_WATCH_INTERVAL_S = 0.1
MAX_WATCH_INTERVAL_S = 3600.0
DEFAULT_WATCH_INTERVAL_S = 1.0


def vm_id(value: int, field: str = "vm_id") -> int:
    if not 0 <= value <= U32_MAX:
        raise InvalidArgumentError(field, f"VM id {value} is outside the mms id range 0..{U32_MAX}")
    return value


def sibling_vm_id(value: int, field: str = "vm_id") -> int:
    vm_id(value, field)
    if value == CROS_GUEST_VM_ID:
        raise InvalidArgumentError(field, "VM 0 is the CrOS guest, not a sibling VM")
    return value


def vm_ids(values: Sequence[int], field: str = "vm_ids") -> tuple[int, ...]:
    if len(values) > MAX_VM_IDS:
        raise InvalidArgumentError(field, f"{len(values)} ids; at most {MAX_VM_IDS} per request")
    seen: set[int] = set()
    for index, value in enumerate(values):
        vm_id(value, f"{field}[{index}]")
        if value in seen:
            raise InvalidArgumentError(f"{field}[{index}]", f"VM id {value} is repeated")
        seen.add(value)
    return tuple(values)


def balloon_deltas(pairs: Sequence[tuple[int, int]], field: str = "deltas") -> dict[int, int]:
    """Sibling balloon deltas by VM id; the CrOS guest's delta is derived, never given."""
    if not pairs:
        raise InvalidArgumentError(field, "at least one sibling VM delta is needed")
    if len(pairs) > MAX_VM_IDS:
        raise InvalidArgumentError(field, f"{len(pairs)} deltas; at most {MAX_VM_IDS}")
    deltas: dict[int, int] = {}
    for index, (value, delta_bytes) in enumerate(pairs):
        sibling_vm_id(value, f"{field}[{index}].vm_id")
        if value in deltas:
            raise InvalidArgumentError(f"{field}[{index}].vm_id", f"VM {value} appears twice")
        _json_safe(delta_bytes, f"{field}[{index}].delta_bytes")
        deltas[value] = delta_bytes
    # The derived CrOS guest delta is their negated sum: it must travel exactly too.
    _json_safe(sum(deltas.values()), field, "the sum of the deltas")
    return deltas


def mem_sizes(
    mem_size_bytes: int, init_mem_size_bytes: int | None, prefix: str = ""
) -> tuple[int, int]:
    """(mem, init) for PrepareVm/LaunchVm; init defaults to concierge's min(1000 MiB, mem)."""
    mem_field = f"{prefix}mem_size_bytes"
    init_field = f"{prefix}init_mem_size_bytes"
    if mem_size_bytes <= 0:
        raise InvalidArgumentError(mem_field, "must be positive")
    _json_safe(mem_size_bytes, mem_field)
    _page_multiple(mem_size_bytes, mem_field)
    if init_mem_size_bytes is None:
        return mem_size_bytes, default_init_mem_size_bytes(mem_size_bytes)
    if init_mem_size_bytes <= 0:
        raise InvalidArgumentError(init_field, "must be positive")
    _page_multiple(init_mem_size_bytes, init_field)
    if init_mem_size_bytes > mem_size_bytes:
        raise InvalidArgumentError(init_field, f"must be at most {mem_field}")
    return mem_size_bytes, init_mem_size_bytes


MAX_SESSION_ID_CHARS = 64


def session_id(value: str, field: str = "session") -> str:
    """A session id as the server hands them out; "" means the current session."""
    if len(value) > MAX_SESSION_ID_CHARS:
        raise InvalidArgumentError(
            field, f"{len(value)} characters; session ids have at most {MAX_SESSION_ID_CHARS}"
        )
    return value


def watch_interval_s(seconds: float, field: str = "interval") -> float:
    """A watch interval given in seconds; 0 means the default (1 s)."""
    if seconds == 0:
        return DEFAULT_WATCH_INTERVAL_S
    if not MIN_WATCH_INTERVAL_S <= seconds <= MAX_WATCH_INTERVAL_S:
        # repr, not :g: the caller must recognise the value it sent (0.099999999, not 0.1).
        raise InvalidArgumentError(field, _interval_outside(repr(seconds)))
    return seconds


def watch_interval(seconds: int, nanos: int, field: str = "interval") -> float:
    """A watch interval from a google.protobuf.Duration, checked exactly (in nanoseconds)."""
    total_ns = duration_ns(seconds, nanos, field)
    if total_ns == 0:
        return DEFAULT_WATCH_INTERVAL_S
    if not _MIN_WATCH_INTERVAL_NS <= total_ns <= _MAX_WATCH_INTERVAL_NS:
        raise InvalidArgumentError(field, _interval_outside(format_duration_ns(total_ns)))
    return total_ns / _NS_PER_S


def _interval_outside(given: str) -> str:
    return f"{given} s is outside {MIN_WATCH_INTERVAL_S:g} s .. {MAX_WATCH_INTERVAL_S:g} s"


# google.protobuf.Duration's own bounds (duration.proto): about +-10,000 years, nanos of the same
# sign as seconds. A message outside them is not a Duration; other libraries refuse to read it.
DURATION_MAX_SECONDS = 315_576_000_000
DURATION_MAX_NANOS = 999_999_999
_NS_PER_S = 1_000_000_000
_MIN_WATCH_INTERVAL_NS = round(MIN_WATCH_INTERVAL_S * _NS_PER_S)
_MAX_WATCH_INTERVAL_NS = round(MAX_WATCH_INTERVAL_S * _NS_PER_S)


def duration_ns(seconds: int, nanos: int, field: str) -> int:
    """A Duration's length in nanoseconds, if it is valid as the protobuf spec defines it."""
    if not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        raise InvalidArgumentError(
            f"{field}.seconds",
            f"{seconds} is outside the Duration range "
            f"-{DURATION_MAX_SECONDS} .. {DURATION_MAX_SECONDS}",
        )
    if not -DURATION_MAX_NANOS <= nanos <= DURATION_MAX_NANOS:
        raise InvalidArgumentError(
            f"{field}.nanos",
            f"{nanos} is outside the Duration range -{DURATION_MAX_NANOS} .. {DURATION_MAX_NANOS}",
        )
    if seconds and nanos and (seconds < 0) != (nanos < 0):
        raise InvalidArgumentError(
            f"{field}.nanos",
            f"{nanos} and {field}.seconds {seconds} have opposite signs; a Duration's must match",
        )
    return seconds * _NS_PER_S + nanos


def format_duration_ns(total_ns: int) -> str:
    """Seconds, exactly: 99_999_999 ns is "0.099999999", 1_500_000_000 ns is "1.5"."""
    whole_s, fraction_ns = divmod(abs(total_ns), _NS_PER_S)
    text = f"{whole_s}.{fraction_ns:09d}".rstrip("0").rstrip(".")
    return f"-{text}" if total_ns < 0 else text


def _json_safe(value: int, field: str, what: str = "the value") -> None:
    # mms reads numbers as doubles: beyond 2^53 they would arrive changed.
    if abs(value) > MAX_JSON_SAFE_INT:
        raise InvalidArgumentError(field, f"{what} {value} exceeds 2^53 bytes")


def _page_multiple(value: int, field: str) -> None:
    if value % PAGE_SIZE_BYTES:
        raise InvalidArgumentError(field, f"{value} is not a multiple of {PAGE_SIZE_BYTES} bytes")
