"""Pure arithmetic of mms memory accounting: page alignment and the hypervisor overhead.

Shared by the simulator (which must reproduce mms number for number) and the bridge (which
aligns deltas the way concierge did before sending them).
"""

from __future__ import annotations

from typing import Literal

PAGE_SIZE_BYTES = 4096
MIB = 1024 * 1024
# JSON numbers travel as doubles: integers above 2^53 would silently lose precision.
MAX_JSON_SAFE_INT = 2**53

ExtraBytesFormula = Literal["current", "older"]


def round_up_page(size_bytes: int) -> int:
    return -(-size_bytes // PAGE_SIZE_BYTES) * PAGE_SIZE_BYTES


def align_down_page(delta_bytes: int) -> int:
    """Concierge's ``delta & ~(pagesize - 1)``: two's complement, so negatives round down."""
    return delta_bytes & ~(PAGE_SIZE_BYTES - 1)


def is_page_aligned(size_bytes: int) -> bool:
    return size_bytes % PAGE_SIZE_BYTES == 0


def extra_bytes(mem_size_bytes: int, formula: ExtraBytesFormula = "current") -> int:
    """Hypervisor overhead mms reserves on top of a VM's initial memory.

    Current: shmem xarray + EPT/page tables + vvu mappings, plus 6 MiB for crosvm itself.
    """
    if formula == "older":
        return round_up_page(mem_size_bytes * 97 // 10240) + 6 * MIB
    return (
        round_up_page(mem_size_bytes * 72 // 10240)
        + round_up_page(mem_size_bytes * 20 // 1024)
        + 6 * MIB
    )


def default_init_mem_size_bytes(mem_size_bytes: int) -> int:
    """Concierge's ``min(1000 MiB, mem_size)``: what a sibling may use before balloon policy."""
    return min(1000 * MIB, mem_size_bytes)
