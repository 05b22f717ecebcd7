"""The server: wires the mms connection, the bridge, health, reflection and gRPC together.

``ManateeServer`` owns the lifecycle; ``stop()`` is the graceful shutdown, written as steps.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from . import _transport
from ._bridge import BridgeConfig, CallContext, MemoryBridge
from ._config import ServerConfig
from ._connection import BackoffPolicy, ConnectionConfig, MmsConnection
from ._errors import MmsConnectionError
from ._launch import LaunchPolicy
from ._proto.manatee.memory.v1 import memory_service_pb2 as pb
from ._proto.manatee.memory.v1 import memory_service_pb2_grpc as pb_grpc
from ._reflection import enable_reflection
from ._servicer import MemoryServicer
from ._watch import WatchHub
from .sim import Simulator

logger = logging.getLogger(__name__)

# A watch poll that mms has not answered in this time is reported to watchers as failed.
WATCH_POLL_TIMEOUT_S = 30.0

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


class _HealthFollower:
    """Health follows the mms link: SERVING only while mms is connected."""

    def __init__(self, health_servicer: health.HealthServicer) -> None:
        self._health = health_servicer

    def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self._health.set(name, status)

    def on_connected(self, session: int) -> None:
        self.set(True)

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        self.set(False)

    def on_response(self, *args: object) -> None:
        pass


class ManateeServer:
    """A running manatee-grpc server; see the module docstring."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.simulator: Simulator | None = None
        self._sim_dir: tempfile.TemporaryDirectory[str] | None = None
        self.connection: MmsConnection | None = None
        self._grpc: grpc.Server | None = None
        self.port = 0
        self.address = ""
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> ManateeServer:
        config = self.config
        mms_address = self._mms_address()
        self.connection = MmsConnection(
            ConnectionConfig(
                address=mms_address,
                max_body_bytes=config.mms_max_body_bytes,
                connect_timeout_s=config.mms_connect_timeout_s,
                watchdog_s=config.mms_watchdog_s,
                backoff=BackoffPolicy(
                    initial_s=config.mms_backoff_initial_s, max_s=config.mms_backoff_max_s
                ),
            )
        )
        self.bridge = MemoryBridge(
            self.connection,
            BridgeConfig(
                lease_s=config.prepare_lease_s,
                coalesce_stats=config.coalesce_stats,
                balloon_control_dir=config.balloon_control_dir,
            ),
        )
        self.watch_hub = WatchHub(
            lambda vm_ids: self.bridge.get_balloon_stats(
                vm_ids, CallContext.with_timeout(WATCH_POLL_TIMEOUT_S)
            )
        )
        self.bridge.books.add_session_listener(self._session_changed)
        self.health = health.HealthServicer()
        health_follower = _HealthFollower(self.health)
        health_follower.set(False)
        self.connection.add_observer(health_follower)

        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=config.max_workers, thread_name_prefix="rpc"),
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        self.servicer = MemoryServicer(
            self.bridge,
            LaunchPolicy(config.launch_attempt_delays_s, config.launch_stop_timeout_s),
            self.watch_hub,
        )
        pb_grpc.add_MemoryServiceServicer_to_server(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        enable_reflection(self._grpc, [SERVICE_NAME, health.SERVICE_NAME])
        self.port = self._grpc.add_insecure_port(_grpc_target(config.listen))
        if self.port == 0 and not config.listen.startswith("unix:"):
            raise OSError(f"cannot listen on {config.listen}")
        self.address = _client_target(config.listen, self.port)
        self.connection.start()
        self._grpc.start()
        logger.info("manatee-grpc listening on %s, mms at %s", self.address, mms_address)
        return self

    def _session_changed(self, previous_session: int, session: int) -> None:
        if previous_session:  # the first connect is not a reset
            self.watch_hub.session_changed(previous_session, session)

    def _mms_address(self) -> _transport.MmsAddress:
        if self.config.mms is not None:
            return _transport.parse_address(self.config.mms)
        from .sim import Scenario

        scenario = (
            Scenario.from_file(self.config.sim_scenario) if self.config.sim_scenario else None
        )
        self._sim_dir = tempfile.TemporaryDirectory(prefix="manatee-sim-")
        listen = _transport.parse_address(f"unix://{Path(self._sim_dir.name) / 'mms.sock'}")
        self.simulator = Simulator(scenario=scenario, listen=listen)
        self.simulator.start()
        logger.warning(
            "no --mms given: running against the embedded mms SIMULATOR at %s; no real VM "
            "memory is managed",
            self.simulator.address,
        )
        return self.simulator.address

    # --- stop ----------------------------------------------------------------------------------

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace_s = self.config.grace_s if grace_s is None else grace_s
            # 1. Tell load balancers and watchers first: we are going away.
            self.health.enter_graceful_shutdown()
            # 2. Refuse new work, let in-flight RPCs finish within the grace period; launches
            #    that are cut off release their reservations as their streams end.
            self.servicer.begin_shutdown()
            self.watch_hub.close()
            assert self._grpc is not None
            self._grpc.stop(grace_s).wait()
            logger.info("gRPC stopped; releasing what is left")
            # 3. Release a pending start nobody will finish, while mms still listens.
            self._release_pending_start()
            # 4. Close the mms link last (mms then drops every sibling VM: it is going away
            #    with us), then the embedded simulator.
            assert self.connection is not None
            self.connection.stop()
            if self.simulator is not None:
                self.simulator.stop()
            if self._sim_dir is not None:
                self._sim_dir.cleanup()
            self._stopped.set()
            logger.info("manatee-grpc stopped")

    def _release_pending_start(self) -> None:
        claim = self.bridge.slot.claim
        if claim is None or claim.vm_id is None or self.connection is None:
            return
        done = threading.Event()
        self.bridge.remove_in_background(claim.vm_id, "the server is shutting down", then=done.set)
        if not done.wait(5.0):
            logger.warning("mms did not confirm removing pending VM %d", claim.vm_id)

    def wait(self) -> None:
        self._stopped.wait()

    def __enter__(self) -> ManateeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(grace_s=1.0)


def create_server(config: ServerConfig) -> tuple[ManateeServer, int]:
    """Start a server; returns it and the TCP port it bound (0 for a unix socket)."""
    server = ManateeServer(config).start()
    return server, server.port


def _grpc_target(listen: str) -> str:
    return listen


def _client_target(listen: str, port: int) -> str:
    if listen.startswith("unix:"):
        return listen
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"
