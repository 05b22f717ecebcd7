"""The launcher of ``launch_service.py`` for asyncio, built on ``manatee_grpc.aio.Client``.

Its crosvm callbacks are coroutines, as a real one's would be (spawning crosvm with
``asyncio.create_subprocess_exec`` and waiting for its control socket), so a launch never blocks
the event loop. Run it against a server:

    python -m manatee_grpc serve &                          # embedded mms simulator
    python examples/launch_service_aio.py --server 127.0.0.1:50051 --mem-mib 512
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass, field

from manatee_grpc import ManateeRpcError, aio

MIB = 1024 * 1024


@dataclass
class FakeCrosvm:
    """Stands in for crosvm: remembers which VMs it was asked to start and stop."""

    started: dict[int, str] = field(default_factory=dict)
    stopped: list[int] = field(default_factory=list)

    async def start(self, vm_id: int, balloon_control_path: str) -> bool:
        print(f"start crosvm for VM {vm_id} with --balloon-control {balloon_control_path}")
        await asyncio.sleep(0)  # where a real launcher awaits crosvm's start
        self.started[vm_id] = balloon_control_path
        return True

    async def stop(self, vm_id: int) -> None:
        print(f"stop crosvm for VM {vm_id}")
        await asyncio.sleep(0)  # where a real launcher awaits crosvm's exit
        self.stopped.append(vm_id)


class LaunchService:
    """Launches and removes sibling VMs through manatee-grpc."""

    def __init__(self, client: aio.Client, crosvm: FakeCrosvm) -> None:
        self.client = client
        self.crosvm = crosvm

    async def launch(self, mem_size_bytes: int) -> int:
        vm = await self.client.launch_vm(
            mem_size_bytes,
            start_vm=self.crosvm.start,
            stop_vm=self.crosvm.stop,
            on_progress=lambda attempt, shortfall_bytes: print(
                f"attempt {attempt}: shortfall {shortfall_bytes // MIB} MiB"
            ),
            timeout_s=60.0,
        )
        print(f"VM {vm.vm_id} runs with {vm.mem_size_bytes // MIB} MiB")
        return vm.vm_id

    async def remove(self, vm_id: int) -> None:
        # mms returns the memory once crosvm has exited: stop the VM first.
        await self.crosvm.stop(vm_id)
        await self.client.remove_vm(vm_id)
        print(f"VM {vm_id} removed")


async def run(server: str, mem_size_bytes: int) -> int:
    async with aio.Client(server) as client:
        service = LaunchService(client, FakeCrosvm())
        try:
            vm_id = await service.launch(mem_size_bytes)
            listed = [vm.vm_id for vm in (await client.list_vms()).vms]
            print(f"VMs now: {listed}")
            await service.remove(vm_id)
        except ManateeRpcError as error:
            print(f"launch failed: {error}", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--mem-mib", type=int, default=512, help="VM memory (default %(default)s)")
    args = parser.parse_args()
    return asyncio.run(run(args.server, args.mem_mib * MIB))


if __name__ == "__main__":
    sys.exit(main())
