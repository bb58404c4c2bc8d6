"""End to end: a real sweep on digits (local Ray, Optuna RDB study, MLflow sqlite store),
then `status` and `promote`, all read back from the stores."""

from __future__ import annotations

import json

import optuna
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from orchestrator.entities.space import decode_params, load_space
from orchestrator.entities.sweep import SweepRecord
from sweep_helpers import child_runs, short_digits_space, study_trials, sweep_args
from trainer import metrics as M

State = optuna.trial.TrialState
MAX_EPOCHS = 4
NUM_SAMPLES = 8


@pytest.fixture(scope="module")
def sweep(local_ray, tmp_path_factory):
    """One finished 8-trial sweep shared by the tests of this module."""
    workdir = tmp_path_factory.mktemp("sweep")
    space = short_digits_space(workdir, max_epochs=MAX_EPOCHS, num_samples=NUM_SAMPLES)
    result = CliRunner().invoke(
        main, ["launch", "--space", str(space), *sweep_args(workdir, "e2e")]
    )
    assert result.exit_code == 0, result.output
    record = SweepRecord.load("e2e", workdir / "sweeps")
    return workdir, record, result.output


def test_launch_prints_top5_and_next_commands(sweep):
    _, record, output = sweep
    assert "top 5 of e2e" in output
    assert "orchestrate promote e2e" in output
    assert "orchestrate ui" in output
    # The progress line's best is the final table's: the best COMPLETE trial's final value.
    best = max(
        (t for t in study_trials(record) if t.state == State.COMPLETE), key=lambda t: t.value
    )
    progress = next(line for line in output.splitlines() if line.startswith("trials "))
    assert progress.endswith(f"| best {M.MEAN_EXIT_ACC} {best.value:.4f} (trial {best.number})")


def test_sweep_study_has_pruned_and_complete_trials(sweep):
    _, record, _ = sweep
    trials = study_trials(record)
    states = [t.state for t in trials]
    assert len(trials) == NUM_SAMPLES
    assert State.RUNNING not in states
    assert State.PRUNED in states and State.COMPLETE in states
    for t in trials:
        assert t.intermediate_values, f"trial {t.number} reported nothing"
        steps = sorted(t.intermediate_values)
        assert steps == list(range(1, len(steps) + 1))
        if t.state == State.COMPLETE:
            assert steps[-1] == MAX_EPOCHS
            assert t.value == t.intermediate_values[MAX_EPOCHS]
        if t.state == State.PRUNED:
            assert steps[-1] < MAX_EPOCHS


def test_sweep_mlflow_has_parent_and_one_child_per_trial(sweep):
    _, record, _ = sweep
    client = MlflowClient(record.tracking_uri)
    parent = client.get_run(record.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.metric"] == "val/mean_exit_acc"
    assert f"best/{M.MEAN_EXIT_ACC}" in parent.data.metrics
    paths = [a.path for a in client.list_artifacts(record.parent_run_id)]
    assert paths == ["report.html", "space.yaml"]
    children = child_runs(record)
    numbers = sorted(int(r.data.tags["optuna_trial_number"]) for r in children)
    assert numbers == list(range(NUM_SAMPLES))


def test_sweep_child_runs_mirror_the_study(sweep):
    _, record, _ = sweep
    spec = load_space(record.space_file)
    trials = {t.number: t for t in study_trials(record)}
    client = MlflowClient(record.tracking_uri)
    expected_status = {State.COMPLETE: "FINISHED", State.PRUNED: "KILLED"}
    for run in child_runs(record):
        trial = trials[int(run.data.tags["optuna_trial_number"])]
        assert run.info.status == expected_status[trial.state]
        assert (run.data.tags.get("pruned") == "true") == (trial.state == State.PRUNED)
        for key, value in decode_params(spec, trial.params).items():
            assert run.data.params[key] == str(value), key
        assert run.data.params["train.epochs"] == str(MAX_EPOCHS)
        exits = json.loads(run.data.params["model.exits"])
        epochs_ran = len(trial.intermediate_values)
        steps = list(range(1, epochs_ran + 1))
        for k in range(1, len(exits) + 1):
            for name in (M.exit_acc(k), M.teacher_acc(k), M.teacher_weight(k, 1)):
                history = client.get_metric_history(run.info.run_id, name)
                assert [m.step for m in history] == steps, name
            assert run.data.metrics[M.exit_gflops(k)] > 0
        diversity = client.get_metric_history(run.info.run_id, M.TEACHER_DIVERSITY)
        assert [m.step for m in diversity] == steps
        mean_acc = client.get_metric_history(run.info.run_id, M.MEAN_EXIT_ACC)
        assert [m.value for m in mean_acc] == pytest.approx(
            [trial.intermediate_values[s] for s in range(1, epochs_ran + 1)]
        )
        assert run.data.metrics[f"best/{M.MEAN_EXIT_ACC}"] == pytest.approx(
            max(trial.intermediate_values.values())
        )
        assert run.data.tags["node_id"]
        figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
        assert figures == ["figures/anytime.png", "figures/exit_accuracy.png"]  # pruned too


def test_sweep_best_trial_checkpoint_is_an_artifact(sweep):
    _, record, _ = sweep
    client = MlflowClient(record.tracking_uri)
    best_run = client.get_run(record.parent_run_id).data.tags["best_run_id"]
    paths = [a.path for a in client.list_artifacts(best_run, "checkpoint")]
    assert paths == ["checkpoint/anytime.json", "checkpoint/checkpoint.pt"]
    best = max(
        (t for t in study_trials(record) if t.state == State.COMPLETE), key=lambda t: t.value
    )
    assert client.get_run(best_run).data.tags["optuna_trial_number"] == str(best.number)


def test_status_lists_the_trials(sweep):
    workdir, _, _ = sweep
    result = CliRunner().invoke(main, ["status", "e2e", "--storage", str(workdir / "sweeps")])
    assert result.exit_code == 0, result.output
    assert f"{NUM_SAMPLES}/{NUM_SAMPLES} trials" in result.output
    assert "PRUNED" in result.output and "COMPLETE" in result.output
    listing = CliRunner().invoke(main, ["status", "--storage", str(workdir / "sweeps")])
    assert "e2e" in listing.output


def test_promote_registers_champion_with_test_metrics(sweep):
    workdir, record, _ = sweep
    # As many epochs as the trials ran: after 2, a shallow exit of a good config can still
    # be near chance on digits.
    args = ["promote", "e2e", "--epochs", str(MAX_EPOCHS), "--register", "digits-e2e"]
    result = CliRunner().invoke(main, [*args, "--storage", str(workdir / "sweeps")])
    assert result.exit_code == 0, result.output
    # The two commands a user needs next: load the early-exit model in Python, serve it.
    assert 'mlflow.pyfunc.load_model("models:/digits-e2e@champion")' in result.output
    assert "mlflow models serve -m models:/digits-e2e@champion" in result.output
    client = MlflowClient(record.tracking_uri)
    version = client.get_model_version_by_alias("digits-e2e", "champion")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sweep_run_id"] == record.parent_run_id
    best = max(
        (t for t in study_trials(record) if t.state == State.COMPLETE), key=lambda t: t.value
    )
    assert run.data.tags["promoted_from_trial"] == str(best.number)
    assert run.data.params["dataset.val_fraction"] == "0.0"
    assert run.data.params["train.epochs"] == str(MAX_EPOCHS)
    num_exits = len(json.loads(run.data.params["model.exits"]))
    for k in range(1, num_exits + 1):
        assert 0.5 < run.data.metrics[M.exit_acc(k, "test")] <= 1.0
    assert not any(name.startswith("val/") for name in run.data.metrics)
