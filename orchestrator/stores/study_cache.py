"""The searcher's view of its study: read from the database once, then kept in memory.

Optuna wraps every ``RDBStorage`` in a cache that keeps finished trials but reads every
unfinished one again from the database whenever a sampler or pruner asks for the trials
(several times per ``ask``): other processes may be writing them. With 16 trials running and
a dozen writes per trial that was half of each ask's CPU time on a sweep's driver.

During a sweep the searcher on Tune's driver is the study's only writer (Tune's trials
report to the driver; ``status``, ``report`` and the callbacks only read). So
:class:`SoleWriterCache` reads the study's trials from the database once, at its first
read, and afterwards keeps its copy current itself. Reads never leave the process. A trial
written by another process during the sweep (``study.enqueue_trial`` elsewhere, say) is not
seen until the driver restarts; that is the price, and the one thing this storage assumes.

A new trial and its parameters (the searcher asks on a thread of its own) are written to the
database before the trial is handed out. What Tune's loop writes afterwards, an epoch's
value, an attribute, how the trial ended, changes the copy at once and goes to the database
behind it, in order, on a thread of its own (patiently, as before:
:mod:`orchestrator.stores.study_storage`), so that the loop never waits for a commit.
:meth:`SoleWriterCache.flush` waits until the database has every write: the searcher
flushes before Tune saves its state (the database is then never behind what Tune will
restore), and the sweep's end flushes before the summary and the report read the study.
A write the database refused for good is raised by the next write or flush. The end time
of a trial in the copy is the driver's clock; the database records its own, a few
milliseconds later.

The study the searcher writes is registered here (:func:`register_written_study`), so that
the tracking callback and the progress line on the same driver read it from memory
(:func:`written_study`, :func:`written_trial`) rather than from the database.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import optuna
from optuna import distributions
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage, _CachedStorage
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "SoleWriterCache",
    "flush_written_study",
    "register_written_study",
    "written_study",
    "written_trial",
]

_written: dict[tuple[str, str], optuna.Study] = {}  # (storage URL, study name) -> the study


def register_written_study(storage_url: str, study: optuna.Study) -> None:
    """Record that this process writes `study` (in a :class:`SoleWriterCache`)."""
    _written[storage_url, study.study_name] = study


def written_study(storage_url: str, study_name: str) -> optuna.Study | None:
    """The study this process writes under that name (None if none): read it from memory."""
    return _written.get((storage_url, study_name))


def flush_written_study(storage_url: str, study_name: str) -> None:
    """Wait until the database has every write of the study this process writes, if any."""
    if (study := written_study(storage_url, study_name)) is not None:
        study._storage.flush()


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
        self._behind = ThreadPoolExecutor(1, thread_name_prefix="study-writer")
        self._refused: BaseException | None = None  # a write behind that failed for good

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        del state["_behind"]
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._behind = ThreadPoolExecutor(1, thread_name_prefix="study-writer")

    def _write_behind(self, call: Callable[[], Any]) -> None:
        self._raise_refused()
        self._behind.submit(self._applied, call)

    def _applied(self, call: Callable[[], Any]) -> None:
        if self._refused is None:  # after a refusal, nothing more: flush raises it
            try:
                call()
            except BaseException as err:
                self._refused = err

    def _raise_refused(self) -> None:
        if self._refused is not None:
            raise self._refused

    def flush(self) -> None:
        """Wait until the database has every write made so far."""
        self._behind.submit(lambda: None).result()
        self._raise_refused()

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

    def _change(self, trial_id: int, change: Callable[[FrozenTrial], None]) -> None:
        """Apply `change` to a copy of the cached trial, which replaces it (lists handed out
        earlier keep the old one, as with Optuna's in-memory storage)."""
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            if where is None:
                return
            trials = self._studies[where[0]].trials
            trial = copy.copy(trials[where[1]])
            change(trial)
            trials[where[1]] = trial

    def _set(self, trial_id: int, field: str, key: Any, value: Any) -> None:
        """Set `key` to `value` in the cached trial's dict `field`."""

        def change(trial: FrozenTrial) -> None:
            setattr(trial, field, {**getattr(trial, field), key: value})

        self._change(trial_id, change)

    def _updatable(self, trial_id: int) -> FrozenTrial | None:
        """The cached trial; raises as the database would if it has finished."""
        with self._lock:
            cached = self._cached(trial_id)
        if cached is not None and cached.state.is_finished():
            raise UpdateFinishedTrialError(
                f"Trial#{cached.number} has already finished and can not be updated."
            )
        return cached

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: distributions.BaseDistribution,
    ) -> None:
        super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
        external = distribution.to_external_repr(param_value_internal)
        self._set(trial_id, "distributions", param_name, distribution)
        self._set(trial_id, "params", param_name, external)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        cached = self._updatable(trial_id)
        if cached is None:  # not in this cache: the database decides
            return super().set_trial_state_values(trial_id, state, values)
        if state == TrialState.RUNNING and cached.state != TrialState.WAITING:
            return False

        def change(trial: FrozenTrial) -> None:
            now = datetime.now()
            trial.state, trial.values = state, None if values is None else list(values)
            if state == TrialState.RUNNING:
                trial.datetime_start = now
            if state.is_finished():
                trial.datetime_complete = now

        self._change(trial_id, change)
        self._write_behind(lambda: self._backend.set_trial_state_values(trial_id, state, values))
        return True

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self._updatable(trial_id)
        self._set(trial_id, "intermediate_values", step, intermediate_value)
        write = self._backend.set_trial_intermediate_value
        self._write_behind(lambda: write(trial_id, step, intermediate_value))

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._updatable(trial_id)
        self._set(trial_id, "user_attrs", key, value)
        self._write_behind(lambda: self._backend.set_trial_user_attr(trial_id, key, value))

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self._updatable(trial_id)
        self._set(trial_id, "system_attrs", key, value)
        self._write_behind(lambda: self._backend.set_trial_system_attr(trial_id, key, value))
