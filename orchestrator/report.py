"""Sweep summaries read from the stores (works while a sweep runs and after it).

The best trial is the COMPLETE trial with the best final value; with several objectives the
Pareto set (Optuna's ``study.best_trials``: COMPLETE trials no other trial beats on every
objective) takes its place. The live progress line, ``status`` and the final table all use
:func:`best_summary`, so they always agree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import optuna
from rich.table import Table

from orchestrator.optuna_search import EPOCHS_ATTR, ERROR_ATTR
from orchestrator.sweep import RECORD_FILE, SweepRecord
from trainer.config import ConfigError

__all__ = [
    "best_summary",
    "best_trial",
    "failures",
    "is_multi_objective",
    "load_study",
    "load_study_from",
    "objective_names",
    "params_text",
    "pareto_trials",
    "primary_sort_key",
    "state_counts",
    "sweeps_table",
    "trials_table",
]

_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def load_study(record: SweepRecord) -> optuna.Study:
    return load_study_from(record.study_storage, record.name)


def load_study_from(storage_url: str, study_name: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=storage_url)


def is_multi_objective(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def primary_sort_key(study: optuna.Study, index: int = 0):
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
    complete = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.COMPLETE])
    return min(complete, key=primary_sort_key(study)) if complete else None


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The Pareto set of COMPLETE trials, best on the primary objective first."""
    return sorted(study.best_trials, key=primary_sort_key(study))


def objective_names(study: optuna.Study) -> list[str]:
    """The metric behind each objective (``value`` for a study made without names)."""
    return study.metric_names or [f"value {i}" for i in range(len(study.directions))]


def best_summary(study: optuna.Study) -> str:
    """``best val/mean_exit_acc 0.9791 (trial 3)``, or ``Pareto set of 3 trials: 2, 5, 7``."""
    if is_multi_objective(study):
        pareto = pareto_trials(study)
        if not pareto:
            return "Pareto set: no finished trial yet"
        numbers = ", ".join(str(t.number) for t in pareto)
        return f"Pareto set of {len(pareto)} trial{'s' if len(pareto) > 1 else ''}: {numbers}"
    best = best_trial(study)
    name = objective_names(study)[0]
    if best is None:
        return f"best {name}: no finished trial yet"
    return f"best {name} {_value_text(best.value)} (trial {best.number})"


def params_text(params: Mapping[str, object]) -> str:
    """``temperature=5.479 exits=[2, 4]``: last part of each dotted key, 4 significant digits."""
    return " ".join(
        f"{k.rsplit('.', 1)[-1]}={f'{v:.4g}' if isinstance(v, float) else v}"
        for k, v in params.items()
    )


def _value_text(value: float | None) -> str:
    """4 decimals, or 4 significant digits for small values such as GFLOPs per sample."""
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) >= 0.01 else f"{value:.4g}"


def _latest_values(t: optuna.trial.FrozenTrial, count: int) -> list[float | None]:
    """The final values, or the last intermediate one of an unfinished or pruned trial
    (single objective only: a multi-objective trial reports none)."""
    if t.values is not None:
        return list(t.values)
    latest = t.intermediate_values.get(t.last_step) if t.last_step is not None else None
    return [latest] + [None] * (count - 1)


def trials_table(
    study: optuna.Study, metric: str | list[str], *, limit: int | None = None, title: str = ""
) -> Table:
    """Trials ordered best first: the Pareto set (several objectives), then the other
    finished trials, then the rest by their last value on the primary objective."""
    metrics = [metric] if isinstance(metric, str) else metric
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    pareto = {t.number for t in pareto_trials(study)} if is_multi_objective(study) else set()

    def sort_key(t: optuna.trial.FrozenTrial) -> tuple[bool, bool, float]:
        value = _latest_values(t, len(metrics))[0]
        score = float("-inf") if value is None else (value if maximize else -value)
        return (t.number in pareto, t.state == optuna.trial.TrialState.COMPLETE, score)

    trials = sorted(study.get_trials(deepcopy=False), key=sort_key, reverse=True)
    shown = trials[:limit] if limit else trials
    table = Table(title=title or None)
    for column in ("trial", "state", "epochs", *metrics, "params"):
        table.add_column(column, justify="left" if column == "params" else "right")
    if pareto:
        table.caption = (
            "* Pareto set: no other finished trial is as good on every objective and better on one"
        )
    for t in shown:
        style = _STATE_STYLE.get(t.state.name, "")
        state = f"[{style}]{t.state.name}[/]" if style else t.state.name
        table.add_row(
            f"{t.number}*" if t.number in pareto else str(t.number),
            state,
            str(t.last_step or t.user_attrs.get(EPOCHS_ATTR, 0)),
            *(_value_text(v) for v in _latest_values(t, len(metrics))),
            params_text(t.params),
        )
    return table


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def failures(study: optuna.Study) -> list[tuple[int, str]]:
    """(number, why) of each failed trial; trials Optuna never ran (invalid configs) too."""
    failed = study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.FAIL])
    return [(t.number, t.user_attrs.get(ERROR_ATTR, "unknown")) for t in failed]


def sweeps_table(storage_path: str | Path, full_urls: Iterable[str | None] = ()) -> Table:
    """One row per sweep found under the storage directory (`full_urls`: store URLs with
    passwords, for sweeps whose records keep them masked)."""
    table = Table(title=f"sweeps in {storage_path}")
    for column in ("name", "created", "trials", "states", "best"):
        table.add_column(column)
    full_urls = list(full_urls)
    for path in sorted(Path(storage_path).glob(f"*/{RECORD_FILE}")):
        try:
            record = SweepRecord.load(path.parent.name, storage_path, full_urls)
        except ConfigError as err:
            table.add_row(path.parent.name, "-", "-", str(err), "-")
            continue
        study = load_study(record)
        counts = state_counts(study)
        table.add_row(
            record.name,
            record.created,
            f"{len(study.trials)}/{record.num_samples}",
            " ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items())),
            best_summary(study),
        )
    return table
