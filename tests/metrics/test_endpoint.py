"""The endpoint itself: off by default, private per server, stoppable, and the serve flag."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from api.conftest import start_server

from manatee_grpc import ManateeServer, ServerConfig, cli
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.server._listen import ListenError
from manatee_grpc.server._metrics import Metrics, MetricsAddressError, parse_listen

from .conftest import metrics_address, scrape, scrape_until


def test_off_by_default() -> None:
    server = start_server()
    try:
        assert server.config.metrics_listen is None
        assert server.metrics_address is None
    finally:
        server.stop(grace_s=1.0)


def test_stop_closes_the_endpoint() -> None:
    server = start_server(metrics_listen="127.0.0.1:0")
    address = metrics_address(server)
    assert scrape(address).value("manatee_mms_connected") == 1
    server.stop(grace_s=1.0)
    with pytest.raises(urllib.error.URLError):
        scrape(address)


def test_observe_rpc_on_private_registries() -> None:
    """Two servers in one process never see each other's series."""
    counted, other = Metrics(), Metrics()
    try:
        counted_address = counted.serve("127.0.0.1:0")
        other_address = other.serve("127.0.0.1:0")
        counted.observe_rpc("GetBalloonStats", grpc.StatusCode.OK, 0.002)
        counted.observe_rpc("GetBalloonStats", grpc.StatusCode.OK, 0.3)
        # A full method path lands in the same series as the bare name.
        counted.observe_rpc(
            "/manatee.memory.v1.MemoryService/RemoveVm", grpc.StatusCode.NOT_FOUND, 0.001
        )

        current = scrape(counted_address)
        handled = "manatee_grpc_server_handled_total"
        assert current.value(handled, grpc_method="GetBalloonStats", grpc_code="OK") == 2
        assert current.value(handled, grpc_method="RemoveVm", grpc_code="NOT_FOUND") == 1
        stats = {"grpc_method": "GetBalloonStats"}
        seconds = "manatee_grpc_server_handling_seconds"
        assert current.value(f"{seconds}_count", **stats) == 2
        assert current.value(f"{seconds}_sum", **stats) == pytest.approx(0.302)
        assert current.value(f"{seconds}_bucket", le="0.0025", **stats) == 1
        assert current.value(f"{seconds}_bucket", le="0.5", **stats) == 2

        assert handled not in scrape(other_address).samples
    finally:
        counted.close()
        other.close()


def test_a_busy_metrics_port_fails_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = ManateeServer(
            ServerConfig(listen="127.0.0.1:0", metrics_listen=f"127.0.0.1:{port}")
        )
        with pytest.raises(ListenError, match=f"--metrics-listen 127.0.0.1:{port}: cannot bind"):
            server.start()
    assert server.simulator is None  # refused before the embedded simulator started


@pytest.mark.parametrize(
    ("listen", "expected"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("[::1]:9464", ("::1", 9464)), ("host:80", ("host", 80))],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", ":9464", "host:", "host:x", "host:70000"])
def test_parse_listen_refuses(listen: str) -> None:
    with pytest.raises(MetricsAddressError, match="expected HOST:PORT"):
        parse_listen(listen)


def _serve(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "manatee_grpc", "serve", "--listen", "127.0.0.1:0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


@pytest.fixture
def served() -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    process = _serve("--metrics-listen", "127.0.0.1:0", "--grace", "1")
    lines: queue.Queue[str] = queue.Queue()
    assert process.stderr is not None
    stderr = process.stderr

    def pump() -> None:
        for line in stderr:
            lines.put(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        yield process, lines
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(30)
        reader.join(5)
        assert process.stdout is not None
        process.stdout.close()
        stderr.close()


def test_serve_logs_the_metrics_address_and_serves_it(
    served: tuple[subprocess.Popen[str], queue.Queue[str]],
) -> None:
    process, lines = served
    deadline = time.monotonic() + 20.0
    seen: list[str] = []
    while (match := _metrics_line(seen)) is None:
        assert process.poll() is None, "".join(seen)
        remaining_s = deadline - time.monotonic()
        assert remaining_s > 0, f"no metrics address logged: {''.join(seen)}"
        try:
            seen.append(lines.get(timeout=remaining_s))
        except queue.Empty:
            pass
    address = match.group(1)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address) and not address.endswith(":0")

    scrape_until(address, lambda s: s.value("manatee_mms_connected") == 1, "mms connected")

    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def _metrics_line(lines: list[str]) -> re.Match[str] | None:
    for line in lines:
        if match := re.search(r"metrics on http://(\S+)/metrics", line):
            return match
    return None


def test_bad_metrics_listen_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "nope"])
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    assert "argument --metrics-listen: metrics address 'nope': expected HOST:PORT" in stderr


def test_readme_lists_exactly_the_series_served(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("### Metrics", 1)[1].split("\n#", 1)[0]
    documented = {
        name
        for row in section.splitlines()
        if row.startswith("| `")
        for name in re.findall(r"`(manatee_\w+)`", row.split("|")[1])
    }

    # With an audit file: its failure counter is served only then.
    server = start_server(metrics_listen="127.0.0.1:0", audit_file=str(tmp_path / "audit.jsonl"))
    try:
        # Every labelled series present at least once: an RPC, an mms read with a VM in it.
        server.metrics.observe_rpc("ListVms", grpc.StatusCode.OK, 0.001)
        stub = pb_grpc.MemoryServiceStub(grpc.insecure_channel(server.address))
        stub.GetBalloonStats(pb.GetBalloonStatsRequest(vm_ids=[0]), timeout=5.0)
        served = {
            re.sub(r"_(bucket|count|sum)$", "", name)
            for name in scrape(metrics_address(server)).samples
            if not name.endswith("_created")
        }
    finally:
        server.stop(grace_s=1.0)
    assert documented == served
