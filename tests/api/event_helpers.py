"""Reading a live server's events the way a client would: over WatchEvents."""

from __future__ import annotations

from manatee_grpc import Client, ManateeServer
from manatee_grpc import memory_service_pb2 as pb

from .helpers import wait_until

REPLAY_ALL = 1000


def recorded_events(client: Client, after: int = 0) -> list[pb.Event]:
    """Every event the server holds with a sequence number above ``after`` (its replay)."""
    events: list[pb.Event] = []
    for message in client.watch_events(REPLAY_ALL):
        update = message.WhichOneof("update")
        if update == "caught_up":
            return events
        if update == "event" and message.event.sequence > after:
            events.append(message.event)
    raise AssertionError("the WatchEvents stream ended before caught_up")


def last_sequence(client: Client) -> int:
    events = recorded_events(client)
    return events[-1].sequence if events else 0


def new_events(server: ManateeServer, after: int, at_least: int = 1) -> list[pb.Event]:
    """The events after ``after``, once there are ``at_least`` of them (a launch's event is
    recorded as its stream ends, which the client may see a moment before)."""
    with Client(server.address) as client:
        found: list[pb.Event] = []

        def enough() -> bool:
            found[:] = recorded_events(client, after)
            return len(found) >= at_least

        wait_until(enough, f"{at_least} new events after #{after}")
    return found


def wait_mms_available_recorded(client: Client) -> None:
    """Wait until the server has recorded that mms is available: the connection thread hands
    that event over as it connects, so it can land after the server's start returned (and
    after a test's first call)."""
    wait_until(
        lambda: any(e.kind == pb.EVENT_KIND_MMS_AVAILABLE for e in recorded_events(client)),
        "MMS_AVAILABLE recorded",
    )
