"""Every way a manatee-grpc call can fail, and the gRPC status each failure becomes.

    ManateeError
    ├── InvalidArgumentError ........ INVALID_ARGUMENT     INVALID_ARGUMENT (+ BadRequest)
    ├── VmNotFoundError ............. NOT_FOUND            VM_NOT_FOUND
    ├── SessionResetError ........... NOT_FOUND            SESSION_RESET
    ├── StartInProgressError ........ ABORTED              START_IN_PROGRESS (+ RetryInfo)
    ├── VmNotRunningError ........... FAILED_PRECONDITION  VM_NOT_RUNNING
    ├── VmStartFailedError .......... FAILED_PRECONDITION  VM_START_FAILED
    ├── LaunchAbortedError .......... ABORTED              LAUNCH_ABORTED
    ├── LaunchLeaseExpiredError ..... DEADLINE_EXCEEDED    LEASE_EXPIRED
    ├── DeadlineExceededError ....... DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
    ├── ServerShuttingDownError ..... UNAVAILABLE          SHUTTING_DOWN (+ RetryInfo)
    ├── MmsRefusedError (res < 0)
    │   ├── errno -22 EINVAL ........ FAILED_PRECONDITION  MMS_EINVAL
    │   ├── errno -12 ENOMEM ........ RESOURCE_EXHAUSTED   MMS_ENOMEM
    │   └── errno -5  EIO ........... FAILED_PRECONDITION  MMS_EIO
    └── MmsConnectionError
        ├── MmsUnavailableError ..... UNAVAILABLE          MMS_UNAVAILABLE (+ RetryInfo)
        ├── MmsConnectionLostError .. UNAVAILABLE          MMS_CONNECTION_LOST (+ RetryInfo)
        ├── MmsHungError ............ UNAVAILABLE          MMS_HUNG (+ RetryInfo)
        └── MmsProtocolError ........ INTERNAL             MMS_PROTOCOL_ERROR

Each class carries its code and reason; `_status.py` is the one place that turns an error into
a `google.rpc.Status`. Metadata keys are lowerCamelCase, as AIP-193 asks.
"""

from __future__ import annotations

from typing import ClassVar

import grpc

from ._messages import RES_EINVAL, RES_EIO, RES_ENOMEM

ERROR_DOMAIN = "manatee.memory.v1"


class ManateeError(Exception):
    """Base of every error this service reports; knows its gRPC code and ErrorInfo reason."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.INTERNAL
    reason: ClassVar[str] = "INTERNAL"
    # Seconds a caller should wait before retrying; None when retrying cannot help.
    retry_delay_s: ClassVar[float | None] = None

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.metadata: dict[str, str] = {k: str(v) for k, v in metadata.items()}

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self.code

    @property
    def grpc_reason(self) -> str:
        return self.reason


class InvalidArgumentError(ManateeError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str, **metadata: object) -> None:
        # Only mms knows the CrOS guest's memory size: a start too large for it is refused by
        # mms, and says so (reachedMms); every other bad input is refused before mms.
        super().__init__(f"{field}: {description}", field=field, **metadata)
        self.field = field
        self.description = description


class VmNotFoundError(ManateeError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "VM_NOT_FOUND"


class SessionResetError(ManateeError):
    """The VM id belongs to an earlier mms session: mms dropped that VM when the link reset."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "SESSION_RESET"


class StartInProgressError(ManateeError):
    """Another start is pending in mms (it allows one): worth retrying once that one settles.

    ABORTED, not FAILED_PRECONDITION: the condition clears by itself (every start ends within
    its lease), which is what gRPC's guidance reserves ABORTED/UNAVAILABLE + RetryInfo for.
    """

    code = grpc.StatusCode.ABORTED
    reason = "START_IN_PROGRESS"
    retry_delay_s = 1.0


class VmNotRunningError(ManateeError):
    """The server refused a call on a VM that is not running; nothing was sent to mms."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "VM_NOT_RUNNING"


class VmStartFailedError(ManateeError):
    """The LaunchVm client could not start its VM; the reservation was released."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "VM_START_FAILED"


class LaunchAbortedError(ManateeError):
    code = grpc.StatusCode.ABORTED
    reason = "LAUNCH_ABORTED"


class LaunchLeaseExpiredError(ManateeError):
    """A LaunchVm client sent no `vm_started` within the start lease; the start was released."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "LEASE_EXPIRED"


class DeadlineExceededError(ManateeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ServerShuttingDownError(ManateeError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "SHUTTING_DOWN"
    retry_delay_s = 1.0


class MmsRefusedError(ManateeError):
    """mms answered with a negative errno in ``res``; the code depends on the errno."""

    _BY_ERRNO: ClassVar[dict[int, tuple[grpc.StatusCode, str]]] = {
        RES_EINVAL: (grpc.StatusCode.FAILED_PRECONDITION, "MMS_EINVAL"),
        RES_ENOMEM: (grpc.StatusCode.RESOURCE_EXHAUSTED, "MMS_ENOMEM"),
        RES_EIO: (grpc.StatusCode.FAILED_PRECONDITION, "MMS_EIO"),
    }

    def __init__(self, res: int, message: str, **metadata: object) -> None:
        super().__init__(message, errno=res, **metadata)
        self.res = res

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return self._BY_ERRNO.get(self.res, (grpc.StatusCode.UNKNOWN, ""))[0]

    @property
    def grpc_reason(self) -> str:
        return self._BY_ERRNO.get(self.res, (grpc.StatusCode.UNKNOWN, "MMS_ERRNO"))[1]


class MmsConnectionError(ManateeError):
    """The stream to mms is not usable for this call."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "MMS_UNAVAILABLE"
    retry_delay_s = 1.0


class MmsUnavailableError(MmsConnectionError):
    reason = "MMS_UNAVAILABLE"


class MmsConnectionLostError(MmsConnectionError):
    reason = "MMS_CONNECTION_LOST"


class MmsHungError(MmsConnectionError):
    reason = "MMS_HUNG"


class MmsProtocolError(MmsConnectionError):
    code = grpc.StatusCode.INTERNAL
    reason = "MMS_PROTOCOL_ERROR"
