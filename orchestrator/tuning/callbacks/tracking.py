"""The MLflow tracking callback: every trial of a sweep as a child run of the sweep's parent
run (docs/design.md §5).

The callback runs on the Tune driver and hands every write to a journaled background
:class:`~orchestrator.stores.tracking.writer.MlflowWriter`: one batched ``log_batch`` per
epoch (Ray's ``MLflowLoggerCallback`` makes one request per metric key and has no parent
runs), retried while the tracking server is down, without holding up the trials. A child
run is the run of one Optuna trial number, whichever Tune trial (after a restart) runs it,
and has each epoch once. Its final status mirrors the Optuna study, the single source of
truth for how a trial ended: COMPLETE -> FINISHED, PRUNED -> KILLED (tag ``pruned=true``),
FAIL -> FAILED (tag ``error``: why). When one of the first :data:`FIGURES_FIRST` trials
ends, or a trial that is the best so far on an objective, its run also gets its figures
(:mod:`orchestrator.stores.tracking.figures`), drawn by the writer after the trial's epochs
are in. Drawing takes longer than all of a trial's other writes: figures for every trial
of a sweep of thousands would keep the writer behind the trials.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback

from orchestrator.entities.credentials import MaskedWhenPickled
from orchestrator.entities.names import ERROR, PRUNED_TAG, RAY_TRIAL_ID, SWEEP_TAG, TRIAL_NUMBER
from orchestrator.entities.sweep import SweepTarget
from orchestrator.stores.study import load_study_from, reading_storage
from orchestrator.stores.study_cache import flush_written_study, written_trial
from orchestrator.stores.tracking.figures import FIGURES_OP
from orchestrator.stores.tracking.runs import flatten, now_ms
from orchestrator.stores.tracking.summary import flush_writer, open_writer, summarize_sweep
from orchestrator.stores.tracking.writer import MlflowWriter
from trainer import metrics as M
from trainer.trainable import ANYTIME_FILE, job_config_from_trial

__all__ = ["FIGURES_FIRST", "MlflowTrackingCallback", "figures_write"]

FIGURES_FIRST = 16  # trials (by number) whose figures are drawn whatever their outcome

_NODE_KEYS = ("node_ip", "node_id")  # reported with every result; run tags

_STATUS = {
    optuna.trial.TrialState.COMPLETE: RunStatus.FINISHED,
    optuna.trial.TrialState.PRUNED: RunStatus.KILLED,
    optuna.trial.TrialState.FAIL: RunStatus.FAILED,
}


class MlflowTrackingCallback(MaskedWhenPickled, Callback):
    """Writes every trial of one sweep as a child run of the sweep's parent run."""

    # Tune pickles callbacks into the sweep directory: no password, no live clients.
    _secret_fields = ("target",)
    _fresh_fields = (
        ("_metric_names", dict),
        ("_nodes", dict),
        ("_writer", lambda: None),
        ("_storage", lambda: None),
        ("_best", dict),
    )

    def __init__(self, target: SweepTarget, metric: str | list[str], mode: str | list[str]):
        self.target = target
        self.metrics = [metric] if isinstance(metric, str) else list(metric)
        self.modes = [mode] if isinstance(mode, str) else list(mode)
        self._metric_names: dict[str, list[str]] = {}  # Tune trial id -> epoch metrics
        self._nodes: dict[str, dict[str, str]] = {}  # Tune trial id -> node tags sent
        self._writer: MlflowWriter | None = None
        self._storage: optuna.storages.BaseStorage | None = None
        self._best: dict[int, float] = {}  # objective -> best final value this driver saw

    @property
    def writer(self) -> MlflowWriter:
        if self._writer is None:
            self._writer = open_writer(self.target.revealed())
        return self._writer

    def _outcome(self, number: int) -> optuna.trial.FrozenTrial:
        """Trial `number` as the study has it (from the searcher's memory on this driver)."""
        target = self.target.revealed()
        if (frozen := written_trial(target.study_storage, target.name, number)) is not None:
            return frozen
        if self._storage is None:
            self._storage = reading_storage(target.study_storage)
        study_id = self._storage.get_study_id_from_name(target.name)
        return self._storage.get_trial(
            self._storage.get_trial_id_from_study_id_trial_number(study_id, number)
        )

    def _new_best(self, frozen: optuna.trial.FrozenTrial) -> bool:
        """Whether a COMPLETE trial beats every one seen before on some objective."""
        if frozen.state != optuna.trial.TrialState.COMPLETE or frozen.values is None:
            return False
        better = False
        for index, (value, mode) in enumerate(zip(frozen.values, self.modes, strict=True)):
            best = self._best.get(index)
            if best is None or (value > best if mode == "max" else value < best):
                self._best[index] = value
                better = True
        return better

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        number = trial.config[TRIAL_NUMBER]
        tags = {
            MLFLOW_PARENT_RUN_ID: self.target.parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{number:03d}",
            SWEEP_TAG: self.target.name,
            RAY_TRIAL_ID: trial.trial_id,
            TRIAL_NUMBER: str(number),
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
                "trial": trial.config[TRIAL_NUMBER],
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
        number = trial.config[TRIAL_NUMBER]
        frozen = self._outcome(number)
        status = _STATUS.get(frozen.state, RunStatus.FAILED)
        tags = {PRUNED_TAG: "true"} if status == RunStatus.KILLED else {}
        if status == RunStatus.FAILED:
            tags[ERROR] = (
                frozen.user_attrs.get(ERROR)
                or "unknown (see the trial's error.txt in the sweep directory)"
            )
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
        if self._new_best(frozen) or number < FIGURES_FIRST:
            self.writer.submit(figures_write(trial, number))

    def on_experiment_end(self, trials: list, **info) -> None:
        """Summarise the sweep on the parent run (:func:`summarize_sweep`) and wait for the
        writer to apply everything."""
        target = self.target.revealed()
        flush_written_study(target.study_storage, target.name)  # the study's last writes
        summarize_sweep(
            self.writer,
            load_study_from(target.study_storage, target.name),
            self.metrics,
            {t.config[TRIAL_NUMBER]: t.checkpoint.path for t in trials if t.checkpoint},
            finished=all(t.status in ("TERMINATED", "ERROR") for t in trials),
        )
        flush_writer(self.writer, self.target.name)
        self._writer = None


def read_anytime_curve(checkpoint) -> M.AnytimeCurve | None:
    """The anytime curve saved with a Tune checkpoint, if any."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / ANYTIME_FILE
        return M.AnytimeCurve(**json.loads(path.read_text())) if path.is_file() else None


def figures_write(trial, number: int) -> dict[str, Any]:
    """The writer's ``figures`` op for a trial that just ended, read on the driver (Tune goes
    on changing the trial object): what
    :func:`~orchestrator.stores.tracking.figures.log_trial_figures` needs, as JSON."""
    num_exits = job_config_from_trial(trial.config).num_exits
    wanted = [M.ANYTIME_ACC, M.ANYTIME_GFLOPS]
    wanted += [f(k) for k in range(1, num_exits + 1) for f in (M.exit_acc, M.exit_gflops)]
    last = trial.last_result or {}
    curve = read_anytime_curve(trial.checkpoint)
    return {
        "op": FIGURES_OP,
        "trial": number,
        "num_exits": num_exits,
        "last_result": {key: float(last[key]) for key in wanted if key in last},
        "curve": None if curve is None else asdict(curve),
        "title": f"trial {number}",
    }
