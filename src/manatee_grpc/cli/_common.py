"""What the client subcommands and ``top`` share: byte units and their display, the usage
error, and the TLS credentials the ``--tls-*`` flags ask for."""

from __future__ import annotations

import argparse
from pathlib import Path

import grpc

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
TIB = 1024 * GIB


class UsageError(Exception):
    """A command line that cannot be acted on; the command prints it and exits 2."""


def format_bytes(value: int, *, signed: bool = False) -> str:
    """``536870912`` -> ``"512.0 MiB"``; ``signed`` puts ``+`` before positive values."""
    sign = "-" if value < 0 else ("+" if signed and value > 0 else "")
    magnitude = abs(value)
    if magnitude >= GIB:
        return f"{sign}{magnitude / GIB:.2f} GiB"
    if magnitude >= MIB:
        return f"{sign}{magnitude / MIB:.1f} MiB"
    if magnitude >= KIB:
        return f"{sign}{magnitude / KIB:.1f} KiB"
    return f"{sign}{magnitude} B"


def credentials_from(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    """TLS if any --tls-* flag is given (without --tls-ca the system's roots are trusted)."""
    if args.tls_ca is None and args.tls_cert is None and args.tls_key is None:
        return None
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")

    def read(flag: str, path: str | None) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as error:
            raise UsageError(f"{flag} {path}: cannot read it ({error.strerror})") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read("--tls-ca", args.tls_ca),
        private_key=read("--tls-key", args.tls_key),
        certificate_chain=read("--tls-cert", args.tls_cert),
    )
