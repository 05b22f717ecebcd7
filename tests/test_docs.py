"""The docs match the code: the systemd unit's command line parses with today's flags, and the
architecture note names modules that exist."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shlex
import signal
import subprocess
import threading
from pathlib import Path

import pytest

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


def _from_another_language() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## From another language")
    return text[start : text.index("\n## ", start)]


def _js_options(block: str) -> dict[str, str]:
    """``key: value`` pairs of a JS object literal, comments dropped."""
    code = re.sub(r"//.*", "", block)
    return dict(re.findall(r"^\s*(\w+): ([^,\n]+),?\s*$", code, flags=re.MULTILINE))


def test_from_another_language_names_files_that_exist() -> None:
    section = _from_another_language()
    named = set(re.findall(r"`((?:protos|examples|tests)/[\w./-]+)`", section))
    named |= set(re.findall(r"\]\(((?:protos|examples|tests)/[\w./-]+)\)", section))
    assert {
        "protos/google/rpc/status.proto",
        "protos/google/rpc/error_details.proto",
        "examples/node/journey.js",
        "tests/cli/test_node_example.py",
    } <= named
    for path in named:
        assert (ROOT / path).exists(), f"README 'From another language' names {path}, which is gone"
    # Its shell line runs the example the Node test runs, from the example's own folder.
    (command,) = [line for line in section.splitlines() if line.startswith("cd examples/node")]
    assert command.split("#")[0].strip() == (
        "cd examples/node && npm ci && node journey.js 127.0.0.1:50051"
    )


def test_from_another_language_shows_the_options_the_node_example_uses() -> None:
    section = _from_another_language()
    (block,) = re.findall(r"```js\n(.*?)```", section, flags=re.DOTALL)
    shown = _js_options(block)
    journey = (ROOT / "examples" / "node" / "journey.js").read_text()
    start = journey.index("const LOADER_OPTIONS = {")
    used = _js_options(journey[start : journey.index("};", start)])

    expected = {
        "keepCase": "true",
        "longs": "String",
        "enums": "String",
        "defaults": "true",
        "oneofs": "true",
    }
    assert {k: v for k, v in shown.items() if k != "includeDirs"} == expected
    assert {k: v for k, v in used.items() if k != "includeDirs"} == expected
    # The README's includeDirs is relative to the repo's root, where protos/ is.
    assert shown["includeDirs"] == "['protos']"
    assert (ROOT / "protos" / "manatee" / "memory" / "v1" / "memory_service.proto").is_file()
    assert "protoLoader.loadSync('manatee/memory/v1/memory_service.proto'" in block


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


# --- the README's shell commands, run as written --------------------------------------------------
#
# Every command line of the README's `sh` blocks is one of: run here in an activated shell
# (`. .venv/bin/activate && ...`, from the repository root), run verbatim by another test, or
# excused with the reason it cannot run on a development machine. A server's address or socket
# path is swapped for the test's own (port 0, a temporary directory): fixed ports collide.

README = ROOT / "README.md"
ACTIVATE = ". .venv/bin/activate"
README_ADDRESS = "127.0.0.1:50051"
README_SESSION = "9f2c4e1a7b3d5e60-2"
COMMAND_TIMEOUT_S = 60.0
SERVE_TIMEOUT_S = 30.0

# One-shot commands, run in README order against one live server; each must exit 0.
RUN_AGAINST_SERVER = [
    "manatee-grpc events",
    "manatee-grpc events --kind rebalance_memory --json",
    "manatee-grpc health",
    "manatee-grpc vms",
    "manatee-grpc stats",
    "manatee-grpc stats 0 1 --json",
    "manatee-grpc launch 512MiB --start-cmd 'true'",
    "manatee-grpc launch 1G",  # answered "y" on stdin
    "manatee-grpc rebalance 1=-64MiB 2=+128MiB",
    "manatee-grpc rebalance 1=-64MiB --dry-run",
    f"manatee-grpc remove 1 --session {README_SESSION}",
    "manatee-grpc top --once",
    f"python examples/launch_service.py --server {README_ADDRESS} --mem-mib 512",
]
# Commands that run on their own and exit 0.
RUN_ALONE = ["manatee-grpc serve --help"]
# Servers: started, seen SERVING, stopped with SIGTERM (exit 0). The value is the command that
# must run first, in the background (the simulator a server is pointed at), or None.
RUN_AS_SERVER: dict[str, str | None] = {
    "make run": None,
    "manatee-grpc serve": None,
    "python -m manatee_grpc serve": None,
    "manatee-grpc serve --listen unix:///run/manatee.sock": None,
    "manatee-grpc serve --listen 0.0.0.0:50051 --insecure": None,
    ".venv/bin/manatee-grpc serve --mms unix:///tmp/mms.sock": (
        ".venv/bin/manatee-grpc sim --listen unix:///tmp/mms.sock --scenario scenario.toml"
    ),
    # With the README's settings file and workload scenario.
    "manatee-grpc serve --policy balance-available --policy-config policy.toml": None,
    "manatee-grpc serve --sim-scenario workload.toml --policy balance-available": None,
    "manatee-grpc serve --audit-file /var/log/manatee-grpc/events.jsonl": None,
}
RUN_ELSEWHERE = {
    ACTIVATE: "every command run here runs after it",
    ".venv/bin/manatee-grpc sim --listen unix:///tmp/mms.sock --scenario scenario.toml": (
        "run here as the mms of the `serve --mms unix:///tmp/mms.sock` after it, with the "
        "README's scenario"
    ),
    "cd examples/node && npm ci && node journey.js 127.0.0.1:50051": (
        "tests/cli/test_node_example.py installs from the lockfile and runs journey.js against "
        "live servers (on port 0 and on a unix socket)"
    ),
    "manatee-grpc events --follow --last 0": (
        "follows until Ctrl-C; tests/cli/test_events_cli.py runs `events --follow` and reads "
        "the events it prints as they happen"
    ),
    "manatee-grpc events --follow": (
        "follows until Ctrl-C; tests/cli/test_events_cli.py runs it and reads its lines"
    ),
    # And every `grpcurl` line: tests/api/test_grpcurl.py runs each verbatim (checked below).
}
NOT_RUNNABLE = {
    "make test": "it is this suite (lint, then all of tests/): CI runs it on a fresh clone",
    "make install": "CI runs it (through `make test`) to create the .venv this suite runs in",
    "manatee-grpc serve --listen unix:///run/manatee.sock --mms vsock://2:3000": (
        "needs mms over AF_VSOCK, in a ManaTEE hypervisor"
    ),
    "manatee-grpc serve --listen unix:///run/manatee.sock --socket-mode 0660 --socket-group "
    "vm-managers": (
        "needs a group vm-managers; tests/security runs --socket-group with the test user's own"
    ),
    "manatee-grpc serve --listen 0.0.0.0:50051 --tls-cert server.pem --tls-key server.key "
    "--tls-client-ca clients-ca.pem": "needs certificates; tests/security makes its own",
    "manatee-grpc vms --server HOST:50051 --tls-ca ca.pem --tls-cert me.pem --tls-key me.key": (
        "needs a TLS server and certificates; tests/security runs the CLI over mutual TLS"
    ),
    "manatee-grpc launch 2GiB --init 1GiB --start-cmd 'systemd-run --unit=crosvm-{vm_id} -p "
    "Type=exec crosvm run --balloon-control {balloon_control_path} ...' --stop-cmd 'systemctl "
    "stop crosvm-{vm_id}'": "needs crosvm and systemd (`...` stands for the VM's own arguments)",
    "manatee-grpc top": (
        "full screen until q: needs a terminal; tests/cli/test_top.py drives it in a pty"
    ),
    "manatee-grpc top --interval 0.5 --server unix:///run/manatee.sock": (
        "full screen until q: needs a terminal; tests/cli/test_top.py drives it in a pty"
    ),
}


def readme_shell_commands() -> list[str]:
    """Each command line of the README's `sh` blocks, continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```sh\n(.*?)^```", README.read_text(), re.S | re.M):
        for line in re.sub(r"\s*\\\n\s*", " ", block).splitlines():
            command = re.sub(r"(^|\s+)#(\s.*)?$", "", line).strip()
            if command:
                commands.append(command)
    return commands


def _in_activated_shell(command: str) -> list[str]:
    return ["bash", "-c", f"{ACTIVATE} && {command}"]


def test_every_readme_command_is_run_or_excused() -> None:
    from api.test_grpcurl import readme_commands

    commands = readme_shell_commands()
    grpcurl_lines = [command for command in commands if command.startswith("grpcurl ")]
    assert [shlex.split(line) for line in grpcurl_lines] == readme_commands()
    handled = (
        set(RUN_AGAINST_SERVER)
        | set(RUN_ALONE)
        | set(RUN_AS_SERVER)
        | set(RUN_ELSEWHERE)
        | set(NOT_RUNNABLE)
    )
    unhandled = [c for c in commands if c not in handled and c not in grpcurl_lines]
    assert not unhandled, f"README commands neither run nor excused here: {unhandled}"
    stale = handled - set(commands)
    assert not stale, f"entries here for commands the README no longer has: {stale}"
    # The one-shot commands run in the order the README gives them (they build on each other).
    order = {command: index for index, command in enumerate(commands)}
    assert sorted(RUN_AGAINST_SERVER, key=order.__getitem__) == RUN_AGAINST_SERVER
    assert all(reason.strip() for reason in NOT_RUNNABLE.values())


def test_the_readme_client_commands_run_as_written_against_a_live_server() -> None:
    from api.conftest import start_server

    from manatee_grpc import Client

    server = start_server()
    try:
        with Client(server.address) as client:
            session = client.list_vms().session
        for command in RUN_AGAINST_SERVER:
            runnable = command.replace(README_ADDRESS, server.address)
            runnable = runnable.replace(README_SESSION, session)
            if runnable.startswith("manatee-grpc ") and "--server" not in runnable:
                runnable += f" --server {server.address}"
            result = subprocess.run(
                _in_activated_shell(runnable),
                cwd=ROOT,
                input="y\n" if command == "manatee-grpc launch 1G" else "",
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                check=False,
            )
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if command == "manatee-grpc health":
                assert result.stdout.strip() == "SERVING"
    finally:
        server.stop(grace_s=1.0)


def test_the_readme_commands_that_run_alone_exit_0() -> None:
    for command in RUN_ALONE:
        result = subprocess.run(
            _in_activated_shell(command),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stderr}"
        assert result.stdout.strip()


def _readme_toml_files() -> dict[str, str]:
    """The README's TOML blocks by the file name its commands give them: the device scenario,
    the workload scenario (the one with demand curves) and the policy's settings."""
    blocks = re.findall(r"^```toml\n(.*?)^```", README.read_text(), re.S | re.M)
    (scenario,) = [b for b in blocks if "cros_mem_size_bytes" in b]
    (workload,) = [b for b in blocks if "[vm_demand]" in b]
    (policy,) = [b for b in blocks if "[cros]" in b]
    return {"scenario.toml": scenario, "workload.toml": workload, "policy.toml": policy}


def _swap_server_addresses(command: str, tmp: Path) -> str:
    """Port-0 and temporary-directory stand-ins for the README's fixed addresses."""
    command = command.replace("0.0.0.0:50051", "0.0.0.0:0")
    command = command.replace("/run/manatee.sock", f"{tmp}/manatee.sock")
    command = command.replace("/tmp/mms.sock", f"{tmp}/mms.sock")
    command = command.replace("/var/log/manatee-grpc/events.jsonl", f"{tmp}/events.jsonl")
    for name in _readme_toml_files():
        command = re.sub(rf"(?<![\w/]){re.escape(name)}", f"{tmp}/{name}", command)
    if command == "make run":
        return "make run LISTEN=127.0.0.1:0"
    if " serve" in command and "--listen" not in command:
        command += " --listen 127.0.0.1:0"
    return command


class _Background:
    """A README command running in the background, its stderr lines read as they come."""

    def __init__(self, command: str) -> None:
        self.process = subprocess.Popen(
            _in_activated_shell(command),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: make's child is stopped with it
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)
        self.lines.put(None)

    def wait_for(self, pattern: str) -> re.Match[str]:
        """The first stderr line matching ``pattern``; fails if the command ends first."""
        seen: list[str] = []
        while True:
            line = self.lines.get(timeout=SERVE_TIMEOUT_S)
            if line is None:
                raise AssertionError(f"ended without {pattern!r}:\n{''.join(seen)}")
            seen.append(line)
            if (match := re.search(pattern, line)) is not None:
                return match

    def stop(self) -> int:
        """SIGTERM to the whole group; its exit status."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=SERVE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            raise
        finally:
            self._reader.join(timeout=SERVE_TIMEOUT_S)  # it reads to the end of the pipe
            assert self.process.stderr is not None
            self.process.stderr.close()


@pytest.mark.parametrize("command", list(RUN_AS_SERVER))
def test_the_readme_server_commands_serve_and_stop_cleanly(command: str, tmp_path: Path) -> None:
    from manatee_grpc import Client

    for name, text in _readme_toml_files().items():
        (tmp_path / name).write_text(text)
    before = RUN_AS_SERVER[command]
    mms = None if before is None else _Background(_swap_server_addresses(before, tmp_path))
    try:
        if mms is not None:
            mms.wait_for(r"mms simulator listening on ")
        server = _Background(_swap_server_addresses(command, tmp_path))
        try:
            address = server.wait_for(r"manatee-grpc listening on (\S+),").group(1)
            with Client(address.replace("0.0.0.0", "127.0.0.1"), timeout_s=10.0) as client:
                assert client.health() == "SERVING"
                assert [vm.vm_id for vm in client.list_vms().vms] == [0]
        finally:
            status = server.stop()
        # make reports its child's end its own way; the server itself exits 0 on SIGTERM.
        assert command == "make run" or status == 0
    finally:
        if mms is not None:
            assert mms.stop() == 0
