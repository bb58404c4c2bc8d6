"""Bad input to the sweep commands: exit status 2, one line, no Ray started, nothing recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from orchestrator.cli import main
from sweep_helpers import DIGITS_SPACE, sweep_args

RAY_SESSION = Path("/tmp/ray/session_latest")


def _ray_session() -> str | None:
    return os.readlink(RAY_SESSION) if RAY_SESSION.is_symlink() else None


def _space(tmp_path: Path, edit) -> str:
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    edit(data)
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _invoke_bad(tmp_path: Path, args: list[str], message: str) -> None:
    before = _ray_session()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    assert message in result.output
    assert _ray_session() == before, "a Ray instance was started"
    assert not (tmp_path / "mlruns").exists(), "an MLflow store was created"
    assert not list((tmp_path / "sweeps").glob("*/sweep.json"))


def _launch(tmp_path: Path, space: str, *extra: str) -> list[str]:
    return ["launch", "--space", space, *sweep_args(tmp_path, "bad"), *extra]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda d: d["space"].update(
                {"loss.temprature": {"type": "float", "low": 1, "high": 2}}
            ),
            "unknown key `loss.temprature`",
        ),
        (
            lambda d: d["space"]["loss.temperature"].update(low=9.0),
            "`space.loss.temperature.low` is 9.0",
        ),
        (lambda d: d["search"].update(metric="val/acc"), "`search.metric` is 'val/acc'"),
        (lambda d: d["base"]["loss"].update(kind="kd"), "`base.loss.kind` is 'kd'"),
        (
            lambda d: d["base"]["dataset"].update(name="cifar100", root="/nonexistent/data"),
            "cifar100 not found under /nonexistent/data/cifar-100-python",
        ),
    ],
)
def test_launch_rejects_bad_space(tmp_path, edit, message):
    _invoke_bad(tmp_path, _launch(tmp_path, _space(tmp_path, edit)), message)


def test_launch_rejects_missing_space_file(tmp_path):
    _invoke_bad(tmp_path, _launch(tmp_path, str(tmp_path / "absent.yaml")), "no such file")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--gpus", "3"], "--gpus is 3, but this machine has 0 GPU(s)"),
        (["--gpus", "-1"], "--gpus is -1, but must be >= 0"),
        (["--num-samples", "0"], "--num-samples is 0, but must be >= 1"),
        (["--max-concurrent", "0"], "--max-concurrent is 0, but must be >= 1"),
    ],
)
def test_launch_rejects_bad_flags(tmp_path, flags, message):
    _invoke_bad(tmp_path, _launch(tmp_path, str(DIGITS_SPACE), *flags), message)


@pytest.mark.parametrize("command", [["status"], ["resume"], ["promote"]])
def test_unknown_sweep_name_is_an_error(tmp_path, command):
    args = [*command, "nope", "--storage", str(tmp_path / "sweeps")]
    _invoke_bad(tmp_path, args, "no sweep named 'nope'")


def test_validate_reports_space_errors(tmp_path):
    space = _space(tmp_path, lambda d: d["search"]["pruner"].update(reduction_factor=1))
    _invoke_bad(tmp_path, ["validate", space], "`search.pruner.reduction_factor` is 1")


def test_validate_accepts_every_shipped_space():
    for path in sorted((DIGITS_SPACE.parent).glob("*.yaml")):
        result = CliRunner().invoke(main, ["validate", str(path)])
        assert result.exit_code == 0, result.output
        assert "valid space file" in result.output
