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

Bounds. An entry whose outcome is pending is never dropped (a repeat would send it again). An
answered one is kept for ``ttl_s`` after its answer, and kept small (the answer, not its future).
Past ``capacity`` entries the oldest answered one goes first: at the default capacity and TTL
that happens only above ~7 new ids a second sustained for 10 minutes, beyond what a device
asks; a retry comes within seconds. If every held id is still in flight (mms answers one request
at a time, so only a stuck one could pile them up), a new id is refused (RESOURCE_EXHAUSTED,
REQUEST_IDS_FULL, with RetryInfo) rather than a pending one forgotten.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from manatee_grpc.core._errors import InvalidArgumentError, RequestIdsFullError

MAX_REQUEST_ID_CHARS = 64
# ~7 new ids a second for the whole TTL; an answered entry is well under 1 KiB (< 4 MiB in all).
DEFAULT_CAPACITY = 4096
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
    # While the first call is in flight; None once answered (a future costs ~1 KiB to keep).
    outcome: Outcome[Any] | None
    result: Any = None
    error: BaseException | None = None

    def repeat_outcome(self) -> Outcome[Any]:
        if self.outcome is not None:
            return self.outcome
        answered: Outcome[Any] = Outcome()
        if self.error is not None:
            answered.set_exception(self.error)
        else:
            answered.set_result(self.result)
        return answered


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
        # Answered entries in the order they were answered, with when each expires: the only
        # ones that may go (a pending one is pinned until it is answered or forgotten).
        self._answered: collections.deque[tuple[float, tuple[str, str], _Entry]] = (
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
        new id while ``capacity`` ids are all in flight is RequestIdsFullError.
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
                return entry.repeat_outcome(), False
            while len(self._entries) >= self._capacity and self._answered:
                self._drop_locked(*self._answered.popleft()[1:])
            if len(self._entries) >= self._capacity:
                raise RequestIdsFullError(
                    f"{method} refused, nothing sent to mms: {len(self._entries)} request ids "
                    "are in flight, the most the server holds; an id in flight is never "
                    "forgotten (its retry would apply it twice); retry once some are answered",
                    capacity=self._capacity,
                    method=method,
                    reached_mms=False,
                )
            outcome: Outcome[Any] = Outcome()
            entry = _Entry(fingerprint, outcome)
            self._entries[key] = entry
        outcome.add_done_callback(lambda done: self._answer(key, entry, done))
        return outcome, True

    def forget(self, method: str, request_id: str, outcome: Future[Any]) -> None:
        """Drop the entry of a first call that never reached mms (only if it is still that one)."""
        with self._lock:
            entry = self._entries.get((method, request_id))
            if entry is not None and entry.outcome is outcome:
                del self._entries[(method, request_id)]

    def clear(self) -> None:
        with self._lock:
            self._clear_locked()

    def _answer(self, key: tuple[str, str], entry: _Entry, done: Future[Any]) -> None:
        # The TTL runs from the answer: a call that took long is remembered as long after it
        # ended as a quick one.
        with self._lock:
            if self._entries.get(key) is not entry or done.cancelled():
                return  # forgotten (never reached mms), or a session ago
            error = done.exception()
            if error is not None:
                entry.error = error.with_traceback(None)  # its frames are not worth keeping
            else:
                entry.result = done.result()
            entry.outcome = None
            self._answered.append((self._clock() + self._ttl_s, key, entry))

    def _drop_locked(self, key: tuple[str, str], entry: _Entry) -> None:
        if self._entries.get(key) is entry:
            del self._entries[key]

    def _clear_locked(self) -> None:
        self._entries.clear()
        self._answered.clear()

    def _expire_locked(self, now_s: float) -> None:
        while self._answered and self._answered[0][0] <= now_s:
            self._drop_locked(*self._answered.popleft()[1:])
