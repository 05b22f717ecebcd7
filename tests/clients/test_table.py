"""Every case of ``cases.CASES`` once through the sync client and once through the asyncio one,
against a real server on the simulator: same arguments, same results, same errors."""

from __future__ import annotations

import uuid

import grpc
import pytest
from api.helpers import wait_until

from manatee_grpc import ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc

from . import drivers
from .cases import CASES, GENERATED, RPC_TIMEOUT_S, Case, Fails, Given, Ok
from .drivers import Flavour


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_case(server: ManateeServer, flavour: Flavour, case: Case) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        given = Given(server, stub)
        given.session = stub.ListVms(pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S).session
        with case.given(given):
            arguments = case.args(given)
            outcome: object
            try:
                outcome = drivers.call(
                    flavour,
                    case.target or server.address,
                    case.method,
                    arguments.args,
                    arguments.kwargs,
                    client_kwargs=case.client_kwargs,
                    take=case.take,
                )
            except ManateeRpcError as error:
                outcome = error
            check(case.expect, outcome, given)


def check(expect: Ok | Fails, outcome: object, given: Given) -> None:
    if isinstance(expect, Ok):
        assert not isinstance(outcome, ManateeRpcError), f"expected a result, got {outcome!r}"
        assert expect.view(outcome, given) == expect.expected
        return
    assert isinstance(outcome, ManateeRpcError), f"expected {expect.code.name}, got {outcome!r}"
    assert outcome.code == expect.code, outcome
    if expect.reason is not None:
        assert outcome.reason == expect.reason, outcome
        assert outcome.domain == ("manatee.memory.v1" if expect.reason else "")
    assert tuple(v.field for v in outcome.field_violations) == expect.fields
    assert all(v.description for v in outcome.field_violations)
    assert outcome.retry_delay_s == expect.retry_delay_s
    assert expect.metadata.items() <= outcome.metadata.items(), outcome.metadata
    if expect.request_id == GENERATED:
        assert outcome.request_id is not None
        uuid.UUID(outcome.request_id)
    else:
        assert outcome.request_id == expect.request_id
    assert isinstance(outcome.__cause__, Exception)  # the gRPC error it was decoded from
    if expect.heard is not None:
        assert given.heard == expect.heard
    if expect.vm_ids_after is not None:
        wanted = expect.vm_ids_after
        wait_until(lambda: given.vm_ids() == wanted, f"the VMs left are {wanted}")
