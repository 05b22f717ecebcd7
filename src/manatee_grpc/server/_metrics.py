"""Prometheus metrics: RPC counts and latencies, mms round trips, the mms link, per-VM memory.

One ``Metrics`` per server, on its own registry (tests run many servers in one process).
Nothing here sends anything to mms: a scrape reads what already passed through the server.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from manatee_grpc.core._bridge import MemoryBridge
from manatee_grpc.core._errors import MmsConnectionError
from manatee_grpc.core._events import AuditFile
from manatee_grpc.mms._connection import MmsConnection, Trouble
from manatee_grpc.mms._messages import (
    RES_OK,
    GetBalloonStatsRequest,
    GetBalloonStatsResponse,
    MessageType,
    MmsRequest,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
    UnreadableReason,
    UnreadableVm,
    VmBalloonStats,
)

logger = logging.getLogger(__name__)

# fmt: off
# RPCs range from a sub-millisecond ListVms to a LaunchVm that waits for its client's VM.
RPC_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
)
# mms answers stats in about a millisecond; RemoveVm waits for crosvm to exit (watchdog 600 s).
MMS_BUCKETS_S = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
)
# fmt: on


class MetricsAddressError(ValueError):
    """A --metrics-listen value that is not HOST:PORT."""


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too; port 0 picks one) as (host, port)."""
    host, sep, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise MetricsAddressError(
            f"metrics address {listen!r}: expected HOST:PORT (e.g. 127.0.0.1:9464; port 0 "
            "picks a free one)"
        )
    return host, int(port_text)


class Metrics:
    """The server's metrics and the HTTP endpoint that serves them; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._rpc_handled = Counter(
            "manatee_grpc_server_handled",
            "RPCs completed, by method and final gRPC status code.",
            ["grpc_method", "grpc_code"],
            registry=self.registry,
        )
        self._rpc_seconds = Histogram(
            "manatee_grpc_server_handling_seconds",
            "Time from an RPC's arrival to its final status (a stream's whole life).",
            ["grpc_method"],
            buckets=RPC_BUCKETS_S,
            registry=self.registry,
        )
        self._mms_seconds = Histogram(
            "manatee_mms_round_trip_seconds",
            "Time from writing an mms request to reading its answer, answered requests only.",
            ["message_type"],
            buckets=MMS_BUCKETS_S,
            registry=self.registry,
        )
        # Label lookups take a lock and build tuples; these run per RPC and per mms answer
        # (on the connection thread), so each series' child is looked up once and kept.
        self._rpc_children: dict[tuple[str, grpc.StatusCode], tuple[Counter, Histogram]] = {}
        self._mms_children = {t: self._mms_seconds.labels(t.name) for t in MessageType}
        # Every reason's series exists from the start (at 0), so a rate() over it is defined.
        unreadable = Counter(
            "manatee_mms_unreadable_vm_stats",
            "VM entries left out of mms GetBalloonStats answers because a value was impossible "
            "(wrapped, over 2^53, negative, not an integer, missing), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self._unreadable_children = {r: unreadable.labels(r.value) for r in UnreadableReason}
        self.vm_memory = VmMemory()
        self._http: WSGIServer | None = None
        self._http_thread: threading.Thread | None = None
        self.address: str | None = None  # HOST:PORT the endpoint bound, once serving

    def observe_rpc(self, method: str, code: grpc.StatusCode, duration_s: float) -> None:
        """Count one finished RPC. ``method`` is the RPC name; a full ``/pkg.Svc/Name`` path
        is cut to ``Name`` so both spellings land in the same series."""
        children = self._rpc_children.get((method, code))
        if children is None:
            name = method.rsplit("/", 1)[-1]
            children = (self._rpc_handled.labels(name, code.name), self._rpc_seconds.labels(name))
            self._rpc_children[method, code] = children
        handled, seconds = children
        handled.inc()
        seconds.observe(duration_s)

    def observe_mms_round_trip(self, message_type: MessageType, round_trip_s: float) -> None:
        self._mms_children[message_type].observe(round_trip_s)

    def count_unreadable(self, entries: Iterable[UnreadableVm]) -> None:
        for entry in entries:
            self._unreadable_children[entry.reason].inc()

    def serve(self, listen: str) -> str:
        """Serve ``/metrics`` over HTTP on ``listen`` (HOST:PORT); returns the bound HOST:PORT.

        prometheus_client's own exposition server (a WSGI server on one daemon thread, which
        picks the IPv4 or IPv6 family of ``host``); who may listen where is ``_listen``'s call.
        """
        host, port = parse_listen(listen)
        http, thread = start_http_server(port, host, registry=self.registry)
        self._http, self._http_thread = http, thread
        bound_port = http.server_address[1]
        self.address = f"[{host}]:{bound_port}" if ":" in host else f"{host}:{bound_port}"
        logger.info("metrics on http://%s/metrics", self.address)
        return self.address

    def close(self) -> None:
        """Stop the HTTP endpoint (if serving) and release its port; safe to call twice."""
        http, thread = self._http, self._http_thread
        self._http = self._http_thread = None
        if http is None or thread is None:
            return
        http.shutdown()  # returns once serve_forever has left its loop (it polls every 0.5 s)
        http.server_close()
        thread.join(5.0)


class VmMemory:
    """Each VM's memory from the latest GetBalloonStats answer, until the VM or session goes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_vm: dict[int, VmBalloonStats] = {}  # frozen: kept as mms answered them

    def update(self, request: GetBalloonStatsRequest, response: GetBalloonStatsResponse) -> None:
        by_vm = self._by_vm
        with self._lock:
            # Asked for and left out: an old value would pass for a current one.
            for vm_id in request.vm_ids:
                by_vm.pop(vm_id, None)
            for entry in response.all_stats:
                by_vm[entry.vm_id] = entry

    def forget(self, vm_id: int) -> None:
        with self._lock:
            self._by_vm.pop(vm_id, None)

    def clear(self) -> None:
        with self._lock:
            self._by_vm.clear()

    def snapshot(self) -> dict[int, VmBalloonStats]:
        with self._lock:
            return dict(self._by_vm)


class _MmsObserver:
    """Times mms round trips and keeps VmMemory current; a ConnectionObserver."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def on_connected(self, session: int) -> None:
        self._metrics.vm_memory.clear()

    def on_disconnected(self, session: int, error: MmsConnectionError) -> None:
        # mms drops every sibling VM with the connection, and the CrOS guest's figures will
        # have moved by the next read: nothing we hold describes the new session.
        self._metrics.vm_memory.clear()

    def on_response(
        self, session: int, request: MmsRequest[Any], response: Response, round_trip_s: float
    ) -> None:
        self._metrics.observe_mms_round_trip(request.TYPE, round_trip_s)
        if isinstance(request, GetBalloonStatsRequest) and isinstance(
            response, GetBalloonStatsResponse
        ):
            self._metrics.vm_memory.update(request, response)
            if response.unreadable:
                self._metrics.count_unreadable(response.unreadable)
        elif (
            isinstance(request, RemoveVmRequest)
            and isinstance(response, RemoveVmResponse)
            and response.res == RES_OK
        ):
            self._metrics.vm_memory.forget(request.vm_id)


class _StateCollector:
    """Gauges read at scrape time from the connection, the start slot and VmMemory."""

    def __init__(self, metrics: Metrics, connection: MmsConnection, bridge: MemoryBridge) -> None:
        self._vm_memory = metrics.vm_memory
        self._connection = connection
        self._bridge = bridge

    def collect(self) -> Iterable[Metric]:
        connection, slot = self._connection, self._bridge.slot
        yield GaugeMetricFamily(
            "manatee_mms_connected",
            "1 while the connection to mms is up, else 0.",
            value=1 if connection.connected else 0,
        )
        yield GaugeMetricFamily(
            "manatee_mms_session",
            "Number of the mms session: 1 for the first connect, +1 per reconnect (a reset).",
            value=connection.session,
        )
        trouble = connection.trouble
        for kind in Trouble:
            gauge = GaugeMetricFamily(
                f"manatee_mms_{kind.value}",
                "1 while the mms stream is kept but not used because mms is "
                + (
                    "silent past its watchdog (health NOT_SERVING)"
                    if kind is Trouble.HUNG
                    else "out of step (health NOT_SERVING until an operator resets it)"
                )
                + "; vms_at_stake names the sibling VMs a reset would drop.",
                labels=["vms_at_stake"],
            )
            if trouble is not None and trouble.kind is kind:
                gauge.add_metric([",".join(str(v) for v in trouble.stakes.vm_ids)], 1)
            else:
                gauge.add_metric([""], 0)
            yield gauge
        claim = slot.claim
        yield GaugeMetricFamily(
            "manatee_reservations_pending",
            "VM starts mms has reserved memory for and that are not finished or removed (0 or 1).",
            value=1 if claim is not None and claim.vm_id is not None else 0,
        )
        yield GaugeMetricFamily(
            "manatee_launches_waiting",
            "LaunchVm calls queued for the one pending start mms allows.",
            value=slot.launches_waiting(),
        )
        balloon = GaugeMetricFamily(
            "manatee_vm_balloon_bytes",
            "Balloon size of the VM at the latest stats read (memory taken from it).",
            labels=["vm_id"],
        )
        free = GaugeMetricFamily(
            "manatee_vm_free_bytes",
            "Free memory the VM's guest reported at the latest stats read.",
            labels=["vm_id"],
        )
        available = GaugeMetricFamily(
            "manatee_vm_available_bytes",
            "Available memory the VM's guest reported at the latest stats read.",
            labels=["vm_id"],
        )
        for vm_id, entry in sorted(self._vm_memory.snapshot().items()):
            labels = [str(vm_id)]
            balloon.add_metric(labels, entry.balloon_actual_bytes)
            # Absent means the guest did not report it: no sample, rather than a made-up 0.
            if entry.stats.free_memory is not None:
                free.add_metric(labels, entry.stats.free_memory)
            if entry.stats.available_memory is not None:
                available.add_metric(labels, entry.stats.available_memory)
        yield balloon
        yield free
        yield available


class _AuditCollector:
    """The audit file's lost lines, read at scrape time."""

    def __init__(self, audit: AuditFile) -> None:
        self._audit = audit

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(
            "manatee_audit_write_failures",
            "Events whose audit-file line could not be written (a full disk, an I/O error); "
            "they still reached WatchEvents.",
            value=self._audit.failed_writes,
        )


def attach_audit(metrics: Metrics, audit: AuditFile) -> None:
    """Count ``audit``'s failed writes in ``metrics`` (``serve --audit-file``)."""
    metrics.registry.register(_AuditCollector(audit))


def attach_metrics(metrics: Metrics, connection: MmsConnection, bridge: MemoryBridge) -> None:
    """Feed ``metrics`` from the mms connection and the bridge (call once, before start)."""
    connection.add_observer(_MmsObserver(metrics))
    metrics.registry.register(_StateCollector(metrics, connection, bridge))
