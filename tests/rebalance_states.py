"""Random device states and rebalance requests, for the preview-vs-real tests.

A seeded walk: each step starts or removes sibling VMs, opens or drops a pending start (its
reservation sits in the CrOS balloon), changes what guests use, moves mms's internal
allocation and makes real rebalances, so balloons, stats and mms's books end up
anywhere a session can take them. The requests include every case mms's arithmetic has: plain
moves, clamps (far past a balloon's range), exact fills and drains, trims and short inflates
(a guest that will not give what it uses, so the slack limits the deflates). The same walk
drives a bare MmsModel (tests/test_rebalance.py) and a real server (tests/api).
"""

from __future__ import annotations

import random
from typing import Protocol

MIB = 1 << 20
GIB = 1 << 30
PAGE = 4096
MAX_SIBLINGS = 4


class Device(Protocol):
    """What the walk needs of a device: the mms messages, and the guests behind it."""

    def start_vm(self, mem_size_bytes: int, init_mem_size_bytes: int) -> int | None: ...
    def prepare_vm(self, mem_size_bytes: int, init_mem_size_bytes: int) -> int: ...
    def remove_vm(self, vm_id: int) -> None: ...
    def rebalance(self, deltas: dict[int, int]) -> None: ...
    def set_used_bytes(self, vm_id: int, used_bytes: int) -> None: ...
    def change_internal_allocation(self, delta_bytes: int) -> None: ...
    def internal_allocation_bytes(self) -> int: ...
    def balloon_bytes(self, vm_id: int) -> int: ...


PENDING = -1  # the key of ``mem_by_vm_id`` that holds the pending start's id, if any


def step(rng: random.Random, device: Device, mem_by_vm_id: dict[int, int]) -> None:
    """One random change of the device's state (``mem_by_vm_id``: its running siblings)."""
    roll = rng.random()
    pending = mem_by_vm_id.pop(PENDING, None)
    if pending is not None and (roll < 0.35 or not mem_by_vm_id or rng.random() < 0.3):
        device.remove_vm(pending)  # a start is let go before another (mms holds one at a time)
        pending = None
    if (roll < 0.25 and len(mem_by_vm_id) < MAX_SIBLINGS) or not mem_by_vm_id:
        mem_size_bytes = rng.randrange(64, 2048) * MIB
        init_mem_size_bytes = rng.randrange(32, mem_size_bytes // MIB + 1) * MIB
        vm_id = device.start_vm(mem_size_bytes, init_mem_size_bytes)
        if vm_id is not None:
            mem_by_vm_id[vm_id] = mem_size_bytes
    elif roll < 0.32:
        vm_id = rng.choice(sorted(mem_by_vm_id))
        device.remove_vm(vm_id)
        del mem_by_vm_id[vm_id]
    elif roll < 0.35:
        pending = device.prepare_vm(rng.randrange(64, 1024) * MIB, rng.randrange(16, 64) * MIB)
    elif roll < 0.55:
        vm_id = rng.choice([0, *mem_by_vm_id])
        top_bytes = mem_by_vm_id.get(vm_id, 6 * GIB)
        device.set_used_bytes(vm_id, rng.randrange(0, top_bytes // MIB + 1) * MIB)
    elif roll < 0.65:
        # The memcg watcher only gives back what it took: the allocation never goes below 0.
        held_bytes = device.internal_allocation_bytes()
        device.change_internal_allocation(
            max(rng.randrange(-64, 65) * MIB, -held_bytes) // PAGE * PAGE
        )
    else:
        device.rebalance(request(rng, device, mem_by_vm_id))
    if pending is not None:
        mem_by_vm_id[PENDING] = pending


def running(mem_by_vm_id: dict[int, int]) -> list[int]:
    return sorted(vm_id for vm_id in mem_by_vm_id if vm_id != PENDING)


def request(rng: random.Random, device: Device, mem_by_vm_id: dict[int, int]) -> dict[int, int]:
    """Sibling balloon deltas for some of the running siblings (at least one)."""
    ids = running(mem_by_vm_id)
    chosen = rng.sample(ids, rng.randrange(1, len(ids) + 1))
    deltas: dict[int, int] = {}
    for vm_id in chosen:
        balloon_bytes = device.balloon_bytes(vm_id)
        kind = rng.random()
        if kind < 0.15:  # far past the range: a clamp, then a trim of the CrOS side
            delta_bytes = rng.choice([-1, 1]) * rng.randrange(1, 65) * GIB
        elif kind < 0.25:  # fill the balloon to the VM's memory size exactly
            delta_bytes = mem_by_vm_id[vm_id] - balloon_bytes
        elif kind < 0.35:  # empty it exactly
            delta_bytes = -balloon_bytes
        else:  # a move of any size, not page-aligned (the server rounds it down)
            delta_bytes = rng.randrange(-1536 * MIB, 1536 * MIB)
        deltas[vm_id] = delta_bytes
    return deltas
