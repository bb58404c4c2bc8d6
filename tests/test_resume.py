"""A running sweep refuses a second driver. An interrupted sweep (Ctrl-C, or SIGKILL of a
real `orchestrate launch` whose study and runs live in PostgreSQL) resumes to exactly
num_samples trials, with no MLflow run duplicated or left RUNNING, no epoch recorded twice,
and no Optuna trial left RUNNING. A sweep whose stores have passwords keeps them out of
every output, file and MLflow run, and `resume` takes them from the environment."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import EXIT_INTERRUPTED, main
from orchestrator.entities.names import BEST_RUN_TAG, REPORT_FILE
from orchestrator.entities.sweep import SweepRecord
from orchestrator.workflows.status import sweep_rows
from sweep_helpers import (
    child_runs,
    interruptible,
    postgres_databases,
    ray_temp_dir,
    short_digits_space,
    study_trials,
    sweep_args,
)
from trainer.metrics import TRAIN_LOSS

State = optuna.trial.TrialState
NUM_SAMPLES = 6


def _finished_trials(workdir, name: str) -> int:
    try:
        record = SweepRecord.load(name, workdir / "sweeps")
        return sum(t.state.is_finished() for t in study_trials(record))
    except Exception:  # the sweep is not recorded yet
        return 0


def _assert_finished_with_one_run_per_trial(record: SweepRecord, num_samples: int):
    """num_samples trials, none RUNNING, each with exactly one finished MLflow run."""
    trials = study_trials(record)
    assert len(trials) == num_samples, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in trials)
    children = child_runs(record)
    numbers = Counter(r.data.tags["optuna_trial_number"] for r in children)
    assert sorted(numbers) == sorted(str(t.number) for t in trials)
    assert set(numbers.values()) == {1}, "a trial has two runs"
    assert {r.info.status for r in children} <= {"FINISHED", "KILLED"}
    return trials, children


def _launch(workdir: Path, space: Path, args: list[str], env: dict | None = None):
    """A real `orchestrate launch` in its own session (killpg stops it and its Ray)."""
    orchestrate = Path(sys.executable).with_name("orchestrate")
    return subprocess.Popen(
        interruptible([str(orchestrate), "launch", "--space", str(space), *args]),
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_ADDRESS": "", **(env or {})},
        start_new_session=True,
    )


@pytest.mark.parametrize("presses", [1, 2], ids=["ctrl-c", "ctrl-c-twice"])
def test_resume_finishes_an_interrupted_sweep(local_ray, tmp_path, presses):
    """Ctrl-C, or Ctrl-C again while Tune winds down (its last save skipped)."""
    space = short_digits_space(tmp_path, max_epochs=4, num_samples=NUM_SAMPLES)
    process = _launch(tmp_path, space, sweep_args(tmp_path, "cut"))
    deadline = time.monotonic() + 180
    while _finished_trials(tmp_path, "cut") < 2 and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    # While it runs, a second driver is refused before it touches anything.
    storage = ["--storage", str(tmp_path / "sweeps")]
    running = CliRunner().invoke(main, ["status", "cut", *storage])
    assert running.exit_code == 0 and "no process runs it" not in running.output
    assert not sweep_rows(tmp_path / "sweeps")[0][2].endswith("interrupted")
    second = CliRunner().invoke(main, ["resume", "cut", *storage])
    assert second.exit_code == 2, second.output
    assert second.output == (
        f"Error: sweep 'cut' is running (pid {process.pid} on {socket.gethostname()}): wait for "
        "it to end, or stop it and `orchestrate resume cut`\n"
    )
    for _ in range(presses):
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == EXIT_INTERRUPTED, output
    assert output.rstrip().endswith("interrupted: continue with  orchestrate resume cut"), output
    assert "Aborted!" not in output and "Traceback" not in output
    stopped = CliRunner().invoke(main, ["status", "cut", *storage])
    assert "no process runs it now: `orchestrate resume cut` continues it" in stopped.output
    assert sweep_rows(tmp_path / "sweeps")[0][2].endswith(", interrupted")  # the listing

    record = SweepRecord.load("cut", tmp_path / "sweeps")
    assert _finished_trials(tmp_path, "cut") < NUM_SAMPLES
    # A copy elsewhere is read there, but resumes only where Tune's state was written.
    shutil.copytree(record.directory, tmp_path / "elsewhere" / "cut")
    moved = CliRunner().invoke(main, ["resume", "cut", "--storage", str(tmp_path / "elsewhere")])
    assert moved.exit_code == 2, moved.output
    assert moved.output == (
        f"Error: sweep 'cut' was recorded in {tmp_path / 'sweeps'} and Tune's state names that "
        f"directory: to resume it, put it back there ({tmp_path / 'elsewhere' / 'cut'} now)\n"
    )

    result = CliRunner().invoke(main, ["resume", "cut", *storage])
    assert result.exit_code == 0, result.output

    _assert_finished_with_one_run_per_trial(record, NUM_SAMPLES)
    parent = MlflowClient(record.tracking_uri).get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"


PASSWORD = "pw-8f3c1a"  # PostgreSQL trusts 127.0.0.1: any password connects
# Enough trials, each long enough, that a finished trial and a running one with epochs
# recorded overlap for seconds: with 4 trials of 4 epochs, most pruned at their first rung,
# a busy machine once finished the sweep before the test saw the overlap.
KILLED_SAMPLES = 6
KILLED_EPOCHS = 6


def _with_password(url: str) -> str:
    return url.replace("postgres@", f"postgres:{PASSWORD}@")


def _mid_sweep(record_file: Path, study_storage: str) -> bool:
    """A trial finished and a running one has reported an epoch."""
    if not record_file.exists():  # written once the study is there
        return False
    name = record_file.parent.name
    trials = optuna.load_study(study_name=name, storage=study_storage).trials
    finished = sum(t.state.is_finished() for t in trials)
    return finished >= 1 and any(t.state == State.RUNNING and t.intermediate_values for t in trials)


@pytest.mark.slow
def test_resume_after_sigkill_records_each_epoch_once_and_no_password(
    local_ray, tmp_path, monkeypatch
):
    with postgres_databases("optuna", "mlflow") as urls, ray_temp_dir() as ray_dir:
        study_db, tracking_db = (_with_password(url) for url in urls)
        space = short_digits_space(tmp_path, max_epochs=KILLED_EPOCHS, num_samples=KILLED_SAMPLES)
        args = ["--name", "killed", "--storage", str(tmp_path / "sweeps")]
        args += ["--study-storage", study_db, "--tracking-uri", tracking_db]
        process = _launch(tmp_path, space, args, {"RAY_TMPDIR": ray_dir})
        deadline = time.monotonic() + 240
        while not _mid_sweep(tmp_path / "sweeps" / "killed" / "sweep.json", study_db):
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no trial finished in time"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
        launch_output, _ = process.communicate(timeout=60)

        storage = ["--storage", str(tmp_path / "sweeps")]
        runner = CliRunner()
        refused = runner.invoke(main, ["resume", "killed", *storage])
        assert refused.exit_code == 2
        assert "give its password with --tracking-uri or MLFLOW_TRACKING_URI" in refused.output
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_db)
        monkeypatch.setenv("MATE_STUDY_STORAGE", study_db)
        resumed = runner.invoke(main, ["resume", "killed", *storage])
        assert resumed.exit_code == 0, resumed.output
        status = runner.invoke(main, ["status", "killed", *storage])
        assert status.exit_code == 0, status.output
        again = runner.invoke(main, ["resume", "killed", *storage])  # nothing left to run
        assert again.exit_code == 0 and "sweep killed had finished" in again.output

        record = SweepRecord.load("killed", tmp_path / "sweeps", [study_db, tracking_db])
        # Both stores are the PostgreSQL databases given: no SQLite study beside the sweep.
        assert record.study_storage == study_db and record.tracking_uri == tracking_db
        assert not (tmp_path / "sweeps" / "killed" / "optuna.db").exists()
        assert optuna.study.get_all_study_names(study_db) == ["killed"]
        trials, children = _assert_finished_with_one_run_per_trial(record, KILLED_SAMPLES)
        client = MlflowClient(record.tracking_uri)
        by_number = {int(r.data.tags["optuna_trial_number"]): r.info.run_id for r in children}
        for t in trials:
            steps = [m.step for m in client.get_metric_history(by_number[t.number], TRAIN_LOSS)]
            assert steps == list(range(1, len(t.intermediate_values) + 1)), (t.number, steps)
        parent = client.get_run(record.parent_run_id)
        assert parent.info.status == "FINISHED"

        # The password appears in no output, no file of the sweep, no MLflow param or tag.
        assert "***" in launch_output and "***" in status.output
        for text in (launch_output, refused.output, resumed.output, status.output, again.output):
            assert PASSWORD not in text
        for path in tmp_path.rglob("*"):
            if path.is_file():
                assert PASSWORD.encode() not in path.read_bytes(), path
        assert parent.data.params["sweep.tracking_uri"] == tracking_db.replace(PASSWORD, "***")
        for run in [parent, *children]:
            assert PASSWORD not in json.dumps([run.data.params, run.data.tags])


@pytest.mark.slow
def test_resume_completes_the_record_of_a_sweep_killed_after_its_last_trial(local_ray, tmp_path):
    """The driver dies once the study has every trial, maybe before the parent run got its
    summary: `resume` runs nothing and leaves the record complete, each value once."""
    space = short_digits_space(tmp_path, max_epochs=2, num_samples=2)
    process = _launch(tmp_path, space, sweep_args(tmp_path, "late"))
    deadline = time.monotonic() + 240
    while _finished_trials(tmp_path, "late") < 2:
        assert process.poll() is None, process.stdout.read()
        assert time.monotonic() < deadline, "the trials did not finish in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the Ray it started
    process.communicate(timeout=60)

    record = SweepRecord.load("late", tmp_path / "sweeps")
    storage = ["--storage", str(tmp_path / "sweeps")]
    for _ in range(2):  # a second resume changes nothing
        resumed = CliRunner().invoke(main, ["resume", "late", *storage])
        assert resumed.exit_code == 0 and "sweep late had finished" in resumed.output
        trials, _ = _assert_finished_with_one_run_per_trial(record, 2)
        client = MlflowClient(record.tracking_uri)
        parent = client.get_run(record.parent_run_id)
        assert parent.info.status == "FINISHED"
        best = max((t for t in trials if t.state == State.COMPLETE), key=lambda t: t.value)
        history = client.get_metric_history(record.parent_run_id, "best/val/mean_exit_acc")
        assert [m.value for m in history] == [pytest.approx(best.value)]
        best_run = client.get_run(parent.data.tags[BEST_RUN_TAG])
        assert best_run.data.tags["optuna_trial_number"] == str(best.number)
        assert "checkpoint" in {f.path for f in client.list_artifacts(best_run.info.run_id)}
        assert REPORT_FILE in {f.path for f in client.list_artifacts(record.parent_run_id)}
