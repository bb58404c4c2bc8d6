"""The Tune scheduler of a sweep: first in, first out, and the study's pruner stops trials
(through :class:`~orchestrator.tuning.searcher.OptunaSearcher`, which tells Optuna PRUNED)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from orchestrator.tuning.searcher import OptunaSearcher

__all__ = ["OptunaPruningScheduler", "failure_reason"]

_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


class OptunaPruningScheduler(FIFOScheduler):
    """Runs trials first-in first-out and stops those the study's pruner prunes."""

    def __init__(self, searcher: OptunaSearcher) -> None:
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if self.searcher.report(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller, trial) -> None:
        """Called once Ray gives up on a trial (retries spent), before the searcher hears."""
        self.searcher.errors[trial.trial_id] = failure_reason(trial)
        super().on_trial_error(tune_controller, trial)


def failure_reason(trial) -> str:
    """One line from Tune's record of a trial's last failure: the exception raised in the
    trial (``RuntimeError: ...``) or what happened to its process."""
    path = trial.error_file
    if not path or not Path(path).is_file():
        return "failed (no error recorded)"
    last = Path(path).read_text().rsplit("Failure # ", 1)[-1].splitlines()[1:]
    lines = [line.strip() for line in last if line.strip()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (raised[-1] if raised else lines[0] if lines else "failed")[:500]
