"""The layers hold at run time: a process that imports only the client loads neither the
server, nor the domain, nor the mms layer, nor the simulator, nor prometheus; and the public
names of the package are the curated ``__all__``, each reachable."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

import manatee_grpc

HEAVY_PACKAGES = (
    "manatee_grpc.server",
    "manatee_grpc.core",
    "manatee_grpc.mms",
    "manatee_grpc.sim",
    "manatee_grpc.cli",
    "prometheus_client",
)


def _modules_after(statement: str) -> list[str]:
    code = f"{statement}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules: list[str] = json.loads(done.stdout)
    return modules


def _heavy(modules: list[str]) -> list[str]:
    return [
        name
        for name in modules
        if any(name == package or name.startswith(f"{package}.") for package in HEAVY_PACKAGES)
    ]


def test_importing_the_client_loads_no_server_simulator_domain_or_metrics_module() -> None:
    modules = _modules_after("import manatee_grpc.client")
    assert "manatee_grpc.client" in modules
    assert _heavy(modules) == []


def test_importing_the_asyncio_client_loads_no_server_simulator_domain_or_metrics_module() -> None:
    modules = _modules_after("import manatee_grpc.aio")
    assert "manatee_grpc.aio" in modules
    assert _heavy(modules) == []


def test_the_client_from_the_package_root_stays_light_too() -> None:
    modules = _modules_after("from manatee_grpc import Client, ManateeRpcError")
    assert _heavy(modules) == []
    modules = _modules_after("from manatee_grpc import aio; aio.Client")
    assert "manatee_grpc.aio" in modules
    assert _heavy(modules) == []


def test_every_public_name_resolves() -> None:
    assert sorted(manatee_grpc.__all__) == [
        "Client",
        "FieldViolation",
        "ManateeRpcError",
        "ManateeServer",
        "SERVICE_NAME",
        "ServerConfig",
        "__version__",
        "aio",
        "create_server",
        "memory_service_pb2",
        "memory_service_pb2_grpc",
    ]
    for name in manatee_grpc.__all__:
        assert getattr(manatee_grpc, name) is not None
    assert manatee_grpc.SERVICE_NAME == "manatee.memory.v1.MemoryService"
    assert manatee_grpc.memory_service_pb2.DESCRIPTOR.package == "manatee.memory.v1"
    assert manatee_grpc.aio.__name__ == "manatee_grpc.aio"


@pytest.mark.parametrize("layer", ["mms", "core", "server", "cli", "sim"])
def test_each_layer_says_what_lives_there_and_what_it_may_import(layer: str) -> None:
    package = importlib.import_module(f"manatee_grpc.{layer}")
    assert package.__doc__ is not None and "May import:" in package.__doc__
    assert package.__all__, f"manatee_grpc.{layer} curates no public names"
    for name in package.__all__:
        assert getattr(package, name) is not None, f"manatee_grpc.{layer}.{name} does not resolve"
