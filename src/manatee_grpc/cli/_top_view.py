"""The pure half of ``manatee-grpc top``: what the view knows, how the feed's events change it,
and how it renders as lines of text. No sockets, threads or terminal here: ``_top`` owns those
and calls ``TopView``'s methods and ``render``, so both can be tested on constructed messages.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc.cli._common import format_bytes

CROS_GUEST_VM_ID = 0
MAX_EVENTS = 50
# The events under the table: enough to see a reset and what came before it.
SHOWN_EVENTS = 5
MIN_BAR_WIDTH = 12
MAX_BAR_WIDTH = 40
# Room the CHANGE column keeps before the bar may grow: three deltas.
CHANGE_ROOM = 48
# A VM's latest change stays in the CHANGE column this many ticks (unless a newer one replaces
# it), with its age once it is not from the latest tick: a one-tick flash is easy to miss.
CHANGE_HOLD_TICKS = 10

CONNECTING = "connecting…"
CONNECTED = "connected"
RECONNECTING = "reconnecting…"

BALLOON_CHAR = "#"
USED_CHAR = "="
AVAILABLE_CHAR = "+"
FREE_CHAR = "."
UNKNOWN_CHAR = "?"
LEGEND_ONCE = (
    f"bar of each VM's memory: {BALLOON_CHAR} balloon  {USED_CHAR} used  "
    f"{AVAILABLE_CHAR} available (caches)  {FREE_CHAR} free"
)
QUITS = "  ·  q quits"
LEGEND = LEGEND_ONCE + QUITS  # the live view's; ``--once`` has no keys to press

# For terminals whose encoding cannot show the few non-ASCII characters used here.
ASCII_FALLBACK = str.maketrans({"…": "...", "Δ": "d", "→": "->", "·": "|"})

Snapshot = pb.BalloonStatsSnapshot | pb.GetBalloonStatsResponse

_STATE_NAMES = {pb.VM_STATE_STARTING: "starting", pb.VM_STATE_RUNNING: "running"}


def clock(unix_s: float) -> str:
    """Local wall-clock time as the view shows it: ``14:03:59``."""
    return time.strftime("%H:%M:%S", time.localtime(unix_s))


@dataclass(frozen=True, slots=True)
class Sample:
    """One VM's numbers at one tick; None where the guest did not report the statistic."""

    balloon_bytes: int
    total_bytes: int | None
    available_bytes: int | None
    free_bytes: int | None

    @classmethod
    def from_stats(cls, stats: pb.VmBalloonStats) -> Sample:
        return cls(
            stats.balloon_actual_bytes,
            stats.total_memory_bytes if stats.HasField("total_memory_bytes") else None,
            stats.available_memory_bytes if stats.HasField("available_memory_bytes") else None,
            stats.free_memory_bytes if stats.HasField("free_memory_bytes") else None,
        )


@dataclass
class TopView:
    """Everything ``render`` shows. The feed calls the methods; each takes the time it happened."""

    server: str
    interval_s: float | None  # None: one screen (``--once``), no updates to expect
    connection: str = CONNECTING
    problem: str = ""  # why the last subscription ended, while reconnecting
    attempt: int = 0
    retry_at_s: float | None = None
    # The mms session's opaque id: unique across mms resets and server restarts.
    session: str | None = None
    # The server went away since the last ListVms: a new session then may be a new server.
    lost_server: bool = False
    updated_at_s: float | None = None
    samples: dict[int, Sample] = field(default_factory=dict)
    # Snapshots applied so far, and each VM's latest change (kept CHANGE_HOLD_TICKS ticks).
    ticks: int = 0
    changes: dict[int, Change] = field(default_factory=dict)
    missing_vm_ids: tuple[int, ...] = ()
    vms: dict[int, pb.VmInfo] = field(default_factory=dict)  # of the current session only
    dropped_updates: int = 0
    events: list[tuple[float, str]] = field(default_factory=list)
    # The latest POLICY_DECISION the server reported (WatchEvents), as one line; None: none yet.
    policy: str | None = None

    # --- what the feed reports ---------------------------------------------------------------

    def connected(self) -> None:
        self.connection = CONNECTED
        self.problem = ""
        self.attempt = 0
        self.retry_at_s = None

    def disconnected(self, problem: str, attempt: int, retry_in_s: float, now_s: float) -> None:
        """The stream ended or a call failed; the last screen stays until the next tick."""
        self.connection = RECONNECTING
        self.lost_server = True
        self.problem = problem
        self.attempt = attempt
        self.retry_at_s = now_s + retry_in_s

    def vm_list(self, response: pb.ListVmsResponse, now_s: float) -> None:
        if self.session is not None and response.session != self.session:
            # Seen across a lost server connection, the new session is most likely a new
            # server process (whose mms link is new too).
            self.session_reset(
                self.session, response.session, now_s, server_restarted=self.lost_server
            )
        elif self.session is not None:
            self._note_added_and_removed(self.vms, response.vms, now_s)
        self.session = response.session
        self.lost_server = False
        self.vms = {vm.vm_id: vm for vm in response.vms}

    def message(self, message: pb.WatchBalloonStatsResponse, now_s: float) -> None:
        """One event of the WatchBalloonStats stream."""
        self.dropped_updates += message.dropped_updates
        event = message.WhichOneof("event")
        if event == "session_reset":
            reset = message.session_reset
            self.session_reset(reset.previous_session, reset.session, now_s)
        elif event == "mms_unavailable":
            outage = message.mms_unavailable
            self._event(now_s, f"mms unavailable ({outage.reason}): {outage.message}")
        elif event == "snapshot":
            self.snapshot(message.snapshot, now_s)

    def server_event(self, event: pb.Event, now_s: float) -> None:
        """One event of the server's WatchEvents stream: a line under the table."""
        from manatee_grpc.cli._events_view import summary, who

        line = f"{summary(event)} by {who(event)}"
        if event.kind == pb.EVENT_KIND_POLICY_DECISION:
            from manatee_grpc.cli._events_view import policy_state

            decided = summary(event).removeprefix("POLICY_DECISION ")
            state = policy_state(event)
            self.policy = f"{decided} ({state})" if state else f"{decided} by {who(event)}"
        self._event(event.time.ToNanoseconds() / 1e9 if event.HasField("time") else now_s, line)

    def snapshot(self, snapshot: Snapshot, now_s: float) -> None:
        if self.session is not None and snapshot.session != self.session:
            # A reset the stream did not tell us about (it happened between two subscriptions).
            self.session_reset(self.session, snapshot.session, now_s)
        samples = {stats.vm_id: Sample.from_stats(stats) for stats in snapshot.stats}
        self.ticks += 1
        if self.updated_at_s is not None:  # the first screen has nothing to compare with
            for vm_id, sample in samples.items():
                change = _change_between(self.samples.get(vm_id), sample, self.ticks, now_s)
                if change is not None:
                    self.changes[vm_id] = change
        self.samples = samples
        self.changes = {
            vm_id: change
            for vm_id, change in self.changes.items()
            if vm_id in samples and self.ticks - change.tick < CHANGE_HOLD_TICKS
        }
        self.missing_vm_ids = tuple(snapshot.missing_vm_ids)
        self.session = snapshot.session
        self.updated_at_s = now_s

    def session_reset(
        self, previous_session: str, session: str, now_s: float, *, server_restarted: bool = False
    ) -> None:
        """mms dropped every sibling VM: say which, and keep only the CrOS guest's last row."""
        gone = sorted(
            {*self.samples, *self.vms, *self.missing_vm_ids} - {CROS_GUEST_VM_ID},
        )
        cause = "server restarted, mms was reset" if server_restarted else "mms was reset"
        lost = f"VMs {','.join(map(str, gone))} gone" if gone else "no sibling VMs were running"
        self._event(now_s, f"session {previous_session} → {session}: {cause}; {lost}")
        self.session = session
        self.vms = {}
        self.samples = {k: v for k, v in self.samples.items() if k == CROS_GUEST_VM_ID}
        self.changes = {k: v for k, v in self.changes.items() if k == CROS_GUEST_VM_ID}
        self.missing_vm_ids = ()

    # --- helpers -------------------------------------------------------------------------------

    def _note_added_and_removed(
        self, before: dict[int, pb.VmInfo], after: Iterable[pb.VmInfo], now_s: float
    ) -> None:
        # The CrOS guest is there in every session: only siblings come and go.
        after_by_id = {vm.vm_id: vm for vm in after if not vm.cros_guest}
        before = {vm_id: vm for vm_id, vm in before.items() if not vm.cros_guest}
        for vm_id in sorted(after_by_id.keys() - before.keys()):
            size = format_bytes(after_by_id[vm_id].mem_size_bytes)
            self._event(now_s, f"VM {vm_id} added ({size})")
        for vm_id in sorted(before.keys() - after_by_id.keys()):
            self._event(now_s, f"VM {vm_id} removed")

    def _event(self, now_s: float, text: str) -> None:
        self.events.append((now_s, text))
        del self.events[:-MAX_EVENTS]


# --- rendering -------------------------------------------------------------------------------


def render(view: TopView, width: int, height: int | None, now_s: float) -> list[str]:
    """The screen as lines no wider than ``width``; at most ``height`` of them (None: all)."""
    top = [_header(view, now_s), _status(view, now_s), ""]
    table = _table(view, width)
    events = [f"{clock(at_s)}  {text}" for at_s, text in view.events]
    if height is None:
        body = table + (["", *events] if events else [])
    else:
        # The latest events always get their lines (a reset must stay visible); the table
        # takes the rest and says how many VMs it had to leave out.
        count = min(SHOWN_EVENTS, len(events), max(0, height - len(top) - 3))
        shown_events = events[len(events) - count :]
        room = height - len(top) - (count + 1 if count else 0)
        if len(table) > room:
            kept = max(1, room - 1)
            table = [*table[:kept], f"… {len(table) - kept} more VMs"]
        body = table + (["", *shown_events] if shown_events else [])
    lines = [*top, *body]
    if height is not None:
        lines = lines[:height]
    return [_fit(line, width) for line in lines]


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


def _header(view: TopView, now_s: float) -> str:
    # The address goes last: it can be a long socket path, and a narrow terminal cuts the end.
    parts = ["manatee-grpc top"]
    parts.append(f"session {view.session}" if view.session is not None else "session ?")
    parts.append(view.connection)
    if view.updated_at_s is None:
        parts.append("no data yet")
    else:
        age_s = now_s - view.updated_at_s
        # Only a late update is worth a number: a current one is within an interval.
        late_s = 2 * view.interval_s + 1 if view.interval_s is not None else None
        late = f" ({age_s:.0f} s ago)" if late_s is not None and age_s >= late_s else ""
        parts.append(f"updated {clock(view.updated_at_s)}{late}")
    if view.interval_s is not None:
        parts.append(f"every {view.interval_s:g} s")
    if view.dropped_updates:
        parts.append(f"{view.dropped_updates} updates dropped")
    parts.append(f"policy: {view.policy}" if view.policy is not None else "policy: none seen")
    parts.append(view.server)
    return " · ".join(parts)


def _status(view: TopView, now_s: float) -> str:
    """The legend; while reconnecting, why and when the next attempt is."""
    if view.interval_s is None:
        return LEGEND_ONCE
    if view.connection != RECONNECTING:
        return LEGEND
    retry_in_s = max(0.0, (view.retry_at_s or now_s) - now_s)
    # "The last update" only once there was one: before, the screen shows none.
    kept = "; showing the last update" if view.updated_at_s is not None else ""
    return (
        f"{RECONNECTING} {view.problem}; attempt {view.attempt}, next in {retry_in_s:.1f} s"
        f"{kept}{QUITS}"
    )


_COLUMNS = ("VM", "STATE", "MEMORY", "BALLOON", "AVAILABLE", "FREE")


def _table(view: TopView, width: int) -> list[str]:
    vm_ids = sorted({*view.samples, *view.missing_vm_ids, *view.vms})
    if not vm_ids:
        return ["waiting for the first snapshot…" if view.updated_at_s is None else "no VMs"]
    rows: list[list[str]] = []
    memory: dict[int, int | None] = {vm_id: _memory_bytes(view, vm_id) for vm_id in vm_ids}
    for vm_id in vm_ids:
        sample = view.samples.get(vm_id)
        cells = [str(vm_id), _state(view, vm_id), _size(memory[vm_id])]
        if sample is None:
            cells += ["-", "-", "-"]
        else:
            cells += [
                format_bytes(sample.balloon_bytes),
                _size(sample.available_bytes),
                _size(sample.free_bytes),
            ]
        rows.append(cells)
    widths = [max(len(c[i]) for c in [list(_COLUMNS), *rows]) for i in range(6)]
    fixed = sum(widths) + 2 * len(widths)
    bar_width = max(MIN_BAR_WIDTH, min(MAX_BAR_WIDTH, width - fixed - 4 - CHANGE_ROOM))
    # What is left of the line for CHANGE: each change takes the widest form that fits.
    change_room = width - (fixed + bar_width + 4)

    def line(cells: Sequence[str], bar: str, change: str) -> str:
        # Ids, then text left-aligned, numbers right-aligned.
        aligned = [
            cell.ljust(w) if i == 1 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return f"{'  '.join(aligned)}  {bar}  {change}".rstrip()

    lines = [line(_COLUMNS, "BAR".ljust(bar_width + 2), "CHANGE")]
    for vm_id, cells in zip(vm_ids, rows, strict=True):
        sample = view.samples.get(vm_id)
        change = _change(view, vm_id, change_room)
        lines.append(line(cells, f"[{bar(sample, memory[vm_id], bar_width)}]", change))
    return lines


def _state(view: TopView, vm_id: int) -> str:
    if vm_id == CROS_GUEST_VM_ID:
        return "cros"
    info = view.vms.get(vm_id)
    return _STATE_NAMES.get(info.state, "?") if info is not None else "?"


def _memory_bytes(view: TopView, vm_id: int) -> int | None:
    """The VM's memory: its size from ListVms, else (CrOS guest) balloon plus what the guest has."""
    info = view.vms.get(vm_id)
    if info is not None and info.mem_size_bytes > 0:
        return int(info.mem_size_bytes)
    sample = view.samples.get(vm_id)
    if sample is None or sample.total_bytes is None:
        return None
    return sample.balloon_bytes + sample.total_bytes


def _size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


@dataclass(frozen=True, slots=True)
class Change:
    """What moved in one VM at one tick: its deltas (name, bytes), or that it is new."""

    tick: int
    at_s: float
    deltas: tuple[tuple[str, int], ...] = ()

    @property
    def is_new(self) -> bool:
        return not self.deltas


def _change_between(before: Sample | None, after: Sample, tick: int, now_s: float) -> Change | None:
    """The change from ``before`` to ``after`` (a new VM if there was no ``before``), if any."""
    if before is None:
        return Change(tick, now_s)
    pairs = [
        ("balloon", before.balloon_bytes, after.balloon_bytes),
        ("avail", before.available_bytes, after.available_bytes),
        ("free", before.free_bytes, after.free_bytes),
    ]
    deltas = tuple(
        (name, now - then)
        for name, then, now in pairs
        if then is not None and now is not None and now != then
    )
    return Change(tick, now_s, deltas) if deltas else None


# Shorter names for the CHANGE column when the full ones do not fit.
_SHORT_NAMES = {"balloon": "bal", "avail": "av", "free": "free"}


def _change(view: TopView, vm_id: int, room: int) -> str:
    """The CHANGE cell, in the widest of its forms that fits ``room`` columns."""
    sample = view.samples.get(vm_id)
    if sample is None:
        if vm_id in view.missing_vm_ids:
            return "no statistics from mms"
        info = view.vms.get(vm_id)
        return "starting" if info is not None and info.state == pb.VM_STATE_STARTING else ""
    change = view.changes.get(vm_id)
    if change is None:
        return ""
    age = ""
    if change.tick != view.ticks and view.updated_at_s is not None:
        age = f" ({max(0, round(view.updated_at_s - change.at_s))} s ago)"
    if change.is_new:
        return f"new{age}"
    full = " ".join(f"Δ{name} {_short_bytes(delta)}" for name, delta in change.deltas)
    compact = " ".join(f"Δ{name} {_compact_bytes(delta)}" for name, delta in change.deltas)
    short = " ".join(
        f"Δ{_SHORT_NAMES[name]} {_compact_bytes(delta)}" for name, delta in change.deltas
    )
    forms = [full + age, compact + age, short + age, short]
    # None fits (a narrow terminal): the shortest, which the line's cut then ends with "…".
    return next((form for form in forms if len(form) <= room), forms[-1])


def _short_bytes(delta_bytes: int) -> str:
    """``+128 MiB``, ``-1.5 GiB``: ``format_bytes`` without trailing zeros, to fit three."""
    number, unit = format_bytes(delta_bytes, signed=True).split(" ")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return f"{number} {unit}"


def _compact_bytes(delta_bytes: int) -> str:
    """``+128M``, ``-1.5G``, ``+512B``: ``_short_bytes`` with a one-letter unit."""
    number, unit = _short_bytes(delta_bytes).split(" ")
    return number + unit[0]


def bar(sample: Sample | None, memory_bytes: int | None, width: int) -> str:
    """``width`` characters splitting the VM's memory into balloon, used, available, free."""
    if sample is None:
        return UNKNOWN_CHAR * width
    balloon = max(0, sample.balloon_bytes)
    total = sample.total_bytes
    if total is None:
        parts = [
            (balloon, BALLOON_CHAR),
            (max(0, (memory_bytes or balloon) - balloon), UNKNOWN_CHAR),
        ]
    else:
        total = max(0, total)
        available = sample.available_bytes
        free = sample.free_bytes
        if available is None and free is None:
            parts = [(balloon, BALLOON_CHAR), (total, UNKNOWN_CHAR)]
        else:
            # A guest that reports only one of the two: free memory is available too.
            available = min(total, max(0, available if available is not None else free or 0))
            free = min(available, max(0, free if free is not None else 0))
            parts = [
                (balloon, BALLOON_CHAR),
                (total - available, USED_CHAR),
                (available - free, AVAILABLE_CHAR),
                (free, FREE_CHAR),
            ]
    whole = max(memory_bytes or 0, sum(size for size, _ in parts))
    if whole == 0:
        return " " * width
    # Round the running sum, not each part, so the parts always add up to ``width``.
    out: list[str] = []
    running = 0
    drawn = 0
    for size, char in parts:
        running += size
        end = round(running * width / whole)
        out.append(char * (end - drawn))
        drawn = end
    return "".join(out).ljust(width)
