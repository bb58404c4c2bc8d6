"""Optuna decides, Ray runs: a Tune searcher backed by one Optuna study, and with it the
scheduler of :mod:`orchestrator.tuning.scheduler`.

Ray's stock ``OptunaSearch`` + ``ASHAScheduler`` tell Optuna a trial that ASHA stopped early
as COMPLETE with its partial-budget value, which misleads TPE. Here the Optuna pruner makes
the early-stopping decision from the intermediate values each trial reports, and the
searcher tells Optuna PRUNED, FAIL or COMPLETE, so the study in RDB storage is exactly what
an Optuna user would expect (and outlives the driver). A failed trial keeps why in its user
attribute ``error``.

With several objectives (``search.metric`` a list) the study has one direction per metric,
the sampler (TPE or NSGA-II) works on the Pareto front, and nothing is pruned: Optuna's
pruners take one intermediate value per step, which a multi-objective trial cannot report.
Such a trial records its progress in the user attribute ``epochs`` instead.

After a driver crash Tune resumes from its last saved experiment state, which can be older
than the study: trials Tune no longer knows of are still RUNNING in the study, and known
ones may have reported (or finished) past the restored checkpoint. The searcher hands each
such orphaned trial (same number, same params) to the next trial Tune asks for, never
reports a step twice, and stops a restored trial the study has already finished. An orphan
may even have finished before the crash: Tune, not knowing it, asks for one trial more, so
the searcher counts the trials the study has handed out and says FINISHED at the budget.
It reads the study for orphans and for that count once per driver (at its first suggestion),
not per trial: a sweep of thousands of trials pays no scan of the study per trial.

Optuna's sampler runs in a process of its own, on a mirror of the study
(:mod:`orchestrator.tuning.sampler_process`): TPE's cost grows with the study, and on the
driver it held the interpreter lock that Tune's loop needs. The driver writes each trial the
mirror asks for to the study, and tells the mirror how each trial ended. Asking happens ahead
of demand, on a thread, one trial at a time: when a trial is handed out and the budget holds
at least two more, the next is asked while Tune runs (the budget's last trial is asked when
it is wanted, with all the study knows by then). A trial asked ahead is RUNNING in the study
(the constant liar counts it) but has no Tune trial yet; after a driver crash it is an orphan
like any other. Nothing is asked ahead without a budget or with a time budget, where the
sweep may end before the trial is wanted (it would be left RUNNING).
"""

from __future__ import annotations

import pickle
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import optuna
from ray.tune.search import Searcher

from orchestrator.entities.credentials import MaskedWhenPickled, reveal
from orchestrator.entities.names import EPOCHS_ATTR, ERROR, RAY_TRIAL_ID, TRIAL_NUMBER
from orchestrator.entities.space import SpaceSpec, decode_params
from orchestrator.stores.study import open_study
from orchestrator.stores.study_cache import register_written_study
from orchestrator.tuning.sampler_process import SamplerProcess
from trainer import metrics as M
from trainer.trainable import TRIAL_ERROR

__all__ = ["OptunaSearcher"]


class OptunaSearcher(MaskedWhenPickled, Searcher):
    """Asks an Optuna study for each Tune trial's config and tells it how the trial ended."""

    # Tune pickles the searcher into the sweep directory: no password, and the study is
    # read again (reopened from storage) after unpickling.
    _secret_fields = ("storage_url",)
    _fresh_fields = (
        ("_study", lambda: None),
        ("_synced", set),
        ("_orphans", lambda: None),
        ("_handed", lambda: None),
        ("_sampler", lambda: None),
        ("_asker", lambda: None),
        ("_ahead", lambda: None),
    )

    def __init__(
        self, spec: SpaceSpec, storage_url: str, study_name: str, *, num_samples: int | None = None
    ) -> None:
        """`num_samples`: the sweep's trial budget (None: as many as Tune asks for)."""
        # Tune is not told the metric: it would refuse the one result of a trial that failed
        # for good (trainer.trainable.TRIAL_ERROR), which has none.
        super().__init__()
        self.metrics = spec.search.metrics
        self.num_samples = num_samples
        self.spec = spec
        self.storage_url = storage_url
        self.study_name = study_name
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._storage_ids: dict[str, int] = {}  # Tune trial id -> Optuna storage trial id
        self.pruned: set[str] = set()
        self._last_step: dict[str, int] = {}  # Tune trial id -> last epoch told to Optuna
        self.errors: dict[str, str] = {}  # Tune trial id -> why it failed (from the scheduler)
        self._synced: set[str] = set()  # trial ids whose last step was read from the study
        self._study: optuna.Study | None = None
        # Read from the study at the driver's first suggestion (see the module doc):
        self._orphans: list[optuna.trial.FrozenTrial] | None = None
        self._handed: int | None = None  # trials of the study a Tune trial ran or runs
        self._sampler: SamplerProcess | None = None  # started at the first suggestion
        self._asker: ThreadPoolExecutor | None = None
        self._ahead: Future[tuple[int, int, dict[str, Any]]] | None = None

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.spec, reveal(self.storage_url), self.study_name)
            register_written_study(reveal(self.storage_url), self._study)
        return self._study

    def _trial(self, trial_id: str) -> optuna.Trial:
        return optuna.Trial(self.study, self._storage_ids[trial_id])

    def _read_study(self) -> None:
        """Once per driver: the orphans, RUNNING trials of the study that no Tune trial runs
        (lost with a killed driver), and how many trials Tune trials ran or run (not the
        configurations refused before they ran)."""
        trials = self.study.get_trials(deepcopy=False)
        known = set(self.numbers.values())
        running = optuna.trial.TrialState.RUNNING
        self._orphans = [t for t in trials if t.state == running and t.number not in known]
        self._handed = sum(RAY_TRIAL_ID in t.user_attrs for t in trials)

    def _hand_out(
        self, trial_id: str, number: int, storage_id: int, params: dict, counted: bool
    ) -> dict:
        """`counted`: the trial had a Tune trial before (an orphan that ran)."""
        self.numbers[trial_id] = number
        self._storage_ids[trial_id] = storage_id
        self.study._storage.set_trial_user_attr(storage_id, RAY_TRIAL_ID, trial_id)
        self._handed += not counted
        return {"overrides": params, TRIAL_NUMBER: number}

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._orphans is None:
            self._read_study()
        if self._orphans:
            orphan = self._orphans.pop(0)
            overrides = decode_params(self.spec, orphan.params)
            counted = RAY_TRIAL_ID in orphan.user_attrs
            return self._hand_out(trial_id, orphan.number, orphan._trial_id, overrides, counted)
        if self.num_samples is not None and self._handed >= self.num_samples:
            self._close_sampler()
            return Searcher.FINISHED
        ahead, self._ahead = self._ahead, None
        number, storage_id, overrides = ahead.result() if ahead is not None else self._new_trial()
        config = self._hand_out(trial_id, number, storage_id, overrides, False)
        if self._asks_ahead() and self._handed + 1 < self.num_samples:
            if self._asker is None:
                self._asker = ThreadPoolExecutor(1, thread_name_prefix="optuna-ask")
            self._ahead = self._asker.submit(self._new_trial)
        return config

    def _asks_ahead(self) -> bool:
        """Whether every trial asked ahead will be wanted: a trial budget, no time budget."""
        return self.num_samples is not None and not self.spec.search.time_budget_s

    def _new_trial(self) -> tuple[int, int, dict[str, Any]]:
        """A new trial of the study, asked of the sampler's process: its number, storage id
        and overrides. The configurations it refused are written to the study too (FAIL)."""
        if self._sampler is None:
            self._sampler = SamplerProcess(self.spec, self.study.get_trials(deepcopy=False))
        asked = self._sampler.ask()
        for refused in asked.refused:
            self.study.add_trial(refused)
        storage = self.study._storage
        storage_id = storage.create_new_trial(self.study._study_id, template_trial=asked.trial)
        self._sampler.bind(asked.mirror_id, storage_id)
        number = storage.get_trial(storage_id).number
        return number, storage_id, decode_params(self.spec, asked.trial.params)

    def _close_sampler(self) -> None:
        """The budget is handed out: nothing more will be asked."""
        if self._sampler is not None:
            self._sampler.close()
            self._sampler = None

    def report(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record an intermediate value; True when the pruner says stop this trial."""
        if trial_id not in self._storage_ids or not self._has_objectives(result):
            return False
        if trial_id not in self._synced and self._sync(trial_id):
            return True  # the study finished this trial before the driver was restarted
        epoch = int(result[M.EPOCH])
        # Reported before: Tune repeats a returning trial's last result, and a trial
        # restarted from an older checkpoint repeats epochs.
        if epoch <= self._last_step.get(trial_id, 0):
            return False
        self._last_step[trial_id] = epoch
        trial = self._trial(trial_id)
        if self.spec.search.multi_objective:
            trial.set_user_attr(EPOCHS_ATTR, epoch)
            return False
        trial.report(float(result[self.metrics[0]]), step=epoch)
        if epoch >= self.spec.max_epochs or not trial.should_prune():
            return False  # the full budget is spent: that is a finished trial
        self.pruned.add(trial_id)
        return True

    def _sync(self, trial_id: str) -> bool:
        """Take the trial's last reported step from the study (it may be ahead of Tune's
        restored state); True when the study has finished the trial already."""
        self._synced.add(trial_id)
        frozen = self.study._storage.get_trial(self._storage_ids[trial_id])
        last = max(frozen.intermediate_values, default=frozen.user_attrs.get(EPOCHS_ATTR, 0))
        self._last_step[trial_id] = max(self._last_step.get(trial_id, 0), last)
        return frozen.state.is_finished()

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._storage_ids:
            return
        state = optuna.trial.TrialState
        frozen = self.study._storage.get_trial(self._storage_ids[trial_id])
        if frozen.state.is_finished():
            return
        if error or not result or not self._has_objectives(result):
            reason = self.errors.pop(trial_id, None) or (result or {}).get(TRIAL_ERROR)
            if reason:
                self._trial(trial_id).set_user_attr(ERROR, reason)
            self.study.tell(self._trial(trial_id), state=state.FAIL)
        elif trial_id in self.pruned:
            self.study.tell(self._trial(trial_id), state=state.PRUNED)
        else:
            self.study.tell(self._trial(trial_id), [float(result[m]) for m in self.metrics])
        if self._sampler is not None:
            self._sampler.finish(self.study._storage.get_trial(self._storage_ids[trial_id]))

    def _has_objectives(self, result: dict[str, Any]) -> bool:
        return all(m in result for m in self.metrics)

    def get_state(self) -> dict[str, Any]:
        """What Tune saves with its experiment state; the study's database has every write
        of the trials in it by then (:meth:`SoleWriterCache.flush`)."""
        if self._study is not None:
            self._study._storage.flush()
        return {
            "numbers": self.numbers,
            "storage_ids": self._storage_ids,
            "pruned": self.pruned,
            "last_step": self._last_step,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.numbers = state["numbers"]
        self._storage_ids = state["storage_ids"]
        self.pruned = state["pruned"]
        self._last_step = state["last_step"]
        self._orphans = None  # a restored driver reads the study again

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))
