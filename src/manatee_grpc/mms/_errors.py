"""The errors of the mms layer: what the connection raises and what an mms refusal means.

    ManateeError .................... the base of every error the service reports
    ├── DeadlineExceededError ....... DEADLINE_EXCEEDED    DEADLINE_EXCEEDED
    ├── ServerShuttingDownError ..... UNAVAILABLE          SHUTTING_DOWN (+ RetryInfo)
    ├── MmsRefusedError (res < 0) ... by errno: MMS_EINVAL, MMS_ENOMEM, MMS_EIO
    └── MmsConnectionError .......... MMS_UNAVAILABLE, MMS_CONNECTION_LOST, MMS_HUNG,
                                      MMS_OUT_OF_STEP, MMS_PROTOCOL_ERROR

Each class names its gRPC status code as text (``code``, a ``grpc.StatusCode`` member name) and
its ErrorInfo reason; this layer imports no grpc. ``core/_errors.py`` draws the whole map, and
``server/_status.py`` is the one place that turns an error into a ``google.rpc.Status``.
"""

from __future__ import annotations

from typing import ClassVar

from manatee_grpc.mms._messages import RES_EINVAL, RES_EIO, RES_ENOMEM


class ManateeError(Exception):
    """Base of every error this service reports; knows its gRPC code and ErrorInfo reason."""

    code: ClassVar[str] = "INTERNAL"
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
    def grpc_code(self) -> str:
        return self.code

    @property
    def grpc_reason(self) -> str:
        return self.reason


class DeadlineExceededError(ManateeError):
    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class ServerShuttingDownError(ManateeError):
    code = "UNAVAILABLE"
    reason = "SHUTTING_DOWN"
    retry_delay_s = 1.0


class MmsRefusedError(ManateeError):
    """mms answered with a negative errno in ``res``; the code depends on the errno."""

    _BY_ERRNO: ClassVar[dict[int, tuple[str, str]]] = {
        RES_EINVAL: ("FAILED_PRECONDITION", "MMS_EINVAL"),
        RES_ENOMEM: ("RESOURCE_EXHAUSTED", "MMS_ENOMEM"),
        RES_EIO: ("FAILED_PRECONDITION", "MMS_EIO"),
    }

    reached_mms = True  # mms itself answered with the errno

    def __init__(self, res: int, message: str, **metadata: object) -> None:
        super().__init__(message, errno=res, **metadata)
        self.res = res

    @property
    def grpc_code(self) -> str:
        return self._BY_ERRNO.get(self.res, ("UNKNOWN", ""))[0]

    @property
    def grpc_reason(self) -> str:
        return self._BY_ERRNO.get(self.res, ("UNKNOWN", "MMS_ERRNO"))[1]


class MmsConnectionError(ManateeError):
    """The stream to mms is not usable for this call."""

    code = "UNAVAILABLE"
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
    code = "INTERNAL"
    reason = "MMS_PROTOCOL_ERROR"
