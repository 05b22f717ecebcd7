"""The server's thread count stays flat under waiting work: everything above the mms thread
waits on the one event loop (issue 13).

The load comes from another process, so every thread counted here is the server's (and the
embedded simulator's, which is the same before and after). mms is paused while it is opened,
so every call really waits: 20 bare PrepareVm callers for mms's one start (whose lease starts
when mms answers), 12 LaunchVm streams queued behind that start, and 30 watchers of 30
distinct intervals whose reads wait on mms. Then mms answers: the 20 PrepareVm callers get the
one leased start, the 12 launches stay queued behind its lease, the 30 watchers tick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from api.helpers import simulator, wait_until
from api.test_prepare_races import mms_paused

from manatee_grpc import ManateeServer

CHILD = Path(__file__).with_name("open_everything.py")
WAIT_S = 20.0
# gRPC's core (C) threads are not Python threads; its pollers may add a few under load. The
# Python threads (the loop, the mms thread, the simulator's, metrics when served) must not grow.
NATIVE_SLACK = 6


def _native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_threads_stay_flat_with_30_watchers_12_launches_and_20_prepares_waiting(
    server: ManateeServer,
) -> None:
    sim = simulator(server)
    with mms_paused(sim):
        python_before = {t.ident for t in threading.enumerate()}
        native_before = _native_threads()
        child = subprocess.Popen(
            [sys.executable, str(CHILD), server.address],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "prepares"
            slot = server.bridge.slot
            wait_until(
                lambda: slot.claim is not None and slot.claim.prepares_in_flight == 20,
                "20 PrepareVm calls wait on mms",
                timeout_s=WAIT_S,
            )
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "open"
            wait_until(lambda: slot.launches_waiting() == 12, "12 launches queue", WAIT_S)
            wait_until(
                lambda: server.watch_hub.watcher_count() == 30, "30 watchers subscribe", WAIT_S
            )
            python_while = {t.ident for t in threading.enumerate()}
            native_while = _native_threads()
            added = [
                t.name for t in threading.enumerate() if t.ident in python_while - python_before
            ]
            assert added == [], f"{len(added)} threads more: {sorted(added)}"
            assert native_while <= native_before + NATIVE_SLACK
        except BaseException:
            child.kill()
            child.wait(WAIT_S)
            for pipe in (child.stdin, child.stdout):
                if pipe is not None:
                    pipe.close()
            raise
    try:
        # mms answers: one start, leased, shared by the 20 callers; the launches wait on it.
        wait_until(
            lambda: slot.claim is not None and slot.claim.lease_expire_unix_s is not None,
            "the start is leased",
            timeout_s=WAIT_S,
        )
        wait_until(lambda: server.watch_hub.polls() >= 30, "the watchers are polled", WAIT_S)
        assert slot.launches_waiting() == 12
        assert {t.ident for t in threading.enumerate()} - python_before == set()
        assert _native_threads() <= native_before + NATIVE_SLACK
    finally:
        child.kill()
        child.wait(WAIT_S)
        for pipe in (child.stdin, child.stdout):
            if pipe is not None:
                pipe.close()
