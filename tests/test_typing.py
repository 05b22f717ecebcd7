"""The generated .pyi stubs are really typed: mypy --strict accepts a correct client and rejects
each misuse in a bad one with the expected error (an Any-typed stub would accept both).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
CLIENTS = Path(__file__).resolve().parent / "typing"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A private cache: a concurrent `make lint` must not race these runs on .mypy_cache.
    return tmp_path_factory.mktemp("mypy_cache")


def mypy_strict(path: Path, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    # From the repository root so the project's [tool.mypy] settings apply as in `make lint`.
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache_dir), str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_good_client_passes(cache_dir: Path) -> None:
    result = mypy_strict(CLIENTS / "good_client.py", cache_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success: no issues found")


def test_bad_client_fails_with_the_expected_errors(tmp_path: Path, cache_dir: Path) -> None:
    # Kept as .txt so that the project's own mypy and ruff runs never see it.
    bad = tmp_path / "bad_client.py"
    shutil.copyfile(CLIENTS / "bad_client.py.txt", bad)
    expected = {
        number: match.group(1)
        for number, line in enumerate(bad.read_text().splitlines(), start=1)
        if (match := re.search(r"# E: (.+)$", line))
    }

    result = mypy_strict(bad, cache_dir)

    errors = {
        int(match.group(1)): match.group(2)
        for match in re.finditer(r"^.*bad_client\.py:(\d+): error: (.+)$", result.stdout, re.M)
    }
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(expected) == 6
    assert sorted(errors) == sorted(expected), result.stdout
    for number, text in expected.items():
        assert text in errors[number], f"line {number}: {errors[number]!r}"
