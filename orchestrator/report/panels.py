"""The report's panels: data read from the stores (the Optuna study and the sweep's MLflow
runs), drawn by :mod:`orchestrator.rendering.plots`.

Optimisation history, parallel coordinates, parameter importances, per-exit accuracy of the
top trials, the Pareto front of accuracy against GFLOPs at the operating threshold, and for
MATE the best trial's teacher weights when its run reports them. A panel without enough
data yet says so instead of an image. Parameter importances (fANOVA fits a random forest)
are computed on at most :data:`IMPORTANCE_TRIALS` finished trials, a seeded random sample
of a larger sweep, so the report of thousands of trials takes seconds.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Callable

import optuna
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator.entities.space import SpaceSpec
from orchestrator.entities.sweep import SweepRecord
from orchestrator.rendering import plots
from orchestrator.rendering.report_page import Panel
from orchestrator.selection.trials import best_trial, complete_trials, objective_names, top_trials
from orchestrator.stores.study import load_study
from orchestrator.stores.tracking.runs import trial_runs
from trainer import metrics as M

__all__ = ["IMPORTANCE_TRIALS", "TOP_TRIALS", "build_panels", "sampled_study"]

TOP_TRIALS = 5
IMPORTANCE_TRIALS = 500

logger = logging.getLogger(__name__)


def _panel(title: str, caption: str, draw: Callable[[], Figure], missing: str | None) -> Panel:
    """A drawn panel; one that cannot be drawn from the data so far says why instead, so
    the other panels of a running sweep's report still show."""
    if missing is not None:
        return Panel(title, caption, note=missing)
    try:
        return Panel(title, caption, image=plots.png(draw()))
    except Exception as err:
        logger.warning("panel %r of the report not drawn", title, exc_info=True)
        return Panel(title, caption, note=f"could not be drawn ({type(err).__name__}: {err})")


def _num_exits(run: Run) -> int:
    return len(json.loads(run.data.params["model.exits"]))


def _study_panels(study: optuna.Study, names: list[str]) -> list[Panel]:
    """Optuna's own plots: history per objective, parallel coordinates, importances."""
    complete = complete_trials(study)
    too_few = None if complete else "no finished trial yet"
    panels = [
        _panel(
            f"Optimisation history: {name}",
            "Each finished trial's final value in trial order"
            + (", and the best so far." if len(names) == 1 else "."),
            lambda i=i, name=name: plots.optimization_history_figure(study, i, name),
            too_few,
        )
        for i, name in enumerate(names)
    ]
    panels.append(
        _panel(
            "Parallel coordinates of the searched parameters",
            f"One line per finished trial through its parameters, coloured by {names[0]}"
            + (" (by Pareto rank with several objectives)." if len(names) > 1 else "."),
            lambda: plots.parallel_coordinate_figure(study, names[0]),
            too_few,
        )
    )
    varied = len({tuple(sorted(map(str, t.params.values()))) for t in complete}) >= 2
    sample = sampled_study(study, IMPORTANCE_TRIALS)
    over = (
        "the finished trials"
        if sample is study
        else f"a random sample of {IMPORTANCE_TRIALS} of the {len(complete)} finished trials"
    )
    panels.append(
        _panel(
            "Parameter importances",
            f"The share of each objective's variance over {over} that each parameter "
            "explains (Optuna's fANOVA evaluator).",
            lambda: plots.param_importances_figure(sample),
            None if varied else "needs two finished trials with different parameters",
        )
    )
    return panels


def sampled_study(study: optuna.Study, limit: int, seed: int = 0) -> optuna.Study:
    """`study` itself, or with more than `limit` finished trials an in-memory study of a
    seeded random sample of `limit` of them (same directions and objective names)."""
    complete = complete_trials(study)
    if len(complete) <= limit:
        return study
    sample = optuna.create_study(directions=study.directions)
    sample.add_trials(random.Random(seed).sample(complete, limit))
    if study.metric_names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sample.set_metric_names(study.metric_names)
    return sample


def _exits_panel(study: optuna.Study, names: list[str], runs: dict[int, Run]) -> Panel:
    """Per-exit accuracy of the top trials at their last epoch."""
    rows = [
        (
            f"trial {t.number}",
            [
                runs[t.number].data.metrics[M.exit_acc(k)]
                for k in range(1, _num_exits(runs[t.number]) + 1)
            ],
        )
        for t in top_trials(study, TOP_TRIALS)
        if t.number in runs
    ]
    return _panel(
        "Per-exit accuracy of the top trials",
        "Validation accuracy of every exit at each trial's last epoch"
        + (" (the Pareto set)." if len(names) > 1 else f" (the best by {names[0]})."),
        lambda: plots.top_trials_exit_accuracy_figure(rows),
        None if rows else "no finished trial yet",
    )


def _front_panel(study: optuna.Study, spec: SpaceSpec, runs: dict[int, Run]) -> Panel:
    """Accuracy against GFLOPs of anytime inference at the operating threshold."""
    complete = complete_trials(study)
    points = [
        (
            t.number,
            runs[t.number].data.metrics[M.ANYTIME_GFLOPS],
            runs[t.number].data.metrics[M.ANYTIME_ACC],
        )
        for t in complete
        if t.number in runs and M.ANYTIME_ACC in runs[t.number].data.metrics
    ]
    searched = "train.exit_threshold" in spec.space
    threshold = None if searched else spec.base.train.exit_threshold
    return _panel(
        "Pareto front: accuracy against GFLOPs at the operating point",
        "Each finished trial at its exit threshold "
        + ("θ (searched)" if searched else f"θ={threshold:g}")
        + ": mean GFLOPs per sample and accuracy when every sample leaves at the first "
        f"exit at least θ confident ({M.ANYTIME_GFLOPS}, {M.ANYTIME_ACC}). Trials on the "
        "front are the ones no other trial beats on both.",
        lambda: plots.accuracy_gflops_pareto_figure(points, threshold),
        None if points else "no finished trial yet",
    )


def _teacher_panel(study: optuna.Study, runs: dict[int, Run]) -> Panel | None:
    """MATE: the best trial's teacher weights softmax(a_j)_k at its last epoch, when its run
    reports them."""
    best = best_trial(study)
    if best is None or best.number not in runs:
        return None
    metrics, size = runs[best.number].data.metrics, _num_exits(runs[best.number])
    names = [[M.teacher_weight(j, k) for k in range(1, size + 1)] for j in range(1, size + 1)]
    if not all(name in metrics for row in names for name in row):
        return None
    weights = [[metrics[name] for name in row] for row in names]
    return _panel(
        f"Teacher weights of trial {best.number}",
        "MATE: teacher j's weight softmax(a_j)_k on exit k at the last epoch.",
        lambda: plots.teacher_weights_figure(weights, f"trial {best.number}"),
        None,
    )


def build_panels(record: SweepRecord) -> list[Panel]:
    """Every panel of the report, from the study and the MLflow runs."""
    study = load_study(record)
    names = objective_names(study)
    runs = trial_runs(MlflowClient(record.tracking_uri), record.target)
    panels = [
        *_study_panels(study, names),
        _exits_panel(study, names, runs),
        _front_panel(study, record.spec(), runs),
    ]
    teachers = _teacher_panel(study, runs)
    return panels if teachers is None else [*panels, teachers]
