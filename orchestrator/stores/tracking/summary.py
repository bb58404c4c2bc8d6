"""The sweep's MLflow writer as a sweep uses it, and the parent run's summary.

The summary follows the rules ``status`` uses (:mod:`orchestrator.selection.trials`): the
best COMPLETE trial's final values, and every Pareto trial with several objectives, with
the chosen trials' checkpoints as artifacts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import optuna

from orchestrator.entities.names import JOURNAL_FILE
from orchestrator.entities.sweep import SweepTarget
from orchestrator.selection.trials import best_trial, pareto_trials
from orchestrator.stores.tracking.figures import FIGURES_OP, apply_figures
from orchestrator.stores.tracking.runs import now_ms
from orchestrator.stores.tracking.writer import MlflowWriter
from trainer import metrics as M

__all__ = ["FLUSH_TIMEOUT_S", "flush_writer", "open_writer", "summarize_sweep"]

logger = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 120.0  # at the end of a sweep, for a tracking server that is down


def open_writer(target: SweepTarget) -> MlflowWriter:
    """The sweep's MLflow writer (its journal in the sweep directory), able to apply every
    write the tracking callback journals, the trial figures included."""
    return MlflowWriter(target, step_metric=M.TRAIN_LOSS, handlers={FIGURES_OP: apply_figures})


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


def summarize_sweep(
    writer: MlflowWriter,
    study: optuna.Study,
    metrics: list[str],
    checkpoints: Mapping[int, str],  # Optuna trial number -> its last checkpoint directory
    *,
    finished: bool,
) -> None:
    """Submit the parent run's summary (the best trial, or the Pareto set with several
    objectives), with the chosen trials' checkpoints as artifacts; the parent ends FINISHED
    when `finished`."""
    multi = len(metrics) > 1
    chosen = [t for t in (pareto_trials(study) if multi else [best_trial(study)]) if t]
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
