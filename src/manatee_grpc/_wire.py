"""The mms wire codec: the 8-byte frame header and the JSON bodies of the five messages.

Pure functions, no sockets. The bridge (client side) frames and parses through here, so every
protocol rule, and every way a peer can break it, lives in one place; the simulator (mms side)
frames its answers here and reads requests as serde_json did (sim/_decode.py).
"""

from __future__ import annotations

import json
import operator
import struct
from typing import Any, NamedTuple, TypeVar, cast

from manatee_grpc._memory_math import MAX_JSON_SAFE_INT
from manatee_grpc._messages import (
    BALLOON_STAT_FIELDS,
    U32_MAX,
    BalloonDelta,
    BalloonStats,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "HEADER_SIZE_BYTES",
    "CodecError",
    "FrameHeader",
    "RequestEncodeError",
    "check_response_header",
    "decode_header",
    "decode_response",
    "encode_frame",
    "encode_request",
    "encode_response",
]

HEADER_SIZE_BYTES = 8
# mms's largest answer is GetBalloonStats: a few hundred bytes per VM, so 1 MiB is generous and
# still stops a corrupt or hostile `len` from making us allocate gigabytes.
DEFAULT_MAX_BODY_BYTES = 1 << 20

# Native byte order on every mms target is little-endian; `len` first, then `type`.
_HEADER = struct.Struct("<II")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
_U64_MAX = 2**64 - 1

_MESSAGE_NAMES = {
    MessageType.GET_BALLOON_STATS: "GetBalloonStats",
    MessageType.REBALANCE_MEMORY: "RebalanceMemory",
    MessageType.PREPARE_VM: "PrepareVm",
    MessageType.FINISH_ADD_VM: "FinishAddVm",
    MessageType.REMOVE_VM: "RemoveVm",
}

_R = TypeVar("_R", bound=Response)


class CodecError(Exception):
    """The peer broke the protocol (bad header, type or body): the stream can't be trusted."""


class RequestEncodeError(ValueError):
    """A request we refuse to send because mms would misread it; the message names the field."""


class FrameHeader(NamedTuple):
    body_len_bytes: int
    msg_type: int


# --- framing ----------------------------------------------------------------------------------


def encode_frame(msg_type: int, body: bytes) -> bytes:
    """The 8-byte header (body length, type) followed by ``body``."""
    if not 0 <= msg_type <= U32_MAX:
        raise ValueError(f"message type {msg_type} does not fit in a u32")
    if len(body) > U32_MAX:
        raise ValueError(f"body of {len(body)} bytes does not fit a u32 length")
    return _HEADER.pack(len(body), msg_type) + body


def decode_header(header: bytes) -> FrameHeader:
    if len(header) != HEADER_SIZE_BYTES:
        raise CodecError(f"frame header must be {HEADER_SIZE_BYTES} bytes, got {len(header)}")
    body_len_bytes, msg_type = _HEADER.unpack(header)
    return FrameHeader(body_len_bytes, msg_type)


def check_response_header(
    header: FrameHeader, expected: MessageType, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> None:
    """Refuse a response of the wrong type or a body too large to read, before reading it."""
    if header.msg_type != expected:
        raise CodecError(
            f"response type {header.msg_type} does not match request type "
            f"{int(expected)} ({_MESSAGE_NAMES[expected]})"
        )
    if header.body_len_bytes > max_body_bytes:
        raise CodecError(
            f"{_MESSAGE_NAMES[expected]} response body of {header.body_len_bytes} bytes "
            f"exceeds the {max_body_bytes}-byte cap"
        )


# --- client side: requests out, responses in -------------------------------------------------


def encode_request(request: MmsRequest[Any]) -> bytes:
    """The whole frame for ``request``; raises RequestEncodeError for values mms would misread."""
    payload = _request_payload(request)
    # The C++ client sends no body at all for an empty dict; keep that rule even though every
    # request we build today has keys.
    body = _dump_json(payload) if payload else b""
    return encode_frame(request.TYPE, body)


def decode_response(request: MmsRequest[_R], body: bytes) -> _R:
    """Parse and validate the response body to ``request``; CodecError on anything malformed."""
    if not isinstance(
        request,
        GetBalloonStatsRequest
        | RebalanceMemoryRequest
        | PrepareVmRequest
        | FinishAddVmRequest
        | RemoveVmRequest,
    ):
        raise TypeError(f"not an mms request: {request!r}")
    where = f"{_MESSAGE_NAMES[request.TYPE]} response"
    root = _load_json_object(body, where)
    response: Response
    if isinstance(request, GetBalloonStatsRequest):
        response = _decode_balloon_stats_response(root, where)
    elif isinstance(request, RebalanceMemoryRequest):
        entries = _list(_key(root, "actual_deltas", where), f"{where}: actual_deltas")
        response = RebalanceMemoryResponse(
            actual_deltas=tuple(
                _decode_delta(entry, f"{where}: actual_deltas[{index}]")
                for index, entry in enumerate(entries)
            )
        )
    elif isinstance(request, PrepareVmRequest):
        response = PrepareVmResponse(
            res=_int_field(root, "res", _I32_MIN, _I32_MAX, where),
            vm_id=_int_field(root, "id", 0, U32_MAX, where),
            shortfall_bytes=_int_field(root, "shortfall", 0, _U64_MAX, where),
        )
    elif isinstance(request, FinishAddVmRequest):
        response = FinishAddVmResponse(res=_int_field(root, "res", _I32_MIN, _I32_MAX, where))
    else:
        response = RemoveVmResponse(res=_int_field(root, "res", _I32_MIN, _I32_MAX, where))
    # The request's type parameter is its response class, which the branch above just built.
    return cast(_R, response)


# --- mms side (the simulator): responses out; it reads requests with its own serde-compatible
# decoder (sim/_decode.py), since mms accepted more than the bridge ever sends.


def encode_response(msg_type: MessageType, response: Response) -> bytes:
    """The whole frame for ``response``; ``msg_type`` is written as given.

    The type is not derived from the response so a simulator can inject a mismatched frame.
    """
    payload: dict[str, object]
    if isinstance(response, GetBalloonStatsResponse):
        payload = {
            "all_stats": [
                {
                    "id": entry.vm_id,
                    "stats": {name: getattr(entry.stats, name) for name in BALLOON_STAT_FIELDS},
                    "balloon_actual": entry.balloon_actual_bytes,
                }
                for entry in response.all_stats
            ]
        }
    elif isinstance(response, RebalanceMemoryResponse):
        payload = {
            "actual_deltas": [
                {"id": delta.vm_id, "delta": delta.delta_bytes} for delta in response.actual_deltas
            ]
        }
    elif isinstance(response, PrepareVmResponse):
        payload = {"res": response.res, "id": response.vm_id, "shortfall": response.shortfall_bytes}
    else:
        payload = {"res": response.res}
    return encode_frame(msg_type, _dump_json(payload))


# --- request encoding helpers -----------------------------------------------------------------


def _request_payload(request: MmsRequest[Any]) -> dict[str, object]:
    name = type(request).__name__
    if isinstance(request, GetBalloonStatsRequest):
        return {
            "ids": [
                _checked_vm_id(vm_id, f"{name}.vm_ids[{index}]")
                for index, vm_id in enumerate(request.vm_ids)
            ]
        }
    if isinstance(request, RebalanceMemoryRequest):
        return {
            "deltas": [
                {
                    "id": _checked_vm_id(delta.vm_id, f"{name}.deltas[{index}].vm_id"),
                    "delta": _checked_delta(
                        delta.delta_bytes, f"{name}.deltas[{index}].delta_bytes"
                    ),
                }
                for index, delta in enumerate(request.deltas)
            ]
        }
    if isinstance(request, PrepareVmRequest):
        return {
            "mem_size": _checked_size(request.mem_size_bytes, f"{name}.mem_size_bytes"),
            "init_mem_size": _checked_size(
                request.init_mem_size_bytes, f"{name}.init_mem_size_bytes"
            ),
        }
    if isinstance(request, FinishAddVmRequest | RemoveVmRequest):
        return {"id": _checked_vm_id(request.vm_id, f"{name}.vm_id")}
    raise RequestEncodeError(f"not an mms request: {request!r}")


def _require_int(value: object, field: str) -> int:
    # bool is an int subclass; json would write it as true/false, which mms rejects.
    if type(value) is not int:
        raise RequestEncodeError(f"{field} must be an int, got {type(value).__name__}")
    return value


def _checked_vm_id(value: object, field: str) -> int:
    vm_id = _require_int(value, field)
    if not 0 <= vm_id <= U32_MAX:
        raise RequestEncodeError(f"{field} must be in 0..{U32_MAX}, got {vm_id}")
    return vm_id


def _checked_size(value: object, field: str) -> int:
    size_bytes = _require_int(value, field)
    if size_bytes < 0:
        raise RequestEncodeError(f"{field} must not be negative, got {size_bytes}")
    if size_bytes > MAX_JSON_SAFE_INT:
        raise RequestEncodeError(
            f"{field} = {size_bytes} exceeds 2**53: mms reads it as a double and would round it"
        )
    return size_bytes


def _checked_delta(value: object, field: str) -> int:
    delta_bytes = _require_int(value, field)
    if abs(delta_bytes) > MAX_JSON_SAFE_INT:
        raise RequestEncodeError(
            f"{field} = {delta_bytes} exceeds 2**53 in magnitude: mms reads it as a double "
            "and would round it"
        )
    return delta_bytes


def _dump_json(payload: dict[str, object]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


# --- decoding helpers: every failure here is the peer's, so every one is a CodecError ---------


def _reject_constant(name: str) -> object:
    # Python's json accepts NaN/Infinity; neither mms nor Chromium's JSONReader do.
    raise ValueError(f"{name} is not valid JSON")


def _load_json_object(body: bytes, where: str) -> dict[str, object]:
    try:
        # Decode explicitly: json.loads(bytes) would also guess UTF-16/32, which mms never sends.
        text = bytes(body).decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        # ValueError covers JSONDecodeError and integers longer than Python's digit limit.
        raise CodecError(f"{where}: body is not valid UTF-8 JSON: {exc}") from exc
    return _object(value, f"{where}: body")


def _brief(value: object) -> str:
    # Never repr a container: a deeply nested one would recurse, a large one would flood logs.
    if isinstance(value, dict):
        return "a JSON object"
    if isinstance(value, list):
        return "a JSON array"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise CodecError(f"{where}: expected a JSON object, got {_brief(value)}")
    return cast(dict[str, object], value)


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise CodecError(f"{where}: expected a JSON array, got {_brief(value)}")
    return cast(list[object], value)


def _key(obj: dict[str, object], key: str, where: str) -> object:
    if key not in obj:
        raise CodecError(f"{where}: missing key {key!r}")
    return obj[key]


def _int_in(value: object, lo: int, hi: int, where: str) -> int:
    # Exactly int: rejects bools (an int subclass) and floats such as 1.0.
    if type(value) is not int:
        raise CodecError(f"{where}: expected an integer, got {_brief(value)}")
    if not lo <= value <= hi:
        raise CodecError(f"{where}: {value} is outside {lo}..{hi}")
    return value


def _int_field(obj: dict[str, object], key: str, lo: int, hi: int, where: str) -> int:
    return _int_in(_key(obj, key, where), lo, hi, f"{where}.{key}")


# Every stat crosvm reports, in BalloonStats order; a KeyError means some were not reported.
_ALL_STATS = operator.itemgetter(*BALLOON_STAT_FIELDS)


def _decode_balloon_stats_response(root: dict[str, object], where: str) -> GetBalloonStatsResponse:
    entries = _list(_key(root, "all_stats", where), f"{where}: all_stats")
    all_stats: list[VmBalloonStats] = []
    unreadable: list[UnreadableVm] = []
    for index, entry in enumerate(entries):
        # The hot path of every stats read (on the connection thread, under the GIL): check
        # values in bulk and build the "where" text of an error only when there is one.
        if type(entry) is dict and type(raw_stats := entry.get("stats")) is dict:
            try:
                values: tuple[object, ...] = _ALL_STATS(raw_stats)
            except KeyError:
                values = tuple(raw_stats.get(name) for name in BALLOON_STAT_FIELDS)
            present = [value for value in values if value is not None]
            vm_id, actual = entry.get("id"), entry.get("balloon_actual")
            if (
                # Exactly int: no bools (an int subclass), no floats such as 1.0.
                all(type(value) is int for value in present)
                and (not present or (min(present) >= 0 and max(present) <= MAX_JSON_SAFE_INT))  # type: ignore[type-var,operator]
                and type(vm_id) is int
                and 0 <= vm_id <= U32_MAX
                and type(actual) is int
                and 0 <= actual <= MAX_JSON_SAFE_INT
            ):
                stats = BalloonStats._make(cast(tuple[int | None, ...], values))
                all_stats.append(VmBalloonStats(vm_id, stats, actual))
                continue
        decoded = _checked_stats_entry(entry, f"{where}: all_stats[{index}]")
        if isinstance(decoded, UnreadableVm):
            unreadable.append(decoded)
        else:
            all_stats.append(decoded)
    return GetBalloonStatsResponse(all_stats=tuple(all_stats), unreadable=tuple(unreadable))


_ABSENT = object()


def _checked_stats_entry(entry: object, entry_where: str) -> VmBalloonStats | UnreadableVm:
    """The slow path: decode one entry field by field.

    An entry that names no VM (not an object, no valid id) breaks the whole answer: CodecError.
    One that names its VM but holds an impossible value makes only that VM unreadable: mms
    passes crosvm's figures through unchecked and wraps its own CrOS balloon arithmetic, so the
    other VMs' entries are still good.
    """
    fields = _object(entry, entry_where)
    vm_id = _int_field(fields, "id", 0, U32_MAX, entry_where)
    actual = fields.get("balloon_actual", _ABSENT)
    if (reason := _byte_count_problem(actual)) is not None:
        return UnreadableVm(vm_id, reason, "balloon_actual", _json_brief(actual))
    raw_stats = fields.get("stats", _ABSENT)
    if raw_stats is None or raw_stats is _ABSENT:
        return UnreadableVm(vm_id, UnreadableReason.MISSING, "stats", _json_brief(raw_stats))
    if type(raw_stats) is not dict:
        return UnreadableVm(vm_id, UnreadableReason.NOT_AN_OBJECT, "stats", _json_brief(raw_stats))
    stats: dict[str, int | None] = {}
    for name in BALLOON_STAT_FIELDS:
        raw = raw_stats.get(name)
        # Not reported is not zero: a guest that never sent free_memory has not run out.
        if raw is not None and (reason := _byte_count_problem(raw)) is not None:
            return UnreadableVm(vm_id, reason, f"stats.{name}", _json_brief(raw))
        stats[name] = cast(int | None, raw)
    return VmBalloonStats(
        vm_id=vm_id, stats=BalloonStats(**stats), balloon_actual_bytes=cast(int, actual)
    )


def _byte_count_problem(value: object) -> UnreadableReason | None:
    """Why ``value`` cannot be a byte amount or a count, or None if it can.

    Above 2^53 is impossible (no machine has 8 PiB) and would not survive a JSON double; a
    value in [2^63, 2^64) is what a u64 subtraction that went below 0 leaves (2^64 - x).
    """
    if value is None or value is _ABSENT:
        return UnreadableReason.MISSING
    if type(value) is not int:
        return UnreadableReason.NOT_AN_INTEGER
    if value < 0:
        return UnreadableReason.NEGATIVE
    if _I64_MAX < value <= _U64_MAX:
        return UnreadableReason.WRAPPED
    if value > MAX_JSON_SAFE_INT:
        return UnreadableReason.TOO_LARGE
    return None


def _json_brief(value: object) -> str:
    """``value`` as mms wrote it, short enough for a log line and an API field."""
    if value is _ABSENT:
        return "(absent)"
    if isinstance(value, dict | list):
        return _brief(value)
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _decode_delta(entry: object, where: str) -> BalloonDelta:
    fields = _object(entry, where)
    return BalloonDelta(
        vm_id=_int_field(fields, "id", 0, U32_MAX, where),
        delta_bytes=_int_field(fields, "delta", _I64_MIN, _I64_MAX, where),
    )
