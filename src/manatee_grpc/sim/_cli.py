"""``manatee-grpc sim``: run the mms simulator on an address until SIGINT or SIGTERM.

Reads an optional scenario file, serves with Simulator, and stops cleanly on the first signal.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from types import FrameType

from manatee_grpc.mms._transport import ACCEPTED_FORMS, AddressError
from manatee_grpc.sim._scenario import Scenario, ScenarioError
from manatee_grpc.sim._server import Simulator

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="manatee-grpc sim",
        description="Serve a simulated ManaTEE memory service (mms) until SIGINT or SIGTERM.",
    )
    parser.add_argument(
        "--listen", required=True, metavar="ADDR", help=f"address to serve on: {ACCEPTED_FORMS}"
    )
    parser.add_argument(
        "--scenario", metavar="FILE", help="scenario file (.toml or .json); defaults otherwise"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
    try:
        scenario = Scenario.from_file(args.scenario) if args.scenario else Scenario()
        simulator = Simulator(scenario, listen=args.listen)
    except (OSError, ScenarioError, AddressError) as exc:
        logger.error("cannot start the mms simulator: %s", exc)
        return EXIT_USAGE

    stop_requested = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        logger.info("received %s, stopping", signal.Signals(signum).name)
        stop_requested.set()

    # Signal handlers can only be installed from the main thread; restore the old ones after.
    previous_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous_handlers[signum] = signal.signal(signum, on_signal)
    try:
        try:
            simulator.start()
        except (OSError, AddressError) as exc:
            logger.error("cannot listen on %s: %s", args.listen, exc)
            return EXIT_USAGE
        logger.info("mms simulator listening on %s", simulator.address)
        stop_requested.wait()
    finally:
        # Hangs up the client (mms's connection lost) and removes a unix socket file.
        simulator.stop()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    logger.info("mms simulator stopped")
    return EXIT_OK
