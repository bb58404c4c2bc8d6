"""Promote: a finished trial (the best, or one `--pick` names) -> final training job ->
registered model alias `champion`.

The final job re-runs the best trial's config on train+val (no validation split, so the
engine evaluates on the test split: ``test/...`` metrics) with the full schedule, and is
logged as a run in the sweep's experiment, linked to the sweep's parent run and to the
trial's run by tags.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

from orchestrator.entities.credentials import mask
from orchestrator.entities.names import (
    PROMOTED_RUN_TAG,
    PROMOTED_TRIAL_TAG,
    SWEEP_RUN_TAG,
    SWEEP_TAG,
)
from orchestrator.entities.space import decode_params
from orchestrator.entities.sweep import SweepRecord
from orchestrator.selection.pick import PickRule, parse_pick, pick_trial
from orchestrator.stores.preflight import check_name
from orchestrator.stores.study import load_study
from orchestrator.stores.tracking.runs import find_trial_run, flatten, now_ms
from trainer import metrics as M
from trainer.config import ConfigError, JobConfig, apply_overrides
from trainer.data import check_available
from trainer.engine import Job, build_job, fit, model_metrics, save_checkpoint
from trainer.serving import log_servable_model, usage_lines

__all__ = ["CHAMPION_ALIAS", "Promotion", "final_job_config", "promote"]

CHAMPION_ALIAS = "champion"


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: the final job's MLflow run and test metrics, and the model version
    it registered, with how to load and serve it."""

    run_id: str
    metrics: dict[str, float]
    model_uri: str  # models:/NAME@champion when registered, else the logged model's own
    model_name: str | None
    model_version: str | None
    usage: tuple[str, ...] = ()  # how to load and serve it


def final_job_config(
    record: SweepRecord,
    epochs: int | None,
    rule: PickRule | None = None,
    register: str | None = None,
) -> tuple[JobConfig, int]:
    """The job of the trial `rule` chooses (see :mod:`orchestrator.selection.pick`; the best
    trial by default) on train+val with the full schedule, and the trial's number; `register`,
    the name the model will be registered under, is checked here, before anything trains."""
    spec = record.spec()
    rule = rule or parse_pick("best", spec.search)
    if epochs is not None and epochs < 1:
        raise ConfigError(f"--epochs is {epochs}, but must be >= 1")
    if register is not None:
        check_name(register, "--register")
    chosen = pick_trial(load_study(record), spec.search, rule)
    job = spec.job_for(decode_params(spec, chosen.params))
    final = {"dataset.val_fraction": 0.0, "train.epochs": epochs or spec.base.train.epochs}
    check_available(job.dataset)  # the data is loaded once the final job's run exists
    return apply_overrides(job, final, source="promote"), chosen.number


def promote(
    record: SweepRecord,
    cfg: JobConfig,
    number: int,
    *,
    register: str | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
) -> Promotion:
    """Train the final job `cfg` (from :func:`final_job_config`, trial `number`), log it and
    (with `register`) register it as `champion`. The run is created first, so that it ends
    KILLED or FAILED wherever the job stops, loading its data included."""
    client = MlflowClient(record.tracking_uri)
    tags = {
        MLFLOW_RUN_NAME: f"{record.name}-final",
        SWEEP_TAG: record.name,
        PROMOTED_TRIAL_TAG: str(number),
        SWEEP_RUN_TAG: record.parent_run_id,
    }
    if (trial_run := find_trial_run(client, record.target, number)) is not None:
        tags[PROMOTED_RUN_TAG] = trial_run.info.run_id
    run_id = client.create_run(record.experiment_id, tags=tags).info.run_id

    def log_epoch(metrics: dict[str, float]) -> None:
        step = int(metrics[M.EPOCH])
        batch = [Metric(k, float(v), now_ms(), step) for k, v in metrics.items() if k != M.EPOCH]
        client.log_batch(run_id, metrics=batch)
        if on_epoch is not None:
            on_epoch(metrics)

    with _ended(client, run_id):
        params = [Param(k, str(v)) for k, v in flatten(cfg.to_dict()).items()]
        client.log_batch(run_id, params=params)
        job = build_job(cfg)
        trained = fit(job, on_epoch=log_epoch)
        figures = model_metrics(job)
        client.log_batch(run_id, metrics=[Metric(k, v, now_ms(), 0) for k, v in figures.items()])
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(job, directory)
            client.log_artifacts(run_id, directory, artifact_path="checkpoint")
        model_uri, version = _log_model(record, run_id, job, register)
    usage = tuple(usage_lines(model_uri, mask(record.tracking_uri)))
    return Promotion(run_id, trained | figures, model_uri, register, version, usage)


@contextlib.contextmanager
def _ended(client: MlflowClient, run_id: str) -> Iterator[None]:
    """End the run FINISHED after the block, KILLED if the user stopped it (MLflow's status
    for a stopped run), FAILED if it raised."""
    try:
        yield
    except KeyboardInterrupt:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
        raise
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


def _log_model(
    record: SweepRecord, run_id: str, job: Job, register: str | None
) -> tuple[str, str | None]:
    """Log the trained network as a servable early-exit model (docs/serving.md: a pyfunc
    flavor beside the raw pytorch one); register it and set the alias. Returns the URI to
    load it by and the registered version."""
    mlflow.set_tracking_uri(record.tracking_uri)
    with mlflow.start_run(run_id=run_id):
        info = log_servable_model(
            job.model, job.cfg, job.data, name="model", registered_model_name=register
        )
    if register is None:
        return info.model_uri, None
    version = str(info.registered_model_version)
    MlflowClient(record.tracking_uri).set_registered_model_alias(register, CHAMPION_ALIAS, version)
    return f"models:/{register}@{CHAMPION_ALIAS}", version
