"""An interrupted sweep (Ctrl-C of a real `orchestrate launch`) resumes to exactly
num_samples trials, with no MLflow run duplicated and no Optuna trial left RUNNING."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import EXIT_INTERRUPTED, main
from orchestrator.sweep import SweepRecord
from sweep_helpers import child_runs, short_digits_space, study_trials, sweep_args

State = optuna.trial.TrialState
NUM_SAMPLES = 6


def _finished_trials(workdir, name: str) -> int:
    try:
        record = SweepRecord.load(name, workdir / "sweeps")
        return sum(t.state.is_finished() for t in study_trials(record))
    except Exception:  # the sweep is not recorded yet
        return 0


def test_resume_finishes_an_interrupted_sweep(local_ray, tmp_path):
    space = short_digits_space(tmp_path, max_epochs=4, num_samples=NUM_SAMPLES)
    orchestrate = Path(sys.executable).with_name("orchestrate")
    launch = [str(orchestrate), "launch", "--space", str(space)]
    process = subprocess.Popen(
        [*launch, *sweep_args(tmp_path, "cut")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": ""},
    )
    deadline = time.monotonic() + 180
    while _finished_trials(tmp_path, "cut") < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert "orchestrate resume cut" in output

    record = SweepRecord.load("cut", tmp_path / "sweeps")
    assert _finished_trials(tmp_path, "cut") < NUM_SAMPLES

    result = CliRunner().invoke(main, ["resume", "cut", "--storage", str(tmp_path / "sweeps")])
    assert result.exit_code == 0, result.output

    trials = study_trials(record)
    assert len(trials) == NUM_SAMPLES
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in trials)
    children = child_runs(record)
    numbers = Counter(r.data.tags["optuna_trial_number"] for r in children)
    assert sorted(numbers) == sorted(str(t.number) for t in trials)
    assert set(numbers.values()) == {1}
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    parent = MlflowClient(record.tracking_uri).get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
