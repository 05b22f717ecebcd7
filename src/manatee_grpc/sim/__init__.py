"""The mms simulator: a pure model of the ManaTEE memory service and a socket server around it.

The real mms is gone, so this is what the bridge runs against by default and what every test
uses. It reproduces sirenia's manatee_memory_service.rs number for number.
"""

from __future__ import annotations

from manatee_grpc.sim._cli import main
from manatee_grpc.sim._model import MmsModel, StartState
from manatee_grpc.sim._scenario import Scenario, ScenarioError
from manatee_grpc.sim._server import Simulator

__all__ = ["MmsModel", "Scenario", "ScenarioError", "Simulator", "StartState", "main"]
