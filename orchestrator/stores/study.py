"""The sweep's Optuna study: created with its sampler and pruner, loaded to be read, and the
Optuna distributions of a search space."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import optuna
from optuna.search_space.group_decomposed import _GroupDecomposedSearchSpace, _SearchSpaceGroup
from optuna.trial import TrialState

from orchestrator.entities.space import SpaceSpec, decode_params, encode_choice, pruner_note
from orchestrator.entities.sweep import SweepRecord
from orchestrator.stores.study_cache import SoleWriterCache
from orchestrator.stores.study_storage import PatientRDBStorage, ReadingRDBStorage

__all__ = [
    "load_study",
    "load_study_from",
    "make_pruner",
    "make_sampler",
    "open_study",
    "optuna_distributions",
    "reading_storage",
    "suggest_params",
]


def optuna_distributions(spec: SpaceSpec) -> dict[str, optuna.distributions.BaseDistribution]:
    """The Optuna distribution of every searched key (list/dict choices encoded as JSON)."""
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, p in spec.space.items():
        if p.type == "float":
            step = None if p.step is None else float(p.step)
            dists[key] = optuna.distributions.FloatDistribution(
                float(p.low), float(p.high), log=p.log, step=step
            )
        elif p.type == "int":
            step = 1 if p.step is None else p.step
            dists[key] = optuna.distributions.IntDistribution(p.low, p.high, log=p.log, step=step)
        else:
            dists[key] = optuna.distributions.CategoricalDistribution(
                [encode_choice(c) for c in p.choices]
            )
    return dists


def suggest_params(spec: SpaceSpec, trial: optuna.Trial) -> dict[str, Any]:
    """Sample a trial's parameters define-by-run: in :meth:`SpaceSpec.sampling_order`, each
    one only where its `when` conditions hold on the values drawn before it. Returns the
    Optuna params (list/dict choices still JSON)."""
    dists = optuna_distributions(spec)
    params: dict[str, Any] = {}
    for key in spec.sampling_order():
        if spec.space[key].applies(decode_params(spec, params)):
            params[key] = _suggest(trial, key, dists[key])
    return params


def _suggest(trial: optuna.Trial, key: str, dist: optuna.distributions.BaseDistribution) -> Any:
    if isinstance(dist, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, optuna.distributions.FloatDistribution):
        return trial.suggest_float(key, dist.low, dist.high, log=dist.log, step=dist.step)
    return trial.suggest_int(key, dist.low, dist.high, log=dist.log, step=dist.step)


def make_sampler(spec: SpaceSpec) -> optuna.samplers.BaseSampler:
    settings = spec.search.sampler
    if settings.kind == "random":
        return optuna.samplers.RandomSampler(seed=settings.seed)
    if settings.kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=settings.seed)
    if settings.kind == "grid":
        grid = {key: dist.choices for key, dist in optuna_distributions(spec).items()}
        return optuna.samplers.GridSampler(grid, seed=settings.seed)
    with warnings.catch_warnings():  # `group` is experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=settings.seed,
            n_startup_trials=settings.n_startup_trials,
            multivariate=settings.multivariate,
            # A conditional space: multivariate TPE models each group of parameters that
            # occur together, rather than falling back to sampling them independently.
            group=settings.multivariate and spec.conditional,
            constant_liar=settings.constant_liar,
        )
    if sampler._group_decomposed_search_space is not None:
        sampler._group_decomposed_search_space = IncrementalGroupDecomposedSearchSpace(True)
    return sampler


class IncrementalGroupDecomposedSearchSpace(_GroupDecomposedSearchSpace):
    """Optuna's decomposition of a conditional space into groups of parameters that occur
    together, which TPE (``group=True``) recomputes over every finished trial at every ask:
    here each finished trial is added once. Adding a trial's parameters again changes
    nothing (every group is then inside them or apart from them), so the groups, and their
    order, are Optuna's."""

    def __init__(self, include_pruned: bool = False) -> None:
        super().__init__(include_pruned)
        self._added: set[int] = set()  # numbers of the trials added

    def calculate(self, study: optuna.Study, use_cache: bool = False) -> _SearchSpaceGroup:
        if self._study_id not in (None, study._study_id):
            raise ValueError("the search space of one study was asked for another's")
        self._study_id = study._study_id
        states = (TrialState.COMPLETE, TrialState.PRUNED)[: 1 + self._include_pruned]
        for trial in study._get_trials(deepcopy=False, states=states, use_cache=use_cache):
            if trial.number not in self._added:
                self._added.add(trial.number)
                self._search_space.add_distributions(trial.distributions)
        return copy.deepcopy(self._search_space)


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


def open_study(spec: SpaceSpec, storage_url: str, study_name: str) -> optuna.Study:
    """Create or load the sweep's study in RDB storage that waits for a database that is
    down (:mod:`orchestrator.stores.study_storage`), its objectives named after the metrics
    (Optuna's plots, optuna-dashboard and the report show the names)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=SoleWriterCache(PatientRDBStorage(storage_url)),
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


def load_study(record: SweepRecord) -> optuna.Study:
    return load_study_from(record.study_storage, record.name)


def load_study_from(storage_url: str, study_name: str) -> optuna.Study:
    """An existing study, to read (:func:`reading_storage`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(study_name=study_name, storage=reading_storage(storage_url))


def reading_storage(storage_url: str) -> ReadingRDBStorage:
    """The storage of existing studies, connected without Optuna's schema checks
    (:class:`~orchestrator.stores.study_storage.ReadingRDBStorage`)."""
    return ReadingRDBStorage(storage_url)
