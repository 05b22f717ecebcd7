"""Prints each load run's figures at the end of the session, even under ``pytest -q``."""

from __future__ import annotations

import pytest

_SUMMARIES: list[tuple[str, list[str]]] = []


@pytest.fixture
def load_summary(request: pytest.FixtureRequest) -> list[str]:
    """Lines appended here are printed under the test's name in the terminal summary."""
    lines: list[str] = []
    _SUMMARIES.append((request.node.nodeid, lines))
    return lines


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    filled = [(nodeid, lines) for nodeid, lines in _SUMMARIES if lines]
    if not filled:
        return
    terminalreporter.section("load figures")
    for nodeid, lines in filled:
        terminalreporter.write_line(nodeid)
        for line in lines:
            terminalreporter.write_line(f"  {line}")
