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
