"""TLS and mutual TLS with certificates made at run time; who is refused, and how."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api.conftest import start_server

from manatee_grpc import Client, ManateeServer, ServerConfig
from manatee_grpc.server._listen import ListenError

from .conftest import Pki, list_vms, rpc_code, tls_channel


def _tls_settings(pki: Pki, *, mutual: bool) -> dict[str, object]:
    settings: dict[str, object] = {
        "tls_cert_path": str(pki.server.cert_path),
        "tls_key_path": str(pki.server.key_path),
    }
    if mutual:
        settings["tls_client_ca_path"] = str(pki.ca_path)
    return settings


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ManateeServer]:
    # On every interface: TLS is what makes a non-loopback address acceptable without --insecure.
    server = start_server(listen="0.0.0.0:0", **_tls_settings(pki, mutual=False))
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ManateeServer]:
    server = start_server(**_tls_settings(pki, mutual=True))
    yield server
    server.stop(grace_s=1.0)


def test_tls_client_trusting_the_ca_is_served(tls_server: ManateeServer, pki: Pki) -> None:
    with tls_channel(f"localhost:{tls_server.port}", pki.ca_pem) as channel:
        assert list_vms(channel).session != ""


def test_plaintext_client_is_refused_by_a_tls_server(tls_server: ManateeServer) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server.port}") as channel:
        assert rpc_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_client_that_does_not_trust_the_server_refuses_it(
    tls_server: ManateeServer, pki: Pki
) -> None:
    with tls_channel(f"127.0.0.1:{tls_server.port}", pki.other_ca_pem) as channel:
        assert rpc_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate_from_the_ca(
    mtls_server: ManateeServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.address, pki.ca_pem, pki.client) as channel:
        assert list_vms(channel).session != ""


def test_mutual_tls_refuses_a_client_without_a_certificate(
    mtls_server: ManateeServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.address, pki.ca_pem) as channel:
        assert rpc_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_server: ManateeServer, pki: Pki
) -> None:
    with tls_channel(mtls_server.address, pki.ca_pem, pki.other_client) as channel:
        assert rpc_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_a_plaintext_client(mtls_server: ManateeServer) -> None:
    with grpc.insecure_channel(mtls_server.address) as channel:
        assert rpc_code(channel) == grpc.StatusCode.UNAVAILABLE


def test_the_python_client_speaks_mutual_tls(mtls_server: ManateeServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_pem,
        private_key=pki.client.key_pem,
        certificate_chain=pki.client.cert_pem,
    )
    with Client(mtls_server.address, credentials=credentials) as client:
        assert client.health() == "SERVING"
        assert client.list_vms().session != ""


def _bad_tls_settings(pki: Pki, tmp: Path) -> list[tuple[dict[str, object], str]]:
    garbage = tmp / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cert, key = str(pki.server.cert_path), str(pki.server.key_path)
    return [
        ({"tls_cert_path": cert}, "go together"),
        ({"tls_key_path": key}, "go together"),
        ({"tls_client_ca_path": str(pki.ca_path)}, "needs --tls-cert"),
        ({"tls_cert_path": cert, "tls_key_path": str(tmp / "missing.key")}, "cannot read"),
        ({"tls_cert_path": str(garbage), "tls_key_path": key}, "matching private key"),
        # A key that is real but belongs to another certificate.
        ({"tls_cert_path": cert, "tls_key_path": str(pki.client.key_path)}, "matching"),
        (
            {"tls_cert_path": cert, "tls_key_path": key, "tls_client_ca_path": str(garbage)},
            "no CA certificate",
        ),
    ]


def test_unusable_tls_files_are_refused_at_start(pki: Pki, tmp_path: Path) -> None:
    for settings, message in _bad_tls_settings(pki, tmp_path):
        with pytest.raises(ListenError, match=message):
            ManateeServer(ServerConfig(listen="127.0.0.1:0", **settings)).start()  # type: ignore[arg-type]
