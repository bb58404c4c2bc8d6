"""The live progress line on a terminal: cut to its width while the sweep runs, whole when
the sweep ends (a real rich console forced to be a narrow terminal, a real Optuna study)."""

from __future__ import annotations

import io
import re

import optuna
import pytest
from rich.console import Console

from orchestrator.tuning.callbacks import progress as progress_module
from orchestrator.tuning.callbacks.progress import SweepProgress

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def terminal(monkeypatch) -> io.StringIO:
    """What a 60-column terminal is sent by the progress line."""
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=60, color_system=None)
    monkeypatch.setattr(progress_module, "console", console)
    return screen


def _last_drawing(screen: str) -> list[str]:
    """The lines of the last drawing: what follows the last carriage return that erases."""
    return [line.strip() for line in ANSI.sub("", screen.rpartition("\r")[2]).splitlines()]


def test_the_line_is_cut_while_running_and_whole_at_the_end(tmp_path, terminal):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    progress = SweepProgress(8, 4, url, "s")

    progress.on_trial_start(0, [], None)
    assert ANSI.sub("", terminal.getvalue()) == (
        "trials 0/8 done: 0 finished 0 pruned 0 failed, 0 running | …"
    )
    progress.on_experiment_end([])
    assert _last_drawing(terminal.getvalue()) == [
        "trials 0/8 done: 0 finished 0 pruned 0 failed, 0 running |",
        "best value 0: no finished trial yet",
    ]
