"""``python -m manatee_grpc serve`` as a real subprocess, and a sampler of its threads, fds and RSS.

The server binds port 0 and says where in its log ("listening on HOST:PORT"); the log goes to a
file so a chatty server can never block on a full pipe, and tests read it to see what it did.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
from api.helpers import wait_until
from grpc_health.v1 import health_pb2

# Fast reservation retries: under load a launch that cannot fit must give the start slot back
# quickly instead of holding it for concierge's 5 s of back-off.
FAST_ATTEMPT_DELAYS = "0,0.01,0.01,0.01,0.01"
START_TIMEOUT_S = 30.0
_LISTENING_RE = re.compile(r"manatee-grpc listening on (\S+), mms at")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"

if TYPE_CHECKING:
    HealthStream = grpc._CallIterator[health_pb2.HealthCheckResponse]


def health_check(channel: grpc.Channel, timeout_s: float = 5.0) -> int:
    """grpc.health.v1 Check of the whole server ("")."""
    check = channel.unary_unary(
        HEALTH_CHECK,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    response: health_pb2.HealthCheckResponse = check(
        health_pb2.HealthCheckRequest(service=""), timeout=timeout_s
    )
    return int(response.status)


def health_watch(channel: grpc.Channel, timeout_s: float) -> HealthStream:
    """A grpc.health.v1 Watch stream of the whole server; iterate it for statuses."""
    watch = channel.unary_stream(
        HEALTH_WATCH,
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    stream: HealthStream = watch(health_pb2.HealthCheckRequest(service=""), timeout=timeout_s)
    return stream


class ServerProcess:
    """One ``manatee-grpc serve`` subprocess on 127.0.0.1 port 0; use as a context manager.

    ``start()`` returns once the log names the bound address and health says SERVING. Leaving
    the ``with`` block kills a process that is still running (a test that failed half-way).
    """

    def __init__(self, mms: str, extra_args: Sequence[str] = ()) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="manatee-proc-")
        self.log_path = Path(self._dir.name) / "server.log"
        self._log_file = self.log_path.open("w")
        self.args = [
            sys.executable,
            "-m",
            "manatee_grpc",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--mms",
            mms,
            "--launch-attempt-delays",
            FAST_ATTEMPT_DELAYS,
            "--mms-backoff-initial",
            "0.01",
            *extra_args,
        ]
        self.process: subprocess.Popen[bytes] | None = None
        self.address = ""
        self._final_log: str | None = None

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.address:
            self._fail_if_exited("before it listened")
            match = _LISTENING_RE.search(self.log())
            if match is not None:
                self.address = match.group(1)
            elif time.monotonic() > deadline:
                raise AssertionError(f"the server never said where it listens:\n{self.log()}")
            else:
                time.sleep(0.02)
        with grpc.insecure_channel(self.address) as channel:

            def serving() -> bool:
                self._fail_if_exited("before it was SERVING")
                try:
                    return health_check(channel) == health_pb2.HealthCheckResponse.SERVING
                except grpc.RpcError:
                    return False

            wait_until(serving, "the server is SERVING", START_TIMEOUT_S)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log(self) -> str:
        """Everything the server logged so far (kept after the ``with`` block ends)."""
        if self._final_log is not None:
            return self._final_log
        return self.log_path.read_text(errors="replace")

    def send_signal(self, signum: signal.Signals) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait_exit(self, timeout_s: float) -> int:
        """The exit code; fails the test (with the log) if the process outlives ``timeout_s``."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"the server did not exit within {timeout_s} s:\n{self.log()}"
            ) from None

    def _fail_if_exited(self, when: str) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"the server exited ({self.process.returncode}) {when}:\n{self.log()}"
            )

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log_file.close()
        self._final_log = self.log()
        self._dir.cleanup()


# --- resource sampling -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    elapsed_s: float  # since the sampler started
    threads: int
    fds: int
    rss_bytes: int


def read_sample(pid: int, elapsed_s: float) -> Sample:
    """Threads and VmRSS from /proc/PID/status, open fds from /proc/PID/fd."""
    fields: dict[str, str] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        fields[name] = value.strip()
    rss_kib = int(fields["VmRSS"].split()[0])
    return Sample(
        elapsed_s=elapsed_s,
        threads=int(fields["Threads"]),
        fds=len(os.listdir(f"/proc/{pid}/fd")),
        rss_bytes=rss_kib * 1024,
    )


@dataclass(frozen=True, slots=True)
class WindowMedians:
    threads: float
    fds: float
    rss_bytes: float
    samples: int


class ResourceSampler:
    """Samples a process every ``interval_s`` on a background thread until stopped."""

    def __init__(self, pid: int, interval_s: float) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._samples: list[Sample] = []
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="resource-sampler", daemon=True)

    def start(self) -> ResourceSampler:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> list[Sample]:
        self._stop.set()
        self._thread.join()
        with self._lock:
            return list(self._samples)

    def _run(self) -> None:
        # The period is the measurement's resolution, not a synchronisation.
        while True:
            sample = read_sample(self._pid, time.monotonic() - self._started)
            with self._lock:
                self._samples.append(sample)
            if self._stop.wait(self._interval_s):
                return


def window_medians(samples: Sequence[Sample], start_s: float, end_s: float) -> WindowMedians:
    """Medians of the samples taken in [start_s, end_s)."""
    inside = [s for s in samples if start_s <= s.elapsed_s < end_s]
    if not inside:
        raise AssertionError(f"no samples between {start_s:.1f} s and {end_s:.1f} s")
    return WindowMedians(
        threads=statistics.median(s.threads for s in inside),
        fds=statistics.median(s.fds for s in inside),
        rss_bytes=statistics.median(s.rss_bytes for s in inside),
        samples=len(inside),
    )
