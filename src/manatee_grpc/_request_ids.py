"""Request ids (AIP-155): a repeated request_id gets the first call's answer, sent once.

A caller whose RebalanceMemory or PrepareVm failed after reaching mms (its deadline passed, the
answer was lost on the way back) cannot tell whether mms acted; retrying it blindly would apply
the deltas twice. With a request_id the retry is safe: the server remembers, per method and per
mms session, the outcome of each id and hands it to every repeat.

An entry is a future of the outcome, created when the first call is queued for mms: a repeat
that comes while the first is still in flight waits for the same answer. A first call that was
never reached mms (cancelled while queued, refused "not sent") leaves no outcome: its entry is
dropped, so a repeat runs the request afresh. All entries are forgotten when the session changes
(the VM ids they speak of mean nothing in the next one).

Bounds. An entry whose outcome is pending is never dropped (a repeat would send it again), and a
settled one is kept for ``ttl_s`` after it settled (a retry within that time must find it). So
the count bound cannot evict anything: when ``capacity`` entries are held, a new id is refused
(RESOURCE_EXHAUSTED, REQUEST_IDS_FULL, with RetryInfo) rather than a remembered one forgotten;
repeats of held ids are still answered. The capacity is sized for the rate x TTL a device sees.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from ._errors import InvalidArgumentError, RequestIdsFullError

MAX_REQUEST_ID_CHARS = 64
# 13 new ids a second sustained for the whole TTL; an entry is about 2.5 KiB (~20 MiB when full).
DEFAULT_CAPACITY = 8192
DEFAULT_TTL_S = 600.0

T = TypeVar("T")


def validate_request_id(request_id: str, field: str = "request_id") -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgumentError(
            field, f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )
    if not request_id.isprintable():
        raise InvalidArgumentError(field, "must be printable text (a UUID is recommended)")
    return request_id


class Outcome(Future[T]):
    """The shared outcome of one request id; ``request`` is the first call's mms request."""

    def __init__(self) -> None:
        super().__init__()
        # Set once the first call has queued its request: how far it got says whether a repeat
        # that gives up waiting saw its request reach mms.
        self.request: Future[Any] | None = None


@dataclass(slots=True, eq=False)
class _Entry:
    fingerprint: Hashable
    outcome: Outcome[Any]


class RequestIds:
    """Outcomes of recent requests by (method, request_id) in one session; thread-safe."""

    def __init__(
        self,
        capacity: int = DEFAULT_CAPACITY,
        ttl_s: float = DEFAULT_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._ttl_s = ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._session = 0
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Settled entries in the order they settled, with when each may go: the only ones that
        # ever expire (a pending one is pinned until it settles).
        self._expiries: collections.deque[tuple[float, tuple[str, str], _Entry]] = (
            collections.deque()
        )

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def claim(
        self, session: int, method: str, request_id: str, fingerprint: Hashable
    ) -> tuple[Outcome[Any], bool]:
        """The outcome future for this id, and whether this caller is the first (must run it).

        A repeat whose request differs from the first (``fingerprint``) is INVALID_ARGUMENT; a
        new id while ``capacity`` ids are held is RequestIdsFullError.
        """
        key = (method, request_id)
        with self._lock:
            if session != self._session:
                self._session = session
                self._clear_locked()
            self._expire_locked(self._clock())
            entry = self._entries.get(key)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    raise InvalidArgumentError(
                        "request_id",
                        f"{request_id!r} was used for a different {method} request in this "
                        "session; use a new request_id for a new request",
                    )
                return entry.outcome, False
            if len(self._entries) >= self._capacity:
                pending = sum(not held.outcome.done() for held in self._entries.values())
                raise RequestIdsFullError(
                    f"{method} refused, nothing sent to mms: the server holds {self._capacity} "
                    f"request ids ({pending} still in flight), each kept for {self._ttl_s:g} s "
                    "after its answer so that a retry finds it; retry once some have expired",
                    capacity=self._capacity,
                    pendingIds=pending,
                    messageType=method,
                    reached_mms=False,
                )
            entry = _Entry(fingerprint, Outcome())
            self._entries[key] = entry
        entry.outcome.add_done_callback(lambda _: self._settled(key, entry))
        return entry.outcome, True

    def forget(self, method: str, request_id: str, outcome: Future[Any]) -> None:
        """Drop the entry of a first call that never reached mms (only if it is still that one)."""
        with self._lock:
            entry = self._entries.get((method, request_id))
            if entry is not None and entry.outcome is outcome:
                del self._entries[(method, request_id)]

    def clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def _settled(self, key: tuple[str, str], entry: _Entry) -> None:
        # The clock starts when the answer is known: a call that took long is remembered as
        # long after it ended as a quick one.
        with self._lock:
            if self._entries.get(key) is entry:
                self._expiries.append((self._clock() + self._ttl_s, key, entry))

    def _clear_locked(self) -> None:
        self._entries.clear()
        self._expiries.clear()

    def _expire_locked(self, now_s: float) -> None:
        while self._expiries and self._expiries[0][0] <= now_s:
            _, key, entry = self._expiries.popleft()
            if self._entries.get(key) is entry:
                del self._entries[key]
