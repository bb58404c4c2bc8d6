"""The commands that only read stay light: `orchestrate --help`, `status` (with and without a
sweep name) and `validate` load neither torch nor Ray nor MLflow, and only `status`, which
reads the study, loads Optuna, but not the Alembic of Optuna's schema checks. Each runs in a
fresh interpreter that says, on exit, which of those libraries it imported."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.entities.names import SPACE_COPY
from orchestrator.entities.space import load_space
from orchestrator.stores.study import open_study
from sweep_helpers import DIGITS_SPACE, sweep_record

HEAVY = ("torch", "ray", "mlflow", "optuna", "alembic")
# Runs `orchestrate ARGS...` and prints the heavy libraries it loaded, also when it exits.
_WRAPPER = f"""
import atexit, sys
atexit.register(
    lambda: print("LOADED:", *sorted(set({HEAVY!r}) & set(sys.modules)), file=sys.stderr)
)
from orchestrator.cli import main
main(sys.argv[1:], prog_name="orchestrate")
"""


def loaded(*args: str, cwd: Path) -> set[str]:
    """The heavy libraries `orchestrate ARGS` imported; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *args], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(line for line in done.stderr.splitlines() if line.startswith("LOADED:"))
    return set(line.split()[1:])


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    """A storage directory holding one recorded sweep (its study, no trials yet)."""
    root = tmp_path_factory.mktemp("light")
    record = sweep_record(root, "light")
    record.directory.mkdir(parents=True)
    shutil.copyfile(DIGITS_SPACE, record.directory / SPACE_COPY)
    open_study(load_space(DIGITS_SPACE), record.study_storage, record.name)
    record.save()
    return root / "sweeps"


def test_help_loads_no_heavy_library(tmp_path):
    assert loaded("--help", cwd=tmp_path) == set()


@pytest.mark.parametrize(
    "file", [DIGITS_SPACE, DIGITS_SPACE.parents[1] / "configs" / "digits_mate.yaml"]
)
def test_validate_loads_no_heavy_library(tmp_path, file):
    assert loaded("validate", str(file), cwd=tmp_path) == set()


def test_status_of_all_sweeps_reads_the_study_only(tmp_path, storage):
    assert loaded("status", "--storage", str(storage), cwd=tmp_path) <= {"optuna"}


def test_status_of_a_sweep_reads_the_study_only(tmp_path, storage):
    assert loaded("status", "light", "--storage", str(storage), cwd=tmp_path) == {"optuna"}
