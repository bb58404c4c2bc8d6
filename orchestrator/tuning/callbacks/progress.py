"""Live sweep progress on the terminal: trials running, finished, pruned, failed, best.

The best is read from the Optuna study with :func:`orchestrator.rendering.tables.best_summary`,
the rule the final table and ``status`` use (the final value of COMPLETE trials; the Pareto set
with several objectives), so the live line never claims a best the table does not show. On
the sweep's driver the study is the searcher's, in memory
(:func:`~orchestrator.stores.study_cache.written_study`). The line counts every trial Tune
knows, so on a terminal it is redrawn at most :data:`REDRAWS_PER_S` times a second: a sweep
of thousands of one-second trials would otherwise count them thousands of times a second.
"""

from __future__ import annotations

import time

import optuna
from ray.tune import Callback
from rich.live import Live
from rich.text import Text

from orchestrator.entities.credentials import MaskedWhenPickled, reveal
from orchestrator.rendering.console import console
from orchestrator.rendering.tables import best_summary
from orchestrator.stores.study import load_study_from
from orchestrator.stores.study_cache import written_study
from trainer import metrics as M
from trainer.trainable import TRIAL_ERROR

__all__ = ["REDRAWS_PER_S", "SweepProgress", "trial_outcome"]

REDRAWS_PER_S = 4


def trial_outcome(trial, max_epochs: int) -> str:
    """running | pending | finished | pruned | failed, from Tune's view of the trial."""
    if trial.status == "ERROR" or TRIAL_ERROR in (trial.last_result or {}):
        return "failed"
    if trial.status == "TERMINATED":
        epochs = (trial.last_result or {}).get(M.EPOCH, 0)
        return "finished" if epochs >= max_epochs else "pruned"
    return "running" if trial.status == "RUNNING" else "pending"


class SweepProgress(MaskedWhenPickled, Callback):
    """Redraws one status line after every trial event."""

    # Tune pickles callbacks into the sweep directory: no password, no live objects.
    _secret_fields = ("study_storage",)
    _fresh_fields = (
        ("_live", lambda: None),
        ("_best", lambda: None),
        ("_study", lambda: None),
        ("_drawn", lambda: 0.0),
    )

    def __init__(
        self, num_samples: int, max_epochs: int, study_storage: str, study_name: str
    ) -> None:
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self.study_storage = study_storage
        self.study_name = study_name
        self._best: str | None = None
        self._study: optuna.Study | None = None
        self._live: Live | None = None
        self._drawn = 0.0  # time.monotonic() of the last redraw

    @property
    def best(self) -> str:
        if self._best is None:  # read again after each finished trial
            if self._study is None:
                url = reveal(self.study_storage)
                self._study = written_study(url, self.study_name) or load_study_from(
                    url, self.study_name
                )
            self._best = best_summary(self._study)
        return self._best

    def line(self, trials: list) -> str:
        counts = {k: 0 for k in ("running", "pending", "finished", "pruned", "failed")}
        for trial in trials:
            counts[trial_outcome(trial, self.max_epochs)] += 1
        done = counts["finished"] + counts["pruned"] + counts["failed"]
        return (
            f"trials {done}/{self.num_samples} done: [green]{counts['finished']} finished[/] "
            f"[yellow]{counts['pruned']} pruned[/] [red]{counts['failed']} failed[/], "
            f"{counts['running']} running | {self.best}"
        )

    def _draw(self, trials: list, *, last: bool = False) -> None:
        """Redraw the live line on a terminal (the `last` time in any case, and whole, folded
        onto more lines if it must); elsewhere (a pipe, a log) only the final line is printed,
        whole, at the end."""
        now = time.monotonic()
        if not console.is_terminal or (now - self._drawn < 1 / REDRAWS_PER_S and not last):
            return
        self._drawn = now
        if self._live is None:
            # Other output must not be drawn above the line: it belongs in the log file.
            self._live = Live(
                console=console,
                auto_refresh=False,
                transient=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start()
        text = Text.from_markup(self.line(trials), overflow="ellipsis")
        text.no_wrap = not last  # one line cut to the terminal's width; whole when it is the last
        self._live.update(text, refresh=True)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._draw(trials)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        self._draw(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._best = None  # the searcher has told the study how this trial ended
        self._draw(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._best = None
        self._draw(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._best = None
        if not console.is_terminal:
            console.print(self.line(trials), soft_wrap=True, highlight=False)
            return
        self._draw(trials, last=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
