"""The operator's view: ``python -m manatee_grpc serve`` refusals, socket flags, client TLS."""

from __future__ import annotations

import grp
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from api.conftest import start_server
from api.test_process import wait_serving
from cli.conftest import run_cli

from .conftest import Pki, other_group

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 10 + 14


def _assert_refused(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert result.returncode == EXIT_USAGE, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_file_in_the_way(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    path.write_text("precious\n")
    result = run_cli("serve", "--listen", f"unix://{path}")
    _assert_refused(
        result, f"manatee-grpc: error: unix socket {path}: the path exists and is not a socket"
    )
    assert path.read_text() == "precious\n"


def test_serve_refuses_plaintext_on_every_interface() -> None:
    result = run_cli("serve", "--listen", "0.0.0.0:0")
    _assert_refused(
        result, "manatee-grpc: error: --listen 0.0.0.0:0: refusing plaintext gRPC on a non-loopback"
    )
    assert "--insecure" in result.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--socket-mode", "rw"], "argument --socket-mode: 'rw': expected an octal mode"),
        (["--socket-group", "no-such-group-here"], "no such group"),
        (["--tls-cert", "/nonexistent/cert.pem"], "--tls-cert and --tls-key go together"),
    ],
)
def test_serve_refuses_bad_flags(sock_dir: Path, flags: list[str], message: str) -> None:
    result = run_cli("serve", "--listen", f"unix://{sock_dir / 'm.sock'}", *flags)
    _assert_refused(result, message)


def test_serve_applies_socket_mode_and_group(sock_dir: Path) -> None:
    path = sock_dir / "manatee.sock"
    gid = other_group()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "manatee_grpc",
            "serve",
            "--listen",
            f"unix://{path}",
            "--socket-mode",
            "0640",
            "--socket-group",
            grp.getgrgid(gid).gr_name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"unix://{path}", process)
        st = os.lstat(path)
        assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, gid)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
        assert process.returncode == 0, stderr
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    # gRPC removes its socket on the way out; the next start would find nothing in the way.
    assert not path.exists()


def test_client_commands_speak_mutual_tls(pki: Pki) -> None:
    server = start_server(
        tls_cert_path=str(pki.server.cert_path),
        tls_key_path=str(pki.server.key_path),
        tls_client_ca_path=str(pki.ca_path),
    )
    try:
        tls = ["--tls-ca", str(pki.ca_path)]
        mine = ["--tls-cert", str(pki.client.cert_path), "--tls-key", str(pki.client.key_path)]
        served = run_cli("health", "--server", server.address, *tls, *mine)
        assert (served.returncode, served.stdout) == (0, "SERVING\n"), served.stderr
        refused = run_cli("health", "--server", server.address, *tls, "--timeout", "5")
        assert refused.returncode == EXIT_UNAVAILABLE, refused.stderr
        assert refused.stderr.startswith("error: UNAVAILABLE")
        plaintext = run_cli("health", "--server", server.address)
        assert plaintext.returncode == EXIT_UNAVAILABLE, plaintext.stderr
    finally:
        server.stop(grace_s=1.0)


def test_serve_reports_an_address_in_use() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--listen", f"127.0.0.1:{port}")
    _assert_refused(result, f"manatee-grpc: error: --listen 127.0.0.1:{port}: cannot bind")
