"""The project's packaging metadata reads cleanly: installing it prints no setuptools warning."""

from __future__ import annotations

import tomllib
import warnings
from pathlib import Path

import pytest
from setuptools.config.pyprojecttoml import apply_configuration  # type: ignore[import-untyped]
from setuptools.dist import Distribution  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_applies_without_a_setuptools_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    # A `license = { text = ... }` table made every build print a deprecation warning (three
    # per `pip install`); the SPDX expression is what setuptools >= 77 asks for.
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert [str(warning.message) for warning in caught] == []
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["license"] == "BSD-3-Clause"
    assert "setuptools>=77" in pyproject["build-system"]["requires"]
