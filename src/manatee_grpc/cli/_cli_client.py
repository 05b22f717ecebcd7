"""The operator subcommands of ``manatee-grpc`` (vms, stats, rebalance, launch, remove, health;
``top`` lives in ``_top``).

Each talks to a running server through ``manatee_grpc.Client``; output is an aligned table, or
JSON with stable keys under ``--json``. A server error exits with 10 + its gRPC status code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc.cli._common import (
    GIB,
    KIB,
    MIB,
    TIB,
    UsageError,
    credentials_from,
    format_bytes,
)
from manatee_grpc.client import DEFAULT_LAUNCH_TIMEOUT_S, Client, ManateeRpcError

DEFAULT_SERVER = "127.0.0.1:50051"
ERROR_EXIT_BASE = 10

# Binary units only: "2G" means 2 GiB, as with crosvm's and concierge's memory sizes.
_UNITS_BYTES = {
    "": 1,
    "b": 1,
    "k": KIB,
    "kib": KIB,
    "m": MIB,
    "mib": MIB,
    "g": GIB,
    "gib": GIB,
    "t": TIB,
    "tib": TIB,
}
_SIZE_RE = re.compile(r"([+-]?)(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


# --- pure helpers: sizes and tables ----------------------------------------------------------


def parse_size_bytes(text: str, *, signed: bool = False) -> int:
    """Bytes from ``"4096"``, ``"4KiB"``, ``"512MiB"``, ``"2G"``, ``"1.5GiB"`` (and a sign if
    ``signed``: ``"-64MiB"``). Raises ValueError with a message for the operator."""
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None or match.group(3).lower() not in _UNITS_BYTES:
        raise ValueError(
            f"cannot read size {text!r}: use bytes or a number with B, K/KiB, M/MiB, G/GiB, T/TiB"
        )
    sign: str = match.group(1)
    number: str = match.group(2)
    unit: str = match.group(3)
    if sign and not signed:
        raise ValueError(f"a size cannot have a sign: {text!r}")
    whole, _, fraction = number.partition(".")
    scale: int = 10 ** len(fraction)
    numerator = (int(whole) * scale + int(fraction or "0")) * _UNITS_BYTES[unit.lower()]
    # Exact integer arithmetic: "1.5GiB" is a whole number of bytes, "0.3K" is not.
    if numerator % scale:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    value = numerator // scale
    return -value if sign == "-" else value


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[str]], *, right: Sequence[int] = ()
) -> str:
    """Columns two spaces apart; those in ``right`` (numbers) are right-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _size_arg(text: str) -> int:
    try:
        return parse_size_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _delta_arg(text: str) -> tuple[int, int]:
    vm_text, equals, delta_text = text.partition("=")
    if not equals or not vm_text.strip().isdigit():
        raise argparse.ArgumentTypeError(f"expected ID=DELTA such as 1=-64MiB, got {text!r}")
    try:
        return int(vm_text), parse_size_bytes(delta_text, signed=True)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- output ------------------------------------------------------------------------------------

_STATE_NAMES = {pb.VM_STATE_STARTING: "starting", pb.VM_STATE_RUNNING: "running"}

# (JSON key / proto field, table column, is a byte count)
_STAT_FIELDS: tuple[tuple[str, str, bool], ...] = (
    ("balloon_actual_bytes", "BALLOON", True),
    ("total_memory_bytes", "TOTAL", True),
    ("available_memory_bytes", "AVAILABLE", True),
    ("free_memory_bytes", "FREE", True),
    ("disk_caches_bytes", "CACHES", True),
    ("shared_memory_bytes", "SHARED", True),
    ("unevictable_memory_bytes", "UNEVICTABLE", True),
    ("swap_in_bytes", "SWAP_IN", True),
    ("swap_out_bytes", "SWAP_OUT", True),
    ("major_faults", "MAJ_FLT", False),
    ("minor_faults", "MIN_FLT", False),
    ("hugetlb_allocations", "HUGETLB_OK", False),
    ("hugetlb_failures", "HUGETLB_FAIL", False),
)


def _vm_json(vm: pb.VmInfo) -> dict[str, Any]:
    return {
        "vm_id": vm.vm_id,
        "state": _STATE_NAMES.get(vm.state, "unspecified"),
        "mem_size_bytes": vm.mem_size_bytes,
        "init_mem_size_bytes": vm.init_mem_size_bytes,
        "cros_guest": vm.cros_guest,
        "since": vm.since.ToJsonString() if vm.HasField("since") else None,
        "session": vm.session,
    }


def _vms_table(vms: Sequence[pb.VmInfo]) -> str:
    rows = [
        [
            str(vm.vm_id),
            _STATE_NAMES.get(vm.state, "unspecified"),
            "-" if vm.cros_guest else format_bytes(vm.mem_size_bytes),
            "-" if vm.cros_guest else format_bytes(vm.init_mem_size_bytes),
            vm.since.ToJsonString() if vm.HasField("since") else "-",
            "cros guest" if vm.cros_guest else "",
        ]
        for vm in vms
    ]
    return format_table(["ID", "STATE", "MEMORY", "INITIAL", "SINCE", "NOTE"], rows, right=(2, 3))


def _stat_values(stats: pb.VmBalloonStats) -> dict[str, int | None]:
    """Each statistic by field name; None where the guest did not report it."""
    reported: dict[str, int] = {field.name: value for field, value in stats.ListFields()}
    values: dict[str, int | None] = {field: reported.get(field) for field, _, _ in _STAT_FIELDS}
    values["balloon_actual_bytes"] = stats.balloon_actual_bytes  # not optional: 0 is a value
    return values


def _stats_json(stats: pb.VmBalloonStats) -> dict[str, Any]:
    return {"vm_id": stats.vm_id, **_stat_values(stats)}


def _stats_row(stats: pb.VmBalloonStats) -> list[str]:
    values = _stat_values(stats)
    row = [str(stats.vm_id)]
    for field, _, is_bytes in _STAT_FIELDS:
        value = values[field]
        if value is None:
            row.append("-")
        else:
            row.append(format_bytes(value) if is_bytes else str(value))
    return row


def _reason_name(reason: pb.UnreadableReason.ValueType) -> str:
    """``WRAPPED`` for UNREADABLE_REASON_WRAPPED; the number for a reason newer than this CLI."""
    try:
        return pb.UnreadableReason.Name(reason).removeprefix("UNREADABLE_REASON_")
    except ValueError:
        return str(reason)


def _unreadable_json(unreadable: pb.UnreadableVm) -> dict[str, Any]:
    return {
        "vm_id": unreadable.vm_id,
        "reason": _reason_name(unreadable.reason).lower(),
        "mms_field": unreadable.mms_field,
        "mms_value": unreadable.mms_value,
    }


def _deltas_json(deltas: Sequence[pb.BalloonDelta]) -> list[dict[str, int]]:
    return [{"vm_id": d.vm_id, "delta_bytes": d.delta_bytes} for d in deltas]


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# --- subcommands -------------------------------------------------------------------------------


def _cmd_vms(client: Client, args: argparse.Namespace) -> int:
    response = client.list_vms()
    if args.json:
        _print_json({"session": response.session, "vms": [_vm_json(vm) for vm in response.vms]})
    else:
        print(_vms_table(response.vms))
        # VM ids repeat in every mms session: `remove ID --session S` acts only in this one.
        print(f"session {response.session or '(none: mms not reached yet)'}")
    return 0


def _cmd_stats(client: Client, args: argparse.Namespace) -> int:
    response = client.get_balloon_stats(args.vm_ids, session=args.session)
    if args.json:
        _print_json(
            {
                "session": response.session,
                "read_time": response.read_time.ToJsonString(),
                "stats": [_stats_json(s) for s in response.stats],
                "missing_vm_ids": list(response.missing_vm_ids),
                "unreadable_vms": [_unreadable_json(u) for u in response.unreadable_vms],
            }
        )
        return 0
    header = ["VM", *(column for _, column, _ in _STAT_FIELDS)]
    rows = [_stats_row(s) for s in response.stats]
    print(format_table(header, rows, right=range(1, len(header))))
    # An unreadable VM is also in missing_vm_ids; say why mms's answer for it was refused.
    for unreadable in response.unreadable_vms:
        print(
            f"VM {unreadable.vm_id}: unreadable ({_reason_name(unreadable.reason)}: "
            f"{unreadable.mms_field}={unreadable.mms_value})"
        )
    unreadable_ids = {unreadable.vm_id for unreadable in response.unreadable_vms}
    missing = [vm_id for vm_id in response.missing_vm_ids if vm_id not in unreadable_ids]
    if missing:
        print(f"no statistics for VM {', '.join(str(i) for i in missing)}")
    return 0


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _cmd_rebalance(client: Client, args: argparse.Namespace) -> int:
    deltas = dict(args.deltas)
    if len(deltas) != len(args.deltas):
        raise UsageError("each VM may appear only once")
    response = client.rebalance_memory(deltas, session=args.session, validate_only=args.dry_run)
    if args.json:
        answer: dict[str, object] = {
            "requested_deltas": _deltas_json(response.requested_deltas),
            "actual_deltas": _deltas_json(response.actual_deltas),
            "fully_applied": response.fully_applied,
        }
        if args.dry_run:
            answer["dry_run"] = True  # what would move: nothing did
        _print_json(answer)
        return 0
    actual = {d.vm_id: d.delta_bytes for d in response.actual_deltas}
    rows = [
        [
            str(d.vm_id),
            format_bytes(d.delta_bytes, signed=True),
            format_bytes(actual.get(d.vm_id, 0), signed=True),
        ]
        for d in response.requested_deltas
    ]
    actual_heading = "WOULD MOVE" if args.dry_run else "ACTUAL"
    print(format_table(["VM", "REQUESTED", actual_heading], rows, right=(1, 2)))
    if args.dry_run:
        print(f"dry run, nothing moved; would be fully applied: {_yes_no(response.fully_applied)}")
    else:
        print(f"fully applied: {_yes_no(response.fully_applied)}")
    return 0


def _cmd_launch(client: Client, args: argparse.Namespace) -> int:
    err: TextIO = sys.stderr

    def on_queued(position: int) -> None:
        # Launches queue device-wide for mms's one pending start: say so, or a wait looks hung.
        print(f"queued: position {position} (another VM start is pending)", file=err, flush=True)

    def on_progress(attempt: int, shortfall_bytes: int) -> None:
        print(f"attempt {attempt}: shortfall {format_bytes(shortfall_bytes)}", file=err, flush=True)

    def start_vm(vm_id: int, balloon_control_path: str) -> bool:
        print(f"reserved VM {vm_id}: balloon control {balloon_control_path}", file=err, flush=True)
        if args.start_cmd is not None:
            return _run_hook(args.start_cmd, vm_id, balloon_control_path) == 0
        print(f"start crosvm for VM {vm_id}; started? [y/N] ", end="", file=err, flush=True)
        answer = sys.stdin.readline()
        return answer.strip().lower() in {"y", "yes"}

    def stop_vm(vm_id: int) -> None:
        print(f"the server asks to stop VM {vm_id}", file=err, flush=True)
        if args.stop_cmd is not None:
            _run_hook(args.stop_cmd, vm_id, "")

    vm = client.launch_vm(
        args.mem_size_bytes,
        init_mem_size_bytes=args.init_mem_size_bytes,
        start_vm=start_vm,
        stop_vm=stop_vm,
        on_progress=on_progress,
        on_queued=on_queued,
        timeout_s=args.launch_timeout or None,
    )
    if args.json:
        _print_json(_vm_json(vm))
    else:
        print(_vms_table([vm]))
        print(f"session {vm.session}")
    return 0


def _run_hook(command: str, vm_id: int, balloon_control_path: str) -> int:
    """Run an operator's shell command for one VM; its output goes to stderr, not our stdout."""
    # replace, not str.format: shell commands are full of braces.
    expanded = command.replace("{vm_id}", str(vm_id)).replace(
        "{balloon_control_path}", shlex.quote(balloon_control_path)
    )
    env = {
        **os.environ,
        "MANATEE_VM_ID": str(vm_id),
        "MANATEE_BALLOON_CONTROL_PATH": balloon_control_path,
    }
    sys.stderr.flush()
    return subprocess.run(expanded, shell=True, env=env, stdout=sys.stderr, check=False).returncode


def _cmd_remove(client: Client, args: argparse.Namespace) -> int:
    client.remove_vm(args.vm_id, session=args.session)
    if args.json:
        _print_json({"vm_id": args.vm_id, "session": args.session, "removed": True})
    elif args.session:
        print(f"removed VM {args.vm_id} of session {args.session}")
    else:
        print(f"removed VM {args.vm_id} of the current session")
    return 0


def _cmd_health(client: Client, args: argparse.Namespace) -> int:
    status = client.health()
    if args.json:
        _print_json({"service": "manatee.memory.v1.MemoryService", "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


DEFAULT_EVENTS = 20


def _count_arg(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number") from None
    if not 0 <= count < 2**32:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 or more")
    return count


def _kind_arg(text: str) -> pb.EventKind.ValueType:
    from manatee_grpc.cli._events_view import kind_names, kind_value

    try:
        return kind_value(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected one of {', '.join(kind_names())}"
        ) from None


def _cmd_events(client: Client, args: argparse.Namespace) -> int:
    from manatee_grpc.cli._events_view import event_json, event_line

    for message in client.watch_events(args.last, args.kinds):
        update = message.WhichOneof("update")
        if update == "caught_up":
            if not args.follow:
                return 0
            continue
        if update == "events_missed":
            missed = message.events_missed
            if args.json:
                line = {"missed": missed.count, "first_sequence": missed.first_sequence,
                        "last_sequence": missed.last_sequence}  # fmt: skip
                print(json.dumps(line, separators=(",", ":")), flush=True)
            else:
                print(f"... {missed.count} events missed (#{missed.first_sequence}"
                      f"-#{missed.last_sequence}): reading too slowly", flush=True)  # fmt: skip
            continue
        if args.json:
            print(json.dumps(event_json(message.event), separators=(",", ":")), flush=True)
        else:
            print(event_line(message.event), flush=True)
    return 0


# --- wiring ------------------------------------------------------------------------------------


def add_client_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register the client subcommands on the ``manatee-grpc`` parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help="manatee-grpc address: HOST:PORT or unix:///abs/path (default %(default)s)",
    )
    common.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="seconds per call (default %(default)s)",
    )
    common.add_argument(
        "--tls-ca",
        default=None,
        metavar="PEM",
        help="connect with TLS, trusting this CA (default: plaintext, unless --tls-cert)",
    )
    common.add_argument(
        "--tls-cert",
        default=None,
        metavar="PEM",
        help="client certificate for mutual TLS (default: none)",
    )
    common.add_argument(
        "--tls-key", default=None, metavar="PEM", help="its private key (default: none)"
    )
    # Every command but `top` (a screen, not a report) can print JSON instead of a table.
    with_json = argparse.ArgumentParser(add_help=False)
    with_json.add_argument(
        "--json", action="store_true", help="print JSON with stable keys, for scripts"
    )

    def add(
        name: str,
        run: Callable[[Client, argparse.Namespace], int],
        help_text: str,
        *,
        json: bool = True,
    ) -> Any:
        parents = [common, with_json] if json else [common]
        parser = commands.add_parser(name, parents=parents, help=help_text)
        parser.set_defaults(client_command=run)
        return parser

    add("vms", _cmd_vms, "list the VMs of the current mms session")
    stats = add("stats", _cmd_stats, "balloon statistics of some or all VMs")
    stats.add_argument(
        "vm_ids", nargs="*", type=int, metavar="ID", help="VMs to show (default: every VM)"
    )
    _add_session_argument(stats)
    rebalance = add("rebalance", _cmd_rebalance, "move memory between sibling VMs and CrOS")
    rebalance.add_argument(
        "deltas",
        nargs="+",
        type=_delta_arg,
        metavar="ID=DELTA",
        help="balloon delta per VM, e.g. 1=-64MiB (negative gives the VM memory)",
    )
    rebalance.add_argument(
        "--dry-run",
        action="store_true",
        help="preview what the rebalance would move now (validate_only); nothing moves",
    )
    _add_session_argument(rebalance)
    launch = add("launch", _cmd_launch, "launch a sibling VM (LaunchVm)")
    launch.add_argument(
        "mem_size_bytes", type=_size_arg, metavar="SIZE", help="the VM's memory, e.g. 2GiB"
    )
    launch.add_argument(
        "--init",
        dest="init_mem_size_bytes",
        type=_size_arg,
        default=None,
        metavar="SIZE",
        help="memory the VM starts with, the rest inside its balloon (default: the smaller of "
        "1000 MiB and SIZE)",
    )
    launch.add_argument(
        "--start-cmd",
        default=None,
        metavar="CMD",
        help="shell command that starts crosvm; {vm_id} and {balloon_control_path} are "
        "substituted; exit status 0 means started (default: none, you are asked on stdin)",
    )
    launch.add_argument(
        "--stop-cmd",
        default=None,
        metavar="CMD",
        help="shell command that stops VM {vm_id} when the server asks (default: none)",
    )
    launch.add_argument(
        "--launch-timeout",
        type=float,
        default=DEFAULT_LAUNCH_TIMEOUT_S,
        metavar="SECONDS",
        help="deadline for the whole launch (default %(default)g; 0 for none)",
    )
    remove = add("remove", _cmd_remove, "remove a sibling VM or release a pending start")
    remove.add_argument("vm_id", type=int, metavar="ID", help="the VM (or pending start) id")
    _add_session_argument(remove)
    add("health", _cmd_health, "health of the MemoryService (exit 1 unless SERVING)")
    events = add("events", _cmd_events, "what happened and who asked (WatchEvents)")
    events.add_argument(
        "--last",
        type=_count_arg,
        default=DEFAULT_EVENTS,
        metavar="N",
        help="show the last N events the server holds first (default %(default)s)",
    )
    events.add_argument(
        "--follow", "-f", action="store_true", help="then keep printing new events (Ctrl-C quits)"
    )
    events.add_argument(
        "--kind",
        dest="kinds",
        action="append",
        type=_kind_arg,
        default=[],
        metavar="KIND",
        help="only events of this kind (repeatable), e.g. rebalance_memory (default: every kind)",
    )
    # Imported here: _top imports this module's helpers.
    from manatee_grpc.cli._top import add_top_arguments, run_top

    add_top_arguments(
        add("top", run_top, "live view of every VM's memory (q or Ctrl-C quits)", json=False)
    )


def _add_session_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--session",
        default="",
        metavar="SESSION",
        help="the mms session the VM ids come from (as `vms` prints it); the server refuses "
        "them (SESSION_RESET) if mms was reset since, instead of acting on the VM that has the "
        "same id now (default: the current session)",
    )


def is_client_command(args: argparse.Namespace) -> bool:
    return hasattr(args, "client_command")


def run_client_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run a parsed client subcommand; errors become a stderr line and an exit code."""
    try:
        credentials = credentials_from(args)
        with Client(args.server, timeout_s=args.timeout, credentials=credentials) as client:
            code: int = args.client_command(client, args)
            return code
    except UsageError as exc:
        parser.error(str(exc))
    except ManateeRpcError as exc:
        reason = f" ({exc.reason})" if exc.reason else ""
        print(f"error: {exc.code.name}{reason}: {exc.message}", file=sys.stderr)
        for violation in exc.field_violations:
            named = f"{violation.field}: {violation.description}"
            # The message usually is the first violation already: say each one once.
            if named not in exc.message:
                print(f"  {named}", file=sys.stderr)
        if exc.retry_delay_s is not None:
            print(f"  retry in {exc.retry_delay_s:g} s", file=sys.stderr)
        return ERROR_EXIT_BASE + int(exc.code.value[0])
    except KeyboardInterrupt:
        return 130
