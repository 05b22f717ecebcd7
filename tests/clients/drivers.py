"""One call through either client: ``manatee_grpc.Client`` (sync) or ``manatee_grpc.aio.Client``.

A call gets a client of its own, opened and closed around it (the asyncio one inside its own
``asyncio.run``: a grpc.aio channel belongs to one event loop). A streaming method's result is
the list of its first ``take`` events, read through the client's own iterator, which is then
closed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from manatee_grpc import Client, aio

Flavour = Literal["sync", "aio"]
FLAVOURS: tuple[Flavour, ...] = ("sync", "aio")

STREAMS = frozenset({"watch_balloon_stats", "watch_events"})


def call(
    flavour: Flavour,
    target: str,
    method: str,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    client_kwargs: Mapping[str, Any] | None = None,
    take: int = 1,
) -> Any:
    """``method(*args, **kwargs)`` on a new ``flavour`` client of ``target``: its result, or
    whatever it raised."""
    if flavour == "sync":
        with Client(target, **(client_kwargs or {})) as client:
            return _sync_call(client, method, args, kwargs or {}, take)
    return asyncio.run(
        _aio_call(target, method, args, kwargs or {}, client_kwargs=client_kwargs or {}, take=take)
    )


def _sync_call(
    client: Client, method: str, args: Sequence[Any], kwargs: Mapping[str, Any], take: int
) -> Any:
    result = getattr(client, method)(*args, **kwargs)
    if method not in STREAMS:
        return result
    try:
        return list(itertools.islice(result, take))
    finally:
        result.close()


async def _aio_call(
    target: str,
    method: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    *,
    client_kwargs: Mapping[str, Any],
    take: int,
) -> Any:
    async with aio.Client(target, **client_kwargs) as client:
        if method not in STREAMS:
            return await getattr(client, method)(*args, **kwargs)
        stream = getattr(client, method)(*args, **kwargs)
        try:
            return [await anext(stream) for _ in range(take)]
        finally:
            await stream.aclose()
