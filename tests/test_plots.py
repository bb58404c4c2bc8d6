"""Figure builders: what each figure draws, checked against hand-made data."""

from __future__ import annotations

import warnings

import numpy as np
import optuna
import pytest

from orchestrator.rendering import plots
from trainer.metrics import AnytimeCurve


def _labels(ax) -> list[str]:
    return [text.get_text() for text in ax.get_legend().get_texts()]


def test_exit_accuracy_figure_draws_one_line_per_exit():
    histories = {2: [(1, 0.5), (2, 0.7)], 1: [(1, 0.3), (2, 0.4)]}
    figure = plots.exit_accuracy_figure(histories, "trial 0")
    ax = figure.axes[0]
    assert [line.get_label() for line in ax.lines] == ["exit 1", "exit 2"]
    assert list(ax.lines[1].get_xdata()) == [1, 2]
    assert list(ax.lines[1].get_ydata()) == [0.5, 0.7]
    assert ax.get_title() == "trial 0"
    plots.close(figure)


def test_anytime_figure_marks_every_exit_and_the_operating_point():
    curve = AnytimeCurve(
        thresholds=[0.0, 0.5, 1.0],
        accuracy=[0.6, 0.8, 0.9],
        relative_cost=[0.25, 0.6, 1.0],
        operating_threshold=0.9,
    )
    exits = [(0.25, 0.6), (0.5, 0.75), (1.0, 0.9)]
    figure = plots.anytime_figure(curve, exits, (0.7, 0.85), "trial 3")
    ax = figure.axes[0]
    (line,) = ax.lines
    assert list(line.get_xdata()) == curve.relative_cost
    assert list(line.get_ydata()) == curve.accuracy
    markers = [c.get_offsets().tolist() for c in ax.collections]
    assert markers == [[[0.25, 0.6]], [[0.5, 0.75]], [[1.0, 0.9]], [[0.7, 0.85]]]
    assert _labels(ax) == [
        "early exit at θ",
        "exit 1 alone",
        "exit 2 alone",
        "exit 3 alone",
        "operating point θ=0.9",
    ]
    plots.close(figure)


def test_top_trials_figure_groups_bars_by_exit():
    figure = plots.top_trials_exit_accuracy_figure(
        [("trial 4", [0.5, 0.9]), ("trial 1", [0.4, 0.8])]
    )
    ax = figure.axes[0]
    heights = [bar.get_height() for bar in ax.patches]
    assert heights == [0.5, 0.9, 0.4, 0.8]
    centres = [bar.get_x() + bar.get_width() / 2 for bar in ax.patches]
    assert centres == pytest.approx([0.8, 1.8, 1.2, 2.2])  # trial 4 left, trial 1 right of k
    assert _labels(ax) == ["trial 4", "trial 1"]
    plots.close(figure)


def test_teacher_weights_figure_shows_the_matrix():
    weights = [[0.7, 0.3], [0.1, 0.9]]
    figure = plots.teacher_weights_figure(weights, "trial 2")
    ax = figure.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), weights)
    assert [t.get_text() for t in ax.texts] == ["0.70", "0.30", "0.10", "0.90"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["teacher 1", "teacher 2"]
    plots.close(figure)


def test_pareto_figure_marks_the_non_dominated_trials():
    # Trial 2 (1.5 GFLOPs, 0.85) is beaten by trial 0 (1.0, 0.9): fewer GFLOPs, more accuracy.
    points = [(0, 1.0, 0.9), (1, 2.0, 0.95), (2, 1.5, 0.85), (3, 0.5, 0.7)]
    figure = plots.accuracy_gflops_pareto_figure(points, 0.9)
    ax = figure.axes[0]
    by_label = {c.get_label(): sorted(map(tuple, c.get_offsets().tolist())) for c in ax.collections}
    assert by_label["on the Pareto front"] == [(0.5, 0.7), (1.0, 0.9), (2.0, 0.95)]
    assert by_label["beaten on both by a front trial"] == [(1.5, 0.85)]
    assert sorted(t.get_text() for t in ax.texts) == ["0", "1", "2", "3"]
    assert ax.get_xlabel() == "GFLOPs per sample at θ=0.9"
    plots.close(figure)


def test_pareto_legend_leaves_the_beaten_trials_in_the_lower_right_visible():
    # A sweep's usual shape: the front high and left, the worst trials low and right.
    points = [(0, 0.078, 0.63), (1, 0.079, 0.62), (2, 0.0845, 0.51), (3, 0.085, 0.38)]
    figure = plots.accuracy_gflops_pareto_figure(points, 0.9)
    ax = figure.axes[0]
    figure.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    drawn = ax.transData.transform([(g, a) for _, g, a in points])
    assert not [tuple(p) for p in drawn if legend.contains(*p)]
    plots.close(figure)


def test_png_is_a_small_image():
    figure = plots.exit_accuracy_figure({1: [(1, 0.5)]}, "t")
    data = plots.png(figure)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(data) < 200_000


def test_parallel_coordinates_of_one_finished_trial_draw_without_a_warning():
    """One trial: a log-scaled axis of no height, which matplotlib widened with a warning
    printed on `orchestrate report`'s terminal."""
    log_lr = optuna.distributions.FloatDistribution(1e-3, 1.0, log=True)
    kind = optuna.distributions.CategoricalDistribution(["dsn", "mate"])
    study = optuna.create_study(direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"lr": 0.01, "kind": "mate"},
            distributions={"lr": log_lr, "kind": kind},
            value=0.5,
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        figure = plots.parallel_coordinate_figure(study, "val/acc")
    assert len(figure.axes) == 4  # the objective's axis, one per parameter, the colour bar
    plots.close(figure)
