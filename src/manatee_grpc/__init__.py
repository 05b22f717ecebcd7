"""manatee-grpc: a gRPC front for the ManaTEE memory service (mms).

The public surface is what ``__all__`` lists: the generated API messages and stubs, the server
factory and its config, the typed ``Client`` with its errors, and ``aio`` (the same client for
asyncio, ``manatee_grpc.aio.Client``). They are imported on first use, so ``import
manatee_grpc.client`` (or ``manatee_grpc.aio``) loads neither the server, nor the simulator, nor
prometheus. The layers are folders: ``mms/`` (the protocol and the one connection), ``core/``
(the domain), ``server/`` (the gRPC surface), ``client`` and ``aio`` (grpc and the generated
code only), ``cli/`` (the operator command), ``sim/`` (the mms simulator); each ``__init__``
says what it may import, and the import-linter contract in pyproject.toml checks it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from manatee_grpc import aio as aio
    from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as memory_service_pb2
    from manatee_grpc._proto.manatee.memory.v1 import (
        memory_service_pb2_grpc as memory_service_pb2_grpc,
    )
    from manatee_grpc.client import (
        Client as Client,
    )
    from manatee_grpc.client import (
        FieldViolation as FieldViolation,
    )
    from manatee_grpc.client import (
        ManateeRpcError as ManateeRpcError,
    )
    from manatee_grpc.server import (
        SERVICE_NAME as SERVICE_NAME,
    )
    from manatee_grpc.server import (
        ManateeServer as ManateeServer,
    )
    from manatee_grpc.server import (
        ServerConfig as ServerConfig,
    )
    from manatee_grpc.server import (
        create_server as create_server,
    )

_PROTO = "manatee_grpc._proto.manatee.memory.v1"
# Each public name and the module it comes from (for the two generated modules: their package).
_EXPORTS: dict[str, str] = {
    "Client": "manatee_grpc.client",
    "FieldViolation": "manatee_grpc.client",
    "ManateeRpcError": "manatee_grpc.client",
    "ManateeServer": "manatee_grpc.server",
    "aio": "manatee_grpc.aio",
    "SERVICE_NAME": "manatee_grpc.server",
    "ServerConfig": "manatee_grpc.server",
    "create_server": "manatee_grpc.server",
    "memory_service_pb2": _PROTO,
    "memory_service_pb2_grpc": _PROTO,
}

__all__ = [
    "SERVICE_NAME",
    "Client",
    "FieldViolation",
    "ManateeRpcError",
    "ManateeServer",
    "ServerConfig",
    "__version__",
    "aio",
    "create_server",
    "memory_service_pb2",
    "memory_service_pb2_grpc",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: the server (and with it the simulator and prometheus) loads only when asked for.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module == _PROTO:
        value: Any = importlib.import_module(f"{module}.{name}")
    elif module == f"{__name__}.{name}":  # a public submodule (aio)
        value = importlib.import_module(module)
    else:
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
