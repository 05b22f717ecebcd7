"""The one way back from the mms connection thread to the server's event loop.

Into the thread, the loop's only door is ``MmsConnection.submit`` (a request queue). Out of it,
the connection thread resolves ``concurrent.futures.Future``s, and a coroutine waits for one
through ``wake_on_done``: the future's done-callback completes a loop future by
``loop.call_soon_threadsafe`` (``call_soon_from_thread``), the model aiosqlite follows. The
stats reader uses ``call_soon_from_thread`` directly, once per read for all its callers (and
the window of the next read, if it is left gathering).

A coroutine that awaited the thread future through ``asyncio.wrap_future`` would, on
cancellation or timeout, cancel the thread future too; that is wrong for a coalesced stats
batch (other callers share it) and must be decided explicitly for a request that may already be
on the wire. So the loop only gets a *wake-up* future here, and the caller decides what to do
with the thread future.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from manatee_grpc.core._errors import DeadlineExceededError
from manatee_grpc.mms._messages import MessageType

R = TypeVar("R")


def call_soon_from_thread(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object
) -> None:
    """Hand ``callback(*args)`` to ``loop`` from another thread.

    A closed loop means the server has stopped: nobody is left to run it, and the thread
    handing it over (the connection thread) must not fail for that.
    """
    try:  # not contextlib.suppress: this runs once per mms answer, and try costs nothing
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def wake_on_done(future: Future[Any]) -> asyncio.Future[None]:
    """A loop future that completes (with None) once ``future`` is done; never cancels it."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    # One hand-off to the loop per completion. A future completed inline (refused at submit)
    # completes on the loop itself: no hand-off.
    if future.done():
        waiter.set_result(None)
    else:
        future.add_done_callback(lambda _: call_soon_from_thread(loop, _wake, waiter))
    return waiter


async def wait_done(future: Future[Any], timeout_s: float | None) -> bool:
    """Wait until ``future`` is done or ``timeout_s`` passes; True if it is done.

    Cancelling the caller cancels only its wait, never ``future``.
    """
    if future.done():
        return True
    waiter = wake_on_done(future)
    if timeout_s is None:
        await waiter
        return True
    loop = asyncio.get_running_loop()
    expiry = loop.call_later(timeout_s, _wake, waiter)
    try:
        await waiter
    finally:
        expiry.cancel()
    return future.done()


async def await_mms(future: Future[R], timeout_s: float | None, msg_type: MessageType) -> R:
    """An mms answer within ``timeout_s``. A request still queued is cancelled (never sent) if
    the deadline passes or the caller is cancelled; one on the wire runs to completion."""
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
