"""``orchestrate compare``: the per-exit table multi-exit papers print, from a finished sweep.

Each COMPLETE trial's final checkpoint (the last one Tune kept in the trial's directory) is
evaluated once on the test split and, unaugmented, on the trial's own training images (how
near the network came to fitting them); the result is cached in ``<sweep>/compare/``, keyed
by the checkpoint, so a second call reads it without loading torch. Trials are grouped by the
value of one config key and judged against a reference group by the rules of
:mod:`orchestrator.selection.groups`. The table is written as Markdown and JSON beside a
figure of test accuracy against GFLOPs per exit, one line per group.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from orchestrator.entities.names import COMPARE_DIR, RAY_TRIAL_ID
from orchestrator.entities.space import SpaceSpec, decode_params
from orchestrator.entities.sweep import SweepRecord
from orchestrator.rendering import plots
from orchestrator.rendering.tables import comparison_markdown, comparison_rows
from orchestrator.selection.groups import GroupSummary, TrialResult, Verdict, judge, summarize
from orchestrator.selection.trials import complete_trials
from orchestrator.stores.preflight import check_output_dir
from orchestrator.stores.study import load_study
from trainer import metrics as M
from trainer.config import ConfigError, JobConfig

__all__ = ["Comparison", "compare", "compared_metrics"]

_FILES = ("md", "json", "png")  # compare-<key>.<ext>: the table, its data, the figure
_CACHE_FORMAT = 2  # 2: training-image metrics beside the test ones


@dataclass(frozen=True)
class Comparison:
    """A sweep's finished trials grouped by `by`, with verdicts against `against`."""

    by: str
    against: str | None
    num_exits: int
    groups: list[GroupSummary]
    verdicts: dict[str, dict[str, Verdict | None]]  # group -> metric -> verdict
    files: list[Path]

    @property
    def metrics(self) -> list[str]:
        return compared_metrics(self.num_exits)

    @property
    def title(self) -> str:
        return f"test accuracy by {self.by}, mean ± std over each group's trials"

    def rows(self) -> list[list[str]]:
        return comparison_rows(self.groups, self.metrics, self.verdicts, self.against)


def compared_metrics(num_exits: int) -> list[str]:
    """The columns: test accuracy per exit, of the ensemble, their mean and the anytime AUC,
    then the final exit's accuracy on the training images."""
    per_exit = [M.exit_acc(k, "test") for k in range(1, num_exits + 1)]
    return [
        *per_exit,
        *(M.with_split(m, "test") for m in (M.ENSEMBLE_ACC, M.MEAN_EXIT_ACC, M.ANYTIME_AUC)),
        M.exit_acc(num_exits, "train"),
    ]


def _label(value: Any) -> str:
    """A group's name: a string as it is, any other value as compact JSON (``[2,4]``)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _config_value(cfg: JobConfig, key: str) -> Any:
    """The value of dotted `key` in `cfg`; KeyError or TypeError if it has none."""
    node: Any = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node


def _group_value(cfg: JobConfig, key: str) -> str:
    return _label(_config_value(cfg, key))


def _as_group(against: str) -> str:
    """`--against` as a group's name: ``'[2, 4]'`` names the group ``[2,4]``."""
    try:
        return _label(json.loads(against))
    except json.JSONDecodeError:
        return against


def _final_checkpoint(record: SweepRecord, trial: optuna.trial.FrozenTrial) -> Path:
    directory = record.directory / f"trial_{trial.user_attrs.get(RAY_TRIAL_ID)}"
    checkpoints = sorted(directory.glob("checkpoint_*"))
    if not checkpoints:
        raise ConfigError(f"trial {trial.number} has no checkpoint in {directory}")
    return checkpoints[-1]


def _evaluate_checkpoint(cfg: JobConfig, checkpoint: Path) -> dict[str, float]:
    """Test and training-image metrics and cumulative GFLOPs per exit of a trial's final
    checkpoint."""
    # Lazy: torch loads only when a trial has no cached result, so a repeated comparison is
    # instant.
    from trainer.engine import build_job, evaluate, load_checkpoint, model_metrics  # noqa: PLC0415

    job = build_job(cfg)
    load_checkpoint(job, checkpoint)
    if job.epoch != cfg.train.epochs:
        raise ConfigError(f"{checkpoint} is from epoch {job.epoch} of {cfg.train.epochs}")
    train = evaluate(job, job.data.train, "train")  # only its split's metrics: MATE's teacher
    train = {k: v for k, v in train.items() if k.startswith("train/")}  # weights are the test's
    return {**evaluate(job, job.data.test, "test"), **train, **model_metrics(job)}


def _cached_metrics(
    record: SweepRecord,
    trial: optuna.trial.FrozenTrial,
    cfg: JobConfig,
    on_evaluate: Callable[[int], None],
) -> dict[str, float]:
    checkpoint = _final_checkpoint(record, trial)
    cache = record.directory / COMPARE_DIR / f"trial-{trial.number}.json"
    key = str(checkpoint.relative_to(record.directory))
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored["checkpoint"] == key and stored.get("format") == _CACHE_FORMAT:
            return stored["metrics"]
    on_evaluate(trial.number)
    metrics = _evaluate_checkpoint(cfg, checkpoint)
    cache.parent.mkdir(exist_ok=True)
    partial = cache.with_suffix(".partial")
    partial.write_text(
        json.dumps({"format": _CACHE_FORMAT, "checkpoint": key, "metrics": metrics}, indent=1)
        + "\n"
    )
    partial.replace(cache)
    return metrics


def _finished_trials(
    record: SweepRecord, spec: SpaceSpec, by: str
) -> list[tuple[optuna.trial.FrozenTrial, JobConfig, str]]:
    """Each COMPLETE trial with its job config and its group value, in trial order."""
    finished = []
    for trial in complete_trials(load_study(record)):
        cfg = spec.job_for(decode_params(spec, trial.params))
        finished.append((trial, cfg, _group_value(cfg, by)))
    return finished


def _check_key(spec: SpaceSpec, by: str) -> None:
    """A key with a value (``loss.kind``), not a section (``loss``), whose groups would be
    whole sections."""
    try:
        node = _config_value(spec.base, by)
    except (KeyError, TypeError):
        raise ConfigError(f"--by is {by!r}, but must be a key of the job config") from None
    if isinstance(node, dict):
        keys = ", ".join(f"{by}.{key}" for key in list(node)[:3])
        raise ConfigError(f"--by is {by!r}, a section; name one of its keys ({keys}, ...)")


def compare(
    record: SweepRecord,
    by: str,
    against: str | None = None,
    output_dir: str | Path | None = None,
    on_evaluate: Callable[[int], None] = lambda number: None,
) -> Comparison:
    """Group the sweep's finished trials by `by`, judge each group against `against`, and
    write ``compare-<by>.md``, ``.json`` and ``.png`` into `output_dir` (the sweep's
    directory by default). `on_evaluate` hears of each trial whose checkpoint is evaluated
    (not read from the cache)."""
    spec = record.spec()
    _check_key(spec, by)
    directory = check_output_dir(output_dir, record)
    finished = _finished_trials(record, spec, by)
    if not finished:
        raise ConfigError(f"sweep {record.name!r} has no finished trial to compare")
    names = list(dict.fromkeys(group for _, _, group in finished))
    against = None if against is None else _as_group(against)
    if against is not None and against not in names:  # checked before any evaluation
        raise ConfigError(f"--against is {against!r}, but the groups are {', '.join(names)}")
    results = [
        TrialResult(
            trial.number, group, cfg.train.seed, _cached_metrics(record, trial, cfg, on_evaluate)
        )
        for trial, cfg, group in finished
    ]
    num_exits = min(sum(m.endswith("/gflops") for m in r.metrics) for r in results)
    groups = summarize(results, [*compared_metrics(num_exits), *_gflops(num_exits)])
    verdicts = _verdicts(groups, against, compared_metrics(num_exits))
    comparison = Comparison(by, against, num_exits, groups, verdicts, [])
    return _write(comparison, directory)


def _gflops(num_exits: int) -> list[str]:
    return [M.exit_gflops(k) for k in range(1, num_exits + 1)]


def _verdicts(
    groups: Sequence[GroupSummary], against: str | None, metrics: Sequence[str]
) -> dict[str, dict[str, Verdict | None]]:
    if against is None:
        return {}
    reference = next(g for g in groups if g.group == against)
    return {
        g.group: {m: judge(g, reference, m) for m in metrics} for g in groups if g.group != against
    }


def _write(comparison: Comparison, directory: Path) -> Comparison:
    directory.mkdir(parents=True, exist_ok=True)
    markdown, table, figure = (directory / f"compare-{comparison.by}.{ext}" for ext in _FILES)
    markdown.write_text(comparison_markdown(comparison.rows(), comparison.title))
    table.write_text(json.dumps(_as_json(comparison), indent=1) + "\n")
    exits = range(1, comparison.num_exits + 1)
    curves = {
        g.group: (
            [g.mean[M.exit_gflops(k)] for k in exits],
            [g.mean[M.exit_acc(k, "test")] for k in exits],
            [g.std[M.exit_acc(k, "test")] for k in exits],
        )
        for g in comparison.groups
    }
    figure.write_bytes(plots.png(plots.group_accuracy_gflops_figure(curves, comparison.by)))
    return replace(comparison, files=[markdown, table, figure])


def _as_json(comparison: Comparison) -> dict[str, Any]:
    return {
        "by": comparison.by,
        "against": comparison.against,
        "groups": [
            {
                "group": g.group,
                "trials": [asdict(t) for t in g.trials],
                "mean": dict(g.mean),
                "std": dict(g.std),
            }
            for g in comparison.groups
        ],
        "verdicts": {
            group: {m: None if v is None else asdict(v) for m, v in by_metric.items()}
            for group, by_metric in comparison.verdicts.items()
        },
    }
