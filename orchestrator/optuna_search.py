"""Optuna decides, Ray runs: a Tune searcher and scheduler backed by one Optuna study.

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
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.credentials import mask, reveal
from orchestrator.space import SpaceSpec, decode_params, optuna_distributions, pruner_note
from trainer import metrics as M
from trainer.config import ConfigError
from trainer.trainable import TRIAL_ERROR

__all__ = [
    "EPOCHS_ATTR",
    "ERROR_ATTR",
    "OPTUNA_TRIAL_NUMBER",
    "RAY_TRIAL_ATTR",
    "OptunaPruningScheduler",
    "OptunaSearcher",
    "failure_reason",
    "make_pruner",
    "make_sampler",
]

OPTUNA_TRIAL_NUMBER = "optuna_trial_number"  # trial config key carrying the Optuna trial number
EPOCHS_ATTR = "epochs"  # user attribute: epochs a multi-objective trial has reported
ERROR_ATTR = "error"  # user attribute of a FAIL trial: why it failed
RAY_TRIAL_ATTR = "ray_trial_id"  # user attribute: the Tune trial that runs the Optuna trial
_MAX_INVALID_ASKS = 100
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def make_sampler(spec: SpaceSpec) -> optuna.samplers.BaseSampler:
    settings = spec.search.sampler
    if settings.kind == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    if settings.kind == "grid":
        grid = {key: dist.choices for key, dist in optuna_distributions(spec).items()}
        return optuna.samplers.GridSampler(grid, seed=settings.seed)
    return optuna.samplers.TPESampler(
        seed=settings.seed,
        n_startup_trials=settings.n_startup_trials,
        multivariate=settings.multivariate,
        constant_liar=settings.constant_liar,
    )


def make_pruner(spec: SpaceSpec) -> optuna.pruners.BasePruner:
    settings = spec.search.pruner
    if pruner_note(spec) is not None:  # configured, but cannot apply
        return optuna.pruners.NopPruner()
    if settings.kind == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=settings.min_resource, reduction_factor=settings.reduction_factor
        )
    if settings.kind == "hyperband":
        return optuna.pruners.HyperbandPruner(
            min_resource=settings.min_resource,
            max_resource=spec.max_epochs,
            reduction_factor=settings.reduction_factor,
        )
    return optuna.pruners.NopPruner()


class OptunaSearcher(Searcher):
    """Asks an Optuna study for each Tune trial's config and tells it how the trial ended."""

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

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.spec, reveal(self.storage_url), self.study_name)
        return self._study

    def _trial(self, trial_id: str) -> optuna.Trial:
        return optuna.Trial(self.study, self._storage_ids[trial_id])

    def _orphan(self) -> optuna.trial.FrozenTrial | None:
        """A RUNNING trial of the study that no Tune trial runs (lost with a killed driver)."""
        running = self.study.get_trials(deepcopy=False, states=[optuna.trial.TrialState.RUNNING])
        known = set(self.numbers.values())
        return next((t for t in running if t.number not in known), None)

    def _hand_out(self, trial_id: str, number: int, storage_id: int, params: dict) -> dict:
        self.numbers[trial_id] = number
        self._storage_ids[trial_id] = storage_id
        self.study._storage.set_trial_user_attr(storage_id, RAY_TRIAL_ATTR, trial_id)
        return {"overrides": params, OPTUNA_TRIAL_NUMBER: number}

    def _handed_out(self) -> int:
        """Trials of the study that a Tune trial ran or runs (not configurations refused)."""
        return sum(RAY_TRIAL_ATTR in t.user_attrs for t in self.study.get_trials(deepcopy=False))

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if (orphan := self._orphan()) is not None:
            overrides = decode_params(self.spec, orphan.params)
            return self._hand_out(trial_id, orphan.number, orphan._trial_id, overrides)
        if self.num_samples is not None and self._handed_out() >= self.num_samples:
            return Searcher.FINISHED
        distributions = optuna_distributions(self.spec)
        for _ in range(_MAX_INVALID_ASKS):
            trial = self.study.ask(distributions)
            overrides = decode_params(self.spec, trial.params)
            try:
                self.spec.job_for(overrides)
            except ConfigError as err:  # a combination no job config accepts
                trial.set_user_attr(ERROR_ATTR, f"never ran: {err}")
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            return self._hand_out(trial_id, trial.number, trial._trial_id, overrides)
        raise ConfigError(f"{self.spec.source}: no valid configuration in {_MAX_INVALID_ASKS} asks")

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
                self._trial(trial_id).set_user_attr(ERROR_ATTR, reason)
            self.study.tell(self._trial(trial_id), state=state.FAIL)
        elif trial_id in self.pruned:
            self.study.tell(self._trial(trial_id), state=state.PRUNED)
        else:
            self.study.tell(self._trial(trial_id), [float(result[m]) for m in self.metrics])

    def _has_objectives(self, result: dict[str, Any]) -> bool:
        return all(m in result for m in self.metrics)

    def get_state(self) -> dict[str, Any]:
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

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.set_state(pickle.load(f))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_study"] = None  # reopened from storage after unpickling
        state["_synced"] = set()  # a restored searcher reads the study again
        state["storage_url"] = mask(self.storage_url)  # Tune pickles it into the sweep dir
        return state


class OptunaPruningScheduler(FIFOScheduler):
    """Runs trials first-in first-out and stops those the study's pruner prunes."""

    def __init__(self, searcher: OptunaSearcher) -> None:
        super().__init__()
        self.searcher = searcher

    def on_trial_result(self, tune_controller, trial, result: dict[str, Any]) -> str:
        if self.searcher.report(trial.trial_id, result):
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE

    def on_trial_error(self, tune_controller, trial) -> None:
        """Called once Ray gives up on a trial (retries spent), before the searcher hears."""
        self.searcher.errors[trial.trial_id] = failure_reason(trial)
        super().on_trial_error(tune_controller, trial)


def failure_reason(trial) -> str:
    """One line from Tune's record of a trial's last failure: the exception raised in the
    trial (``RuntimeError: ...``) or what happened to its process."""
    path = trial.error_file
    if not path or not Path(path).is_file():
        return "failed (no error recorded)"
    last = Path(path).read_text().rsplit("Failure # ", 1)[-1].splitlines()[1:]
    lines = [line.strip() for line in last if line.strip()]
    raised = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (raised[-1] if raised else lines[0] if lines else "failed")[:500]


def open_study(spec: SpaceSpec, storage_url: str, study_name: str) -> optuna.Study:
    """Create or load the sweep's study in RDB storage, its objectives named after the
    metrics (Optuna's plots, optuna-dashboard and the report show the names)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=optuna.storages.RDBStorage(storage_url),
        study_name=study_name,
        directions=["maximize" if mode == "max" else "minimize" for mode in spec.search.modes],
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
    if study.metric_names is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(spec.search.metrics)
    return study
