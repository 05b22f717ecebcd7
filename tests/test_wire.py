"""Tests for the mms wire codec: exact bytes, round trips, every rejection rule, and fuzzing.

Pure: no sockets. The fuzz tests check the one promise the connection relies on, that a broken
peer only ever produces CodecError from the decode functions.
"""

from __future__ import annotations

import json
import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manatee_grpc.mms import _wire
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
    Request,
    Response,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)
from manatee_grpc.mms._wire import (
    DEFAULT_MAX_BODY_BYTES,
    HEADER_SIZE_BYTES,
    CodecError,
    FrameHeader,
    RequestEncodeError,
    check_response_header,
    decode_header,
    decode_response,
    encode_frame,
    encode_request,
    encode_response,
)
from manatee_grpc.sim._decode import decode_request as mms_decode_request

I64_MIN, I64_MAX = -(2**63), 2**63 - 1
U64_MAX = 2**64 - 1
JSON_SAFE = 2**53

ALL_REQUESTS: tuple[MmsRequest[Any], ...] = (
    GetBalloonStatsRequest(vm_ids=(0, 1)),
    RebalanceMemoryRequest(deltas=(BalloonDelta(1, 4096), BalloonDelta(0, -4096))),
    PrepareVmRequest(mem_size_bytes=1 << 30, init_mem_size_bytes=1 << 29),
    FinishAddVmRequest(vm_id=1),
    RemoveVmRequest(vm_id=1),
)


def split_frame(frame: bytes) -> tuple[FrameHeader, bytes]:
    header = decode_header(frame[:HEADER_SIZE_BYTES])
    body = frame[HEADER_SIZE_BYTES:]
    assert header.body_len_bytes == len(body)
    return header, body


def body_of(payload: object) -> bytes:
    return json.dumps(payload).encode()


# --- framing ----------------------------------------------------------------------------------


def test_encode_frame_is_little_endian_len_then_type() -> None:
    assert encode_frame(3, b"{}") == b"\x02\x00\x00\x00\x03\x00\x00\x00{}"


def test_decode_header_round_trips() -> None:
    assert decode_header(encode_frame(5, b"abc")[:8]) == FrameHeader(body_len_bytes=3, msg_type=5)


@pytest.mark.parametrize("length", [0, 1, 7, 9, 16])
def test_decode_header_refuses_wrong_length(length: int) -> None:
    with pytest.raises(CodecError, match="8 bytes"):
        decode_header(b"\x00" * length)


def test_encode_frame_refuses_type_outside_u32() -> None:
    with pytest.raises(ValueError, match="u32"):
        encode_frame(2**32, b"")


def test_check_response_header_accepts_matching_type_at_cap() -> None:
    header = FrameHeader(body_len_bytes=DEFAULT_MAX_BODY_BYTES, msg_type=1)
    check_response_header(header, MessageType.GET_BALLOON_STATS)  # raises if refused
    with pytest.raises(CodecError):
        check_response_header(
            header._replace(body_len_bytes=DEFAULT_MAX_BODY_BYTES + 1),
            MessageType.GET_BALLOON_STATS,
        )


def test_check_response_header_refuses_other_type() -> None:
    with pytest.raises(CodecError, match="does not match"):
        check_response_header(FrameHeader(2, 2), MessageType.PREPARE_VM)


def test_check_response_header_refuses_body_over_cap() -> None:
    with pytest.raises(CodecError, match="cap"):
        check_response_header(FrameHeader(101, 4), MessageType.FINISH_ADD_VM, max_body_bytes=100)


def test_four_gib_length_is_refused_from_the_header_alone() -> None:
    # Only the 8 header bytes exist: the refusal must come before anyone reads a body.
    header = decode_header(struct.pack("<II", 0xFFFFFFFF, 1))
    assert header.body_len_bytes == 2**32 - 1
    with pytest.raises(CodecError, match="exceeds"):
        check_response_header(header, MessageType.GET_BALLOON_STATS)


# --- requests: exact bytes, refusals, and the mms side reading them back -----------------------


@pytest.mark.parametrize(
    ("request_", "expected_body"),
    [
        (GetBalloonStatsRequest(vm_ids=(0, 7)), b'{"ids":[0,7]}'),
        (GetBalloonStatsRequest(vm_ids=()), b'{"ids":[]}'),
        (
            RebalanceMemoryRequest(deltas=(BalloonDelta(1, 8192), BalloonDelta(0, -8192))),
            b'{"deltas":[{"id":1,"delta":8192},{"id":0,"delta":-8192}]}',
        ),
        (
            PrepareVmRequest(mem_size_bytes=JSON_SAFE, init_mem_size_bytes=0),
            b'{"mem_size":9007199254740992,"init_mem_size":0}',
        ),
        (FinishAddVmRequest(vm_id=U32_MAX), b'{"id":4294967295}'),
        (RemoveVmRequest(vm_id=3), b'{"id":3}'),
    ],
)
def test_encode_request_exact_bytes(request_: MmsRequest[Any], expected_body: bytes) -> None:
    header, body = split_frame(encode_request(request_))
    assert header.msg_type == request_.TYPE
    assert body == expected_body


def test_empty_request_dict_is_a_zero_length_body(monkeypatch: pytest.MonkeyPatch) -> None:
    # No request we build today is empty, so force the C++ client's empty-dict case.
    monkeypatch.setattr(_wire, "_request_payload", lambda request: {})
    assert encode_request(FinishAddVmRequest(vm_id=1)) == struct.pack("<II", 0, 4)


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (GetBalloonStatsRequest(vm_ids=(1, -1)), r"vm_ids\[1\]"),
        (GetBalloonStatsRequest(vm_ids=(2**32,)), r"vm_ids\[0\]"),
        (GetBalloonStatsRequest(vm_ids=(True,)), r"vm_ids\[0\]"),
        (RebalanceMemoryRequest(deltas=(BalloonDelta(2**32, 0),)), r"deltas\[0\]\.vm_id"),
        (RebalanceMemoryRequest(deltas=(BalloonDelta(1, JSON_SAFE + 1),)), "delta_bytes"),
        (RebalanceMemoryRequest(deltas=(BalloonDelta(1, -JSON_SAFE - 1),)), "delta_bytes"),
        (PrepareVmRequest(mem_size_bytes=JSON_SAFE + 1, init_mem_size_bytes=0), "mem_size_bytes"),
        (PrepareVmRequest(mem_size_bytes=4096, init_mem_size_bytes=-1), "init_mem_size_bytes"),
        (PrepareVmRequest(mem_size_bytes=4096.0, init_mem_size_bytes=0), "mem_size_bytes"),  # type: ignore[arg-type]
        (FinishAddVmRequest(vm_id=-1), "vm_id"),
        (RemoveVmRequest(vm_id=2**32), "vm_id"),
    ],
)
def test_encode_request_refuses_values_mms_would_misread(
    request_: MmsRequest[Any], field: str
) -> None:
    with pytest.raises(RequestEncodeError, match=field):
        encode_request(request_)


def test_request_encode_error_is_a_value_error() -> None:
    assert issubclass(RequestEncodeError, ValueError)


def test_deltas_of_exactly_two_to_the_53_are_sent() -> None:
    request = RebalanceMemoryRequest(
        deltas=(BalloonDelta(1, JSON_SAFE), BalloonDelta(0, -JSON_SAFE))
    )
    header, body = split_frame(encode_request(request))
    assert mms_decode_request(header.msg_type, body) == request


vm_ids = st.integers(0, U32_MAX)
safe_sizes = st.integers(0, JSON_SAFE)
safe_deltas = st.integers(-JSON_SAFE, JSON_SAFE)
requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(GetBalloonStatsRequest, vm_ids=st.lists(vm_ids).map(tuple)),
    st.builds(
        RebalanceMemoryRequest,
        deltas=st.lists(st.builds(BalloonDelta, vm_ids, safe_deltas)).map(tuple),
    ),
    st.builds(PrepareVmRequest, mem_size_bytes=safe_sizes, init_mem_size_bytes=safe_sizes),
    st.builds(FinishAddVmRequest, vm_id=vm_ids),
    st.builds(RemoveVmRequest, vm_id=vm_ids),
)


@given(requests)
def test_every_request_round_trips_through_the_mms_side(request: Request) -> None:
    """mms (the simulator's serde_json-faithful reader) reads what the bridge sent."""
    header, body = split_frame(encode_request(request))
    assert header.msg_type == request.TYPE
    assert mms_decode_request(header.msg_type, body) == request


# --- responses: round trips and every rejection rule -----------------------------------------

u64s = st.integers(0, U64_MAX)
# A byte amount or count a guest can really have: the bridge reads anything above 2^53 as
# impossible (see the unreadable tests below).
byte_counts = st.integers(0, JSON_SAFE)
stats_values = st.one_of(st.none(), byte_counts)
balloon_stats = st.builds(BalloonStats, **{name: stats_values for name in BALLOON_STAT_FIELDS})
responses_for_requests: st.SearchStrategy[tuple[MmsRequest[Any], Response]] = st.one_of(
    st.tuples(
        st.just(ALL_REQUESTS[0]),
        st.builds(
            GetBalloonStatsResponse,
            all_stats=st.lists(st.builds(VmBalloonStats, vm_ids, balloon_stats, byte_counts)).map(
                tuple
            ),
        ),
    ),
    st.tuples(
        st.just(ALL_REQUESTS[1]),
        st.builds(
            RebalanceMemoryResponse,
            actual_deltas=st.lists(
                st.builds(BalloonDelta, vm_ids, st.integers(I64_MIN, I64_MAX))
            ).map(tuple),
        ),
    ),
    st.tuples(
        st.just(ALL_REQUESTS[2]),
        st.builds(PrepareVmResponse, st.integers(-(2**31), 2**31 - 1), vm_ids, u64s),
    ),
    st.tuples(st.just(ALL_REQUESTS[3]), st.builds(FinishAddVmResponse, st.integers(-(2**31), 0))),
    st.tuples(st.just(ALL_REQUESTS[4]), st.builds(RemoveVmResponse, st.integers(-(2**31), 0))),
)


@given(responses_for_requests)
def test_every_response_round_trips(pair: tuple[MmsRequest[Any], Response]) -> None:
    request, response = pair
    header, body = split_frame(encode_response(request.TYPE, response))
    check_response_header(header, request.TYPE)
    assert decode_response(request, body) == response


def test_encode_response_writes_none_stats_as_null() -> None:
    response = GetBalloonStatsResponse(
        all_stats=(VmBalloonStats(2, BalloonStats(free_memory=0, swap_in=5), 4096),)
    )
    _, body = split_frame(encode_response(MessageType.GET_BALLOON_STATS, response))
    stats = json.loads(body)["all_stats"][0]["stats"]
    assert stats["free_memory"] == 0
    assert stats["swap_in"] == 5
    assert stats["total_memory"] is None
    assert set(stats) == set(BALLOON_STAT_FIELDS)


def test_encode_response_writes_the_type_it_is_given() -> None:
    frame = encode_response(MessageType.REMOVE_VM, FinishAddVmResponse(res=0))
    assert split_frame(frame) == (FrameHeader(9, MessageType.REMOVE_VM), b'{"res":0}')


def test_missing_and_null_stats_stay_none_not_zero() -> None:
    body = body_of(
        {
            "all_stats": [
                {
                    "id": 0,
                    "stats": {"swap_in": None, "free_memory": 0, "total_memory": 1 << 30},
                    "balloon_actual": 0,
                }
            ]
        }
    )
    response = decode_response(GetBalloonStatsRequest(vm_ids=(0,)), body)
    stats = response.all_stats[0].stats
    assert stats.swap_in is None
    assert stats.swap_out is None
    assert stats.free_memory == 0
    assert stats.total_memory == 1 << 30


def test_unknown_keys_are_ignored() -> None:
    body = body_of({"res": -12, "id": 3, "shortfall": 4096, "extra": [1, {"x": None}]})
    response = decode_response(PrepareVmRequest(4096, 4096), body)
    assert response == PrepareVmResponse(res=-12, vm_id=3, shortfall_bytes=4096)


def test_negative_delta_is_accepted() -> None:
    body = body_of({"actual_deltas": [{"id": 0, "delta": -(2**40)}]})
    response = decode_response(ALL_REQUESTS[1], body)
    assert response == RebalanceMemoryResponse(actual_deltas=(BalloonDelta(0, -(2**40)),))


def test_empty_all_stats_is_an_empty_response() -> None:
    response = decode_response(ALL_REQUESTS[0], b'{"all_stats": []}')
    assert response == GetBalloonStatsResponse(all_stats=())


def _entry(**overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {"id": 1, "stats": {"free_memory": 4096}, "balloon_actual": 0}
    entry.update(overrides)
    return {"all_stats": [entry]}


BAD_RESPONSES: list[tuple[int, bytes, str]] = [
    # (index into ALL_REQUESTS, body, what the error must say: the field and the problem)
    (3, b"", "not valid UTF-8 JSON"),
    (3, b'{"res": 0', "not valid UTF-8 JSON"),
    (3, b'{"res": "\xff"}', "not valid UTF-8 JSON"),
    (3, b'{"res": 0, "note": "\xff"}', "not valid UTF-8 JSON"),
    (3, b'\xef\xbb\xbf{"res": 0}', "not valid UTF-8 JSON"),
    (3, '{"res": 0}'.encode("utf-16"), "not valid UTF-8 JSON"),
    (3, b'{"res": NaN}', "not valid UTF-8 JSON"),
    (3, b'{"res": -Infinity}', "not valid UTF-8 JSON"),
    (3, b'{"res": ' + b"9" * 5000 + b"}", "Integer value out of range - at `$.res`"),
    (3, b"[" * 100_000 + b"]" * 100_000, "Expected `object`, got `array`"),
    (3, b'{"res": 0, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid UTF-8 JSON"),
    (3, b"[]", "Expected `object`, got `array`"),
    (3, b"0", "Expected `object`, got `int`"),
    (3, b'"res"', "Expected `object`, got `str`"),
    (3, b"null", "Expected `object`, got `null`"),
    (3, b"{}", "missing required field `res`"),
    (3, b'{"res": 0.0}', "Expected `int`, got `float` - at `$.res`"),
    (3, b'{"res": 1.5}', "Expected `int`, got `float` - at `$.res`"),
    (3, b'{"res": false}', "Expected `int`, got `bool` - at `$.res`"),
    (3, b'{"res": "0"}', "Expected `int`, got `str` - at `$.res`"),
    (3, b'{"res": null}', "Expected `int`, got `null` - at `$.res`"),
    (3, b'{"res": 2147483648}', "Expected `int` <= 2147483647 - at `$.res`"),
    (4, b'{"res": -2147483649}', "Expected `int` >= -2147483648 - at `$.res`"),
    (2, b'{"res": 0, "id": 1}', "missing required field `shortfall`"),
    (2, b'{"res": 0, "shortfall": 0}', "missing required field `id`"),
    (2, b'{"res": 0, "id": -1, "shortfall": 0}', "Expected `int` >= 0 - at `$.id`"),
    (
        2,
        b'{"res": 0, "id": 4294967296, "shortfall": 0}',
        "Expected `int` <= 4294967295 - at `$.id`",
    ),
    (2, b'{"res": 0, "id": 1, "shortfall": -4096}', "Expected `int` >= 0 - at `$.shortfall`"),
    (
        2,
        b'{"res": 0, "id": 1, "shortfall": 18446744073709551616}',
        "shortfall 18446744073709551616 does not fit a u64",
    ),
    (
        2,
        b'{"res": 0, "id": 1, "shortfall": 4096.0}',
        "Expected `int`, got `float` - at `$.shortfall`",
    ),
    (1, b"{}", "missing required field `actual_deltas`"),
    (1, b'{"actual_deltas": {}}', "Expected `array`, got `object` - at `$.actual_deltas`"),
    (1, b'{"actual_deltas": [1]}', "Expected `object`, got `int` - at `$.actual_deltas[0]`"),
    (
        1,
        b'{"actual_deltas": [{"id": 1}]}',
        "missing required field `delta` - at `$.actual_deltas[0]`",
    ),
    (
        1,
        b'{"actual_deltas": [{"delta": 1}]}',
        "missing required field `id` - at `$.actual_deltas[0]`",
    ),
    (
        1,
        b'{"actual_deltas": [{"id": 1, "delta": 1.0}]}',
        "Expected `int`, got `float` - at `$.actual_deltas[0].delta`",
    ),
    (
        1,
        b'{"actual_deltas": [{"id": 1, "delta": 9223372036854775808}]}',
        "Expected `int` <= 9223372036854775807 - at `$.actual_deltas[0].delta`",
    ),
    (0, b"{}", "missing required field `all_stats`"),
    (0, b'{"all_stats": null}', "Expected `array`, got `null` - at `$.all_stats`"),
    (0, b'{"all_stats": [[]]}', "all_stats[0]: expected a JSON object, got a JSON array"),
    (
        0,
        body_of(_entry(id=None)),
        "all_stats[0].id: expected an integer in 0..4294967295, got null",
    ),
    (0, body_of(_entry(id=-1)), "all_stats[0].id: expected an integer in 0..4294967295, got -1"),
    (0, body_of(_entry(id=4294967296)), "all_stats[0].id: expected an integer in 0..4294967295"),
    (0, body_of(_entry(id=1.0)), "all_stats[0].id: expected an integer in 0..4294967295, got 1.0"),
    (
        0,
        body_of({"all_stats": [{"stats": {}, "balloon_actual": 0}]}),
        "all_stats[0].id: expected an integer in 0..4294967295, got (absent)",
    ),
    # A number past Python's digit limit in one entry: the whole answer is refused, as before.
    (
        0,
        b'{"all_stats": [{"id": 1, "stats": {}, "balloon_actual": ' + b"9" * 5000 + b"}]}",
        "all_stats[0]: not valid JSON",
    ),
    # An entry that names no VM spoils the answer even next to a good one.
    (
        0,
        body_of({"all_stats": [{"id": 1, "stats": {}, "balloon_actual": 0}, 7]}),
        "all_stats[1]: expected a JSON object, got 7",
    ),
]


@pytest.mark.parametrize(("request_index", "body", "reason"), BAD_RESPONSES)
def test_decode_response_rejects_malformed_bodies(
    request_index: int, body: bytes, reason: str
) -> None:
    with pytest.raises(CodecError, match=re.escape(reason)):
        decode_response(ALL_REQUESTS[request_index], body)


def test_decode_errors_chain_the_underlying_error() -> None:
    with pytest.raises(CodecError) as caught:
        decode_response(ALL_REQUESTS[3], b"\xff")
    assert isinstance(caught.value.__cause__, UnicodeDecodeError)


# --- fuzzing: a broken peer produces CodecError and nothing else -------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
response_keys = st.sampled_from(
    [
        "all_stats",
        "id",
        "stats",
        "balloon_actual",
        "actual_deltas",
        "delta",
        "res",
        "shortfall",
        *BALLOON_STAT_FIELDS,
    ]
)


def structured(keys: st.SearchStrategy[str]) -> st.SearchStrategy[object]:
    """JSON that uses the protocol's keys at every level, with arbitrary values under them."""
    return st.recursive(
        json_values,
        lambda children: (
            st.lists(children, max_size=3) | st.dictionaries(keys, children, max_size=5)
        ),
        max_leaves=30,
    )


RESPONSE_CLASSES: dict[type[Any], type[Any]] = {
    GetBalloonStatsRequest: GetBalloonStatsResponse,
    RebalanceMemoryRequest: RebalanceMemoryResponse,
    PrepareVmRequest: PrepareVmResponse,
    FinishAddVmRequest: FinishAddVmResponse,
    RemoveVmRequest: RemoveVmResponse,
}


def decode_or_codec_error(request: MmsRequest[Any], body: bytes) -> None:
    """Any exception but CodecError fails the test; a success must be the request's response."""
    try:
        response = decode_response(request, body)
    except CodecError:
        return
    assert isinstance(response, RESPONSE_CLASSES[type(request)])


@settings(deadline=None)
@given(st.binary(max_size=16))
def test_fuzz_decode_header(data: bytes) -> None:
    try:
        header = decode_header(data)
    except CodecError:
        assert len(data) != HEADER_SIZE_BYTES
    else:
        assert struct.pack("<II", header.body_len_bytes, header.msg_type) == data


@settings(deadline=None)
@given(st.integers(0, U32_MAX), st.integers(0, U32_MAX), st.sampled_from(list(MessageType)))
def test_fuzz_check_response_header(
    body_len_bytes: int, msg_type: int, expected: MessageType
) -> None:
    try:
        check_response_header(FrameHeader(body_len_bytes, msg_type), expected)
    except CodecError:
        assert msg_type != expected or body_len_bytes > DEFAULT_MAX_BODY_BYTES
    else:
        assert msg_type == expected
        assert body_len_bytes <= DEFAULT_MAX_BODY_BYTES


@settings(deadline=None)
@given(st.sampled_from(ALL_REQUESTS), st.binary(max_size=64))
def test_fuzz_decode_response_on_arbitrary_bytes(request: MmsRequest[Any], body: bytes) -> None:
    decode_or_codec_error(request, body)


@settings(deadline=None)
@given(st.sampled_from(ALL_REQUESTS), structured(response_keys))
def test_fuzz_decode_response_on_structured_json(request: MmsRequest[Any], value: object) -> None:
    decode_or_codec_error(request, json.dumps(value).encode())


# --- one VM's impossible numbers: that VM is unreadable, the rest of the answer stands ----------

WRAPPED_CROS_BALLOON = 18446744073675997184  # 2^64 - 32 MiB: what real mms reports for VM 0
ABSENT = object()

# (what VM 1's entry gets, its reason, the mms field named, the value as mms sent it)
UNREADABLE_CASES: dict[str, tuple[dict[str, object], UnreadableReason, str, str]] = {
    "wrapped-balloon": (
        {"balloon_actual": WRAPPED_CROS_BALLOON},
        UnreadableReason.WRAPPED,
        "balloon_actual",
        "18446744073675997184",
    ),
    "balloon-2^63": (
        {"balloon_actual": 2**63},
        UnreadableReason.WRAPPED,
        "balloon_actual",
        str(2**63),
    ),
    "balloon-u64-max": (
        {"balloon_actual": U64_MAX},
        UnreadableReason.WRAPPED,
        "balloon_actual",
        str(U64_MAX),
    ),
    "balloon-over-2^53": (
        {"balloon_actual": JSON_SAFE + 1},
        UnreadableReason.TOO_LARGE,
        "balloon_actual",
        str(JSON_SAFE + 1),
    ),
    "balloon-over-u64": (
        {"balloon_actual": 2**64},
        UnreadableReason.TOO_LARGE,
        "balloon_actual",
        str(2**64),
    ),
    "negative-balloon": ({"balloon_actual": -1}, UnreadableReason.NEGATIVE, "balloon_actual", "-1"),
    "float-balloon": (
        {"balloon_actual": 4096.0},
        UnreadableReason.NOT_AN_INTEGER,
        "balloon_actual",
        "4096.0",
    ),
    "string-balloon": (
        {"balloon_actual": "4096"},
        UnreadableReason.NOT_AN_INTEGER,
        "balloon_actual",
        '"4096"',
    ),
    "bool-balloon": (
        {"balloon_actual": True},
        UnreadableReason.NOT_AN_INTEGER,
        "balloon_actual",
        "true",
    ),
    "null-balloon": ({"balloon_actual": None}, UnreadableReason.MISSING, "balloon_actual", "null"),
    "absent-balloon": (
        {"balloon_actual": ABSENT},
        UnreadableReason.MISSING,
        "balloon_actual",
        "(absent)",
    ),
    "null-stats": ({"stats": None}, UnreadableReason.MISSING, "stats", "null"),
    "absent-stats": ({"stats": ABSENT}, UnreadableReason.MISSING, "stats", "(absent)"),
    "array-stats": ({"stats": []}, UnreadableReason.NOT_AN_OBJECT, "stats", "a JSON array"),
    "number-stats": ({"stats": 7}, UnreadableReason.NOT_AN_OBJECT, "stats", "7"),
    "negative-free-memory": (
        {"stats": {"free_memory": -1}},
        UnreadableReason.NEGATIVE,
        "stats.free_memory",
        "-1",
    ),
    "wrapped-stat": (
        {"stats": {"total_memory": WRAPPED_CROS_BALLOON}},
        UnreadableReason.WRAPPED,
        "stats.total_memory",
        "18446744073675997184",
    ),
    "stat-over-2^53": (
        {"stats": {"available_memory": JSON_SAFE + 1}},
        UnreadableReason.TOO_LARGE,
        "stats.available_memory",
        str(JSON_SAFE + 1),
    ),
    "float-stat": (
        {"stats": {"swap_in": 1.5}},
        UnreadableReason.NOT_AN_INTEGER,
        "stats.swap_in",
        "1.5",
    ),
    "string-stat": (
        {"stats": {"free_memory": "4096"}},
        UnreadableReason.NOT_AN_INTEGER,
        "stats.free_memory",
        '"4096"',
    ),
    "bool-stat": (
        {"stats": {"swap_in": True}},
        UnreadableReason.NOT_AN_INTEGER,
        "stats.swap_in",
        "true",
    ),
    "array-stat": (
        {"stats": {"swap_in": [1]}},
        UnreadableReason.NOT_AN_INTEGER,
        "stats.swap_in",
        "a JSON array",
    ),
}

GOOD_CROS = {"id": 0, "stats": {"free_memory": 1 << 30}, "balloon_actual": 4096}
GOOD_SIBLING = {"id": 2, "stats": {"free_memory": 1 << 29}, "balloon_actual": 0}


@pytest.mark.parametrize("case", UNREADABLE_CASES)
def test_an_impossible_value_makes_only_its_vm_unreadable(case: str) -> None:
    overrides, reason, mms_field, mms_value = UNREADABLE_CASES[case]
    bad: dict[str, object] = {"id": 1, "stats": {"free_memory": 4096}, "balloon_actual": 0}
    bad.update(overrides)
    bad = {key: value for key, value in bad.items() if value is not ABSENT}
    body = body_of({"all_stats": [GOOD_CROS, bad, GOOD_SIBLING]})

    response = decode_response(GetBalloonStatsRequest(vm_ids=(0, 1, 2)), body)

    assert response.unreadable == (UnreadableVm(1, reason, mms_field, mms_value),)
    assert [entry.vm_id for entry in response.all_stats] == [0, 2]
    assert response.all_stats[0].balloon_actual_bytes == 4096
    assert response.all_stats[1].stats.free_memory == 1 << 29


def test_2_to_the_53_is_still_a_number() -> None:
    entry = {"id": 0, "stats": {"total_memory": JSON_SAFE}, "balloon_actual": JSON_SAFE}
    response = decode_response(ALL_REQUESTS[0], body_of({"all_stats": [entry]}))
    assert response.unreadable == ()
    assert response.all_stats[0].balloon_actual_bytes == JSON_SAFE
    assert response.all_stats[0].stats.total_memory == JSON_SAFE


def test_a_key_given_twice_counts_its_last_value() -> None:
    # As Python's json (and serde_json's Value) read it; the typed check alone would refuse it.
    body = (
        b'{"all_stats": [{"id": 4, "balloon_actual": -1, "balloon_actual": 8192,'
        b' "stats": {"free_memory": "x", "free_memory": 4096}}]}'
    )
    response = decode_response(ALL_REQUESTS[0], body)
    assert response == GetBalloonStatsResponse(
        all_stats=(VmBalloonStats(4, BalloonStats(free_memory=4096), 8192),)
    )


def test_a_long_impossible_value_is_cut_for_the_log() -> None:
    entry = {"id": 3, "stats": {"swap_out": "x" * 100}, "balloon_actual": 0}
    (unreadable,) = decode_response(ALL_REQUESTS[0], body_of({"all_stats": [entry]})).unreadable
    assert unreadable.mms_value == '"' + "x" * 36 + "..."


@settings(deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": st.integers(0, U32_MAX)},
            optional={
                "stats": st.one_of(
                    json_values,
                    st.dictionaries(st.sampled_from(BALLOON_STAT_FIELDS), json_values),
                ),
                "balloon_actual": json_values,
            },
        ),
        max_size=4,
    )
)
def test_every_entry_with_an_id_is_either_served_or_unreadable(
    entries: list[dict[str, object]],
) -> None:
    response = decode_response(ALL_REQUESTS[0], body_of({"all_stats": entries}))
    assert len(response.all_stats) + len(response.unreadable) == len(entries)
    for entry in response.all_stats:
        values = [entry.balloon_actual_bytes, *entry.stats]
        assert all(v is None or (type(v) is int and 0 <= v <= JSON_SAFE) for v in values)
