"""A real simulator whose CrOS balloon is below mms's allocation: issue 11's case 2.

The simulator follows upstream mms: after the issue's five requests and a hang-up, crosvm's CrOS
balloon is 0, 32 MiB below mms's own allocation, and every stats answer reports VM 0's
``balloon_actual`` as that subtraction wrapped as a u64. The server cannot send these requests
itself (it appends the CrOS delta as minus the siblings' sum, and these deltas do not balance), so
they go over a raw mms connection, as tests/sim/test_sim_upstream.py does; a server dialled
afterwards finds VM 0 wrapped.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

from manatee_grpc.mms import _transport
from manatee_grpc.mms._memory_math import MIB
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Scenario, Simulator

GIB = 1024 * MIB
ALLOCATION_BYTES = 32 * MIB
# The issue's device: CrOS guest 4 GiB, 1.5 GiB of it in use, mms's allocation 32 MiB.
ISSUE_DEVICE = Scenario(
    cros_mem_size_bytes=4 * GIB,
    cros_used_bytes=1536 * MIB,
    cros_internal_allocation_bytes=ALLOCATION_BYTES,
    # A sibling launched afterwards (VM 2: mms's ids go on after a hang-up) uses only 2 MiB, so
    # one started with a few MiB inflates its balloon in full.
    vm_used_bytes={2: 2 * MIB},
)
# 0 - 32 MiB as a u64: VM 0's balloon_actual after wrap_the_cros_balloon.
WRAPPED_AFTER_HANG_UP = 18446744073675997184
_HEADER = struct.Struct("<II")


def _raw_call(sock: socket.socket, msg_type: MessageType, body: dict[str, Any]) -> Any:
    """One mms request and its answer, as plain JSON (no bridge code on this side)."""
    payload = json.dumps(body).encode()
    sock.sendall(_HEADER.pack(len(payload), msg_type) + payload)
    length, answered_type = _HEADER.unpack(_transport.recv_exactly(sock, _HEADER.size))
    assert answered_type == msg_type
    return json.loads(_transport.recv_exactly(sock, length))


def _deltas(*deltas: tuple[int, int]) -> dict[str, Any]:
    return {"deltas": [{"id": vm_id, "delta": delta} for vm_id, delta in deltas]}


def wrap_the_cros_balloon(sim: Simulator) -> None:
    """The issue's case 2 on a raw connection to a fresh ``ISSUE_DEVICE``, then hang up.

    mms drops VM 1 with the connection; VM 0 is left with its balloon wrapped. The simulator has
    then accepted and closed one connection.
    """
    assert sim.connections_accepted == 0
    sock = _transport.connect(sim.address, timeout_s=5.0)
    sock.settimeout(10.0)  # a broken build fails here instead of hanging
    try:
        prepared = _raw_call(
            sock, MessageType.PREPARE_VM, {"mem_size": 2 * GIB, "init_mem_size": 1000 * MIB}
        )
        assert prepared == {"res": 0, "id": 1, "shortfall": 0}
        assert _raw_call(sock, MessageType.FINISH_ADD_VM, {"id": 1}) == {"res": 0}
        first = _raw_call(
            sock, MessageType.REBALANCE_MEMORY, _deltas((1, 1870659584), (0, -817889280))
        )
        assert first == {"actual_deltas": _deltas((1, 817889280), (0, -817889280))["deltas"]}
        # The CrOS inflate turns into a deflate while trimming; VM 1's inflate comes back short.
        second = _raw_call(
            sock, MessageType.REBALANCE_MEMORY, _deltas((0, 983826432), (1, 1582301184))
        )
        assert second == {"actual_deltas": _deltas((0, -230686720), (1, 163577856))["deltas"]}
    finally:
        sock.close()
    assert sim.wait_until(lambda: sim.connections_closed == 1)
