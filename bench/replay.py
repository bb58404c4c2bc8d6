"""Recorded learning curves replayed through real Ray Tune (bench/record_curves.py records
them, bench/bench_search.py searches them).

A replayed trial is a Tune function trainable that reports, epoch by epoch, exactly the
values recorded for its configuration; everything around it (Tune, the searchers, Optuna's
pruner or Ray's ASHA) is the real thing, so a search over the recorded grid spends its
budget as it would on the real training, at no training cost.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import tune

from orchestrator.entities.space import SpaceSpec, parse_space
from trainer import metrics as M

__all__ = ["CURVES_FILE", "Curves", "config_key", "replay_trial"]

CURVES_FILE = Path(__file__).with_name("cifar10_curves.json")


def config_key(overrides: Mapping[str, Any]) -> str:
    """The table's key of a configuration (its override values, as JSON)."""
    return json.dumps(dict(overrides), sort_keys=True)


@dataclass(frozen=True)
class Curves:
    """A recorded table: the grid space and one curve (value per epoch) per configuration."""

    metric: str
    space: dict[str, Any]
    curves: dict[str, list[float]]

    @classmethod
    def load(cls, path: Path = CURVES_FILE) -> Curves:
        table = json.loads(path.read_text())
        return cls(table["metric"], table["space"], table["curves"])

    def spec(self, **search: Any) -> SpaceSpec:
        """The grid space, with `search` settings replacing the recorded ones."""
        data = json.loads(json.dumps(self.space))
        data["search"].update(search)
        return parse_space(data, source="recorded curves")


def replay_trial(config: dict[str, Any], curves: Curves) -> None:
    """Report the recorded curve of the trial's configuration, one epoch per result."""
    for epoch, value in enumerate(curves.curves[config_key(config["overrides"])], start=1):
        tune.report({M.EPOCH: epoch, curves.metric: value})
