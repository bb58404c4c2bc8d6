"""A toy learning curve for tests that run real Ray Tune trials without training.

Its own module, light to import: Tune's trial actors import the module a trainable is
defined in, and a test module's imports (torch among them) cost each actor seconds.
"""

from __future__ import annotations

import math

from ray import tune

from trainer import metrics as M

EPOCHS = 4
METRIC = M.MEAN_EXIT_ACC


def quality(lr: float) -> float:
    """Final accuracy of a toy model: best at lr = 0.05 (log scale)."""
    return 0.95 * math.exp(-((math.log(lr / 0.05)) ** 2))


def full_budget_value(lr: float) -> float:
    """The curve's value after EPOCHS epochs (less a rounding margin)."""
    return quality(lr) * (1 - 0.5**EPOCHS) - 1e-12


def toy_trainable(config: dict) -> None:
    """A learning curve that rises towards quality(lr); no training involved."""
    lr = config["overrides"]["optim.lr"] if "overrides" in config else config["optim.lr"]
    for epoch in range(1, EPOCHS + 1):
        tune.report({M.EPOCH: epoch, METRIC: quality(lr) * (1 - 0.5**epoch)})
