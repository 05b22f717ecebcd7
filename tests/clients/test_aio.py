"""What only the asyncio client has to show: callbacks that are coroutine functions, a launch
whose task is cancelled, and a watch left early through ``contextlib.aclosing``.
``test_table.py`` runs every call through it, ``test_both.py`` the scenarios both share."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from api.helpers import simulator, wait_until

from manatee_grpc import ManateeRpcError, ManateeServer, aio
from manatee_grpc import memory_service_pb2 as pb

from . import drivers

MIB = 1024 * 1024
HUGE_BYTES = 7 * 1024 * MIB  # more than the simulated CrOS guest can ever give
LAUNCH_TIMEOUT_S = 30.0


def _vm_ids(server: ManateeServer) -> list[int]:
    listed = drivers.call("sync", server.address, "list_vms")
    return [vm.vm_id for vm in listed.vms]


def test_launch_vm_awaits_callbacks_that_are_coroutine_functions(server: ManateeServer) -> None:
    heard: list[tuple[object, ...]] = []

    async def start_vm(vm_id: int, balloon_control_path: str) -> bool:
        await asyncio.sleep(0)  # a coroutine that really suspends, as spawning crosvm would
        heard.append(("start_vm", vm_id))
        return True

    async def stop_vm(vm_id: int) -> None:
        await asyncio.sleep(0)
        heard.append(("stop_vm", vm_id))

    async def on_progress(attempt: int, shortfall_bytes: int) -> None:
        await asyncio.sleep(0)
        heard.append(("progress", attempt))

    async def scenario() -> tuple[pb.VmInfo, ManateeRpcError, ManateeRpcError]:
        async with aio.Client(server.address) as client:
            launched = await client.launch_vm(
                512 * MIB, start_vm=start_vm, stop_vm=stop_vm, timeout_s=LAUNCH_TIMEOUT_S
            )
            with pytest.raises(ManateeRpcError) as too_large:
                await client.launch_vm(
                    HUGE_BYTES,
                    init_mem_size_bytes=HUGE_BYTES,
                    start_vm=start_vm,
                    stop_vm=stop_vm,
                    on_progress=on_progress,
                    timeout_s=LAUNCH_TIMEOUT_S,
                )
            # FinishAddVm answers -5 (crosvm never connected) after a short wait, not mms's 10 s.
            simulator(server).set_crosvm_connect_timeout(0.05)
            simulator(server).fail_crosvm_connect()
            with pytest.raises(ManateeRpcError) as never_connected:
                await client.launch_vm(
                    512 * MIB, start_vm=start_vm, stop_vm=stop_vm, timeout_s=LAUNCH_TIMEOUT_S
                )
        return launched, too_large.value, never_connected.value

    launched, too_large, never_connected = asyncio.run(scenario())

    assert (launched.vm_id, launched.state) == (1, pb.VM_STATE_RUNNING)
    assert (too_large.code, too_large.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "MMS_ENOMEM")
    assert (never_connected.code, never_connected.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "MMS_EIO",
    )
    # Each reservation attempt that fell short used up a VM id, so the third launch's is later.
    third_vm_id = heard[-1][1]
    assert heard == [
        ("start_vm", 1),
        *[("progress", attempt) for attempt in range(1, 6)],
        ("start_vm", third_vm_id),
        ("stop_vm", third_vm_id),
    ]


def test_launch_vm_awaits_on_queued_while_another_start_is_pending(server: ManateeServer) -> None:
    async def scenario() -> tuple[list[int], pb.VmInfo, int]:
        queued: list[int] = []
        told = asyncio.Event()

        async def on_queued(position: int) -> None:
            await asyncio.sleep(0)  # a coroutine callback that really suspends
            queued.append(position)
            told.set()

        async with aio.Client(server.address) as client:
            held = await client.prepare_vm(512 * MIB)  # holds the device's one pending start
            task = asyncio.create_task(
                client.launch_vm(
                    512 * MIB,
                    start_vm=lambda vm_id, path: True,
                    stop_vm=lambda vm_id: None,
                    on_queued=on_queued,
                    timeout_s=LAUNCH_TIMEOUT_S,
                )
            )
            await asyncio.wait_for(told.wait(), LAUNCH_TIMEOUT_S)
            assert not task.done()
            await client.finish_add_vm(held.vm_id)  # frees the start: the launch goes on
            return queued, await task, held.vm_id

    queued, launched, held_vm_id = asyncio.run(scenario())
    assert queued == [1]
    assert launched.vm_id == held_vm_id + 1


def test_cancelling_the_task_running_launch_vm_releases_the_launch(server: ManateeServer) -> None:
    async def scenario() -> None:
        reserved = asyncio.Event()

        async def start_vm(vm_id: int, balloon_control_path: str) -> bool:
            reserved.set()
            await asyncio.Event().wait()  # crosvm that never comes up
            return True

        async with aio.Client(server.address) as client:
            task = asyncio.create_task(
                client.launch_vm(512 * MIB, start_vm=start_vm, stop_vm=lambda vm_id: None)
            )
            await reserved.wait()
            assert [vm.vm_id for vm in (await client.list_vms()).vms] == [0, 1]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())

    wait_until(lambda: _vm_ids(server) == [0], "the cancelled launch's reservation is released")
    # The one pending start is free: the next launch gets it.
    launched = drivers.call(
        "aio",
        server.address,
        "launch_vm",
        (512 * MIB,),
        {"start_vm": lambda vm_id, path: True, "stop_vm": lambda vm_id: None},
    )
    assert launched.vm_id == 2


def test_a_watch_is_an_async_iterator_that_aclosing_ends(server: ManateeServer) -> None:
    async def scenario() -> list[str]:
        events: list[str] = []
        async with aio.Client(server.address) as client:
            watch = client.watch_balloon_stats([0], interval_s=0.1)
            async with contextlib.aclosing(watch):
                async for event in watch:
                    events.append(str(event.WhichOneof("event")))
                    if len(events) == 2:
                        break
            # Closed: its call was cancelled and the iterator is finished.
            with pytest.raises(StopAsyncIteration):
                await anext(watch)
            # The client goes on serving calls after a watch ended.
            assert (await client.list_vms()).session != ""
        return events

    events = asyncio.run(scenario())

    assert events == ["snapshot", "snapshot"]


def test_watch_events_is_an_async_iterator_of_the_replay_then_caught_up(
    server: ManateeServer,
) -> None:
    async def scenario() -> list[str | None]:
        async with aio.Client(server.address) as client:
            with pytest.raises(ManateeRpcError):
                await client.remove_vm(42)  # one REMOVE_VM event (refused, still recorded)
            updates: list[str | None] = []
            watch = client.watch_events(replay_last=10, kinds=[pb.EVENT_KIND_REMOVE_VM])
            async with contextlib.aclosing(watch):
                async for message in watch:
                    updates.append(message.WhichOneof("update"))
                    if updates[-1] == "caught_up":
                        break
            return updates

    assert asyncio.run(scenario()) == ["event", "caught_up"]
