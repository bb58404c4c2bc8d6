"""The sweep report: one self-contained HTML file, its PNG images embedded as data URIs.

Built from the stores alone (the Optuna study and the sweep's MLflow runs), so it works
while a sweep runs and after it: optimisation history, parallel coordinates, parameter
importances, per-exit accuracy of the top trials, the Pareto front of accuracy against
GFLOPs at the operating threshold, and for MATE the best trial's teacher weights when its
run reports them. A panel without enough data yet says so instead of an image.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import optuna
from matplotlib.figure import Figure
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from orchestrator import plots
from orchestrator.report import (
    best_summary,
    best_trial,
    is_multi_objective,
    load_study,
    objective_names,
    params_text,
    pareto_trials,
    primary_sort_key,
    state_counts,
)
from orchestrator.space import SpaceSpec
from orchestrator.sweep import SweepRecord
from orchestrator.tracking import SWEEP_TAG, TRIAL_NUMBER_TAG
from trainer import metrics as M

__all__ = ["REPORT_FILE", "Panel", "build_report", "log_report", "write_report"]

REPORT_FILE = "report.html"
TOP_TRIALS = 5

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Panel:
    """One figure of the report, or the reason it is not drawn yet."""

    title: str
    caption: str
    image: bytes | None = None  # PNG
    note: str | None = None


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


def trial_runs(client: MlflowClient, record: SweepRecord) -> dict[int, Run]:
    """The sweep's trial runs by Optuna trial number."""
    runs = client.search_runs(
        [record.experiment_id],
        filter_string=f"tags.{SWEEP_TAG} = '{record.name}'",
        max_results=5000,
    )
    return {
        int(r.data.tags[TRIAL_NUMBER_TAG]): r
        for r in runs
        if r.data.tags.get(TRIAL_NUMBER_TAG, "None") != "None"
    }


def _num_exits(run: Run) -> int:
    return len(json.loads(run.data.params["model.exits"]))


def _top_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto set (several objectives) or the best COMPLETE trials, best first."""
    if is_multi_objective(study):
        return pareto_trials(study)[:TOP_TRIALS]
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    return sorted(complete, key=primary_sort_key(study))[:TOP_TRIALS]


def _study_panels(study: optuna.Study, names: list[str]) -> list[Panel]:
    """Optuna's own plots: history per objective, parallel coordinates, importances."""
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
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
    panels.append(
        _panel(
            "Parameter importances",
            "The share of each objective's variance over the finished trials that each "
            "parameter explains (Optuna's fANOVA evaluator).",
            lambda: plots.param_importances_figure(study),
            None if varied else "needs two finished trials with different parameters",
        )
    )
    return panels


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
        for t in _top_trials(study)
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
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
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
    runs = trial_runs(MlflowClient(record.tracking_uri), record)
    panels = [
        *_study_panels(study, names),
        _exits_panel(study, names, runs),
        _front_panel(study, record.spec(), runs),
    ]
    teachers = _teacher_panel(study, runs)
    return panels if teachers is None else [*panels, teachers]


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 980px; color: #222; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
p.caption, p.meta { color: #555; } p.note { color: #a15c00; font-style: italic; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { padding: 0.2rem 0.6rem; text-align: right; }
th { border-bottom: 1px solid #999; } td.params { text-align: left; font-size: 0.85rem; }
"""


def _trials_html(study: optuna.Study, names: list[str]) -> str:
    """The top trials (Pareto set or best) with their values and parameters."""
    head = "".join(f"<th>{html.escape(n)}</th>" for n in ["trial", *names, "params"])
    rows = []
    for t in _top_trials(study):
        values = "".join(f"<td>{v:.4g}</td>" for v in t.values)
        params = html.escape(params_text(t.params))
        rows.append(f"<tr><td>{t.number}</td>{values}<td class='params'>{params}</td></tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>" if rows else ""


def render(record: SweepRecord, panels: list[Panel]) -> str:
    """The report's HTML; every image is embedded, so the file stands alone."""
    study = load_study(record)
    names = objective_names(study)
    counts = ", ".join(f"{n} {s.lower()}" for s, n in sorted(state_counts(study).items()))
    unfinished = len(study.trials) < record.num_samples or "RUNNING" in state_counts(study)
    parts = [
        f"<h1>Sweep {html.escape(record.name)}</h1>",
        f"<p class='meta'>{len(study.trials)}/{record.num_samples} trials ({counts})"
        + (" &mdash; still running" if unfinished else "")
        + f"; objectives: {html.escape(record.spec().search.objectives_text)}; "
        f"{html.escape(best_summary(study))}. Generated {datetime.now():%Y-%m-%d %H:%M}.</p>",
        _trials_html(study, names),
    ]
    for panel in panels:
        parts.append(f"<h2>{html.escape(panel.title)}</h2>")
        parts.append(f"<p class='caption'>{html.escape(panel.caption)}</p>")
        if panel.image is not None:
            data = base64.b64encode(panel.image).decode("ascii")
            alt = html.escape(panel.title, quote=True)
            parts.append(f"<img alt='{alt}' src='data:image/png;base64,{data}'>")
        else:
            parts.append(f"<p class='note'>Not drawn yet: {html.escape(panel.note or '')}.</p>")
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Sweep {html.escape(record.name)}</title><style>{_STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def build_report(record: SweepRecord) -> str:
    return render(record, build_panels(record))


def write_report(record: SweepRecord, output_dir: str | Path) -> Path:
    """Write ``report.html`` into `output_dir` and return its path."""
    path = Path(output_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(record), encoding="utf-8")
    return path


def log_report(record: SweepRecord, path: Path | None = None) -> Path:
    """Write the report into the sweep directory (unless `path` is given) and log it to the
    sweep's parent run, replacing the previous one."""
    path = path or write_report(record, record.directory)
    MlflowClient(record.tracking_uri).log_artifact(record.parent_run_id, str(path))
    return path
