"""`search.sampler.kind: grid`: every combination of the categorical choices, once each."""

from __future__ import annotations

import copy

import pytest

from orchestrator.entities.space import grid_size, parse_space
from orchestrator.tuning.searcher import OptunaSearcher
from test_space import VALID
from trainer.config import ConfigError

KINDS = ["mate", "dsn", "byot"]
SEEDS = [0, 1]


def _grid(num_samples: int, **extra) -> dict:
    data = copy.deepcopy(VALID)
    data["search"].update(num_samples=num_samples, sampler={"kind": "grid", "seed": 3})
    data["space"] = {
        "loss.kind": {"type": "categorical", "choices": KINDS},
        "train.seed": {"type": "categorical", "choices": SEEDS},
        **extra,
    }
    return data


def test_grid_searcher_hands_out_each_combination_once(tmp_path):
    spec = parse_space(_grid(6), "grid.yaml")
    assert grid_size(spec) == 6
    searcher = OptunaSearcher(spec, f"sqlite:///{tmp_path / 's.db'}", "grid", num_samples=6)
    handed = [searcher.suggest(f"t{i}")["overrides"] for i in range(6)]
    combos = sorted((o["loss.kind"], o["train.seed"]) for o in handed)
    assert combos == sorted((k, s) for k in KINDS for s in SEEDS)
    assert searcher.suggest("t6") == "FINISHED"  # the budget is the grid


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            _grid(6, **{"optim.lr": {"type": "float", "low": 0.01, "high": 0.2}}),
            "`search.sampler.kind` is 'grid', but takes categorical parameters only; "
            "`space.optim.lr` is a float",
        ),
        (_grid(7), "`search.num_samples` is 7, but must be <= the grid's 6 combinations"),
    ],
)
def test_grid_rules(data, message):
    with pytest.raises(ConfigError) as err:
        parse_space(data, "grid.yaml")
    assert str(err.value) == f"grid.yaml: {message}"
