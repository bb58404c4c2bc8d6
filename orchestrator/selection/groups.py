"""Groups of finished trials compared on their test metrics: the rules of ``compare``.

Trials are grouped by the value of one config key (``loss.kind``); within a group each
metric is summarised as mean and sample standard deviation over the trials (usually the
seeds). A group is judged against a reference group per metric: it **wins** or **loses**
when the difference of the means is beyond twice its standard error, else it **ties**. When
both groups ran the same seeds once each, the difference is taken seed by seed (paired: the
seed draws the training subset and the initialisation, so pairing removes what the seeds
share); otherwise the groups are compared as independent samples.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["GroupSummary", "TrialResult", "Verdict", "judge", "summarize"]


@dataclass(frozen=True)
class TrialResult:
    """One finished trial: its number, group value, seed and test metrics."""

    number: int
    group: str
    seed: int
    metrics: Mapping[str, float]


@dataclass(frozen=True)
class GroupSummary:
    """A group's trials and, per metric, mean and sample standard deviation (0 for one)."""

    group: str
    trials: tuple[TrialResult, ...]
    mean: Mapping[str, float]
    std: Mapping[str, float]

    def values(self, metric: str) -> list[float]:
        return [t.metrics[metric] for t in self.trials]

    def by_seed(self, metric: str) -> dict[int, float]:
        return {t.seed: t.metrics[metric] for t in self.trials}


@dataclass(frozen=True)
class Verdict:
    """A group against the reference on one metric: ``wins``, ``loses`` or ``ties``."""

    outcome: str
    difference: float  # mean of the group minus mean of the reference
    margin: float  # twice the standard error of the difference
    paired: bool


def summarize(results: Sequence[TrialResult], metrics: Sequence[str]) -> list[GroupSummary]:
    """One summary per group value, in order of first appearance."""
    groups: dict[str, list[TrialResult]] = {}
    for result in results:
        groups.setdefault(result.group, []).append(result)
    summaries = []
    for group, trials in groups.items():
        values = {m: [t.metrics[m] for t in trials] for m in metrics}
        summaries.append(
            GroupSummary(
                group,
                tuple(trials),
                {m: statistics.fmean(v) for m, v in values.items()},
                {m: statistics.stdev(v) if len(v) > 1 else 0.0 for m, v in values.items()},
            )
        )
    return summaries


def judge(group: GroupSummary, reference: GroupSummary, metric: str) -> Verdict | None:
    """`group` against `reference` on `metric`; None when either has a single trial (no
    spread to judge a difference by)."""
    ours, theirs = group.by_seed(metric), reference.by_seed(metric)
    paired = (
        len(ours) == len(group.trials)
        and len(theirs) == len(reference.trials)
        and ours.keys() == theirs.keys()
    )
    if paired:
        differences = [ours[seed] - theirs[seed] for seed in sorted(ours)]
        if len(differences) < 2:
            return None
        difference = statistics.fmean(differences)
        margin = 2 * statistics.stdev(differences) / math.sqrt(len(differences))
    else:
        a, b = group.values(metric), reference.values(metric)
        if len(a) < 2 or len(b) < 2:
            return None
        difference = statistics.fmean(a) - statistics.fmean(b)
        margin = 2 * math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    if difference > margin:
        outcome = "wins"
    elif -difference > margin:
        outcome = "loses"
    else:
        outcome = "ties"
    return Verdict(outcome, difference, margin, paired)
