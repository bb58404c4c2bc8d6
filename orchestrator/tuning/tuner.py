"""The Ray Tune Tuner of a sweep: the trainable with its resources, the Optuna-backed
searcher and scheduler, and the callbacks that record the trials."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ray
from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import TrialScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher

from orchestrator.entities.space import SpaceSpec
from orchestrator.entities.sweep import SweepRecord
from orchestrator.tuning.callbacks.report import ReportCallback
from orchestrator.tuning.callbacks.tracking import MlflowTrackingCallback
from orchestrator.tuning.first_wave import gate_first_wave
from orchestrator.tuning.scheduler import OptunaPruningScheduler
from orchestrator.tuning.searcher import OptunaSearcher
from trainer.trainable import train_job

__all__ = [
    "MAX_FAILURES",
    "build_tuner",
    "cluster_slots",
    "concurrency_limit",
    "fit",
    "restore_tuner",
    "sweep_tuner",
    "trial_dirname",
    "trial_param_space",
    "trial_resources",
]

MAX_FAILURES = 2  # retries of a crashed trial, each from its last checkpoint
# Set while a sweep runs: Tune adds no result loggers of its own (see `fit`).
_NO_AUTO_LOGGERS = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"


def trial_resources(spec: SpaceSpec, gpus: int) -> dict[str, float]:
    """Per-trial resources; with no GPUs granted, trials run on CPUs."""
    res = spec.search.resources
    return {"cpu": res.cpu, "gpu": res.gpu if gpus > 0 else 0.0}


def concurrency_limit(spec: SpaceSpec, record: SweepRecord) -> int:
    """Bound on trials at once: the user's, what `--gpus` allows on a shared cluster, and
    the slots of the cluster's nodes (:func:`cluster_slots`). Always set: without a limit
    Tune keeps one trial of a custom searcher pending at a time, so trials start one actor
    after another (and a trial that ends before the next node's actor is up takes that
    node's trial: the node gets none). Not more than the slots: a trial waiting for one
    would have Ray start a new actor for it as often as Tune reuses the actor of a trial
    that ended (measured: docs/benchmarks.md), and the first wave would wait for actors
    that cannot start (:mod:`orchestrator.tuning.first_wave`)."""
    res = trial_resources(spec, record.gpus)
    limits = [record.max_concurrent] if record.max_concurrent else []
    if res["gpu"] > 0:
        limits.append(max(1, int(record.gpus / res["gpu"])))
    limits.append(max(1, cluster_slots(res, [n["Resources"] for n in ray.nodes() if n["Alive"]])))
    return min(limits)


def cluster_slots(trial: dict[str, float], nodes: Sequence[dict[str, float]]) -> int:
    """How many trials asking for `trial` resources ("cpu", "gpu") fit at once on `nodes`
    (each node's Ray resources: "CPU", "GPU"), node by node: a trial runs on one node, so a
    CPU-only head adds no slot to GPU trials, and its CPUs none to a GPU node's."""
    slots = 0
    for node in nodes:
        fits = [node.get("CPU", 0.0) / trial["cpu"]]
        if trial["gpu"] > 0:
            fits.append(node.get("GPU", 0.0) / trial["gpu"])
        slots += int(min(fits) + 1e-9)  # 0.3 / 0.1 is 2.9999999999999996
    return slots


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def trial_param_space(spec: SpaceSpec) -> dict[str, Any]:
    """What every trial's config starts from: the base job's explicitly set keys, so that
    the searcher's overrides resolve the defaults that follow them (``loss.kind``'s) anew
    (:func:`trainer.trainable.job_config_from_trial`)."""
    return {"job": spec.job_for({}).explicit_dict()}


def build_tuner(
    trainable: Callable[[dict[str, Any]], None],
    spec: SpaceSpec,
    *,
    gpus: int,
    searcher: Searcher,
    scheduler: TrialScheduler,
    max_concurrent: int,
    name: str,
    storage_path: str,
    num_samples: int,
    callbacks: Sequence[tune.Callback] = (),
    stop: tune.Stopper | None = None,
) -> tune.Tuner:
    """A Tuner running `trainable` on `spec`'s base job with the trials' resources, at most
    `max_concurrent` at once, retried from their checkpoints, the two latest kept; Tune's
    JSON result logger writes each trial's ``result.json``."""
    return tune.Tuner(
        tune.with_resources(trainable, trial_resources(spec, gpus)),
        param_space=trial_param_space(spec),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent),
            scheduler=scheduler,
            num_samples=num_samples,
            time_budget_s=spec.search.time_budget_s,
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,  # a new trial skips the process start and the torch import
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=[JsonLoggerCallback(), *callbacks],
            stop=stop,
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


def sweep_tuner(
    spec: SpaceSpec,
    record: SweepRecord,
    callbacks: Sequence[tune.Callback] = (),
    trainable: Callable[[dict[str, Any]], None] = train_job,
) -> tune.Tuner:
    """The sweep's Tuner: Optuna proposes and prunes, MLflow records, the report is written
    at the end; `callbacks` run after those. `trainable` runs each trial: the training, or a
    stand-in with the same results (bench/bench_scale.py); the first trials start together
    (:mod:`orchestrator.tuning.first_wave`)."""
    searcher = OptunaSearcher(
        spec, record.study_storage, record.name, num_samples=record.num_samples
    )
    tracking = MlflowTrackingCallback(record.target, spec.search.metric, spec.search.mode)
    limit = concurrency_limit(spec, record)
    return build_tuner(
        gate_first_wave(trainable, min(limit, record.num_samples)),
        spec,
        gpus=record.gpus,
        searcher=searcher,
        scheduler=OptunaPruningScheduler(searcher),
        max_concurrent=limit,
        name=record.name,
        storage_path=record.storage_path,
        num_samples=record.num_samples,
        callbacks=[tracking, ReportCallback(record), *callbacks],
    )


def restore_tuner(spec: SpaceSpec, record: SweepRecord) -> tune.Tuner:
    """The interrupted sweep's Tuner as Tune's experiment state left it (the callbacks given
    at launch come back with it)."""
    return tune.Tuner.restore(
        str(record.directory),
        trainable=tune.with_resources(train_job, trial_resources(spec, record.gpus)),
        resume_unfinished=True,
    )


def fit(tuner: tune.Tuner) -> tune.ResultGrid:
    """Run the sweep's `tuner` without Tune's CSV and TensorBoard result loggers, which
    duplicate what MLflow records and cost Tune's loop about 0.1 s per trial at scale
    (docs/benchmarks.md); its JSON logger stays (:func:`build_tuner`)."""
    with _env(_NO_AUTO_LOGGERS, "1"):
        return tuner.fit()


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
