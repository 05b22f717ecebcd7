"""The mms simulator: a pure model of the ManaTEE memory service and a socket server around it.

The real mms is gone, so this is what the bridge runs against by default and what every test
uses. It reproduces sirenia's manatee_memory_service.rs number for number, its bugs on the wire
included (a wrapped u64 balloon_actual, serde_json's reading of requests, no answer to a frame it
cannot decode). Any knowing departure is a Scenario option, off by default (README lists them).

May import: the mms layer (messages, codec, transports, memory arithmetic) and the standard
library only (the contract in pyproject.toml checks it).
"""

from __future__ import annotations

from manatee_grpc.sim._cli import main
from manatee_grpc.sim._model import GuestMemory, MmsModel, StartState
from manatee_grpc.sim._scenario import DemandCurve, Scenario, ScenarioError
from manatee_grpc.sim._server import ManualClock, Simulator

__all__ = [
    "DemandCurve",
    "GuestMemory",
    "ManualClock",
    "MmsModel",
    "Scenario",
    "ScenarioError",
    "Simulator",
    "StartState",
    "main",
]
