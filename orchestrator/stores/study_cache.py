"""The searcher's view of its study: read from the database once, then kept in memory.

Optuna wraps every ``RDBStorage`` in a cache that keeps finished trials but reads every
unfinished one again from the database whenever a sampler or pruner asks for the trials
(several times per ``ask``): other processes may be writing them. With 16 trials running and
a dozen writes per trial that was half of each ask's CPU time on a sweep's driver.

During a sweep the searcher on Tune's driver is the study's only writer (Tune's trials
report to the driver; ``status``, ``report`` and the callbacks only read). So
:class:`SoleWriterCache` reads the study's trials from the database once, at its first
read, and afterwards writes through: every write goes to the database first (as before,
patiently: :mod:`orchestrator.stores.study_storage`) and, once the database has it, into the
cached trial. Reads never leave the process. A trial written by another process during the
sweep (``study.enqueue_trial`` elsewhere, say) is not seen until the driver restarts; that
is the price, and the one thing this storage assumes.

The study the searcher writes is registered here (:func:`register_written_study`), so that
the tracking callback and the progress line on the same driver read it from memory
(:func:`written_study`, :func:`written_trial`) rather than from the database.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import optuna
from optuna import distributions
from optuna.storages import RDBStorage, _CachedStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = ["SoleWriterCache", "register_written_study", "written_study", "written_trial"]

_written: dict[tuple[str, str], optuna.Study] = {}  # (storage URL, study name) -> the study


def register_written_study(storage_url: str, study: optuna.Study) -> None:
    """Record that this process writes `study` (in a :class:`SoleWriterCache`)."""
    _written[storage_url, study.study_name] = study


def written_study(storage_url: str, study_name: str) -> optuna.Study | None:
    """The study this process writes under that name (None if none): read it from memory."""
    return _written.get((storage_url, study_name))


def written_trial(storage_url: str, study_name: str, number: int) -> FrozenTrial | None:
    """Trial `number` of a study this process writes, from memory; None when it writes no
    such study or trial."""
    study = written_study(storage_url, study_name)
    if study is None:
        return None
    storage = study._storage
    trial_id = storage._study_id_and_number_to_trial_id.get((study._study_id, number))
    return None if trial_id is None else storage.get_trial(trial_id)


class SoleWriterCache(_CachedStorage):
    """Optuna's storage cache for a study this process alone writes (module doc)."""

    def __init__(self, backend: RDBStorage) -> None:
        super().__init__(backend)
        self._loaded: set[int] = set()  # studies whose trials were read from the database

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        if study_id not in self._loaded:
            super()._read_trials_from_remote_storage(study_id)
            self._loaded.add(study_id)

    def get_trial(self, trial_id: int) -> FrozenTrial:
        """A copy, as the database would give: Optuna's ``Trial`` changes the one it holds."""
        with self._lock:
            cached = self._cached(trial_id)
        return copy.deepcopy(cached) if cached is not None else self._backend.get_trial(trial_id)

    def _cached(self, trial_id: int) -> FrozenTrial | None:
        where = self._trial_id_to_study_id_and_number.get(trial_id)
        return None if where is None else self._studies[where[0]].trials[where[1]]

    def _update(self, trial_id: int, field: str, key: Any, value: Any) -> None:
        """Set `key` to `value` in the cached trial's dict `field` (a copy of the trial, as
        Optuna's in-memory storage does: lists handed out earlier keep the old one)."""
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is None:
                return
            trials = self._studies[where[0]].trials
            trial = copy.copy(trials[where[1]])
            setattr(trial, field, {**getattr(trial, field), key: value})
            trials[where[1]] = trial

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: distributions.BaseDistribution,
    ) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        external = distribution.to_external_repr(param_value_internal)
        self._update(trial_id, "distributions", param_name, distribution)
        self._update(trial_id, "params", param_name, external)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        changed = super().set_trial_state_values(trial_id, state, values)
        if changed:  # the database's record of it: its state, values and times
            frozen = self._backend.get_trial(trial_id)
            with self._lock:
                if (where := self._trial_id_to_study_id_and_number.get(trial_id)) is not None:
                    self._studies[where[0]].trials[where[1]] = frozen
        return changed

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        super().set_trial_intermediate_value(trial_id, step, intermediate_value)
        self._update(trial_id, "intermediate_values", step, intermediate_value)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_user_attr(trial_id, key, value)
        self._update(trial_id, "user_attrs", key, value)

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        super().set_trial_system_attr(trial_id, key, value)
        self._update(trial_id, "system_attrs", key, value)
