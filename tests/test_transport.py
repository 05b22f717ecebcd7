"""Tests for the mms transports: address parsing, and real unix, tcp and fd:// socket pairs.

Listeners bind port 0 or a temporary unix path; a client connects before the accept, which the
listen backlog allows, so no test needs a thread or a sleep. vsock has no loopback data path
here, so only its parsing and its reach into the socket layer are checked.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from manatee_grpc.mms import _transport
from manatee_grpc.mms._transport import (
    ACCEPTED_FORMS,
    AddressError,
    MmsAddress,
    bound_address,
    connect,
    listen,
    parse_address,
    recv_exactly,
)

TIMEOUT_S = 5.0
VSOCK_UNREACHABLE = {
    errno.ENODEV,
    errno.ECONNRESET,
    errno.ETIMEDOUT,
    errno.EADDRNOTAVAIL,
    errno.ECONNREFUSED,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}


@pytest.fixture(autouse=True)
def forget_handed_over_fds() -> Iterator[None]:
    # fd numbers are reused from test to test; each test is a fresh "launch".
    _transport._forget_handed_over_fds()
    yield
    _transport._forget_handed_over_fds()


def connected_pair(address: MmsAddress) -> tuple[socket.socket, socket.socket, socket.socket]:
    """(listener, client, server side) for a listening address; the caller closes all three."""
    listener = listen(address)
    client = connect(bound_address(listener, address), TIMEOUT_S)
    server_side, _ = listener.accept()
    return listener, client, server_side


def exchange(client: socket.socket, server_side: socket.socket) -> None:
    client.sendall(b"ping!")
    assert recv_exactly(server_side, 5) == b"ping!"
    server_side.sendall(b"po")
    server_side.sendall(b"ng")
    assert recv_exactly(client, 4) == b"pong"


# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("vsock://2:5000", MmsAddress("vsock", cid=2, port=5000), "vsock://2:5000"),
        (
            "vsock://any:4294967295",
            MmsAddress("vsock", cid=socket.VMADDR_CID_ANY, port=2**32 - 1),
            "vsock://4294967295:4294967295",
        ),
        ("vsock://4294967295:0", MmsAddress("vsock", cid=2**32 - 1, port=0), None),
        ("unix:///run/mms.sock", MmsAddress("unix", path="/run/mms.sock"), None),
        ("unix:run/mms.sock", MmsAddress("unix", path="run/mms.sock"), None),
        ("unix:/run/mms.sock", MmsAddress("unix", path="/run/mms.sock"), "unix:///run/mms.sock"),
        ("tcp://127.0.0.1:0", MmsAddress("tcp", host="127.0.0.1", port=0), None),
        ("tcp://localhost:65535", MmsAddress("tcp", host="localhost", port=65535), None),
        ("tcp://mms-sim.internal:7", MmsAddress("tcp", host="mms-sim.internal", port=7), None),
        ("tcp://[::1]:8080", MmsAddress("tcp", host="::1", port=8080), None),
        ("tcp://[::ffff:1.2.3.4]:1", MmsAddress("tcp", host="::ffff:1.2.3.4", port=1), None),
        ("fd://0", MmsAddress("fd", fd=0), None),
        ("fd://37", MmsAddress("fd", fd=37), None),
        ("unix-abstract:manatee-sim", MmsAddress("unix", path="\0manatee-sim"), None),
    ],
)
def test_parse_every_form(text: str, expected: MmsAddress, canonical: str | None) -> None:
    address = parse_address(text)
    assert address == expected
    assert str(address) == (canonical or text)
    assert parse_address(str(address)) == address


@pytest.mark.parametrize(
    "text",
    [
        "",
        "mms.sock",
        "/run/mms.sock",
        "127.0.0.1:5000",
        "http://127.0.0.1:5000",
        "TCP://127.0.0.1:5000",
        "vsock://",
        "vsock://2",
        "vsock://2:",
        "vsock://:5000",
        "vsock://-1:5000",
        "vsock://2:-1",
        "vsock://4294967296:5000",
        "vsock://2:4294967296",
        "vsock://0x2:5000",
        "vsock://2:5000/x",
        "vsock://any:any",
        "vsock://2 :5000",
        "unix:",
        "unix://",
        "unix-abstract:",
        "unix-abstract:a\0b",
        "unix-abstract:" + "x" * 107,
        "unix://relative/path",
        "unix:a\0b",
        "unix:\ud800",
        "unix:///" + "x" * 200,
        "tcp://",
        "tcp://127.0.0.1",
        "tcp://127.0.0.1:",
        "tcp://:5000",
        "tcp://127.0.0.1:65536",
        "tcp://127.0.0.1:-1",
        "tcp://127.0.0.1:5000/",
        "tcp://::1:5000",
        "tcp://[::1]",
        "tcp://[not-ipv6]:5000",
        "tcp://[::1:5000",
        "tcp://host name:5000",
        "tcp://127.0.0.1:99999999999999",
        "tcp://127.0.0.1:٣",
        "fd://",
        "fd://-1",
        "fd://x",
        "fd://1.0",
        "fd://2147483648",
        "fd:// 3",
        " fd://3",
    ],
)
def test_malformed_addresses_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(AddressError) as caught:
        parse_address(text)
    message = str(caught.value)
    for form in ("vsock://CID:PORT", "unix:///abs/path", "unix:relative/path", "tcp://HOST:PORT"):
        assert form in message
    assert ACCEPTED_FORMS in message


def test_address_error_is_a_value_error() -> None:
    assert issubclass(AddressError, ValueError)


# --- tcp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["tcp://127.0.0.1:0", "tcp://[::1]:0", "tcp://localhost:0"])
def test_tcp_port_zero_listen_connect_and_exchange(text: str) -> None:
    address = parse_address(text)
    listener, client, server_side = connected_pair(address)
    with listener, client, server_side:
        reached = bound_address(listener, address)
        assert reached.scheme == "tcp"
        assert reached.host == address.host
        assert reached.port == listener.getsockname()[1] != 0
        assert client.gettimeout() is None
        assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        exchange(client, server_side)


def test_tcp_wildcard_listener_is_reached_through_loopback() -> None:
    address = parse_address("tcp://0.0.0.0:0")
    listener, client, server_side = connected_pair(address)
    with listener, client, server_side:
        assert bound_address(listener, address).host == "127.0.0.1"
        exchange(client, server_side)


def test_tcp_connect_to_a_closed_port_is_refused() -> None:
    with listen(parse_address("tcp://127.0.0.1:0")) as listener:
        closed = bound_address(listener, parse_address("tcp://127.0.0.1:0"))
    with pytest.raises(ConnectionRefusedError):
        connect(closed, TIMEOUT_S)


def test_connect_refuses_a_non_positive_timeout() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        connect(parse_address("tcp://127.0.0.1:1"), 0)


# --- recv_exactly ----------------------------------------------------------------------------


def test_recv_exactly_assembles_short_reads_and_reads_zero_bytes() -> None:
    a, b = socket.socketpair()
    with a, b:
        for chunk in (b"a", b"bc", b"defg"):
            a.sendall(chunk)
        assert recv_exactly(b, 0) == b""
        assert recv_exactly(b, 7) == b"abcdefg"


def test_recv_exactly_raises_connection_error_on_early_eof() -> None:
    a, b = socket.socketpair()
    with b:
        a.sendall(b"abc")
        a.close()
        with pytest.raises(ConnectionError, match="after 3 of 8 bytes"):
            recv_exactly(b, 8)


# --- unix --------------------------------------------------------------------------------------


def test_unix_absolute_listen_connect_and_exchange(tmp_path: Path) -> None:
    address = parse_address(f"unix://{tmp_path}/mms.sock")
    listener, client, server_side = connected_pair(address)
    with listener, client, server_side:
        assert bound_address(listener, address) == address
        assert client.gettimeout() is None
        exchange(client, server_side)


def test_unix_relative_path_is_relative_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    address = parse_address("unix:mms.sock")
    listener, client, server_side = connected_pair(address)
    with listener, client, server_side:
        assert (tmp_path / "mms.sock").is_socket()
        exchange(client, server_side)


def test_stale_unix_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "mms.sock"
    dead_server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead_server.bind(str(path))
    dead_server.close()  # the socket file outlives its server
    assert path.is_socket()
    listener, client, server_side = connected_pair(parse_address(f"unix://{path}"))
    with listener, client, server_side:
        exchange(client, server_side)


def test_live_unix_socket_is_not_stolen(tmp_path: Path) -> None:
    address = parse_address(f"unix://{tmp_path}/mms.sock")
    with listen(address) as live:
        with pytest.raises(OSError, match="already listening"):
            listen(address)
        # The liveness probe shows up at the live server as a connection that hangs up at once.
        probe, _ = live.accept()
        with probe:
            assert probe.recv(1) == b""
        # The first server still owns its path: clients still reach it.
        with connect(address, TIMEOUT_S) as client:
            server_side, _ = live.accept()
            with server_side:
                exchange(client, server_side)


def test_unix_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "important.txt"
    path.write_text("keep me")
    with pytest.raises(FileExistsError, match="not a socket"):
        listen(parse_address(f"unix://{path}"))
    assert path.read_text() == "keep me"


def test_unix_connect_to_a_missing_path_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        connect(parse_address(f"unix://{tmp_path}/absent.sock"), TIMEOUT_S)


# --- fd:// handover -----------------------------------------------------------------------------


def test_fd_handover_is_used_once() -> None:
    launcher_end, our_end = socket.socketpair()
    fd = our_end.detach()  # from here on, the fd belongs to whoever connects to fd://N
    with launcher_end:
        address = parse_address(f"fd://{fd}")
        with connect(address, TIMEOUT_S) as sock:
            assert sock.fileno() == fd
            assert sock.gettimeout() is None
            exchange(sock, launcher_end)
            with pytest.raises(ConnectionError, match="cannot be reopened"):
                connect(address, TIMEOUT_S)
        # Closed now, and the number may be reused: still never reopened.
        with pytest.raises(ConnectionError, match="cannot be reopened"):
            connect(address, TIMEOUT_S)


def test_fd_handover_of_a_tcp_socket_sets_nodelay() -> None:
    address = parse_address("tcp://127.0.0.1:0")
    with listen(address) as listener:
        reached = bound_address(listener, address)
        plain = socket.create_connection((reached.host, reached.port))
        fd = plain.detach()
        server_side, _ = listener.accept()
        with server_side, connect(parse_address(f"fd://{fd}"), TIMEOUT_S) as sock:
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            exchange(sock, server_side)


def test_fd_that_is_not_a_socket_is_refused_and_left_open() -> None:
    read_fd, write_fd = os.pipe()
    try:
        with pytest.raises(AddressError, match="not an open socket"):
            connect(parse_address(f"fd://{read_fd}"), TIMEOUT_S)
        os.write(write_fd, b"x")
        assert os.read(read_fd, 1) == b"x"
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_fd_that_is_a_datagram_socket_is_refused_and_left_open() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        with pytest.raises(AddressError, match="not a stream socket"):
            connect(parse_address(f"fd://{a.fileno()}"), TIMEOUT_S)
        a.send(b"still open")
        assert b.recv(16) == b"still open"


def test_fd_that_is_a_listening_socket_cannot_be_connected() -> None:
    with listen(parse_address("tcp://127.0.0.1:0")) as listener:
        address = parse_address(f"fd://{listener.fileno()}")
        with pytest.raises(AddressError, match="listening socket"):
            connect(address, TIMEOUT_S)
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1


def test_fd_that_is_an_unconnected_stream_socket_is_refused() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as unconnected:
        with pytest.raises(AddressError, match="not connected"):
            connect(parse_address(f"fd://{unconnected.fileno()}"), TIMEOUT_S)
        assert unconnected.fileno() != -1


def test_fd_that_is_closed_is_refused() -> None:
    read_fd, write_fd = os.pipe()
    os.close(read_fd)
    os.close(write_fd)
    with pytest.raises(AddressError, match="not an open socket"):
        connect(parse_address(f"fd://{read_fd}"), TIMEOUT_S)


def test_listen_on_an_inherited_listening_fd_returns_it_as_is() -> None:
    address = parse_address("tcp://127.0.0.1:0")
    inherited = listen(address)
    port = inherited.getsockname()[1]
    fd_address = parse_address(f"fd://{inherited.detach()}")
    with listen(fd_address) as listener:
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        reached = bound_address(listener, fd_address)
        assert reached == MmsAddress("tcp", host="127.0.0.1", port=port)
        with connect(reached, TIMEOUT_S) as client:
            server_side, _ = listener.accept()
            with server_side:
                exchange(client, server_side)


def test_listen_on_an_inherited_unix_listening_fd_reports_its_path(tmp_path: Path) -> None:
    unix_address = parse_address(f"unix://{tmp_path}/mms.sock")
    fd_address = parse_address(f"fd://{listen(unix_address).detach()}")
    with listen(fd_address) as listener:
        assert bound_address(listener, fd_address) == unix_address


def test_listen_on_an_inherited_connected_fd_returns_the_stream() -> None:
    launcher_end, our_end = socket.socketpair()
    fd_address = parse_address(f"fd://{our_end.detach()}")
    with launcher_end, listen(fd_address) as stream:
        assert stream.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 0
        assert bound_address(stream, fd_address) == fd_address
        exchange(launcher_end, stream)


# --- vsock: no loopback data path on this machine --------------------------------------------


def test_vsock_connect_reaches_the_socket_layer() -> None:
    # CID 3 is a guest that does not exist here: the kernel answers, quickly, with an OSError
    # (AddressError is a ValueError, so a parsing failure would not satisfy this).
    with pytest.raises(OSError) as caught:
        connect(parse_address("vsock://3:5000"), 0.5)
    assert isinstance(caught.value, TimeoutError) or caught.value.errno in VSOCK_UNREACHABLE


def test_vsock_listen_on_any_cid_binds_or_fails_in_the_kernel() -> None:
    address = parse_address("vsock://any:4294967295")
    try:
        listener = listen(address)
    except OSError as exc:
        assert not isinstance(exc, AddressError)
        return
    with listener:
        assert listener.family == socket.AF_VSOCK
        assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        reached = bound_address(listener, address)
        assert reached.scheme == "vsock"
        assert reached.cid == _transport.VMADDR_CID_LOCAL
        assert reached.port not in (0, socket.VMADDR_PORT_ANY)
