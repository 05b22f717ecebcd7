"""The simulator answers as upstream mms did, bugs on the wire included (issue 11).

Fixed cases, over the simulator's real socket with raw frames: upstream's own unit-test vectors,
and the four cases the issue found by running the simulator beside upstream's logic. Each answer
is also checked against the independent reference in ``upstream_mms``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import upstream_mms
from raw_mms import (
    FINISH_ADD_VM,
    GET_BALLOON_STATS,
    PREPARE_VM,
    REBALANCE_MEMORY,
    REMOVE_VM,
    RawMms,
)

from manatee_grpc.mms._messages import BalloonDelta
from manatee_grpc.sim import Scenario, Simulator
from manatee_grpc.sim._model import BalloonBounds, plan_rebalance

MIB = 1 << 20
GIB = 1 << 30
# The device of the issue: CrOS guest 4 GiB, 1.5 GiB of it in use, mms's allocation 32 MiB.
ISSUE_DEVICE = Scenario(
    cros_mem_size_bytes=4 * GIB,
    cros_used_bytes=1536 * MIB,
    cros_internal_allocation_bytes=32 * MIB,
)


def reference() -> upstream_mms.UpstreamMms:
    return upstream_mms.UpstreamMms(
        cros_mem=4 * GIB, cros_used=1536 * MIB, allocation=32 * MIB, sibling_used=64 * MIB
    )


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(ISSUE_DEVICE) as simulator:
        yield simulator


@pytest.fixture
def mms(sim: Simulator) -> Iterator[RawMms]:
    client = RawMms(sim)
    yield client
    client.close()


def deltas_body(*deltas: tuple[int, int]) -> dict[str, Any]:
    return {"deltas": [{"id": vm_id, "delta": delta} for vm_id, delta in deltas]}


def actual(answer: Any) -> list[tuple[int, int]]:
    return [(entry["id"], entry["delta"]) for entry in answer["actual_deltas"]]


# --- upstream's own unit tests (sizes in MiB) ---------------------------------------------------

UPSTREAM_VECTORS = [
    # mem, balloon, requested deltas for ids 0.., inflates, deflates
    ([5, 10], [3, 9], [-3, 3], [(1, 1)], [(0, -1)]),
    ([5, 10], [1, 5], [-2, 2], [(1, 1)], [(0, -1)]),
    ([5, 5, 5, 10], [4, 5, 1, 9], [2, 2, 3, -7], [(0, 1), (2, 3)], [(3, -4)]),
]


@pytest.mark.parametrize(("mem", "balloon", "requested", "inflates", "deflates"), UPSTREAM_VECTORS)
def test_upstream_unit_test_vectors(
    mem: list[int],
    balloon: list[int],
    requested: list[int],
    inflates: list[tuple[int, int]],
    deflates: list[tuple[int, int]],
) -> None:
    """test_balloon_overinflate, _underinflate and _overinflate_multiple, in both models."""
    plan = plan_rebalance(
        {
            i: BalloonBounds(b * MIB, m * MIB)
            for i, (m, b) in enumerate(zip(mem, balloon, strict=True))
        },
        [BalloonDelta(i, d * MIB) for i, d in enumerate(requested)],
    )
    assert plan is not None
    assert [(d.vm_id, d.delta_bytes // MIB) for d in plan.inflates] == inflates
    assert [(d.vm_id, d.delta_bytes // MIB) for d in plan.deflates] == deflates

    clients = {
        i: upstream_mms.Client(upstream_mms.Guest(m * MIB, 0), m * MIB, balloon=b * MIB)
        for i, (m, b) in enumerate(zip(mem, balloon, strict=True))
    }
    ref_plan = upstream_mms.target_deltas(clients, [(i, d * MIB) for i, d in enumerate(requested)])
    assert ref_plan is not None
    assert [(i, d // MIB) for i, d in ref_plan[0]] == inflates
    assert [(i, d // MIB) for i, d in ref_plan[1]] == deflates


# --- case 1: a CrOS deflate on a fresh device is clamped by the whole balloon ------------------


def test_case1_cros_deflate_on_a_fresh_device_answers_id_0_with_delta_0(mms: RawMms) -> None:
    """The clamp includes mms's allocation, so id 0 is in the deflate list, trimmed to 0."""
    answer = mms.call(REBALANCE_MEMORY, '{"deltas":[{"id":0,"delta":-4096}]}')

    assert answer == {"actual_deltas": [{"id": 0, "delta": 0}]}
    assert actual(answer) == reference().rebalance([(0, -4096)])


# --- case 2: memory lost in trimming, then a wrapped balloon_actual ---------------------------


def test_case2_cros_balloon_below_the_allocation_reports_a_wrapped_u64(
    sim: Simulator, mms: RawMms
) -> None:
    ref = reference()
    assert mms.call(PREPARE_VM, {"mem_size": 2 * GIB, "init_mem_size": 1000 * MIB}) == {
        "res": 0,
        "id": 1,
        "shortfall": 0,
    }
    assert ref.prepare(2 * GIB, 1000 * MIB) == (0, 1, 0)
    assert mms.call(FINISH_ADD_VM, {"id": 1}) == {"res": 0}
    assert ref.finish(1) == 0
    first = [(1, 1870659584), (0, -817889280)]
    assert actual(mms.call(REBALANCE_MEMORY, deltas_body(*first))) == [
        (1, 817889280),
        (0, -817889280),
    ]
    assert ref.rebalance(first) == [(1, 817889280), (0, -817889280)]
    # The CrOS inflate is trimmed into a deflate; the sibling's inflate comes back short (its
    # guest uses 64 MiB), and mms only logs the remaining slack of -64 MiB.
    second = [(0, 983826432), (1, 1582301184)]
    assert actual(mms.call(REBALANCE_MEMORY, deltas_body(*second))) == [
        (0, -230686720),
        (1, 163577856),
    ]
    assert ref.rebalance(second) == [(0, -230686720), (1, 163577856)]
    mms.hang_up()
    ref.hang_up()

    again = RawMms(sim)
    try:
        answer = again.call(GET_BALLOON_STATS, {"ids": [0]})
    finally:
        again.close()
    # crosvm's balloon is now 0, 32 MiB below the allocation: 0 - 32 MiB as a u64.
    assert answer["all_stats"][0]["balloon_actual"] == 18446744073675997184 == 2**64 - 32 * MIB
    assert ref.stats([0])[0][1] == 18446744073675997184


# --- case 3: later rebalances deflate the CrOS guest into mms's allocation ---------------------

CASE3_STEPS: list[tuple[int, Any, Any]] = [
    (
        PREPARE_VM,
        {"mem_size": GIB, "init_mem_size": 1000 * MIB},
        {"res": 0, "id": 1, "shortfall": 0},
    ),
    (FINISH_ADD_VM, {"id": 1}, {"res": 0}),
    (FINISH_ADD_VM, {"id": 1}, {"res": -22}),
    (
        PREPARE_VM,
        {"mem_size": GIB, "init_mem_size": 1000 * MIB},
        {"res": 0, "id": 2, "shortfall": 0},
    ),
    (FINISH_ADD_VM, {"id": 2}, {"res": 0}),
    (
        REBALANCE_MEMORY,
        [(2, 968077312), (1, 905969664), (0, -603979776)],
        [(2, -25165824), (1, 629145600), (0, -603979776)],
    ),
    (
        REBALANCE_MEMORY,
        [(0, 797839360), (1, 783060992), (2, 415555584)],
        [(0, -834985984), (1, 352321536), (2, 415555584)],
    ),
    (
        REBALANCE_MEMORY,
        [(0, 637534208), (2, 1970171904), (1, 1127235584)],
        [(0, -725295104), (2, 591077376), (1, 0)],
    ),
    (REBALANCE_MEMORY, [(1, 1342177280), (2, 2136551424)], [(1, -67108864), (2, 0)]),
    # The simulator used to stop the CrOS deflate at the allocation: (0, -2523136), 32 MiB less,
    # with VM 2 then deflating 32 MiB more, (2, -64585728).
    (
        REBALANCE_MEMORY,
        [(0, -536870912), (1, 369098752), (2, -469762048)],
        [(1, 67108864), (0, -36077568), (2, -31031296)],
    ),
    (REBALANCE_MEMORY, [(2, 1073741824), (0, -1073741824)], [(2, 0)]),
]


def test_case3_a_rebalance_deflates_the_cros_guest_into_the_allocation(mms: RawMms) -> None:
    ref = reference()
    for msg_type, request, expected in CASE3_STEPS:
        if msg_type == REBALANCE_MEMORY:
            assert actual(mms.call(msg_type, deltas_body(*request))) == expected
            assert ref.rebalance(request) == expected
        elif msg_type == PREPARE_VM:
            assert mms.call(msg_type, request) == expected
            assert ref.prepare(request["mem_size"], request["init_mem_size"]) == (
                expected["res"],
                expected["id"],
                expected["shortfall"],
            )
        else:
            assert mms.call(msg_type, request) == expected
            assert ref.finish(request["id"]) == expected["res"]


# --- case 4: request JSON is read as serde_json reads it --------------------------------------


def test_case4_a_struct_given_as_an_array_is_accepted(mms: RawMms) -> None:
    assert mms.call(PREPARE_VM, f"[{GIB}, {1000 * MIB}]") == {"res": 0, "id": 1, "shortfall": 0}
    assert mms.call(FINISH_ADD_VM, "[1]") == {"res": 0}
    assert actual(mms.call(REBALANCE_MEMORY, '{"deltas": [[1, 4096], [0, -4096]]}')) == [
        (1, 4096),
        (0, -4096),
    ]
    # "5 [7]": RemoveVm of 7, an unknown id.
    assert mms.call(REMOVE_VM, "[7]") == {"res": -22}
    assert mms.call(REMOVE_VM, "[1]") == {"res": 0}
    assert mms.call(GET_BALLOON_STATS, "[[0, 1]]")["all_stats"][0]["id"] == 0


@pytest.mark.parametrize(
    ("msg_type", "body"),
    [
        (REMOVE_VM, '{"id": 1, "id": 1}'),  # duplicate key
        (REMOVE_VM, '{"id": -0}'),  # -0 is a float to serde_json
        (REMOVE_VM, '{"id": 1.0}'),  # so is 1.0
        (REMOVE_VM, '{"id": 4294967296}'),  # not a u32
        (REMOVE_VM, "[1, 2]"),  # too many fields
        (REMOVE_VM, "[]"),
        (REMOVE_VM, '{"vm_id": 1}'),  # missing field
        (REMOVE_VM, ""),
        (PREPARE_VM, '{"mem_size": 1e400, "init_mem_size": 0}'),  # beyond f64
        (PREPARE_VM, '{"mem_size": "1073741824", "init_mem_size": 0}'),
        (REBALANCE_MEMORY, '{"deltas": [{"id": 0, "delta": NaN}]}'),
        (9, "{}"),  # unknown message type
    ],
)
def test_case4_an_undecodable_frame_gets_no_answer_and_mms_keeps_reading(
    sim: Simulator, mms: RawMms, msg_type: int, body: str
) -> None:
    assert mms.call(PREPARE_VM, {"mem_size": GIB, "init_mem_size": 1000 * MIB})["res"] == 0
    assert mms.call(FINISH_ADD_VM, {"id": 1}) == {"res": 0}

    mms.send(msg_type, body)

    assert sim.wait_until(lambda: sim.malformed_requests == 1)
    assert mms.quiet()
    # Nothing was applied, and the stream carries on: the next request gets the next answer.
    answer = mms.call(GET_BALLOON_STATS, {"ids": [0, 1]})
    assert [entry["id"] for entry in answer["all_stats"]] == [0, 1]
    assert sim.connections_closed == 0


def test_case4_serde_reading_of_numbers_and_unknown_keys(mms: RawMms) -> None:
    # Sizes are f64 cast to u64: a fraction is truncated. Unknown keys are skipped, even one
    # whose number is beyond f64 (serde_json only checks its syntax there).
    prepared = mms.call(
        PREPARE_VM, f'{{"mem_size": {GIB}.75, "init_mem_size": {1000 * MIB}, "x": 1e999}}'
    )
    assert prepared == {"res": 0, "id": 1, "shortfall": 0}
    assert mms.call(FINISH_ADD_VM, '{"id": 1, "id2": {"id": 1, "id": 2}}') == {"res": 0}
    # A delta beyond i64 saturates at i64::MAX (not page aligned: invalid, all zero).
    assert actual(mms.call(REBALANCE_MEMORY, '{"deltas": [{"id": 1, "delta": 1e30}]}')) == [(1, 0)]
    # A negative size saturates at 0: init_mem_size 0 is valid.
    assert mms.call(REMOVE_VM, {"id": 1}) == {"res": 0}
    assert mms.call(PREPARE_VM, f'{{"mem_size": {GIB}, "init_mem_size": -5.5}}')["res"] == 0
