"""The domain: what the service does with mms, in its own terms.

The books of what mms holds this session (``_books``), the one pending start (``_starts``),
coalesced stats reads (``_stats``), watches (``_watch``), launches (``_launch``), operations in
domain terms (``_bridge``), input validation (``_validation``), request ids
(``_request_ids``), the balancing policy (``_policy``), the loop hand-off helpers (``_aio``) and
the error map (``_errors``).

May import: the mms layer and the standard library; no grpc, no protobuf, no prometheus (the
contract in pyproject.toml checks it). Errors name their gRPC code as text; ``server`` maps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from manatee_grpc._lazy import lazy_getattr

if TYPE_CHECKING:
    from manatee_grpc.core._books import (
        Books as Books,
    )
    from manatee_grpc.core._books import (
        VmRecord as VmRecord,
    )
    from manatee_grpc.core._books import (
        VmState as VmState,
    )
    from manatee_grpc.core._bridge import (
        BridgeConfig as BridgeConfig,
    )
    from manatee_grpc.core._bridge import (
        MemoryBridge as MemoryBridge,
    )
    from manatee_grpc.core._errors import (
        ERROR_DOMAIN as ERROR_DOMAIN,
    )
    from manatee_grpc.core._errors import (
        InvalidArgumentError as InvalidArgumentError,
    )
    from manatee_grpc.core._errors import (
        ManateeError as ManateeError,
    )
    from manatee_grpc.core._launch import (
        LaunchPolicy as LaunchPolicy,
    )
    from manatee_grpc.core._request_ids import (
        RequestIds as RequestIds,
    )
    from manatee_grpc.core._starts import (
        StartSlot as StartSlot,
    )
    from manatee_grpc.core._stats import (
        StatsReader as StatsReader,
    )
    from manatee_grpc.core._stats import (
        StatsSnapshot as StatsSnapshot,
    )
    from manatee_grpc.core._watch import (
        WatchHub as WatchHub,
    )

_EXPORTS: dict[str, str] = {
    "Books": "manatee_grpc.core._books",
    "BridgeConfig": "manatee_grpc.core._bridge",
    "ERROR_DOMAIN": "manatee_grpc.core._errors",
    "InvalidArgumentError": "manatee_grpc.core._errors",
    "LaunchPolicy": "manatee_grpc.core._launch",
    "ManateeError": "manatee_grpc.core._errors",
    "MemoryBridge": "manatee_grpc.core._bridge",
    "RequestIds": "manatee_grpc.core._request_ids",
    "StartSlot": "manatee_grpc.core._starts",
    "StatsReader": "manatee_grpc.core._stats",
    "StatsSnapshot": "manatee_grpc.core._stats",
    "VmRecord": "manatee_grpc.core._books",
    "VmState": "manatee_grpc.core._books",
    "WatchHub": "manatee_grpc.core._watch",
}

__all__ = [
    "ERROR_DOMAIN",
    "Books",
    "BridgeConfig",
    "InvalidArgumentError",
    "LaunchPolicy",
    "ManateeError",
    "MemoryBridge",
    "RequestIds",
    "StartSlot",
    "StatsReader",
    "StatsSnapshot",
    "VmRecord",
    "VmState",
    "WatchHub",
]


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
