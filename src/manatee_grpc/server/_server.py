"""The server: wires the mms connection, the bridge, health, reflection and gRPC together.

``ManateeServer`` owns the lifecycle; ``stop()`` is the graceful shutdown, written as steps.

gRPC runs as a ``grpc.aio`` server on its own event-loop thread, and every handler (ours,
health, reflection) is a coroutine on that loop: a call costs no thread hand-off of its own, a
thousand watchers cost no thousand threads, coalesced stats callers all wake in one loop pass,
and a caller that hangs up cancels its coroutine, which is how the bridge learns it left. A
launch is a coroutine too (waiting for the start slot or for its client costs no thread), start
leases are loop timers, and watch tickers and the balancing policy (``--policy``) are loop
tasks. The process runs two threads of its own: the loop and the mms connection thread (plus
the metrics HTTP server's when served).
Everything reaches mms only through the connection thread's request queue (``submit``); its
answers come back to the loop through ``_aio`` (``loop.call_soon_threadsafe``).

HTTP/2 keepalive: the server pings every connection that has been quiet for
``keepalive_time_s`` and drops it if the ping is not answered within ``keepalive_timeout_s``,
so a client whose host vanished (no FIN, no RST) is noticed in about half a minute and its
launch or lease-less wait released; client pings no more often than every 10 s are allowed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc.core import _aio
from manatee_grpc.core._bridge import BridgeConfig, MemoryBridge
from manatee_grpc.core._events import SERVER, AuditFile, EventKind, EventLog
from manatee_grpc.core._launch import LaunchPolicy
from manatee_grpc.core._policy import POLICY_NAMES, PolicyDecision, PolicyRunner, PolicySettings
from manatee_grpc.core._starts import loop_timer
from manatee_grpc.core._watch import WatchHub
from manatee_grpc.mms import _transport
from manatee_grpc.mms._connection import BackoffPolicy, ConnectionConfig, MmsConnection, Stakes
from manatee_grpc.mms._messages import CROS_GUEST_VM_ID
from manatee_grpc.server import _config, _listen
from manatee_grpc.server._config import ServerConfig
from manatee_grpc.server._metrics import Metrics, attach_audit, attach_metrics
from manatee_grpc.server._reflection import enable_reflection
from manatee_grpc.server._servicer import MemoryServicer
from manatee_grpc.server._servicer import add_to_server as add_memory_service
from manatee_grpc.sim import Scenario, ScenarioError, Simulator

logger = logging.getLogger(__name__)

T = TypeVar("T")

# A watch poll that mms has not answered in this time is reported to watchers as failed.
WATCH_POLL_TIMEOUT_S = 30.0

SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


class _HealthFollower:
    """Health follows the mms link: SERVING only while the stream is usable (connected, not
    hung past its watchdog, not out of step).

    The health servicer is the aio one (its Watch streams are coroutines, so a watcher that
    hangs up holds no thread); the connection thread hands each change to the event loop,
    whose FIFO keeps the changes in order.
    """

    def __init__(
        self, health_servicer: health.aio.HealthServicer, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._health = health_servicer
        self._loop = loop

    def set(self, serving: bool) -> None:
        # The coroutine is made on the loop, so a closed loop leaves none un-awaited.
        _aio.call_soon_from_thread(self._loop, self._set_on_loop, serving)

    def _set_on_loop(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            self._loop.create_task(self._health.set(name, status))


class ManateeServer:
    """A running manatee-grpc server; see the module docstring."""

    def __init__(
        self, config: ServerConfig, extra_handlers: Sequence[grpc.GenericRpcHandler] = ()
    ) -> None:
        self.config = config
        # More services on the same server (the benchmark's no-op floor, an embedder's own).
        self._extra_handlers = tuple(extra_handlers)
        self.simulator: Simulator | None = None
        self.connection: MmsConnection | None = None
        self._grpc: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self.port = 0
        self.address = ""
        self.metrics = Metrics()
        self.metrics_address: str | None = None  # HOST:PORT of /metrics, if served
        self.policy: PolicyRunner | None = None  # the balancing policy, when --policy is on
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.events: EventLog | None = None
        self._mms_usable = False  # as the last MMS_AVAILABLE/UNAVAILABLE event said

    # --- start ---------------------------------------------------------------------------------

    def start(self) -> ManateeServer:
        """Check every setting, then bind, then start; a refusal leaves nothing running.

        Everything that can be checked without holding a resource is checked first (ranges,
        the mms address and an fd://N, the scenario, who may connect, a busy gRPC port), so a
        refusal has started nothing. Then the ports are bound (metrics, gRPC), and only then
        does anything run (the simulator, the mms connection, serving): a bind that still fails
        undoes the little that was done.
        """
        config = self.config
        _config.check(config)
        mms_address, scenario = self._check_mms()
        policy_settings = _policy_settings(config)  # a bad file fails before anything runs
        # Who may connect is checked (and, last, a stale unix socket removed).
        listener = _listen.prepare(config)
        try:
            return self._start(listener, mms_address, scenario, policy_settings)
        except BaseException:
            # A failed start (busy port, cannot bind) leaves nothing running.
            self._undo_start()
            raise

    def _check_mms(self) -> tuple[_transport.MmsAddress, Scenario | None]:
        """The mms address to dial (the embedded simulator's if none) and its scenario."""
        config = self.config
        if config.mms is not None:
            try:
                address = _transport.parse_address(config.mms)
                if address.scheme == "fd":
                    # A handed-over fd cannot be redialled: one that is not a connected stream
                    # socket would have the connection retry for ever.
                    _transport.check_handed_over_fd(address)
            except _transport.AddressError as error:
                raise _config.ConfigError(f"--mms: {error}") from None
            return address, None
        scenario = None
        if config.sim_scenario is not None:
            try:
                scenario = Scenario.from_file(config.sim_scenario)
            except OSError as error:
                raise _config.ConfigError(
                    f"--sim-scenario {config.sim_scenario}: cannot read it ({error.strerror})"
                ) from None
            except ScenarioError as error:
                raise _config.ConfigError(f"--sim-scenario: {error}") from None
        # An abstract socket (Linux): no file or directory, so a killed server leaves nothing.
        name = f"manatee-sim-{os.getpid()}-{secrets.token_hex(8)}"
        return _transport.parse_address(_transport.ABSTRACT_PREFIX + name), scenario

    def _start(
        self,
        listener: _listen.Listener,
        mms_address: _transport.MmsAddress,
        scenario: Scenario | None,
        policy_settings: PolicySettings | None,
    ) -> ManateeServer:
        config = self.config
        if config.metrics_listen is not None:
            try:
                self.metrics_address = self.metrics.serve(config.metrics_listen)
            except OSError as error:
                raise _listen.ListenError(
                    f"--metrics-listen {config.metrics_listen}: cannot bind "
                    f"({error.strerror or error})"
                ) from None
        # An audit file we cannot open fails the start (nothing runs yet; _undo_start closes
        # what was opened).
        try:
            audit = AuditFile(config.audit_file) if config.audit_file is not None else None
        except OSError as error:
            raise _config.ConfigError(
                f"--audit-file {config.audit_file}: cannot open it for appending "
                f"({error.strerror or error})"
            ) from None
        self.events = EventLog(config.event_ring_size, audit)
        if audit is not None and self.metrics_address is not None:
            attach_audit(self.metrics, audit)
        self.connection = MmsConnection(
            ConnectionConfig(
                address=mms_address,
                max_body_bytes=config.mms_max_body_bytes,
                connect_timeout_s=config.mms_connect_timeout_s,
                watchdog_s=config.mms_watchdog_s,
                backoff=BackoffPolicy(
                    initial_s=config.mms_backoff_initial_s, max_s=config.mms_backoff_max_s
                ),
                hang_reset=config.mms_hang_reset,
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
        # Metrics cost every RPC and every mms answer a few microseconds: only when served.
        metrics = self.metrics if self.metrics_address is not None else None
        if metrics is not None:
            attach_metrics(metrics, self.connection, self.bridge)
        loop = self._loop = asyncio.new_event_loop()
        self.bridge.slot.use_call_later(loop_timer(loop))
        self.bridge.slot.on_lease_expired = self._lease_expired
        self.watch_hub = WatchHub(
            lambda vm_ids: self.bridge.get_balloon_stats_async(vm_ids, WATCH_POLL_TIMEOUT_S)
        )
        self.bridge.books.add_session_listener(self._session_changed)
        self.health = health.aio.HealthServicer()
        health_follower = _HealthFollower(self.health, loop)
        health_follower.set(False)
        self.connection.add_usable_listener(health_follower.set)
        self.connection.add_usable_listener(self._usable_changed)
        self.connection.set_stakes(self._stakes)
        self.servicer = MemoryServicer(
            self.bridge,
            LaunchPolicy(config.launch_attempt_delays_s, config.launch_stop_timeout_s),
            self.watch_hub,
            observe_rpc=None if metrics is None else metrics.observe_rpc,
            events=self.events,
        )
        self._loop_thread = threading.Thread(target=loop.run_forever, name="grpc-aio", daemon=True)
        self._loop_thread.start()
        assert self._loop_thread.ident is not None
        self.events.attach(loop, self._loop_thread.ident)
        self.events.publish(
            EventKind.SERVER_STARTED,
            SERVER,
            details={
                "audit_file": config.audit_file or "",
                "ring_capacity": config.event_ring_size,
            },
        )
        self.port = self._on_loop(self._start_grpc(listener))
        self.address = _client_target(config.listen, self.port)
        # Both ports are bound: from here on, things run.
        if config.mms is None:
            self.simulator = Simulator(scenario=scenario, listen=mms_address).start()
            logger.warning(
                "no --mms given: running against the embedded mms SIMULATOR at %s; no real VM "
                "memory is managed",
                self.simulator.address,
            )
        self.connection.start()
        self._on_loop(self._grpc_start())
        if policy_settings is not None:
            self.policy = PolicyRunner(self.bridge, policy_settings, self._policy_decided)
            self._on_loop(_call(self.policy.start))
            logger.info("memory policy %s on, every %g s", config.policy, policy_settings.period_s)
        logger.info("manatee-grpc listening on %s, mms at %s", self.address, mms_address)
        return self

    def _undo_start(self) -> None:
        self.metrics.close()
        self._stop_loop()
        if self.events is not None:
            self.events.close()
        if self.connection is not None:
            self.connection.stop()
        if self.simulator is not None:
            self.simulator.stop()

    async def _start_grpc(self, listener: _listen.Listener) -> int:
        # aio objects belong to the loop that made them: create the server on its own thread.
        config = self.config
        self._grpc = grpc.aio.server(
            maximum_concurrent_rpcs=config.max_concurrent_rpcs,
            options=[
                ("grpc.max_receive_message_length", config.max_receive_message_bytes),
                ("grpc.so_reuseport", 0),
                *_keepalive_options(config),
            ],
        )
        add_memory_service(self.servicer, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        enable_reflection(self._grpc, [SERVICE_NAME, health.SERVICE_NAME])
        self._grpc.add_generic_rpc_handlers(self._extra_handlers)
        return listener.bind(self._grpc)

    async def _grpc_start(self) -> None:
        assert self._grpc is not None
        await self._grpc.start()

    async def _grpc_stop(self, grace_s: float) -> None:
        assert self._grpc is not None
        await self._grpc.stop(grace_s)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            self._on_loop(_finish_tasks())
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def _stakes(self) -> Stakes:
        """What mms would drop if the stream closed now: its sibling VMs and the pending start."""
        vm_ids = tuple(vm.vm_id for vm in self.bridge.books.vms() if vm.vm_id != CROS_GUEST_VM_ID)
        return Stakes(vm_ids=vm_ids, pending_start=self.bridge.slot.claim is not None)

    def reset_mms(self, reason: str) -> bool:
        """The operator's reset of the mms stream: mms drops every sibling VM; then redial.

        Returns False when there is no stream to reset (not connected, or stopping).
        """
        assert self.connection is not None
        return self.connection.reset(reason)

    def _policy_decided(self, decision: PolicyDecision) -> None:
        # On the loop. The record (inputs, deltas, outcome) is kept by the runner (recent()),
        # and is one POLICY_DECISION event: the rebalance it sent (if any) is part of it, since
        # the policy calls the bridge, not the servicer that records RebalanceMemory events.
        logger.info("%s", decision.summary())
        if self.events is not None:
            self.events.publish_policy_decision(
                {
                    "policy_sequence": decision.sequence,
                    "vms": [dataclasses.asdict(vm) for vm in decision.vms],
                    "left_out": {str(vm): why for vm, why in decision.left_out.items()},
                },
                {
                    "acted": decision.acted,
                    "reason": decision.reason,
                    "planned_deltas": {str(vm): d for vm, d in decision.planned.items()},
                    "actual_deltas": {str(vm): d for vm, d in decision.actual.items()},
                    "fully_applied": decision.fully_applied,
                    "moved_bytes": decision.moved_bytes,
                    "error": decision.error,
                },
                session=decision.session,
                vm_ids=sorted({vm.vm_id for vm in decision.vms} | set(decision.planned)),
                # What top shows of the policy: its counts, margins in effect and back-offs.
                state=None if self.policy is None else _policy_state(self.policy),
            )

    def run_policy_tick(self, timeout_s: float = 30.0) -> PolicyDecision:
        """Run one policy period now, from any thread but the loop's; returns its decision."""
        if self.policy is None or self._loop is None:
            raise RuntimeError("the server runs no policy (serve --policy)")
        return asyncio.run_coroutine_threadsafe(self.policy.tick(), self._loop).result(timeout_s)

    def _session_changed(self, previous_session: int, session: int) -> None:
        # On the connection thread; the watch hub lives on the loop. The loop's FIFO keeps the
        # reset ahead of the new session's first answers, which come back the same way.
        if previous_session and self._loop is not None:  # the first connect is not a reset
            _aio.call_soon_from_thread(
                self._loop, self.watch_hub.session_changed, previous_session, session
            )
            if self.events is not None:
                public = self.bridge.books.public_session_id
                self.events.publish_from_thread(
                    EventKind.SESSION_RESET,
                    SERVER,
                    session=public(session),
                    details={"previous_session": public(previous_session)},
                )

    def _usable_changed(self, usable: bool) -> None:
        # On the connection thread, which calls its listeners in order: one event per change.
        if usable == self._mms_usable or self.events is None:
            return
        self._mms_usable = usable
        kind = EventKind.MMS_AVAILABLE if usable else EventKind.MMS_UNAVAILABLE
        self.events.publish_from_thread(kind, SERVER, session=self.bridge.books.session_id)

    def _lease_expired(self, vm_id: int | None, session: int) -> None:
        # Under the slot's lock, on the loop (lease timers are loop timers): cheap, no waiting.
        if self.events is not None:
            self.events.publish(
                EventKind.START_LEASE_EXPIRED,
                SERVER,
                session=self.bridge.books.public_session_id(session) if session else "",
                vm_ids=() if vm_id is None else (vm_id,),
                details={"lease_s": self.config.prepare_lease_s},
            )

    # --- stop ----------------------------------------------------------------------------------

    def stop(self, grace_s: float | None = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace_s = self.config.grace_s if grace_s is None else grace_s
            # 1. Tell load balancers and watchers first: we are going away.
            self._on_loop(self.health.enter_graceful_shutdown())
            # 2. Refuse new work, let in-flight RPCs finish within the grace period; launches
            #    that are cut off release their reservations as their streams end.
            self.servicer.begin_shutdown()
            if self.policy is not None:  # no rebalance while we go away
                self._on_loop(_call(self.policy.stop))
            self._on_loop(_call(self.watch_hub.close))
            assert self.events is not None
            # Event watchers end now; what in-flight calls do meanwhile is still recorded.
            self._on_loop(_call(self.events.end_subscriptions))
            self._on_loop(self._grpc_stop(grace_s))
            self._stop_loop()
            self.events.close()
            logger.info("gRPC stopped; releasing what is left")
            # 3. Release a pending start nobody will finish, while mms still listens.
            self._release_pending_start()
            # 4. Close the mms link last (mms then drops every sibling VM: it is going away
            #    with us), then the embedded simulator.
            assert self.connection is not None
            self.connection.stop()
            if self.simulator is not None:
                self.simulator.stop()
            self.metrics.close()
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


async def _call(function: Callable[[], None]) -> None:
    function()


async def _finish_tasks() -> None:
    """Let what is left on the loop end (cancelled) before it closes, so nothing leaks."""
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


def _policy_state(policy: PolicyRunner) -> dict[str, Any]:
    # The state without its "last" (that is this event) and its settings' name and period.
    state = policy.state()
    for key in ("last", "policy", "period_s"):
        state.pop(key, None)
    return state


def _policy_settings(config: ServerConfig) -> PolicySettings | None:
    """The policy's settings, or None when no policy runs; PolicyConfigError if unreadable."""
    if config.policy is None:
        return None
    if config.policy not in POLICY_NAMES:
        raise ValueError(f"unknown policy {config.policy!r}; known: {', '.join(POLICY_NAMES)}")
    if config.policy_config_path is None:
        return PolicySettings()
    return PolicySettings.from_file(config.policy_config_path)


def _keepalive_options(config: ServerConfig) -> list[tuple[str, int]]:
    """Server pings that find vanished clients, and a ping policy that accepts clients' own
    keepalives (gRPC's default policy answers pings more often than 5 min with GOAWAY)."""
    return [
        ("grpc.keepalive_time_ms", int(config.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        # Recent gRPC cores time an unacknowledged ping with this one (default 1 min).
        ("grpc.http2.ping_timeout_ms", int(config.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def create_server(config: ServerConfig) -> tuple[ManateeServer, int]:
    """Start a server; returns it and the TCP port it bound (0 for a unix socket)."""
    server = ManateeServer(config).start()
    return server, server.port


def _client_target(listen: str, port: int) -> str:
    if listen.startswith("unix:"):
        return listen
    host = listen.rsplit(":", 1)[0]
    return f"{host}:{port}"
