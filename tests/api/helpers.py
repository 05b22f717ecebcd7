"""Reading rich error details off a failed call, the way a client would; the one polling wait
every test package uses; and what the embedded simulator received."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_status import rpc_status

from manatee_grpc import ManateeServer
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Simulator


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    raise AssertionError("no ErrorInfo in the status details")


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return [v.field for v in bad.field_violations]
    return []


def retry_delay_s(error: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return float(info.retry_delay.ToTimedelta().total_seconds())
    return None


def health_status(channel: grpc.Channel, service: str = "") -> int:
    """grpc.health.v1 Check; the typeshed HealthStub declares no methods, so call it directly."""
    check = channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response: health_pb2.HealthCheckResponse = check(
        health_pb2.HealthCheckRequest(service=service), timeout=5
    )
    return int(response.status)


def simulator(server: ManateeServer) -> Simulator:
    assert server.simulator is not None, "these tests need the embedded simulator"
    return server.simulator


def request_count(server: ManateeServer, msg_type: MessageType) -> int:
    """How many ``msg_type`` requests mms (the embedded simulator) has received."""
    return simulator(server).request_counts[msg_type]


def wait_until(
    predicate: Callable[[], bool], what: str = "the condition", timeout_s: float = 10.0
) -> None:
    """Poll ``predicate`` quickly until it holds; a condition wait with a deadline, not a sleep."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {what}")
        time.sleep(0.002)


def session_id(server: ManateeServer, number: int) -> str:
    """The opaque id callers see for the connection's ``number``-th mms session."""
    return server.bridge.books.public_session_id(number)
