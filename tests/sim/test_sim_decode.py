"""The simulator reads request bodies as mms's serde_json did (sim._decode), unit by unit."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from manatee_grpc.mms._messages import (
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    MessageType,
    PrepareVmRequest,
    RebalanceMemoryRequest,
    RemoveVmRequest,
    Request,
)
from manatee_grpc.sim._decode import RequestDecodeError, decode_request

U64_MAX = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1


@pytest.mark.parametrize(
    ("msg_type", "body", "expected"),
    [
        # A struct is an object or an array of its fields in order.
        (5, b"[7]", RemoveVmRequest(7)),
        (4, b'{"id": 7}', FinishAddVmRequest(7)),
        (1, b"[[0, 1, 1]]", GetBalloonStatsRequest((0, 1, 1))),
        (2, b'[[[1, 4096], {"delta": -4096, "id": 0}]]', None),
        (3, b"[1073741824, 0]", PrepareVmRequest(1 << 30, 0)),
        # Unknown keys are skipped, whatever they hold (duplicates, numbers beyond f64, bytes
        # that are not UTF-8, lone surrogates), as long as it is JSON.
        (5, b'{"id": 7, "x": 1, "x": [1e999, {"id": 1, "id": 2}]}', RemoveVmRequest(7)),
        (5, b'{"id": 7, "x": "\xff\xfe", "y": "\\ud800"}', RemoveVmRequest(7)),
        # Whitespace around the value is JSON's.
        (5, b' \t\r\n{"id" : 7}\n', RemoveVmRequest(7)),
        # Ids: integer literals in u32 range.
        (5, b'{"id": 4294967295}', RemoveVmRequest(4294967295)),
        # Sizes and deltas: f64, then Rust's saturating `as`.
        (3, b'{"mem_size": 4096.99, "init_mem_size": -1e300}', PrepareVmRequest(4096, 0)),
        (3, b'{"mem_size": 1e30, "init_mem_size": 18446744073709551615}', None),
        (2, b'{"deltas": [{"id": 1, "delta": -1e30}, {"id": 2, "delta": 1e19}]}', None),
        (2, b'{"deltas": [{"id": 1, "delta": -0}, {"id": 2, "delta": 4096e0}]}', None),
        # Integers beyond u64 are doubles to serde_json: still numbers, rounded.
        (3, b'{"mem_size": 36893488147419103232, "init_mem_size": 1E3}', None),
    ],
)
def test_bodies_mms_accepted(msg_type: int, body: bytes, expected: Request | None) -> None:
    request = decode_request(msg_type, body)
    if expected is not None:
        assert request == expected


def test_numbers_are_cast_like_rust() -> None:
    big = decode_request(3, b'{"mem_size": 1e30, "init_mem_size": 18446744073709551615}')
    # 2^64 - 1 rounds to the double 2^64, which saturates back to u64::MAX.
    assert big == PrepareVmRequest(U64_MAX, U64_MAX)
    deltas = decode_request(2, b'{"deltas": [{"id": 1, "delta": -1e30}, {"id": 2, "delta": 1e19}]}')
    assert deltas == RebalanceMemoryRequest((BalloonDelta(1, -(2**63)), BalloonDelta(2, I64_MAX)))
    zero = decode_request(2, b'{"deltas": [{"id": 1, "delta": -0}, {"id": 2, "delta": 4096e0}]}')
    assert zero == RebalanceMemoryRequest((BalloonDelta(1, 0), BalloonDelta(2, 4096)))
    huge = decode_request(3, b'{"mem_size": 36893488147419103232, "init_mem_size": 1E3}')
    assert huge == PrepareVmRequest(U64_MAX, 1000)
    mixed = decode_request(2, b'[[[1, 4096], {"delta": -4096, "id": 0}]]')
    assert mixed == RebalanceMemoryRequest((BalloonDelta(1, 4096), BalloonDelta(0, -4096)))


@pytest.mark.parametrize(
    ("delta", "expected_bytes"),
    [
        (4096.9, 4096),
        (-4096.9, -4096),
        (-0.5, 0),
        (1e300, I64_MAX),
        (-1e300, I64_MIN),
        (2**63 + 12345, I64_MAX),
        (2**53 + 1, 2**53),  # rounds to the nearest double on the way in
    ],
)
def test_deltas_are_cast_like_rust(delta: float, expected_bytes: int) -> None:
    body = json.dumps({"deltas": [{"id": 1, "delta": delta}]}).encode()
    request = decode_request(MessageType.REBALANCE_MEMORY, body)
    assert request == RebalanceMemoryRequest(deltas=(BalloonDelta(1, expected_bytes),))


@pytest.mark.parametrize(
    ("size", "expected_bytes"),
    [(8192.7, 8192), (-5.0, 0), (-(2**70), 0), (1e30, U64_MAX), (2**64 + 4096, U64_MAX)],
)
def test_sizes_are_cast_like_rust(size: float, expected_bytes: int) -> None:
    body = json.dumps({"mem_size": size, "init_mem_size": 4096}).encode()
    request = decode_request(MessageType.PREPARE_VM, body)
    assert request == PrepareVmRequest(mem_size_bytes=expected_bytes, init_mem_size_bytes=4096)


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (9, b'{"id": 1}'),  # unknown message type
        (6, b'{"id": 1}'),
        (0, b"{}"),
        (5, b""),
        (5, b'{"id": 1} x'),  # trailing data
        (5, b'{"id": 1, "id": 1}'),  # duplicate field
        (5, b'{"id": 1, "id": 2}'),
        (5, b"{}"),  # missing field
        (5, b'{"vm_id": 1}'),
        (5, b"[]"),  # array of the wrong length
        (5, b"[1, 2]"),
        (5, b'"1"'),
        (5, b"1"),
        (5, b"null"),
        (5, b'{"id": -0}'),  # a float to serde_json
        (5, b'{"id": 1.0}'),
        (5, b'{"id": 1e0}'),
        (5, b'{"id": -1}'),
        (5, b'{"id": 4294967296}'),
        (5, b'{"id": "1"}'),
        (5, b'{"id": true}'),
        (5, b'{"id": null}'),
        (5, b'{"id": 01}'),  # not JSON
        (5, b'{"id": NaN}'),
        (3, b'{"mem_size": Infinity, "init_mem_size": 0}'),
        (3, b'{"mem_size": 1e400, "init_mem_size": 0}'),  # beyond f64
        (3, b'{"mem_size": "4096", "init_mem_size": 0}'),
        (3, b'{"mem_size": 4096}'),
        (2, b'{"deltas": {"id": 0, "delta": 0}}'),  # a Vec is an array only
        (2, b'{"deltas": [{"id": 0}]}'),
        (2, b'{"deltas": [[0]]}'),
        (1, b'{"ids": [0, 1.5]}'),
        (1, b'{"ids": null}'),
        (1, b'{"ids": [4294967296]}'),
        (1, b'{"ids": [-1]}'),
        (1, b'{"ids": [true]}'),
        (1, b'{"ids": "1"}'),
        (1, b"[1, 2]"),
        (2, b'{"deltas": [{"delta": 4096}]}'),
        (2, b'{"deltas": [{"id": 1, "delta": "4096"}]}'),
        (2, b'{"deltas": [{"id": 1, "delta": false}]}'),
        (2, b'{"deltas": [{"id": 1, "delta": 1e400}]}'),
        (2, b'{"deltas": [7]}'),
        (3, b'{"mem_size": null, "init_mem_size": 0}'),
        (4, b'{"id": 1.5}'),
        (5, b'{"id": 1'),  # cut short
        (5, b'\xff{"id": 1}'),
        (5, b'{"\\ud800": 0, "id": 1}'),  # a key is parsed as a string
        (5, b'{"\xff": 0, "id": 1}'),
        (5, b'\xef\xbb\xbf{"id": 1}'),  # a BOM is not whitespace
        (5, '{"id": 1}'.encode("utf-16")),
        (5, b'{"id": 1, "x": "a\x01b"}'),  # control character in a string
        (5, b'{"id": 1, "x": ' + b"[" * 127 + b"]" * 127 + b"}"),  # 128 levels deep
    ],
)
def test_bodies_mms_refused(msg_type: int, body: bytes) -> None:
    with pytest.raises(RequestDecodeError):
        decode_request(msg_type, body)


def test_nesting_up_to_serde_json_limit_is_accepted() -> None:
    body = b'{"id": 1, "x": ' + b"[" * 126 + b"]" * 126 + b"}"
    assert decode_request(5, body) == RemoveVmRequest(1)


# --- anything else is either a request or a RequestDecodeError, never another exception ---------

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(
            st.sampled_from(["ids", "deltas", "id", "delta", "mem_size", "init_mem_size"]),
            children,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def _decoded_or_refused(msg_type: int, body: bytes) -> None:
    try:
        request = decode_request(msg_type, body)
    except RequestDecodeError:
        return
    assert msg_type == request.TYPE


@settings(deadline=None)
@given(st.integers(-1, 8), st.binary(max_size=64))
def test_fuzz_arbitrary_bytes(msg_type: int, body: bytes) -> None:
    _decoded_or_refused(msg_type, body)


@settings(deadline=None)
@given(st.sampled_from(list(MessageType)), _json_values)
def test_fuzz_json_with_the_protocols_keys(msg_type: MessageType, value: object) -> None:
    _decoded_or_refused(msg_type, json.dumps(value).encode())
