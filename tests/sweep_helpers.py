"""Shared pieces of the sweep tests: a short digits space and readers of the stores."""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.sweep import SweepRecord

ROOT = Path(__file__).resolve().parents[1]
DIGITS_SPACE = ROOT / "search_spaces" / "mate_digits.yaml"


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
