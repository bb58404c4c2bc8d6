"""Multi-objective search settings: a list of metrics with a list of modes, checked up front."""

from __future__ import annotations

import copy

import optuna
import pytest

from orchestrator.entities.space import parse_space, pruner_note, sweep_params
from orchestrator.stores.study import make_pruner, make_sampler, open_study
from test_space import VALID
from trainer.config import ConfigError

ACC, GFLOPS = "val/mean_exit_acc", "val/anytime_gflops"


def _search(**search) -> dict:
    data = copy.deepcopy(VALID)
    data["search"].update(search)
    return data


def test_metric_list_makes_a_multi_objective_spec():
    spec = parse_space(_search(metric=[ACC, GFLOPS], mode=["max", "min"]), "x.yaml")
    assert spec.search.metrics == [ACC, GFLOPS]
    assert spec.search.modes == ["max", "min"]
    assert spec.search.multi_objective
    assert spec.search.objectives_text == f"{ACC} (max), {GFLOPS} (min)"
    assert sweep_params(spec)["search.metric"] == str([ACC, GFLOPS])


def test_single_metric_spec_is_unchanged():
    spec = parse_space(_search(), "x.yaml")
    assert (spec.search.metric, spec.search.mode) == (ACC, "max")
    assert spec.search.metrics == [ACC] and not spec.search.multi_objective
    assert pruner_note(spec) is None
    assert isinstance(make_pruner(spec), optuna.pruners.SuccessiveHalvingPruner)


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"metric": [ACC, GFLOPS], "mode": "max"}, "`search.mode` is 'max', but must be a list "),
        ({"metric": [ACC, GFLOPS], "mode": ["max"]}, "one mode per metric (2 metrics)"),
        ({"metric": ACC, "mode": ["max"]}, "`search.mode` is ['max'], but must be 'max' or 'min'"),
        ({"metric": [], "mode": []}, "`search.metric` is [], but must list at least one metric"),
        ({"metric": [ACC, ACC], "mode": ["max", "max"]}, f"but lists {ACC} twice"),
        ({"metric": [ACC, "val/acc"], "mode": ["max", "min"]}, "but must be one of"),
        ({"metric": [ACC, 3], "mode": ["max", "min"]}, "must be a metric name or a list of"),
        ({"metric": [ACC, GFLOPS], "mode": ["max", "best"]}, "input should be 'max' or 'min'"),
        (
            {"metric": [ACC, "val/exit1/loss"], "mode": ["max", "max"]},
            "`search.mode` is ['max', 'max'], but val/exit1/loss needs 'min'",
        ),
    ],
)
def test_objective_rules(search, message):
    with pytest.raises(ConfigError) as err:
        parse_space(_search(**search), "x.yaml")
    assert str(err.value).startswith("x.yaml: ")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_pruner_does_not_apply_to_several_objectives():
    spec = parse_space(_search(metric=[ACC, GFLOPS], mode=["max", "min"]), "x.yaml")
    assert pruner_note(spec) == (
        "search.pruner asha does not apply to a multi-objective search (Optuna prunes on one "
        "objective only): every trial runs its full budget"
    )
    assert isinstance(make_pruner(spec), optuna.pruners.NopPruner)


def test_multi_objective_study_has_named_directions(tmp_path):
    data = _search(metric=[ACC, GFLOPS], mode=["max", "min"], sampler={"kind": "nsga2"})
    spec = parse_space(data, "x.yaml")
    assert isinstance(make_sampler(spec), optuna.samplers.NSGAIISampler)
    study = open_study(spec, f"sqlite:///{tmp_path / 'optuna.db'}", "mo")
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert study.metric_names == [ACC, GFLOPS]
