"""An independent reference of upstream mms, for the differential tests of the simulator.

Written for the test suite from the rules of chromiumos platform2
``sirenia/src/manatee_memory_service.rs`` at commit 8449a154c8915f03382e677aa4dc7f8130c6483e (its
last version), in its own words, and sharing no code with ``manatee_grpc.sim``: if both read the
rules the same wrong way, the two would have to be wrong independently. Rust's unsigned and
two's complement arithmetic is spelled out (``u64``/``i64`` below) where a release build wraps.

Only the guest behind each balloon is the simulator's invention rather than upstream's: a guest
gives up at most ``mem - used`` to its balloon and always takes memory back; crosvm counts whole
pages. The reference plays the same guest so that short inflates can be compared too.
"""

from __future__ import annotations

from dataclasses import dataclass

PAGE = 4096
MIB = 1 << 20
I64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
EIO, ENOMEM, EINVAL = -5, -12, -22


def u64(value: int) -> int:
    return value % (1 << 64)


def i64(value: int) -> int:
    value = u64(value)
    return value - (1 << 64) if value > I64_MAX else value


def round_up_to_page(size: int) -> int:
    return (size + PAGE - 1) // PAGE * PAGE


def extra_bytes(mem_size: int) -> int:
    """calculate_extra_bytes: 7.2 MB/GB, plus 20 MB/GB for vvu mappings, plus 6 MiB for crosvm."""
    return (
        round_up_to_page(mem_size * 72 // 10240)
        + round_up_to_page(mem_size * 20 // 1024)
        + (6 * MIB)
    )


@dataclass
class Guest:
    """crosvm's balloon and the guest behind it (the simulator's guest, see the module doc)."""

    mem: int
    used: int
    size: int = 0

    def adjust(self, target: int) -> int:
        target -= target % PAGE
        if target > self.size:
            can_give = max(self.size, (self.mem - self.used) // PAGE * PAGE)
            self.size = min(target, can_give)
        else:
            self.size = target
        return self.size


@dataclass
class Client:
    """CrosVmClient: mms's idea of one balloon (CrOS: its own allocation included)."""

    guest: Guest
    mem: int
    balloon: int = 0
    internal: int = 0  # internal_balloon_allocation, CrOS only; kept as a signed number
    failing: bool = False  # every Adjust command to this crosvm fails

    def clamp(self, delta: int) -> int:
        """clamp_balloon_delta: keep the balloon in [0, mem]."""
        if delta > 0:
            new = min(self.balloon + delta, self.mem)
        else:
            new = max(self.balloon - min(abs(delta), I64_MAX), 0)
        return i64(new) - i64(self.balloon)

    def adjust(self, delta: int) -> int:
        """adjust_balloon: ask crosvm for a size; pessimistic if the command fails."""
        target = u64(self.balloon + delta) if delta > 0 else max(self.balloon - abs(delta), 0)
        if self.failing:
            if delta > 0:
                return 0
            self.balloon = target
            return delta
        actual = self.guest.adjust(target)
        change = i64(actual) - i64(self.balloon)
        self.balloon = actual
        return change


@dataclass
class Starting:
    """StartingVmState."""

    vm_id: int
    mem: int
    init: int
    reserved: int = 0
    failed: bool = False


def target_deltas(
    clients: dict[int, Client], deltas: list[tuple[int, int]]
) -> tuple[list[list[int]], list[list[int]]] | None:
    """calculate_target_deltas: validate, clamp, split by sign, trim to a zero sum."""
    seen: set[int] = set()
    total = 0
    inflates: list[list[int]] = []
    deflates: list[list[int]] = []
    for vm_id, delta in deltas:
        if delta % PAGE != 0 or vm_id in seen or vm_id not in clients:
            return None
        seen.add(vm_id)
        clamped = clients[vm_id].clamp(delta)
        total += clamped
        if clamped > 0:
            inflates.append([vm_id, clamped])
        elif clamped < 0:
            deflates.append([vm_id, clamped])
    if total != 0:
        for entry in inflates if total > 0 else deflates:
            new = clients[entry[0]].clamp(max(entry[1] - total, -(1 << 63)))
            total += new - entry[1]
            entry[1] = new
    return inflates, deflates


class UpstreamMms:
    """MmsState and the CtrlHandler's five answers, plus on_hangup and on_allocation_change."""

    def __init__(self, cros_mem: int, cros_used: int, allocation: int, sibling_used: int) -> None:
        self.sibling_used = sibling_used
        self.used_by_id: dict[int, int] = {0: cros_used}
        cros = Client(Guest(cros_mem, cros_used), cros_mem, internal=allocation)
        assert cros.adjust(allocation) == allocation, "mms would exit"
        self.clients: dict[int, Client] = {0: cros}
        self.starting: Starting | None = None
        self.next_id = 1
        self.connect_failures = 0
        self.socket_failures = 0
        self.failing_ids: set[int] = set()

    @property
    def cros(self) -> Client:
        return self.clients[0]

    def stats(self, ids: list[int]) -> list[tuple[int, int, int]]:
        """(id, balloon_actual, total_memory) of each known id, in request order."""
        answer = []
        for vm_id in ids:
            client = self.clients.get(vm_id)
            if client is None:
                continue
            answer.append(
                (
                    vm_id,
                    u64(client.guest.size - client.internal),
                    max(0, client.guest.mem - client.guest.size),
                )
            )
        return answer

    def rebalance(self, deltas: list[tuple[int, int]]) -> list[tuple[int, int]]:
        plan = target_deltas(self.clients, deltas)
        if plan is None:
            return [(vm_id, 0) for vm_id, _ in deltas]
        inflates, deflates = plan
        slack = 0
        answer = []
        for vm_id, delta in inflates:
            actual = self.clients[vm_id].adjust(delta)
            slack += actual
            answer.append((vm_id, actual))
        for vm_id, delta in deflates:
            actual = self.clients[vm_id].adjust(-min(abs(delta), slack))
            slack += actual
            answer.append((vm_id, actual))
        return answer  # a non-zero slack is only logged

    def prepare(self, mem: int, init: int) -> tuple[int, int, int]:
        if self.starting is not None:
            if (mem, init) != (self.starting.mem, self.starting.init) or self.starting.failed:
                return (EINVAL, 0, 0)
        else:
            if mem % PAGE or init % PAGE or init > mem or mem >= self.cros.mem:
                return (EINVAL, 0, 0)
            vm_id = self.next_id
            self.next_id += 1
            if self.socket_failures:  # creating /run/mms_control_<id>.sock failed: id spent
                self.socket_failures -= 1
                return (EIO, 0, 0)
            self.starting = Starting(vm_id, mem, init)
        starting = self.starting
        required = init + extra_bytes(mem)
        got = self.cros.adjust(i64(required - starting.reserved))
        starting.reserved = u64(starting.reserved + got)
        res = 0 if starting.reserved == required else ENOMEM
        return (res, starting.vm_id, u64(required - starting.reserved))

    def finish(self, vm_id: int) -> int:
        starting = self.starting
        if starting is None or starting.failed or starting.vm_id != vm_id:
            return EINVAL
        if starting.reserved != starting.init + extra_bytes(starting.mem):
            starting.failed = True
            return ENOMEM
        if self.connect_failures:
            self.connect_failures -= 1
            starting.failed = True
            return EIO
        used = self.used_by_id.get(vm_id, self.sibling_used)
        client = Client(Guest(starting.mem, used), starting.mem, failing=vm_id in self.failing_ids)
        balloon = starting.mem - starting.init
        if client.adjust(balloon) != balloon:
            starting.failed = True
            return ENOMEM
        self.clients[vm_id] = client
        self.starting = None
        return 0

    def footprint(self, client: Client) -> int:
        return client.mem - client.balloon + extra_bytes(client.mem)

    def remove(self, vm_id: int) -> int:
        if vm_id == 0:
            return EINVAL
        client = self.clients.pop(vm_id, None)
        if client is not None:
            released = self.footprint(client)
        elif self.starting is not None and self.starting.vm_id == vm_id:
            released = self.starting.reserved
            self.starting = None
        else:
            return EINVAL
        self.cros.adjust(-i64(released))
        return 0

    def hang_up(self) -> None:
        released = sum(i64(self.footprint(c)) for vm_id, c in self.clients.items() if vm_id)
        self.clients = {0: self.cros}
        if self.starting is not None:
            released += i64(self.starting.reserved)
            self.starting = None
        self.cros.adjust(-i64(released))

    def allocation_change(self, delta: int) -> int:
        actual = self.cros.adjust(delta)
        self.cros.internal += actual
        return actual

    def set_used(self, vm_id: int, used: int) -> None:
        self.used_by_id[vm_id] = used
        if vm_id in self.clients:
            self.clients[vm_id].guest.used = used

    def set_failing(self, vm_id: int, failing: bool) -> None:
        (self.failing_ids.add if failing else self.failing_ids.discard)(vm_id)
        if vm_id in self.clients:
            self.clients[vm_id].failing = failing
