"""Typed mms messages: the five requests and their responses, as plain frozen dataclasses (and
one NamedTuple, see BalloonStats).

These are the only objects that cross between the wire codec, the connection thread, the
simulator and the gRPC layer. Field names carry units; ``res`` keeps mms's negative-errno form.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Generic, NamedTuple, TypeVar

# mms answers -errno in "res"; these are the only values it uses.
RES_OK = 0
RES_EIO = -5
RES_ENOMEM = -12
RES_EINVAL = -22

CROS_GUEST_VM_ID = 0
U32_MAX = 2**32 - 1


class MessageType(enum.IntEnum):
    """The ``type`` field of the frame header; a response echoes its request's type."""

    GET_BALLOON_STATS = 1
    REBALANCE_MEMORY = 2
    PREPARE_VM = 3
    FINISH_ADD_VM = 4
    REMOVE_VM = 5


class BalloonStats(NamedTuple):
    """crosvm's BalloonStats; ``None`` means the guest did not report that field.

    A NamedTuple rather than a frozen dataclass like the rest: every stats answer builds one per
    VM on the connection thread, and a tuple is built several times faster.
    """

    swap_in: int | None = None
    swap_out: int | None = None
    major_faults: int | None = None
    minor_faults: int | None = None
    free_memory: int | None = None
    total_memory: int | None = None
    available_memory: int | None = None
    disk_caches: int | None = None
    hugetlb_allocations: int | None = None
    hugetlb_failures: int | None = None
    shared_memory: int | None = None
    unevictable_memory: int | None = None


# The JSON keys of crosvm's BalloonStats, in crosvm's order (also the dataclass field names).
BALLOON_STAT_FIELDS: tuple[str, ...] = BalloonStats._fields


@dataclass(frozen=True, slots=True)
class VmBalloonStats:
    vm_id: int
    stats: BalloonStats
    balloon_actual_bytes: int


class UnreadableReason(enum.Enum):
    """Why one VM's entry in a GetBalloonStats answer cannot be believed.

    mms passes crosvm's numbers through unchecked and computes the CrOS guest's balloon with an
    unsigned subtraction, so one VM's entry can hold a value no memory size can have; the
    other entries of the same answer are still good.
    """

    WRAPPED = "wrapped"  # in [2^63, 2^64): a u64 that went below 0 (2^64 - x)
    TOO_LARGE = "too_large"  # above 2^53 (and not wrapped): more bytes than any machine has
    NEGATIVE = "negative"
    NOT_AN_INTEGER = "not_an_integer"  # a float, string, bool, array or object
    MISSING = "missing"  # balloon_actual or stats absent or null
    NOT_AN_OBJECT = "not_an_object"  # stats is not a JSON object


@dataclass(frozen=True, slots=True)
class UnreadableVm:
    """A VM mms answered for with an impossible value; its statistics are left out."""

    vm_id: int
    reason: UnreadableReason
    mms_field: str  # where, as mms names it: "balloon_actual", "stats", "stats.free_memory"
    mms_value: str  # the value as mms sent it, shortened, for logs


@dataclass(frozen=True, slots=True)
class BalloonDelta:
    """A balloon delta: positive inflates (takes memory from the VM), negative deflates."""

    vm_id: int
    delta_bytes: int


# --- responses --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GetBalloonStatsResponse:
    all_stats: tuple[VmBalloonStats, ...]
    # Entries whose numbers are impossible: not in ``all_stats``, the rest of the answer stands.
    unreadable: tuple[UnreadableVm, ...] = ()


@dataclass(frozen=True, slots=True)
class RebalanceMemoryResponse:
    actual_deltas: tuple[BalloonDelta, ...]


@dataclass(frozen=True, slots=True)
class PrepareVmResponse:
    res: int
    vm_id: int
    shortfall_bytes: int


@dataclass(frozen=True, slots=True)
class FinishAddVmResponse:
    res: int


@dataclass(frozen=True, slots=True)
class RemoveVmResponse:
    res: int


Response = (
    GetBalloonStatsResponse
    | RebalanceMemoryResponse
    | PrepareVmResponse
    | FinishAddVmResponse
    | RemoveVmResponse
)
ResponseT_co = TypeVar("ResponseT_co", bound=Response, covariant=True)


# --- requests ---------------------------------------------------------------------------------


class MmsRequest(Generic[ResponseT_co]):
    """Base of the five requests; ``TYPE`` is the frame type, the type parameter the response."""

    TYPE: ClassVar[MessageType]
    __slots__ = ()


@dataclass(frozen=True, slots=True)
class GetBalloonStatsRequest(MmsRequest[GetBalloonStatsResponse]):
    TYPE: ClassVar[MessageType] = MessageType.GET_BALLOON_STATS
    vm_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class RebalanceMemoryRequest(MmsRequest[RebalanceMemoryResponse]):
    TYPE: ClassVar[MessageType] = MessageType.REBALANCE_MEMORY
    deltas: tuple[BalloonDelta, ...]


@dataclass(frozen=True, slots=True)
class PrepareVmRequest(MmsRequest[PrepareVmResponse]):
    TYPE: ClassVar[MessageType] = MessageType.PREPARE_VM
    mem_size_bytes: int
    init_mem_size_bytes: int


@dataclass(frozen=True, slots=True)
class FinishAddVmRequest(MmsRequest[FinishAddVmResponse]):
    TYPE: ClassVar[MessageType] = MessageType.FINISH_ADD_VM
    vm_id: int


@dataclass(frozen=True, slots=True)
class RemoveVmRequest(MmsRequest[RemoveVmResponse]):
    TYPE: ClassVar[MessageType] = MessageType.REMOVE_VM
    vm_id: int


Request = (
    GetBalloonStatsRequest
    | RebalanceMemoryRequest
    | PrepareVmRequest
    | FinishAddVmRequest
    | RemoveVmRequest
)
