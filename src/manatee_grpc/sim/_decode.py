"""Request bodies read the way mms read them: serde_json into serde-derived Rust structs.

mms parsed every body with ``serde_json::from_slice`` into a ``#[derive(Deserialize)]`` struct, so
what it accepted is what serde accepts, which is not what a strict JSON-object reader accepts:

- A struct is a JSON object *or* a JSON array of its fields in declaration order (exactly as many
  elements as fields): ``[7]`` is a valid RemoveVm body, ``[[1, 4096]]`` a valid RebalanceMemory.
- In an object, unknown keys are skipped (their values must still be valid JSON), a missing field
  is an error and so is a known field given twice (a duplicate unknown key is not).
- An id is a ``u32``: an integer literal in range. ``1.0``, ``1e0`` and ``-0`` are floats to
  serde_json (``-0`` because it parses negative zero as a float), so none of them is an id.
- A size or a delta is read as an ``f64`` (any number: integer literals are converted, rounding to
  the nearest double) and then cast with Rust's ``as``: truncate toward zero, saturate at the
  target type's bounds. A number beyond the f64 range is an error, but only where it is read: an
  out-of-range number in a skipped key is fine, as serde_json only checks its syntax there.
- NaN and Infinity are not JSON; nesting deeper than serde_json's recursion limit (127 levels) is
  an error; only JSON whitespace may surround the value.
- Text must be UTF-8 where serde_json reads it as a string: a struct's keys, which may not hold a
  lone surrogate escape either. Strings inside a skipped value are only scanned for their end, so
  invalid UTF-8 or a lone surrogate there is accepted.

Any failure is a RequestDecodeError: mms logged it, sent no answer and read the next frame.
Where serde_json's own float parsing would round a long decimal differently from Python's
correctly rounded one (it is exact only with its ``float_roundtrip`` feature), this follows Python.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from manatee_grpc.mms._messages import (
    U32_MAX,
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    MessageType,
    PrepareVmRequest,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    Request,
)

__all__ = ["RequestDecodeError", "decode_request"]

_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1
# serde_json counts down from 128 on every '[' or '{' and fails when the count reaches 0.
_MAX_NESTING = 127


class RequestDecodeError(ValueError):
    """A body serde_json would have refused: mms answers nothing and keeps reading."""


class _Number:
    """A JSON number kept as its literal: what it means depends on the field that reads it."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    @property
    def is_integer_literal(self) -> bool:
        # serde_json's integer grammar: no fraction, no exponent.
        return not any(c in self.text for c in ".eE")


class _Object:
    """A JSON object as its key/value pairs in order, duplicates kept (serde sees them all)."""

    __slots__ = ("pairs",)

    def __init__(self, pairs: list[tuple[str, object]]) -> None:
        self.pairs = pairs


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _parse(body: bytes) -> object:
    try:
        # Decoded by hand: json.loads(bytes) would also accept UTF-16/32 and skip a BOM. Invalid
        # bytes become lone surrogates: a syntax error outside strings, checked in keys (_struct).
        text = bytes(body).decode("utf-8", errors="surrogateescape")
        value = json.loads(
            text,
            parse_int=_Number,
            parse_float=_Number,
            parse_constant=_reject_constant,
            object_pairs_hook=_Object,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestDecodeError(f"not valid JSON: {exc}") from exc
    if _nesting(value) > _MAX_NESTING:
        raise RequestDecodeError(f"nested deeper than serde_json's {_MAX_NESTING} levels")
    return value


def _nesting(value: object) -> int:
    """How many containers deep ``value`` goes (0 for a scalar), without recursing in Python."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            children: list[object] = item
        elif isinstance(item, _Object):
            children = [child for _, child in item.pairs]
        else:
            continue
        deepest = max(deepest, depth + 1)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def _struct(value: object, field_names: tuple[str, ...], where: str) -> list[object]:
    """A serde-derived struct's field values, in declaration order."""
    if isinstance(value, list):
        # Too few elements is serde's invalid_length; too many is serde_json's trailing data.
        if len(value) != len(field_names):
            raise RequestDecodeError(
                f"{where}: an array of {len(value)} values for {len(field_names)} fields"
            )
        return value
    if not isinstance(value, _Object):
        raise RequestDecodeError(f"{where}: expected an object or an array")
    found: dict[str, object] = {}
    for key, field_value in value.pairs:
        # serde_json parses a struct's keys as strings: no invalid UTF-8, no lone surrogate
        # escape (a skipped value's strings may hold either: those are only scanned).
        if any("\ud800" <= char <= "\udfff" for char in key):
            raise RequestDecodeError(f"{where}: a key holds a lone surrogate")
        if key in field_names:
            if key in found:
                raise RequestDecodeError(f"{where}: duplicate field {key!r}")
            found[key] = field_value
    for name in field_names:
        if name not in found:
            raise RequestDecodeError(f"{where}: missing field {name!r}")
    return [found[name] for name in field_names]


def _seq(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise RequestDecodeError(f"{where}: expected an array")
    return value


def _u32(value: object, where: str) -> int:
    if not isinstance(value, _Number):
        raise RequestDecodeError(f"{where}: expected a u32")
    text = value.text
    # "-0" is a float to serde_json; any other negative is an i64 a u32 refuses.
    if not value.is_integer_literal or text.startswith("-"):
        raise RequestDecodeError(f"{where}: {text} is not a u32")
    # More digits than u32::MAX has cannot fit (and keeps int() away from huge literals).
    if len(text) > len(str(U32_MAX)) or int(text) > U32_MAX:
        raise RequestDecodeError(f"{where}: {text} is out of range for a u32")
    return int(text)


def _f64(value: object, where: str) -> float:
    """serde_json's f64 from any JSON number; beyond the f64 range is an error."""
    if not isinstance(value, _Number):
        raise RequestDecodeError(f"{where}: expected a number")
    # Correctly rounded, like Rust's u64/i64 `as f64` for integer literals ("-0" is -0.0).
    number = float(value.text)
    if math.isinf(number):
        raise RequestDecodeError(f"{where}: {value.text} is out of range for an f64")
    return number


def _f64_as(number: float, lo: int, hi: int) -> int:
    """Rust's ``f64 as u64/i64``: truncate toward zero, saturate at the bounds (NaN is 0)."""
    if math.isnan(number):
        return 0
    # Python compares int and float exactly, so the bounds need no rounding care.
    if number <= lo:
        return lo
    if number >= hi:
        return hi
    return int(number)


def _u64_from_double(value: object, where: str) -> int:
    return _f64_as(_f64(value, where), 0, _U64_MAX)


def _i64_from_double(value: object, where: str) -> int:
    return _f64_as(_f64(value, where), _I64_MIN, _I64_MAX)


def _get_balloon_stats(root: object) -> Request:
    (ids,) = _struct(root, ("ids",), "GetBalloonStats")
    return GetBalloonStatsRequest(
        vm_ids=tuple(
            _u32(vm_id, f"GetBalloonStats.ids[{index}]")
            for index, vm_id in enumerate(_seq(ids, "GetBalloonStats.ids"))
        )
    )


def _rebalance_memory(root: object) -> Request:
    (entries,) = _struct(root, ("deltas",), "RebalanceMemory")
    deltas = []
    for index, entry in enumerate(_seq(entries, "RebalanceMemory.deltas")):
        where = f"RebalanceMemory.deltas[{index}]"
        vm_id, delta = _struct(entry, ("id", "delta"), where)
        deltas.append(
            BalloonDelta(_u32(vm_id, f"{where}.id"), _i64_from_double(delta, f"{where}.delta"))
        )
    return RebalanceMemoryRequest(deltas=tuple(deltas))


def _prepare_vm(root: object) -> Request:
    mem_size, init_mem_size = _struct(root, ("mem_size", "init_mem_size"), "PrepareVm")
    return PrepareVmRequest(
        mem_size_bytes=_u64_from_double(mem_size, "PrepareVm.mem_size"),
        init_mem_size_bytes=_u64_from_double(init_mem_size, "PrepareVm.init_mem_size"),
    )


def _finish_add_vm(root: object) -> Request:
    (vm_id,) = _struct(root, ("id",), "FinishAddVm")
    return FinishAddVmRequest(vm_id=_u32(vm_id, "FinishAddVm.id"))


def _remove_vm(root: object) -> Request:
    (vm_id,) = _struct(root, ("id",), "RemoveVm")
    return RemoveVmRequest(vm_id=_u32(vm_id, "RemoveVm.id"))


_DECODERS: dict[MessageType, Callable[[object], Request]] = {
    MessageType.GET_BALLOON_STATS: _get_balloon_stats,
    MessageType.REBALANCE_MEMORY: _rebalance_memory,
    MessageType.PREPARE_VM: _prepare_vm,
    MessageType.FINISH_ADD_VM: _finish_add_vm,
    MessageType.REMOVE_VM: _remove_vm,
}


def decode_request(msg_type: int, body: bytes) -> Request:
    """The request mms read from one frame; RequestDecodeError where mms failed to."""
    try:
        kind = MessageType(msg_type)
    except ValueError as exc:
        raise RequestDecodeError(f"unknown message type {msg_type}") from exc
    return _DECODERS[kind](_parse(body))
