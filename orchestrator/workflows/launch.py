"""Launch a sweep: Ray Tune runs the trials, an Optuna study decides, MLflow records.

Everything a sweep needs to be resumed, inspected or promoted later is written to
``<storage>/<name>/sweep.json`` next to Tune's experiment state, the Optuna study
(``optuna.db`` unless a server URL is given) and a copy of the space file. Store URLs are
kept there with their passwords masked (:mod:`orchestrator.entities.credentials`).

Every request is checked (:mod:`orchestrator.stores.preflight`) before Ray starts or
anything is recorded, and the sweep's driver lock (:mod:`orchestrator.stores.driver_lock`)
is taken before a local Ray starts: a second ``launch`` of the same name is refused at once.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import ray
import torch
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune

from orchestrator.entities.credentials import mask, remember
from orchestrator.entities.names import RECORD_FILE, STUDY_FILE, SWEEP_TAG
from orchestrator.entities.space import SpaceSpec, grid_size, sweep_params
from orchestrator.entities.sweep import DEFAULT_STORAGE, SweepRecord
from orchestrator.stores import preflight
from orchestrator.stores.driver_lock import driving
from orchestrator.stores.study import open_study
from orchestrator.stores.tracking.runs import ensure_experiment, resolve_tracking_uri
from orchestrator.tuning.cluster import check_ray_address, init_ray, join_ray
from orchestrator.tuning.tuner import fit, sweep_tuner
from trainer.config import ConfigError
from trainer.data import check_available
from trainer.trainable import train_job

__all__ = ["launch", "prepare"]


def local_gpu_count() -> int:
    return torch.cuda.device_count()


def check_gpus(gpus: int, available: int, where: str) -> None:
    if gpus > available:
        raise ConfigError(f"--gpus is {gpus}, but {where} has {available} GPU(s)")


def _check_unused(storage: Path, name: str) -> None:
    if (storage / name / RECORD_FILE).exists():
        raise ConfigError(f"a sweep named {name!r} exists; `orchestrate resume {name}` or --name")


@contextlib.contextmanager
def prepare(
    spec: SpaceSpec,
    *,
    name: str,
    storage_path: str | Path = DEFAULT_STORAGE,
    tracking_uri: str | None = None,
    study_storage: str | None = None,
    gpus: int | None = None,
    address: str | None = None,
    num_samples: int | None = None,
    max_concurrent: int | None = None,
) -> Iterator[SweepRecord]:
    """Check the request, join the cluster at `address` (if given), take the sweep's driver
    lock, start a local Ray (if no `address`); yields the sweep's record, for :func:`launch`
    within the block, which holds the lock. Raises ConfigError before Ray starts (or,
    joining a cluster, before anything is recorded); ClusterUnavailable when a local Ray
    does not start. Whatever stops a local Ray starting (its refusal, Ctrl-C) leaves no
    sweep directory that was not there before."""
    preflight.check_name(name, "--name")
    storage = preflight.check_writable_dir(storage_path, "--storage")
    _check_unused(storage, name)
    if num_samples is not None and num_samples < 1:
        raise ConfigError(f"--num-samples is {num_samples}, but must be >= 1")
    if num_samples and spec.search.sampler.kind == "grid" and num_samples > grid_size(spec):
        raise ConfigError(f"--num-samples is {num_samples}, but the grid has {grid_size(spec)}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent is {max_concurrent}, but must be >= 1")
    if gpus is not None and gpus < 0:
        raise ConfigError(f"--gpus is {gpus}, but must be >= 0")
    if address is None:  # on a cluster the data lives on the workers, not necessarily here
        check_available(spec.base.dataset)
        gpus = local_gpu_count() if gpus is None else gpus
        check_gpus(gpus, local_gpu_count(), "this machine")
    tracking_uri = resolve_tracking_uri(tracking_uri)
    study_storage = study_storage or f"sqlite:///{storage / name / STUDY_FILE}"
    preflight.check_tracking_uri(tracking_uri)
    preflight.check_study_storage(study_storage)
    preflight.check_new_sweep(tracking_uri, study_storage, name)
    if address is not None:  # joining starts nothing, and a refusal leaves no directory
        address = check_ray_address(address)
        join_ray(address)
        available = int(ray.cluster_resources().get("GPU", 0))
        gpus = available if gpus is None else gpus
        check_gpus(gpus, available, f"the cluster at {address}")
    directory = storage / name
    new_directory = not directory.exists()
    with driving(directory, advice="choose another --name"):
        _check_unused(storage, name)  # a launch of the same name may have ended meanwhile
        if address is None:
            try:
                init_ray(num_gpus=gpus)
            except BaseException:  # Ray's refusal, Ctrl-C, anything that stops it starting
                if new_directory:  # it holds only the lock: the launch leaves no trace
                    shutil.rmtree(directory)
                raise
        remember(tracking_uri)
        remember(study_storage)
        yield SweepRecord(
            name=name,
            storage_path=str(storage),
            tracking_uri=tracking_uri,
            experiment_id="",
            parent_run_id="",
            study_storage=study_storage,
            gpus=gpus,
            address=address,
            max_concurrent=max_concurrent or spec.search.max_concurrent,
            num_samples=num_samples or spec.search.num_samples,
            created=datetime.now().isoformat(timespec="seconds"),
        )


def launch(
    spec: SpaceSpec,
    record: SweepRecord,
    callbacks: Sequence[tune.Callback] = (),
    trainable: Callable[[dict[str, Any]], None] = train_job,
) -> tune.ResultGrid:
    """Create the study and the parent run, record the sweep, run it to the end (each trial
    running `trainable`, see :func:`~orchestrator.tuning.tuner.sweep_tuner`). Call it within
    :func:`prepare`'s block, which holds the sweep's driver lock."""
    if record.tracking_uri.startswith("sqlite:///"):
        preflight.sqlite_file(record.tracking_uri).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.source, record.space_file)
    open_study(spec, record.study_storage, record.name)
    client = MlflowClient(record.tracking_uri)
    experiment_id = ensure_experiment(client, record.name, record.tracking_uri)
    parent = client.create_run(
        experiment_id, run_name=record.name, tags={SWEEP_TAG: record.name}
    ).info.run_id
    settings = sweep_params(spec) | {
        "sweep.num_samples": str(record.num_samples),
        "sweep.gpus": str(record.gpus),
        "sweep.address": str(record.address),
        "sweep.max_concurrent": str(record.max_concurrent),
        "sweep.tracking_uri": mask(record.tracking_uri),
        "sweep.study_storage": mask(record.study_storage),
    }
    client.log_batch(parent, params=[Param(k, v) for k, v in settings.items()])
    client.log_artifact(parent, str(record.space_file))
    record = replace(record, experiment_id=experiment_id, parent_run_id=parent)
    record.save()
    return fit(sweep_tuner(spec, record, callbacks, trainable))
