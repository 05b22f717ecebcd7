"""How the CLI shows a server event (WatchEvents): one text line, or the audit file's JSON."""

from __future__ import annotations

import datetime
from typing import Any

from google.protobuf import json_format

from manatee_grpc._proto.manatee.memory.v1 import memory_service_pb2 as pb
from manatee_grpc.cli._common import format_bytes

_PREFIX = "EVENT_KIND_"


def kind_name(kind: pb.EventKind.ValueType) -> str:
    return pb.EventKind.Name(kind).removeprefix(_PREFIX)


def kind_value(name: str) -> pb.EventKind.ValueType:
    """``rebalance_memory`` or ``REBALANCE_MEMORY`` -> the enum value; ValueError if unknown."""
    text = name.strip().upper().removeprefix(_PREFIX)
    if not text or text == "UNSPECIFIED":
        raise ValueError(name)
    return pb.EventKind.Value(_PREFIX + text)


def kind_names() -> list[str]:
    return [kind_name(v) for v in pb.EventKind.values() if v != pb.EVENT_KIND_UNSPECIFIED]


def _whole(value: Any) -> Any:
    # Struct numbers are doubles; the facts in them are whole numbers of bytes, ids, counts.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole(item) for item in value]
    return value


def details_of(event: pb.Event) -> dict[str, Any]:
    details: dict[str, Any] = _whole(json_format.MessageToDict(event.details))
    return details


def _time_text(event: pb.Event) -> str:
    moment = event.time.ToDatetime(tzinfo=datetime.UTC)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def event_json(event: pb.Event) -> dict[str, Any]:
    """The event as the audit file writes it (same keys)."""
    return {
        "sequence": event.sequence,
        "time": _time_text(event),
        "kind": kind_name(event.kind),
        "caller": {
            "origin": event.caller.origin,
            "peer": event.caller.peer,
            "certificate_subject": event.caller.certificate_subject,
        },
        "session": event.session,
        "vm_ids": list(event.vm_ids),
        "details": details_of(event),
        "error": None
        if not event.HasField("error")
        else {
            "code": event.error.code,
            "reason": event.error.reason,
            "message": event.error.message,
        },
    }


def who(event: pb.Event) -> str:
    caller = event.caller
    if caller.origin != "client":
        return caller.origin
    subject = f" ({caller.certificate_subject})" if caller.certificate_subject else ""
    return f"{caller.peer or 'client'}{subject}"


def _deltas(items: Any) -> str:
    if not isinstance(items, list):
        return "?"
    parts = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("delta_bytes"), int):
            delta_bytes = item["delta_bytes"]
            sign = "+" if delta_bytes >= 0 else "-"
            parts.append(f"{item.get('vm_id')}={sign}{format_bytes(abs(delta_bytes))}")
    return " ".join(parts)


def summary(event: pb.Event) -> str:
    """What happened, in a few words (no time, no caller)."""
    kind = event.kind
    details = details_of(event)
    vms = ",".join(str(vm_id) for vm_id in event.vm_ids)
    words = [kind_name(event.kind)]
    if vms:
        words.append(f"VM {vms}")
    if kind == pb.EVENT_KIND_REBALANCE_MEMORY:
        if "actual_deltas" in details:
            words.append(f"asked {_deltas(details.get('applied_requested_deltas'))}")
            words.append(f"moved {_deltas(details.get('actual_deltas'))}")
            if not details.get("fully_applied"):
                words.append("(partly)")
        else:
            words.append(f"asked {_deltas(details.get('requested_deltas'))}")
    elif kind in (pb.EVENT_KIND_PREPARE_VM, pb.EVENT_KIND_LAUNCH_QUEUED) or kind in (
        pb.EVENT_KIND_LAUNCH_LAUNCHED,
        pb.EVENT_KIND_LAUNCH_FAILED,
        pb.EVENT_KIND_LAUNCH_ABORTED,
    ):
        if isinstance(details.get("mem_size_bytes"), int):
            words.append(format_bytes(details["mem_size_bytes"]))
        if details.get("reserved") is False:
            words.append(f"short {format_bytes(int(details.get('shortfall_bytes', 0)))}")
    elif kind == pb.EVENT_KIND_POLICY_DECISION:
        words.extend(_policy_words(details.get("action")))
    elif kind == pb.EVENT_KIND_SESSION_RESET:
        words.append(f"{details.get('previous_session')} → {event.session}")
    if event.HasField("error"):
        reason = f" ({event.error.reason})" if event.error.reason else ""
        words.append(f"failed {event.error.code}{reason}: {event.error.message}")
    return " ".join(words)


def _policy_words(action: Any) -> list[str]:
    # The server's policy records a mapping (acted, reason, moved_bytes, ...); an embedder's
    # publish_policy_decision may record a plain word.
    if not isinstance(action, dict):
        return [f"action={action}"]
    acted = bool(action.get("acted"))
    words = [f"{'acted' if acted else 'held'}: {action.get('reason', '')}"]
    if acted:
        words[-1] += ","
        words.append(f"moved {format_bytes(int(action.get('moved_bytes') or 0))}")
        if action.get("fully_applied") is False:
            words.append("(partly)")
    if action.get("error"):
        words.append(f"error: {action['error']}")
    return words


def policy_state(event: pb.Event) -> str:
    """A POLICY_DECISION's ``state``: the policy's counts and the VMs sitting out ("" if none)."""
    state = details_of(event).get("state")
    if not isinstance(state, dict):
        return ""
    decisions, rebalances = state.get("decisions", 0), state.get("rebalances_sent", 0)
    parts = [
        f"{decisions} decision{'' if decisions == 1 else 's'}",
        f"{rebalances} rebalance{'' if rebalances == 1 else 's'}",
        f"{format_bytes(int(state.get('bytes_moved') or 0))} moved",
    ]
    backed_off = state.get("backed_off_until")
    if isinstance(backed_off, dict) and backed_off:
        parts.append(f"VM {','.join(sorted(backed_off, key=int))} backed off")
    return ", ".join(parts)


def event_line(event: pb.Event) -> str:
    """``#12 2026-11-30T04:41:38.123456Z REBALANCE_MEMORY VM 1 ... by ipv4:127.0.0.1:5431``"""
    return f"#{event.sequence} {_time_text(event)} {summary(event)} by {who(event)}"
