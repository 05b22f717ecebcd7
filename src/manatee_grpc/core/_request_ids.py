"""Request ids (AIP-155): a repeated request_id gets the first call's answer, sent once.

A caller whose RebalanceMemory or PrepareVm failed after reaching mms (its deadline passed, the
answer was lost on the way back) cannot tell whether mms acted; retrying it blindly would apply
the deltas twice. With a request_id the retry is safe: the server remembers, per method and per
mms session, the outcome of each id and hands it to every repeat.

An entry is a future of the outcome, created when the first call is queued for mms: a repeat
that comes while the first is still in flight waits for the same answer. A first call that was
never sent (cancelled while queued) leaves no outcome: its entry is dropped, so a repeat runs
the request afresh. Entries are bounded in number and age, and all forgotten when the session
changes (the VM ids they speak of mean nothing in the next one).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from manatee_grpc.core._errors import InvalidArgumentError

MAX_REQUEST_ID_CHARS = 64
DEFAULT_CAPACITY = 1024
DEFAULT_TTL_S = 600.0


def validate_request_id(request_id: str, field: str = "request_id") -> str:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgumentError(
            field, f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )
    if not request_id.isprintable():
        raise InvalidArgumentError(field, "must be printable text (a UUID is recommended)")
    return request_id


@dataclass(slots=True, eq=False)
class _Entry:
    fingerprint: Hashable
    outcome: Future[Any]
    created_s: float


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
        self._entries: collections.OrderedDict[tuple[str, str], _Entry] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def claim(
        self, session: int, method: str, request_id: str, fingerprint: Hashable
    ) -> tuple[Future[Any], bool]:
        """The outcome future for this id, and whether this caller is the first (must run it).

        A repeat whose request differs from the first (``fingerprint``) is INVALID_ARGUMENT.
        """
        key = (method, request_id)
        now_s = self._clock()
        with self._lock:
            if session != self._session:
                self._session = session
                self._entries.clear()
            self._expire_locked(now_s)
            entry = self._entries.get(key)
            if entry is not None:
                if entry.fingerprint != fingerprint:
                    raise InvalidArgumentError(
                        "request_id",
                        f"{request_id!r} was used for a different {method} request in this "
                        "session; use a new request_id for a new request",
                    )
                return entry.outcome, False
            entry = _Entry(fingerprint, Future(), now_s)
            self._entries[key] = entry
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)
            return entry.outcome, True

    def forget(self, method: str, request_id: str, outcome: Future[Any]) -> None:
        """Drop the entry of a first call that never reached mms (only if it is still that one)."""
        with self._lock:
            entry = self._entries.get((method, request_id))
            if entry is not None and entry.outcome is outcome:
                del self._entries[(method, request_id)]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def _expire_locked(self, now_s: float) -> None:
        while self._entries:
            oldest = next(iter(self._entries.values()))
            if now_s - oldest.created_s < self._ttl_s:
                return
            self._entries.popitem(last=False)
