"""The server under test, as a subprocess: manatee-grpc with a no-op method added for the floor.

The floor is one generic no-op method served by the *same* server (same event loop, thread pool,
RPC cap and channel options) as the MemoryService: what gRPC itself costs on these settings.
Prints one JSON line with the address, then serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import grpc

from manatee_grpc import ManateeServer
from manatee_grpc.cli._main import _add_serve_arguments, _config_from

FLOOR_SERVICE = "bench.Floor"
FLOOR_METHOD = f"/{FLOOR_SERVICE}/Noop"


async def _noop(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    del context
    return request


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._serve")
    _add_serve_arguments(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    floor = grpc.method_handlers_generic_handler(
        FLOOR_SERVICE, {"Noop": grpc.unary_unary_rpc_method_handler(_noop)}
    )
    server = ManateeServer(_config_from(args), extra_handlers=[floor]).start()
    print(json.dumps({"address": server.address}), flush=True)
    sys.stdin.read()  # the bench closes our stdin to stop us
    server.stop(grace_s=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
