"""The README's Python client snippets (sync and asyncio) run as written against a live server,
with only its address changed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from manatee_grpc import ManateeServer

README = Path(__file__).resolve().parents[2] / "README.md"
README_ADDRESS = "127.0.0.1:50051"


def _snippets() -> list[str]:
    text = README.read_text()
    start = text.index("## Python client")
    section = text[start : text.index("\n## ", start)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_python_client_section_shows_a_sync_and_an_asyncio_snippet() -> None:
    snippets = _snippets()
    assert len(snippets) == 2
    assert "from manatee_grpc import Client" in snippets[0]
    assert "aio.Client(" in snippets[1] and "asyncio.run(main())" in snippets[1]


@pytest.mark.parametrize("index", [0, 1], ids=["sync", "aio"])
def test_a_readme_client_snippet_runs_as_written(
    server: ManateeServer, index: int, capsys: pytest.CaptureFixture[str]
) -> None:
    snippet = _snippets()[index]
    assert README_ADDRESS in snippet

    exec(compile(snippet.replace(README_ADDRESS, server.address), "README.md", "exec"), {})

    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "SERVING"
    if index == 1:
        assert printed[-1] == "NOT_FOUND VM_NOT_FOUND"
