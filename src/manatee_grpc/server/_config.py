"""Every server setting in one object; the CLI fills it, nothing else reads the environment."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from manatee_grpc.core._events import DEFAULT_CAPACITY
from manatee_grpc.core._launch import DEFAULT_ATTEMPT_DELAYS_S, DEFAULT_STOP_TIMEOUT_S
from manatee_grpc.mms._connection import DEFAULT_WATCHDOG_S
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.mms._wire import DEFAULT_MAX_BODY_BYTES

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_SOCKET_MODE = 0o600


@dataclass(frozen=True, slots=True)
class ServerConfig:
    # Where gRPC listens: HOST:PORT (port 0 picks one) or unix:///abs/path.
    listen: str = DEFAULT_LISTEN
    # Who may connect (checked by _listen before anything binds). A unix socket is created
    # with this mode, and given this group (name or gid) if set.
    socket_mode: int = DEFAULT_SOCKET_MODE
    socket_group: str | None = None
    # Allow plaintext TCP on a non-loopback address (refused otherwise).
    insecure: bool = False
    # Server TLS (PEM files); with a client CA, clients must present a certificate it signed.
    tls_cert_path: str | None = None
    tls_key_path: str | None = None
    tls_client_ca_path: str | None = None
    # The mms address (vsock://, unix://, tcp://, fd://); None starts the embedded simulator.
    mms: str | None = None
    # Scenario file for the embedded simulator (TOML or JSON).
    sim_scenario: str | None = None
    # Prometheus endpoint (HOST:PORT, port 0 picks one); None serves no metrics.
    metrics_listen: str | None = None
    # Deprecated and ignored: every handler is a coroutine on the one event loop, so there is
    # no handler thread pool to size any more. Kept so that old configurations still load.
    max_workers: int = 64
    # RPCs in progress beyond this are refused with RESOURCE_EXHAUSTED (None: no cap).
    max_concurrent_rpcs: int | None = 1000
    max_receive_message_bytes: int = 1 << 20
    # How long in-flight RPCs may run after SIGTERM before they are cancelled.
    grace_s: float = 10.0
    # The start lease: a start opened by a bare PrepareVm is removed if not finished or removed
    # in this time, and a LaunchVm client must send `vm_started` within it after `reserved`.
    prepare_lease_s: float = 60.0
    # HTTP/2 keepalive: ping a quiet connection after this long, drop it if no ack in time.
    keepalive_time_s: float = 20.0
    keepalive_timeout_s: float = 10.0
    launch_attempt_delays_s: tuple[float, ...] = DEFAULT_ATTEMPT_DELAYS_S
    launch_stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S
    coalesce_stats: bool = True
    balloon_control_dir: str = "/run"
    # mms link
    mms_connect_timeout_s: float = 5.0
    mms_max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    mms_watchdog_s: Mapping[MessageType, float] = field(default_factory=lambda: DEFAULT_WATCHDOG_S)
    mms_backoff_initial_s: float = 0.05
    mms_backoff_max_s: float = 5.0
    # Reset the stream when mms is silent past the watchdog even if VMs are at stake (mms then
    # drops them all). Off: a hung mms only turns health NOT_SERVING until it answers.
    mms_hang_reset: bool = False
    # The memory balancing policy ("balance-available"), off when None, and its settings file
    # (TOML; PolicySettings in core/_policy.py lists the keys; defaults without a file).
    policy: str | None = None
    policy_config_path: str | None = None
    # Events (WatchEvents): how many the server keeps for replay, and the append-only JSON-lines
    # audit file they also go to (None: none).
    event_ring_size: int = DEFAULT_CAPACITY
    audit_file: str | None = None
