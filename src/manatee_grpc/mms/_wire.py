"""The mms wire codec: the 8-byte frame header and the JSON bodies of the five messages.

Pure functions, no sockets. The bridge (client side) frames and parses through here, so every
protocol rule, and every way a peer can break it, lives in one place; the simulator (mms side)
frames its answers here and reads requests as serde_json did (sim/_decode.py).
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, NamedTuple, TypeVar, cast

import msgspec

from manatee_grpc.mms._memory_math import MAX_JSON_SAFE_INT
from manatee_grpc.mms._messages import (
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
HEADER = _HEADER  # for the connection's reader: it unpacks a whole frame's header in place
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

_GET_BALLOON_STATS = int(MessageType.GET_BALLOON_STATS)  # a plain int packs faster than the enum

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
    if type(request) is GetBalloonStatsRequest:
        # Every stats read and watch tick comes here: ids that are all plain ints in range are
        # written directly (a third of the general path's cost); any other goes the general
        # path, which names the bad one.
        vm_ids = request.vm_ids
        for vm_id in vm_ids:
            if type(vm_id) is not int or not 0 <= vm_id <= U32_MAX:
                break
        else:
            body = b'{"ids":[%s]}' % ",".join(map(str, vm_ids)).encode()
            return _HEADER.pack(len(body), _GET_BALLOON_STATS) + body
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
    response: Response
    if isinstance(request, GetBalloonStatsRequest):
        response = _decode_balloon_stats(body, where)
    elif isinstance(request, RebalanceMemoryRequest):
        deltas = _decode(_REBALANCE_MEMORY, body, where).actual_deltas
        response = RebalanceMemoryResponse(tuple(BalloonDelta(d.id, d.delta) for d in deltas))
    elif isinstance(request, PrepareVmRequest):
        prepared = _decode(_PREPARE_VM, body, where)
        if prepared.shortfall > _U64_MAX:
            raise CodecError(f"{where}: shortfall {prepared.shortfall} does not fit a u64")
        response = PrepareVmResponse(prepared.res, prepared.id, prepared.shortfall)
    elif isinstance(request, FinishAddVmRequest):
        response = FinishAddVmResponse(_decode(_RES, body, where).res)
    else:
        response = RemoveVmResponse(_decode(_RES, body, where).res)
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


# --- decoding: every failure here is the peer's, so every one is a CodecError -----------------
#
# Typed msgspec Structs check a body in one C pass: types (exactly int: no bools, no floats such
# as 1.0), ranges and required keys; unknown keys are ignored. A GetBalloonStats answer is
# checked entry by entry, so that one VM's impossible numbers cost no other VM its statistics.

_I32 = Annotated[int, msgspec.Meta(ge=_I32_MIN, le=_I32_MAX)]
_I64 = Annotated[int, msgspec.Meta(ge=_I64_MIN, le=_I64_MAX)]
_U32 = Annotated[int, msgspec.Meta(ge=0, le=U32_MAX)]
_U64 = Annotated[int, msgspec.Meta(ge=0)]  # msgspec takes no bound past 2^63: checked by hand
# A byte amount or count a VM can really have (_byte_count_problem says why the others can't).
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_JSON_SAFE_INT)]


# crosvm's BalloonStats, built from BalloonStats so the order matches; absent or null is None.
_Stats = msgspec.defstruct(
    "_Stats", [(name, _Count | None, None) for name in BALLOON_STAT_FIELDS], gc=False
)


class _StatsEntry(msgspec.Struct, gc=False):
    id: _U32
    stats: _Stats  # type: ignore[valid-type]  # built above, from the field names
    balloon_actual: _Count


class _BalloonStatsBody(msgspec.Struct, gc=False):
    all_stats: list[msgspec.Raw]  # each entry checked on its own


class _Delta(msgspec.Struct, gc=False):
    id: _U32
    delta: _I64


class _RebalanceMemoryBody(msgspec.Struct, gc=False):
    actual_deltas: list[_Delta]


class _PrepareVmBody(msgspec.Struct, gc=False):
    res: _I32
    id: _U32
    shortfall: _U64


class _ResBody(msgspec.Struct, gc=False):
    res: _I32


class _TypedBalloonStatsBody(msgspec.Struct, gc=False):
    all_stats: list[_StatsEntry]


_BALLOON_STATS = msgspec.json.Decoder(_BalloonStatsBody)
_BALLOON_STATS_TYPED = msgspec.json.Decoder(_TypedBalloonStatsBody)
# BalloonStats is a NamedTuple: tuple.__new__ builds one from a tuple without _make's Python call.
_new_tuple = tuple.__new__
_astuple = msgspec.structs.astuple
_STATS_ENTRY = msgspec.json.Decoder(_StatsEntry)
_REBALANCE_MEMORY = msgspec.json.Decoder(_RebalanceMemoryBody)
_PREPARE_VM = msgspec.json.Decoder(_PrepareVmBody)
_RES = msgspec.json.Decoder(_ResBody)
_T = TypeVar("_T")


def _decode(decoder: msgspec.json.Decoder[_T], body: bytes, where: str) -> _T:
    try:
        # UTF-8 first and explicitly: msgspec does not check the strings it skips.
        return decoder.decode(bytes(body).decode("utf-8"))
    except msgspec.ValidationError as exc:  # "Expected `int` <= 2147483647 - at `$.res`"
        raise CodecError(f"{where}: {exc}") from exc
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError) as exc:
        raise CodecError(f"{where}: body is not valid UTF-8 JSON: {exc}") from exc


def _decode_balloon_stats(body: bytes, where: str) -> GetBalloonStatsResponse:
    try:
        # The usual answer, every entry good, in one typed pass (about half the cost of the
        # entry-by-entry pass below, which gives the same result for such an answer).
        entries = _BALLOON_STATS_TYPED.decode(bytes(body).decode("utf-8")).all_stats
    except (UnicodeDecodeError, msgspec.DecodeError, RecursionError):
        return _decode_balloon_stats_by_entry(body, where)
    return GetBalloonStatsResponse(
        all_stats=tuple(
            [
                VmBalloonStats(
                    entry.id, _new_tuple(BalloonStats, _astuple(entry.stats)), entry.balloon_actual
                )
                for entry in entries
            ]
        )
    )


def _decode_balloon_stats_by_entry(body: bytes, where: str) -> GetBalloonStatsResponse:
    """A GetBalloonStats answer checked entry by entry: one VM's impossible numbers cost no
    other VM its statistics (they make that VM unreadable), and a broken answer is named."""
    all_stats: list[VmBalloonStats] = []
    unreadable: list[UnreadableVm] = []
    for index, raw in enumerate(_decode(_BALLOON_STATS, body, where).all_stats):
        try:
            entry = _STATS_ENTRY.decode(raw)
        except (msgspec.DecodeError, RecursionError):
            decoded = _checked_stats_entry(raw, f"{where}: all_stats[{index}]")
            if isinstance(decoded, UnreadableVm):
                unreadable.append(decoded)
            else:
                all_stats.append(decoded)
            continue
        stats = _new_tuple(BalloonStats, _astuple(entry.stats))
        all_stats.append(VmBalloonStats(entry.id, stats, entry.balloon_actual))
    return GetBalloonStatsResponse(all_stats=tuple(all_stats), unreadable=tuple(unreadable))


_ABSENT = object()


def _checked_stats_entry(raw: msgspec.Raw, where: str) -> VmBalloonStats | UnreadableVm:
    """One entry that failed the typed check, read again and checked field by field.

    An entry that names no VM (not an object, no valid id) breaks the whole answer: CodecError.
    One that names its VM but holds an impossible value makes only that VM unreadable: mms
    passes crosvm's figures through unchecked and wraps its own CrOS balloon arithmetic, so the
    other VMs' entries are still good.
    """
    try:
        # The standard library, not msgspec: it keeps integers of any size exact, so a value
        # past 2^64 is reported as TOO_LARGE, with its digits.
        entry = json.loads(bytes(raw))
    except (ValueError, RecursionError) as exc:  # ValueError: past Python's digit limit
        raise CodecError(f"{where}: not valid JSON: {exc}") from exc
    if type(entry) is not dict:
        raise CodecError(f"{where}: expected a JSON object, got {_json_brief(entry)}")
    vm_id = entry.get("id", _ABSENT)
    if type(vm_id) is not int or not 0 <= vm_id <= U32_MAX:
        raise CodecError(
            f"{where}.id: expected an integer in 0..{U32_MAX}, got {_json_brief(vm_id)}"
        )
    actual = entry.get("balloon_actual", _ABSENT)
    if (reason := _byte_count_problem(actual)) is not None:
        return UnreadableVm(vm_id, reason, "balloon_actual", _json_brief(actual))
    raw_stats = entry.get("stats", _ABSENT)
    if raw_stats is None or raw_stats is _ABSENT:
        return UnreadableVm(vm_id, UnreadableReason.MISSING, "stats", _json_brief(raw_stats))
    if type(raw_stats) is not dict:
        return UnreadableVm(vm_id, UnreadableReason.NOT_AN_OBJECT, "stats", _json_brief(raw_stats))
    values = [raw_stats.get(name) for name in BALLOON_STAT_FIELDS]
    for name, value in zip(BALLOON_STAT_FIELDS, values, strict=True):
        # Not reported is not zero: a guest that never sent free_memory has not run out.
        if value is not None and (reason := _byte_count_problem(value)) is not None:
            return UnreadableVm(vm_id, reason, f"stats.{name}", _json_brief(value))
    # Good after all: a key given twice, whose last value (the one that counts) is good.
    return VmBalloonStats(vm_id, BalloonStats._make(values), cast(int, actual))


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
    # Never dump a container: a deeply nested one would recurse, a large one would flood logs.
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
