"""Books: opaque session ids, and the gate that keeps a checked request in its session."""

from __future__ import annotations

import threading

import pytest

from manatee_grpc.core._books import Books
from manatee_grpc.core._errors import MmsConnectionLostError, SessionResetError


def test_session_ids_are_opaque_and_differ_between_server_instances() -> None:
    first, second = Books(), Books()
    assert first.session_id == "" == second.session_id  # no session before the first connect
    first.on_connected(1)
    second.on_connected(1)
    assert first.session_id not in ("", second.session_id)
    first.on_connected(2)
    assert first.session_id != first.public_session_id(1)


def test_a_request_naming_another_session_is_refused() -> None:
    books = Books()
    books.on_connected(1)
    old = books.session_id
    books.on_disconnected(1, MmsConnectionLostError("gone"))
    books.on_connected(2)
    with pytest.raises(SessionResetError) as raised, books.pinned(old, "RemoveVm"):
        pass
    assert raised.value.metadata == {"requestSession": old, "session": books.session_id}
    for current in ("", books.session_id):  # empty means the current session
        with books.pinned(current, "RemoveVm"):
            pass


def test_a_disconnect_waits_until_a_pinned_request_is_queued() -> None:
    books = Books()
    books.on_connected(1)
    disconnected = threading.Event()

    def disconnect() -> None:
        books.on_disconnected(1, MmsConnectionLostError("gone"))
        disconnected.set()

    with books.pinned(books.session_id, "RemoveVm"):
        thread = threading.Thread(target=disconnect, daemon=True)
        thread.start()
        # Whatever the pinned caller queues now still belongs to session 1.
        assert not disconnected.wait(0.2)
    thread.join(10)
    assert disconnected.is_set() and not books.connected
