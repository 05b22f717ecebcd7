"""Under mutual TLS an event names the caller's certificate subject, not only its address."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from api.conftest import start_server
from api.event_helpers import last_sequence, recorded_events, wait_mms_available_recorded

from manatee_grpc import Client, ManateeRpcError, ManateeServer
from manatee_grpc import memory_service_pb2 as pb

from .conftest import Pki, tls_channel


@pytest.fixture
def mtls_server(pki: Pki) -> Iterator[ManateeServer]:
    server = start_server(
        tls_cert_path=str(pki.server.cert_path),
        tls_key_path=str(pki.server.key_path),
        tls_client_ca_path=str(pki.ca_path),
    )
    yield server
    server.stop(grace_s=1.0)


def test_a_state_changing_call_under_mtls_is_one_event_with_the_certificate_subject(
    mtls_server: ManateeServer, pki: Pki
) -> None:
    target = f"localhost:{mtls_server.port}"
    with (
        tls_channel(target, pki.ca_pem, pki.client) as channel,
        Client(target, channel=channel) as client,
    ):
        wait_mms_available_recorded(client)
        last = last_sequence(client)
        prepared = client.prepare_vm(512 << 20)
        with pytest.raises(ManateeRpcError):
            client.remove_vm(99)
        client.remove_vm(prepared.vm_id)
        # Each unary call's event is recorded before its answer is sent.
        events = recorded_events(client, last)
    assert [e.kind for e in events] == [
        pb.EVENT_KIND_PREPARE_VM,
        pb.EVENT_KIND_REMOVE_VM,
        pb.EVENT_KIND_REMOVE_VM,
    ]
    for event in events:
        assert event.caller.origin == "client"
        assert event.caller.certificate_subject == "CN=client"
        assert event.caller.peer.startswith(("ipv4:127.0.0.1:", "ipv6:[::1]:"))
