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

from ._cli_client import add_client_commands, is_client_command, run_client_command
from ._config import DEFAULT_LISTEN, ServerConfig

logger = logging.getLogger("manatee_grpc")


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServerConfig()
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        help="gRPC address: HOST:PORT or unix:///abs/path (default %(default)s)",
    )
    parser.add_argument(
        "--mms",
        default=None,
        help="mms address: vsock://CID:PORT, unix:///path, tcp://HOST:PORT or fd://N; "
        "without it an embedded simulator is started",
    )
    parser.add_argument(
        "--sim-scenario", default=None, help="scenario file (TOML/JSON) for the embedded simulator"
    )
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers)
    parser.add_argument("--max-concurrent-rpcs", type=int, default=defaults.max_concurrent_rpcs)
    parser.add_argument(
        "--max-receive-message-bytes", type=int, default=defaults.max_receive_message_bytes
    )
    parser.add_argument(
        "--grace", type=float, default=defaults.grace_s, help="shutdown grace period, seconds"
    )
    parser.add_argument(
        "--prepare-lease",
        type=float,
        default=defaults.prepare_lease_s,
        help="seconds a bare PrepareVm start may wait for FinishAddVm or RemoveVm "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--launch-attempt-delays",
        default=",".join(f"{d:g}" for d in defaults.launch_attempt_delays_s),
        help="seconds to wait before each LaunchVm reservation attempt (default %(default)s)",
    )
    parser.add_argument(
        "--no-coalesce-stats",
        action="store_true",
        help="send one mms GetBalloonStats per RPC instead of sharing concurrent reads",
    )
    parser.add_argument("--balloon-control-dir", default=defaults.balloon_control_dir)
    parser.add_argument("--mms-connect-timeout", type=float, default=defaults.mms_connect_timeout_s)
    parser.add_argument(
        "--mms-max-frame-bytes",
        type=int,
        default=defaults.mms_max_body_bytes,
        help="largest mms response body accepted (default %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO")


def _config_from(args: argparse.Namespace) -> ServerConfig:
    delays = tuple(float(part) for part in args.launch_attempt_delays.split(",") if part.strip())
    return ServerConfig(
        listen=args.listen,
        mms=args.mms,
        sim_scenario=args.sim_scenario,
        max_workers=args.max_workers,
        max_concurrent_rpcs=args.max_concurrent_rpcs or None,
        max_receive_message_bytes=args.max_receive_message_bytes,
        grace_s=args.grace,
        prepare_lease_s=args.prepare_lease,
        launch_attempt_delays_s=delays,
        coalesce_stats=not args.no_coalesce_stats,
        balloon_control_dir=args.balloon_control_dir,
        mms_connect_timeout_s=args.mms_connect_timeout,
        mms_max_body_bytes=args.mms_max_frame_bytes,
    )


def serve(args: argparse.Namespace) -> int:
    from ._server import ManateeServer

    server = ManateeServer(_config_from(args))
    server.start()
    stop_requested = threading.Event()
    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        del frame
        if signum == signal.SIGINT:
            interrupts += 1
            if interrupts > 1:
                logger.warning("second interrupt: exiting now")
                os._exit(130)
        logger.info("received %s: shutting down", signal.Signals(signum).name)
        stop_requested.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_requested.wait()
        server.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manatee-grpc", description="gRPC service for ManaTEE VM memory (mms)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the gRPC service")
    _add_serve_arguments(serve_parser)
    commands.add_parser("sim", help="run the mms simulator", add_help=False)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:
        from .sim import main as sim_main

        return sim_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if is_client_command(args):
        return run_client_command(args, parser)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
