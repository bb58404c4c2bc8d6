"""Figures of a trial and of a sweep: matplotlib and Optuna's matplotlib visualisations.

Pure builders (data in, a matplotlib Figure out) and :func:`png`; reading the stores and
logging the figures is done by :mod:`orchestrator.stores.tracking.figures` and
:mod:`orchestrator.report`.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure
from optuna.visualization import matplotlib as optuna_plots

from trainer.metrics import AnytimeCurve

__all__ = [
    "FANOVA_TREES",
    "SAVE_KWARGS",
    "accuracy_gflops_pareto_figure",
    "anytime_figure",
    "close",
    "exit_accuracy_figure",
    "group_accuracy_gflops_figure",
    "optimization_history_figure",
    "parallel_coordinate_figure",
    "param_importances_figure",
    "png",
    "teacher_weights_figure",
    "top_trials_exit_accuracy_figure",
]

plt.style.use("ggplot")  # the look Optuna's plots set, for every figure alike
_SIZE = (6.4, 4.0)  # inches at 100 dpi: 640x400 px, small enough to embed many


SAVE_KWARGS = {"dpi": 100, "bbox_inches": "tight"}
FANOVA_TREES = 16  # the parameter importances' random forest (param_importances_figure)


def _figure(size: tuple[float, float] = _SIZE):
    """A figure outside pyplot's global registry: safe to draw off the main thread, freed
    with its last reference."""
    figure = Figure(figsize=size)
    return figure, figure.subplots()


def png(figure: Figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", **SAVE_KWARGS)
    close(figure)
    return buffer.getvalue()


def close(figure: Figure) -> None:
    """Release a figure that pyplot registered (Optuna's plots draw through pyplot)."""
    plt.close(figure)


def exit_accuracy_figure(
    histories: Mapping[int, Sequence[tuple[int, float]]], title: str, split: str = "val"
) -> Figure:
    """Accuracy of each exit over epochs; `histories` maps exit k to (epoch, accuracy)."""
    figure, ax = _figure()
    for k, points in sorted(histories.items()):
        epochs, accuracy = zip(*points, strict=True) if points else ((), ())
        ax.plot(epochs, accuracy, marker="o", markersize=3, label=f"exit {k}")
    ax.set(xlabel="epoch", ylabel=f"{split} accuracy", title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    return figure


def group_accuracy_gflops_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float], Sequence[float]]], by: str
) -> Figure:
    """Test accuracy of each exit against its cumulative GFLOPs per sample, one line per
    group; `curves` maps a group to (GFLOPs, mean accuracy, std) per exit (std as bars)."""
    figure, ax = _figure()
    for group, (gflops, accuracy, spread) in curves.items():
        ax.errorbar(gflops, accuracy, yerr=spread, marker="o", capsize=3, label=group)
    ax.set(
        xlabel="GFLOPs per sample to reach the exit",
        ylabel="test accuracy",
        title=f"Accuracy of each exit against its cost, by {by}",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def anytime_figure(
    curve: AnytimeCurve,
    exits: Sequence[tuple[float, float]],
    operating: tuple[float, float],
    title: str,
) -> Figure:
    """Accuracy against cost relative to the full network as the confidence threshold θ
    moves: the curve, one marker per exit alone (`exits`: (relative cost, accuracy) of exit
    k), and the operating point at θ = `curve.operating_threshold`."""
    figure, ax = _figure()
    ax.plot(curve.relative_cost, curve.accuracy, color="tab:blue", label="early exit at θ")
    for k, (cost, accuracy) in enumerate(exits, start=1):
        ax.scatter(cost, accuracy, marker="s", s=36, zorder=3, label=f"exit {k} alone")
    cost, accuracy = operating
    ax.scatter(
        cost,
        accuracy,
        marker="*",
        s=220,
        color="tab:red",
        zorder=4,
        label=f"operating point θ={curve.operating_threshold:g}",
    )
    ax.set(xlabel="GFLOPs relative to the full network", ylabel="accuracy", title=title)
    ax.set_xlim(0.0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def top_trials_exit_accuracy_figure(
    rows: Sequence[tuple[str, Sequence[float]]], split: str = "val"
) -> Figure:
    """Grouped bars: the final accuracy of each exit for each of the top trials."""
    figure, ax = _figure()
    width = 0.8 / max(len(rows), 1)
    for i, (label, accuracies) in enumerate(rows):
        positions = [k + (i - (len(rows) - 1) / 2) * width for k in range(1, len(accuracies) + 1)]
        ax.bar(positions, accuracies, width=width, label=label)
    most = max((len(a) for _, a in rows), default=0)
    ax.set_xticks(range(1, most + 1), [f"exit {k}" for k in range(1, most + 1)])
    ax.set(ylabel=f"{split} accuracy (final epoch)", title="Per-exit accuracy of the top trials")
    ax.set_ylim(0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    return figure


def teacher_weights_figure(weights: Sequence[Sequence[float]], title: str) -> Figure:
    """MATE teacher weights softmax(a_j)_k as a heatmap: row j is teacher j, column k exit k."""
    figure, ax = _figure((4.8, 4.0))
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0)
    size = len(weights)
    ticks = range(size)
    ax.set_xticks(ticks, [f"exit {k + 1}" for k in ticks])
    ax.set_yticks(ticks, [f"teacher {j + 1}" for j in ticks])
    for j in ticks:
        for k in range(len(weights[j])):
            value = weights[j][k]
            ax.text(
                k, j, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.5 else "k"
            )
    ax.set_title(title)
    figure.colorbar(image, ax=ax, fraction=0.046)
    return figure


def accuracy_gflops_pareto_figure(
    points: Sequence[tuple[int, float, float]], threshold: float | None
) -> Figure:
    """Optuna's Pareto-front plot of (trial number, GFLOPs, accuracy) at the operating
    threshold (None: each trial's own, when it is searched): fewer GFLOPs and more accuracy
    are better; the front is marked and every point is labelled with its trial number."""
    study = optuna.create_study(directions=["minimize", "maximize"])
    for number, gflops, accuracy in points:
        study.add_trial(
            optuna.trial.create_trial(values=[gflops, accuracy], user_attrs={"number": number})
        )
    at = f"θ={threshold:g}" if threshold is not None else "each trial's θ"
    ax = _optuna(
        optuna_plots.plot_pareto_front,
        study,
        target_names=[f"GFLOPs per sample at {at}", f"accuracy at {at}"],
    )
    for number, gflops, accuracy in points:
        ax.annotate(str(number), (gflops, accuracy), textcoords="offset points", xytext=(4, 4))
    names = {"Best Trial": "on the Pareto front", "Trial": "beaten on both by a front trial"}
    for points_drawn in ax.collections:
        points_drawn.set_label(names.get(points_drawn.get_label(), points_drawn.get_label()))
    ax.legend(loc="best", fontsize="small")  # beaten trials lie low and right: not there
    ax.set_title("Accuracy against GFLOPs at the operating point (label: trial)")
    return _sized(ax.figure)


def optimization_history_figure(study: optuna.Study, index: int, name: str) -> Figure:
    """Optuna's optimisation history of objective `index` (named `name`); with one
    objective it also draws the best value so far."""
    if len(study.directions) == 1:
        ax = _optuna(optuna_plots.plot_optimization_history, study, target_name=name)
    else:
        ax = _optuna(
            optuna_plots.plot_optimization_history,
            study,
            target=lambda t: t.values[index],
            target_name=name,
        )
    return _sized(ax.figure)


def parallel_coordinate_figure(study: optuna.Study, name: str) -> Figure:
    """Optuna's parallel coordinates of the searched parameters, coloured by the primary
    objective `name`. A log-scaled parameter with one value in every finished trial (one
    finished trial, say) has an axis of no height, which matplotlib widens; its warning
    about that is dropped."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Attempting to set identical low and high", UserWarning)
        ax = _optuna(
            optuna_plots.plot_parallel_coordinate,
            study,
            target=lambda t: t.values[0],
            target_name=name,
        )
    return _sized(ax.figure, width=9.0)


def param_importances_figure(study: optuna.Study) -> Figure:
    """Optuna's parameter importances per objective, by fANOVA: the share of an objective's
    variance each parameter explains, whatever the objective's direction (PED-ANOVA, Optuna's
    default, ranks toward low values, which is wrong for a maximised objective). The forest
    has :data:`FANOVA_TREES` trees, not Optuna's 64: on 500 trials the importances agreed to
    within 0.01 and took a fifth of the time (docs/benchmarks.md, the scale benchmark)."""
    evaluator = optuna.importance.FanovaImportanceEvaluator(n_trees=FANOVA_TREES, seed=0)
    ax = _optuna(optuna_plots.plot_param_importances, study, evaluator=evaluator)
    return _sized(ax.figure)


def _optuna(plot, study: optuna.Study, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return plot(study, **kwargs)


def _sized(figure: Figure, width: float = _SIZE[0]) -> Figure:
    figure.set_size_inches(width, _SIZE[1])
    figure.tight_layout()
    return figure
