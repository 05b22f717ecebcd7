"""The one error-to-status mapping writes whether an mms request reached mms (ErrorInfo)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from manatee_grpc.core._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ManateeError,
    MmsConnectionLostError,
    MmsHungError,
    MmsOutOfStepError,
    MmsRefusedError,
)
from manatee_grpc.server._status import to_status


def _details(error: ManateeError) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, bool]:
    """The code, the ErrorInfo, and whether a RetryInfo came with it."""
    status = to_status(error)
    proto = status_pb2.Status.FromString(dict(status.trailing_metadata)["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    retry = False
    for detail in proto.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            detail.Unpack(info)
        retry |= detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR)
    return status.code, info, retry


@pytest.mark.parametrize(
    ("error", "reached"),
    [
        (MmsHungError("PREPARE_VM not sent", messageType="PREPARE_VM", reached_mms=False), "false"),
        (MmsConnectionLostError("lost during REMOVE_VM", reached_mms=True), "true"),
        (DeadlineExceededError("deadline (never sent)", reached_mms=False), "false"),
        (MmsRefusedError(-22, "mms refused"), "true"),  # mms itself answered the errno
        (MmsRefusedError(-22, "VM 1 is starting", reached_mms=False), "false"),
    ],
)
def test_every_mms_failure_says_whether_its_request_reached_mms(
    error: ManateeError, reached: str
) -> None:
    _, info, _ = _details(error)
    assert info.metadata["reachedMms"] == reached


def test_a_failure_about_no_mms_request_says_nothing_of_it() -> None:
    _, info, _ = _details(InvalidArgumentError("vm_id", "must be positive"))
    assert "reachedMms" not in info.metadata


def test_out_of_step_is_unavailable_without_retry_info() -> None:
    # Retrying cannot help until an operator resets the stream.
    code, info, retry = _details(MmsOutOfStepError("not sent", reached_mms=False))
    assert (code, info.reason, retry) == (grpc.StatusCode.UNAVAILABLE, "MMS_OUT_OF_STEP", False)
