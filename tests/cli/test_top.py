"""``manatee-grpc top``: the renderer on constructed messages, ``--once`` and usage errors as a
script sees them, and the live view in a real pseudo-terminal whose screen a terminal emulator
(pyte) keeps, through an mms reset and a server restart, to q and Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pyte
import pytest
from api.conftest import start_server
from api.helpers import session_id
from hypothesis import given
from hypothesis import strategies as st

from manatee_grpc import Client, ManateeServer
from manatee_grpc import memory_service_pb2 as pb
from manatee_grpc.cli import _top as top
from manatee_grpc.cli._top_view import (
    ASCII_FALLBACK,
    CHANGE_HOLD_TICKS,
    LEGEND,
    LEGEND_ONCE,
    Sample,
    TopView,
    bar,
    clock,
    render,
)

from .conftest import REPO_ROOT, run_cli, simulator

MIB = 1024 * 1024
GIB = 1024 * MIB
NOW_S = 1_800_000_000.0
SERVER = "unix:///run/manatee.sock"
# Bounds that only a broken build waits out (a loaded 2-core machine may be slow, never this slow).
SCREEN_TIMEOUT_S = 30.0
EXIT_TIMEOUT_S = 30.0


# --- constructed messages ----------------------------------------------------------------------


def _stats(
    vm_id: int,
    balloon_bytes: int,
    total_bytes: int | None = None,
    available_bytes: int | None = None,
    free_bytes: int | None = None,
) -> pb.VmBalloonStats:
    stats = pb.VmBalloonStats(vm_id=vm_id, balloon_actual_bytes=balloon_bytes)
    if total_bytes is not None:
        stats.total_memory_bytes = total_bytes
    if available_bytes is not None:
        stats.available_memory_bytes = available_bytes
    if free_bytes is not None:
        stats.free_memory_bytes = free_bytes
    return stats


def _snapshot(
    session: int, *stats: pb.VmBalloonStats, missing: tuple[int, ...] = ()
) -> pb.BalloonStatsSnapshot:
    return pb.BalloonStatsSnapshot(session=str(session), stats=stats, missing_vm_ids=missing)


def _vm_list(
    session: int, *siblings: tuple[int, int, pb.VmState.ValueType], started_s: float = NOW_S - 60
) -> pb.ListVmsResponse:
    """The CrOS guest (its ``since`` marks the session start) and (id, size, state) siblings."""
    cros = pb.VmInfo(vm_id=0, state=pb.VM_STATE_RUNNING, cros_guest=True)
    cros.since.FromNanoseconds(int(started_s * 1e9))
    vms = [cros] + [
        pb.VmInfo(vm_id=vm_id, mem_size_bytes=size, init_mem_size_bytes=size, state=state)
        for vm_id, size, state in siblings
    ]
    return pb.ListVmsResponse(session=str(session), vms=vms)


CROS = _stats(0, 0, 8 * GIB, 4 * GIB, 2 * GIB)
RUNNING = pb.VM_STATE_RUNNING


def _view(*siblings: tuple[int, int, pb.VmState.ValueType]) -> TopView:
    """A connected view of session 1 with the CrOS guest and ``siblings``."""
    view = TopView(server=SERVER, interval_s=1.0)
    view.vm_list(_vm_list(1, *siblings), NOW_S)
    view.connected()
    return view


def _row(lines: list[str], vm_id: int) -> str:
    (row,) = [
        line for line in lines if re.match(rf"\s*{vm_id}\s+(cros|running|starting|\?)\b", line)
    ]
    return row


def _bar_of(row: str) -> str:
    match = re.search(r"\[([#=+.? ]+)\]", row)
    assert match is not None, row
    return match.group(1)


# --- the renderer ------------------------------------------------------------------------------


def test_one_row_per_vm_with_bar_and_human_numbers_under_the_header() -> None:
    view = _view((1, GIB, RUNNING))
    # VM 1: a quarter each of balloon, used, available-not-free and free.
    view.snapshot(_snapshot(1, CROS, _stats(1, 256 * MIB, 768 * MIB, 512 * MIB, 256 * MIB)), NOW_S)

    lines = render(view, 140, 30, NOW_S + 0.5)

    assert lines[0] == (
        f"manatee-grpc top · session 1 · connected · updated {clock(NOW_S)} · every 1 s · "
        f"policy: none seen · {SERVER}"
    )
    assert lines[1] == LEGEND
    assert lines[3].split() == [
        "VM", "STATE", "MEMORY", "BALLOON", "AVAILABLE", "FREE", "BAR", "CHANGE",
    ]  # fmt: skip
    vm1 = _row(lines, 1)
    assert vm1.split()[:10] == [
        "1", "running", "1.00", "GiB", "256.0", "MiB", "512.0", "MiB", "256.0", "MiB",
    ]  # fmt: skip
    quarters = _bar_of(vm1)
    assert re.fullmatch(r"#+=+\++\.+", quarters), quarters
    assert all(abs(quarters.count(c) - len(quarters) / 4) <= 1 for c in "#=+.")
    # The CrOS guest has no size in ListVms: its memory is balloon plus what the guest has.
    cros = _row(lines, 0)
    assert cros.split()[:4] == ["0", "cros", "8.00", "GiB"]
    assert _bar_of(cros).startswith("=")  # an empty balloon draws no '#'
    assert all(len(line) <= 140 for line in lines)


def test_bar_of_exact_quarters() -> None:
    sample = Sample(256 * MIB, 768 * MIB, 512 * MIB, 256 * MIB)
    assert bar(sample, GIB, 16) == "####====++++...."
    # Unreported statistics are drawn as unknown rather than guessed.
    assert bar(Sample(512 * MIB, None, None, None), GIB, 8) == "####????"
    assert bar(Sample(512 * MIB, 512 * MIB, None, None), GIB, 8) == "####????"
    assert bar(None, GIB, 4) == "????"


@given(
    st.builds(
        Sample,
        st.integers(0, 64 * GIB),
        st.integers(0, 64 * GIB),
        st.one_of(st.none(), st.integers(0, 64 * GIB)),
        st.one_of(st.none(), st.integers(0, 64 * GIB)),
    ),
    st.one_of(st.none(), st.integers(1, 128 * GIB)),
    st.integers(1, 60),
)
def test_bar_always_fills_its_width_in_order(
    sample: Sample, memory_bytes: int | None, width: int
) -> None:
    drawn = bar(sample, memory_bytes, width)
    assert len(drawn) == width
    assert re.fullmatch(r"#*(=*\+*\.*|\?*) *", drawn), drawn


def test_change_column_shows_what_moved_since_the_last_tick() -> None:
    view = _view((1, GIB, RUNNING))
    view.snapshot(_snapshot(1, CROS, _stats(1, 256 * MIB, 768 * MIB, 512 * MIB, 256 * MIB)), NOW_S)
    assert _row(render(view, 140, 30, NOW_S), 1).endswith("]")  # the first tick: nothing to compare

    view.vm_list(_vm_list(1, (1, GIB, RUNNING), (2, 512 * MIB, RUNNING)), NOW_S + 1)
    view.snapshot(
        _snapshot(
            1,
            CROS,
            _stats(1, 384 * MIB, 640 * MIB, 384 * MIB, 256 * MIB),
            _stats(2, 0, 512 * MIB, 256 * MIB, 128 * MIB),
        ),
        NOW_S + 1,
    )
    lines = render(view, 160, 30, NOW_S + 1)

    assert _row(lines, 1).endswith("]  Δballoon +128 MiB Δavail -128 MiB")
    assert _row(lines, 0).endswith("]")  # unchanged
    assert _row(lines, 2).endswith("]  new")
    assert lines[-1] == f"{clock(NOW_S + 1)}  VM 2 added (512.0 MiB)"

    # The same numbers again for the next ticks: the change stays, saying how old it is, for
    # CHANGE_HOLD_TICKS ticks in all (a one-tick flash was easy to miss); then it goes.
    same = _snapshot(
        1,
        CROS,
        _stats(1, 384 * MIB, 640 * MIB, 384 * MIB, 256 * MIB),
        _stats(2, 0, 512 * MIB, 256 * MIB, 128 * MIB),
    )
    for tick in range(2, CHANGE_HOLD_TICKS + 1):
        view.snapshot(same, NOW_S + tick)
        lines = render(view, 160, 30, NOW_S + tick)
        age = f"({tick - 1} s ago)"
        assert _row(lines, 1).endswith(f"]  Δballoon +128 MiB Δavail -128 MiB {age}")
        assert _row(lines, 2).endswith(f"]  new {age}")
    view.snapshot(same, NOW_S + CHANGE_HOLD_TICKS + 1)
    lines = render(view, 160, 30, NOW_S + CHANGE_HOLD_TICKS + 1)
    assert "Δ" not in "\n".join(lines)
    assert _row(lines, 2).endswith("]")


def test_a_newer_change_replaces_the_one_held() -> None:
    view = _view((1, GIB, RUNNING))
    for tick, balloon_mib in enumerate([0, 64, 64, 96]):
        view.snapshot(_snapshot(1, CROS, _stats(1, balloon_mib * MIB, GIB, GIB, GIB)), NOW_S + tick)
    assert _row(render(view, 160, 30, NOW_S + 3), 1).endswith("]  Δballoon +32 MiB")


def test_three_large_changes_fit_120_columns_whole() -> None:
    view = _view((1, GIB, RUNNING), (2, 16 * GIB, RUNNING))
    view.snapshot(
        _snapshot(
            1, _stats(0, 0, 8 * GIB, 4 * GIB, 3 * GIB), _stats(2, 0, 16 * GIB, 8 * GIB, 4 * GIB)
        ),
        NOW_S,
    )
    moved = _snapshot(
        1,
        _stats(0, 1408 * MIB, 8 * GIB - 1408 * MIB, 3 * GIB + 128 * MIB, 3 * GIB - 96 * MIB),
        _stats(2, 1536 * MIB, 16 * GIB - 1536 * MIB, 6 * GIB + 512 * MIB, 3 * GIB - 300 * MIB),
    )
    view.snapshot(moved, NOW_S + 1)
    view.snapshot(moved, NOW_S + 12.4)  # held, with a two-digit age
    lines = render(view, 120, 30, NOW_S + 12.4)

    assert all(len(line) <= 120 for line in lines)
    assert "…" not in "\n".join(lines)  # nothing was cut
    # Shorter names and units where the full ones would not fit; every delta is there.
    assert _row(lines, 0).endswith("]  Δbal +1.38G Δav -896M Δfree -96M (11 s ago)")
    assert _row(lines, 2).endswith("]  Δbal +1.5G Δav -1.5G Δfree -1.29G (11 s ago)")
    # Where there is room, the full form.
    assert _row(render(view, 160, 30, NOW_S + 12.4), 0).endswith(
        "]  Δballoon +1.38 GiB Δavail -896 MiB Δfree -96 MiB (11 s ago)"
    )


def test_reconnecting_before_any_update_shows_no_last_update() -> None:
    view = TopView(server=SERVER, interval_s=1.0)
    view.disconnected("UNAVAILABLE", attempt=1, retry_in_s=0.2, now_s=NOW_S)
    status = render(view, 160, 30, NOW_S)[1]
    assert status == "reconnecting… UNAVAILABLE; attempt 1, next in 0.2 s  ·  q quits"

    # After a good update, a failed refresh keeps it on screen and says so.
    view.vm_list(_vm_list(1), NOW_S + 1)
    view.connected()
    view.snapshot(_snapshot(1, CROS), NOW_S + 1)
    view.disconnected("UNAVAILABLE", attempt=1, retry_in_s=0.2, now_s=NOW_S + 2)
    assert render(view, 160, 30, NOW_S + 2)[1].endswith(
        "next in 0.2 s; showing the last update  ·  q quits"
    )


def test_one_screen_has_no_keys_to_press() -> None:
    view = TopView(server=SERVER, interval_s=None)
    view.snapshot(_snapshot(1, CROS), NOW_S)
    lines = render(view, 160, None, NOW_S)
    assert lines[1] == LEGEND_ONCE
    assert "q quits" not in "\n".join(lines)


def test_in_stream_session_reset_is_a_visible_line_and_drops_the_siblings() -> None:
    view = _view((3, GIB, RUNNING), (4, GIB, RUNNING))
    view.snapshot(
        _snapshot(1, CROS, _stats(3, 0, GIB, GIB, GIB), _stats(4, 0, GIB, GIB, GIB)), NOW_S
    )

    reset = pb.WatchBalloonStatsResponse(
        session_reset=pb.SessionReset(previous_session="1", session="2")
    )
    view.message(reset, NOW_S + 1)
    view.message(pb.WatchBalloonStatsResponse(snapshot=_snapshot(2, CROS)), NOW_S + 1.1)
    # The ListVms that follows a reset brings the new session's start; no second reset line.
    view.vm_list(_vm_list(2, started_s=NOW_S + 0.9), NOW_S + 1.2)
    lines = render(view, 140, 30, NOW_S + 1.2)

    assert f"{clock(NOW_S + 1)}  session 1 → 2: mms was reset; VMs 3,4 gone" in lines
    assert sum("session 1 → 2" in line for line in lines) == 1
    assert " session 2 · connected" in lines[0]
    assert [line.split()[0] for line in lines if re.match(r"\s*\d+\s+(cros|running)", line)] == [
        "0"
    ]


def test_disconnect_keeps_the_last_screen_and_a_restarted_server_is_a_reset() -> None:
    view = _view((1, 512 * MIB, RUNNING))
    view.snapshot(_snapshot(1, CROS, _stats(1, 0, 512 * MIB, 256 * MIB, 128 * MIB)), NOW_S)

    view.disconnected("UNAVAILABLE", attempt=3, retry_in_s=0.8, now_s=NOW_S + 5)
    lines = render(view, 140, 30, NOW_S + 5.3)
    assert " · reconnecting… · " in lines[0]
    assert f"updated {clock(NOW_S)} (5 s ago)" in lines[0]
    assert lines[1].startswith("reconnecting… UNAVAILABLE; attempt 3, next in 0.5 s;")
    assert _row(lines, 1).split()[1] == "running"  # the last screen stays

    # Back on the same server (same session): no reset.
    same = _vm_list(1, (1, 512 * MIB, RUNNING))
    view.vm_list(same, NOW_S + 6)
    view.connected()
    assert view.events == []

    # The server goes away again and comes back with another session: a new server process
    # (session ids are unique across server restarts).
    view.disconnected("UNAVAILABLE", attempt=1, retry_in_s=0.2, now_s=NOW_S + 6.5)
    view.vm_list(_vm_list(7), NOW_S + 7)
    view.connected()
    lines = render(view, 140, 30, NOW_S + 7)
    assert (
        lines[-1]
        == f"{clock(NOW_S + 7)}  session 1 → 7: server restarted, mms was reset; VMs 1 gone"
    )
    assert " connected · " in lines[0]


def test_vms_without_statistics_say_why_and_removal_is_an_event() -> None:
    view = _view((5, GIB, RUNNING), (6, GIB, pb.VM_STATE_STARTING))
    view.snapshot(_snapshot(1, CROS, missing=(5,)), NOW_S)
    lines = render(view, 140, 30, NOW_S)
    assert _row(lines, 5).endswith("no statistics from mms")
    assert _row(lines, 6).split()[1] == "starting"
    assert _row(lines, 6).endswith("starting")

    view.vm_list(_vm_list(1, (6, GIB, RUNNING)), NOW_S + 1)
    assert view.events[-1] == (NOW_S + 1, "VM 5 removed")


def test_small_terminal_keeps_header_and_latest_events_and_counts_hidden_vms() -> None:
    view = _view()
    for n in range(3):
        view.session_reset(str(1 + n), str(2 + n), NOW_S + n)
    siblings = [(vm_id, GIB, RUNNING) for vm_id in range(1, 21)]
    view.vm_list(_vm_list(4, *siblings), NOW_S + 4)  # 20 "VM n added" events
    view.snapshot(_snapshot(4, CROS, *(_stats(i, 0, GIB, GIB, GIB) for i in range(1, 21))), NOW_S)

    lines = render(view, 60, 14, NOW_S + 5)

    assert len(lines) == 14
    assert all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("manatee-grpc top · ") and lines[0].endswith("…")
    # Header, legend, blank; the table's header, 3 of 21 VMs and "more"; blank, 5 events.
    assert [line.split()[0] for line in lines[4:7]] == ["0", "1", "2"]
    assert lines[7:9] == ["… 18 more VMs", ""]
    assert lines[-5:] == [f"{clock(NOW_S + 4)}  VM {n} added (1.00 GiB)" for n in range(16, 21)]


def test_ascii_fallback_covers_every_non_ascii_character_used() -> None:
    view = _view((1, GIB, RUNNING))
    view.snapshot(_snapshot(1, CROS, _stats(1, 0, GIB, GIB, GIB)), NOW_S)
    view.snapshot(_snapshot(1, CROS, _stats(1, MIB, GIB, GIB, GIB)), NOW_S + 1)
    view.message(
        pb.WatchBalloonStatsResponse(
            session_reset=pb.SessionReset(previous_session="1", session="2")
        ),
        NOW_S + 2,
    )
    view.disconnected("UNAVAILABLE", 1, 0.2, NOW_S + 3)
    text = "\n".join(render(view, 200, 40, NOW_S + 3))
    assert not text.isascii()
    assert text.translate(ASCII_FALLBACK).isascii()


# --- as a script runs it -----------------------------------------------------------------------


def _start_vm(client: Client, mem_size_bytes: int, init_mem_size_bytes: int) -> int:
    prepared = client.prepare_vm(mem_size_bytes, init_mem_size_bytes)
    assert prepared.reserved
    return int(client.finish_add_vm(prepared.vm_id).vm.vm_id)


def _top_once(address: str, columns: int | None) -> subprocess.CompletedProcess[str]:
    """``top --once`` into a pipe, with ``$COLUMNS`` set to ``columns`` or unset."""
    env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
    if columns is not None:
        env["COLUMNS"] = str(columns)
    return subprocess.run(
        [sys.executable, "-m", "manatee_grpc", "top", "--once", "--server", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO_ROOT,
        env=env,
    )


def test_once_prints_one_screen_and_exits(server: ManateeServer, client: Client) -> None:
    vm_id = _start_vm(client, 512 * MIB, 256 * MIB)

    result = _top_once(server.address, columns=None)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # A pipe and no $COLUMNS: whole lines, nothing cut.
    session = session_id(server, 1)
    assert lines[0].startswith(f"manatee-grpc top · session {session} · connected · updated ")
    assert lines[0].endswith(f" · {server.address}")
    assert "every" not in lines[0]  # one screen: no interval to speak of
    assert "q quits" not in result.stdout  # and no key to press
    row = _row(lines, vm_id)
    # Started with 256 MiB of its 512 MiB: the rest is in its balloon.
    assert row.split()[:6] == [str(vm_id), "running", "512.0", "MiB", "256.0", "MiB"]
    assert _bar_of(row).startswith("#" * (len(_bar_of(row)) // 2 - 1))
    assert _row(lines, 0).split()[1] == "cros"

    narrow = _top_once(server.address, columns=70)
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) == 70
    assert _row(narrow.stdout.splitlines(), vm_id).split()[:2] == [str(vm_id), "running"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--interval", "0.05"], "must be at least 0.1 s"),
        (["--interval", "soon"], "expected seconds"),
        ([], "needs a terminal; use --once"),
        (["--once", "--json"], "unrecognized arguments: --json"),
    ],
)
def test_usage_errors_exit_2(args: list[str], message: str) -> None:
    # No server and no terminal (stdin is a pipe): refused before anything is sent.
    result = run_cli("top", *args, "--server", "unix:///nonexistent/manatee.sock")

    assert result.returncode == 2, result.stderr
    assert message in result.stderr


# --- in a terminal -----------------------------------------------------------------------------

# Popen(start_new_session=True) makes the child a session leader without a controlling
# terminal; opening the pty makes it that session's terminal, so ^C typed there is SIGINT.
_TAKE_TERMINAL = (
    "import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); "
    "os.execv(sys.executable, [sys.executable, '-m', 'manatee_grpc', *sys.argv[1:]])"
)


class Terminal:
    """``manatee-grpc ARGS`` on a pseudo-terminal; pyte keeps the screen it draws.

    Only the program holds the terminal's far end (the test closes its copy once the program
    has it), so reading the near end ends (EIO) exactly when the program has exited and every
    byte it wrote has been read: ``wait_exit`` waits for that, and what the screen shows after
    it is final. No step here depends on how fast a thread gets scheduled.
    """

    def __init__(
        self,
        args: list[str],
        columns: int = 140,
        lines: int = 30,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self._master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.initial_modes = termios.tcgetattr(slave)
        env = {k: v for k, v in os.environ.items() if k not in {"COLUMNS", "LINES"}}
        env.update(extra_env or {})
        # faulthandler: a program that does not exit is sent SIGABRT and prints every thread's
        # stack (test_ctrl_c_quits_and_restores_the_terminal once timed out on a fresh clone).
        env.update(TERM="xterm", LANG="C.UTF-8", LC_ALL="C.UTF-8", PYTHONFAULTHANDLER="1")
        self.screen = pyte.Screen(columns, lines)
        self._stream = pyte.ByteStream(self.screen)
        self._changed = threading.Condition()
        self._screens: list[str] = []  # the screen after every chunk of output
        self._ended = False  # the program exited and all its output is on the screen
        self._output = bytearray()  # everything it wrote, for a failure's message
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _TAKE_TERMINAL, *args],
                stdin=slave,
                stdout=slave,
                stderr=slave,
                start_new_session=True,
                env=env,
                cwd=REPO_ROOT,
            )
        finally:
            os.close(slave)  # the program has its own copies now
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self._master, 65536)
            except OSError:  # EIO: the program has exited and everything it wrote was read
                data = b""
            with self._changed:
                if not data:
                    self._ended = True
                    self._changed.notify_all()
                    return
                self._output += data
                # One screen per escape sequence that changed it, not per read: a reader that
                # lags (a loaded machine) may get two redraws in one read, and a state shown
                # for one tick only (the change column) must still be seen.
                for piece in _pieces(data):
                    self._stream.feed(piece)
                    if self.screen.dirty:
                        self.screen.dirty.clear()
                        self._screens.append(
                            "\n".join(line.rstrip() for line in self.screen.display)
                        )
                self._changed.notify_all()

    def mark(self) -> int:
        """A point in the screen history for ``wait_for(..., since=)``."""
        with self._changed:
            return len(self._screens)

    def wait_for(
        self, predicate: Callable[[str], bool], what: str, since: int | None = None
    ) -> str:
        """The first screen (from ``since``, else the current one on) for which ``predicate``
        holds; every intermediate screen is looked at, so a change shown for one tick counts."""
        deadline = time.monotonic() + SCREEN_TIMEOUT_S
        with self._changed:
            index = max(0, len(self._screens) - 1) if since is None else since
            while True:
                while index < len(self._screens):
                    if predicate(self._screens[index]):
                        return self._screens[index]
                    index += 1
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0 or self._ended:
                    last = self._screens[-1] if self._screens else "(nothing drawn)"
                    raise AssertionError(f"no screen with {what}; the last one:\n{last}")
                self._changed.wait(remaining_s)

    def wait_exit(self) -> int:
        """The program's exit code, once it has exited and its last output is on the screen."""
        try:
            code = self.process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGABRT)  # faulthandler dumps its threads' stacks
            self.process.wait(EXIT_TIMEOUT_S)
            with self._changed:
                self._changed.wait_for(lambda: self._ended, EXIT_TIMEOUT_S)
                output = bytes(self._output[-8000:]).decode(errors="replace")
            raise AssertionError(
                f"the program did not exit within {EXIT_TIMEOUT_S} s; its last output:\n{output}"
            ) from None
        with self._changed:
            ended = self._changed.wait_for(lambda: self._ended, EXIT_TIMEOUT_S)
        assert ended, "the program exited but its terminal output never ended"
        return code

    def cursor_hidden(self) -> bool:
        with self._changed:
            return bool(self.screen.cursor.hidden)

    def send(self, data: bytes) -> None:
        os.write(self._master, data)

    def modes(self) -> list[object]:
        # On Linux the near end reports the far end's modes, even once the program has exited.
        return termios.tcgetattr(self._master)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(EXIT_TIMEOUT_S)
        self._reader.join(EXIT_TIMEOUT_S)
        os.close(self._master)


def _pieces(data: bytes) -> list[bytes]:
    """``data`` cut before every escape sequence (pyte's parser carries a cut sequence over)."""
    first, *rest = data.split(b"\x1b")
    return ([first] if first else []) + [b"\x1b" + piece for piece in rest]


@pytest.fixture
def unix_server(tmp_path: Path) -> Iterator[list[ManateeServer]]:
    """A server on a unix socket, restartable at the same address; the list holds the live one."""
    servers = [start_server(listen=f"unix://{tmp_path}/manatee.sock")]
    yield servers
    servers[-1].stop(grace_s=1.0)


def _lines(screen: str) -> list[str]:
    return screen.splitlines()


def _row_has(screen: str, vm_id: int, pattern: str) -> bool:
    """Whether VM ``vm_id``'s row, from the state column on, starts with ``pattern``."""
    return any(re.match(rf"\s*{vm_id}\s+{pattern}", line) for line in _lines(screen))


def _has_row(screen: str, vm_id: int, state: str) -> bool:
    return _row_has(screen, vm_id, rf"{state}\s")


def _header(screen: str) -> str:
    return _lines(screen)[0] if screen else ""


def test_live_view_in_a_terminal_through_a_reset_and_a_server_restart(
    unix_server: list[ManateeServer],
) -> None:
    server = unix_server[0]
    address = server.address
    first_session = session_id(server, 1)
    with Client(address) as client:
        first_vm = _start_vm(client, 512 * MIB, 256 * MIB)
    terminal = Terminal(["top", "--interval", "0.2", "--server", address])
    try:
        # Started with 256 MiB of its 512 MiB: the rest is in its balloon.
        screen = terminal.wait_for(
            lambda s: (
                _row_has(s, first_vm, r"running\s+512\.0 MiB\s+256\.0 MiB\s")
                and f" session {first_session} · connected · updated " in _header(s)
            ),
            f"VM {first_vm}'s statistics in session 1",
        )
        assert _has_row(screen, 0, "cros")
        assert terminal.cursor_hidden()

        # What moved since the last tick, on the VM's own row.
        mark = terminal.mark()
        with Client(address) as client:
            client.rebalance_memory({first_vm: -64 * MIB})
        terminal.wait_for(
            lambda s: _row_has(s, first_vm, r"running .*\]  Δballoon -64 MiB Δavail \+64 MiB"),
            "the balloon delta on the VM's row",
            since=mark,
        )

        # The server goes away: the last screen stays while top retries.
        server.stop(grace_s=1.0)
        screen = terminal.wait_for(
            lambda s: " · reconnecting… · " in _header(s) and "reconnecting… " in _lines(s)[1],
            "reconnecting",
        )
        assert _row_has(screen, first_vm, r"running\s+512\.0 MiB\s+192\.0 MiB\s")

        # A new server at the same address: its session ids differ from the old server's.
        server = start_server(listen=address)
        unix_server.append(server)
        restarted = session_id(server, 1)
        assert restarted != first_session
        screen = terminal.wait_for(
            lambda s: (
                f"session {first_session} → {restarted}: server restarted, mms was reset; "
                f"VMs {first_vm} gone"
                in s
                and f" session {restarted} · connected · " in _header(s)
                and not _has_row(s, first_vm, "running")
            ),
            "the restart's reset line",
        )
        with Client(address) as client:
            second_vm = _start_vm(client, 768 * MIB, 512 * MIB)
        terminal.wait_for(lambda s: _has_row(s, second_vm, "running"), "the new server's VM")

        # The server loses mms: mms drops every sibling VM and a new session begins; the
        # stream says so.
        assert simulator(server).drop_connection()
        reset = session_id(server, 2)
        screen = terminal.wait_for(
            lambda s: (
                f"session {restarted} → {reset}: mms was reset; VMs {second_vm} gone" in s
                and f" session {reset} · connected · " in _header(s)
                and not _has_row(s, second_vm, "running")
            ),
            "the in-stream reset line",
        )
        assert f"session {first_session} → {restarted}: server restarted" in screen  # stays
        print("\n" + screen)  # shown with -s: the screen quoted in the docs

        terminal.send(b"q")
        assert terminal.wait_exit() == 0
        assert terminal.modes() == terminal.initial_modes  # echo and line mode are back
        assert not terminal.cursor_hidden()
    finally:
        terminal.close()


def test_ctrl_c_quits_and_restores_the_terminal(server: ManateeServer) -> None:
    terminal = Terminal(["top", "--server", server.address])
    try:
        terminal.wait_for(lambda s: _has_row(s, 0, "cros"), "the CrOS guest's row")
        assert terminal.modes() != terminal.initial_modes  # curses took the terminal

        terminal.send(b"\x03")  # ^C, typed on the terminal: the line discipline sends SIGINT

        assert terminal.wait_exit() == 0
        assert terminal.modes() == terminal.initial_modes
        assert not terminal.cursor_hidden()
    finally:
        terminal.close()


def test_a_feed_still_busy_when_stop_closes_its_channel_ends_quietly(
    server: ManateeServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # stop() waits FEED_JOIN_S for the feed, then closes the channel whatever the feed does.
    monkeypatch.setattr(top, "FEED_JOIN_S", 0.0)
    unhandled: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", unhandled.append)
    busy, release = threading.Event(), threading.Event()

    def post(event: top.FeedEvent) -> None:
        busy.set()
        release.wait(EXIT_TIMEOUT_S)  # a slow consumer: the feed is here when stop() runs

    feed = top.Feed(server.address, 1.0, 10.0, None, post)
    feed.start()
    assert busy.wait(EXIT_TIMEOUT_S)
    feed.stop()  # the feed is inside post: the channel is closed under it
    release.set()
    feed._thread.join(EXIT_TIMEOUT_S)

    assert not feed._thread.is_alive()
    assert unhandled == []  # grpc refused the next call on the closed channel: no traceback


# Loaded into top (as sitecustomize): after every redraw an object is dropped whose finalizer
# runs on the main thread for a while, as any object's may (grpc's, a cycle the collector frees).
_SLOW_FINALIZER_AFTER_EACH_DRAW = """
import time
import manatee_grpc.cli._top as top

class _SlowFinalizer:
    def __del__(self):
        time.sleep(0.3)

_draw = top._draw

def _draw_then_finalize(*args, **kwargs):
    _draw(*args, **kwargs)
    _SlowFinalizer()

top._draw = _draw_then_finalize
"""


def test_ctrl_c_that_lands_in_a_finalizer_still_quits(
    server: ManateeServer, tmp_path: Path
) -> None:
    # Python swallows an exception raised inside a finalizer ("Exception ignored in ..."): a ^C
    # raised as KeyboardInterrupt wherever the main thread was got lost there, and top ran on.
    # The ^C below is sent right after a redraw, so it arrives while the finalizer runs.
    (tmp_path / "sitecustomize.py").write_text(_SLOW_FINALIZER_AFTER_EACH_DRAW)
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    terminal = Terminal(["top", "--server", server.address], extra_env={"PYTHONPATH": pythonpath})
    try:
        terminal.wait_for(lambda s: _has_row(s, 0, "cros"), "the CrOS guest's row")

        terminal.send(b"\x03")

        assert terminal.wait_exit() == 0
        assert terminal.modes() == terminal.initial_modes
        assert not terminal.cursor_hidden()
    finally:
        terminal.close()


def test_sigterm_also_restores_the_terminal(server: ManateeServer) -> None:
    terminal = Terminal(["top", "--server", server.address])
    try:
        terminal.wait_for(lambda s: _has_row(s, 0, "cros"), "the CrOS guest's row")

        terminal.process.send_signal(signal.SIGTERM)

        assert terminal.wait_exit() == 128 + signal.SIGTERM
        assert terminal.modes() == terminal.initial_modes
        assert not terminal.cursor_hidden()
    finally:
        terminal.close()


def test_a_server_without_the_service_ends_top_with_its_error() -> None:
    # Retrying cannot help here, so top gives up rather than reconnect for ever.
    bare = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    port = bare.add_insecure_port("127.0.0.1:0")
    bare.start()
    terminal = Terminal(["top", "--server", f"127.0.0.1:{port}"])
    try:
        assert terminal.wait_exit() == 10 + grpc.StatusCode.UNIMPLEMENTED.value[0]
        terminal.wait_for(lambda s: "error: UNIMPLEMENTED" in s, "the error, after curses")
        assert terminal.modes() == terminal.initial_modes
    finally:
        terminal.close()
        bare.stop(None)
