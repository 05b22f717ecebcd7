"""Lazy package exports, shared by the layer packages' ``__init__``s (standard library only, so
any layer may use it).

A name's module is imported on its first use, so importing one module of a package does not load
the others (a client importing ``manatee_grpc.client`` loads no server, simulator or metrics).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(
    package: str, namespace: dict[str, Any], exports: Mapping[str, str]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: each name of ``exports`` is taken from its
    module on first use, then kept in ``namespace`` (the package's globals)."""

    def getattr_(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return getattr_
