"""The ``manatee-grpc`` command: ``serve`` runs the service, ``sim`` runs the mms simulator;
the client subcommands (``vms``, ``stats``, ``launch``, ...) live in ``_cli_client``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn, cast

from manatee_grpc.cli._cli_client import add_client_commands, is_client_command, run_client_command
from manatee_grpc.mms._connection import DEFAULT_WATCHDOG_S
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.server._config import DEFAULT_LISTEN, LOG_LEVELS, ConfigError, ServerConfig

logger = logging.getLogger("manatee_grpc")

PROG = "manatee-grpc"

# SIGTERM stops the server gracefully, SIGINT too; a SIGINT during the grace period exits at once.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# SIGUSR1 is the operator's reset of the mms stream (mms drops every sibling VM with it).
_RESET_SIGNAL = signal.SIGUSR1


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDRESS",
        help="gRPC address: HOST:PORT or unix:///abs/path (default %(default)s)",
    )
    parser.add_argument(
        "--socket-mode",
        type=_socket_mode_arg,
        default=defaults.socket_mode,
        metavar="OCTAL",
        help=f"mode of a unix --listen socket, e.g. 0660 (default {defaults.socket_mode:04o})",
    )
    parser.add_argument(
        "--socket-group",
        default=None,
        metavar="GROUP",
        help="group (name or gid) of a unix --listen socket; widen --socket-mode to let it in "
        "(default: the server's own group)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow plaintext gRPC (and plain-HTTP metrics) on a non-loopback TCP address "
        "(default off: refused)",
    )
    parser.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="server TLS certificate (default: none, plaintext)",
    )
    parser.add_argument(
        "--tls-key", default=None, metavar="PEM", help="its private key (default: none)"
    )
    parser.add_argument(
        "--tls-client-ca",
        default=None,
        metavar="PEM",
        help="require client certificates signed by this CA (mutual TLS); every certificate "
        "in the file must be a CA certificate (default: none, no client certificates)",
    )
    parser.add_argument(
        "--mms",
        default=None,
        metavar="ADDRESS",
        help="mms address: vsock://CID:PORT, unix:///path, unix-abstract:NAME, tcp://HOST:PORT "
        "or fd://N (a connected stream socket handed over by a launcher); default: an embedded "
        "simulator is started",
    )
    parser.add_argument(
        "--sim-scenario",
        default=None,
        metavar="FILE",
        help="scenario file (TOML/JSON) for the embedded simulator (default: mms's defaults)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=_metrics_listen_arg,
        default=None,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0 picks one; default off)",
    )
    parser.add_argument(
        "--max-workers",
        type=int,
        default=None,
        metavar="N",
        help="DEPRECATED, no effect: handlers are coroutines on one event loop, there is no "
        "thread pool to size; still accepted (N >= 1, a warning is logged) so that existing "
        "units keep starting (default: unset)",
    )
    parser.add_argument(
        "--max-concurrent-rpcs",
        type=int,
        default=defaults.max_concurrent_rpcs,
        metavar="N",
        help="RPCs in progress beyond N are refused with RESOURCE_EXHAUSTED; 0 for no cap "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--max-receive-message-bytes",
        type=int,
        default=defaults.max_receive_message_bytes,
        metavar="BYTES",
        help="largest request message accepted, 1..2147483647 (default %(default)s)",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=defaults.grace_s,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long in-flight RPCs may run before they are cancelled; "
        "0 or more (default %(default)s)",
    )
    parser.add_argument(
        "--prepare-lease",
        type=float,
        default=defaults.prepare_lease_s,
        metavar="SECONDS",
        help="the start lease: seconds a bare PrepareVm start may wait for FinishAddVm or "
        "RemoveVm, and a LaunchVm for `vm_started` after `reserved` (default %(default)s)",
    )
    parser.add_argument(
        "--launch-attempt-delays",
        default=",".join(f"{d:g}" for d in defaults.launch_attempt_delays_s),
        metavar="SECONDS,...",
        help="seconds to wait before each LaunchVm reservation attempt, one per attempt, each "
        "0 or more (default %(default)s)",
    )
    parser.add_argument(
        "--no-coalesce-stats",
        action="store_true",
        help="send one mms GetBalloonStats per RPC instead of sharing concurrent reads "
        "(default off: shared)",
    )
    parser.add_argument(
        "--balloon-control-dir",
        default=defaults.balloon_control_dir,
        metavar="DIR",
        help="directory of the balloon control sockets a launch is told to give crosvm "
        "(DIR/mms_control_VMID.sock) (default %(default)s)",
    )
    parser.add_argument(
        "--mms-connect-timeout",
        type=float,
        default=defaults.mms_connect_timeout_s,
        metavar="SECONDS",
        help="how long one connect to mms may take (default %(default)s)",
    )
    parser.add_argument(
        "--mms-max-frame-bytes",
        type=int,
        default=defaults.mms_max_body_bytes,
        metavar="BYTES",
        help="largest mms response body accepted, 1..4294967295 (default %(default)s)",
    )
    parser.add_argument(
        "--mms-watchdog",
        action="append",
        default=[],
        metavar="TYPE=SECONDS",
        help="how long mms may take to answer one message type before health goes NOT_SERVING "
        "(and the stream is reset if that loses no VM, or with --mms-hang-reset); "
        "repeatable; TYPE is one of "
        + ", ".join(t.name for t in MessageType)
        + "; defaults: "
        + ", ".join(f"{t.name}={s:g}" for t, s in DEFAULT_WATCHDOG_S.items()),
    )
    parser.add_argument(
        "--mms-backoff-initial",
        type=float,
        default=defaults.mms_backoff_initial_s,
        metavar="SECONDS",
        help="wait before the first redial of a lost mms connection; it doubles per failure "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--mms-backoff-max",
        type=float,
        default=defaults.mms_backoff_max_s,
        metavar="SECONDS",
        help="longest wait between redials, at least --mms-backoff-initial (default %(default)s)",
    )
    parser.add_argument(
        "--mms-hang-reset",
        action="store_true",
        help="reset the mms stream when mms stays silent past its watchdog even if VMs are at "
        "stake (mms then drops them all); default off: only health goes NOT_SERVING",
    )
    parser.add_argument(
        "--launch-stop-timeout",
        type=float,
        default=defaults.launch_stop_timeout_s,
        metavar="SECONDS",
        help="seconds a LaunchVm client may take to stop its VM when asked (default %(default)s)",
    )
    parser.add_argument(
        "--policy",
        choices=("balance-available",),
        default=None,
        help="balance memory between the VMs automatically (default off; see README, Policy)",
    )
    parser.add_argument(
        "--policy-config",
        default=None,
        metavar="TOML",
        help="the policy's settings file (period, margins, floors, ceilings, step cap, ...; "
        "default: none, every setting at its default)",
    )
    parser.add_argument(
        "--audit-file",
        default=None,
        metavar="PATH",
        help="append every event (WatchEvents) to PATH, one JSON object per line; never "
        "truncated, and a restart continues its sequence numbers (default off)",
    )
    parser.add_argument(
        "--event-ring",
        type=_positive_int_arg,
        default=defaults.event_ring_size,
        metavar="N",
        help="how many recent events the server keeps for WatchEvents replay (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="least severe log messages shown (default %(default)s)",
    )


def _positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def _socket_mode_arg(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an octal mode 0000..0777")
    return mode


def _metrics_listen_arg(text: str) -> str:
    from manatee_grpc.server._metrics import (  # prometheus only when asked
        MetricsAddressError,
        parse_listen,
    )

    try:
        parse_listen(text)
    except MetricsAddressError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _watchdog_from(items: Sequence[str]) -> dict[MessageType, float]:
    watchdog_s = dict(DEFAULT_WATCHDOG_S)
    for item in items:
        name, _, seconds = item.partition("=")
        try:
            msg_type = MessageType[name.strip().upper()]
            watchdog_s[msg_type] = float(seconds)
        except (KeyError, ValueError):
            raise _UsageError(f"--mms-watchdog {item!r}: expected TYPE=SECONDS") from None
        if watchdog_s[msg_type] <= 0:
            raise _UsageError(f"--mms-watchdog {item!r}: SECONDS must be positive")
    return watchdog_s


class _UsageError(Exception):
    """A flag value argparse could not check by itself."""


def _config_from(args: argparse.Namespace) -> ServerConfig:
    try:
        delays = tuple(
            float(part) for part in args.launch_attempt_delays.split(",") if part.strip()
        )
    except ValueError:
        raise _UsageError(
            f"--launch-attempt-delays {args.launch_attempt_delays!r}: expected seconds, "
            "comma-separated"
        ) from None
    if args.policy_config is not None and args.policy is None:
        raise _UsageError("--policy-config needs --policy balance-available")
    defaults = ServerConfig()
    return ServerConfig(
        listen=args.listen,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        insecure=args.insecure,
        tls_cert_path=args.tls_cert,
        tls_key_path=args.tls_key,
        tls_client_ca_path=args.tls_client_ca,
        mms=args.mms,
        sim_scenario=args.sim_scenario,
        metrics_listen=args.metrics_listen,
        max_workers=defaults.max_workers if args.max_workers is None else args.max_workers,
        # 0 is "no cap"; a negative value stays, for the range check to name.
        max_concurrent_rpcs=None if args.max_concurrent_rpcs == 0 else args.max_concurrent_rpcs,
        max_receive_message_bytes=args.max_receive_message_bytes,
        grace_s=args.grace,
        prepare_lease_s=args.prepare_lease,
        launch_attempt_delays_s=delays,
        coalesce_stats=not args.no_coalesce_stats,
        balloon_control_dir=args.balloon_control_dir,
        mms_connect_timeout_s=args.mms_connect_timeout,
        mms_max_body_bytes=args.mms_max_frame_bytes,
        mms_watchdog_s=_watchdog_from(args.mms_watchdog),
        mms_backoff_initial_s=args.mms_backoff_initial,
        mms_backoff_max_s=args.mms_backoff_max,
        mms_hang_reset=args.mms_hang_reset,
        launch_stop_timeout_s=args.launch_stop_timeout,
        policy=args.policy,
        policy_config_path=args.policy_config,
        event_ring_size=args.event_ring,
        audit_file=args.audit_file,
    )


def serve(args: argparse.Namespace) -> int:
    from manatee_grpc.core._policy import PolicyConfigError
    from manatee_grpc.mms._transport import AddressError
    from manatee_grpc.server._listen import ListenError
    from manatee_grpc.server._server import ManateeServer
    from manatee_grpc.sim import ScenarioError

    stop_requested = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        del frame
        name = signal.Signals(signum).name
        if stop_requested.is_set():
            if signum == signal.SIGINT:
                # Ctrl-C during the grace period (after SIGTERM or SIGINT): the operator will
                # not wait. mms drops whatever we still hold when the link closes with us.
                logger.warning("second interrupt: exiting now")
                os._exit(130)
            logger.info("received %s again: already shutting down", name)
            return
        logger.info("received %s: shutting down", name)
        stop_requested.set()

    server: ManateeServer | None = None

    def on_reset_signal(signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if server is None or stop_requested.is_set():
            logger.warning("received SIGUSR1 while not serving: no mms stream to reset")
            return
        # Non-blocking: it shuts the stream down; the connection thread closes and redials.
        if not server.reset_mms("SIGUSR1"):
            logger.warning("received SIGUSR1: no mms stream to reset (not connected)")

    previous = {sig: signal.signal(sig, on_signal) for sig in _STOP_SIGNALS}
    previous[_RESET_SIGNAL] = signal.signal(_RESET_SIGNAL, on_reset_signal)
    # Python runs signal handlers on the main thread, but the kernel hands a process signal to
    # any thread that does not block it, and a main thread asleep on a lock never hears of it
    # (under load, SIGTERM went unheard). So the server's threads, which inherit the signal mask
    # of the thread that starts them, start with the stop signals blocked: only the main thread
    # takes them. One that comes during start-up is handled once the server has started.
    mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, (*_STOP_SIGNALS, _RESET_SIGNAL))
    try:
        try:
            starting = ManateeServer(_config_from(args))
            starting.start()
            server = starting
            if args.max_workers is not None:
                logger.warning(
                    "--max-workers is deprecated and has no effect: handlers are coroutines on "
                    "one event loop (no thread pool); drop it from the command line"
                )
        except PolicyConfigError as error:
            # The file's own error starts with its path: name the flag that gave it.
            print(f"manatee-grpc: error: --policy-config {error}", file=sys.stderr)
            return 2
        except (
            _UsageError,
            ConfigError,
            AddressError,
            ScenarioError,
            ListenError,
            OSError,
        ) as error:
            # A bad flag or an address we cannot use: say which, no traceback.
            print(f"manatee-grpc: error: {error}", file=sys.stderr)
            return 2
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask_before)
        stop_requested.wait()
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but ``serve``'s refusals are one line: ``manatee-grpc: error: ...``.

    A refused start-up is read in a journal or by a supervisor, where argparse's usage lines
    would bury the one that names the flag (``--help`` shows the usage).
    """

    def __init__(self, *args: Any, one_line_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.one_line_errors = one_line_errors

    def error(self, message: str) -> NoReturn:
        if not self.one_line_errors:
            super().error(message)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="gRPC service for ManaTEE VM memory (mms)")
    # Every subcommand's parser is a _Parser; only serve's errors are one line.
    commands = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", required=True, parser_class=_Parser),
    )
    serve_parser = commands.add_parser(
        "serve",
        help="run the gRPC service",
        description="Run the gRPC service. Every refused setting exits 2 with one "
        f"`{PROG}: error: ...` line naming its flag, before anything starts.",
        one_line_errors=True,
    )
    _add_serve_arguments(serve_parser)
    commands.add_parser("sim", help="run the mms simulator", add_help=False)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from manatee_grpc.sim import main as sim_main

        return sim_main(argv[1:])
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # The top-level parser reports these; say it the way serve's own refusals are said.
        parser.one_line_errors = args.command == "serve"
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if is_client_command(args):
        return run_client_command(args, parser)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
