"""The journaled MLflow writer against a real MLflow store (sqlite) and a dead server."""

from __future__ import annotations

import json
import time

import pytest
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from orchestrator.entities.names import APPLIED_FILE, JOURNAL_FILE, SWEEP_TAG, TRIAL_NUMBER
from orchestrator.entities.sweep import SweepTarget
from orchestrator.stores.tracking.figures import EXIT_ACCURACY_FIGURE, FIGURES_OP
from orchestrator.stores.tracking.summary import open_writer
from orchestrator.stores.tracking.writer import MlflowWriter
from trainer import metrics as M

STEP_METRIC = "train/loss"
DEAD_SERVER = "http://127.0.0.1:1"  # nothing listens: every request is refused


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    client = MlflowClient(uri)
    location = (directory / "artifacts").as_uri()
    return uri, client, client.create_experiment("writer", artifact_location=location)


def _sweep(store, name: str) -> tuple[str, str]:
    _, client, experiment = store
    return experiment, client.create_run(experiment, tags={SWEEP_TAG: name}).info.run_id


def _target(uri: str, experiment: str, parent: str, name: str, directory) -> SweepTarget:
    return SweepTarget(name, str(directory), uri, experiment, parent, study_storage="")


def _writer(uri: str, experiment: str, parent: str, name: str, directory) -> MlflowWriter:
    target = _target(uri, experiment, parent, name, directory)
    return MlflowWriter(target, step_metric=STEP_METRIC)


def _run(trial: int, name: str, parent: str) -> dict:
    tags = {SWEEP_TAG: name, TRIAL_NUMBER: str(trial), MLFLOW_PARENT_RUN_ID: parent}
    return {"op": "run", "trial": trial, "tags": tags, "params": {"optim.lr": "0.1"}}


def _epoch(trial: int, step: int, value: float) -> dict:
    metrics = {STEP_METRIC: value}
    return {"op": "epoch", "trial": trial, "step": step, "time": 1000 + step, "metrics": metrics}


def _history(store, name: str, trial: int) -> dict[int, list[float]]:
    _, client, experiment = store
    (run,) = client.search_runs(
        [experiment], f"tags.{SWEEP_TAG} = '{name}' and tags.{TRIAL_NUMBER} = '{trial}'"
    )
    steps: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run.info.run_id, STEP_METRIC):
        steps.setdefault(metric.step, []).append(metric.value)
    return steps


def test_writes_made_while_the_store_is_down_are_applied_by_the_next_writer(store, tmp_path):
    uri, _, _ = store
    experiment, parent = _sweep(store, "down")
    writer = _writer(DEAD_SERVER, experiment, parent, "down", tmp_path)
    for write in [_run(0, "down", parent), *(_epoch(0, s, s / 10) for s in (1, 2, 3))]:
        writer.submit(write)  # returns at once, the store being down
    assert writer.close(timeout=1.0) == 4
    assert len((tmp_path / JOURNAL_FILE).read_text().splitlines()) == 4

    assert _writer(uri, experiment, parent, "down", tmp_path).close(timeout=60) == 0
    assert _history(store, "down", 0) == {1: [0.1], 2: [0.2], 3: [0.3]}
    assert not (tmp_path / JOURNAL_FILE).exists() and not (tmp_path / APPLIED_FILE).exists()


def test_a_trial_restarted_from_an_older_checkpoint_writes_no_epoch_twice(store, tmp_path):
    uri, _, _ = store
    experiment, parent = _sweep(store, "again")
    first = _writer(uri, experiment, parent, "again", tmp_path)
    for write in [_run(0, "again", parent), *(_epoch(0, s, s / 10) for s in (1, 2, 3))]:
        first.submit(write)
    assert first.close(timeout=60) == 0
    resumed = _writer(uri, experiment, parent, "again", tmp_path)  # a new driver
    for write in [_run(0, "again", parent), *(_epoch(0, s, s) for s in (2, 3, 4))]:
        resumed.submit(write)
    assert resumed.close(timeout=60) == 0
    assert _history(store, "again", 0) == {1: [0.1], 2: [0.2], 3: [0.3], 4: [4.0]}


def test_an_epoch_repeated_on_another_node_moves_the_node_tag_only(store, tmp_path):
    uri, client, _ = store
    experiment, parent = _sweep(store, "moved")
    writer = _writer(uri, experiment, parent, "moved", tmp_path)
    on_worker, on_head = {"node_ip": "10.0.0.2"}, {"node_ip": "10.0.0.1"}
    writer.submit(_run(0, "moved", parent))
    writer.submit({**_epoch(0, 1, 0.1), "tags": on_worker})
    writer.submit(_epoch(0, 2, 0.2))
    writer.submit({**_epoch(0, 2, 9.9), "tags": on_head})  # restarted on the head: a repeat
    writer.submit(_epoch(0, 3, 0.3))  # no tags: the node has not changed since
    assert writer.close(timeout=60) == 0
    assert _history(store, "moved", 0) == {1: [0.1], 2: [0.2], 3: [0.3]}
    (run,) = client.search_runs(
        [experiment], f"tags.{TRIAL_NUMBER} = '0' and tags.{SWEEP_TAG} = 'moved'"
    )
    assert run.data.tags["node_ip"] == "10.0.0.1"


def test_a_torn_last_journal_line_is_cut_off(store, tmp_path):
    uri, _, _ = store
    experiment, parent = _sweep(store, "torn")
    lines = [json.dumps(_run(0, "torn", parent)), json.dumps(_epoch(0, 1, 0.5))]
    # A driver killed while appending its third line:
    (tmp_path / JOURNAL_FILE).write_text(lines[0] + "\n" + lines[1] + "\n" + lines[1][:20])
    writer = _writer(uri, experiment, parent, "torn", tmp_path)
    assert writer.pending == 2
    assert writer.close(timeout=60) == 0
    assert _history(store, "torn", 0) == {1: [0.5]}


def test_a_write_mlflow_refuses_is_dropped_and_the_next_applied(store, tmp_path):
    uri, _, _ = store
    experiment, parent = _sweep(store, "refused")
    writer = _writer(uri, experiment, parent, "refused", tmp_path)
    writer.submit(_epoch(7, 1, 0.5))  # trial 7 has no run
    writer.submit(_run(1, "refused", parent))
    writer.submit(_epoch(1, 1, 0.25))
    assert writer.close(timeout=60) == 0
    assert writer.dropped == 1
    assert _history(store, "refused", 1) == {1: [0.25]}


def test_a_journaled_figures_write_is_drawn_by_the_next_sweep_writer(store, tmp_path):
    uri, client, _ = store
    experiment, parent = _sweep(store, "figures")
    writer = _writer(DEAD_SERVER, experiment, parent, "figures", tmp_path)
    exit_acc = {M.exit_acc(k): 0.5 + 0.1 * k for k in (1, 2)}
    epochs = [
        {**_epoch(0, step, 1.0 / step), "metrics": {STEP_METRIC: 1.0 / step, **exit_acc}}
        for step in (1, 2)
    ]
    figures = {
        "op": FIGURES_OP,
        "trial": 0,
        "num_exits": 2,
        "last_result": exit_acc,
        "curve": None,  # no anytime curve: only the per-exit accuracy figure
        "title": "trial 0",
    }
    for write in [_run(0, "figures", parent), *epochs, figures]:
        writer.submit(write)
    assert writer.close(timeout=1.0) == 4  # the store is down: all kept in the journal

    assert open_writer(_target(uri, experiment, parent, "figures", tmp_path)).close(timeout=60) == 0
    query = f"tags.{SWEEP_TAG} = 'figures' and tags.{TRIAL_NUMBER} = '0'"
    (run,) = client.search_runs([experiment], query)
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert logged == [EXIT_ACCURACY_FIGURE]


def test_the_writer_process_stops_when_the_driver_is_gone(store, tmp_path):
    """A driver that dies closes its end of the pipe: the child stops retrying at once and
    leaves what it has not applied in the journal for the next writer."""
    _, _, experiment = store
    writer = _writer(DEAD_SERVER, experiment, "parent", "gone", tmp_path)
    for write in [_run(0, "gone", "parent"), _epoch(0, 1, 0.5)]:
        writer.submit(write)
    time.sleep(1.0)  # the child is retrying against the dead server
    assert writer._process.is_alive()
    writer._wake.close()  # what the operating system does when the driver is killed
    writer._process.join(timeout=10)
    assert writer._process.exitcode == 0
    assert len((tmp_path / JOURNAL_FILE).read_text().splitlines()) == 2
