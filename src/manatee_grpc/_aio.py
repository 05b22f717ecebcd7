"""Waiting on the mms connection thread from the gRPC event loop.

The connection thread resolves ``concurrent.futures.Future``s. A coroutine that awaited one
through ``asyncio.wrap_future`` would, on cancellation or timeout, cancel the thread future too;
that is wrong for a coalesced stats batch (other callers share it) and must be decided
explicitly for a request that may already be on the wire. So the loop only gets a *wake-up*
future here, and the caller decides what to do with the thread future.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from ._errors import DeadlineExceededError
from ._messages import MessageType

R = TypeVar("R")


def call_soon_from_thread(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object
) -> None:
    """Hand ``callback(*args)`` to ``loop`` from another thread.

    A closed loop means the server has stopped: nobody is left to run it, and the thread
    handing it over (the connection thread, a launch, a watch ticker) must not fail for that.
    """
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def has_ready_work(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop`` has callbacks queued to run besides the one asking (a busy loop).

    asyncio has no public API for this; its event loops keep the queue in ``_ready``. A loop
    without one (another implementation) counts as idle, which only means no waiting.
    """
    return bool(getattr(loop, "_ready", None))


def wake(waiter: asyncio.Future[None]) -> None:
    """Complete a wake-up future (on its loop); a second wake is a no-op."""
    if not waiter.done():
        waiter.set_result(None)


def wake_all(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        wake(waiter)


def wake_soon(waiter: asyncio.Future[None]) -> None:
    """Complete ``waiter`` from any thread: directly on its loop, else by a loop hand-off."""
    loop = waiter.get_loop()
    try:
        on_loop = asyncio.get_running_loop() is loop
    except RuntimeError:
        on_loop = False
    if on_loop:
        wake(waiter)
    else:
        call_soon_from_thread(loop, wake, waiter)


def wake_on_done(future: Future[Any]) -> asyncio.Future[None]:
    """A loop future that completes (with None) once ``future`` is done; never cancels it."""
    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # One hand-off to the loop per completion; an inline completion (already done) costs none.
    future.add_done_callback(lambda _: wake_soon(waiter))
    return waiter


async def wait_done(future: Future[Any], timeout_s: float | None) -> bool:
    """Wait until ``future`` is done or ``timeout_s`` passes; True if it is done."""
    if future.done():
        return True
    waiter = wake_on_done(future)
    try:
        await asyncio.wait_for(waiter, timeout_s)
    except TimeoutError:
        return future.done()
    return True


async def await_mms(future: Future[R], timeout_s: float | None, msg_type: MessageType) -> R:
    """Like ``_bridge.await_call`` for the loop: a queued request is cancelled (never sent) if
    the caller's deadline passes or the caller cancels; one on the wire runs to completion."""
    try:
        done = await wait_done(future, timeout_s)
    except asyncio.CancelledError:
        future.cancel()  # the caller left: keep it off the wire if it is still queued
        raise
    if done:
        return future.result()
    sent = not future.cancel()
    suffix = " (the request was sent and will complete)" if sent else " (never sent)"
    raise DeadlineExceededError(
        f"deadline passed waiting for mms {msg_type.name}{suffix}",
        messageType=msg_type.name,
        reached_mms=sent,
    )
