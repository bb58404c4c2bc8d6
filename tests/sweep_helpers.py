"""Shared pieces of the sweep tests: a short digits space and readers of the stores."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import optuna
import pytest
import sqlalchemy
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.entities.sweep import SweepRecord

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPACE = ROOT / "search_spaces" / "mate_digits.yaml"
POSTGRES = "postgresql://postgres@127.0.0.1:5432"  # trust authentication: any password works
# Execs its arguments with SIGINT at its default action, as a terminal's command has it.
_SIGINT_DEFAULT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)


def interruptible(command: Sequence[str]) -> list[str]:
    """`command` (its program an absolute path) to start as from a terminal, where Ctrl-C
    interrupts it: tests run in the background (`make test &`, some CI runners) inherit
    SIGINT ignored, and a Python started so never raises KeyboardInterrupt. Same pid."""
    return [sys.executable, "-c", _SIGINT_DEFAULT, *command]


def sweep_record(root: Path, name: str, study_storage: str | None = None) -> SweepRecord:
    """A record of a sweep `name` in `root`/sweeps with SQLite stores in `root` (or the study
    in `study_storage`); nothing is written."""
    return SweepRecord(
        name=name,
        storage_path=str(root / "sweeps"),
        tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
        experiment_id="1",
        parent_run_id="parent",
        study_storage=study_storage or f"sqlite:///{root / 'optuna.db'}",
        gpus=0,
        address=None,
        max_concurrent=None,
        num_samples=4,
        created=datetime.now().isoformat(timespec="seconds"),
    )


def short_digits_space(directory: Path, *, max_epochs: int = 4, num_samples: int = 8) -> Path:
    """The shipped digits space with a shorter per-trial budget (pruning still on)."""
    data = yaml.safe_load(DIGITS_SPACE.read_text())
    data["search"]["pruner"]["max_epochs"] = max_epochs
    data["search"]["num_samples"] = num_samples
    path = directory / "digits_short.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def sweep_args(workdir: Path, name: str) -> list[str]:
    """Store options that keep a test's sweep, study and runs inside `workdir`."""
    return [
        "--name",
        name,
        "--storage",
        str(workdir / "sweeps"),
        "--tracking-uri",
        f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}",
    ]


def child_runs(record: SweepRecord) -> list:
    client = MlflowClient(record.tracking_uri)
    runs = client.search_runs([record.experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == record.parent_run_id]


def study_trials(record: SweepRecord) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=record.name, storage=record.study_storage).trials


@contextlib.contextmanager
def postgres_databases(*roles: str) -> Iterator[list[str]]:
    """One fresh database per role on the local PostgreSQL (Optuna and MLflow each keep
    their own Alembic schema version, so they cannot share one), dropped afterwards; skips
    the test when no PostgreSQL runs."""
    admin = sqlalchemy.create_engine(f"{POSTGRES}/postgres", isolation_level="AUTOCOMMIT")
    try:
        connection = admin.connect()
    except sqlalchemy.exc.OperationalError as err:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 ({err.orig})")
    names = [f"mate_{role}_{uuid.uuid4().hex[:8]}" for role in roles]
    for name in names:
        connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield [f"{POSTGRES}/{name}" for name in names]
    finally:
        for name in names:
            connection.execute(sqlalchemy.text(f"DROP DATABASE {name} WITH (FORCE)"))
        connection.close()
        admin.dispose()


@contextlib.contextmanager
def ray_temp_dir() -> Iterator[str]:
    """A Ray temp dir of a sweep's own, under /tmp: Ray's unix socket paths in it must stay
    within 107 characters (pytest's tmp_path is too deep)."""
    directory = tempfile.mkdtemp(prefix="mt-ray-", dir="/tmp")
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)
