"""The mms layer: the mms protocol and the one connection that speaks it.

Typed messages (``_messages``), the frame and JSON-body codec (``_wire``), addresses and sockets
(``_transport``), the connection thread that alone owns the stream (``_connection``), page and
balloon arithmetic (``_memory_math``), mms's rebalance rules (``_rebalance``, pure: the
simulator answers with them and the server previews with them) and the errors the connection
raises (``_errors``).

May import: the standard library and msgspec only; no grpc, no protobuf, no prometheus, and
nothing else of manatee_grpc (the contract in pyproject.toml checks it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from manatee_grpc._lazy import lazy_getattr

if TYPE_CHECKING:
    from manatee_grpc.mms._connection import (
        DEFAULT_WATCHDOG_S as DEFAULT_WATCHDOG_S,
    )
    from manatee_grpc.mms._connection import (
        BackoffPolicy as BackoffPolicy,
    )
    from manatee_grpc.mms._connection import (
        ConnectionConfig as ConnectionConfig,
    )
    from manatee_grpc.mms._connection import (
        MmsConnection as MmsConnection,
    )
    from manatee_grpc.mms._connection import (
        Stakes as Stakes,
    )
    from manatee_grpc.mms._connection import (
        Trouble as Trouble,
    )
    from manatee_grpc.mms._errors import (
        DeadlineExceededError as DeadlineExceededError,
    )
    from manatee_grpc.mms._errors import (
        ManateeError as ManateeError,
    )
    from manatee_grpc.mms._errors import (
        MmsConnectionError as MmsConnectionError,
    )
    from manatee_grpc.mms._errors import (
        MmsProtocolError as MmsProtocolError,
    )
    from manatee_grpc.mms._errors import (
        MmsRefusedError as MmsRefusedError,
    )
    from manatee_grpc.mms._errors import (
        ServerShuttingDownError as ServerShuttingDownError,
    )
    from manatee_grpc.mms._memory_math import (
        MIB as MIB,
    )
    from manatee_grpc.mms._memory_math import (
        PAGE_SIZE_BYTES as PAGE_SIZE_BYTES,
    )
    from manatee_grpc.mms._messages import (
        MessageType as MessageType,
    )
    from manatee_grpc.mms._messages import (
        MmsRequest as MmsRequest,
    )
    from manatee_grpc.mms._messages import (
        Response as Response,
    )
    from manatee_grpc.mms._transport import (
        ACCEPTED_FORMS as ACCEPTED_FORMS,
    )
    from manatee_grpc.mms._transport import (
        AddressError as AddressError,
    )
    from manatee_grpc.mms._transport import (
        MmsAddress as MmsAddress,
    )
    from manatee_grpc.mms._transport import (
        parse_address as parse_address,
    )

_EXPORTS: dict[str, str] = {
    "ACCEPTED_FORMS": "manatee_grpc.mms._transport",
    "AddressError": "manatee_grpc.mms._transport",
    "BackoffPolicy": "manatee_grpc.mms._connection",
    "ConnectionConfig": "manatee_grpc.mms._connection",
    "DEFAULT_WATCHDOG_S": "manatee_grpc.mms._connection",
    "DeadlineExceededError": "manatee_grpc.mms._errors",
    "MIB": "manatee_grpc.mms._memory_math",
    "ManateeError": "manatee_grpc.mms._errors",
    "MessageType": "manatee_grpc.mms._messages",
    "MmsAddress": "manatee_grpc.mms._transport",
    "MmsConnection": "manatee_grpc.mms._connection",
    "MmsConnectionError": "manatee_grpc.mms._errors",
    "MmsProtocolError": "manatee_grpc.mms._errors",
    "MmsRefusedError": "manatee_grpc.mms._errors",
    "MmsRequest": "manatee_grpc.mms._messages",
    "PAGE_SIZE_BYTES": "manatee_grpc.mms._memory_math",
    "Response": "manatee_grpc.mms._messages",
    "ServerShuttingDownError": "manatee_grpc.mms._errors",
    "Stakes": "manatee_grpc.mms._connection",
    "Trouble": "manatee_grpc.mms._connection",
    "parse_address": "manatee_grpc.mms._transport",
}

__all__ = [
    "ACCEPTED_FORMS",
    "DEFAULT_WATCHDOG_S",
    "MIB",
    "PAGE_SIZE_BYTES",
    "AddressError",
    "BackoffPolicy",
    "ConnectionConfig",
    "DeadlineExceededError",
    "ManateeError",
    "MessageType",
    "MmsAddress",
    "MmsConnection",
    "MmsConnectionError",
    "MmsProtocolError",
    "MmsRefusedError",
    "MmsRequest",
    "Response",
    "ServerShuttingDownError",
    "Stakes",
    "Trouble",
    "parse_address",
]


__getattr__ = lazy_getattr(__name__, globals(), _EXPORTS)
