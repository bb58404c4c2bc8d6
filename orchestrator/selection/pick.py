"""`promote --pick RULE`: which finished trial of a sweep to promote.

Rules (checked against the sweep's objectives before anything trains):

- ``best`` (the default): the COMPLETE trial best on the primary objective (the first
  ``search.metric``); with several objectives that trial is always in the Pareto set.
- ``trial=N``: trial N, which must be COMPLETE.
- ``METRIC<=X`` or ``METRIC>=X``: among COMPLETE trials whose objective METRIC is within the
  bound, the best on the first other objective; e.g. ``val/anytime_gflops<=0.002`` on a
  sweep over [val/mean_exit_acc, val/anytime_gflops] picks the most accurate trial under a
  GFLOPs budget. Such a trial is in the Pareto set too (up to ties).
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import optuna

from orchestrator.entities.space import SearchSettings
from orchestrator.selection.trials import best_trial, complete_trials
from trainer.config import ConfigError

__all__ = ["PickRule", "parse_pick", "pick_trial"]

_TRIAL = re.compile(r"trial[=:](\d+)")
_BOUND = re.compile(r"(?P<metric>[\w/.]+)\s*(?P<op><=|>=)\s*(?P<bound>\S+)")
_OPERATORS = {"<=": operator.le, ">=": operator.ge}


@dataclass(frozen=True)
class PickRule:
    """A parsed ``--pick``: the best trial, trial `number`, or a bound on one objective."""

    text: str
    number: int | None = None
    metric: str | None = None
    op: str | None = None
    bound: float | None = None

    def describe(self, search: SearchSettings) -> str:
        """What the rule chooses, in words, for the terminal and the run's tags."""
        if self.number is not None:
            return f"trial {self.number}, named"
        primary = search.metrics[0]
        if self.metric is None:
            return f"best {primary}"
        return f"best {_ranked_by(search, self.metric)} with {self.metric} {self.op} {self.bound:g}"


def _ranked_by(search: SearchSettings, constrained: str) -> str:
    """The objective a bounded pick ranks by: the first one that is not bounded."""
    others = [m for m in search.metrics if m != constrained]
    return others[0] if others else constrained


def parse_pick(text: str, search: SearchSettings) -> PickRule:
    """Parse and check a ``--pick`` rule; a ConfigError names the rule and what is allowed."""
    text = text.strip()
    if text == "best":
        return PickRule(text)
    if match := _TRIAL.fullmatch(text):
        return PickRule(text, number=int(match.group(1)))
    objectives = ", ".join(search.metrics)
    if match := _BOUND.fullmatch(text):
        metric, op = match.group("metric"), match.group("op")
        if metric not in search.metrics:
            raise ConfigError(
                f"--pick is {text!r}, but {metric} is not an objective of this sweep ({objectives})"
            )
        try:
            bound = float(match.group("bound"))
        except ValueError:
            bound = math.nan
        if not math.isfinite(bound):
            raise ConfigError(f"--pick is {text!r}, but {match.group('bound')!r} is not a number")
        return PickRule(text, metric=metric, op=op, bound=bound)
    raise ConfigError(
        f"--pick is {text!r}, but must be best, trial=N, or METRIC<=X / METRIC>=X "
        f"with METRIC one of {objectives}"
    )


def pick_trial(
    study: optuna.Study, search: SearchSettings, rule: PickRule
) -> optuna.trial.FrozenTrial:
    """The COMPLETE trial `rule` chooses; a ConfigError says why there is none."""
    complete = complete_trials(study)
    if not complete:
        raise ConfigError(f"sweep {study.study_name!r} has no finished trial to promote yet")
    if rule.number is not None:
        chosen = [t for t in complete if t.number == rule.number]
        if not chosen:
            raise ConfigError(
                f"--pick is {rule.text!r}, but trial {rule.number} did not finish; finished: "
                f"{', '.join(str(t.number) for t in complete)}"
            )
        return chosen[0]
    if rule.metric is None:
        return best_trial(study)
    index = search.metrics.index(rule.metric)
    within = [t for t in complete if _OPERATORS[rule.op](t.values[index], rule.bound)]
    if not within:
        values = [t.values[index] for t in complete]
        raise ConfigError(
            f"--pick is {rule.text!r}, but no finished trial meets it ({rule.metric} of the "
            f"finished trials: {min(values):.4g} to {max(values):.4g})"
        )
    ranked = search.metrics.index(_ranked_by(search, rule.metric))
    sign = -1.0 if search.modes[ranked] == "max" else 1.0
    return min(within, key=lambda t: sign * t.values[ranked])
