"""MLflow tracking: one parent run per sweep, one child run per trial (DESIGN §5).

The callback runs on the Tune driver and hands every write to a journaled background
:class:`~orchestrator.mlflow_writer.MlflowWriter`: one batched ``log_batch`` per epoch
(Ray's ``MLflowLoggerCallback`` makes one request per metric key and has no parent runs),
retried while the tracking server is down, without holding up the trials. A child run is
the run of one Optuna trial number, whichever Tune trial (after a restart) runs it, and has
each epoch once. Its final status mirrors the Optuna study, the single source of truth for
how a trial ended: COMPLETE -> FINISHED, PRUNED -> KILLED (tag ``pruned=true``), FAIL ->
FAILED (tag ``error``: why). When a trial ends its run also gets its figures
(:mod:`orchestrator.figures`), drawn by the writer after the trial's epochs are in.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from orchestrator import figures
from orchestrator.credentials import mask, reveal
from orchestrator.mlflow_writer import JOURNAL_FILE, SWEEP_TAG, TRIAL_NUMBER_TAG, MlflowWriter
from orchestrator.optuna_search import ERROR_ATTR, OPTUNA_TRIAL_NUMBER
from trainer import metrics as M
from trainer.trainable import job_config_from_trial

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MlflowTrackingCallback",
    "ensure_experiment",
    "flatten",
    "flush_writer",
    "open_writer",
    "resolve_tracking_uri",
]

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
TRIAL_ID_TAG = "ray_trial_id"
PRUNED_TAG = "pruned"
ERROR_TAG = "error"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # read by the MLflow UI and its kind selector
MODEL_TRAINING_KIND = "custom_model_development"
FLUSH_TIMEOUT_S = 120.0  # at the end of a sweep, for a tracking server that is down
_NODE_KEYS = ("node_ip", "node_id")  # reported with every result; run tags

_STATUS = {
    optuna.trial.TrialState.COMPLETE: RunStatus.FINISHED,
    optuna.trial.TrialState.PRUNED: RunStatus.KILLED,
    optuna.trial.TrialState.FAIL: RunStatus.FAILED,
}


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the local store under ./mlruns (made absolute,
    so every process of the sweep writes to the same file). Creates nothing."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
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
    # A model-training experiment (runs and charts), not a GenAI one (traces).
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    return client.create_experiment(name, artifact_location=location, tags=tags)


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
        metric: str | list[str],
        mode: str | list[str],
        study: tuple[str, str],  # (storage URL, study name)
        directory: str | Path,  # the sweep directory: the writer's journal lives there
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.sweep_name = sweep_name
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.modes = [mode] if isinstance(mode, str) else list(mode)
        self.study_ref = study
        self.directory = str(directory)
        self._metric_names: dict[str, list[str]] = {}  # Tune trial id -> epoch metrics
        self._nodes: dict[str, dict[str, str]] = {}  # Tune trial id -> node tags sent
        self._writer: MlflowWriter | None = None
        self._storage: optuna.storages.BaseStorage | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the sweep directory: no password, no live clients.
        return {
            **self.__dict__,
            "tracking_uri": mask(self.tracking_uri),
            "study_ref": (mask(self.study_ref[0]), self.study_ref[1]),
            "_metric_names": {},
            "_nodes": {},
            "_writer": None,
            "_storage": None,
        }

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = open_writer(
                reveal(self.tracking_uri),
                self.experiment_id,
                self.parent_run_id,
                self.sweep_name,
                self.directory,
            )
        return self._writer

    def _outcome(self, number: int) -> tuple[optuna.trial.TrialState, str | None]:
        """The study's state of trial `number` and why it failed, if it did."""
        if self._storage is None:
            self._storage = optuna.storages.RDBStorage(reveal(self.study_ref[0]))
        study_id = self._storage.get_study_id_from_name(self.study_ref[1])
        frozen = self._storage.get_trial(
            self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
        )
        return frozen.state, frozen.user_attrs.get(ERROR_ATTR)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        number = trial.config[OPTUNA_TRIAL_NUMBER]
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{number:03d}",
            SWEEP_TAG: self.sweep_name,
            TRIAL_ID_TAG: trial.trial_id,
            TRIAL_NUMBER_TAG: str(number),
        }
        params = flatten(job_config_from_trial(trial.config).to_dict())
        self.writer.submit(
            {
                "op": "run",
                "trial": number,
                "tags": tags,
                "params": {key: str(value) for key, value in params.items()},
            }
        )

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        if M.EPOCH not in result:
            return  # a failed trial's last word (trainer.trainable.TRIAL_ERROR)
        names = self._metric_names.get(trial.trial_id)
        if names is None:  # first result this session: per-model constants too
            job = job_config_from_trial(trial.config)
            num_exits = job.num_exits
            names = [n for n in M.epoch_metric_names(num_exits, job.loss.kind) if n != M.EPOCH]
            self._metric_names[trial.trial_id] = names
            names = names + [M.exit_gflops(k) for k in range(1, num_exits + 1)]
        node = {key: str(result[key]) for key in _NODE_KEYS if key in result}
        tags = {} if node == self._nodes.get(trial.trial_id) else node
        self._nodes[trial.trial_id] = node
        self.writer.submit(
            {
                "op": "epoch",
                "trial": trial.config[OPTUNA_TRIAL_NUMBER],
                "step": int(result[M.EPOCH]),
                "time": now_ms(),
                "metrics": {n: float(result[n]) for n in names if n in result},
                "tags": tags,
            }
        )

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._finish(trial)

    def _finish(self, trial) -> None:
        number = trial.config[OPTUNA_TRIAL_NUMBER]
        state, error = self._outcome(number)
        status = _STATUS.get(state, RunStatus.FAILED)
        tags = {PRUNED_TAG: "true"} if status == RunStatus.KILLED else {}
        if status == RunStatus.FAILED:
            tags[ERROR_TAG] = error or "unknown (see the trial's error.txt in the sweep directory)"
        best_epochs = {  # each objective's best epoch value
            f"best/{metric}": trial.metric_analysis.get(metric, {}).get(mode)
            for metric, mode in zip(self.metrics, self.modes, strict=True)
        }
        self.writer.submit(
            {
                "op": "end",
                "trial": number,
                "status": RunStatus.to_string(status),
                "time": now_ms(),
                "metrics": {k: v for k, v in best_epochs.items() if v is not None},
                "tags": tags,
            }
        )
        self.writer.submit(figures.figures_write(trial, number))

    def on_experiment_end(self, trials: list, **info) -> None:
        """Summarise the sweep on the parent run (:func:`summarize_sweep`) and wait for the
        writer to apply everything."""
        summarize_sweep(
            self.writer,
            (reveal(self.study_ref[0]), self.study_ref[1]),
            self.metrics,
            {t.config[OPTUNA_TRIAL_NUMBER]: t.checkpoint.path for t in trials if t.checkpoint},
            finished=all(t.status in ("TERMINATED", "ERROR") for t in trials),
        )
        flush_writer(self.writer, self.sweep_name)
        self._writer = None


def summarize_sweep(
    writer: MlflowWriter,
    study: tuple[str, str],  # (storage URL, study name)
    metrics: list[str],
    checkpoints: Mapping[int, str],  # Optuna trial number -> its last checkpoint directory
    *,
    finished: bool,
) -> None:
    """Submit the parent run's summary by the rule `status` uses (the best COMPLETE trial's
    final values; every Pareto trial with several objectives), with the chosen trials'
    checkpoints as artifacts; the parent ends FINISHED when `finished`."""
    from orchestrator.report import best_trial, load_study_from, pareto_trials

    loaded = load_study_from(*study)
    multi = len(metrics) > 1
    chosen = [t for t in (pareto_trials(loaded) if multi else [best_trial(loaded)]) if t]
    for frozen in chosen:
        if (checkpoint := checkpoints.get(frozen.number)) is not None:
            # The checkpoint stays in the sweep's storage until the sweep directory goes.
            writer.submit(
                {
                    "op": "artifacts",
                    "trial": frozen.number,
                    "path": checkpoint,
                    "artifact_path": "checkpoint",
                }
            )
    summary: dict[str, Any] = {"op": "sweep", "time": now_ms(), "metrics": {}}
    summary["best_trial"] = chosen[0].number if chosen else None
    summary["pareto_trials"] = [t.number for t in chosen] if multi else []
    if chosen:
        values = zip(metrics, chosen[0].values, strict=True)
        summary["metrics"] = {f"best/{metric}": value for metric, value in values}
    summary["status"] = "FINISHED" if finished else None
    writer.submit(summary)


def open_writer(
    tracking_uri: str,
    experiment_id: str,
    parent_run_id: str,
    sweep_name: str,
    directory: str | Path,
) -> MlflowWriter:
    """The sweep's MLflow writer (its journal in `directory`), able to apply every write the
    tracking callback journals, the trial figures included."""
    return MlflowWriter(
        tracking_uri,
        experiment_id,
        parent_run_id,
        sweep_name,
        directory,
        step_metric=M.TRAIN_LOSS,
        handlers={figures.FIGURES_OP: figures.apply_figures},
    )


def flush_writer(writer: MlflowWriter, sweep_name: str) -> None:
    """Wait for `writer`'s pending writes; say what is left when the store stays down."""
    if writer.pending:
        logger.warning(
            "waiting up to %.0f s for MLflow to take %d pending write(s)",
            FLUSH_TIMEOUT_S,
            writer.pending,
        )
    left = writer.close(FLUSH_TIMEOUT_S)
    if left:
        logger.warning(
            "%d MLflow write(s) are kept in %s; `orchestrate resume %s` applies them",
            left,
            JOURNAL_FILE,
            sweep_name,
        )
