"""The docs match the code: the systemd unit's command line parses with today's flags, and the
architecture note names modules that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from manatee_grpc.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "examples" / "systemd" / "manatee-grpc.service"
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _exec_start(unit_text: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", unit_text)  # systemd's line continuations
    line = next(entry for entry in joined.splitlines() if entry.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


def test_systemd_unit_command_line_parses_with_the_current_flags() -> None:
    argv = _exec_start(UNIT.read_text())
    assert argv[0].endswith("/manatee-grpc")
    args = build_parser().parse_args(argv[1:])  # a renamed or removed flag exits 2 here
    assert args.command == "serve"
    assert args.listen.startswith("unix:///")
    assert args.socket_mode == 0o660
    assert args.mms.startswith("vsock://")


def _unit_settings(unit_text: str) -> dict[str, str]:
    """The unit's Key=Value settings (the last one wins, as in systemd), comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", unit_text)
    settings: dict[str, str] = {}
    for raw_line in joined.splitlines():
        line = raw_line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def test_systemd_unit_lets_the_socket_group_reach_the_socket_and_nobody_else() -> None:
    """Reasoned from the unit's fields as systemd applies them: RuntimeDirectory= is created
    owned by User= and Group= with RuntimeDirectoryMode= (default 0755), and the server makes
    the socket with --socket-mode and --socket-group. A caller must search (x) every directory
    on the way and read/write the socket."""
    unit = _unit_settings(UNIT.read_text())
    args = build_parser().parse_args(_exec_start(UNIT.read_text())[1:])
    socket_path = Path(args.listen.removeprefix("unix://"))
    runtime_dir = Path("/run") / unit["RuntimeDirectory"]
    assert socket_path.parent == runtime_dir, "the socket lives in the unit's runtime directory"
    dir_mode = int(unit.get("RuntimeDirectoryMode", "0755"), 8)
    # Without Group=, systemd uses the user's primary group (here, its own same-named group).
    dir_group = unit.get("Group", unit["User"])
    socket_group = args.socket_group or dir_group
    socket_mode = args.socket_mode

    def may_reach(group: str | None) -> bool:
        """Can a process that is in ``group`` (None: in none of them) open the socket?"""
        enter = 0o010 if group == dir_group else 0o001
        use = 0o060 if group == socket_group else 0o006
        return bool(dir_mode & enter) and socket_mode & use == use

    assert may_reach(socket_group), (
        f"{runtime_dir} is {dir_group} {dir_mode:04o}: members of {socket_group} cannot enter it"
    )
    assert not may_reach(None), "everyone else can reach the socket"
    assert socket_group == "vm-managers"


def test_systemd_unit_and_readme_say_a_restart_drops_every_sibling_vm() -> None:
    lines = UNIT.read_text().splitlines()
    restart = next(i for i, line in enumerate(lines) if line.startswith("Restart="))
    comment: list[str] = []
    for line in reversed(lines[:restart]):
        if not line.startswith("#"):
            break
        comment.insert(0, line.lstrip("# "))
    assert "dropped every sibling VM" in " ".join(comment)  # why restarting after a crash is ok
    assert "drops every sibling VM" in " ".join(comment)  # and why a restart is not a cure
    assert "drops EVERY sibling VM" in UNIT.read_text()  # said at the top, where installers read
    readme = (ROOT / "README.md").read_text()
    shutdown = readme[readme.index("**Shutdown.**") :]
    assert "drops every sibling VM" in shutdown[: shutdown.index("\n\n")]


def test_architecture_note_has_diagrams_and_names_real_modules() -> None:
    text = ARCHITECTURE.read_text()
    assert text.count("```mermaid") >= 2
    package = ROOT / "src" / "manatee_grpc"
    named = set(re.findall(r"`((?:[a-z]+/)?_[a-z_]+\.py)`", text))
    assert any("/" in name for name in named), "the Layers section names modules by folder"
    for name in named:
        if "/" in name:
            assert (package / name).exists(), f"docs/architecture.md names {name}, which is gone"
        else:
            # A bare name must still be unique in the tree, or the note is ambiguous.
            found = list(package.glob(f"*/{name}")) + list(package.glob(name))
            assert found, f"docs/architecture.md names {name}, which is gone"


def test_every_test_the_safety_section_names_exists() -> None:
    text = (ROOT / "README.md").read_text()
    safety = text[text.index("## Safety") : text.index("## The mms simulator")]
    module = ""
    named = 0
    for reference in re.findall(r"`((?:tests/[\w/]+\.py)?(?:::\w+)?)`", safety):
        path, _, test = reference.partition("::")
        if path:
            module = path
        assert (ROOT / module).exists(), f"README Safety names {module}, which is gone"
        if test:
            source = (ROOT / module).read_text()
            assert re.search(rf"def {test}\b", source), f"{module} has no test {test}"
            named += 1
    assert named >= 12


def _error_table_pairs() -> set[tuple[str, str]]:
    """(code, ErrorInfo reason) of every row of the README's Errors table."""
    text = (ROOT / "README.md").read_text()
    start = text.index("| Situation |", text.index("### Errors"))
    table = text[start : text.index("\n\n", start)]
    pairs: set[tuple[str, str]] = set()
    for line in table.splitlines()[2:]:
        *_, code, reasons = line.strip().strip("|").split(" | ")
        (code,) = re.findall(r"`([A-Z_]+)`", code)
        # Only the reason cell's own code spans: "(field `request_id`)" is not a reason.
        reasons = re.sub(r"\(.*?\)", "", reasons)
        pairs.update((code, reason) for reason in re.findall(r"`([A-Z_]+)`", reasons))
    return pairs


def _every_error_the_server_can_return() -> set[tuple[str, str]]:
    """(code, reason) of every ManateeError (core/_errors.py, mms/_errors.py), mms errnos
    included, and the INTERNAL that server/_status.py gives a bug of ours."""
    import manatee_grpc.server  # noqa: F401 (imports every module that defines an error)
    from manatee_grpc.core._errors import ManateeError, MmsRefusedError
    from manatee_grpc.mms._messages import RES_EINVAL, RES_EIO, RES_ENOMEM

    classes: list[type[ManateeError]] = [ManateeError]
    pairs: set[tuple[str, str]] = set()
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if cls is MmsRefusedError:
            for res in (RES_EINVAL, RES_ENOMEM, RES_EIO, -1):  # -1: any errno mms may add
                error = MmsRefusedError(res, "mms refused")
                pairs.add((error.grpc_code, error.grpc_reason))
        else:
            pairs.add((cls.code, cls.reason))
    return pairs


def test_every_error_reason_the_server_can_return_is_in_the_readme_errors_table() -> None:
    documented = _error_table_pairs()
    possible = _every_error_the_server_can_return()
    missing = possible - documented
    assert not missing, f"README's Errors table lacks {sorted(missing)}"
    # And nothing in the table that the server cannot say (a renamed reason leaves a stale row).
    assert {reason for _, reason in documented} <= {reason for _, reason in possible}
    assert ("ABORTED", "LAUNCH_ABORTED") in documented
