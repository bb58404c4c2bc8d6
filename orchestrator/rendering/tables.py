"""Terminal tables and one-line summaries of a sweep's study (rich).

The live progress line, ``status`` and the final table all say the best with
:func:`best_summary`, by the rules of :mod:`orchestrator.selection.trials`.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence

import optuna
from rich.table import Table

from orchestrator.entities.names import EPOCHS_ATTR
from orchestrator.rendering.console import counted
from orchestrator.selection.groups import GroupSummary, Verdict
from orchestrator.selection.trials import (
    best_trial,
    is_multi_objective,
    objective_names,
    pareto_trials,
)

__all__ = [
    "SWEEPS_COLUMNS",
    "best_summary",
    "comparison_markdown",
    "comparison_rows",
    "comparison_table",
    "counts_text",
    "params_text",
    "sweeps_table",
    "trials_table",
    "value_text",
]

SWEEPS_COLUMNS = ("name", "created", "trials", "best")
_STATE_STYLE = {"COMPLETE": "green", "PRUNED": "yellow", "FAIL": "red", "RUNNING": "cyan"}


def value_text(value: float | None) -> str:
    """4 decimals, or 4 significant digits for small values such as GFLOPs per sample."""
    if value is None:
        return "-"
    return f"{value:.4f}" if abs(value) >= 0.01 else f"{value:.4g}"


def params_text(params: Mapping[str, object]) -> str:
    """``temperature=5.479 exits=[2,4]``: last part of each dotted key, then its value."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={_param_value_text(v)}" for k, v in params.items())


def _param_value_text(value: object) -> str:
    """4 significant digits for a float; a list or mapping choice (Optuna stores it as JSON)
    without spaces, so that a table wraps between parameters, never inside one."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str) and value[:1] in ("[", "{"):
        with contextlib.suppress(json.JSONDecodeError):
            return json.dumps(json.loads(value), separators=(",", ":"))
    return str(value)


def counts_text(counts: Mapping[str, int]) -> str:
    """``complete 3 pruned 1``: trials per state, states in alphabetical order."""
    return " ".join(f"{k.lower()} {v}" for k, v in sorted(counts.items()))


def best_summary(study: optuna.Study) -> str:
    """``best val/mean_exit_acc 0.9791 (trial 3)``, or ``Pareto set of 3 trials: 2, 5, 7``."""
    if is_multi_objective(study):
        pareto = pareto_trials(study)
        if not pareto:
            return "Pareto set: no finished trial yet"
        numbers = ", ".join(str(t.number) for t in pareto)
        return f"Pareto set of {counted(len(pareto), 'trial')}: {numbers}"
    best = best_trial(study)
    name = objective_names(study)[0]
    if best is None:
        return f"best {name}: no finished trial yet"
    return f"best {name} {value_text(best.value)} (trial {best.number})"


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
    for column in ("trial", "state", "epochs"):
        table.add_column(column, justify="right")
    for name in metrics:
        table.add_column(_objective_header(name), justify="right", overflow="fold")
    table.add_column("params", overflow="fold")  # a table too narrow folds, never cuts short
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
            *(value_text(v) for v in _latest_values(t, len(metrics))),
            params_text(t.params),
        )
    return table


def _objective_header(metric: str, width: int = 11) -> str:
    """``val/anytime_gflops`` -> ``val/``, ``anytime_``, ``gflops`` on lines of at most `width`
    characters (broken after ``/`` and ``_``), so that the objectives' columns are as narrow
    as their values and the parameters keep the room."""
    return _break_after_separators(metric, width)


def _break_after_separators(text: str, width: int) -> str:
    """`text` on lines of at most `width` characters where it can be broken after a ``/`` or
    a ``_`` (a longer piece keeps its line)."""
    lines = [""]
    for part in re.split(r"(?<=[/_])", text):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines)


def sweeps_table(title: str, rows: Iterable[Sequence[str]], width: int | None = None) -> Table:
    """One row per sweep, its cells in the order of :data:`SWEEPS_COLUMNS`; the name, which
    the other commands take, is never wrapped or cut short. A table wider than `width` (a
    terminal's) breaks its best cells' metric names after their ``/`` and ``_``, as the
    trials table's headers do, and wraps each column between words where they fit."""
    rows = [list(row) for row in rows]
    widths = _wrapped_widths([SWEEPS_COLUMNS, *rows], width, first_whole=True) if width else None
    if widths is None and width:
        for row in rows:
            row[-1] = _break_after_separators(row[-1], width=11)
        widths = _wrapped_widths([SWEEPS_COLUMNS, *rows], width, first_whole=True)
    table = Table(title=title)
    name_width = max((len(row[0]) for row in rows), default=4)
    table.add_column(SWEEPS_COLUMNS[0], no_wrap=True, min_width=name_width)
    for index, column in enumerate(SWEEPS_COLUMNS[1:], start=1):
        # a word longer than its column folds, never cut short
        table.add_column(column, overflow="fold", width=widths and widths[index])
    for row in rows:
        table.add_row(*row)
    return table


def _wrapped_widths(
    rows: Sequence[Sequence[str]], width: int, *, first_whole: bool = False
) -> list[int | None] | None:
    """Column widths for `rows` (the first column never wrapped if `first_whole`) in a
    bordered table of at most `width` characters that breaks lines only between words: all
    None where the rows fit unwrapped; else each column's longest word, plus an even share of
    the room left (at most what its longest line needs more, the rest to the others); None
    where the words do not fit.
    (Rich's own narrowing shares the shortfall evenly, and folds a word it could keep.)"""
    columns = list(zip(*rows, strict=True))
    lines = [[line for cell in column for line in cell.splitlines()] for column in columns]
    longest = [max(map(len, column)) for column in lines]
    words = [max(len(word) for line in column for word in line.split()) for column in lines]
    if first_whole:
        words[0] = longest[0]
    room = width - (3 * len(columns) + 1) - sum(words)  # borders and padding take the rest
    if room >= sum(longest) - sum(words):
        return [None] * len(columns)
    if room < 0:
        return None
    wants = [most - least for most, least in zip(longest, words, strict=True)]
    widths = list(words)
    by_want = sorted(range(len(wants)), key=wants.__getitem__)
    for done, index in enumerate(by_want):  # the least wanting first: each may end whole
        share = min(wants[index], room // (len(wants) - done))
        widths[index] += share
        room -= share
    return widths


def _metric_header(metric: str) -> str:
    """``test/exit2/acc`` -> ``exit 2``, ``test/anytime_auc`` -> ``anytime AUC``,
    ``train/exit4/acc`` -> ``exit 4 (train)``."""
    split, _, name = metric.removesuffix("/acc").partition("/")
    if name.startswith("exit"):
        label = f"exit {name.removeprefix('exit')}"
    else:
        label = {"mean_exit_acc": "mean of exits", "anytime_auc": "anytime AUC"}.get(name, name)
    return label if split == "test" else f"{label} ({split})"


def _verdict_text(verdict: Verdict | None) -> str:
    if verdict is None:
        return "-"
    return f"{verdict.outcome} ({verdict.difference:+.4f} ± {verdict.margin:.4f})"


def comparison_rows(
    groups: Sequence[GroupSummary],
    metrics: Sequence[str],
    verdicts: Mapping[str, Mapping[str, Verdict | None]],
    against: str | None,
) -> list[list[str]]:
    """Header, then per group its trials and ``mean ± std`` of each metric (the value alone for
    a single trial), then per judged group its verdicts against `against` (difference of
    means ± twice its standard error)."""
    rows = [["group", "trials", *(_metric_header(m) for m in metrics)]]
    for g in groups:
        spread = len(g.trials) > 1  # one trial has a value, not a spread
        cells = [f"{g.mean[m]:.4f}" + (f" ± {g.std[m]:.4f}" if spread else "") for m in metrics]
        rows.append([g.group, str(len(g.trials)), *cells])
    for group, by_metric in verdicts.items():
        pairing = "paired by seed" if any(v and v.paired for v in by_metric.values()) else ""
        label = f"{group} vs {against}" + (f" ({pairing})" if pairing else "")
        rows.append([label, "", *(_verdict_text(by_metric[m]) for m in metrics)])
    return rows


def comparison_markdown(rows: Sequence[Sequence[str]], title: str) -> str:
    """`rows` from :func:`comparison_rows` as a Markdown table under a heading."""
    header, *body = rows
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def comparison_table(rows: Sequence[Sequence[str]], title: str, width: int | None = None) -> Table:
    """`rows` from :func:`comparison_rows` as a terminal table; at `width` columns (a
    terminal's) it wraps between words where they fit."""
    header, *body = rows
    widths = _wrapped_widths(rows, width) if width else None
    table = Table(title=title)
    for index, column in enumerate(header):
        justify = "left" if index == 0 else "right"
        # a word longer than its column folds, never cut short
        table.add_column(column, justify=justify, overflow="fold", width=widths and widths[index])
    for row in body:
        table.add_row(*row)
    return table
