"""The start slot and the launch coroutine as pure logic, with small fakes of our own interfaces.

``FakeConnection`` stands for MmsConnection: ``submit`` returns a future, and the test (or a
scripted answer) completes it after telling the observers first, as the connection thread does.
``FakeBridge`` gives a launch what it uses of MemoryBridge. No sockets, no gRPC, no sleeps: each
test runs its coroutines on a fresh event loop and steps them with ``asyncio.sleep(0)``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import pytest

from manatee_grpc.core._books import Books
from manatee_grpc.core._bridge import BridgeConfig, MemoryBridge
from manatee_grpc.core._errors import (
    InvalidArgumentError,
    LaunchLeaseExpiredError,
    MmsConnectionLostError,
    MmsHungError,
    MmsProtocolError,
    StartInProgressError,
)
from manatee_grpc.core._launch import (
    Inbox,
    Launched,
    LaunchEvent,
    LaunchPolicy,
    LaunchRun,
    Progress,
    Queued,
    Reserved,
    StopVm,
    StreamEnded,
    Unexpected,
    VmStarted,
)
from manatee_grpc.core._starts import StartSlot
from manatee_grpc.mms._messages import (
    RES_ENOMEM,
    RES_OK,
    FinishAddVmRequest,
    FinishAddVmResponse,
    MmsRequest,
    PrepareVmRequest,
    PrepareVmResponse,
    RemoveVmRequest,
    RemoveVmResponse,
    Response,
)

T = TypeVar("T")
MIB = 1 << 20


class FakeConnection:
    """Records requests; answers them from ``answers`` (by request type) at once, or leaves
    them pending in ``pending`` when no answer is scripted."""

    def __init__(self) -> None:
        self.sent: list[MmsRequest[Any]] = []
        self.pending: list[tuple[MmsRequest[Any], Future[Any]]] = []
        self.answers: dict[type, collections.deque[Response]] = collections.defaultdict(
            collections.deque
        )
        self.observers: list[Any] = []

    def submit(self, request: MmsRequest[Any]) -> Future[Any]:
        future: Future[Any] = Future()
        self.sent.append(request)
        queued = self.answers[type(request)]
        if queued:
            self.answer(request, future, queued.popleft())
        else:
            self.pending.append((request, future))
        return future

    def answer(self, request: MmsRequest[Any], future: Future[Any], response: Response) -> None:
        for observer in self.observers:  # the observers see it before any caller
            observer.on_response(1, request, response, 0.0)
        future.set_result(response)

    def kinds(self) -> list[str]:
        return [type(request).__name__.removesuffix("Request") for request in self.sent]


class FakeBridge:
    """What a launch uses of MemoryBridge, over a real StartSlot and a FakeConnection."""

    def __init__(self, lease_s: float = 60.0) -> None:
        self.connection = FakeConnection()
        self.config = BridgeConfig(lease_s=lease_s)
        self.removed: list[int] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.slot = StartSlot(
            self.connection,  # type: ignore[arg-type]
            lease_s,
            lambda vm_id, why, session: self.remove_in_background(vm_id, why, session=session),
            call_later=lambda delay_s, callback: self.timers.append((delay_s, callback)),
            clock=lambda: 1000.0,
        )
        # The books follow the wire after the slot, as in MemoryBridge; session 1 is current.
        self.books = Books()
        self.books.on_connected(1)
        self.connection.observers.extend([self.slot, self.books])
        self.connection.answers[RemoveVmRequest].extend([RemoveVmResponse(RES_OK)] * 10)
        self.listeners: list[Callable[[int], None]] = []

    def add_session_reset_listener(self, listener: Callable[[int], None]) -> None:
        self.listeners.append(listener)

    def remove_session_reset_listener(self, listener: Callable[[int], None]) -> None:
        self.listeners.remove(listener)

    def remove_in_background(
        self,
        vm_id: int,
        why: str,
        then: Callable[[], None] | None = None,
        session: int | None = None,
    ) -> None:
        del why, session
        self.removed.append(vm_id)
        self.slot.submit_end(RemoveVmRequest(vm_id))
        if then is not None:
            then()


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coroutine)


async def settle() -> None:
    """Let every ready callback and task run (a few loop passes)."""
    for _ in range(20):
        await asyncio.sleep(0)


def slot_is_empty(slot: StartSlot) -> bool:
    """The slot remembers nothing: no claim, and every collection it owns is empty."""
    collections_held = [
        value
        for value in vars(slot).values()
        if isinstance(value, set | list | dict | collections.deque)
    ]
    return slot.claim is None and all(len(value) == 0 for value in collections_held)


# --- the start slot ------------------------------------------------------------------------------


def test_launches_take_the_slot_in_arrival_order_and_a_cancelled_one_leaves_no_trace() -> None:
    bridge = FakeBridge()
    slot = bridge.slot
    tokens = {name: object() for name in "ABCD"}  # the slot compares tokens by identity
    order: list[str] = []

    async def launch(name: str) -> None:
        await slot.acquire_for_launch(tokens[name])
        order.append(name)

    async def scenario() -> None:
        await slot.acquire_for_launch(tokens["A"])
        b, c, d = (asyncio.create_task(launch(name)) for name in "BCD")
        await settle()
        assert slot.launches_waiting() == 3 and order == []
        c.cancel()  # C's caller left while queued
        await settle()
        assert slot.launches_waiting() == 2
        slot.release(tokens["A"])
        await settle()
        assert order == ["B"]
        slot.release(tokens["B"])
        await settle()
        assert order == ["B", "D"]
        slot.release(tokens["D"])
        await asyncio.gather(b, d)
        assert c.cancelled()

    run(scenario())
    assert slot_is_empty(slot)
    assert bridge.connection.sent == []  # the slot itself never talks to mms


def test_a_bare_prepare_is_refused_while_launches_queue_with_a_retryable_abort() -> None:
    bridge = FakeBridge()
    slot = bridge.slot

    async def scenario() -> None:
        a, b = object(), object()
        await slot.acquire_for_launch(a)
        queued = asyncio.create_task(slot.acquire_for_launch(b))
        await settle()
        slot.release(a)  # B is woken but has not run yet: the slot is still promised to it
        with pytest.raises(StartInProgressError) as caught:
            slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
        assert caught.value.grpc_code == "ABORTED" and caught.value.retry_delay_s
        await queued
        slot.release(b)

    run(scenario())
    assert bridge.connection.sent == []
    assert slot_is_empty(slot)


def test_a_queued_launch_is_told_its_place_when_it_queues_and_each_time_it_moves_up() -> None:
    bridge = FakeBridge()
    slot = bridge.slot
    tokens = {name: object() for name in "ABCD"}
    told: dict[str, list[int]] = {name: [] for name in "BCD"}

    async def launch(name: str) -> None:
        await slot.acquire_for_launch(tokens[name], told[name].append)

    async def scenario() -> None:
        await slot.acquire_for_launch(tokens["A"], told["B"].append)  # A never waits: no word
        b, c, d = (asyncio.create_task(launch(name)) for name in "BCD")
        await settle()
        assert told == {"B": [1], "C": [2], "D": [3]}
        # Queued launches hold nothing: A still owns the start, and nobody else does.
        assert slot.claim is not None and slot.claim.token is tokens["A"]
        assert slot.queue_positions() == {tokens["B"]: 1, tokens["C"]: 2, tokens["D"]: 3}
        c.cancel()  # C leaves: only those behind it move up
        await settle()
        assert told == {"B": [1], "C": [2], "D": [3, 2]}
        slot.release(tokens["A"])  # B takes the start (no more word for it); D moves up
        await b
        await settle()
        assert told == {"B": [1], "C": [2], "D": [3, 2, 1]}
        assert slot.claim is not None and slot.claim.token is tokens["B"]
        slot.release(tokens["B"])
        await d
        slot.release(tokens["D"])
        assert told["D"] == [3, 2, 1]  # taking the start is not a move

    run(scenario())
    assert slot_is_empty(slot)


def test_a_launch_queued_behind_a_bare_start_says_queued_then_reserves_when_it_is_freed() -> None:
    bridge = FakeBridge()
    connection = bridge.connection
    connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 1, 0))
    bare = bridge.slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))  # VM 1, leased
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        task = asyncio.create_task(new_launch(bridge, inbox).run(recorder.emit, 10.0))
        await settle()
        assert recorder.events == [Queued(1)]
        assert connection.kinds() == ["PrepareVm"]  # a queued launch sends nothing to mms
        connection.answers[FinishAddVmRequest].extend([FinishAddVmResponse(RES_OK)] * 2)
        connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 2, 0))
        bridge.slot.submit_end(FinishAddVmRequest(bare.future.result().vm_id))  # frees it
        inbox.put(VmStarted())
        await task

    run(scenario())
    assert recorder.events == [
        Queued(1),
        Reserved(2, "/run/mms_control_2.sock", 1060.0, 1),
        Launched(2, 1),
    ]
    assert slot_is_empty(bridge.slot)


def test_a_client_that_reads_nothing_while_queued_loses_the_start_at_the_lease() -> None:
    """The `queued` write may be held up by a client that reads nothing; the launch then owns
    the start and must still make progress or lose it (the start lease)."""
    bridge = FakeBridge(lease_s=0.01)
    a = object()
    events: list[LaunchEvent] = []

    async def stuck_emit(event: LaunchEvent) -> None:
        events.append(event)
        await asyncio.get_running_loop().create_future()  # never written

    async def scenario() -> None:
        await bridge.slot.acquire_for_launch(a)
        task = asyncio.create_task(new_launch(bridge, Inbox()).run(stuck_emit, None))
        await settle()
        assert events == [Queued(1)]
        bridge.slot.release(a)
        with pytest.raises(LaunchLeaseExpiredError):
            await task

    run(scenario())
    assert bridge.connection.sent == []  # it never got as far as mms
    assert slot_is_empty(bridge.slot)


def test_a_bare_start_lease_is_a_timer_that_removes_only_the_start_it_was_set_for() -> None:
    bridge = FakeBridge(lease_s=60.0)
    slot, connection = bridge.slot, bridge.connection
    connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 7, 0))
    prepare = slot.submit_prepare(PrepareVmRequest(512 * MIB, 256 * MIB))
    assert prepare.future.result().vm_id == 7
    claim = slot.claim
    assert claim is not None and claim.lease_expire_unix_s == 1000.0 + 60.0
    ((delay_s, expire),) = bridge.timers
    assert delay_s == 60.0
    expire()  # the lease runs out: the start is removed
    assert bridge.removed == [7]
    assert slot.claim is None  # mms answered the RemoveVm
    expire()  # a timer firing again, or late, does nothing
    assert bridge.removed == [7]


# --- the launch coroutine ------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.events: list[LaunchEvent] = []

    async def emit(self, event: LaunchEvent) -> None:
        self.events.append(event)


def new_launch(bridge: FakeBridge, inbox: Inbox, **policy: Any) -> LaunchRun:
    return LaunchRun(
        bridge,  # type: ignore[arg-type]
        mem_size_bytes=512 * MIB,
        init_mem_size_bytes=256 * MIB,
        inbox=inbox,
        policy=LaunchPolicy(**policy),
        clock=lambda: 1000.0,
    )


def test_vm_started_sent_with_start_is_applied_once_reserved_and_progress_only_if_short() -> None:
    bridge = FakeBridge()
    connection = bridge.connection
    connection.answers[PrepareVmRequest].extend(
        [PrepareVmResponse(RES_ENOMEM, 1, 4096), PrepareVmResponse(RES_OK, 1, 0)]
    )
    connection.answers[FinishAddVmRequest].append(FinishAddVmResponse(RES_OK))
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        inbox.put(VmStarted())  # sent right after `start`, before anything was reserved
        inbox.put(StreamEnded())  # and the client half-closed: a normal end after vm_started
        await new_launch(bridge, inbox, attempt_delays_s=(0.0, 0.001)).run(recorder.emit, 10.0)

    run(scenario())
    assert recorder.events == [
        Progress(1, 4096, 0.001),
        Reserved(1, "/run/mms_control_1.sock", 1060.0, 1),
        Launched(1, 1),
    ]
    assert connection.kinds() == ["PrepareVm", "PrepareVm", "FinishAddVm"]
    assert slot_is_empty(bridge.slot)


def test_a_second_start_is_invalid_argument_and_the_reservation_is_removed() -> None:
    bridge = FakeBridge()
    bridge.connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 1, 0))
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        inbox.put(Unexpected("start"))
        inbox.put(VmStarted())
        with pytest.raises(InvalidArgumentError):
            await new_launch(bridge, inbox).run(recorder.emit, 10.0)

    run(scenario())
    assert [type(event).__name__ for event in recorder.events] == ["Reserved"]
    assert bridge.connection.kinds() == ["PrepareVm", "RemoveVm"]
    assert slot_is_empty(bridge.slot)


def test_a_quiet_client_loses_the_start_when_the_lease_runs_out() -> None:
    bridge = FakeBridge(lease_s=0.01)
    bridge.connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 1, 0))
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        with pytest.raises(LaunchLeaseExpiredError):
            # No deadline of its own: only the lease ends it.
            await new_launch(bridge, inbox, stop_timeout_s=0.01).run(recorder.emit, None)

    run(scenario())
    assert [type(event) for event in recorder.events] == [Reserved, StopVm]
    assert bridge.connection.kinds() == ["PrepareVm", "RemoveVm"]
    assert slot_is_empty(bridge.slot)


def test_a_launch_whose_caller_left_before_it_queued_sends_nothing() -> None:
    bridge = FakeBridge()

    async def scenario() -> None:
        launch = LaunchRun(
            bridge,  # type: ignore[arg-type]
            mem_size_bytes=512 * MIB,
            init_mem_size_bytes=256 * MIB,
            inbox=Inbox(),
            policy=LaunchPolicy(),
            caller_gone=lambda: True,  # the stream was cancelled before the launch queued
        )
        with pytest.raises(asyncio.CancelledError):
            await launch.run(Recorder().emit, 10.0)

    run(scenario())
    assert bridge.connection.sent == []
    assert slot_is_empty(bridge.slot)


def test_a_launch_cancelled_while_mms_has_its_prepare_queued_never_sends_it() -> None:
    bridge = FakeBridge()
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        task = asyncio.create_task(new_launch(bridge, inbox).run(recorder.emit, 10.0))
        await settle()
        ((request, future),) = bridge.connection.pending
        assert isinstance(request, PrepareVmRequest)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert future.cancelled()  # still queued, so it stays off the wire

    run(scenario())
    assert recorder.events == []
    assert slot_is_empty(bridge.slot)


def test_a_session_reset_overtakes_queued_client_messages_and_asks_to_stop_the_vm() -> None:
    bridge = FakeBridge()
    bridge.connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_OK, 1, 0))
    recorder = Recorder()

    async def scenario() -> None:
        inbox = Inbox()
        launch = asyncio.create_task(new_launch(bridge, inbox).run(recorder.emit, 10.0))
        await settle()
        assert [type(event) for event in recorder.events] == [Reserved]
        inbox.put(Unexpected("start"))  # would be INVALID_ARGUMENT, but the reset comes first
        (listener,) = bridge.listeners
        listener(1)  # as the connection thread reports it
        with pytest.raises(MmsConnectionLostError):
            await launch

    run(scenario())
    assert [type(event) for event in recorder.events] == [Reserved, StopVm]
    # mms dropped the VM with the session: nothing to remove, and the listener is gone.
    assert bridge.connection.kinds() == ["PrepareVm"]
    assert bridge.listeners == []
    assert slot_is_empty(bridge.slot)


def test_a_reservation_answered_as_the_caller_leaves_is_removed() -> None:
    # mms answers PrepareVm (a start is open) and the caller cancels before the launch resumes
    # to read that answer: the launch never learns the VM id, but the slot (which follows the
    # wire) does, and the start must be removed, not left pending with nobody holding it.
    bridge = FakeBridge()

    async def scenario() -> None:
        inbox = Inbox()
        task = asyncio.create_task(new_launch(bridge, inbox).run(Recorder().emit, 10.0))
        await settle()
        ((request, future),) = bridge.connection.pending
        bridge.connection.answer(request, future, PrepareVmResponse(RES_OK, 7, 0))
        task.cancel()  # in the same loop pass: the launch is cancelled before it resumes
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    assert bridge.connection.kinds() == ["PrepareVm", "RemoveVm"]
    assert bridge.removed == [7]
    assert slot_is_empty(bridge.slot)


def test_a_short_reservation_is_removed_if_the_next_attempt_fails_after_the_caller_left() -> None:
    # Attempt 1 fell short (start 3 is open in mms); attempt 2 is on the wire when the caller
    # leaves, and then fails without closing the stream: start 3 is still open and is removed.
    bridge = FakeBridge()
    bridge.connection.answers[PrepareVmRequest].append(PrepareVmResponse(RES_ENOMEM, 3, 4096))

    async def scenario() -> None:
        inbox = Inbox()
        launch = new_launch(bridge, inbox, attempt_delays_s=(0.0, 0.0))
        task = asyncio.create_task(launch.run(Recorder().emit, 10.0))
        await settle()
        ((request, future),) = bridge.connection.pending
        assert isinstance(request, PrepareVmRequest)
        assert future.set_running_or_notify_cancel()  # on the wire: it cannot be cancelled
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert bridge.removed == []  # not before the answer: it could still open the start
        future.set_exception(MmsProtocolError("a bad PrepareVm body", reached_mms=True))

    run(scenario())
    assert bridge.connection.kinds() == ["PrepareVm", "PrepareVm", "RemoveVm"]
    assert bridge.removed == [3]
    assert slot_is_empty(bridge.slot)


# --- background removals and sessions (I2) -------------------------------------------------------


class SessionedConnection(FakeConnection):
    """A FakeConnection that MemoryBridge can sit on: observers, usable listeners, sessions.

    Nothing is answered by itself: each request waits in ``pending`` until the test settles it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.session = 0
        self.usable_listeners: list[Callable[[bool], None]] = []

    def add_observer(self, observer: Any) -> None:
        self.observers.append(observer)

    def add_usable_listener(self, listener: Callable[[bool], None]) -> None:
        self.usable_listeners.append(listener)

    def connect(self) -> None:
        """A new session starts and the stream is usable (observers first, as the thread does)."""
        self.session += 1
        for observer in self.observers:
            observer.on_connected(self.session)
        for listener in self.usable_listeners:
            listener(True)

    def disconnect(self) -> None:
        lost = MmsConnectionLostError("mms closed the connection", session=self.session)
        for listener in self.usable_listeners:
            listener(False)
        for observer in self.observers:
            observer.on_disconnected(self.session, lost)


def test_a_removal_deferred_as_its_session_ends_is_never_sent_in_the_next_session() -> None:
    """A background RemoveVm that could not be sent (the stream hung) is retried once the stream
    is usable again, but only in its own session: its id names another VM in the next one."""
    connection = SessionedConnection()
    bridge = MemoryBridge(connection)  # type: ignore[arg-type]
    connection.connect()  # session 1
    released: list[str] = []
    bridge.remove_in_background(5, "its launch ended", then=lambda: released.append("then"))
    assert connection.kinds() == ["RemoveVm"]
    ((_, removal),) = connection.pending
    connection.pending.clear()
    # The link drops (the list of held-back removals is emptied) and only then does the
    # removal's callback learn that it was not sent on the hung stream: the race of the review.
    connection.disconnect()
    removal.set_exception(
        MmsHungError("RemoveVm not sent: mms is hung", reached_mms=False, messageType="REMOVE_VM")
    )
    connection.connect()  # session 2: its VM 5, if any, is someone else's
    assert connection.kinds() == ["RemoveVm"], "session 1's removal was sent in session 2"
    assert released == ["then"]  # the launch's slot is released all the same, once
