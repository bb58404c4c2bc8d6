"""Server-backed stores: a sweep whose Optuna study and MLflow runs live in PostgreSQL."""

from __future__ import annotations

import optuna
import pytest
from click.testing import CliRunner

from orchestrator.cli import main
from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import child_runs, postgres_databases, short_digits_space, study_trials


@pytest.fixture
def databases():
    with postgres_databases("optuna", "mlflow") as urls:
        yield urls


def test_sweep_with_postgres_study_and_tracking(local_ray, tmp_path, databases, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study_db, tracking_db = databases
    space = short_digits_space(tmp_path, max_epochs=2, num_samples=3)
    args = ["launch", "--space", str(space), "--name", "pg", "--storage", str(tmp_path)]
    args += ["--study-storage", study_db, "--tracking-uri", tracking_db]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output

    record = SweepRecord.load("pg", tmp_path)
    assert record.study_storage == study_db and record.tracking_uri == tracking_db
    assert not (tmp_path / "pg" / "optuna.db").exists()
    trials = study_trials(record)
    assert len(trials) == 3
    assert all(t.state.is_finished() for t in trials)
    assert optuna.study.get_all_study_names(study_db) == ["pg"]
    runs = child_runs(record)
    assert sorted(r.data.tags["optuna_trial_number"] for r in runs) == ["0", "1", "2"]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in runs)
