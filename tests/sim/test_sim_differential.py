"""Differential tests: the simulator against an independent reference of upstream mms.

A hypothesis state machine plays random sessions (PrepareVm, FinishAddVm, RemoveVm,
RebalanceMemory, GetBalloonStats, hang-ups, guests using memory so inflates come back short,
mms's internal allocation changing, failed balloon adjusts and failed starts) on both
``upstream_mms.UpstreamMms`` and the simulator, and compares every answer field by field. One
machine drives MmsModel directly; a second drives a real Simulator over its socket with raw JSON.

Sequence counts: ``make test`` runs the "default" profile (200 sequences of up to 40 steps on the
model, 25 of up to 30 over the socket, about 3 s); for a manual run of 5000 + 400 longer ones:

    MANATEE_HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest -q tests/sim/test_sim_differential.py
"""

from __future__ import annotations

import os
import random
from typing import Any

import upstream_mms
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule
from raw_mms import (
    FINISH_ADD_VM,
    GET_BALLOON_STATS,
    PREPARE_VM,
    REBALANCE_MEMORY,
    REMOVE_VM,
    RawMms,
)

from manatee_grpc.mms._messages import (
    BalloonDelta,
    FinishAddVmRequest,
    GetBalloonStatsRequest,
    PrepareVmRequest,
    RebalanceMemoryRequest,
    RemoveVmRequest,
)
from manatee_grpc.sim import MmsModel, Scenario, Simulator

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
CROS_MEM, CROS_USED, ALLOCATION, SIBLING_USED = 4 * GIB, 1536 * MIB, 32 * MIB, 64 * MIB
SCENARIO = Scenario(
    cros_mem_size_bytes=CROS_MEM,
    cros_used_bytes=CROS_USED,
    cros_internal_allocation_bytes=ALLOCATION,
    sibling_used_bytes=SIBLING_USED,
    # A failed start answers at once instead of after mms's 10 s connect wait.
    crosvm_connect_timeout_s=0.0,
)

# (sequences, steps per sequence) for the model machine and for the socket machine.
_PROFILES = {
    "default": ((200, 40), (25, 30)),
    "long": ((5000, 60), (400, 50)),
    "probe": ((2000, 40), (1, 1)),
}
PROFILE = os.environ.get("MANATEE_HYPOTHESIS_PROFILE", "default")
if PROFILE not in _PROFILES:
    raise ValueError(
        f"MANATEE_HYPOTHESIS_PROFILE must be one of {sorted(_PROFILES)}, got {PROFILE!r}"
    )
(MODEL_EXAMPLES, MODEL_STEPS), (SOCKET_EXAMPLES, SOCKET_STEPS) = _PROFILES[PROFILE]

MEM_SIZES = st.sampled_from([512 * MIB, GIB, 2 * GIB, 3 * GIB, CROS_MEM, GIB + 512])
INIT_FRACTIONS = st.sampled_from([1.0, 0.95, 0.5, 0.0, 1.5])
DELTA_PAGES = st.one_of(
    st.integers(min_value=-4096, max_value=4096),
    st.integers(min_value=-(3 * 256 * 1024), max_value=3 * 256 * 1024),
)
USED_FRACTIONS = st.sampled_from([0.0, 0.05, 0.3, 0.6, 0.95, 1.0])


def _pages(size: float) -> int:
    return int(size) // PAGE * PAGE


class _Differential(RuleBasedStateMachine):
    """Rules shared by both machines; subclasses say how a request reaches the simulator."""

    def __init__(self) -> None:
        super().__init__()
        self.ref = upstream_mms.UpstreamMms(CROS_MEM, CROS_USED, ALLOCATION, SIBLING_USED)

    # --- how the simulator is reached (subclasses) --------------------------------------------

    def sim_prepare(self, mem: int, init: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def sim_finish(self, vm_id: int) -> int:
        raise NotImplementedError

    def sim_remove(self, vm_id: int) -> int:
        raise NotImplementedError

    def sim_rebalance(self, deltas: list[tuple[int, int]]) -> list[tuple[int, int]]:
        raise NotImplementedError

    def sim_stats(self, ids: list[int]) -> list[tuple[int, int, int]]:
        raise NotImplementedError

    def sim_hang_up(self) -> None:
        raise NotImplementedError

    def sim_model(self) -> MmsModel | Simulator:
        raise NotImplementedError

    # --- ids a client would use ---------------------------------------------------------------

    def _some_ids(self) -> list[int]:
        """Running VMs, the pending one, the next id, and one nobody will ever have."""
        ids = [*self.ref.clients, self.ref.next_id, 77]
        if self.ref.starting is not None:
            ids.append(self.ref.starting.vm_id)
        return ids

    def _sibling_ids(self) -> list[int]:
        return [vm_id for vm_id in self.ref.clients if vm_id]

    # --- the five requests and a hang-up -------------------------------------------------------

    @initialize(mem_sizes=st.lists(st.sampled_from([512 * MIB, GIB, 2 * GIB]), max_size=3))
    def start_some_vms(self, mem_sizes: list[int]) -> None:
        """Concierge's launches (init = min(1000 MiB, mem)), so sessions start with siblings."""
        for mem in mem_sizes:
            self.prepare_exact(mem, min(mem, 1000 * MIB))
            if self.ref.starting is not None:
                self.finish_vm(self.ref.starting.vm_id)

    @rule(mem=MEM_SIZES, init_fraction=INIT_FRACTIONS, finish=st.booleans())
    def prepare(self, mem: int, init_fraction: float, finish: bool) -> None:
        init = _pages(mem * init_fraction)
        expected = self.ref.prepare(mem, init)
        assert self.sim_prepare(mem, init) == expected
        if expected[0] == upstream_mms.ENOMEM:
            event("PrepareVm short")
        if finish and expected[0] == 0:
            self.finish_vm(expected[1])

    @precondition(lambda self: self.ref.starting is not None)
    @rule()
    def retry_prepare(self) -> None:
        starting = self.ref.starting
        assert starting is not None
        self.prepare_exact(starting.mem, starting.init)

    def prepare_exact(self, mem: int, init: int) -> None:
        assert self.sim_prepare(mem, init) == self.ref.prepare(mem, init)

    def finish_vm(self, vm_id: int) -> None:
        assert self.sim_finish(vm_id) == self.ref.finish(vm_id)

    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        self.finish_vm(data.draw(st.sampled_from(self._some_ids())))

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        vm_id = data.draw(st.sampled_from(self._some_ids()))
        assert self.sim_remove(vm_id) == self.ref.remove(vm_id)

    @rule(
        data=st.data(),
        flaw=st.sampled_from([None] * 12 + ["unaligned", "duplicate", "unknown"]),
    )
    def rebalance(self, data: st.DataObject, flaw: str | None) -> None:
        """Any subset of the VMs, any sign, up to far beyond a balloon's range; some invalid."""
        vm_ids = data.draw(st.lists(st.sampled_from([*self.ref.clients]), unique=True, max_size=4))
        deltas = [(vm_id, data.draw(DELTA_PAGES) * PAGE) for vm_id in vm_ids]
        if flaw == "unaligned" and deltas:
            deltas[0] = (deltas[0][0], deltas[0][1] + 512)
        elif flaw == "duplicate" and deltas:
            deltas.append(deltas[0])
        elif flaw == "unknown":
            # The pending VM has no balloon yet: mms does not know it either.
            unknown = self.ref.starting.vm_id if self.ref.starting else self.ref.next_id
            deltas.append((unknown, PAGE))
        self._compare_rebalance(deltas)

    @precondition(lambda self: len(self.ref.clients) > 1)
    @rule(data=st.data())
    def concierge_rebalance(self, data: st.DataObject) -> None:
        """Concierge's shape: sibling deltas, then the CrOS guest takes minus their sum."""
        deltas = [
            (vm_id, data.draw(DELTA_PAGES) * PAGE)
            for vm_id in self._sibling_ids()
            if data.draw(st.booleans())
        ]
        deltas.append((0, -sum(delta for _, delta in deltas)))
        self._compare_rebalance(deltas)

    @precondition(lambda self: len(self.ref.clients) > 1)
    @rule(data=st.data())
    def inflate_everything(self, data: st.DataObject) -> None:
        """Inflates only, the CrOS guest among them: trimming turns some into deflates, and
        with a sibling's inflate coming back short, mms loses track of memory (issue 11)."""
        vm_ids = data.draw(st.permutations([*self.ref.clients]))
        self._compare_rebalance(
            [(vm_id, data.draw(DELTA_PAGES.map(abs)) * PAGE) for vm_id in vm_ids]
        )

    def _compare_rebalance(self, deltas: list[tuple[int, int]]) -> None:
        expected = self.ref.rebalance(deltas)
        assert self.sim_rebalance(deltas) == expected
        if sum(delta for _, delta in expected) != 0:
            event("rebalance: mms lost track of memory (non-zero slack)")
        if any(vm_id == 0 and delta == 0 for vm_id, delta in expected):
            event("rebalance: answered {id 0, delta 0}")

    @rule(data=st.data())
    def stats(self, data: st.DataObject) -> None:
        ids = data.draw(st.lists(st.sampled_from(self._some_ids()), max_size=4))
        expected = self.ref.stats(ids)
        assert self.sim_stats(ids) == expected
        if any(balloon_actual >= 1 << 63 for _, balloon_actual, _ in expected):
            event("stats: wrapped balloon_actual")

    @rule()
    def hang_up(self) -> None:
        """The client hangs up, reconnects and reads the CrOS guest's balloon first thing."""
        self.ref.hang_up()
        self.sim_hang_up()
        expected = self.ref.stats([0])
        assert self.sim_stats([0]) == expected
        if expected[0][1] >= 1 << 63:
            event("stats: wrapped balloon_actual")

    # --- the world around mms: guests, mms's memcg, crosvm failures --------------------------

    @rule(data=st.data(), fraction=USED_FRACTIONS)
    def guest_uses_memory(self, data: st.DataObject, fraction: float) -> None:
        vm_id = data.draw(st.sampled_from(self._some_ids()))
        client = self.ref.clients.get(vm_id)
        used = _pages((client.mem if client else GIB) * fraction)
        self.ref.set_used(vm_id, used)
        self.sim_model().set_vm_used_bytes(vm_id, used)

    @rule(delta_pages=st.integers(min_value=-16384, max_value=16384))
    def allocation_changes(self, delta_pages: int) -> None:
        expected = self.ref.allocation_change(delta_pages * PAGE)
        assert self.sim_model().change_internal_allocation(delta_pages * PAGE) == expected

    @rule(data=st.data(), failing=st.booleans())
    def balloon_adjusts_fail(self, data: st.DataObject, failing: bool) -> None:
        vm_id = data.draw(st.sampled_from(self._some_ids()))
        self.ref.set_failing(vm_id, failing)
        self.sim_model().fail_balloon_adjust(vm_id, failing)

    @rule(which=st.sampled_from(["connect", "control_socket"]))
    def a_start_will_fail(self, which: str) -> None:
        if which == "connect":
            self.ref.connect_failures += 1
            self.sim_model().fail_crosvm_connect()
        else:
            self.ref.socket_failures += 1
            self.sim_model().fail_control_socket()


class ModelAgainstUpstream(_Differential):
    """MmsModel, called directly."""

    def __init__(self) -> None:
        super().__init__()
        self.model = MmsModel(SCENARIO)

    def sim_model(self) -> MmsModel:
        return self.model

    def sim_prepare(self, mem: int, init: int) -> tuple[int, int, int]:
        answer = self.model.handle(PrepareVmRequest(mem, init))
        return (answer.res, answer.vm_id, answer.shortfall_bytes)

    def sim_finish(self, vm_id: int) -> int:
        return self.model.handle(FinishAddVmRequest(vm_id)).res

    def sim_remove(self, vm_id: int) -> int:
        return self.model.handle(RemoveVmRequest(vm_id)).res

    def sim_rebalance(self, deltas: list[tuple[int, int]]) -> list[tuple[int, int]]:
        request = RebalanceMemoryRequest(tuple(BalloonDelta(*delta) for delta in deltas))
        return [(d.vm_id, d.delta_bytes) for d in self.model.handle(request).actual_deltas]

    def sim_stats(self, ids: list[int]) -> list[tuple[int, int, int]]:
        answer = self.model.handle(GetBalloonStatsRequest(tuple(ids)))
        return [
            (entry.vm_id, entry.balloon_actual_bytes, entry.stats.total_memory or 0)
            for entry in answer.all_stats
        ]

    def sim_hang_up(self) -> None:
        self.model.connection_lost()


class SimulatorAgainstUpstream(_Differential):
    """A real Simulator over its socket; requests and answers are raw JSON.

    Each request is written in one of the forms serde_json read the same way (an object, an
    object with its keys reversed and an unknown key, an array of the fields; sizes and deltas as
    integers or as doubles), so the answers also check the simulator's request decoding.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sim = Simulator(SCENARIO).start()
        self.mms = RawMms(self.sim)
        # Fixed seed: a sequence replays with the same encodings, which never change an answer.
        self.encodings = random.Random(0)

    def _struct(self, fields: list[tuple[str, str]]) -> str:
        form = self.encodings.randrange(3)
        if form == 0:
            return "{" + ", ".join(f'"{key}": {value}' for key, value in fields) + "}"
        if form == 1:
            members = [f'"{key}": {value}' for key, value in reversed(fields)]
            return "{" + ", ".join([*members, '"x": [1e999, {"id": -0, "id": 1.5}]']) + "}"
        return "[" + ", ".join(value for _, value in fields) + "]"

    def _f64(self, value: int) -> str:
        return [str(value), f"{value}.0", f"{value}e0"][self.encodings.randrange(3)]

    def teardown(self) -> None:
        self.mms.close()
        self.sim.stop()

    def sim_model(self) -> Simulator:
        return self.sim

    def sim_prepare(self, mem: int, init: int) -> tuple[int, int, int]:
        body = self._struct([("mem_size", self._f64(mem)), ("init_mem_size", self._f64(init))])
        answer = self.mms.call(PREPARE_VM, body)
        return (answer["res"], answer["id"], answer["shortfall"])

    def sim_finish(self, vm_id: int) -> int:
        res: int = self.mms.call(FINISH_ADD_VM, self._struct([("id", str(vm_id))]))["res"]
        return res

    def sim_remove(self, vm_id: int) -> int:
        res: int = self.mms.call(REMOVE_VM, self._struct([("id", str(vm_id))]))["res"]
        return res

    def sim_rebalance(self, deltas: list[tuple[int, int]]) -> list[tuple[int, int]]:
        entries = [
            self._struct([("id", str(vm_id)), ("delta", self._f64(delta))])
            for vm_id, delta in deltas
        ]
        body = self._struct([("deltas", "[" + ", ".join(entries) + "]")])
        answer: dict[str, Any] = self.mms.call(REBALANCE_MEMORY, body)
        return [(entry["id"], entry["delta"]) for entry in answer["actual_deltas"]]

    def sim_stats(self, ids: list[int]) -> list[tuple[int, int, int]]:
        body = self._struct([("ids", "[" + ", ".join(map(str, ids)) + "]")])
        answer: dict[str, Any] = self.mms.call(GET_BALLOON_STATS, body)
        return [
            (entry["id"], entry["balloon_actual"], entry["stats"]["total_memory"])
            for entry in answer["all_stats"]
        ]

    def sim_hang_up(self) -> None:
        self.mms.hang_up()
        self.mms = RawMms(self.sim)


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


ModelAgainstUpstream.TestCase.settings = _settings(MODEL_EXAMPLES, MODEL_STEPS)
SimulatorAgainstUpstream.TestCase.settings = _settings(SOCKET_EXAMPLES, SOCKET_STEPS)
TestModelAgainstUpstream = ModelAgainstUpstream.TestCase
TestSimulatorAgainstUpstream = SimulatorAgainstUpstream.TestCase
