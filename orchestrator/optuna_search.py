"""Optuna decides, Ray runs: a Tune searcher and scheduler backed by one Optuna study.

Ray's stock ``OptunaSearch`` + ``ASHAScheduler`` tell Optuna a trial that ASHA stopped early
as COMPLETE with its partial-budget value, which misleads TPE. Here the Optuna pruner makes
the early-stopping decision from the intermediate values each trial reports, and the
searcher tells Optuna PRUNED, FAIL or COMPLETE, so the study in RDB storage is exactly what
an Optuna user would expect (and outlives the driver).
"""

from __future__ import annotations

import pickle
from typing import Any

import optuna
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher

from orchestrator.space import SpaceSpec, decode_params, optuna_distributions
from trainer import metrics as M
from trainer.config import ConfigError

__all__ = ["OptunaPruningScheduler", "OptunaSearcher", "make_pruner", "make_sampler"]

OPTUNA_TRIAL_NUMBER = "optuna_trial_number"  # trial config key carrying the Optuna trial number
_MAX_INVALID_ASKS = 100


def make_sampler(spec: SpaceSpec) -> optuna.samplers.BaseSampler:
    settings = spec.search.sampler
    if settings.kind == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    return optuna.samplers.TPESampler(
        seed=settings.seed,
        n_startup_trials=settings.n_startup_trials,
        multivariate=settings.multivariate,
        constant_liar=settings.constant_liar,
    )


def make_pruner(spec: SpaceSpec) -> optuna.pruners.BasePruner:
    settings = spec.search.pruner
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

    def __init__(self, spec: SpaceSpec, storage_url: str, study_name: str) -> None:
        super().__init__(metric=spec.search.metric, mode=spec.search.mode)
        self.spec = spec
        self.storage_url = storage_url
        self.study_name = study_name
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self._storage_ids: dict[str, int] = {}  # Tune trial id -> Optuna storage trial id
        self.pruned: set[str] = set()
        self._last_step: dict[str, int] = {}  # Tune trial id -> last epoch told to Optuna
        self._study: optuna.Study | None = None

    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            self._study = open_study(self.spec, self.storage_url, self.study_name)
        return self._study

    def _trial(self, trial_id: str) -> optuna.Trial:
        return optuna.Trial(self.study, self._storage_ids[trial_id])

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        distributions = optuna_distributions(self.spec)
        for _ in range(_MAX_INVALID_ASKS):
            trial = self.study.ask(distributions)
            overrides = decode_params(self.spec, trial.params)
            try:
                self.spec.job_for(overrides)
            except ConfigError as err:  # a combination no job config accepts
                trial.set_user_attr("invalid", str(err))
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            self.numbers[trial_id] = trial.number
            self._storage_ids[trial_id] = trial._trial_id
            trial.set_user_attr("ray_trial_id", trial_id)
            return {"overrides": overrides, OPTUNA_TRIAL_NUMBER: trial.number}
        raise ConfigError(f"{self.spec.source}: no valid configuration in {_MAX_INVALID_ASKS} asks")

    def report(self, trial_id: str, result: dict[str, Any]) -> bool:
        """Record an intermediate value; True when the pruner says stop this trial."""
        if trial_id not in self._storage_ids or self.metric not in result:
            return False
        epoch = int(result[M.EPOCH])
        if epoch <= self._last_step.get(trial_id, 0):
            return False  # Tune repeats the last result when a trial returns
        self._last_step[trial_id] = epoch
        trial = self._trial(trial_id)
        trial.report(float(result[self.metric]), step=epoch)
        if epoch >= self.spec.max_epochs or not trial.should_prune():
            return False  # the full budget is spent: that is a finished trial
        self.pruned.add(trial_id)
        return True

    def on_trial_complete(
        self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False
    ) -> None:
        if trial_id not in self._storage_ids:
            return
        state = optuna.trial.TrialState
        frozen = self.study._storage.get_trial(self._storage_ids[trial_id])
        if frozen.state.is_finished():
            return
        if error or not result or self.metric not in result:
            self.study.tell(self._trial(trial_id), state=state.FAIL)
        elif trial_id in self.pruned:
            self.study.tell(self._trial(trial_id), state=state.PRUNED)
        else:
            self.study.tell(self._trial(trial_id), float(result[self.metric]))

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


def open_study(spec: SpaceSpec, storage_url: str, study_name: str) -> optuna.Study:
    """Create or load the sweep's study in RDB storage."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        storage=optuna.storages.RDBStorage(storage_url),
        study_name=study_name,
        direction="maximize" if spec.search.mode == "max" else "minimize",
        sampler=make_sampler(spec),
        pruner=make_pruner(spec),
        load_if_exists=True,
    )
