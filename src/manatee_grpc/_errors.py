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
    ├── RequestIdsFullError ......... RESOURCE_EXHAUSTED   REQUEST_IDS_FULL (+ RetryInfo)
    ├── MmsRefusedError (res < 0)
    │   ├── errno -22 EINVAL ........ FAILED_PRECONDITION  MMS_EINVAL
    │   ├── errno -12 ENOMEM ........ RESOURCE_EXHAUSTED   MMS_ENOMEM
    │   └── errno -5  EIO ........... FAILED_PRECONDITION  MMS_EIO
    └── MmsConnectionError
        ├── MmsUnavailableError ..... UNAVAILABLE          MMS_UNAVAILABLE (+ RetryInfo)
        ├── MmsConnectionLostError .. UNAVAILABLE          MMS_CONNECTION_LOST (+ RetryInfo)
        ├── MmsHungError ............ UNAVAILABLE          MMS_HUNG (+ RetryInfo)
        ├── MmsOutOfStepError ....... UNAVAILABLE          MMS_OUT_OF_STEP
        └── MmsProtocolError ........ INTERNAL             MMS_PROTOCOL_ERROR

Each class carries its code and reason; `_status.py` is the one place that turns an error into
a `google.rpc.Status`. Metadata keys are lowerCamelCase, as AIP-193 asks. An error about an mms
request says whether that request reached mms (``reached_mms``, metadata ``reachedMms``): a
caller may retry one that did not without fear of applying it twice.
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

    # Whether the request this error is about reached mms; None when no mms request is
    # concerned (bad input, a refusal of our own) or when it cannot be known.
    reached_mms: bool | None = None

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        # ``reached_mms=True|False`` is taken out of the metadata: `_status.py` writes it.
        reached_mms = metadata.pop("reached_mms", None)
        if reached_mms is not None:
            self.reached_mms = bool(reached_mms)
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


class RequestIdsFullError(ManateeError):
    """A new request_id while every id the server may hold is in flight; nothing was sent.

    Refused rather than forgetting an id whose call is in flight (its retry would apply it
    twice; see _request_ids). It clears by itself as those calls end, hence RetryInfo.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_IDS_FULL"
    retry_delay_s = 1.0


class MmsRefusedError(ManateeError):
    """mms answered with a negative errno in ``res``; the code depends on the errno."""

    _BY_ERRNO: ClassVar[dict[int, tuple[grpc.StatusCode, str]]] = {
        RES_EINVAL: (grpc.StatusCode.FAILED_PRECONDITION, "MMS_EINVAL"),
        RES_ENOMEM: (grpc.StatusCode.RESOURCE_EXHAUSTED, "MMS_ENOMEM"),
        RES_EIO: (grpc.StatusCode.FAILED_PRECONDITION, "MMS_EIO"),
    }

    reached_mms = True  # mms itself answered with the errno

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
    retry_delay_s: ClassVar[float | None] = 1.0
    # Whether the stream this call was meant for is closed (mms dropped its VMs with it), or
    # kept: a hung or out-of-step stream, or one answer with a bad body, leaves mms's VMs as
    # they were.
    stream_closed: bool = False


class MmsUnavailableError(MmsConnectionError):
    reason = "MMS_UNAVAILABLE"
    stream_closed = True


class MmsConnectionLostError(MmsConnectionError):
    reason = "MMS_CONNECTION_LOST"
    stream_closed = True


class MmsHungError(MmsConnectionError):
    """mms has not answered a request within its watchdog; the stream is kept (see I4)."""

    reason = "MMS_HUNG"


class MmsOutOfStepError(MmsConnectionError):
    """mms answered out of turn, so the stream may be out of step: nothing more is sent on it.

    Retrying cannot help until an operator resets the stream (or mms answers in step again), so
    there is no RetryInfo.
    """

    reason = "MMS_OUT_OF_STEP"
    retry_delay_s = None


class MmsProtocolError(MmsConnectionError):
    code = grpc.StatusCode.INTERNAL
    reason = "MMS_PROTOCOL_ERROR"
