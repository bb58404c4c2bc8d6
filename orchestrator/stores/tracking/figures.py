"""A trial's figures, logged to its MLflow run when the trial ends.

They go to the trial's child run under ``figures/``: per-exit validation accuracy over
epochs (read back from the run's metric history) and the anytime curve of its last epoch
(``anytime.json`` in its latest checkpoint, written by the trainable). The tracking callback
journals a ``figures`` write (:func:`orchestrator.tuning.callbacks.tracking.figures_write`)
when a trial ends; the sweep's MLflow writer applies it (:func:`apply_figures`) after the
trial's epochs, on its background thread, so the Tune driver never waits for matplotlib and
the history is complete. A figure that cannot be drawn is a warning in the sweep's log,
never a failed sweep.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from mlflow.tracking import MlflowClient

from orchestrator.rendering import plots
from trainer import metrics as M

__all__ = [
    "ANYTIME_FIGURE",
    "EXIT_ACCURACY_FIGURE",
    "FIGURES_OP",
    "apply_figures",
    "log_trial_figures",
]

EXIT_ACCURACY_FIGURE = "figures/exit_accuracy.png"
ANYTIME_FIGURE = "figures/anytime.png"
FIGURES_OP = "figures"  # the MLflow writer's op that draws and logs a trial's figures

logger = logging.getLogger(__name__)


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


def apply_figures(client: MlflowClient, run_id: str, write: Mapping[str, Any]) -> None:
    """Apply a ``figures`` write to the trial's run; a figure is never worth a failed sweep."""
    curve = None if write["curve"] is None else M.AnytimeCurve(**write["curve"])
    try:
        log_trial_figures(
            client, run_id, write["num_exits"], write["last_result"], curve, write["title"]
        )
    except Exception:
        logger.warning("could not draw the figures of %s", write["title"], exc_info=True)
