"""Certificates made at test run time, short unix socket paths, and TLS channels."""

from __future__ import annotations

import datetime
import grp
import ipaddress
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Identity:
    """A certificate and its key, as PEM files."""

    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def key_pem(self) -> bytes:
        return self.key_path.read_bytes()


@dataclass(frozen=True)
class Pki:
    """One CA that signed the server's and a client's certificates, and a second, unrelated CA."""

    ca_path: Path
    server: Identity
    client: Identity
    other_ca_path: Path
    other_client: Identity  # signed by the other CA

    @property
    def ca_pem(self) -> bytes:
        return self.ca_path.read_bytes()

    @property
    def other_ca_pem(self) -> bytes:
        return self.other_ca_path.read_bytes()


_Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _certificate(
    common_name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: _Issuer | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    """A CA certificate when ``issuer`` is None (self-signed), else a leaf it signs."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    signing_key = key if issuer is None else issuer[1]
    return builder.sign(signing_key, hashes.SHA256())


def _write(directory: Path, name: str, cert: x509.Certificate) -> Path:
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _leaf(
    directory: Path,
    name: str,
    issuer: _Issuer,
    usage: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> Identity:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _certificate(name, key, issuer, usage=usage, san=san)
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Identity(_write(directory, name, cert), key_path)


def make_pki(directory: Path) -> Pki:
    cas: list[_Issuer] = []
    for name in ("test-ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas.append((_certificate(name, key, None), key))
    ca, other_ca = cas
    server_names: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("::1")),
    ]
    return Pki(
        ca_path=_write(directory, "ca", ca[0]),
        server=_leaf(
            directory, "server", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=server_names
        ),
        client=_leaf(directory, "client", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH),
        other_ca_path=_write(directory, "other-ca", other_ca[0]),
        other_client=_leaf(
            directory, "other-client", other_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH
        ),
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def other_group() -> int:
    """A group this process may give a file to, other than the one new files get anyway."""
    mine = os.getegid()
    candidates = [gid for gid in os.getgroups() if gid != mine]
    if not candidates and os.geteuid() == 0:
        candidates = [g.gr_gid for g in grp.getgrall() if g.gr_gid != mine]
    assert candidates, "this test needs a second group to belong to (or to run as root)"
    return candidates[0]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A fresh directory with a short path: a unix socket path must fit in 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="mg-sec-") as directory:
        yield Path(directory)


def tls_channel(target: str, root_pem: bytes, identity: Identity | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root_pem,
        private_key=None if identity is None else identity.key_pem,
        certificate_chain=None if identity is None else identity.cert_pem,
    )
    return grpc.secure_channel(target, credentials)


def list_vms(channel: grpc.Channel) -> pb.ListVmsResponse:
    """One real RPC; raises grpc.RpcError when the connection is refused."""
    response: pb.ListVmsResponse = pb_grpc.MemoryServiceStub(channel).ListVms(
        pb.ListVmsRequest(), timeout=RPC_TIMEOUT_S
    )
    return response


def rpc_status(channel: grpc.Channel) -> tuple[grpc.StatusCode, str]:
    """The status code and details of one ListVms on ``channel`` (OK when it succeeds)."""
    try:
        list_vms(channel)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def rpc_code(channel: grpc.Channel) -> grpc.StatusCode:
    return rpc_status(channel)[0]
