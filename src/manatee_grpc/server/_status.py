"""The one place where errors become gRPC statuses with google.rpc error details.

Every handler lets ManateeErrors escape; ``to_status`` turns each into a ``google.rpc.Status``
carrying ErrorInfo (and BadRequest or RetryInfo where they apply).
"""

from __future__ import annotations

import datetime
import logging

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from manatee_grpc.core._errors import ERROR_DOMAIN, InvalidArgumentError, ManateeError

logger = logging.getLogger(__name__)


def to_status(error: ManateeError, session: int | str | None = None) -> grpc.Status:
    metadata = dict(error.metadata)
    if session is not None:
        metadata.setdefault("session", str(session))
    if error.reached_mms is not None:
        # Whether a retry could apply the request twice: "false" means mms never saw it.
        metadata["reachedMms"] = "true" if error.reached_mms else "false"
    details = [
        _pack(
            error_details_pb2.ErrorInfo(
                reason=error.grpc_reason, domain=ERROR_DOMAIN, metadata=metadata
            )
        )
    ]
    if isinstance(error, InvalidArgumentError):
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.description
        )
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[violation])))
    if error.retry_delay_s is not None:
        delay = duration_pb2.Duration()
        delay.FromTimedelta(datetime.timedelta(seconds=error.retry_delay_s))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(
        code=grpc.StatusCode[error.grpc_code].value[0], message=error.message, details=details
    )
    return rpc_status.to_status(status)


def unexpected_status(error: BaseException) -> grpc.Status:
    """A bug of ours: INTERNAL, logged with its traceback, with no internals in the message."""
    logger.error("unexpected error in a handler", exc_info=error)
    return to_status(ManateeError(f"internal error ({type(error).__name__})"))


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed
