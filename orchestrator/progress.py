"""Live sweep progress on the terminal: trials running, finished, pruned, failed, best."""

from __future__ import annotations

from typing import Any

from ray.tune import Callback
from rich.console import Console
from rich.live import Live

from trainer import metrics as M


def trial_outcome(trial, max_epochs: int) -> str:
    """running | pending | finished | pruned | failed, from Tune's view of the trial."""
    if trial.status == "ERROR":
        return "failed"
    if trial.status == "TERMINATED":
        epochs = (trial.last_result or {}).get(M.EPOCH, 0)
        return "finished" if epochs >= max_epochs else "pruned"
    return "running" if trial.status == "RUNNING" else "pending"


class SweepProgress(Callback):
    """Redraws one status line after every trial event."""

    def __init__(self, num_samples: int, max_epochs: int, metric: str, mode: str) -> None:
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self.metric = metric
        self.mode = mode
        self._live: Live | None = None

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles callbacks with the experiment
        return {**self.__dict__, "_live": None}

    def line(self, trials: list) -> str:
        counts = {k: 0 for k in ("running", "pending", "finished", "pruned", "failed")}
        for trial in trials:
            counts[trial_outcome(trial, self.max_epochs)] += 1
        values = [
            t.metric_analysis[self.metric][self.mode]
            for t in trials
            if self.metric in t.metric_analysis
        ]
        best = (max if self.mode == "max" else min)(values) if values else None
        best_text = f"{best:.4f}" if best is not None else "-"
        done = counts["finished"] + counts["pruned"] + counts["failed"]
        return (
            f"trials {done}/{self.num_samples} done: [green]{counts['finished']} finished[/] "
            f"[yellow]{counts['pruned']} pruned[/] [red]{counts['failed']} failed[/], "
            f"{counts['running']} running | best {self.metric} {best_text}"
        )

    def _draw(self, trials: list) -> None:
        if self._live is None:
            self._live = Live(console=Console(), auto_refresh=False, transient=False)
            self._live.start()
        self._live.update(self.line(trials), refresh=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._draw(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._draw(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._draw(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._draw(trials)
        if self._live is not None:
            self._live.stop()
            self._live = None
