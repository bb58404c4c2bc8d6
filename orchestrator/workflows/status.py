"""Read a recorded sweep's state from its stores: what ``status`` and the end of ``launch``
and ``resume`` show. Only reads; imports neither Ray nor MLflow nor torch."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import optuna

from orchestrator.entities.names import RECORD_FILE
from orchestrator.entities.space import SpaceSpec
from orchestrator.entities.sweep import SweepRecord
from orchestrator.rendering.tables import best_summary, counts_text
from orchestrator.selection.trials import is_finished, state_counts
from orchestrator.stores.driver_lock import driver_running
from orchestrator.stores.preflight import check_stores, check_study_of
from orchestrator.stores.study import load_study
from trainer.config import ConfigError

__all__ = ["SweepStatus", "open_sweep", "sweep_rows", "sweep_status"]


@dataclass(frozen=True)
class SweepStatus:
    """A recorded sweep with its study as it is now (and its space, read when asked for)."""

    record: SweepRecord
    study: optuna.Study

    @functools.cached_property
    def spec(self) -> SpaceSpec:
        return self.record.spec()

    @property
    def finished(self) -> bool:
        return is_finished(self.study, self.record.num_samples)

    @property
    def interrupted(self) -> bool:
        """Not finished, and no process runs it (its RUNNING trials wait for `resume`)."""
        return not self.finished and not driver_running(self.record.directory)

    def summary(self) -> str:
        """``4/8 trials (complete 3 running 1); best ...``."""
        counts = counts_text(state_counts(self.study))
        return (
            f"{len(self.study.trials)}/{self.record.num_samples} trials ({counts}); "
            f"{best_summary(self.study)}"
        )


def open_sweep(
    name: str, storage: str | Path, full_urls: Iterable[str | None], *, study_only: bool = False
) -> SweepRecord:
    """The recorded sweep `name` (`full_urls`: its store URLs with passwords, when its record
    keeps them masked), once its stores (with `study_only`, its study) have answered."""
    record = SweepRecord.load(name, storage, full_urls)
    (check_study_of if study_only else check_stores)(record)
    return record


def sweep_status(record: SweepRecord) -> SweepStatus:
    return SweepStatus(record, load_study(record))


def sweep_rows(storage: str | Path, full_urls: Iterable[str | None] = ()) -> list[list[str]]:
    """One row per sweep found under `storage`, in the columns of
    :data:`orchestrator.rendering.tables.SWEEPS_COLUMNS`; its trials cell (``8/8: complete 6
    pruned 2``) ends with ``interrupted`` when no process runs an unfinished sweep (`resume`
    continues it); a sweep whose record cannot be read, or whose study does not answer,
    says why there."""
    rows = []
    full_urls = list(full_urls)
    for path in sorted(Path(storage).glob(f"*/{RECORD_FILE}")):
        try:
            record = SweepRecord.load(path.parent.name, storage, full_urls)
            check_study_of(record)
            now = sweep_status(record)
        except ConfigError as err:
            rows.append([path.parent.name, "-", str(err), "-"])
            continue
        trials = f"{len(now.study.trials)}/{record.num_samples}: "
        trials += counts_text(state_counts(now.study))
        rows.append(
            [
                record.name,
                record.created.replace("T", " ")[:16],  # to the minute
                f"{trials}, interrupted" if now.interrupted else trials,
                best_summary(now.study),
            ]
        )
    return rows
