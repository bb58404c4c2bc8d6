"""The rules every summary of a sweep uses, so the live line, ``status``, the report, the
parent run and ``promote`` always agree.

The best trial is the COMPLETE trial with the best final value; with several objectives the
Pareto set (Optuna's ``study.best_trials``: COMPLETE trials no other trial beats on every
objective) takes its place. A sweep has finished when every trial it handed to Tune has.
"""

from __future__ import annotations

from collections.abc import Callable

import optuna

from orchestrator.entities.names import ERROR, RAY_TRIAL_ID

__all__ = [
    "best_trial",
    "complete_trials",
    "failures",
    "is_finished",
    "is_multi_objective",
    "objective_names",
    "pareto_trials",
    "primary_sort_key",
    "state_counts",
    "top_trials",
]


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def complete_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])


def primary_sort_key(
    study: optuna.Study, index: int = 0
) -> Callable[[optuna.trial.FrozenTrial], float]:
    """Sort key putting the best value of objective `index` first (None last)."""
    maximize = study.directions[index] == optuna.study.StudyDirection.MAXIMIZE

    def key(t: optuna.trial.FrozenTrial) -> float:
        value = t.values[index] if t.values else None
        if value is None:
            return float("inf")
        return -value if maximize else value

    return key


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial on the primary objective (pruned trials never count: their
    values are partial)."""
    complete = complete_trials(study)
    return min(complete, key=primary_sort_key(study)) if complete else None


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto set of COMPLETE trials, best on the primary objective first."""
    return sorted(study.best_trials, key=primary_sort_key(study))


def top_trials(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The Pareto set (several objectives) or the best COMPLETE trials, best first."""
    if is_multi_objective(study):
        return pareto_trials(study)[:count]
    return sorted(complete_trials(study), key=primary_sort_key(study))[:count]


def objective_names(study: optuna.Study) -> list[str]:
    """The metric behind each objective (``value`` for a study made without names)."""
    return study.metric_names or [f"value {i}" for i in range(len(study.directions))]


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def failures(study: optuna.Study) -> list[tuple[int, str]]:
    """(number, why) of each failed trial; trials Optuna never ran (invalid configs) too."""
    failed = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.FAIL])
    return [(t.number, t.user_attrs.get(ERROR, "unknown")) for t in failed]


def is_finished(study: optuna.Study, num_samples: int) -> bool:
    """Whether the study has all the sweep's trials (those handed to Tune: not the
    configurations refused before they ran), none of them still running."""
    trials = study.get_trials(deepcopy=False)
    ran = [t for t in trials if RAY_TRIAL_ID in t.user_attrs]
    return len(ran) >= num_samples and all(t.state.is_finished() for t in trials)
