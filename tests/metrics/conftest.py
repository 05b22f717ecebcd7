"""A server with its metrics endpoint on port 0, and a scrape that parses like Prometheus does."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from api.conftest import start_server
from prometheus_client.parser import text_string_to_metric_families

from manatee_grpc import ManateeServer
from manatee_grpc import memory_service_pb2_grpc as pb_grpc
from manatee_grpc.sim import Simulator

Labels = frozenset[tuple[str, str]]


@dataclass(frozen=True)
class Scrape:
    """Every sample of one scrape, by sample name (``_total``, ``_count``, ... included)."""

    samples: dict[str, dict[Labels, float]]

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get(name, {}).get(frozenset(labels.items()))

    def label_values(self, name: str, label: str) -> set[str]:
        return {dict(key)[label] for key in self.samples.get(name, {})}

    def __str__(self) -> str:
        # Buckets and creation times would bury the values a failing test is about.
        return "; ".join(
            f"{name}{dict(labels) or ''}={value:g}"
            for name, series in self.samples.items()
            if not name.endswith(("_bucket", "_created"))
            for labels, value in series.items()
        )


def scrape(address: str) -> Scrape:
    """GET http://ADDRESS/metrics over a real socket and parse it with prometheus_client."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5.0) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return Scrape(samples)


def scrape_until(
    address: str, holds: Callable[[Scrape], bool], what: str, timeout_s: float = 5.0
) -> Scrape:
    """Scrape until ``holds`` (a condition wait with a deadline); returns the scrape that held."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = scrape(address)
        if holds(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout_s} s: {what}; last scrape: {current}")
        time.sleep(0.005)


def metrics_address(server: ManateeServer) -> str:
    assert server.metrics_address is not None, "the server serves no metrics"
    return server.metrics_address


def simulator(server: ManateeServer) -> Simulator:
    assert server.simulator is not None, "these tests need the embedded simulator"
    return server.simulator


@pytest.fixture
def server() -> Iterator[ManateeServer]:
    server = start_server(metrics_listen="127.0.0.1:0")
    yield server
    server.stop(grace_s=1.0)


@pytest.fixture
def stub(server: ManateeServer) -> Iterator[pb_grpc.MemoryServiceStub]:
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.MemoryServiceStub(channel)
