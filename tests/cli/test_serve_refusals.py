"""``manatee-grpc serve`` refuses a bad setting before it starts anything: exit 2 and exactly one
``manatee-grpc: error: ...`` line naming the flag; and ``serve --help`` documents every flag.

Each refusal runs the real command in a subprocess with its own empty TMPDIR, and checks that
the process left nothing there and logged nothing else (no simulator, no listener, no metrics).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from security.conftest import Pki, make_pki

from cli.conftest import CLI_TIMEOUT_S, REPO_ROOT, run_cli

EXIT_USAGE = 2


def serve(
    tmp_dir: Path, *args: str, pass_fds: Sequence[int] = ()
) -> subprocess.CompletedProcess[str]:
    """``python -m manatee_grpc serve ARGS`` with TMPDIR set to the (empty) ``tmp_dir``."""
    return subprocess.run(
        [sys.executable, "-m", "manatee_grpc", "serve", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
        cwd=REPO_ROOT,
        env={**os.environ, "TMPDIR": str(tmp_dir)},
        pass_fds=pass_fds,
    )


def assert_refused(result: subprocess.CompletedProcess[str], tmp_dir: Path, flag: str) -> str:
    """Exit 2, one stderr line that starts ``manatee-grpc: error:`` and names ``flag``, no
    output, nothing left in TMPDIR. Returns the line."""
    assert result.returncode == EXIT_USAGE, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("manatee-grpc: error: "), lines[0]
    assert flag in lines[0], lines[0]
    assert result.stdout == ""
    assert list(tmp_dir.iterdir()) == []
    return lines[0]


@pytest.fixture
def tmp_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tmp"
    directory.mkdir()
    return directory


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port someone else is listening on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- the refusals the issue lists, one test each -------------------------------------------------


def test_a_listen_port_above_65535_is_refused_not_wrapped(tmp_dir: Path) -> None:
    # gRPC would have listened on 99999 % 65536 = 34463.
    line = assert_refused(serve(tmp_dir, "--listen", "127.0.0.1:99999"), tmp_dir, "--listen")
    assert "port 99999 is outside 0..65535" in line


def test_a_listen_port_of_65536_is_refused_not_random(tmp_dir: Path) -> None:
    # --insecure: the range is checked first, whatever the interface policy says.
    result = serve(tmp_dir, "--listen", ":65536", "--insecure")
    assert "outside 0..65535" in assert_refused(result, tmp_dir, "--listen")


def test_a_listen_port_in_use_is_one_line_before_the_simulator_starts(
    tmp_dir: Path, taken_port: int
) -> None:
    # Before: a simulator warning and a gRPC C-core line came first.
    result = serve(tmp_dir, "--listen", f"127.0.0.1:{taken_port}")
    line = assert_refused(result, tmp_dir, f"--listen 127.0.0.1:{taken_port}")
    assert "Address already in use" in line


def test_a_busy_metrics_port_names_the_flag(tmp_dir: Path, taken_port: int) -> None:
    result = serve(
        tmp_dir, "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{taken_port}"
    )
    line = assert_refused(result, tmp_dir, f"--metrics-listen 127.0.0.1:{taken_port}")
    assert "Address already in use" in line


def test_max_workers_0_is_refused_without_a_traceback(tmp_dir: Path) -> None:
    line = assert_refused(serve(tmp_dir, "--max-workers", "0"), tmp_dir, "--max-workers")
    assert "deprecated" in line


def test_a_negative_grace_is_refused(tmp_dir: Path) -> None:
    assert_refused(serve(tmp_dir, "--grace", "-5"), tmp_dir, "--grace -5")


def test_an_mms_fd_that_is_not_open_is_refused_instead_of_retried_for_ever(
    tmp_dir: Path,
) -> None:
    # subprocess closes every fd but 0-2 in the child, so 999 is not open there.
    line = assert_refused(serve(tmp_dir, "--mms", "fd://999"), tmp_dir, "--mms")
    assert "fd://999 is not an open socket" in line


def test_an_mms_fd_that_is_a_file_is_refused(tmp_dir: Path, tmp_path: Path) -> None:
    with (tmp_path / "not-a-socket").open("w") as file:
        fd = file.fileno()
        result = serve(tmp_dir, "--mms", f"fd://{fd}", pass_fds=[fd])
    assert f"fd://{fd} is not an open socket" in assert_refused(result, tmp_dir, "--mms")


def test_an_mms_fd_that_is_a_listening_socket_is_refused(tmp_dir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind("")  # autobind: an abstract name, no file
        listening.listen()
        fd = listening.fileno()
        result = serve(tmp_dir, "--mms", f"fd://{fd}", pass_fds=[fd])
    assert "is a listening socket" in assert_refused(result, tmp_dir, "--mms")


def test_a_client_ca_that_is_not_a_ca_certificate_is_refused(tmp_dir: Path, pki: Pki) -> None:
    # The client's own certificate (basicConstraints CA:FALSE) where its CA belongs.
    result = serve(
        tmp_dir,
        "--tls-cert",
        str(pki.server.cert_path),
        "--tls-key",
        str(pki.server.key_path),
        "--tls-client-ca",
        str(pki.client.cert_path),
    )
    line = assert_refused(result, tmp_dir, f"--tls-client-ca {pki.client.cert_path}")
    assert "not CA certificates" in line


def test_a_bundle_with_a_leaf_among_cas_is_refused(tmp_dir: Path, pki: Pki) -> None:
    bundle = tmp_dir.parent / "bundle.pem"
    bundle.write_bytes(pki.ca_pem + pki.client.cert_pem)
    result = serve(
        tmp_dir,
        "--tls-cert",
        str(pki.server.cert_path),
        "--tls-key",
        str(pki.server.key_path),
        "--tls-client-ca",
        str(bundle),
    )
    assert "1 of its 2 certificates" in assert_refused(result, tmp_dir, "--tls-client-ca")


# --- every other numeric flag out of range -------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--max-concurrent-rpcs", "-1"], "--max-concurrent-rpcs"),
        (["--max-receive-message-bytes", "0"], "--max-receive-message-bytes"),
        (["--max-receive-message-bytes", "2147483648"], "--max-receive-message-bytes"),
        (["--grace", "nan"], "--grace"),
        (["--grace", "inf"], "--grace"),
        (["--prepare-lease", "0"], "--prepare-lease"),
        (["--launch-attempt-delays", ""], "--launch-attempt-delays"),
        (["--launch-attempt-delays", "0,-1"], "--launch-attempt-delays"),
        (["--launch-attempt-delays", "0,soon"], "--launch-attempt-delays"),
        (["--launch-stop-timeout", "-1"], "--launch-stop-timeout"),
        (["--mms-connect-timeout", "0"], "--mms-connect-timeout"),
        (["--mms-max-frame-bytes", "0"], "--mms-max-frame-bytes"),
        (["--mms-max-frame-bytes", "4294967296"], "--mms-max-frame-bytes"),
        (["--mms-watchdog", "PREPARE_VM=0"], "--mms-watchdog"),
        (["--mms-watchdog", "PREPARE_VM=inf"], "--mms-watchdog"),
        (["--mms-backoff-initial", "0"], "--mms-backoff-initial"),
        (["--mms-backoff-max", "-1"], "--mms-backoff-max"),
        (["--mms-backoff-initial", "2", "--mms-backoff-max", "1"], "--mms-backoff-max"),
        (["--socket-mode", "1000"], "--socket-mode"),
        (["--metrics-listen", "127.0.0.1:65536"], "--metrics-listen"),
        (["--mms", "tcp://127.0.0.1:65536"], "--mms"),
        (["--mms", "vsock://2:4294967296"], "--mms"),
        (["--sim-scenario", "/nonexistent/scenario.toml"], "--sim-scenario"),
        (["--sim-scenario", "pyproject.toml"], "--sim-scenario"),  # TOML, not a scenario
        (["--grace", "soon"], "--grace"),
        (["--log-level", "LOUD"], "--log-level"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_every_other_setting_out_of_range_is_refused(
    tmp_dir: Path, args: list[str], flag: str
) -> None:
    assert_refused(serve(tmp_dir, "--listen", "127.0.0.1:0", *args), tmp_dir, flag)


# --- help ----------------------------------------------------------------------------------------

_ENTRY_RE = re.compile(r"^  ([^\s,]+(?:, --\S+)?)(?: (\S+(?: \S+)*?))?(?:  +(\S.*))?$")


def _options(help_text: str) -> dict[str, tuple[bool, str]]:
    """Each positional and option of an argparse ``--help``: (takes a value, its help text)."""
    entries: dict[str, tuple[bool, str]] = {}
    current = ""
    section = ""
    for line in help_text.splitlines():
        if line in ("positional arguments:", "options:"):
            section, current = line, ""
            continue
        if not section or not line.strip():
            section = "" if not line.strip() else section
            continue
        match = _ENTRY_RE.match(line)
        if match is not None:
            current = match.group(1).split(", ")[-1]
            takes_value = section == "options:" and match.group(2) is not None
            entries[current] = (takes_value, match.group(3) or "")
        elif line.startswith("    ") and current:
            takes_value, text = entries[current]
            entries[current] = (takes_value, f"{text} {line.strip()}".strip())
    return entries


def _subcommands() -> list[str]:
    """Every subcommand ``manatee-grpc --help`` lists, so a new one is checked too."""
    usage = run_cli("--help").stdout
    match = re.search(r"\{([a-z,-]+)\}", usage)
    assert match is not None, usage
    return match.group(1).split(",")


def test_the_help_check_covers_every_subcommand() -> None:
    assert {"serve", "sim", "events", "top"} <= set(_subcommands())


@pytest.mark.parametrize("command", _subcommands())
def test_every_option_has_help_and_every_value_its_default(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    options = _options(result.stdout)
    assert "--server" in options or command in ("serve", "sim")  # the two servers
    for option, (takes_value, text) in options.items():
        if option == "--help":
            continue
        assert text, f"{command} {option} has no help text"
        if takes_value or command == "serve":
            assert "default" in text, f"{command} {option} does not say its default: {text!r}"


def test_serve_help_lists_the_issues_flags_with_their_defaults() -> None:
    options = _options(run_cli("serve", "--help").stdout)
    expected = {
        "--max-concurrent-rpcs": "default 1000",
        "--max-receive-message-bytes": "default 1048576",
        "--grace": "default 10.0",
        "--balloon-control-dir": "default /run",
        "--mms-connect-timeout": "default 5.0",
        "--mms-backoff-initial": "default 0.05",
        "--mms-backoff-max": "default 5.0",
        "--log-level": "default INFO",
    }
    for option, default in expected.items():
        assert default in options[option][1], (option, options[option])
    assert "DEPRECATED, no effect" in options["--max-workers"][1]


def test_top_help_offers_no_json_and_refuses_it() -> None:
    assert "--json" not in run_cli("top", "--help").stdout
    result = run_cli("top", "--once", "--json", "--server", "unix:///nonexistent/m.sock")
    assert result.returncode == EXIT_USAGE
    assert "unrecognized arguments: --json" in result.stderr
