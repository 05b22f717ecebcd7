"""The server under test, as a subprocess: manatee-grpc plus a no-op gRPC floor server.

The floor is a second ``grpc.server`` in the same process with the same thread pool size, RPC cap
and channel options, serving one generic no-op method: what gRPC itself costs. Prints one JSON
line with both addresses, then serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent import futures

import grpc

from manatee_grpc import ManateeServer
from manatee_grpc.cli import _add_serve_arguments, _config_from

FLOOR_METHOD = "/bench.Floor/Noop"


def _noop(request: bytes, context: grpc.ServicerContext) -> bytes:
    del context
    return request


def _floor_server(
    listen: str, max_workers: int, max_concurrent_rpcs: int | None
) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="floor"),
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[("grpc.max_receive_message_length", 1 << 20), ("grpc.so_reuseport", 0)],
    )
    handler = grpc.method_handlers_generic_handler(
        "bench.Floor", {"Noop": grpc.unary_unary_rpc_method_handler(_noop)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    server.start()
    return server, port


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench._serve")
    _add_serve_arguments(parser)
    parser.add_argument("--floor-listen", required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    config = _config_from(args)
    server = ManateeServer(config).start()
    floor, floor_port = _floor_server(
        args.floor_listen, config.max_workers, config.max_concurrent_rpcs
    )
    floor_address = (
        args.floor_listen
        if args.floor_listen.startswith("unix:")
        else f"{args.floor_listen.rsplit(':', 1)[0]}:{floor_port}"
    )
    print(json.dumps({"address": server.address, "floor": floor_address}), flush=True)
    sys.stdin.read()  # the bench closes our stdin to stop us
    floor.stop(0.5)
    server.stop(grace_s=0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
