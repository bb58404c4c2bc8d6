"""The tables as a terminal shows them: parameters wrap between each other, never inside a
value, nor a sweep's name; a comparison shows a spread only where a group has one."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution
from rich.console import Console

from orchestrator.rendering.tables import (
    comparison_rows,
    comparison_table,
    params_text,
    sweeps_table,
    trials_table,
)
from orchestrator.selection.groups import TrialResult, summarize

EXITS = CategoricalDistribution(["[1, 2, 3, 4]", "[2, 4]"])  # as the space encodes list choices


def test_list_and_mapping_choices_are_shown_without_spaces():
    params = {"loss.temperature": 5.47891, "model.exits": "[1, 2, 3, 4]", "loss.dtd": '{"t0": 2.0}'}
    assert params_text(params) == 'temperature=5.479 exits=[1,2,3,4] dtd={"t0":2.0}'
    assert params_text({"loss.kind": "[not json"}) == "kind=[not json"


def test_a_narrow_table_keeps_each_parameter_on_one_line():
    study = optuna.create_study(direction="maximize")
    params = {"loss.temperature": 6.4471, "loss.teacher_lr": 0.06751, "model.exits": "[1, 2, 3, 4]"}
    distributions = {
        "loss.temperature": FloatDistribution(1.0, 8.0),
        "loss.teacher_lr": FloatDistribution(0.01, 0.3),
        "model.exits": EXITS,
    }
    trial = optuna.trial.create_trial(params=params, distributions=distributions, value=0.5)
    study.add_trial(trial)
    console = Console(width=60, record=True, color_system=None)
    console.print(trials_table(study, "val/acc"))
    lines = console.export_text().splitlines()
    assert any("exits=[1,2,3,4]" in line for line in lines), "\n".join(lines)
    assert any("temperature=6.447" in line for line in lines)


def test_two_objectives_at_80_columns_keep_their_headers_and_parameters_whole():
    study = optuna.create_study(directions=["maximize", "minimize"])
    params = {"loss.primary_weight": 0.3153, "model.exits": "[1, 2, 3, 4]", "optim.lr": 0.06801}
    distributions = {
        "loss.primary_weight": FloatDistribution(0.0, 1.0),
        "model.exits": EXITS,
        "optim.lr": FloatDistribution(0.01, 0.3),
    }
    study.add_trial(
        optuna.trial.create_trial(
            params=params, distributions=distributions, values=[0.9861, 0.00156]
        )
    )
    console = Console(width=80, record=True, color_system=None)
    console.print(trials_table(study, ["val/anytime_acc", "val/anytime_gflops"]))
    text = console.export_text()
    assert "…" not in text, text
    assert "anytime_acc" in text and "anytime_" in text and "gflops" in text
    for parameter in ("primary_weight=0.3153", "exits=[1,2,3,4]", "lr=0.06801"):
        assert parameter in text, text


def test_a_group_of_one_trial_shows_its_value_without_a_spread():
    results = [
        TrialResult(0, "dsn", 0, {"test/acc": 0.5}),
        TrialResult(1, "dsn", 1, {"test/acc": 0.7}),
        TrialResult(2, "mate", 0, {"test/acc": 0.8125}),
    ]
    _, dsn, mate = comparison_rows(summarize(results, ["test/acc"]), ["test/acc"], {}, None)
    assert dsn == ["dsn", "2", "0.6000 ± 0.1414"]
    assert mate == ["mate", "1", "0.8125"]


def _listing(row: list[str], width: int) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(sweeps_table("sweeps in sweeps", [row], width=width))
    return console.export_text().splitlines()


BEST = "best val/mean_exit_acc 0.9686 (trial 0)"


def test_a_wide_sweeps_listing_shows_each_row_on_one_line():
    row = ["mate_digits-20261208-013704", "2026-12-08 01:37", "8/8: complete 1 pruned 7", BEST]
    lines = _listing(row, width=120)
    assert any(all(cell in line for cell in row) for line in lines), "\n".join(lines)


def test_a_sweeps_listing_at_80_columns_breaks_no_word_nor_name():
    name = "mate_cifar10_anytime-20261207-162257"  # the longest default name of the spaces
    row = [name, "2026-12-07 16:22", "8/8: complete 1 pruned 6, interrupted", BEST]
    lines = _listing(row, width=80)
    cells = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if "│" in line]
    assert cells[0][0] == name, "\n".join(lines)
    words = {word for cell in cells for text in cell for word in text.split()}
    # the metric breaks after its "/" and "_", where the trials table's headers break
    assert {"val/", "mean_exit_", "acc", "0.9686", "interrupted", "2026-12-07"} <= words, words


def test_a_comparison_at_80_columns_keeps_each_group_and_header_word_whole():
    metrics = ["test/exit1/acc", "test/exit2/acc", "test/ensemble/acc", "test/mean_exit_acc"]
    metrics += ["test/anytime_auc", "train/exit2/acc"]
    results = [TrialResult(0, "attention", 0, dict.fromkeys(metrics, 0.9666))]
    rows = comparison_rows(summarize(results, metrics), metrics, {}, None)
    console = Console(width=80, record=True, color_system=None)
    console.print(comparison_table(rows, "test accuracy by loss.teacher_weights", width=80))
    text = console.export_text()
    words = set(text.translate(str.maketrans("┃│", "  ")).split())  # cells' words, headers'
    assert {"attention", "ensemble", "anytime", "(train)", "0.9666"} <= words, text
