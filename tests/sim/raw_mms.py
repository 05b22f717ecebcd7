"""A raw mms client for the simulator's fidelity tests: bytes out, plain JSON in.

It shares nothing with the bridge's codec on purpose: answers are read with ``json.loads`` so a
value the bridge would refuse (a wrapped u64 balloon) is seen exactly as mms sent it.
"""

from __future__ import annotations

import json
import select
import struct
from typing import Any

from manatee_grpc.mms import _transport
from manatee_grpc.sim import Simulator

GET_BALLOON_STATS, REBALANCE_MEMORY, PREPARE_VM, FINISH_ADD_VM, REMOVE_VM = 1, 2, 3, 4, 5
HEADER = struct.Struct("<II")
# How long a test waits to be sure that no answer is coming (an answer takes microseconds).
QUIET_POLL_S = 0.3


class RawMms:
    """One control connection to a Simulator."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.sock = _transport.connect(sim.address, timeout_s=5.0)
        # A broken test fails instead of hanging on a read.
        self.sock.settimeout(10.0)

    def send(self, msg_type: int, body: bytes | str | dict[str, Any]) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        self.sock.sendall(HEADER.pack(len(body), msg_type) + body)

    def recv(self, msg_type: int) -> Any:
        length, answered_type = HEADER.unpack(_transport.recv_exactly(self.sock, HEADER.size))
        assert answered_type == msg_type
        return json.loads(_transport.recv_exactly(self.sock, length))

    def call(self, msg_type: int, body: bytes | str | dict[str, Any]) -> Any:
        self.send(msg_type, body)
        return self.recv(msg_type)

    def quiet(self) -> bool:
        """True if nothing (no answer, no hang-up) arrives within QUIET_POLL_S."""
        readable, _, _ = select.select([self.sock], [], [], QUIET_POLL_S)
        return not readable

    def hang_up(self) -> None:
        """Close the stream and wait until mms has handled the hang-up."""
        closed = self.sim.connections_closed
        self.sock.close()
        assert self.sim.wait_until(lambda: self.sim.connections_closed > closed)

    def close(self) -> None:
        self.sock.close()
