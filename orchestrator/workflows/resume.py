"""Resume an interrupted sweep where Tune's experiment state left it, or complete the MLflow
record of a sweep whose trials have all finished."""

from __future__ import annotations

import json
from collections.abc import Callable

from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.entities.names import JOURNAL_FILE, REPORT_FILE, TRIAL_NUMBER
from orchestrator.entities.sweep import SweepRecord
from orchestrator.report.build import log_report_or_warn
from orchestrator.selection.trials import is_finished
from orchestrator.stores.driver_lock import driving
from orchestrator.stores.preflight import check_stores
from orchestrator.stores.study import load_study
from orchestrator.stores.tracking.summary import (
    FLUSH_TIMEOUT_S,
    flush_writer,
    open_writer,
    summarize_sweep,
)
from orchestrator.tuning.cluster import check_ray_address, init_ray, join_ray
from orchestrator.tuning.tuner import fit, restore_tuner
from trainer.config import ConfigError

__all__ = ["complete_mlflow_record", "resume"]


def check_resumable(record: SweepRecord) -> None:
    """The sweep's stores answer and Tune's state is there; before Ray starts. An unfinished
    sweep resumes only where it was recorded: Tune's saved callbacks and searcher name its
    directory and study there."""
    check_stores(record)
    if not tune.Tuner.can_restore(str(record.directory)):
        raise ConfigError(
            f"sweep {record.name!r} has no Tune state to resume in {record.directory}"
        )
    if record.moved_from and not is_finished(load_study(record), record.num_samples):
        raise ConfigError(
            f"sweep {record.name!r} was recorded in {record.moved_from} and Tune's state names "
            f"that directory: to resume it, put it back there ({record.directory} now)"
        )


def last_checkpoints(record: SweepRecord) -> dict[int, str]:
    """Optuna trial number -> the last checkpoint directory its Tune trial left."""
    found = {}
    for trial_dir in record.directory.glob("trial_*"):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        if checkpoints and (trial_dir / "params.json").exists():
            number = json.loads((trial_dir / "params.json").read_text())[TRIAL_NUMBER]
            found[number] = str(checkpoints[-1])
    return found


def complete_mlflow_record(record: SweepRecord) -> None:
    """Complete the MLflow record of a sweep whose trials have all finished (no Ray needed):
    apply the writes a killed driver left in the journal and write what it died before:
    the summary (the parent run is still RUNNING), the report (not among its artifacts).
    Starts one writer process for both, none where there is nothing to write."""
    writer = None
    if (record.directory / JOURNAL_FILE).is_file():  # emptied journals are removed
        writer = open_writer(record.target)
        writer.flush(FLUSH_TIMEOUT_S)  # the journal may end with the summary itself
    client = MlflowClient(record.tracking_uri)
    if client.get_run(record.parent_run_id).info.status == "RUNNING":
        writer = writer or open_writer(record.target)
        metrics = record.spec().search.metrics
        study = load_study(record)
        summarize_sweep(writer, study, metrics, last_checkpoints(record), finished=True)
    if writer is not None:
        flush_writer(writer, record.name)
    if REPORT_FILE not in {f.path for f in client.list_artifacts(record.parent_run_id)}:
        log_report_or_warn(record)


def resume(
    record: SweepRecord, on_start: Callable[[], None] = lambda: None
) -> tune.ResultGrid | None:
    """Continue an interrupted sweep where Tune's experiment state left it (the callbacks
    given at launch come back with it). A finished sweep only gets its MLflow record
    completed (:func:`complete_mlflow_record`; returns None). Refused while another process
    runs the sweep (:mod:`orchestrator.stores.driver_lock`). `on_start` is called once the
    sweep is checked and locked, before anything runs."""
    check_resumable(record)
    with driving(record.directory):  # before anything is written: another driver may be running it
        on_start()
        if is_finished(load_study(record), record.num_samples):
            complete_mlflow_record(record)
            return None
        spec = record.spec()
        if record.address:
            join_ray(check_ray_address(record.address))
        else:
            init_ray(num_gpus=record.gpus)
        return fit(restore_tuner(spec, record))
