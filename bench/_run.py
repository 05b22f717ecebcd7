"""The benchmark run: every measurement side by side, one table, targets with PASS/FAIL.

The mms simulators live in this process (so their request counts are read directly), the server
under test is ``bench._serve`` in a subprocess, the reference (``bench._minimal``, a minimal
bridge of the same design, on a simulator of its own) another, and client load runs in spawned
worker processes.

The unary targets compare the bridge with that reference, measured in the same rounds: what this
design can reach on this machine, so the bridge's own overhead is what the target bounds. The
gRPC floor (a no-op on the bridge's own server) and the raw mms round trip are printed beside
them as information: what gRPC and mms cost, not what a bridge can reach.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from bench import _load
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.mms._messages import MessageType
from manatee_grpc.sim import Simulator

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "latest.json"
VM_COUNT = 8
CONCURRENCIES = (1, 8, 32, 128)
WINDOW_S = 2.0
# Each compared pair (floor and bridge, coalescing on and off) is measured in turn, ROUNDS
# times, in windows of ROUND_WINDOW_S; a row reports the median round. This machine's speed
# drifts by tens of percent within a minute, so a single window each gives ratios that swing;
# and the order alternates from round to round (A B C, C B A, ...), so a drift within a round
# favours no one of them. The targets against the reference take each round's ratio (the
# bridge and the reference run back to back, B C or C B) and report their median, over
# TARGET_ROUNDS at the concurrencies that have targets (one round's ratio moves by several
# percent on this machine; the median of more of them moves less).
ROUNDS = 5
TARGET_ROUNDS = 9
TARGET_CONCURRENCIES = (1, 32)
ROUND_WINDOW_S = 1.2
WARMUP_S = 0.7
COALESCE_LATENCY_S = 0.002
FLOOR_ROW = "gRPC floor (no-op)"
BRIDGE_ROW = "bridge GetBalloonStats"
MINIMAL_ROW = "minimal bridge (reference)"
# The targets against the reference: throughput at 32 callers, median latency of a lone caller.
MINIMAL_CALLS_RATIO = 1.0
MINIMAL_P50_RATIO = 1.10
ON_ROW = "bridge, 2 ms mms, coalescing on"
OFF_ROW = "bridge, 2 ms mms, coalescing off"
HOL_CONCURRENCIES = (1, 8)
HOL_BACKOFF = "HOL: stats during LaunchVm backoff"
HOL_CLIENT_WAIT = "HOL: stats during LaunchVm client wait"
# The tcp server backs a launch off longer than the default, so every HOL run fits in the wait.
HOL_ATTEMPT_DELAYS = "0,3,3,3,3"
QUIET_LAUNCHES = 200
QUIET_CONCURRENCY = 8
QUIET_NONE = "rebalance, no launch"
QUIET_MANY = f"rebalance, {QUIET_LAUNCHES} quiet launches"
WATCHER_COUNTS = (10, 100, 1000)
WATCH_INTERVAL_S = 1.0
WATCH_WINDOW_S = 4.0
START_RUNS = 3
HUGE_BYTES = 7 * 1024 * _load.MIB
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(slots=True)
class Row:
    measurement: str
    transport: str = ""
    concurrency: int | None = None
    calls_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    mms_round_trips_per_rpc: float | None = None
    notes: dict[str, float | int | str] = field(default_factory=dict)
    # A compared row's every round, in order: (calls/s, p50 ms). The reference targets pair
    # each round of the bridge with the same round of the reference (see _paired_ratio).
    rounds: list[tuple[float | None, float | None]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    measured: str
    wanted: str
    passed: bool | None  # None: printed for information, not a target


# --- the server under test -----------------------------------------------------------------------


class ServerProcess:
    """``python -m bench._serve`` (or ``module``) with its gRPC address and floor address."""

    def __init__(self, listen: str, mms: str, *extra: str, module: str = "bench._serve") -> None:
        command = [
            sys.executable,
            "-m",
            module,
            "--listen",
            listen,
            "--mms",
            mms,
            *extra,
        ]
        self._process = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"server subprocess failed to start: {' '.join(command)}")
        addresses = json.loads(line)
        self.address: str = addresses["address"]
        self.floor: str = addresses["address"]  # the no-op is served by the same server
        self.pid = self._process.pid

    def stop(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.close()
        try:
            self._process.wait(15)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _stats_reads(sim: Simulator) -> int:
    return sim.request_counts[MessageType.GET_BALLOON_STATS]


def _start_vms(target: str, count: int) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.MemoryServiceStub(channel)
        for _ in range(count):
            prepared = stub.PrepareVm(
                pb.PrepareVmRequest(mem_size_bytes=_load.VM_MEM_BYTES), timeout=10
            )
            if not prepared.reserved:
                raise RuntimeError("could not reserve memory for a bench VM")
            stub.FinishAddVm(pb.FinishAddVmRequest(vm_id=prepared.vm_id), timeout=10)


# --- measurements --------------------------------------------------------------------------------


def _percentile_ms(latencies_s: list[float], fraction: float) -> float | None:
    if not latencies_s:
        return None
    ordered = sorted(latencies_s)
    index = min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))
    return ordered[index] * 1000


@dataclass(frozen=True, slots=True)
class _Rig:
    """What every load measurement needs: the client processes and the simulator to count."""

    pool: ProcessPoolExecutor
    sim: Simulator


def _unary(
    rig: _Rig,
    measurement: str,
    transport: str,
    target: str,
    *,
    method: str,
    concurrency: int,
    server_pid: int,
    window_s: float = WINDOW_S,
) -> Row:
    pool, sim = rig.pool, rig.sim
    # Two client processes (the machine has two cores) unless a single caller is asked for.
    processes = 1 if concurrency == 1 else 2
    shares = [concurrency // processes + (i < concurrency % processes) for i in range(processes)]
    reads_before = _stats_reads(sim)
    cpu_before_s = _cpu_s(server_pid)
    start_at = time.monotonic() + WARMUP_S
    end_at = start_at + window_s
    jobs = [
        pool.submit(_load.run_unary, target, method, share, start_at, end_at) for share in shares
    ]
    results: list[_load.LoadResult] = [job.result() for job in jobs]
    reads = _stats_reads(sim) - reads_before
    cpu_used_s = _cpu_s(server_pid) - cpu_before_s
    latencies = [lat for r in results for lat in r.latencies_s]
    calls_total = sum(r.calls_total for r in results)
    errors = sum(r.errors for r in results)
    row = Row(
        measurement,
        transport,
        concurrency,
        calls_per_s=len(latencies) / window_s,
        p50_ms=_percentile_ms(latencies, 0.50),
        p99_ms=_percentile_ms(latencies, 0.99),
        mms_round_trips_per_rpc=reads / calls_total if calls_total and method != "floor" else None,
    )
    if calls_total:
        # Server process CPU per call, warm-up included: where the time goes.
        row.notes["srv_cpu_ms_per_call"] = round(1000 * cpu_used_s / calls_total, 3)
    if errors:
        row.notes["errors"] = errors
    return row


@dataclass(frozen=True, slots=True)
class _Run:
    """One side of a comparison: which measurement, against which server and simulator."""

    rig: _Rig
    measurement: str
    transport: str
    target: str
    method: str
    server_pid: int


def _side_by_side(runs: list[_Run], concurrency: int, round_count: int = ROUNDS) -> list[Row]:
    """Measure ``runs`` in turn, ``round_count`` times over; one row each, from its median
    round."""
    rounds: list[list[Row]] = [[] for _ in runs]
    for round_index in range(round_count):
        pairs = list(zip(runs, rounds, strict=True))
        for run, results in pairs if round_index % 2 == 0 else reversed(pairs):
            results.append(
                _unary(
                    run.rig,
                    run.measurement,
                    run.transport,
                    run.target,
                    method=run.method,
                    concurrency=concurrency,
                    server_pid=run.server_pid,
                    window_s=ROUND_WINDOW_S,
                )
            )
    return [_median_round(results) for results in rounds]


def _median_round(results: list[Row]) -> Row:
    """The round with the median calls/s, its spread across rounds noted."""
    ordered = sorted(results, key=lambda row: row.calls_per_s or 0.0)
    row = ordered[len(ordered) // 2]
    row.notes["rounds_calls_per_s"] = "/".join(f"{r.calls_per_s or 0.0:.0f}" for r in results)
    row.rounds = [(r.calls_per_s, r.p50_ms) for r in results]
    return row


def _paired_ratio(bridge: Row, reference: Row, concurrency: int) -> float | None:
    """The median over rounds of bridge / reference (calls/s at 32, p50 at 1), each round's
    pair measured back to back: this machine's speed drifts by tens of percent within a
    minute, and a ratio of two medians taken from different rounds carries that drift."""
    index = 1 if concurrency == 1 else 0
    ratios: list[float] = []
    for mine, theirs in zip(bridge.rounds, reference.rounds, strict=True):
        numerator, denominator = mine[index], theirs[index]
        if numerator and denominator:
            ratios.append(numerator / denominator)
    return statistics.median(ratios) if ratios else None


def _direct(pool: ProcessPoolExecutor, sim: Simulator) -> Row:
    start_at = time.monotonic() + WARMUP_S
    result: _load.LoadResult = pool.submit(
        _load.run_direct, str(sim.address), VM_COUNT, start_at, start_at + WINDOW_S
    ).result()
    return Row(
        "direct mms GetBalloonStats (no gRPC)",
        "unix (mms)",
        1,
        calls_per_s=len(result.latencies_s) / WINDOW_S,
        p50_ms=_percentile_ms(result.latencies_s, 0.50),
        p99_ms=_percentile_ms(result.latencies_s, 0.99),
        mms_round_trips_per_rpc=1.0,
    )


def _start_times(sim: Simulator, workdir: Path) -> list[float]:
    """Seconds from process start to health SERVING, for the real ``manatee-grpc serve``."""
    times: list[float] = []
    for run in range(START_RUNS):
        listen = f"unix://{workdir / f'start-{run}.sock'}"
        started = time.monotonic()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "manatee_grpc",
                "serve",
                "--listen",
                listen,
                "--mms",
                str(sim.address),
                "--log-level",
                "ERROR",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            times.append(_wait_serving(listen, started, 20.0))
        finally:
            process.terminate()
            process.wait(15)
    return times


def _wait_serving(target: str, started: float, timeout_s: float) -> float:
    with grpc.insecure_channel(target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while time.monotonic() - started < timeout_s:
            try:
                response: health_pb2.HealthCheckResponse = check(
                    health_pb2.HealthCheckRequest(), timeout=0.2
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(0.005)
    raise RuntimeError(f"{target} never reported SERVING")


class _Launch:
    """A LaunchVm stream driven from this process; ``send`` feeds its client half."""

    def __init__(self, target: str, mem_size_bytes: int) -> None:
        self._channel = grpc.insecure_channel(target)
        self._outbox: queue.Queue[pb.LaunchVmRequest | None] = queue.Queue()
        self._outbox.put(
            # All of it initial memory: the 7 GiB launch must fall short (what the CrOS guest
            # can give up front), not reserve a mostly-deflated VM.
            pb.LaunchVmRequest(
                start=pb.LaunchVmRequest.Start(
                    mem_size_bytes=mem_size_bytes, init_mem_size_bytes=mem_size_bytes
                )
            )
        )
        stub = pb_grpc.MemoryServiceStub(self._channel)
        self.call = stub.LaunchVm(self._requests(), timeout=60)
        self.events: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.LaunchVmRequest]:
        while (item := self._outbox.get()) is not None:
            yield item

    def _read(self) -> None:
        try:
            for response in self.call:
                self.events.put(response.WhichOneof("event") or "")
        except grpc.RpcError as error:
            self.events.put(f"ended {error.code().name}")
        self.events.put("closed")

    def wait_for(self, event: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (got := self.events.get(timeout=max(0.0, deadline - time.monotonic()))) != event:
            if got in ("closed",) or got.startswith("ended"):
                raise RuntimeError(f"launch ended before {event!r}: {got}")

    def send(self, request: pb.LaunchVmRequest | None) -> None:
        self._outbox.put(request)

    def close(self) -> None:
        self.call.cancel()
        self.send(None)
        self._reader.join(10)
        self._channel.close()


def _head_of_line(rig: _Rig, server: ServerProcess) -> list[Row]:
    rows: list[Row] = []
    # 1. A launch that cannot reserve (7 GiB asked) backs off between attempts (3 s each here).
    launch = _Launch(server.address, HUGE_BYTES)
    try:
        launch.wait_for("progress")
        for concurrency in HOL_CONCURRENCIES:
            rows.append(
                _unary(
                    rig,
                    HOL_BACKOFF,
                    "tcp",
                    server.address,
                    method="stats",
                    concurrency=concurrency,
                    server_pid=server.pid,
                )
            )
    finally:
        launch.close()
    # 2. A launch that reserved and waits for its client to start crosvm.
    launch = _Launch(server.address, _load.VM_MEM_BYTES)
    try:
        launch.wait_for("reserved")
        for concurrency in HOL_CONCURRENCIES:
            rows.append(
                _unary(
                    rig,
                    HOL_CLIENT_WAIT,
                    "tcp",
                    server.address,
                    method="stats",
                    concurrency=concurrency,
                    server_pid=server.pid,
                )
            )
        failed = pb.LaunchVmRequest()
        failed.vm_start_failed.reason = "bench: not starting crosvm"
        launch.send(failed)
    finally:
        launch.close()
    return rows


def _quiet_launches(rig: _Rig, server: ServerProcess) -> list[Row]:
    """RebalanceMemory with no launch, then with 200 launches that say nothing after `start`
    (1 reserved, 199 queued): a launch holds no thread, so the second is as fast as the first."""

    def measure(name: str) -> Row:
        return _unary(
            rig,
            name,
            "tcp",
            server.address,
            method="rebalance",
            concurrency=QUIET_CONCURRENCY,
            server_pid=server.pid,
        )

    _start_vms(server.address, 1)  # a sibling to rebalance
    rows = [measure(QUIET_NONE)]
    context = multiprocessing.get_context("spawn")
    commands: multiprocessing.Queue[str] = context.Queue()
    reports: multiprocessing.Queue[Any] = context.Queue()
    process = context.Process(
        target=_load.run_quiet_launches,
        args=(server.address, QUIET_LAUNCHES, commands, reports),
        daemon=True,
    )
    process.start()
    try:
        ready = reports.get(timeout=120)
        if ready != "ready":
            raise RuntimeError(f"quiet launches: {ready}")
        rows.append(measure(QUIET_MANY))
    finally:
        commands.put("stop")
        process.join(60)
    return rows


def _watchers(sim: Simulator, server: ServerProcess, watchers: int) -> Row:
    context = multiprocessing.get_context("spawn")
    commands: multiprocessing.Queue[str] = context.Queue()
    reports: multiprocessing.Queue[Any] = context.Queue()
    process = context.Process(
        target=_load.run_watchers,
        args=(server.address, watchers, WATCH_INTERVAL_S, commands, reports),
        daemon=True,
    )
    process.start()
    row = Row(f"{watchers} watchers @ {WATCH_INTERVAL_S:g} s", "tcp", watchers)
    try:
        ready = reports.get(timeout=180)
        if ready != "ready":
            row.notes["error"] = str(ready)
            return row

        def next_poll() -> tuple[float, int, float]:
            count = _stats_reads(sim)
            sim.wait_until(lambda: _stats_reads(sim) > count, 10.0)
            return time.monotonic(), _stats_reads(sim), _cpu_s(server.pid)

        # Measure from one poll to a later one, so the window holds whole ticks.
        t_a, polls_a, cpu_a = next_poll()
        time.sleep(WATCH_WINDOW_S - WATCH_INTERVAL_S / 2)
        t_b, polls_b, cpu_b = next_poll()
        elapsed_s = t_b - t_a
        row.notes["polls_per_s"] = (polls_b - polls_a) / elapsed_s
        row.notes["rss_mb"] = _rss_mb(server.pid)
        row.notes["cpu_pct"] = 100 * (cpu_b - cpu_a) / elapsed_s
        commands.put("stop")
        summary = reports.get(timeout=60)
        row.notes["snapshots"] = summary["received"]
        row.notes["dropped"] = summary["dropped"]
        if summary["errors"]:
            row.notes["stream_errors"] = summary["errors"]
    finally:
        process.join(30)
        if process.is_alive():
            process.kill()
    return row


def _against_reference(
    rig: _Rig,
    minimal_rig: _Rig,
    transport: str,
    listen: str,
    minimal_listen: str,
    *,
    concurrencies: tuple[int, ...] = CONCURRENCIES,
    head_of_line: bool = True,
) -> list[Row]:
    """The floor, the bridge and the minimal bridge, in turn at each concurrency; then, over
    tcp and if ``head_of_line``, the head-of-line and quiet-launch rows on the same server."""
    rows: list[Row] = []
    server = ServerProcess(
        listen, str(rig.sim.address), "--launch-attempt-delays", HOL_ATTEMPT_DELAYS
    )
    try:
        # The reference starts as many VMs itself, so both read stats of VM_COUNT + 1 VMs.
        minimal = ServerProcess(
            minimal_listen,
            str(minimal_rig.sim.address),
            "--vms",
            str(VM_COUNT),
            module="bench._minimal",
        )
        try:
            _start_vms(server.address, VM_COUNT)
            runs = [
                _Run(rig, FLOOR_ROW, transport, server.floor, "floor", server.pid),
                _Run(rig, BRIDGE_ROW, transport, server.address, "stats", server.pid),
                _Run(minimal_rig, MINIMAL_ROW, transport, minimal.address, "stats", minimal.pid),
            ]
            for concurrency in concurrencies:
                round_count = TARGET_ROUNDS if concurrency in TARGET_CONCURRENCIES else ROUNDS
                rows.extend(_side_by_side(runs, concurrency, round_count))
        finally:
            minimal.stop()
        if transport == "tcp" and head_of_line:
            print("bench: head-of-line ...", file=sys.stderr, flush=True)
            rows.extend(_head_of_line(rig, server))
            print("bench: quiet launches ...", file=sys.stderr, flush=True)
            rows.extend(_quiet_launches(rig, server))
    finally:
        server.stop()
    return rows


def _coalescing(rig: _Rig, spare_sim: Simulator) -> list[Row]:
    """Coalescing on and off, side by side: two servers, each on its own simulator (mms takes
    one client), both simulators answering after COALESCE_LATENCY_S."""
    on = ServerProcess("127.0.0.1:0", str(rig.sim.address))
    off = ServerProcess("127.0.0.1:0", str(spare_sim.address), "--no-coalesce-stats")
    try:
        _start_vms(on.address, VM_COUNT)
        _start_vms(off.address, VM_COUNT)
        for sim in (rig.sim, spare_sim):
            sim.set_latency(COALESCE_LATENCY_S)
        off_rig = _Rig(rig.pool, spare_sim)
        return _side_by_side(
            [
                _Run(rig, ON_ROW, "tcp", on.address, "stats", on.pid),
                _Run(off_rig, OFF_ROW, "tcp", off.address, "stats", off.pid),
            ],
            32,
        )
    finally:
        for sim in (rig.sim, spare_sim):
            sim.set_latency(0.0)
        on.stop()
        off.stop()


# --- the run -------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[Row]) -> str:
    header = ("measurement", "transport", "conc", "calls/s", "p50 ms", "p99 ms", "mms rt/RPC")
    lines = [
        [
            row.measurement,
            row.transport,
            "" if row.concurrency is None else str(row.concurrency),
            _fmt(row.calls_per_s, 0),
            _fmt(row.p50_ms, 3),
            _fmt(row.p99_ms, 3),
            _fmt(row.mms_round_trips_per_rpc, 3),
            " ".join(
                f"{k}={_fmt(v, 1) if isinstance(v, float) else v}" for k, v in row.notes.items()
            ),
        ]
        for row in rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  notes",
        "  ".join("-" * w for w in widths) + "  -----",
    ]
    for line in lines:
        cells = [line[i].ljust(w) if i < 2 else line[i].rjust(w) for i, w in enumerate(widths)]
        out.append("  ".join(cells) + "  " + line[-1])
    return "\n".join(out)


def _find(rows: list[Row], measurement: str, transport: str, concurrency: int) -> Row:
    for row in rows:
        if (row.measurement, row.transport, row.concurrency) == (
            measurement,
            transport,
            concurrency,
        ):
            return row
    raise KeyError((measurement, transport, concurrency))


def _targets(rows: list[Row], start_s: list[float]) -> list[Target]:
    targets: list[Target] = []

    def check(
        name: str,
        measured: float | None,
        wanted: str,
        *,
        at_most: float | None = None,
        at_least: float | None = None,
    ) -> None:
        passed = (
            measured is not None
            and (at_most is None or measured <= at_most)
            and (at_least is None or measured >= at_least)
        )
        targets.append(Target(name, _fmt(measured, 3), wanted, passed))

    def info(name: str, measured: float | None, note: str) -> None:
        targets.append(Target(name, _fmt(measured, 3), note, None))

    direct = rows[0]
    for concurrency in (32, 1):
        targets.extend(_reference_targets(rows, concurrency))
    for transport in ("tcp", "unix"):
        bridge32 = _find(rows, BRIDGE_ROW, transport, 32).calls_per_s
        minimal32 = _find(rows, MINIMAL_ROW, transport, 32).calls_per_s or 0.0
        bridge_p50 = _find(rows, BRIDGE_ROW, transport, 1).p50_ms
        minimal_p50 = _find(rows, MINIMAL_ROW, transport, 1).p50_ms or 0.0
        # The floor ratios (the targets before the reference existed), for information: what
        # gRPC alone costs on this server's settings, and what raw mms reads cost.
        floor32 = _find(rows, FLOOR_ROW, transport, 32).calls_per_s
        floor_p50 = _find(rows, FLOOR_ROW, transport, 1).p50_ms or 0.0
        old_p50_ms = floor_p50 + 1.5 * (direct.p50_ms or 0.0)
        for name, calls_per_s, was in (
            ("bridge", bridge32, "; was a target, >= 0.8"),
            ("minimal bridge", minimal32, ""),
        ):
            info(
                f"{name} calls/s @32 {transport} / floor",
                calls_per_s / floor32 if calls_per_s is not None and floor32 else None,
                f"floor {_fmt(floor32, 0)} calls/s{was}",
            )
        for name, p50, was in (
            (
                "bridge",
                bridge_p50,
                f"; was a target, <= floor + 1.5 x direct p50 ({old_p50_ms:.3f})",
            ),
            ("minimal bridge", minimal_p50, ""),
        ):
            info(
                f"{name} p50 @1 {transport} / floor p50",
                p50 / floor_p50 if p50 is not None and floor_p50 else None,
                f"floor p50 {floor_p50:.3f} ms{was}",
            )
    on = _find(rows, ON_ROW, "tcp", 32)
    off = _find(rows, OFF_ROW, "tcp", 32)
    check("2 ms mms @32: round trips/RPC", on.mms_round_trips_per_rpc, "<= 0.25", at_most=0.25)
    ratio = (on.calls_per_s or 0.0) / off.calls_per_s if off.calls_per_s else None
    check("2 ms mms @32: calls/s on / off", ratio, ">= 4", at_least=4.0)
    for measurement in (HOL_BACKOFF, HOL_CLIENT_WAIT):
        for concurrency in HOL_CONCURRENCIES:
            baseline = _find(rows, BRIDGE_ROW, "tcp", concurrency).p99_ms
            check(
                f"{measurement} @{concurrency} p99 (ms)",
                _find(rows, measurement, "tcp", concurrency).p99_ms,
                f"<= 20 (same load, no launch: {_fmt(baseline, 3)})",
                at_most=20.0,
            )
    none_p50 = _find(rows, QUIET_NONE, "tcp", QUIET_CONCURRENCY).p50_ms
    many = _find(rows, QUIET_MANY, "tcp", QUIET_CONCURRENCY)
    check(
        f"{QUIET_MANY} @{QUIET_CONCURRENCY}: p50 / no launch",
        many.p50_ms / none_p50 if many.p50_ms and none_p50 else None,
        "<= 1.25 (a queued launch holds no thread)",
        at_most=1.25,
    )
    crowd = _find(rows, "1000 watchers @ 1 s", "tcp", 1000).notes
    # 2 % slack on the poll rate absorbs timer jitter between the ticks that bound the window.
    for key, wanted, limit in (
        ("polls_per_s", "<= 1 (+2 % jitter)", 1.02),
        ("rss_mb", "<= 200", 200.0),
        ("cpu_pct", "<= 50", 50.0),
    ):
        value = crowd.get(key)
        measured = float(value) if isinstance(value, int | float) else None
        check(f"1000 watchers: {key}", measured, wanted, at_most=limit)
    check("start to SERVING (s, median)", statistics.median(start_s), "<= 1.5", at_most=1.5)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument(
        "--only",
        choices=("latency", "throughput"),
        help="latency: only the floor, the bridge and the reference at concurrency 1, over "
        "tcp and unix (about 40 s), with the p50 targets; throughput: the same at "
        "concurrency 32, with the calls/s targets; writes results/<choice>.json",
    )
    args = parser.parse_args(argv)
    began = time.monotonic()
    load_before = os.getloadavg()
    start_s: list[float] = []
    context = multiprocessing.get_context("spawn")
    with (
        tempfile.TemporaryDirectory(prefix="manatee-bench-") as tmp,
        ProcessPoolExecutor(max_workers=2, mp_context=context) as pool,
    ):
        workdir = Path(tmp)
        # Warm the client processes so spawning is not measured.
        for job in [pool.submit(time.monotonic) for _ in range(4)]:
            job.result()
        if args.only is not None:
            concurrency = 1 if args.only == "latency" else 32
            rows = _measure_one_concurrency(pool, workdir, concurrency)
            targets = _reference_targets(rows, concurrency)
            results_path = RESULTS_PATH.with_name(f"{args.only}.json")
        else:
            rows, start_s = _measure_all(pool, workdir)
            targets = _targets(rows, start_s)
            results_path = RESULTS_PATH
    print(_table(rows))
    print()
    width = max(len(t.name) for t in targets)
    for target in targets:
        verdict = "INFO" if target.passed is None else "PASS" if target.passed else "FAIL"
        print(f"{verdict}  {target.name.ljust(width)}  {target.measured:>10}  {target.wanted}")
    elapsed_s = time.monotonic() - began
    load_after = os.getloadavg()
    print(
        f"\n{sum(t.passed is True for t in targets)}/"
        f"{sum(t.passed is not None for t in targets)} targets met in {elapsed_s:.0f} s "
        f"on {os.cpu_count()} CPUs; 1-min load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after (anything else running skews these numbers)"
    )
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(
        json.dumps(
            {
                "meta": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "grpcio": grpc.__version__,
                    "elapsed_s": elapsed_s,
                    "start_s": start_s,
                    "load_average_before": load_before,
                    "load_average_after": load_after,
                },
                "rows": [asdict(row) for row in rows],
                "targets": [asdict(target) for target in targets],
            },
            indent=2,
        )
    )
    print(f"results: {results_path}")
    return 0


def _transports(workdir: Path) -> tuple[tuple[str, str, str], ...]:
    """(transport, the bridge's listen address, the reference's) for each transport measured."""
    return (
        ("tcp", "127.0.0.1:0", "127.0.0.1:0"),
        ("unix", f"unix://{workdir / 'grpc.sock'}", f"unix://{workdir / 'minimal.sock'}"),
    )


def _measure_one_concurrency(
    pool: ProcessPoolExecutor, workdir: Path, concurrency: int
) -> list[Row]:
    """``--only``: the rows of the floor, the bridge and the reference at one concurrency."""
    rows: list[Row] = []
    sim = Simulator(listen=f"unix://{workdir / 'mms.sock'}").start()
    minimal_sim = Simulator(listen=f"unix://{workdir / 'mms-minimal.sock'}").start()
    try:
        for transport, listen, minimal_listen in _transports(workdir):
            print(f"bench: @{concurrency} over {transport} ...", file=sys.stderr, flush=True)
            rows.extend(
                _against_reference(
                    _Rig(pool, sim),
                    _Rig(pool, minimal_sim),
                    transport,
                    listen,
                    minimal_listen,
                    concurrencies=(concurrency,),
                    head_of_line=False,
                )
            )
    finally:
        sim.stop()
        minimal_sim.stop()
    return rows


def _reference_targets(rows: list[Row], concurrency: int) -> list[Target]:
    """The targets against the reference at ``concurrency``, each as the ratio it bounds (p50
    at concurrency 1, calls/s at 32): the median of the rounds' paired ratios."""
    targets: list[Target] = []
    for transport in ("tcp", "unix"):
        bridge = _find(rows, BRIDGE_ROW, transport, concurrency)
        minimal = _find(rows, MINIMAL_ROW, transport, concurrency)
        if concurrency == 1:
            mine, theirs, unit, limit = bridge.p50_ms, minimal.p50_ms, "p50", MINIMAL_P50_RATIO
        else:
            mine, theirs, unit = bridge.calls_per_s, minimal.calls_per_s, "calls/s"
            limit = MINIMAL_CALLS_RATIO
        ratio = _paired_ratio(bridge, minimal, concurrency)
        passed = ratio is not None and (ratio <= limit if concurrency == 1 else ratio >= limit)
        targets.append(
            Target(
                f"bridge {unit} @{concurrency} {transport} / minimal bridge {unit}",
                _fmt(ratio, 3),
                f"{'<=' if concurrency == 1 else '>='} {limit:g}, median of {len(bridge.rounds)} "
                f"paired rounds (median rows: bridge {_fmt(mine, 3)}, minimal {_fmt(theirs, 3)})",
                passed,
            )
        )
    return targets


def _measure_all(pool: ProcessPoolExecutor, workdir: Path) -> tuple[list[Row], list[float]]:
    """Every measurement of ``make bench``; the rows and the start-up times (s)."""
    rows: list[Row] = []
    sim = Simulator(listen=f"unix://{workdir / 'mms.sock'}").start()
    rig = _Rig(pool, sim)
    spare_sim = Simulator(listen=f"unix://{workdir / 'mms-direct.sock'}").start()
    # mms takes one client at a time: the reference gets a simulator of its own.
    minimal_sim = Simulator(listen=f"unix://{workdir / 'mms-minimal.sock'}").start()
    minimal_rig = _Rig(pool, minimal_sim)
    try:
        print("bench: start-up ...", file=sys.stderr, flush=True)
        start_s = _start_times(spare_sim, workdir)
        print("bench: direct mms ...", file=sys.stderr, flush=True)
        rows.append(_direct(pool, spare_sim))
        for transport, listen, minimal_listen in _transports(workdir):
            print(
                f"bench: floor, bridge and minimal bridge over {transport} ...",
                file=sys.stderr,
                flush=True,
            )
            rows.extend(_against_reference(rig, minimal_rig, transport, listen, minimal_listen))
        print("bench: coalescing ...", file=sys.stderr, flush=True)
        rows.extend(_coalescing(rig, spare_sim))
        print("bench: watchers ...", file=sys.stderr, flush=True)
        workers = max(WATCHER_COUNTS) + 100
        server = ServerProcess(
            "127.0.0.1:0",
            str(sim.address),
            "--max-workers",
            str(workers),
            "--max-concurrent-rpcs",
            str(workers),
        )
        try:
            _start_vms(server.address, VM_COUNT)
            for watchers in WATCHER_COUNTS:
                rows.append(_watchers(sim, server, watchers))
        finally:
            server.stop()
    finally:
        sim.stop()
        spare_sim.stop()
        minimal_sim.stop()
    rows.append(
        Row(
            "start: process start to SERVING",
            "unix",
            notes={"median_ms": 1000 * statistics.median(start_s), "max_ms": 1000 * max(start_s)},
        )
    )
    return rows, start_s
