"""``serve --policy`` and ``--policy-config``: a bad settings file or a lone --policy-config is
refused at start-up with one ``manatee-grpc: error:`` line (exit 2), before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from manatee_grpc import cli


def test_policy_config_without_policy_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("period_s = 1\n")
    assert cli.main(["serve", "--listen", "127.0.0.1:0", "--policy-config", str(path)]) == 2
    assert capsys.readouterr().err == (
        "manatee-grpc: error: --policy-config needs --policy balance-available\n"
    )


def test_a_bad_policy_file_is_refused_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text('[siblings]\ncritical_bytes = "lots"\n')
    argv = ["serve", "--listen", "127.0.0.1:0", "--policy", "balance-available"]
    assert cli.main([*argv, "--policy-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manatee-grpc: error: --policy-config {path}: ")
    assert err.count("\n") == 1
    assert "siblings.critical_bytes" in err


@pytest.mark.parametrize(
    ("text", "says"),
    [("period_s = [\n", "Invalid value"), ("perod_s = 1\n", "unknown key(s) perod_s")],
)
def test_an_unreadable_or_unknown_policy_file_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, says: str
) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    argv = ["serve", "--listen", "127.0.0.1:0", "--policy", "balance-available"]
    assert cli.main([*argv, "--policy-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manatee-grpc: error: --policy-config {path}: ")
    assert says in err and err.count("\n") == 1


def test_a_missing_policy_file_names_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "absent.toml"
    argv = ["serve", "--listen", "127.0.0.1:0", "--policy", "balance-available"]
    assert cli.main([*argv, "--policy-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err == f"manatee-grpc: error: --policy-config {path}: No such file or directory\n"


def test_an_unknown_policy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--policy", "give-everything-to-vm-1"])
    assert exited.value.code == 2
    assert "balance-available" in capsys.readouterr().err
