"""MLflow tracking: one parent run per sweep, one child run per trial (DESIGN §5).

The callback runs on the Tune driver and writes through one ``MlflowClient``: a batched
``log_batch`` call per epoch (Ray's ``MLflowLoggerCallback`` makes one request per metric
key and has no parent runs). A child run's final status mirrors the Optuna study, the single
source of truth for how a trial ended: COMPLETE -> FINISHED, PRUNED -> KILLED (tag
``pruned=true``), FAIL -> FAILED.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from trainer import metrics as M
from trainer.trainable import job_config_from_trial

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowTrackingCallback",
    "ensure_experiment",
    "flatten",
    "resolve_tracking_uri",
]

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
SWEEP_TAG = "sweep"
TRIAL_ID_TAG = "ray_trial_id"
TRIAL_NUMBER_TAG = "optuna_trial_number"
PRUNED_TAG = "pruned"

_STATUS = {
    optuna.trial.TrialState.COMPLETE: RunStatus.FINISHED,
    optuna.trial.TrialState.PRUNED: RunStatus.KILLED,
    optuna.trial.TrialState.FAIL: RunStatus.FAILED,
}


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the local store under ./mlruns (made absolute,
    so every process of the sweep writes to the same file)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        path = Path(uri.removeprefix(prefix)).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        uri = prefix + str(path)
    return uri


def ensure_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The experiment's id, creating it if needed. A tracking server decides where artifacts
    go; with a database used directly they go to `artifacts/` beside a sqlite file, else to
    ./mlruns/artifacts."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if tracking_uri.startswith("sqlite:///"):
        store_dir = Path(tracking_uri.removeprefix("sqlite:///")).parent
        location = (store_dir / "artifacts" / name).resolve().as_uri()
    elif not tracking_uri.startswith(("http://", "https://")):
        location = (Path("mlruns") / "artifacts" / name).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys (``{"loss": {"kind": "mate"}}`` -> ``{"loss.kind": ...}``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flatten(value, dotted + ".")
        else:
            flat[dotted] = value
    return flat


def now_ms() -> int:
    return int(time.time() * 1000)


class MlflowTrackingCallback(Callback):
    """Writes every trial of one sweep as a child run of the sweep's parent run."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        sweep_name: str,
        metric: str,
        mode: str,
        study: tuple[str, str],  # (storage URL, study name)
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.metric = metric
        self.mode = mode
        self.study_ref = study
        self._run_ids: dict[str, str] = {}  # Tune trial id -> MLflow run id
        self._metric_names: dict[str, list[str]] = {}  # Tune trial id -> epoch metrics
        self._client: MlflowClient | None = None
        self._storage: optuna.storages.BaseStorage | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_client": None, "_storage": None, "_run_ids": {}}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _trial_state(self, number: int) -> optuna.trial.TrialState | None:
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(self.study_ref[0])
        study_id = self._storage.get_study_id_from_name(self.study_ref[1])
        return self._storage.get_trial(
            self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
        ).state

    def run_id(self, trial) -> str:
        """The trial's child run: found by tag after a resume, else created."""
        if trial.trial_id in self._run_ids:
            return self._run_ids[trial.trial_id]
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{TRIAL_ID_TAG} = '{trial.trial_id}' "
            f"and tags.{SWEEP_TAG} = '{self.sweep_name}'",
            max_results=1,
        )
        run_id = existing[0].info.run_id if existing else self._create_trial_run(trial)
        self._run_ids[trial.trial_id] = run_id
        return run_id

    def _create_trial_run(self, trial) -> str:
        number = trial.config.get("optuna_trial_number")
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{number:03d}" if number is not None else trial.trial_id,
            SWEEP_TAG: self.sweep_name,
            TRIAL_ID_TAG: trial.trial_id,
            TRIAL_NUMBER_TAG: str(number),
        }
        run = self.client.create_run(self.experiment_id, tags=tags)
        job = job_config_from_trial(trial.config)
        params = [Param(k, str(v)) for k, v in flatten(job.to_dict()).items()]
        self.client.log_batch(run.info.run_id, params=params)
        return run.info.run_id

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self.run_id(trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        run_id = self.run_id(trial)
        epoch = int(result[M.EPOCH])
        names = self._metric_names.get(trial.trial_id)
        tags: list[RunTag] = []
        if names is None:  # first result this session: per-model constants and placement
            num_exits = job_config_from_trial(trial.config).num_exits
            names = [n for n in M.epoch_metric_names(num_exits) if n != M.EPOCH]
            self._metric_names[trial.trial_id] = names
            names = names + [M.exit_gflops(k) for k in range(1, num_exits + 1)]
            tags = [RunTag(k, str(result[k])) for k in ("node_ip", "node_id") if k in result]
        ts = now_ms()
        batch = [Metric(n, float(result[n]), ts, epoch) for n in names if n in result]
        self.client.log_batch(run_id, metrics=batch, tags=tags)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial)

    def _finish(self, trial) -> None:
        run_id = self.run_id(trial)
        number = trial.config.get("optuna_trial_number")
        state = self._trial_state(number) if number is not None else None
        status = _STATUS.get(state, RunStatus.FAILED)
        tags = [RunTag(PRUNED_TAG, "true")] if status == RunStatus.KILLED else []
        best = trial.metric_analysis.get(self.metric, {}).get(self.mode)
        metrics = [] if best is None else [Metric(f"best/{self.metric}", best, now_ms(), 0)]
        self.client.log_batch(run_id, metrics=metrics, tags=tags)
        self.client.set_terminated(run_id, RunStatus.to_string(status))

    def on_experiment_end(self, trials: list, **info) -> None:
        """Summarise the sweep on the parent run and keep the best trial's checkpoint."""
        finished = [t for t in trials if self.metric in t.metric_analysis and t.checkpoint]
        if finished:
            pick = max if self.mode == "max" else min
            best = pick(finished, key=lambda t: t.metric_analysis[self.metric][self.mode])
            best_run = self.run_id(best)
            with best.checkpoint.as_directory() as directory:
                self.client.log_artifacts(best_run, directory, artifact_path="checkpoint")
            value = best.metric_analysis[self.metric][self.mode]
            self.client.log_batch(
                self.parent_run_id,
                metrics=[Metric(f"best/{self.metric}", value, now_ms(), 0)],
                tags=[RunTag("best_run_id", best_run)],
            )
        done = all(t.status in ("TERMINATED", "ERROR") for t in trials)
        if done:
            self.client.set_terminated(self.parent_run_id, "FINISHED")
