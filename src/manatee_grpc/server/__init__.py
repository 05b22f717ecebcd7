"""The gRPC surface: the servicer, the one error-to-status mapping, and the server around them.

The servicer (``_servicer``), errors to ``google.rpc.Status`` (``_status``), the server's
lifecycle, health and app (``_server``), who may connect (``_listen``), metrics (``_metrics``),
reflection (``_reflection``) and every setting (``_config``).

May import: core, mms, the generated code (``_proto``), the simulator (the embedded mms), grpc,
protobuf and prometheus_client; never cli (the contract in pyproject.toml checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from manatee_grpc._lazy import lazy_getattr

if TYPE_CHECKING:
    from manatee_grpc.server._config import (
        DEFAULT_LISTEN as DEFAULT_LISTEN,
    )
    from manatee_grpc.server._config import (
        ServerConfig as ServerConfig,
    )
    from manatee_grpc.server._metrics import (
        Metrics as Metrics,
    )
    from manatee_grpc.server._server import (
        SERVICE_NAME as SERVICE_NAME,
    )
    from manatee_grpc.server._server import (
        ManateeServer as ManateeServer,
    )
    from manatee_grpc.server._server import (
        create_server as create_server,
    )
    from manatee_grpc.server._servicer import (
        MemoryServicer as MemoryServicer,
    )

_EXPORTS: dict[str, str] = {
    "DEFAULT_LISTEN": "manatee_grpc.server._config",
    "ManateeServer": "manatee_grpc.server._server",
    "MemoryServicer": "manatee_grpc.server._servicer",
    "Metrics": "manatee_grpc.server._metrics",
    "SERVICE_NAME": "manatee_grpc.server._server",
    "ServerConfig": "manatee_grpc.server._config",
    "create_server": "manatee_grpc.server._server",
}

__all__ = [
    "DEFAULT_LISTEN",
    "SERVICE_NAME",
    "ManateeServer",
    "MemoryServicer",
    "Metrics",
    "ServerConfig",
    "create_server",
]


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
