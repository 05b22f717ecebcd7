"""manatee-grpc: a gRPC front for the ManaTEE memory service (mms).

The public surface is what ``__all__`` lists: the generated API messages and stubs, the server
factory and its config, and the typed ``Client`` with its errors. Everything in ``_``-prefixed
modules is internal.
"""

from __future__ import annotations

from ._config import ServerConfig
from ._proto.manatee.memory.v1 import memory_service_pb2 as memory_service_pb2
from ._proto.manatee.memory.v1 import memory_service_pb2_grpc as memory_service_pb2_grpc
from ._server import SERVICE_NAME, ManateeServer, create_server
from .client import Client, FieldViolation, ManateeRpcError

__all__ = [
    "SERVICE_NAME",
    "Client",
    "FieldViolation",
    "ManateeRpcError",
    "ManateeServer",
    "ServerConfig",
    "__version__",
    "create_server",
    "memory_service_pb2",
    "memory_service_pb2_grpc",
]

__version__ = "0.1.0"
