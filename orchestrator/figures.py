"""Figures logged to MLflow while a sweep runs: each trial's when it ends, the sweep report
when the sweep ends.

A trial's figures go to its child run under ``figures/``: per-exit validation accuracy over
epochs (read back from the run's metric history) and the anytime curve of its last epoch
(``anytime.json`` in its latest checkpoint, written by the trainable). The tracking callback
journals a ``figures`` write (:func:`figures_write`) when a trial ends; the sweep's MLflow
writer applies it (:func:`apply_figures`) after the trial's epochs, on its background thread,
so the Tune driver never waits for matplotlib and the history is complete. A figure that
cannot be drawn is a warning in the sweep's log, never a failed sweep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient
from ray.tune import Callback

from orchestrator import plots
from orchestrator.credentials import mask, reveal
from trainer import metrics as M
from trainer.trainable import ANYTIME_FILE, job_config_from_trial

if TYPE_CHECKING:
    from orchestrator.sweep import SweepRecord

__all__ = [
    "ANYTIME_FIGURE",
    "EXIT_ACCURACY_FIGURE",
    "FIGURES_OP",
    "ReportCallback",
    "apply_figures",
    "figures_write",
    "log_report_or_warn",
    "log_trial_figures",
]

EXIT_ACCURACY_FIGURE = "figures/exit_accuracy.png"
ANYTIME_FIGURE = "figures/anytime.png"
FIGURES_OP = "figures"  # the MLflow writer's op that draws and logs a trial's figures

logger = logging.getLogger(__name__)


def read_anytime_curve(checkpoint) -> M.AnytimeCurve | None:
    """The anytime curve saved with a Tune checkpoint, if any."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / ANYTIME_FILE
        return M.AnytimeCurve(**json.loads(path.read_text())) if path.is_file() else None


def log_trial_figures(
    client: MlflowClient,
    run_id: str,
    num_exits: int,
    last_result: Mapping[str, Any],
    curve: M.AnytimeCurve | None,
    title: str,
) -> list[str]:
    """Draw and log a trial's figures; returns the artifact paths logged."""
    histories = {
        k: [(m.step, m.value) for m in client.get_metric_history(run_id, M.exit_acc(k))]
        for k in range(1, num_exits + 1)
    }
    figures = {
        EXIT_ACCURACY_FIGURE: plots.exit_accuracy_figure(histories, f"{title}: accuracy per exit")
    }
    full = last_result.get(M.exit_gflops(num_exits))
    if curve is not None and full:
        exits = [
            (last_result[M.exit_gflops(k)] / full, last_result[M.exit_acc(k)])
            for k in range(1, num_exits + 1)
        ]
        operating = (last_result[M.ANYTIME_GFLOPS] / full, last_result[M.ANYTIME_ACC])
        figures[ANYTIME_FIGURE] = plots.anytime_figure(
            curve, exits, operating, f"{title}: anytime inference (validation)"
        )
    for path, figure in figures.items():
        client.log_figure(run_id, figure, path, save_kwargs=plots.SAVE_KWARGS)
        plots.close(figure)
    return list(figures)


def figures_write(trial, number: int) -> dict[str, Any]:
    """The writer's ``figures`` op for a trial that just ended, read on the driver (Tune goes
    on changing the trial object): what :func:`log_trial_figures` needs, as JSON."""
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


def apply_figures(client: MlflowClient, run_id: str, write: Mapping[str, Any]) -> None:
    """Apply a ``figures`` write to the trial's run; a figure is never worth a failed sweep."""
    curve = None if write["curve"] is None else M.AnytimeCurve(**write["curve"])
    try:
        log_trial_figures(
            client, run_id, write["num_exits"], write["last_result"], curve, write["title"]
        )
    except Exception:
        logger.warning("could not draw the figures of %s", write["title"], exc_info=True)


class ReportCallback(Callback):
    """Writes the sweep report and logs it to the parent run when the sweep ends; runs after
    the tracking callback, which has applied every write by then."""

    def __init__(self, record: SweepRecord) -> None:
        self.record = record

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles callbacks into the sweep directory: the record's URLs without password.
        masked = {key: mask(getattr(self.record, key)) for key in ("tracking_uri", "study_storage")}
        return {"record": replace(self.record, **masked)}

    def on_experiment_end(self, trials: list, **info) -> None:
        full = {key: reveal(getattr(self.record, key)) for key in ("tracking_uri", "study_storage")}
        log_report_or_warn(replace(self.record, **full))


def log_report_or_warn(record: SweepRecord) -> None:
    """Write the sweep report and log it to the parent run; a failure is only a warning."""
    from orchestrator.html_report import log_report

    try:
        log_report(record)
    except Exception:
        logger.warning("could not write the report of sweep %s", record.name, exc_info=True)
