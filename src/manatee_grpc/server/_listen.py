"""Who may connect: the listen-address policy, unix socket files, and TLS credentials.

``prepare(config)`` checks everything before anything binds and returns a ``Listener``;
``Listener.bind(server)`` adds the port to a ``grpc.Server`` and gives a unix socket its mode
and group. Every refusal is a ``ListenError`` whose message names the flag to change.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from manatee_grpc.mms import _transport
from manatee_grpc.server._config import DEFAULT_SOCKET_MODE, ServerConfig

__all__ = [
    "DEFAULT_SOCKET_MODE",
    "ListenAddress",
    "ListenError",
    "Listener",
    "PortAdder",
    "check_client_ca",
    "check_policy",
    "check_port_free",
    "is_loopback_host",
    "load_server_credentials",
    "parse_listen",
    "prepare",
    "prepare_socket_path",
    "resolve_group",
]

logger = logging.getLogger(__name__)

# The umask a unix socket is bound under: grpc creates the file itself, and this makes it
# owner-only from its first instant (bind gives 0o777 & ~umask).
_BIND_UMASK = 0o177
TCP_PORT_MAX = 65535


class ListenError(Exception):
    """The server refuses to listen as configured; the message says why and what to change."""


class PortAdder(Protocol):
    """What ``Listener.bind`` needs of a server: ``grpc.Server`` and ``grpc.aio.Server`` both."""

    def add_insecure_port(self, address: str) -> int: ...

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int: ...


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A parsed ``--listen``: a unix socket path, or a TCP host and port."""

    listen: str
    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_unix(self) -> bool:
        return self.unix_path is not None


def parse_listen(listen: str) -> ListenAddress:
    """``unix:///abs/path``, ``unix:relative/path``, or ``HOST:PORT`` (IPv6 in brackets)."""
    if listen.startswith("unix:"):
        rest = listen.removeprefix("unix:")
        path = rest.removeprefix("//")
        if not path or (rest.startswith("//") and not path.startswith("/")):
            raise ListenError(f"--listen {listen!r}: expected unix:///abs/path or unix:rel/path")
        return ListenAddress(listen, unix_path=path)
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or len(port) > 5:
        raise ListenError(f"--listen {listen!r}: expected HOST:PORT or unix:///abs/path")
    # gRPC would take a port above 65535 modulo 65536 (99999 binds 34463) without a word.
    if int(port) > TCP_PORT_MAX:
        raise ListenError(f"--listen {listen!r}: port {int(port)} is outside 0..{TCP_PORT_MAX}")
    return ListenAddress(listen, host=host, port=int(port))


def is_loopback_host(host: str) -> bool:
    """True only for ``localhost`` and literal loopback addresses (127.0.0.0/8, ::1).

    Other host names are not resolved: a name can resolve differently tomorrow, and gRPC binds
    every address it resolves to. An empty host, ``0.0.0.0`` and ``[::]`` are every interface.
    """
    bare = host.removeprefix("[").removesuffix("]")
    if bare.lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_policy(address: ListenAddress, *, tls: bool, insecure: bool) -> None:
    """Refuse plaintext TCP beyond loopback: anyone reaching the port could manage VM memory."""
    if address.is_unix or tls or is_loopback_host(address.host):
        return
    if not insecure:
        raise ListenError(
            f"--listen {address.listen}: refusing plaintext gRPC on a non-loopback address; "
            "configure TLS (--tls-cert/--tls-key, and --tls-client-ca to require client "
            "certificates) or pass --insecure"
        )
    logger.warning(
        "listening on %s WITHOUT TLS (--insecure): anyone who can reach this port can manage "
        "VM memory",
        address.listen,
    )


def load_server_credentials(
    cert_path: str | None, key_path: str | None, client_ca_path: str | None
) -> grpc.ServerCredentials | None:
    """Server TLS credentials, or None for plaintext; with a client CA, client certs are required.

    The files are also loaded into an ``ssl`` context first: gRPC would accept a bad PEM or a
    key that does not match the certificate here and fail only at each client's handshake.
    """
    if cert_path is None and key_path is None:
        if client_ca_path is not None:
            raise ListenError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert_path is None or key_path is None:
        raise ListenError("--tls-cert and --tls-key go together")
    cert_pem = _read_pem("--tls-cert", cert_path)
    key_pem = _read_pem("--tls-key", key_path)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)
    except (ssl.SSLError, OSError) as error:
        raise ListenError(
            f"--tls-cert {cert_path} / --tls-key {key_path}: not a certificate and its "
            f"matching private key ({error})"
        ) from None
    client_ca_pem: bytes | None = None
    if client_ca_path is not None:
        client_ca_pem = _read_pem("--tls-client-ca", client_ca_path)
        check_client_ca(client_ca_path)
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=client_ca_pem,
        require_client_auth=client_ca_pem is not None,
    )


def check_client_ca(path: str) -> None:
    """Refuse a --tls-client-ca file that holds anything but CA certificates.

    OpenSSL trusts only CA certificates (basicConstraints CA:TRUE, or an old v1 root) as
    anchors, so a client or server certificate passed here by mistake would let the server
    start and then refuse every client at its handshake. ``cert_store_stats`` counts what the
    file loaded, and which of it OpenSSL takes for a CA (``X509_check_ca``).
    """
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=path)
    except (ssl.SSLError, OSError) as error:
        raise ListenError(f"--tls-client-ca {path}: no CA certificate in it ({error})") from None
    stats = context.cert_store_stats()
    certificates, authorities = stats["x509"], stats["x509_ca"]
    if certificates == 0:
        raise ListenError(f"--tls-client-ca {path}: no certificate in it")
    if authorities < certificates:
        raise ListenError(
            f"--tls-client-ca {path}: {certificates - authorities} of its {certificates} "
            "certificates are not CA certificates (basicConstraints CA:FALSE); give the CA "
            "that signed the clients' certificates"
        )


def _read_pem(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ListenError(f"{flag} {path}: cannot read it ({error.strerror})") from None


def resolve_group(group: str) -> int:
    """A group name or numeric gid to a gid this process may give its socket to."""
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ListenError(f"--socket-group {group!r}: no such group") from None
    # chown to a group needs membership (or root); say so now rather than after binding.
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise ListenError(
            f"--socket-group {group!r}: this process is not a member of group {gid}, so it "
            "cannot give the socket to it"
        )
    return gid


def prepare_socket_path(path: str) -> None:
    """Make ``path`` free to bind: remove a stale socket, refuse anything else that is there.

    gRPC itself silently unlinks any socket at the path before binding, which would steal a
    live server's address, so the live check must happen here, first.
    """
    if not Path(path).parent.is_dir():
        raise ListenError(f"unix socket {path}: directory {Path(path).parent} does not exist")
    try:
        removed = _transport.remove_stale_unix_socket(path)
    except FileExistsError:
        raise ListenError(
            f"unix socket {path}: the path exists and is not a socket; refusing to replace it"
        ) from None
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ListenError(
                f"unix socket {path}: another server is already listening on it"
            ) from None
        # Permission denied, a wedged server, ...: not provably stale, so it was left alone.
        raise ListenError(
            f"unix socket {path}: a socket is there and cannot be probed ({error}); "
            "refusing to replace it"
        ) from None
    if removed:
        logger.info("removed stale socket %s (nobody was listening on it)", path)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


@dataclass(frozen=True, slots=True)
class Listener:
    """A checked listen address, ready to bind; see ``prepare``."""

    address: ListenAddress
    credentials: grpc.ServerCredentials | None
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_gid: int | None = None

    def bind(self, server: PortAdder) -> int:
        """Add the port to ``server`` (not yet started); returns the TCP port (0 for unix)."""
        if self.address.unix_path is None:
            return self._add_port(server)
        # gRPC creates the socket file in bind(); nothing lets us pass it a mode. Binding under
        # an owner-only umask means the file is never more open than 0600, even for an instant,
        # then chown/chmod widen it as asked, before start() accepts anyone. A chmod after a
        # plain bind would leave a window in which a connect could be queued under the default
        # umask's mode, and the queued connection survives the chmod. Binding in a private
        # directory and renaming would be race-free too, but gRPC unlinks the path it bound
        # at shutdown and would then leave our renamed socket behind. The trade-off: umask is
        # process-wide, so a file another thread creates during these few microseconds is
        # made owner-only as well (tighter, never looser).
        with _umask(_BIND_UMASK):
            self._add_port(server)
        path = self.address.unix_path
        try:
            # Group first, then mode: the group bits never apply to the wrong group.
            if self.socket_gid is not None:
                os.chown(path, -1, self.socket_gid)
            os.chmod(path, self.socket_mode)
        except OSError as error:
            raise ListenError(
                f"unix socket {path}: cannot set the socket's group or mode ({error})"
            ) from None
        return 0

    def _add_port(self, server: PortAdder) -> int:
        listen = self.address.listen
        try:
            if self.credentials is None:
                return server.add_insecure_port(listen)
            return server.add_secure_port(listen, self.credentials)
        except RuntimeError:
            # grpcio says only "Failed to bind" (the errno goes to its own log).
            raise ListenError(
                f"--listen {listen}: cannot bind (address in use or not on this host?)"
            ) from None


def check_port_free(address: ListenAddress) -> None:
    """Refuse a TCP port someone already listens on, before anything starts.

    gRPC reports a busy port only as "Failed to bind" after logging its own line, and only
    once the server is built; a trial bind of every address the host resolves to (as gRPC
    binds them all, with SO_REUSEADDR as gRPC sets it) says which flag to change first. A
    port taken between this check and gRPC's bind still fails cleanly, in ``bind``.
    """
    if address.is_unix or address.port == 0:
        return
    host = address.host.removeprefix("[").removesuffix("]") or None
    try:
        infos = socket.getaddrinfo(
            host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as error:
        raise ListenError(
            f"--listen {address.listen}: cannot resolve {address.host!r} ({error})"
        ) from None
    for family, kind, protocol, _, sockaddr in infos:
        with socket.socket(family, kind, protocol) as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                trial.bind(sockaddr)
            except OSError as error:
                # Only what makes gRPC's bind fail too; it skips, with a warning, an address
                # family the host cannot bind (``localhost`` on a host without IPv6).
                if error.errno not in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise ListenError(
                    f"--listen {address.listen}: cannot bind {sockaddr[0]} port {address.port} "
                    f"({error.strerror})"
                ) from None


def check_metrics_policy(metrics_listen: str, *, insecure: bool) -> None:
    """The metrics endpoint is plain HTTP and shows every VM's memory: loopback unless told."""
    host = metrics_listen.rpartition(":")[0]
    if not insecure and not is_loopback_host(host):
        raise ListenError(
            f"--metrics-listen {metrics_listen}: refusing plain-HTTP metrics on a non-loopback "
            "address; scrape through loopback (or a proxy) or pass --insecure"
        )


def prepare(config: ServerConfig) -> Listener:
    """Check the listen settings and free a unix path; call before starting anything else."""
    address = parse_listen(config.listen)
    if not 0 <= config.socket_mode <= 0o777:
        raise ListenError(f"--socket-mode {config.socket_mode:o}: expected 0..0777")
    if not address.is_unix and (
        config.socket_group is not None or config.socket_mode != DEFAULT_SOCKET_MODE
    ):
        raise ListenError("--socket-mode and --socket-group apply only to a unix: --listen")
    credentials = load_server_credentials(
        config.tls_cert_path, config.tls_key_path, config.tls_client_ca_path
    )
    check_policy(address, tls=credentials is not None, insecure=config.insecure)
    gid = resolve_group(config.socket_group) if config.socket_group is not None else None
    if config.metrics_listen is not None:
        check_metrics_policy(config.metrics_listen, insecure=config.insecure)
    check_port_free(address)
    if address.unix_path is not None:
        prepare_socket_path(address.unix_path)
    return Listener(address, credentials, config.socket_mode, gid)
