"""Plaintext TCP only on loopback unless the operator says --insecure (or configures TLS)."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer, ServerConfig
from manatee_grpc.server._listen import ListenError, is_loopback_host, parse_listen

from .conftest import list_vms


def _non_loopback_ip() -> str | None:
    """This machine's address on its default route, if it has one (a UDP connect sends nothing)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed for real
        ip = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if is_loopback_host(ip) else ip


def _non_loopback_listens() -> list[str]:
    ip = _non_loopback_ip()
    return ["0.0.0.0:0", "[::]:0", ":0"] + ([f"{ip}:0"] if ip else [])


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.45.6.7", True),
        ("localhost", True),
        ("LocalHost", True),
        ("[::1]", True),
        ("[::ffff:127.0.0.1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("", False),
        ("10.1.2.3", False),
        ("[::ffff:10.1.2.3]", False),
        ("[fe80::1]", False),
        ("example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_what_counts_as_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(parse_listen(f"{host}:50051").host) is loopback


@pytest.mark.parametrize("listen", _non_loopback_listens())
def test_non_loopback_plaintext_is_refused_before_anything_starts(listen: str) -> None:
    threads_before = set(threading.enumerate())
    with pytest.raises(ListenError, match="refusing plaintext gRPC on a non-loopback address"):
        ManateeServer(ServerConfig(listen=listen)).start()
    # Refused before binding: no simulator, no mms link, no gRPC threads were started. (A
    # thread of an earlier test may end meanwhile, so only new threads count.)
    assert set(threading.enumerate()) - threads_before == set()


def test_non_loopback_plaintext_is_allowed_with_insecure() -> None:
    server = start_server(listen="0.0.0.0:0", insecure=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert list_vms(channel).session != ""
    finally:
        server.stop(grace_s=1.0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"socket_mode": 0o660}, "apply only to a unix"),
        ({"socket_group": "0"}, "apply only to a unix"),
        ({"listen": "no-port"}, "expected HOST:PORT"),
        ({"listen": "unix://relative"}, "expected unix:///abs/path"),
    ],
)
def test_unusable_listen_settings_are_refused(overrides: dict[str, object], message: str) -> None:
    settings: dict[str, object] = {"listen": "127.0.0.1:0", **overrides}
    with pytest.raises(ListenError, match=message):
        ManateeServer(ServerConfig(**settings)).start()  # type: ignore[arg-type]


def test_metrics_endpoint_off_loopback_is_refused_without_insecure() -> None:
    with pytest.raises(ListenError, match="--metrics-listen"):
        ManateeServer(ServerConfig(listen="127.0.0.1:0", metrics_listen="0.0.0.0:0")).start()


def test_metrics_endpoint_off_loopback_is_allowed_with_insecure() -> None:
    server = ManateeServer(
        ServerConfig(listen="127.0.0.1:0", metrics_listen="0.0.0.0:0", insecure=True)
    ).start()
    try:
        assert server.metrics_address is not None
    finally:
        server.stop(grace_s=0.5)
