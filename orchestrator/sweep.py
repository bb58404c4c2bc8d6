"""A sweep: Ray Tune runs the trials, an Optuna study decides, MLflow records.

Everything a sweep needs to be resumed, inspected or promoted later is written to
``<storage>/<name>/sweep.json`` next to Tune's experiment state, the Optuna study
(``optuna.db`` unless a server URL is given) and a copy of the space file. Store URLs are
kept there with their passwords masked (:mod:`orchestrator.credentials`).

Every request is checked (:mod:`orchestrator.preflight`) before Ray starts or anything is
recorded.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import optuna
import ray
import torch
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from orchestrator import preflight
from orchestrator.cluster import init_ray
from orchestrator.credentials import mask, remember, reveal
from orchestrator.figures import ReportCallback, log_report_or_warn
from orchestrator.mlflow_writer import MlflowWriter
from orchestrator.optuna_search import (
    OPTUNA_TRIAL_NUMBER,
    RAY_TRIAL_ATTR,
    OptunaPruningScheduler,
    OptunaSearcher,
    open_study,
)
from orchestrator.space import SpaceSpec, grid_size, load_space, sweep_params
from orchestrator.tracking import (
    SWEEP_TAG,
    MlflowTrackingCallback,
    ensure_experiment,
    flush_writer,
    open_writer,
    resolve_tracking_uri,
    summarize_sweep,
)
from trainer.config import ConfigError
from trainer.data import check_available
from trainer.trainable import train_job

__all__ = ["SweepRecord", "launch", "resume", "sweep_name_for"]

RECORD_FILE = "sweep.json"
SPACE_COPY = "space.yaml"
DEFAULT_STORAGE = "sweeps"
MAX_FAILURES = 2  # retries of a crashed trial, each from its last checkpoint
# SweepRecord fields holding store URLs -> (CLI option, environment variable) that give them
_URL_OPTIONS = {
    "tracking_uri": ("--tracking-uri", "MLFLOW_TRACKING_URI"),
    "study_storage": ("--study-storage", "MATE_STUDY_STORAGE"),
}


@dataclass(frozen=True)
class SweepRecord:
    """What `resume`, `status` and `promote` need to find a sweep again."""

    name: str
    storage_path: str  # Ray Tune storage root (absolute); the sweep lives in storage/name
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    study_storage: str  # Optuna RDB URL
    gpus: int
    address: str | None
    max_concurrent: int | None
    num_samples: int
    created: str

    @property
    def directory(self) -> Path:
        return Path(self.storage_path) / self.name

    @property
    def space_file(self) -> Path:
        return self.directory / SPACE_COPY

    def save(self) -> None:
        """Write sweep.json, with the store URLs' passwords masked."""
        stored = asdict(self)
        for key in _URL_OPTIONS:
            stored[key] = mask(stored[key])
        (self.directory / RECORD_FILE).write_text(json.dumps(stored, indent=2) + "\n")

    @classmethod
    def load(
        cls,
        name: str,
        storage_path: str | Path = DEFAULT_STORAGE,
        full_urls: Iterable[str | None] = (),
    ) -> SweepRecord:
        """Read sweep.json; masked store URLs are filled in from `full_urls` (the
        --tracking-uri/--study-storage the user gave), else ConfigError."""
        path = Path(storage_path).resolve() / name / RECORD_FILE
        if not path.is_file():
            known = sorted(p.parent.name for p in Path(storage_path).glob(f"*/{RECORD_FILE}"))
            hint = f"; known sweeps: {', '.join(known)}" if known else ""
            raise ConfigError(f"no sweep named {name!r} under {storage_path}{hint}")
        try:
            stored = json.loads(path.read_text())
            cls(**stored)  # every field there, no unknown one
        except (OSError, ValueError, TypeError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"{path} is damaged ({reason})") from None
        full_urls = list(full_urls)
        revealed = {}
        for key, (option, env) in _URL_OPTIONS.items():
            try:
                revealed[key] = reveal(stored[key], full_urls)
            except LookupError:
                raise ConfigError(
                    f"sweep {name!r} uses {stored[key]}: give its password with {option} or {env}"
                ) from None
            remember(revealed[key])  # for the callback and searcher Tune unpickles
        return cls(**{**stored, **revealed})

    def spec(self) -> SpaceSpec:
        return load_space(self.space_file)


def sweep_name_for(space_file: str | Path) -> str:
    """``<space file stem>-<timestamp>``, with characters a sweep name cannot have as '-'."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(space_file).stem).strip("-._")[:80]
    return f"{stem or 'sweep'}-{datetime.now():%Y%m%d-%H%M%S}"


def local_gpu_count() -> int:
    return torch.cuda.device_count()


def check_gpus(gpus: int, available: int, where: str) -> None:
    if gpus > available:
        raise ConfigError(f"--gpus is {gpus}, but {where} has {available} GPU(s)")


def trial_resources(spec: SpaceSpec, gpus: int) -> dict[str, float]:
    """Per-trial resources; with no GPUs granted, trials run on CPUs."""
    res = spec.search.resources
    return {"cpu": res.cpu, "gpu": res.gpu if gpus > 0 else 0.0}


def concurrency_limit(spec: SpaceSpec, record: SweepRecord) -> int:
    """Bound on trials at once: the user's, what `--gpus` allows on a shared cluster, and
    what the cluster's CPUs hold. Always set: without a limit Tune keeps one trial of a custom
    searcher pending at a time, so trials start one actor after another (and a trial that
    ends before the next node's actor is up takes that node's trial: the node gets none)."""
    res = trial_resources(spec, record.gpus)
    limits = [record.max_concurrent] if record.max_concurrent else []
    if res["gpu"] > 0:
        limits.append(max(1, int(record.gpus / res["gpu"])))
    limits.append(max(1, int(ray.cluster_resources().get("CPU", 0) / res["cpu"])))
    return min(limits)


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _tuner(spec: SpaceSpec, record: SweepRecord, callbacks: list[tune.Callback]) -> tune.Tuner:
    searcher = OptunaSearcher(
        spec, record.study_storage, record.name, num_samples=record.num_samples
    )
    limit = concurrency_limit(spec, record)
    tracking = MlflowTrackingCallback(
        record.tracking_uri,
        record.experiment_id,
        record.parent_run_id,
        record.name,
        spec.search.metric,
        spec.search.mode,
        (record.study_storage, record.name),
        record.directory,
    )
    return tune.Tuner(
        tune.with_resources(train_job, trial_resources(spec, record.gpus)),
        param_space={"job": spec.job_for({}).to_dict()},
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, limit),
            scheduler=OptunaPruningScheduler(searcher),
            num_samples=record.num_samples,
            time_budget_s=spec.search.time_budget_s,
            trial_dirname_creator=trial_dirname,
            reuse_actors=True,  # a new trial skips the process start and the torch import
        ),
        run_config=tune.RunConfig(
            name=record.name,
            storage_path=record.storage_path,
            callbacks=[tracking, ReportCallback(record), *callbacks],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=0,
        ),
    )


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
) -> SweepRecord:
    """Check the request, then join or start Ray; raises ConfigError before Ray starts
    (or, joining a cluster, before anything is recorded)."""
    preflight.check_sweep_name(name)
    storage = preflight.check_storage_dir(storage_path)
    if (storage / name / RECORD_FILE).exists():
        raise ConfigError(f"a sweep named {name!r} exists; `orchestrate resume {name}` or --name")
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
    study_storage = study_storage or f"sqlite:///{storage / name / 'optuna.db'}"
    preflight.check_tracking_uri(tracking_uri)
    preflight.check_study_storage(study_storage)
    preflight.check_new_sweep(tracking_uri, study_storage, name)
    if address is None:
        init_ray(num_gpus=gpus)
    else:
        address = preflight.check_ray_address(address)
        join_ray(address)
        available = int(ray.cluster_resources().get("GPU", 0))
        gpus = available if gpus is None else gpus
        check_gpus(gpus, available, f"the cluster at {address}")
    remember(tracking_uri)
    remember(study_storage)
    return SweepRecord(
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


def join_ray(address: str) -> None:
    """Connect to the cluster at `address`; a refusal (a version or token mismatch) is a
    ConfigError."""
    try:
        init_ray(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot join the Ray cluster at {address}: {reason}") from None


def launch(
    spec: SpaceSpec, record: SweepRecord, callbacks: list[tune.Callback] = ()
) -> tune.ResultGrid:
    """Create the study and the parent run, record the sweep, run it to the end."""
    record.directory.mkdir(parents=True, exist_ok=True)
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
    record = SweepRecord(
        **{**asdict(record), "experiment_id": experiment_id, "parent_run_id": parent}
    )
    record.save()
    return _tuner(spec, record, list(callbacks)).fit()


def is_finished(record: SweepRecord) -> bool:
    """Whether the study has all the sweep's trials (those handed to Tune: not the
    configurations refused before they ran), none of them still running."""
    trials = optuna.load_study(study_name=record.name, storage=record.study_storage).trials
    ran = [t for t in trials if RAY_TRIAL_ATTR in t.user_attrs]
    return len(ran) >= record.num_samples and all(t.state.is_finished() for t in trials)


def check_stores(record: SweepRecord) -> None:
    """The sweep's tracking store and study storage answer."""
    preflight.check_tracking_uri(record.tracking_uri, "the sweep's tracking URI")
    preflight.check_study_storage(record.study_storage, "the sweep's study storage")


def check_resumable(record: SweepRecord) -> None:
    """The sweep's stores answer and Tune's state is there; before Ray starts."""
    check_stores(record)
    if not tune.Tuner.can_restore(str(record.directory)):
        raise ConfigError(
            f"sweep {record.name!r} has no Tune state to resume in {record.directory}"
        )


def _writer(record: SweepRecord) -> MlflowWriter:
    return open_writer(
        record.tracking_uri,
        record.experiment_id,
        record.parent_run_id,
        record.name,
        record.directory,
    )


def last_checkpoints(record: SweepRecord) -> dict[int, str]:
    """Optuna trial number -> the last checkpoint directory its Tune trial left."""
    found = {}
    for trial_dir in record.directory.glob("trial_*"):
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        if checkpoints and (trial_dir / "params.json").exists():
            number = json.loads((trial_dir / "params.json").read_text())[OPTUNA_TRIAL_NUMBER]
            found[number] = str(checkpoints[-1])
    return found


def complete_record(record: SweepRecord) -> None:
    """Complete the MLflow record of a sweep whose trials have all finished (no Ray needed):
    apply the writes a killed driver left in the journal and write what it died before:
    the summary (the parent run is still RUNNING), the report (not among its artifacts)."""
    from orchestrator.html_report import REPORT_FILE

    flush_writer(_writer(record), record.name)
    client = MlflowClient(record.tracking_uri)
    if client.get_run(record.parent_run_id).info.status == "RUNNING":
        writer = _writer(record)
        study = (record.study_storage, record.name)
        metrics = record.spec().search.metrics
        summarize_sweep(writer, study, metrics, last_checkpoints(record), finished=True)
        flush_writer(writer, record.name)
    if REPORT_FILE not in {f.path for f in client.list_artifacts(record.parent_run_id)}:
        log_report_or_warn(record)


def resume(record: SweepRecord) -> tune.ResultGrid | None:
    """Continue an interrupted sweep where Tune's experiment state left it (the callbacks
    given at launch come back with it). A finished sweep only gets its MLflow record
    completed (:func:`complete_record`; returns None)."""
    check_resumable(record)
    if is_finished(record):
        complete_record(record)
        return None
    spec = record.spec()
    if record.address:
        join_ray(preflight.check_ray_address(record.address))
    else:
        init_ray(num_gpus=record.gpus)
    tuner = tune.Tuner.restore(
        str(record.directory),
        trainable=tune.with_resources(train_job, trial_resources(spec, record.gpus)),
        resume_unfinished=True,
    )
    return tuner.fit()
