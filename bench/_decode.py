"""Micro-benchmark of the mms body decode: µs per answer for each message type.

Run ``.venv/bin/python -m bench._decode``. The bodies are what the simulator writes (the codec's
own encode_response): a 9-VM GetBalloonStats answer with every stat reported, the same answer
with one VM's balloon wrapped (the per-entry fallback), a 9-VM RebalanceMemory answer and the
three small ones. Each figure is the best of several timeit rounds, so a noisy machine inflates
it less.
"""

from __future__ import annotations

import argparse
import functools
import timeit
from typing import Any

from manatee_grpc.mms._messages import (
    BALLOON_STAT_FIELDS,
    BalloonDelta,
    BalloonStats,
    FinishAddVmRequest,
    FinishAddVmResponse,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RebalanceMemoryRequest,
    RebalanceMemoryResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
    VmBalloonStats,
)
from manatee_grpc.mms._wire import HEADER_SIZE_BYTES, decode_response, encode_response

VM_COUNT = 9
GIB = 1 << 30
WRAPPED_BALLOON = 2**64 - 32 * (1 << 20)  # what real mms reports for the CrOS guest


def _stats(vm_id: int) -> VmBalloonStats:
    # Realistic magnitudes: every field reported, byte amounts in the GiB range.
    values = [GIB * (vm_id + 1) + 4096 * index for index in range(len(BALLOON_STAT_FIELDS))]
    return VmBalloonStats(vm_id, BalloonStats(*values), 512 << 20)


def _body(request: MmsRequest[Any], response: Response) -> bytes:
    return encode_response(request.TYPE, response)[HEADER_SIZE_BYTES:]


def _cases() -> dict[str, tuple[MmsRequest[Any], bytes]]:
    vm_ids = tuple(range(VM_COUNT))
    stats = GetBalloonStatsResponse(all_stats=tuple(_stats(vm_id) for vm_id in vm_ids))
    stats_request = GetBalloonStatsRequest(vm_ids=vm_ids)
    good_stats_body = _body(stats_request, stats)
    # The CrOS guest (VM 0) with a wrapped balloon: one entry takes the per-entry fallback.
    first = good_stats_body.index(b'"balloon_actual":536870912')
    wrapped_body = (
        good_stats_body[:first]
        + f'"balloon_actual":{WRAPPED_BALLOON}'.encode()
        + good_stats_body[first + len(b'"balloon_actual":536870912') :]
    )
    rebalance = RebalanceMemoryRequest(tuple(BalloonDelta(i, -(64 << 20)) for i in vm_ids))
    prepare = PrepareVmRequest(mem_size_bytes=4 * GIB, init_mem_size_bytes=GIB)
    return {
        f"GetBalloonStats ({VM_COUNT} VMs)": (stats_request, good_stats_body),
        f"GetBalloonStats ({VM_COUNT} VMs, 1 wrapped)": (stats_request, wrapped_body),
        f"RebalanceMemory ({VM_COUNT} deltas)": (
            rebalance,
            _body(rebalance, RebalanceMemoryResponse(rebalance.deltas)),
        ),
        "PrepareVm": (prepare, _body(prepare, PrepareVmResponse(-12, 3, 1 << 28))),
        "FinishAddVm": (
            FinishAddVmRequest(3),
            _body(FinishAddVmRequest(3), FinishAddVmResponse(0)),
        ),
        "RemoveVm": (RemoveVmRequest(3), _body(RemoveVmRequest(3), RemoveVmResponse(0))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--number", type=int, default=20_000)
    args = parser.parse_args()
    for name, (request, body) in _cases().items():
        decode_response(request, body)  # fails loudly if the body does not decode
        timings = timeit.repeat(
            functools.partial(decode_response, request, body),
            repeat=args.rounds,
            number=args.number,
        )
        best_us = min(timings) / args.number * 1e6
        print(f"{name:<36} {len(body):>5} B  {best_us:7.2f} µs")


if __name__ == "__main__":
    main()
