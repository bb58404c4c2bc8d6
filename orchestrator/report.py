"""Sweep summaries read from the stores (works while a sweep runs and after it)."""

from __future__ import annotations

from pathlib import Path

import optuna
from rich.table import Table

from orchestrator.sweep import RECORD_FILE, SweepRecord

__all__ = ["best_trial", "load_study", "sweeps_table", "trials_table"]

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def load_study(record: SweepRecord) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=record.name, storage=record.study_storage)


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best COMPLETE trial (pruned trials never count: their values are partial)."""
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    if not complete:
        return None
    pick = max if study.direction == optuna.study.StudyDirection.MAXIMIZE else min
    return pick(complete, key=lambda t: t.value)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _latest_value(t: optuna.trial.FrozenTrial) -> float | None:
    """The final value, or the last intermediate one of an unfinished or pruned trial."""
    if t.value is not None:
        return t.value
    return t.intermediate_values.get(t.last_step) if t.last_step is not None else None


def trials_table(
    study: optuna.Study, metric: str, *, limit: int | None = None, title: str = ""
) -> Table:
    """Trials ordered best first (finished, then by last intermediate value)."""
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE

    def sort_key(t: optuna.trial.FrozenTrial) -> tuple[int, float]:
        value = _latest_value(t)
        score = float("-inf") if value is None else (value if maximize else -value)
        return (t.state == optuna.trial.TrialState.COMPLETE, score)

    trials = sorted(study.get_trials(deepcopy=False), key=sort_key, reverse=True)
    shown = trials[:limit] if limit else trials
    table = Table(title=title or None)
    for column in ("trial", "state", "epochs", metric, "params"):
        table.add_column(column, justify="left" if column == "params" else "right")
    for t in shown:
        value = _latest_value(t)
        style = _STATE_STYLE.get(t.state.name, "")
        table.add_row(
            str(t.number),
            f"[{style}]{t.state.name}[/]" if style else t.state.name,
            str(t.last_step or 0),
            "-" if value is None else f"{value:.4f}",
            " ".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, v in t.params.items()),
        )
    return table


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def sweeps_table(storage_path: str | Path) -> Table:
    """One row per sweep found under the storage directory."""
    table = Table(title=f"sweeps in {storage_path}")
    for column in ("name", "created", "trials", "states", "best"):
        table.add_column(column)
    for path in sorted(Path(storage_path).glob(f"*/{RECORD_FILE}")):
        record = SweepRecord.load(path.parent.name, storage_path)
        study = load_study(record)
        best = best_trial(study)
        counts = state_counts(study)
        table.add_row(
            record.name,
            record.created,
            f"{len(study.trials)}/{record.num_samples}",
            " ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())),
            "-" if best is None else f"{best.value:.4f} (trial {best.number})",
        )
    return table
