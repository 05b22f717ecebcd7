"""Every way a manatee-grpc call can fail, and the gRPC status each failure becomes.

    ManateeError
    ├── InvalidArgumentError ........ INVALID_ARGUMENT     INVALID_ARGUMENT (+ BadRequest)
    ├── VmNotFoundError ............. NOT_FOUND            VM_NOT_FOUND
    ├── SessionResetError ........... NOT_FOUND            SESSION_RESET
    ├── StartInProgressError ........ ABORTED              START_IN_PROGRESS (+ RetryInfo)
    ├── VmNotRunningError ........... FAILED_PRECONDITION  VM_NOT_RUNNING
    ├── PreviewUnavailableError ..... FAILED_PRECONDITION  PREVIEW_UNAVAILABLE
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

Each class carries its code (the name of a ``grpc.StatusCode`` member, as text: the core
imports no grpc) and reason; `server/_status.py` is the one place that turns an error into
a `google.rpc.Status`. Metadata keys are lowerCamelCase, as AIP-193 asks. An error about an mms
request says whether that request reached mms (``reached_mms``, metadata ``reachedMms``): a
caller may retry one that did not without fear of applying it twice.
"""

from __future__ import annotations

from manatee_grpc.mms._errors import (
    DeadlineExceededError,
    ManateeError,
    MmsConnectionError,
    MmsConnectionLostError,
    MmsHungError,
    MmsOutOfStepError,
    MmsProtocolError,
    MmsRefusedError,
    MmsUnavailableError,
    ServerShuttingDownError,
)

ERROR_DOMAIN = "manatee.memory.v1"

__all__ = [
    "ERROR_DOMAIN",
    "DeadlineExceededError",
    "InvalidArgumentError",
    "LaunchAbortedError",
    "LaunchLeaseExpiredError",
    "ManateeError",
    "MmsConnectionError",
    "MmsConnectionLostError",
    "MmsHungError",
    "MmsOutOfStepError",
    "MmsProtocolError",
    "MmsRefusedError",
    "MmsUnavailableError",
    "PreviewUnavailableError",
    "RequestIdsFullError",
    "ServerShuttingDownError",
    "SessionResetError",
    "StartInProgressError",
    "VmNotFoundError",
    "VmNotRunningError",
    "VmStartFailedError",
]


class InvalidArgumentError(ManateeError):
    code = "INVALID_ARGUMENT"
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, description: str, **metadata: object) -> None:
        # Only mms knows the CrOS guest's memory size: a start too large for it is refused by
        # mms, and says so (reachedMms); every other bad input is refused before mms.
        super().__init__(f"{field}: {description}", field=field, **metadata)
        self.field = field
        self.description = description


class VmNotFoundError(ManateeError):
    code = "NOT_FOUND"
    reason = "VM_NOT_FOUND"


class SessionResetError(ManateeError):
    """The VM id belongs to an earlier mms session: mms dropped that VM when the link reset."""

    code = "NOT_FOUND"
    reason = "SESSION_RESET"


class StartInProgressError(ManateeError):
    """Another start is pending in mms (it allows one): worth retrying once that one settles.

    ABORTED, not FAILED_PRECONDITION: the condition clears by itself (every start ends within
    its lease), which is what gRPC's guidance reserves ABORTED/UNAVAILABLE + RetryInfo for.
    """

    code = "ABORTED"
    reason = "START_IN_PROGRESS"
    retry_delay_s = 1.0


class VmNotRunningError(ManateeError):
    """The server refused a call on a VM that is not running; nothing was sent to mms."""

    code = "FAILED_PRECONDITION"
    reason = "VM_NOT_RUNNING"


class PreviewUnavailableError(ManateeError):
    """A rebalance preview (validate_only) cannot say for certain what mms would do.

    A VM's stats are missing or unreadable, or mms's answer depends on its internal allocation
    in the CrOS balloon, which the protocol does not show. Nothing was sent but a stats read.
    """

    code = "FAILED_PRECONDITION"
    reason = "PREVIEW_UNAVAILABLE"


class VmStartFailedError(ManateeError):
    """The LaunchVm client could not start its VM; the reservation was released."""

    code = "FAILED_PRECONDITION"
    reason = "VM_START_FAILED"


class LaunchAbortedError(ManateeError):
    code = "ABORTED"
    reason = "LAUNCH_ABORTED"


class RequestIdsFullError(ManateeError):
    """A new request_id while every id the server may hold is in flight; nothing was sent.

    Refused rather than forgetting an id whose call is in flight (its retry would apply it
    twice; see _request_ids). It clears by itself as those calls end, hence RetryInfo.
    """

    code = "RESOURCE_EXHAUSTED"
    reason = "REQUEST_IDS_FULL"
    retry_delay_s = 1.0


class LaunchLeaseExpiredError(ManateeError):
    """A LaunchVm client sent no `vm_started` within the start lease; the start was released."""

    code = "DEADLINE_EXCEEDED"
    reason = "LEASE_EXPIRED"
