"""Stream-socket transports to mms, chosen by one address string (vsock, unix, tcp or fd://N).

Parsing, connecting, listening (for the simulator) and exact reads live here; the wire codec and
the connection thread above never see a socket family.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import threading
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "AddressError",
    "MmsAddress",
    "bound_address",
    "connect",
    "listen",
    "parse_address",
    "recv_exactly",
]

ACCEPTED_FORMS = (
    "vsock://CID:PORT, unix:///abs/path, unix:relative/path, unix-abstract:NAME, tcp://HOST:PORT, "
    "fd://N"
)
# A Linux abstract unix socket (gRPC's spelling): no file, so nothing is left when its owner dies.
ABSTRACT_PREFIX = "unix-abstract:"

U32_MAX = 2**32 - 1
TCP_PORT_MAX = 65535
# Linux's sun_path is 108 bytes; keep one for the terminating NUL some peers expect.
UNIX_PATH_MAX_BYTES = 107
# The loopback CID: how a listener bound to VMADDR_CID_ANY is reached from this machine.
VMADDR_CID_LOCAL = 1

Scheme = Literal["vsock", "unix", "tcp", "fd"]

# Bounded digit runs: int() of an unbounded run could be slow or hit Python's digit limit.
_NUMBER = r"[0-9]{1,10}"
_VSOCK_RE = re.compile(rf"vsock://({_NUMBER}|any):({_NUMBER})", re.ASCII)
_TCP_RE = re.compile(rf"tcp://(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+)):({_NUMBER})", re.ASCII)
_FD_RE = re.compile(rf"fd://({_NUMBER})", re.ASCII)


class AddressError(ValueError):
    """An mms address that is malformed or names something that cannot carry the stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{reason}; accepted forms: {ACCEPTED_FORMS}")


@dataclass(frozen=True, slots=True)
class MmsAddress:
    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""
    cid: int = 0
    fd: int = -1

    @property
    def is_abstract(self) -> bool:
        """A Linux abstract unix socket: its path starts with a NUL byte and names no file."""
        return self.scheme == "unix" and self.path.startswith("\0")

    def __str__(self) -> str:
        if self.is_abstract:
            return ABSTRACT_PREFIX + self.path[1:]
        if self.scheme == "vsock":
            return f"vsock://{self.cid}:{self.port}"
        if self.scheme == "unix":
            return f"unix://{self.path}" if self.path.startswith("/") else f"unix:{self.path}"
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp://{host}:{self.port}"
        return f"fd://{self.fd}"


def parse_address(text: str) -> MmsAddress:
    if match := _VSOCK_RE.fullmatch(text):
        cid_text, port_text = match.groups()
        cid = socket.VMADDR_CID_ANY if cid_text == "any" else int(cid_text)
        # vsock ports are 32-bit (VMADDR_PORT_ANY is 2**32 - 1), unlike TCP's.
        return MmsAddress(
            "vsock",
            cid=_check_range(cid, U32_MAX, "vsock CID", text),
            port=_check_range(int(port_text), U32_MAX, "vsock port", text),
        )
    if match := _TCP_RE.fullmatch(text):
        ipv6_host, name_host, port_text = match.groups()
        if ipv6_host is not None:
            try:
                socket.inet_pton(socket.AF_INET6, ipv6_host)
            except OSError:
                raise AddressError(f"{ipv6_host!r} is not an IPv6 address in {text!r}") from None
        port = _check_range(int(port_text), TCP_PORT_MAX, "tcp port", text)
        return MmsAddress("tcp", host=ipv6_host or name_host, port=port)
    if match := _FD_RE.fullmatch(text):
        return MmsAddress("fd", fd=_check_range(int(match.group(1)), 2**31 - 1, "fd", text))
    if text.startswith(ABSTRACT_PREFIX):
        name = text.removeprefix(ABSTRACT_PREFIX)
        if not name or "\0" in name:
            raise AddressError(f"unix-abstract: takes a name without NUL bytes, got {text!r}")
        return MmsAddress("unix", path=_check_unix_path("\0" + name, text, abstract=True))
    if text.startswith("unix://"):
        path = text.removeprefix("unix://")
        if not path.startswith("/"):
            raise AddressError(f"unix:// takes an absolute path (unix:///abs/path), got {text!r}")
        return MmsAddress("unix", path=_check_unix_path(path, text))
    if text.startswith("unix:"):
        return MmsAddress("unix", path=_check_unix_path(text.removeprefix("unix:"), text))
    raise AddressError(f"cannot parse mms address {text!r}")


def _check_range(value: int, maximum: int, what: str, text: str) -> int:
    if value > maximum:
        raise AddressError(f"{what} {value} is outside 0..{maximum} in {text!r}")
    return value


def _check_unix_path(path: str, text: str, *, abstract: bool = False) -> str:
    if not path:
        raise AddressError(f"empty unix socket path in {text!r}")
    if "\0" in path and not abstract:
        raise AddressError(f"unix socket path contains a NUL byte in {text!r}")
    try:
        path_bytes = os.fsencode(path)
    except UnicodeEncodeError:
        raise AddressError(f"unix socket path is not encodable in {text!r}") from None
    if len(path_bytes) > UNIX_PATH_MAX_BYTES:
        raise AddressError(f"unix socket path longer than {UNIX_PATH_MAX_BYTES} bytes in {text!r}")
    return path


# --- client side ------------------------------------------------------------------------------

# fd numbers handed over by a launcher and already wrapped. Once that socket is closed the number
# may be reused by an unrelated file or socket of this process, so it must never be wrapped again.
_handed_over_fds: set[int] = set()
_handed_over_lock = threading.Lock()


def connect(address: MmsAddress, timeout_s: float) -> socket.socket:
    """A connected, blocking stream socket; ``timeout_s`` bounds only the connect itself."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if address.scheme == "fd":
        sock = _take_handed_over_fd(address, must_be_connected=True)
        _set_nodelay_if_tcp(sock)
        return sock
    if address.scheme == "tcp":
        sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
    else:
        family, target = _family_and_target(address)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
    _set_nodelay_if_tcp(sock)
    # Reads wait as long as mms takes (RemoveVm blocks until the VM exits); the connection layer
    # owns any watchdog.
    sock.settimeout(None)
    return sock


def _family_and_target(address: MmsAddress) -> tuple[int, str | tuple[int, int]]:
    if address.scheme == "vsock":
        return socket.AF_VSOCK, (address.cid, address.port)
    if address.scheme == "unix":
        return socket.AF_UNIX, address.path
    raise AddressError(f"no socket family for {address}")


def _set_nodelay_if_tcp(sock: socket.socket) -> None:
    # Requests are small and strictly alternate with responses: Nagle would only add latency.
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def check_handed_over_fd(address: MmsAddress) -> None:
    """Check, without taking it, that fd://N is a connected stream socket (AddressError if not).

    For a start-up check: the fd stays open and unclaimed, for ``connect`` to take later.
    """
    with _handed_over_lock:
        if address.fd in _handed_over_fds:
            raise AddressError(f"{address} was already used: a handed-over fd cannot be reopened")
    _wrap_stream_fd(address, must_be_connected=True).detach()


def _take_handed_over_fd(address: MmsAddress, *, must_be_connected: bool) -> socket.socket:
    """Wrap an inherited fd once, refusing anything that is not a stream socket.

    A refused fd is left open and unclaimed: it was never ours, and closing it could break
    whoever owns it.
    """
    with _handed_over_lock:
        if address.fd in _handed_over_fds:
            raise ConnectionError(
                f"{address} was already used: a handed-over fd cannot be reopened"
            )
        _handed_over_fds.add(address.fd)
    try:
        return _wrap_stream_fd(address, must_be_connected=must_be_connected)
    except BaseException:
        with _handed_over_lock:
            _handed_over_fds.discard(address.fd)
        raise


def _wrap_stream_fd(address: MmsAddress, *, must_be_connected: bool) -> socket.socket:
    try:
        # With fileno=, Python reads the family and type from the fd itself.
        sock = socket.socket(fileno=address.fd)
    except OSError as exc:
        raise AddressError(f"{address} is not an open socket: {exc}") from exc
    reason = ""
    if sock.type != socket.SOCK_STREAM:
        reason = f"{address} is not a stream socket"
    elif must_be_connected:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            reason = f"{address} is a listening socket, not a connected stream"
        else:
            try:
                sock.getpeername()
            except OSError:
                reason = f"{address} is a stream socket that is not connected"
    if reason:
        sock.detach()
        raise AddressError(reason)
    sock.setblocking(True)
    return sock


def _forget_handed_over_fds() -> None:
    """For tests only: fd numbers are reused between tests that each hand one over."""
    with _handed_over_lock:
        _handed_over_fds.clear()


def recv_exactly(sock: socket.socket, n_bytes: int) -> bytes:
    """Read exactly ``n_bytes``; ConnectionError if the peer closes the stream first."""
    if n_bytes < 0:
        raise ValueError(f"n_bytes must not be negative, got {n_bytes}")
    buffer = bytearray(n_bytes)
    view = memoryview(buffer)
    received_bytes = 0
    while received_bytes < n_bytes:
        chunk_bytes = sock.recv_into(view[received_bytes:])
        if chunk_bytes == 0:
            raise ConnectionError(
                f"unexpected EOF: peer closed the stream after {received_bytes} of {n_bytes} bytes"
            )
        received_bytes += chunk_bytes
    return bytes(buffer)


# --- server side (the simulator) --------------------------------------------------------------


def listen(address: MmsAddress, backlog: int = 8) -> socket.socket:
    """A bound, listening socket; for fd://N the inherited socket as-is (listening or connected)."""
    if address.scheme == "fd":
        return _take_handed_over_fd(address, must_be_connected=False)
    if address.scheme == "tcp":
        # create_server assumes IPv4 unless told; let the resolver pick the host's family.
        tcp_family = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0][0]
        return socket.create_server(
            (address.host, address.port), family=tcp_family, backlog=backlog
        )
    if address.scheme == "unix" and not address.is_abstract:
        remove_stale_unix_socket(address.path)
    family, target = _family_and_target(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.bind(target)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# A live server answers a unix connect at once; a wedged one must not hang start-up.
_STALE_PROBE_TIMEOUT_S = 2.0


def remove_stale_unix_socket(path: str) -> bool:
    """Remove a socket file left by a dead server (True if one was removed).

    Refuses a live server's socket (OSError EADDRINUSE) or any other file (FileExistsError);
    a socket that cannot be probed (permission, a wedged server) raises the probe's OSError,
    since it is not provably stale.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            errno.EEXIST, "exists and is not a socket, refusing to replace it", path
        )
    # Probing costs a live server one connection that hangs up at once; a stale file refuses it.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_STALE_PROBE_TIMEOUT_S)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: the file outlived its server.
        os.unlink(path)
        return True
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "a server is already listening on this unix socket", path)


def bound_address(sock: socket.socket, address: MmsAddress) -> MmsAddress:
    """The address a client on this machine should use to reach the listening ``sock``."""
    name = sock.getsockname()
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        host = str(name[0])
        # A wildcard bind is reachable through loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        if address.scheme == "tcp" and address.host not in ("0.0.0.0", "::", ""):
            host = address.host
        return MmsAddress("tcp", host=host, port=int(name[1]))
    if sock.family == socket.AF_VSOCK:
        cid, port = int(name[0]), int(name[1])
        return MmsAddress(
            "vsock", cid=VMADDR_CID_LOCAL if cid == socket.VMADDR_CID_ANY else cid, port=port
        )
    if sock.family == socket.AF_UNIX:
        if address.scheme == "unix":
            return address
        path = os.fsdecode(name) if isinstance(name, bytes) else str(name)
        if path and not path.startswith("\0"):
            return MmsAddress("unix", path=path)
    return address
